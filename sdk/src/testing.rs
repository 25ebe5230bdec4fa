//! Native fixture harness: run a [`Policy`] on fixture files under `cargo test`, without wasm.
//!
//! ```no_run
//! # struct MyPolicy;
//! # impl aq_sdk::Policy for MyPolicy {
//! #     type Config = serde_json::Value;
//! #     fn evaluate(_: &serde_json::Value, _: &aq_sdk::Context) -> aq_sdk::Decision { aq_sdk::Decision::allow() }
//! # }
//! #[test]
//! fn fixtures() {
//!     aq_sdk::testing::assert_fixtures::<MyPolicy>(
//!         concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"),
//!         concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
//!     );
//! }
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fixture::{Call, Case, FixtureFile, Outcome};
use crate::model::StoredValue;
use crate::{Policy, parse_config};

/// What the host imports answer while a case runs natively.
#[derive(Default)]
pub(crate) struct NativeHost {
    pub(crate) reads: BTreeMap<Vec<u8>, StoredValue>,
    pub(crate) counts: BTreeMap<Vec<u8>, u64>,
}

thread_local! {
    pub(crate) static NATIVE_HOST: RefCell<NativeHost> = RefCell::new(NativeHost::default());
}

/// The result of one case.
#[derive(Debug)]
pub struct CaseResult {
    /// The fixture file.
    pub file: PathBuf,
    /// The case name.
    pub name: String,
    /// What the policy answered.
    pub outcome: Outcome,
    /// `Err` with every mismatch, when the outcome is not the expected one.
    pub verdict: Result<(), String>,
}

/// Runs one case natively against a parsed configuration.
pub fn run_case<P: Policy>(config: &P::Config, case: &Case) -> Result<Outcome, String> {
    let call = case.call()?;
    NATIVE_HOST.with(|h| {
        *h.borrow_mut() = NativeHost {
            reads: case.reads_by_key(),
            counts: case.counts_by_prefix(),
        }
    });
    Ok(match call {
        Call::Evaluate(ctx) => Outcome::Decision(P::evaluate(config, ctx)),
        Call::Advise(stats) => Outcome::Advice(P::advise(config, stats)),
    })
}

/// The `.json` files of a directory, sorted, or the file itself.
pub fn fixture_paths(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| format!("cannot list fixtures in {}: {e}", path.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Runs every case of every fixture file under `fixtures` (a file or a directory of `.json`
/// files) with the configuration in `config_path`.
pub fn run_fixtures<P: Policy>(config_path: &Path, fixtures: &Path) -> Result<Vec<CaseResult>, String> {
    let config_text = std::fs::read_to_string(config_path)
        .map_err(|e| format!("cannot read config {}: {e}", config_path.display()))?;
    let config = parse_config::<P>(&config_text).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let mut results = Vec::new();
    for file in fixture_paths(fixtures)? {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let parsed = FixtureFile::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        for case in parsed.cases {
            let outcome = run_case::<P>(&config, &case).map_err(|e| format!("{}: {e}", file.display()))?;
            let verdict = case.expect.check(&outcome);
            results.push(CaseResult { file: file.clone(), name: case.name, outcome, verdict });
        }
    }
    Ok(results)
}

/// Runs the fixtures and panics with every failing case; for `#[test]` functions.
pub fn assert_fixtures<P: Policy>(config_path: impl AsRef<Path>, fixtures: impl AsRef<Path>) {
    let results = run_fixtures::<P>(config_path.as_ref(), fixtures.as_ref()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!results.is_empty(), "no fixture cases under {}", fixtures.as_ref().display());
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.verdict.as_ref().err().map(|e| format!("{} / {}: {e}", r.file.display(), r.name)))
        .collect();
    assert!(failures.is_empty(), "{} of {} fixture cases failed:\n{}", failures.len(), results.len(), failures.join("\n"));
}
