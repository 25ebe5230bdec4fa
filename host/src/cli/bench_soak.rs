//! `aq bench soak`: `aq serve` with its managed etcd groups under mixed Kubernetes-shaped load
//! for minutes, with one managed etcd killed now and then (aq starts it again). Every interval
//! it prints throughput, p99, errors, and aq's resident memory and open file descriptors; at
//! the end it fails (exit 1) when memory or descriptors kept growing instead of levelling off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::proto as pb;

use super::CliError;
use super::bench_put::{Guard, ready, spawn_serve};
use crate::backend::Group;

/// What one interval counted.
#[derive(Default)]
struct Window {
    latencies: Vec<Duration>,
    errors: u64,
}

/// One printed sample.
struct Sample {
    at: Duration,
    ops_per_s: f64,
    p99: Duration,
    errors: u64,
    rss_kib: u64,
    fds: usize,
}

/// aq's resident memory (KiB) and open descriptors, from /proc.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, fds)
}

/// Whether `values` (one per sample) level off: the last is not well above the highest of the
/// middle third. `slack` absorbs a step that is not growth (a cache filling once).
fn levels_off(values: &[u64], slack: u64) -> bool {
    if values.len() < 3 {
        return true;
    }
    let third = values.len() / 3;
    let middle = values[third..values.len() - third].iter().copied().max().unwrap_or(0);
    let last = *values.last().unwrap();
    last <= middle + middle / 4 + slack
}

