//! The built-in policies, embedded in the binary so `aq serve` needs no policy files.

/// One built-in policy.
#[derive(Debug)]
pub struct Builtin {
    /// Its name: `open`, `ephemeral`, `critical` or `quota`.
    pub name: &'static str,
    /// The component's bytes.
    pub component: &'static [u8],
    /// Where the build wrote the component (under `target/wasm/`).
    pub component_path: &'static str,
    /// The example configuration its fixtures run with (`policies/<name>/config.json`).
    pub example_config: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/builtin.rs"));

/// A built-in policy by name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}
