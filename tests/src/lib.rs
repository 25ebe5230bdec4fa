//! Shared pieces of aq's integration tests: paths of the test guest components built from
//! `guests/`, and helpers.

/// Paths of the test guest components, one constant per crate in `tests/guests/`.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));

    /// The bytes of a guest component.
    pub fn bytes(path: &str) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("test guest {path}: {e}"))
    }
}

/// The root of the workspace, for fixtures and configs.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// An engine with test-friendly defaults and no disk cache.
pub fn engine() -> aq_host::engine::Engine {
    aq_host::engine::Engine::new(aq_host::engine::EngineConfig::default()).expect("engine")
}

/// One engine for the tests that load Python and JavaScript components, each compiled once per
/// test run: cranelift takes seconds over their embedded interpreters.
pub fn shared_engine() -> &'static aq_host::engine::Engine {
    static ENGINE: std::sync::OnceLock<aq_host::engine::Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(engine)
}

/// The component at `path` loaded into [`shared_engine`], compiled the first time only.
pub fn shared_module(path: &str) -> std::sync::Arc<aq_host::engine::PolicyModule> {
    static MODULES: std::sync::Mutex<Vec<(String, std::sync::Arc<aq_host::engine::PolicyModule>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut modules = MODULES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, module)) = modules.iter().find(|(p, _)| p == path) {
        return module.clone();
    }
    let module = shared_engine().load(&guests::bytes(path)).unwrap_or_else(|e| panic!("{path} loads: {e}"));
    modules.push((path.to_string(), module.clone()));
    module
}

/// Swaps `scope`'s binding back and forth between `first` (active at the start) and `second`
/// while three threads evaluate `ctx` on whichever is active. Every evaluation must succeed on
/// the version it started with; `decided_by_first` tells from a decision which version made it
/// (checking it as it likes), and that must be the version whose digest decided. Swaps at least
/// `swaps` times and until each version decided `each` requests; answers the swaps made.
pub fn swap_under_load(
    engine: &aq_host::engine::Engine,
    scope: &str,
    ctx: &aq_sdk::Context,
    (first, second): (&std::sync::Arc<aq_host::engine::Binding>, &std::sync::Arc<aq_host::engine::Binding>),
    (swaps, each): (usize, u64),
    decided_by_first: impl Fn(&aq_sdk::Decision) -> bool + Sync,
) -> usize {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let registry = aq_host::engine::Registry::new();
    registry.bind(scope, first.clone());
    let slot = registry.slot(scope).expect("a bound scope");
    let stop = AtomicBool::new(false);
    let decided = [AtomicU64::new(0), AtomicU64::new(0)];
    let (digests, decided_by_first) = ([first.module.digest(), second.module.digest()], &decided_by_first);
    std::thread::scope(|s| {
        for thread in 0..3u8 {
            let (slot, stop, decided) = (&slot, &stop, &decided);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let binding = slot.active();
                    let request = aq_host::engine::EvalRequest { context: ctx, seed: [thread; 32], reader: None };
                    let evaluation = engine.evaluate(&binding, request);
                    assert!(evaluation.failure.is_none(), "{evaluation:?}");
                    assert_eq!(evaluation.digest, binding.module.digest(), "decided by the version it started on");
                    let side = if decided_by_first(&evaluation.decision) { 0 } else { 1 };
                    assert_eq!(evaluation.digest, digests[side], "the decision is the deciding version's");
                    decided[side].fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let mut made = 0;
        while made < swaps || decided.iter().any(|d| d.load(Ordering::Relaxed) < each) {
            let (next, now) = if made % 2 == 0 { (second, first) } else { (first, second) };
            let previous = registry.bind(scope, next.clone()).expect("a binding was active");
            assert_eq!(previous.module.digest(), now.module.digest());
            made += 1;
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        made
    })
}

/// A one-put request in scope `test` covering the whole keyspace.
pub fn put_context(key: &str, value: &str) -> aq_sdk::Context {
    aq_sdk::Context {
        scope: aq_sdk::ScopeInfo { id: "test".into(), ..Default::default() },
        ops: vec![aq_sdk::Op::Put(aq_sdk::PutOp { key: key.into(), value: value.into(), ..Default::default() })],
        request_time: aq_sdk::Timestamp { seconds: 1_790_000_000, nanoseconds: 123_456_789 },
        ..Default::default()
    }
}

pub mod etcd;
pub mod lincheck;

/// `aq serve` running as a process of its own.
pub struct ServeProcess {
    /// The process; the caller stops it.
    pub child: std::process::Child,
    /// Its etcd API, `127.0.0.1:<port>`.
    pub endpoint: String,
    /// What it printed up to `aq: ready`.
    pub banner: String,
}

/// One managed group, one scope over every key under `builtin:open`.
pub const ONE_GROUP_LAYOUT: &str =
    "[[groups]]\nname = \"main\"\n\n[[scopes]]\nid = \"all\"\nprefix = \"\"\ngroup = \"main\"\npolicy = \"builtin:open\"\n";

/// Starts `binary` (an `aq`) as `aq serve` with `layout`, its data in `dir/data`, on free
/// ports, without a decision log, and returns once it says it is ready. Reading stops there and
/// the pipe closes: aq must keep serving, and stop cleanly, with its standard output gone.
pub fn serve_process(binary: &std::path::Path, layout: &str, dir: &std::path::Path) -> ServeProcess {
    use std::io::BufRead;
    let layout_path = dir.join("layout.toml");
    std::fs::write(&layout_path, layout).unwrap();
    let free = || aq_host::backend::managed::free_port().unwrap();
    let port = free();
    let mut child = std::process::Command::new(binary)
        .arg("serve")
        .arg("--config")
        .arg(&layout_path)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--admin-listen=127.0.0.1:{}", free()))
        .arg("--decision-log=off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{} does not start: {e}", binary.display()));
    let mut banner = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        let ready = line.contains("aq: ready");
        banner.push(line);
        if ready {
            break;
        }
    }
    let banner = banner.join("\n");
    assert!(banner.contains("aq: ready"), "aq did not get ready: {banner}");
    ServeProcess { child, endpoint: format!("127.0.0.1:{port}"), banner }
}

/// A small deterministic generator (xorshift64) for tests that make their own input: the same
/// seed gives the same cases, so a failure names one that runs again.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Waits until `condition` holds, checking every 10 ms; panics naming `what` after 10 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits until the asynchronous `condition` holds, checking every 10 ms; panics naming `what`
/// after 10 s.
pub async fn wait_until_async<F: std::future::Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
