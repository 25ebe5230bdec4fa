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
