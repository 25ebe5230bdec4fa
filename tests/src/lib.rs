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
