//! `aq bench swap`: how long a policy swap made through one aq replica's admin API takes to be
//! enforced by a second replica on the same meta group, while clients write through both.
//! The reference is etcd itself: how long a put takes to reach a watcher of the same etcd,
//! which is the path a swap travels between replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::proto as pb;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use super::CliError;
use super::bench_put::{RemoveOnDrop, layout, ready, serve_process};
use crate::backend::managed::EtcdProcess;
use crate::backend::{Group, watch_request};

fn http(method: &str, url: &str, token: &str, body: Option<Value>) -> Result<Value, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(body.map(|b| b.to_string()).unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let mut response = agent.run(request).map_err(|e| e.to_string())?;
    let status = response.status();
    let text = response.body_mut().read_to_string().map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{method} {url}: HTTP {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// Writers that put until stopped; counts puts and failures.
fn writers(group: Group, clients: usize, stop: Arc<AtomicBool>, puts: Arc<AtomicU64>, failures: Arc<AtomicU64>) {
    for i in 0..clients {
        let (group, stop, puts, failures) = (group.clone(), stop.clone(), puts.clone(), failures.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/registry/configmaps/swap/{}-{i:02}-{:04}", group.name(), n % 1000).into_bytes();
                match group.put(pb::PbPutRequest { key, value: vec![b'v'; 256], ..Default::default() }).await {
                    Ok(_) => puts.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        tracing::warn!("put failed during a swap: {}", status.message());
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
                n += 1;
            }
        });
    }
}

/// How long puts to etcd take to reach a watcher on the same etcd.
async fn etcd_watch_delays(etcd: &Group, rounds: usize) -> Result<Vec<Duration>, CliError> {
    let (requests, rx) = tokio::sync::mpsc::channel(1);
    let key = b"/bench/swap/watch".to_vec();
    let watched = key.clone();
    requests
        .send(watch_request(pb::PbWatchRequestUnion::CreateRequest, |c| c.key = watched))
        .await
        .expect("open channel");
    let mut stream = etcd.watch(ReceiverStream::new(rx)).await.map_err(|s| CliError::Input(s.message().to_string()))?;
    let _created = stream.message().await.map_err(|s| CliError::Input(s.message().to_string()))?;
    let mut delays = Vec::with_capacity(rounds);
    for n in 0..rounds {
        let started = Instant::now();
        etcd.put(pb::PbPutRequest { key: key.clone(), value: n.to_string().into_bytes(), ..Default::default() })
            .await
            .map_err(|s| CliError::Input(s.message().to_string()))?;
        loop {
            let response = stream.message().await.map_err(|s| CliError::Input(s.message().to_string()))?;
            if response.is_some_and(|r| !r.events.is_empty()) {
                break;
            }
        }
        delays.push(started.elapsed());
    }
    drop(requests);
    Ok(delays)
}

pub(super) fn swap(swaps: usize, clients: usize, etcd_binary: &str) -> Result<(), CliError> {
    if swaps < 2 {
        return Err(CliError::Input("--swaps must be at least 2".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::Input(e.to_string()))?;
    runtime.block_on(run(swaps, clients, etcd_binary))
}

async fn run(swaps: usize, clients: usize, etcd_binary: &str) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("aq-bench-swap-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let etcd = EtcdProcess::spawn(etcd_binary, "bench", &dir.join("etcd")).map_err(|e| CliError::Input(e.to_string()))?;
    let direct = ready("etcd", etcd.client_url()).await?;
    let layout_path = dir.join("layout.toml");
    std::fs::write(&layout_path, layout(etcd.client_url()))?;
    let a = serve_process(&dir, "replica-a", &layout_path).await?;
    let b = serve_process(&dir, "replica-b", &layout_path).await?;
    let (a_url, b_url) = (a.url.clone(), b.url.clone());

    let digest_of = |name: &str| blake3::hash(crate::builtin::find(name).expect("built-in").component).to_hex().to_string();
    let (open, quota) = (digest_of("open"), digest_of("quota"));
    let quota_config = json!({ "tenant_segment": 2, "default": { "max_value_bytes": 1_572_864 } });

    let stop = Arc::new(AtomicBool::new(false));
    let (puts, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    for (name, url) in [("via-a", &a_url), ("via-b", &b_url)] {
        writers(ready(name, url).await?, clients, stop.clone(), puts.clone(), failures.clone());
    }

    let mut acked = Vec::with_capacity(swaps);
    let mut seen = Vec::with_capacity(swaps);
    let bind_url = format!("{}/v1/scopes/registry/policy", a.admin);
    let scope_url = format!("{}/v1/scopes/registry", b.admin);
    let started = Instant::now();
    // On a terminal, a bar of the swaps made.
    let bar = super::progress_bar(swaps as u64, "swaps [{bar:30}] {pos}/{len}, {per_sec}, {elapsed}");
    for n in 0..swaps {
        let (digest, body) = if n % 2 == 0 {
            (&open, json!({ "digest": open }))
        } else {
            (&quota, json!({ "digest": quota, "config": quota_config }))
        };
        let (token_a, token_b, bind_url, scope_url, digest) =
            (a.token.clone(), b.token.clone(), bind_url.clone(), scope_url.clone(), digest.clone());
        let (ack, visible) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            http("PUT", &bind_url, &token_a, Some(body))?;
            let ack = t.elapsed();
            let deadline = t + Duration::from_secs(10);
            loop {
                let scope = http("GET", &scope_url, &token_b, None)?;
                if scope["binding"]["digest"] == json!(digest) {
                    return Ok::<_, String>((ack, t.elapsed()));
                }
                if Instant::now() > deadline {
                    return Err(format!("replica b did not enforce swap {n} within 10 s"));
                }
            }
        })
        .await
        .map_err(|e| CliError::Input(e.to_string()))?
        .map_err(CliError::Input)?;
        acked.push(ack);
        seen.push(visible);
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let watch = etcd_watch_delays(&direct, swaps).await?;

    acked.sort();
    seen.sort();
    let mut watch = watch;
    watch.sort();
    let p = |v: &[Duration], q: f64| super::bench::percentile(v, q).as_secs_f64() * 1e3;
    println!(
        "{swaps} swaps in {:.1} s between open and quota on scope registry, {clients} writers on each of 2 replicas: \
         {} puts, {} failed",
        elapsed.as_secs_f64(),
        puts.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    println!("{:<44} {:>8} {:>8} {:>8} {:>8} {:>10}", "measure", "p50 ms", "p90 ms", "p99 ms", "max ms", "× etcd p50");
    let base = p(&watch, 0.5);
    for (name, v) in [
        ("swap acknowledged by replica a", &acked),
        ("swap enforced by replica b (from request)", &seen),
        ("etcd: put seen by a watcher (reference)", &watch),
    ] {
        println!(
            "{name:<44} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10.1}",
            p(v, 0.5),
            p(v, 0.9),
            p(v, 0.99),
            p(v, 1.0),
            p(v, 0.5) / base
        );
    }
    // The replicas stop before the etcd they follow.
    drop((a, b));
    drop(etcd);
    if failures.load(Ordering::Relaxed) > 0 {
        return Err(CliError::Refused("some puts failed during the swaps; see the warnings above".into()));
    }
    Ok(())
}
