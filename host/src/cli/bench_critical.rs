//! `aq bench critical`: puts to a critical scope, each signed by two principals and recorded in
//! lineage, against plain puts straight to the same etcd, at the same concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use etcd_client::proto as pb;
use serde_json::json;

use super::CliError;
use super::bench_put::{RemoveOnDrop, cpu_seconds, ready, serve_process};
use crate::backend::managed::EtcdProcess;
use crate::client::SignedClient;

/// `aq bench put`'s layout plus `secrets` under `critical` with a two-approver rule.
fn layout(etcd_url: &str) -> String {
    format!(
        r#"{}
[[scopes]]
id = "secrets"
prefix = "/registry/secrets/"
group = "main"
policy = "builtin:critical"
config = {{ role = "secret-writer", lineage = "full", approval = {{ voters = [{{ principal = "alice", weight = 1 }}, {{ principal = "bob", weight = 1 }}], threshold = 2, expiry_seconds = 60 }} }}
"#,
        super::bench_put::layout(etcd_url)
    )
}

/// One measured configuration.
struct Run {
    target: &'static str,
    puts: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU seconds used during the run by aq (none for direct etcd), etcd and this process,
    /// the clients.
    cpu: (Option<f64>, f64, f64),
}

pub(super) fn critical(seconds: u64, clients: usize, etcd_binary: &str) -> Result<(), CliError> {
    if clients == 0 {
        return Err(CliError::Input("--clients must be at least 1".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::Input(e.to_string()))?;
    runtime.block_on(run(Duration::from_secs(seconds.max(1)), clients, etcd_binary))
}

async fn run(duration: Duration, clients: usize, etcd_binary: &str) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("aq-bench-critical-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut etcd = EtcdProcess::spawn(etcd_binary, "bench", &dir.join("etcd")).map_err(|e| CliError::Input(e.to_string()))?;
    let direct = ready("etcd", etcd.client_url()).await?;
    let etcd_pid = etcd.pid().ok_or_else(|| CliError::Input(format!("etcd exited at start:\n{}", etcd.log_tail(10))))?;
    let layout_path = dir.join("layout.toml");
    std::fs::write(&layout_path, layout(etcd.client_url()))?;
    let aq = serve_process(&dir, "aq", &layout_path).await?;
    let aq_url = aq.url.clone();

    // Two principals with the role, through the admin API.
    let (alice, bob) = (SigningKey::from_bytes(&[11; 32]), SigningKey::from_bytes(&[12; 32]));
    for (id, key) in [("alice", &alice), ("bob", &bob)] {
        let body = json!({ "id": id, "keys": [hex::encode(key.verifying_key().as_bytes())], "roles": ["secret-writer"] });
        let url = format!("{}/v1/principals", aq.admin);
        let token = aq.token.clone();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(true).build().into();
            agent.post(&url).header("authorization", &format!("Bearer {token}")).header("content-type", "application/json").send(body.to_string())
        })
        .await
        .map_err(|e| CliError::Input(e.to_string()))?
        .map_err(|e| CliError::Input(format!("cannot add principal {id}: {e}")))?;
    }

    let value = Arc::new(vec![b's'; 256]);
    let mut runs = Vec::new();
    // On a terminal, a bar of the configurations measured.
    let bar = super::progress_bar(2, "[{bar:30}] {pos}/{len} configurations, {elapsed}: {msg}");
    for target in ["direct etcd", "aq critical"] {
        if let Some(bar) = &bar {
            bar.set_message(target);
        }
        // A short warm-up on the same keys, then the measured run.
        for (length, keep) in [(Duration::from_millis(500), false), (duration, true)] {
            let aq_pid = (target == "aq critical").then(|| aq.process.0.id());
            let cpu_before = (aq_pid.map(cpu_seconds), cpu_seconds(etcd_pid), cpu_seconds(std::process::id()));
            let started = Instant::now();
            let deadline = started + length;
            let mut tasks = Vec::new();
            for i in 0..clients {
                let value = value.clone();
                let direct = direct.clone();
                let signer = match target {
                    "aq critical" => Some(
                        SignedClient::connect(&aq_url, vec![alice.clone(), bob.clone()]).await.map_err(CliError::Input)?,
                    ),
                    _ => None,
                };
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let key = format!("/registry/secrets/bench/{i:03}-{:04}", n % 1000).into_bytes();
                        let t = Instant::now();
                        match &signer {
                            Some(client) => client.put("secrets", &key, &value).await.map(drop),
                            None => direct.put(pb::PbPutRequest { key, value: value.to_vec(), ..Default::default() }).await.map(drop),
                        }
                        .map_err(|s| s.message().to_string())?;
                        latencies.push(t.elapsed());
                        n += 1;
                    }
                    Ok::<_, String>(latencies)
                }));
            }
            let mut latencies = Vec::new();
            for task in tasks {
                latencies.extend(task.await.map_err(|e| CliError::Input(e.to_string()))?.map_err(CliError::Input)?);
            }
            let elapsed = started.elapsed();
            let cpu = (
                aq_pid.map(cpu_seconds).zip(cpu_before.0).map(|(after, before)| after - before),
                cpu_seconds(etcd_pid) - cpu_before.1,
                cpu_seconds(std::process::id()) - cpu_before.2,
            );
            latencies.sort();
            if keep {
                runs.push(Run { target, puts: latencies.len(), elapsed, latencies, cpu });
            }
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let lineage = crate::lineage::store::records(&direct, "secrets").await.map_err(CliError::Input)?.len();
    drop(aq);
    println!(
        "{:<12} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>12} {:>14} {:>16}",
        "target", "clients", "puts/s", "× direct", "p50 µs", "p99 µs", "puts", "aq CPU µs/put", "etcd CPU µs/put", "client CPU µs/put"
    );
    let base = runs[0].puts as f64 / runs[0].elapsed.as_secs_f64();
    for run in &runs {
        let rate = run.puts as f64 / run.elapsed.as_secs_f64();
        let per_put = |cpu: f64| format!("{:.0}", cpu / run.puts as f64 * 1e6);
        println!(
            "{:<12} {:>7} {:>9.0} {:>9.2} {:>9.0} {:>9.0} {:>8} {:>13} {:>15} {:>17}",
            run.target,
            clients,
            rate,
            rate / base,
            super::bench::percentile(&run.latencies, 0.5).as_secs_f64() * 1e6,
            super::bench::percentile(&run.latencies, 0.99).as_secs_f64() * 1e6,
            run.puts,
            run.cpu.0.map(per_put).unwrap_or_else(|| "-".into()),
            per_put(run.cpu.1),
            per_put(run.cpu.2),
        );
    }
    println!("lineage records written for secrets: {lineage} (each aq put signed by alice and bob, full lineage)");
    drop(etcd);
    Ok(())
}