pub(super) fn soak(minutes: f64, clients: usize, fault_every: u64, members: usize, etcd_binary: &str) -> Result<(), CliError> {
    if !minutes.is_finite() || minutes <= 0.0 || clients == 0 {
        return Err(CliError::Input("--minutes must be above 0 and --clients at least 1".into()));
    }
    if !crate::config::MEMBER_COUNTS.contains(&members) {
        return Err(CliError::Input(format!("--members {members}: give 1, 3 or 5")));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let fault_every = Duration::from_secs(fault_every.max(1));
    runtime.block_on(run(Duration::from_secs_f64(minutes * 60.0), clients, fault_every, members, etcd_binary))
}

/// The pid file of the etcd process that is member `index` of managed group `group` under
/// aq's data dir `data`, in a group of `members`.
fn member_pid_file(data: &std::path::Path, group: &str, members: usize, index: usize) -> std::path::PathBuf {
    let dir = data.join("etcd").join(group);
    let dir = if members == 1 { dir } else { crate::backend::managed::member_dir(&dir, index) };
    dir.join("etcd.pid")
}

async fn run(duration: Duration, clients: usize, fault_every: Duration, members: usize, etcd_binary: &str) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("aq-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = super::bench_put::RemoveOnDrop(dir.clone());
    let layout = dir.join("layout.toml");
    let groups = ["name = \"main\"", "name = \"events\""];
    let shaped = groups.iter().fold(crate::config::DEFAULT_LAYOUT.to_string(), |layout, group| {
        if members == 1 { layout } else { layout.replacen(group, &format!("{group}\nmembers = {members}"), 1) }
    });
    std::fs::write(&layout, shaped)?;
    let extra = [std::ffi::OsString::from(format!("--etcd={etcd_binary}"))];
    let (aq, port, _, data): (Guard, u16, u16, _) = spawn_serve(&dir, "aq", &layout, &extra)?;
    let url = format!("http://127.0.0.1:{port}");
    ready("aq", &url).await?;
    let pid = aq.0.id();

    let window = Arc::new(Mutex::new(Window::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let group = ready(&format!("client-{i}"), &url).await?;
        let (window, stop) = (window.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { client(i, group, window, stop).await }));
    }
    // Watchers of the pods and events, read and dropped, as kube-apiserver's watch cache keeps.
    let watched = Arc::new(AtomicU64::new(0));
    for prefix in ["/registry/pods/", "/registry/events/"] {
        let group = ready("watcher", &url).await?;
        let (watched, stop) = (watched.clone(), stop.clone());
        tasks.push(tokio::spawn(async move { watch(group, prefix, watched, stop).await }));
    }

    let interval = (duration / 20).clamp(Duration::from_secs(5), Duration::from_secs(60));
    let what = if members == 1 { "a managed etcd".to_string() } else { format!("one member of a managed {members}-member group") };
    println!(
        "aq bench soak: {} s, {clients} clients and 2 watchers on the default layout, {what} killed every {} s",
        duration.as_secs(),
        fault_every.as_secs()
    );
    println!("{:>7} {:>9} {:>9} {:>7} {:>9} {:>5} {:>8}", "time s", "ops/s", "p99 ms", "errors", "rss MiB", "fds", "faults");
    let started = Instant::now();
    let mut samples = Vec::new();
    let (mut next_fault, mut faults, mut victim) = (started + fault_every, 0u64, 0usize);
    let mut last = Instant::now();
    while started.elapsed() < duration {
        let wake = (last + interval).min(next_fault).min(started + duration);
        tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
        if Instant::now() >= next_fault && started.elapsed() < duration {
            // One managed group's etcd (or one member of it), in turn: killed, and started
            // again by aq.
            let group = ["events", "main"][victim % 2];
            let pid_file = member_pid_file(&data, group, members, (victim / 2) % members);
            victim += 1;
            if let Some(etcd) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on the etcd aq started for `group`, named by its pid file.
                unsafe { libc::kill(etcd, libc::SIGKILL) };
                faults += 1;
            }
            next_fault += fault_every;
        }
        if last.elapsed() >= interval || started.elapsed() >= duration {
            let taken = std::mem::take(&mut *window.lock().expect("soak window"));
            let elapsed = last.elapsed();
            last = Instant::now();
            let mut latencies = taken.latencies;
            latencies.sort();
            let p99 = if latencies.is_empty() { Duration::ZERO } else { super::bench::percentile(&latencies, 0.99) };
            let (rss_kib, fds) = footprint(pid);
            let sample = Sample {
                at: started.elapsed(),
                ops_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
                p99,
                errors: taken.errors,
                rss_kib,
                fds,
            };
            println!(
                "{:>7.0} {:>9.0} {:>9.2} {:>7} {:>9.1} {:>5} {:>8}",
                sample.at.as_secs_f64(),
                sample.ops_per_s,
                sample.p99.as_secs_f64() * 1000.0,
                sample.errors,
                sample.rss_kib as f64 / 1024.0,
                sample.fds,
                faults
            );
            samples.push(sample);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    drop(aq);

    let rss: Vec<u64> = samples.iter().map(|s| s.rss_kib).collect();
    let fds: Vec<u64> = samples.iter().map(|s| s.fds as u64).collect();
    let total: f64 = samples.iter().map(|s| s.ops_per_s).sum::<f64>() / samples.len().max(1) as f64;
    let worst = samples.iter().map(|s| s.p99).max().unwrap_or_default();
    println!(
        "mean {total:.0} ops/s, worst interval p99 {:.2} ms, {} errors (around the {faults} faults), {} watch events",
        worst.as_secs_f64() * 1000.0,
        samples.iter().map(|s| s.errors).sum::<u64>(),
        watched.load(Ordering::Relaxed)
    );
    let memory_ok = levels_off(&rss, 16 * 1024);
    let fds_ok = levels_off(&fds, 32);
    let (first, peak) = (rss.first().copied().unwrap_or(0), rss.iter().copied().max().unwrap_or(0));
    if memory_ok && fds_ok {
        println!(
            "ok: aq's memory levelled off ({:.1} MiB at the first sample, {:.1} at most) and so did its descriptors ({} at most)",
            first as f64 / 1024.0,
            peak as f64 / 1024.0,
            fds.iter().max().unwrap_or(&0)
        );
        Ok(())
    } else {
        println!(
            "FAILED: aq's {} kept growing to the end ({:?} KiB of memory, {:?} descriptors by sample)",
            if memory_ok { "descriptors" } else { "memory" },
            rss,
            fds
        );
        Err(CliError::Check)
    }
}

/// One client: kube-shaped writes (create and update Txns), reads, lists and deletes, each
/// timed; an error is counted and the client goes on.
async fn client(i: usize, group: Group, window: Arc<Mutex<Window>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut known = vec![0i64; 500];
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let slot = n % 500;
        let pod = format!("/registry/pods/soak/c{i}-{slot:03}").into_bytes();
        let event = format!("/registry/events/soak/c{i}-{:03}", n % 200).into_bytes();
        let t = Instant::now();
        let outcome = match n % 10 {
            0..=3 => match group.txn(super::bench_put::kube_txn(pod, vec![b'p'; 256], known[slot])).await {
                Ok(answer) => {
                    known[slot] = if answer.succeeded { answer.header.map(|h| h.revision).unwrap_or(0) } else { 0 };
                    Ok(())
                }
                Err(e) => Err(e),
            },
            4 | 5 => group.put(pb::PbPutRequest { key: event, value: vec![b'e'; 128], ..Default::default() }).await.map(drop),
            6 | 7 => group.range(pb::PbRangeRequest { key: pod, ..Default::default() }).await.map(drop),
            8 => {
                let prefix = format!("/registry/pods/soak/c{i}-").into_bytes();
                let mut end = prefix.clone();
                *end.last_mut().unwrap() += 1;
                group.range(pb::PbRangeRequest { key: prefix, range_end: end, limit: 50, ..Default::default() }).await.map(drop)
            }
            _ => group.delete_range(pb::PbDeleteRequest { key: event, ..Default::default() }).await.map(drop),
        };
        let elapsed = t.elapsed();
        {
            let mut window = window.lock().expect("soak window");
            match outcome {
                Ok(()) => window.latencies.push(elapsed),
                Err(_) => window.errors += 1,
            }
        }
        if n % 10 == 9 {
            tokio::task::yield_now().await;
        }
        n += 1;
    }
}

/// A watcher of `prefix` that opens its watch again whenever it ends.
async fn watch(group: Group, prefix: &'static str, seen: Arc<AtomicU64>, stop: Arc<std::sync::atomic::AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let create = crate::backend::watch_request(pb::PbWatchRequestUnion::CreateRequest, |c| {
            c.key = prefix.as_bytes().to_vec();
            c.range_end = end;
        });
        let (requests, receiver) = tokio::sync::mpsc::channel(1);
        let _ = requests.send(create).await;
        let Ok(mut answers) = group.watch(tokio_stream::wrappers::ReceiverStream::new(receiver)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let answer = tokio::select! {
                a = answers.message() => a,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stop.load(Ordering::Relaxed) { return } else { continue }
                }
            };
            match answer {
                Ok(Some(response)) if !response.canceled => {
                    seen.fetch_add(response.events.len() as u64, Ordering::Relaxed);
                }
                _ => break,
            }
        }
        drop(requests);
    }
}

#[cfg(test)]
mod tests {
    use super::levels_off;

    #[test]
    fn growth_that_levels_off_passes_and_growth_to_the_end_fails() {
        assert!(levels_off(&[100, 140, 150, 150, 152, 151], 0));
        assert!(levels_off(&[100, 200, 300, 300, 300, 300, 310, 305, 300], 0));
        assert!(!levels_off(&[100, 200, 300, 400, 500, 600, 700, 800, 900], 0));
        assert!(levels_off(&[100, 200, 300, 400, 500, 600, 700, 800, 900], 1000), "within the slack");
    }
}
