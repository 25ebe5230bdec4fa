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
