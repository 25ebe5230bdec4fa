//! `aq bench split`: a live split of a loaded scope onto another etcd group with writers
//! running through it. Reports the migration's phases, keys copied per second, the longest any
//! write waited, lost writes, and write throughput before and after against direct etcd.
//!
//! Two etcds with auth on, as aq runs its groups: `main` holds the scope, `spare` receives its
//! upper half. Each writer owns every `writers`-th key and overwrites its keys in turn with
//! values it numbers, so the last value it was acknowledged for each key is what the key must
//! hold at the end: any other value is a lost write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::CliError;
use super::bench_put::{RemoveOnDrop, serve_process};
use crate::backend::managed::EtcdProcess;
use crate::backend::ownership::{ManagedSecrets, secure};

/// The keys' prefix; key `i` is `<PREFIX><i:07>`.
const PREFIX: &str = "/registry/pods/bench/p";

/// Keys loaded at once.
const LOADERS: usize = 64;

/// One writer's answer: per key it owns, the last value acknowledged; each write's start
/// (since the benchmark's epoch) and latency; and the errors it met.
struct Written {
    last: Vec<(usize, u64)>,
    writes: Vec<(Duration, Duration)>,
    errors: Vec<String>,
}

pub(super) fn split(keys: usize, writers: usize, seconds: u64, etcd_binary: &str) -> Result<(), CliError> {
    if keys < 2 || writers == 0 || writers > keys {
        return Err(CliError::Input("--keys must be at least 2 and --writers between 1 and --keys".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::Input(e.to_string()))?;
    runtime.block_on(run(keys, writers, Duration::from_secs(seconds.max(1)), etcd_binary))
}

fn key(i: usize) -> String {
    format!("{PREFIX}{i:07}")
}

async fn run(keys: usize, writers: usize, duration: Duration, etcd_binary: &str) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("aq-bench-split-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let input = |e: String| CliError::Input(e);
    let mut groups = String::new();
    let mut etcds = Vec::new();
    for name in ["main", "spare"] {
        let data = dir.join(format!("etcd-{name}"));
        let (etcd, _) = EtcdProcess::start(etcd_binary, name, &data, Duration::from_secs(20)).await.map_err(input)?;
        let secrets = ManagedSecrets::load_or_create(&data).map_err(input)?;
        secure(name, etcd.client_url(), &secrets).await.map_err(input)?;
        let (user, admin) = (secrets.data(), secrets.admin());
        groups.push_str(&format!(
            "[[groups]]\nname = \"{name}\"\nendpoints = [\"{}\"]\nuser = {:?}\npassword = {:?}\nadmin_user = {:?}\nadmin_password = {:?}\n\n",
            etcd.client_url(),
            user.user,
            user.password,
            admin.user,
            admin.password
        ));
        etcds.push((etcd, user));
    }
    let layout = format!(
        "{groups}[[scopes]]\nid = \"catch-all\"\nprefix = \"\"\ngroup = \"main\"\npolicy = \"builtin:open\"\n\n\
         [[scopes]]\nid = \"registry\"\nprefix = \"/registry/\"\ngroup = \"main\"\npolicy = \"builtin:open\"\n"
    );
    let layout_path = dir.join("layout.toml");
    std::fs::write(&layout_path, &layout)?;
    let aq = serve_process(&dir, "aq", &layout_path).await?;

    let started = Instant::now();
    load(&aq.url, keys).await?;
    let loaded = started.elapsed();
    println!("loaded {keys} keys through aq in {:.1} s", loaded.as_secs_f64());

    // Throughput straight to main's etcd as aq's own etcd user, then through aq.
    let (main_etcd, main_user) = &etcds[0];
    let direct = throughput(main_etcd.client_url(), Some(main_user), keys, writers, duration).await?;
    let before = throughput(&aq.url, None, keys, writers, duration).await?;

    // The split, with the writers on.
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..writers).map(|w| tokio::spawn(write(aq.url.clone(), None, w, writers, keys, epoch, stop.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = key(keys / 2);
    let split_at = epoch.elapsed();
    let answer = admin(&aq, "POST", "/v1/scopes/registry/split", Some(json!({ "at": at, "group": "spare" }))).await?;
    let id = answer["migration"]["id"].as_str().ok_or_else(|| CliError::Input(format!("the split started no move: {answer}")))?.to_string();
    let mut phases: Vec<(String, Duration)> = Vec::new();
    let migration = loop {
        let migration = admin(&aq, "GET", &format!("/v1/migrations/{id}"), None).await?;
        let phase = migration["phase"].as_str().unwrap_or_default().to_string();
        if phases.last().is_none_or(|(last, _)| *last != phase) {
            phases.push((phase.clone(), epoch.elapsed()));
        }
        if phase == "done" || phase == "rolled-back" {
            break migration;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let split_end = epoch.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for task in tasks {
        written.push(task.await.map_err(|e| CliError::Input(e.to_string()))??);
    }
    if migration["phase"] != "done" || !migration["error"].is_null() {
        return Err(CliError::Input(format!("the split's move did not finish cleanly: {migration}")));
    }
    // Every key holds the last value its writer was acknowledged for.
    let lost = lost_writes(&aq.url, &written).await?;
    let after = throughput(&aq.url, None, keys, writers, duration).await?;
    let errors: Vec<&String> = written.iter().flat_map(|w| &w.errors).collect();
    let during: Vec<Duration> = written
        .iter()
        .flat_map(|w| &w.writes)
        .filter(|(start, latency)| *start + *latency >= split_at && *start <= split_end)
        .map(|(_, latency)| *latency)
        .collect();
    let stall = during.iter().max().copied().unwrap_or_default();
    let at_phase = |name: &str| phases.iter().find(|(p, _)| p == name).map(|(_, t)| *t);
    let span = |from: &str, to: &str| match (at_phase(from), at_phase(to)) {
        (Some(a), Some(b)) => format!("{:.0} ms", (b - a).as_secs_f64() * 1e3),
        _ => "-".into(),
    };
    let copied = migration["keys_copied"].as_u64().unwrap_or_default();
    let copy_time = match (at_phase("copy"), at_phase("catch-up")) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::ZERO,
    };

    println!();
    println!("{:<22} {:>9} {:>9} {:>9}", "writes", "writes/s", "× direct", "p99 ms");
    for (name, run) in [("direct etcd (main)", &direct), ("aq before the split", &before), ("aq after the split", &after)] {
        println!("{:<22} {:>9.0} {:>9.2} {:>9.2}", name, run.0, run.0 / direct.0, run.1.as_secs_f64() * 1e3);
    }
    println!();
    println!("split of {keys} keys at {at:?} onto spare, {writers} writers running:");
    println!("  total (request to done)   {:.0} ms", (split_end - split_at).as_secs_f64() * 1e3);
    println!("  copy                      {:.0} ms, {copied} keys copied, {:.0} keys/s", copy_time.as_secs_f64() * 1e3, copied as f64 / copy_time.as_secs_f64().max(1e-9));
    println!("  catch-up                  {}", span("catch-up", "hand-off"));
    println!("  hand-off to cut-over      {} ms (as polled: {})", migration["handoff_ms"], span("hand-off", "clean-up"));
    println!("  clean-up                  {}", span("clean-up", "done"));
    println!("  longest write             {:.1} ms (of {} writes during the split)", stall.as_secs_f64() * 1e3, during.len());
    println!("  write errors              {}", errors.len());
    println!("  lost writes               {lost}");
    for error in errors.iter().take(5) {
        println!("    {error}");
    }
    if lost > 0 || !errors.is_empty() {
        return Err(CliError::Input(format!("{lost} writes lost and {} failed during the split", errors.len())));
    }
    Ok(())
}

/// Puts `keys` keys through `url`, many at a time.
async fn load(url: &str, keys: usize) -> Result<(), CliError> {
    let mut tasks = tokio::task::JoinSet::new();
    for loader in 0..LOADERS {
        let url = url.to_string();
        tasks.spawn(async move {
            let mut client = etcd_client::Client::connect([url], None).await?;
            for i in (loader..keys).step_by(LOADERS) {
                client.put(key(i), vec![b'v'; 64], None).await?;
            }
            Ok::<_, etcd_client::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| CliError::Input(e.to_string()))?.map_err(|e| CliError::Input(format!("cannot load the keys: {e}")))?;
    }
    Ok(())
}

/// Writes per second and their p99 over `duration`, `writers` at once.
async fn throughput(
    url: &str,
    login: Option<&crate::backend::Credentials>,
    keys: usize,
    writers: usize,
    duration: Duration,
) -> Result<(f64, Duration), CliError> {
    let (epoch, stop) = (Instant::now(), Arc::new(AtomicBool::new(false)));
    let tasks: Vec<_> =
        (0..writers).map(|w| tokio::spawn(write(url.to_string(), login.cloned(), w, writers, keys, epoch, stop.clone()))).collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        let written = task.await.map_err(|e| CliError::Input(e.to_string()))??;
        if let Some(error) = written.errors.first() {
            return Err(CliError::Input(format!("a write to {url} failed: {error}")));
        }
        latencies.extend(written.writes.into_iter().map(|(_, latency)| latency));
    }
    let elapsed = epoch.elapsed();
    latencies.sort();
    Ok((latencies.len() as f64 / elapsed.as_secs_f64(), super::bench::percentile(&latencies, 0.99)))
}

/// Writer `w` of `writers`: overwrites its keys in turn until `stop`.
async fn write(
    url: String,
    login: Option<crate::backend::Credentials>,
    w: usize,
    writers: usize,
    keys: usize,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Result<Written, CliError> {
    let options = login.map(|l| etcd_client::ConnectOptions::new().with_user(l.user, l.password));
    let mut client = etcd_client::Client::connect([url.as_str()], options)
        .await
        .map_err(|e| CliError::Input(format!("cannot connect to {url}: {e}")))?;
    let mine: Vec<usize> = (w..keys).step_by(writers).collect();
    let mut acked: Vec<u64> = vec![0; mine.len()];
    let (mut writes, mut errors) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let slot = (n as usize) % mine.len();
        n += 1;
        let start = epoch.elapsed();
        match client.put(key(mine[slot]), format!("w{w}-{n}"), None).await {
            Ok(_) => {
                writes.push((start, epoch.elapsed() - start));
                acked[slot] = n;
            }
            Err(e) => errors.push(format!("{}: {e}", key(mine[slot]))),
        }
    }
    let last = mine.iter().zip(&acked).filter(|(_, n)| **n > 0).map(|(k, n)| (*k, *n)).collect();
    Ok(Written { last, writes, errors })
}

/// Keys whose value is not the last one their writer was acknowledged for, read in pages.
async fn lost_writes(url: &str, written: &[Written]) -> Result<usize, CliError> {
    let mut client = etcd_client::Client::connect([url], None).await.map_err(|e| CliError::Input(e.to_string()))?;
    let mut held = std::collections::HashMap::new();
    let mut from = PREFIX.as_bytes().to_vec();
    let range_end = {
        let mut end = PREFIX.as_bytes().to_vec();
        *end.last_mut().expect("a prefix") += 1;
        end
    };
    loop {
        let options = etcd_client::GetOptions::new().with_range(range_end.clone()).with_limit(5000);
        let page = client.get(from.clone(), Some(options)).await.map_err(|e| CliError::Input(format!("cannot read the keys: {e}")))?;
        for kv in page.kvs() {
            held.insert(kv.key().to_vec(), kv.value().to_vec());
        }
        match page.kvs().last() {
            Some(last) if page.more() => from = [last.key(), &[0]].concat(),
            _ => break,
        }
    }
    let mut lost = 0;
    for (w, written) in written.iter().enumerate() {
        for (k, n) in &written.last {
            if held.get(key(*k).as_bytes()).map(Vec::as_slice) != Some(format!("w{w}-{n}").as_bytes()) {
                lost += 1;
            }
        }
    }
    Ok(lost)
}

/// One admin API call as aq's administrator.
async fn admin(aq: &super::bench_put::AqProcess, method: &'static str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
    let (url, token) = (format!("{}{path}", aq.admin), aq.token.clone());
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let auth = format!("Bearer {token}");
        let answer = match (method, body) {
            ("POST", body) => agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .send(body.unwrap_or(Value::Null).to_string()),
            _ => agent.get(&url).header("authorization", &auth).call(),
        };
        let mut answer = answer.map_err(|e| CliError::Input(format!("{method} {url}: {e}")))?;
        let status = answer.status();
        let text = answer.body_mut().read_to_string().map_err(|e| CliError::Input(e.to_string()))?;
        if !status.is_success() {
            return Err(CliError::Input(format!("{method} {url}: HTTP {status}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| CliError::Input(format!("{method} {url} answered no JSON: {e}")))
    })
    .await
    .map_err(|e| CliError::Input(e.to_string()))?
}
