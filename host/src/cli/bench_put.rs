//! `aq bench put`: put throughput and latency through aq, directly to etcd, and through etcd's
//! own grpc-proxy, in one run, with the ratio of each to direct.
//!
//! Two etcds: a plain one (direct puts, the fence-guarded Txn of an ownership check by compare,
//! grpc-proxy) and one with etcd auth on as aq runs its groups (direct puts as aq's user, whose
//! role holds the layout's ranges, and as root, which etcd does not check against ranges; and
//! aq itself). aq runs as a separate `aq serve` process, with the `quota` policy evaluated on
//! every put, so its CPU time can be read from /proc like etcd's.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::proto as pb;

use super::CliError;
use crate::backend::managed::{EtcdProcess, free_port};
use crate::backend::ownership::{ManagedSecrets, Owners, secure};
use crate::backend::{Credentials, Group};

/// One measured configuration.
struct Run {
    target: &'static str,
    clients: usize,
    puts: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    aq_cpu: Option<f64>,
    etcd_cpu: f64,
}

impl Run {
    fn throughput(&self) -> f64 {
        self.puts as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        super::bench::percentile(&self.latencies, p)
    }
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// A child process killed on drop.
pub(super) struct Guard(pub(super) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An `aq serve` process started by a benchmark, stopped on drop.
pub(super) struct AqProcess {
    pub(super) process: Guard,
    /// Its etcd API, `http://127.0.0.1:<port>`.
    pub(super) url: String,
    /// Its admin API.
    pub(super) admin: String,
    /// The admin token it generated.
    pub(super) token: String,
}

/// Starts `aq serve` (this binary) with `layout_path`, its data in `dir/name`, on free ports,
/// without a decision log, and waits until its etcd API answers.
pub(super) async fn serve_process(dir: &std::path::Path, name: &str, layout_path: &std::path::Path) -> Result<AqProcess, CliError> {
    let (process, port, admin_port, data) = spawn_serve(dir, name, layout_path, &[])?;
    let url = format!("http://127.0.0.1:{port}");
    ready(name, &url).await?;
    let token = admin_token(name, &data)?;
    Ok(AqProcess { process, url, admin: format!("http://127.0.0.1:{admin_port}"), token })
}

/// Spawns `aq serve` (this binary) with `layout_path` and `extra` arguments, its data in
/// `dir/name`, on free ports, without a decision log; answers the process, its etcd API and
/// admin ports and its data directory.
pub(super) fn spawn_serve(
    dir: &std::path::Path,
    name: &str,
    layout_path: &std::path::Path,
    extra: &[std::ffi::OsString],
) -> Result<(Guard, u16, u16, PathBuf), CliError> {
    let (port, admin_port) = (free_port()?, free_port()?);
    let data = dir.join(name);
    let process = Guard(
        Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(layout_path)
            .arg("--data-dir")
            .arg(&data)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--admin-listen=127.0.0.1:{admin_port}"))
            .arg("--decision-log=off")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    Ok((process, port, admin_port, data))
}

/// The admin token `aq serve` generated under `data`.
pub(super) fn admin_token(name: &str, data: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(crate::serve::admin_token_path(data))
        .map(|token| token.trim().to_string())
        .map_err(|e| CliError::Input(format!("{name} wrote no admin token: {e}")))
}

pub(super) async fn ready(name: &str, url: &str) -> Result<Group, CliError> {
    ready_as(name, url, None).await
}

/// A connection to `url`, logged in as `login` when given, once it answers.
async fn ready_as(name: &str, url: &str, login: Option<&Credentials>) -> Result<Group, CliError> {
    let mut group = Group::connect_lazy(name, &[url.to_string()]).map_err(|e| CliError::Input(e.to_string()))?;
    if let Some(login) = login {
        group = group.with_login(login.clone());
    }
    group.wait_ready(Duration::from_secs(20)).await.map_err(|e| CliError::Input(e.to_string()))?;
    Ok(group)
}

/// What each benchmark request is.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// A plain put.
    Put,
    /// The put inside a Txn guarded by `version(fence key) == 0`, sent directly to etcd: what
    /// an ownership check by compare on every write costs etcd.
    FencedTxn,
    /// kube-apiserver's writes: create (compare create_revision 0), then updates (compare
    /// mod_revision with the revision last written), each reading the key when its compare
    /// fails.
    Kube,
}

/// kube-apiserver's Txn for `key`: create it when `known` is 0 (`create_revision == 0`),
/// otherwise update it if it is still at `known` (`mod_revision == known`); read it otherwise.
pub(super) fn kube_txn(key: Vec<u8>, value: Vec<u8>, known: i64) -> pb::PbTxnRequest {
    use crate::backend::compare::{RESULT_EQUAL, TARGET_CREATE, TARGET_MOD};
    let (target, union) = if known == 0 {
        (TARGET_CREATE, pb::PbTargetUnion::CreateRevision(0))
    } else {
        (TARGET_MOD, pb::PbTargetUnion::ModRevision(known))
    };
    let compare = pb::PbCompare { result: RESULT_EQUAL, target, key: key.clone(), range_end: Vec::new(), target_union: Some(union) };
    let read = pb::PbRangeRequest { key: key.clone(), ..Default::default() };
    pb::PbTxnRequest {
        compare: vec![compare],
        success: vec![pb::PbTxnRequestOp { request: Some(pb::PbTxnOpRequest::RequestPut(pb::PbPutRequest { key, value, ..Default::default() })) }],
        failure: vec![pb::PbTxnRequestOp { request: Some(pb::PbTxnOpRequest::RequestRange(read)) }],
    }
}

/// One row of the table: where the puts go and whose CPU is counted.
struct Target<'a> {
    name: &'static str,
    url: &'a str,
    /// The process in between (aq, grpc-proxy), if any.
    pid: Option<u32>,
    /// The etcd the puts land in.
    store_pid: u32,
    shape: Shape,
    /// Who the client logs in as.
    login: Option<&'a Credentials>,
}

/// The compare of an ownership check by fence: a reserved key's version.
fn fence_compare() -> pb::PbCompare {
    pb::PbCompare {
        result: crate::backend::compare::RESULT_EQUAL,
        target: crate::backend::compare::TARGET_VERSION,
        key: [crate::index::RESERVED_PREFIX, b"fence/bench"].concat(),
        range_end: Vec::new(),
        target_union: Some(pb::PbTargetUnion::Version(0)),
    }
}

/// Runs `clients` concurrent writers against `url` for `duration`; each has its own connection.
async fn load(
    url: &str,
    clients: usize,
    duration: Duration,
    value: Arc<Vec<u8>>,
    prefix: &str,
    shape: Shape,
    login: Option<&Credentials>,
) -> Result<(usize, Duration, Vec<Duration>), CliError> {
    let mut groups = Vec::with_capacity(clients);
    for i in 0..clients {
        groups.push(ready_as(&format!("client-{i}"), url, login).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for (i, group) in groups.into_iter().enumerate() {
        let value = value.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            // The revision each key was last seen at, for the kube workload.
            let mut known = vec![0i64; 1000];
            while Instant::now() < deadline {
                // 1,000 keys per client, rewritten: the keyspace stays small, as in steady state.
                let key = format!("{prefix}{i:03}-{:04}", n % 1000).into_bytes();
                let put = pb::PbPutRequest { key, value: value.to_vec(), ..Default::default() };
                let t = Instant::now();
                match shape {
                    Shape::Put => {
                        group.put(put).await.map_err(|s| s.message().to_string())?;
                    }
                    Shape::FencedTxn => {
                        let compare = fence_compare();
                        let read = pb::PbRangeRequest { key: compare.key.clone(), ..Default::default() };
                        let txn = pb::PbTxnRequest {
                            compare: vec![compare],
                            success: vec![pb::PbTxnRequestOp { request: Some(pb::PbTxnOpRequest::RequestPut(put)) }],
                            failure: vec![pb::PbTxnRequestOp { request: Some(pb::PbTxnOpRequest::RequestRange(read)) }],
                        };
                        group.txn(txn).await.map_err(|s| s.message().to_string())?;
                    }
                    Shape::Kube => {
                        let slot = (n % 1000) as usize;
                        let answer = group
                            .txn(kube_txn(put.key, put.value, known[slot]))
                            .await
                            .map_err(|s| s.message().to_string())?;
                        known[slot] = if answer.succeeded {
                            answer.header.map(|h| h.revision).unwrap_or_default()
                        } else {
                            // The read in the else branch: what the key holds now.
                            match answer.responses.first().and_then(|r| r.response.as_ref()) {
                                Some(pb::PbTxnOpResponse::ResponseRange(range)) => range.kvs.first().map(|kv| kv.mod_revision).unwrap_or(0),
                                _ => 0,
                            }
                        };
                    }
                }
                latencies.push(t.elapsed());
                n += 1;
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let latencies = task.await.map_err(|e| CliError::Input(e.to_string()))?.map_err(CliError::Input)?;
        all.extend(latencies);
    }
    let elapsed = started.elapsed();
    all.sort();
    Ok((all.len(), elapsed, all))
}

pub(super) fn layout(etcd_url: &str) -> String {
    layout_of(&format!("[[groups]]\nname = \"main\"\nendpoints = [\"{etcd_url}\"]\n"))
}

/// The benchmark's scopes on the group `group` (a `[[groups]]` table) describes.
fn layout_of(group: &str) -> String {
    format!(
        r#"{group}
[[scopes]]
id = "catch-all"
prefix = ""
group = "main"
policy = "builtin:open"

[[scopes]]
id = "registry"
prefix = "/registry/"
group = "main"
policy = "builtin:quota"
config = {{ tenant_segment = 2, default = {{ max_value_bytes = 1572864 }} }}
"#
    )
}

pub(super) fn put(seconds: u64, clients: &[usize], etcd_binary: &str, kube: bool, pin: bool) -> Result<(), CliError> {
    if clients.is_empty() || clients.contains(&0) {
        return Err(CliError::Input("--clients must list positive client counts, e.g. 1,64".into()));
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if pin && cores < 3 {
        return Err(CliError::Input(format!(
            "--pin gives etcd, the proxy and the clients a core each and needs at least 3 cores; this machine has {cores}"
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(e.to_string()))?;
    runtime.block_on(run(Duration::from_secs(seconds.max(1)), clients, etcd_binary, kube, pin.then_some(cores)))
}

/// Pins every thread of process `pid` (0: this one) to `cpus`; threads it starts later
/// inherit the set from theirs.
fn pin_to(pid: u32, cpus: std::ops::Range<usize>) -> Result<(), CliError> {
    let tasks = if pid == 0 { "/proc/self/task".to_string() } else { format!("/proc/{pid}/task") };
    let threads = std::fs::read_dir(&tasks).map_err(|e| CliError::Input(format!("cannot list {tasks}: {e}")))?;
    for thread in threads {
        let Some(tid) = thread.ok().and_then(|t| t.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok())) else {
            continue;
        };
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only read
        // and write that set and the thread's affinity.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for cpu in cpus.clone() {
                libc::CPU_SET(cpu, &mut set);
            }
            if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(CliError::Input(format!("cannot pin thread {tid} of {pid}: {}", std::io::Error::last_os_error())));
            }
        }
    }
    Ok(())
}

async fn run(duration: Duration, clients: &[usize], etcd_binary: &str, kube: bool, pin: Option<usize>) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("aq-bench-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let input = |e: String| CliError::Input(e);
    let (mut etcd, _) = EtcdProcess::start(etcd_binary, "bench", &dir.join("etcd"), Duration::from_secs(20)).await.map_err(input)?;
    let etcd_pid = etcd.pid().ok_or_else(|| CliError::Input(format!("etcd exited at start:\n{}", etcd.log_tail(10))))?;

    // An etcd with auth on, as aq runs its groups: aq's user holds the layout's ranges.
    let auth_dir = dir.join("etcd-auth");
    let (mut secured, _) = EtcdProcess::start(etcd_binary, "bench-auth", &auth_dir, Duration::from_secs(20)).await.map_err(input)?;
    let secured_pid = secured.pid().ok_or_else(|| CliError::Input(format!("etcd exited at start:\n{}", secured.log_tail(10))))?;
    let secrets = ManagedSecrets::load_or_create(&auth_dir).map_err(input)?;
    secure("bench-auth", secured.client_url(), &secrets).await.map_err(input)?;
    let (data, admin) = (secrets.data(), secrets.admin());
    let group = format!(
        "[[groups]]\nname = \"main\"\nendpoints = [\"{}\"]\nuser = {:?}\npassword = {:?}\nadmin_user = {:?}\nadmin_password = {:?}\n",
        secured.client_url(),
        data.user,
        data.password,
        admin.user,
        admin.password
    );
    let layout = layout_of(&group);
    let config = crate::config::Config::parse(&layout, "bench layout").map_err(input)?;
    let scopes = config.scopes.iter().map(|s| s.to_scope()).collect::<Result<Vec<_>, _>>().map_err(input)?;
    let index = crate::index::ScopeIndex::new(scopes).map_err(|e| CliError::Input(e.to_string()))?;
    Owners::connect("main", &[secured.client_url().to_string()], &admin)
        .await
        .map_err(input)?
        .reconcile(&index.group_ranges("main"))
        .await
        .map_err(input)?;

    // etcd's grpc-proxy, in front of the plain etcd.
    let proxy_port = free_port()?;
    let proxy = Guard(
        Command::new(etcd_binary)
            .args(["grpc-proxy", "start", &format!("--endpoints={}", etcd.client_url()), &format!("--listen-addr=127.0.0.1:{proxy_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| CliError::Input(format!("cannot start etcd grpc-proxy: {e}")))?,
    );
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    ready("grpc-proxy", &proxy_url).await?;

    // aq, as its own process over the etcd with auth.
    let layout_path = dir.join("layout.toml");
    std::fs::write(&layout_path, &layout)?;
    let aq = serve_process(&dir, "aq", &layout_path).await?;
    let aq_url = aq.url.clone();
    if let Some(cores) = pin {
        // etcd on core 0, what sits in between on core 1, the clients on the rest.
        pin_to(etcd_pid, 0..1)?;
        pin_to(secured_pid, 0..1)?;
        pin_to(aq.process.0.id(), 1..2)?;
        pin_to(proxy.0.id(), 1..2)?;
        pin_to(0, 2..cores)?;
    }

    let value = Arc::new(vec![b'v'; 256]);
    let mut runs = Vec::new();
    // On a terminal, a bar of the configurations measured.
    let bar = super::progress_bar(0, "[{bar:30}] {pos}/{len} configurations, {elapsed}: {msg}");
    for &n in clients {
        let target = |name, url, pid, store_pid, shape, login| Target { name, url, pid, store_pid, shape, login };
        let targets = [
            target("direct etcd", etcd.client_url(), None, etcd_pid, Shape::Put, None),
            target("direct txn", etcd.client_url(), None, etcd_pid, Shape::FencedTxn, None),
            target("direct auth", secured.client_url(), None, secured_pid, Shape::Put, Some(&data)),
            target("direct root", secured.client_url(), None, secured_pid, Shape::Put, Some(&admin)),
            target("aq + policy", aq_url.as_str(), Some(aq.process.0.id()), secured_pid, Shape::Put, None),
            target("grpc-proxy", proxy_url.as_str(), Some(proxy.0.id()), etcd_pid, Shape::Put, None),
        ];
        // The kube workload runs the rows where it means something: direct, aq, grpc-proxy.
        let measured: Vec<Target> = targets
            .into_iter()
            .filter_map(|t| match (kube, t.shape) {
                (true, Shape::Put) if t.name != "direct auth" && t.name != "direct root" => Some(Target { shape: Shape::Kube, ..t }),
                (true, _) => None,
                (false, _) => Some(t),
            })
            .collect();
        if let Some(bar) = &bar {
            bar.set_length((clients.len() * measured.len()) as u64);
        }
        for Target { name: target, url, pid, store_pid, shape, login } in measured {
            if let Some(bar) = &bar {
                bar.set_message(format!("{target} at {n} clients"));
            }
            // A short warm-up on the same keys, then the measured run.
            load(url, n, Duration::from_millis(500), value.clone(), "/registry/configmaps/bench/", shape, login).await?;
            let (aq_before, etcd_before) = (pid.map(cpu_seconds), cpu_seconds(store_pid));
            let (puts, elapsed, latencies) =
                load(url, n, duration, value.clone(), "/registry/configmaps/bench/", shape, login).await?;
            let aq_cpu = match (pid, aq_before) {
                (Some(pid), Some(before)) => Some(cpu_seconds(pid) - before),
                _ => None,
            };
            let etcd_cpu = cpu_seconds(store_pid) - etcd_before;
            runs.push(Run { target, clients: n, puts, elapsed, latencies, aq_cpu, etcd_cpu });
            if let Some(bar) = &bar {
                bar.inc(1);
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print_table(&runs);
    Ok(())
}

fn print_table(runs: &[Run]) {
    println!(
        "{:<12} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>12} {:>14}",
        "target", "clients", "puts/s", "× direct", "p50 µs", "p99 µs", "+p50 µs", "puts", "own CPU s/10k", "etcd CPU s/10k"
    );
    for run in runs {
        let direct = runs.iter().find(|r| r.clients == run.clients && r.target == "direct etcd").expect("direct run");
        let per_10k = |cpu: f64| cpu / run.puts as f64 * 10_000.0;
        let added = run.percentile(0.5).as_secs_f64() * 1e6 - direct.percentile(0.5).as_secs_f64() * 1e6;
        println!(
            "{:<12} {:>7} {:>9.0} {:>9.2} {:>9.0} {:>9.0} {:>9.0} {:>10} {:>12} {:>14.2}",
            run.target,
            run.clients,
            run.throughput(),
            run.throughput() / direct.throughput(),
            run.percentile(0.5).as_secs_f64() * 1e6,
            run.percentile(0.99).as_secs_f64() * 1e6,
            added,
            run.puts,
            run.aq_cpu.map(|c| format!("{:.2}", per_10k(c))).unwrap_or_else(|| "-".into()),
            per_10k(run.etcd_cpu),
        );
    }
}

pub(super) struct RemoveOnDrop(pub(super) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
