//! `aq policy test` and `aq policy inspect`.

use std::path::Path;
use std::sync::Arc;

use aq_sdk::fixture::{FixtureFile, Outcome};

use super::CliError;
use crate::engine::{Engine, EngineConfig, FailMode, Limits, PolicyModule, WORLD};

/// Reads a component from a path or `builtin:<name>`.
pub(super) fn component_bytes(component: &str) -> Result<Vec<u8>, CliError> {
    if let Some(name) = component.strip_prefix("builtin:") {
        return crate::builtin::find(name).map(|b| b.component.to_vec()).ok_or_else(|| {
            let names: Vec<&str> = crate::builtin::BUILTINS.iter().map(|b| b.name).collect();
            CliError::Input(format!("no built-in policy {name:?}; the built-ins are {}", names.join(", ")))
        });
    }
    std::fs::read(component).map_err(|e| CliError::Input(format!("cannot read component {component}: {e}")))
}

fn load(engine: &Engine, component: &str) -> Result<Arc<PolicyModule>, CliError> {
    let bytes = component_bytes(component)?;
    engine.load(&bytes).map_err(|e| CliError::Input(format!("{component}: {e}")))
}

fn engine() -> Result<Engine, CliError> {
    Engine::new(EngineConfig::default()).map_err(|e| CliError::Input(e.to_string()))
}

/// `aq policy inspect`.
pub(super) fn inspect(component: &str) -> Result<(), CliError> {
    let engine = engine()?;
    let module = load(&engine, component)?;
    println!("component  {component}");
    println!("digest     {}", module.digest());
    println!("size       {} bytes", module.size());
    println!("world      {WORLD} (conforms)");
    println!("exports");
    for name in module.exports() {
        println!("  {name}");
    }
    println!("imports");
    for name in module.imports() {
        println!("  {name}");
    }
    Ok(())
}

/// `aq policy test`.
pub(super) fn test(component: &str, config: Option<&Path>, fixtures: &[std::path::PathBuf]) -> Result<(), CliError> {
    let engine = engine()?;
    let module = load(&engine, component)?;
    let config_text = match config {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::Input(format!("cannot read config {}: {e}", path.display())))?,
        None => "{}".to_string(),
    };
    let digest = module.digest();
    let binding = engine
        .bind("fixtures", module, &config_text, Limits::default(), FailMode::Closed)
        .map_err(|e| CliError::Input(e.to_string()))?;

    let mut files = Vec::new();
    for path in fixtures {
        if !path.exists() {
            return Err(CliError::Input(format!("fixture {} does not exist", path.display())));
        }
        files.extend(aq_sdk::testing::fixture_paths(path).map_err(CliError::Input)?);
    }
    let mut cases = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CliError::Input(format!("cannot read fixture {}: {e}", file.display())))?;
        let parsed = FixtureFile::parse(&text).map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
        cases.extend(parsed.cases.into_iter().map(|case| (file.clone(), case)));
    }
    if cases.is_empty() {
        return Err(CliError::Input("the fixture files hold no cases".to_string()));
    }

    println!("policy {digest} ({component})");
    let (mut passed, mut failed) = (0, 0);
    for (file, case) in &cases {
        let label = format!("{} / {}", file.file_name().unwrap_or_default().to_string_lossy(), case.name);
        let checked = crate::fixtures::run_case(&engine, &binding, case).and_then(|outcome| {
            case.expect.check(&outcome)?;
            Ok(outcome)
        });
        match checked {
            Ok(outcome) => {
                passed += 1;
                println!("  ok    {label} ({})", summary(&outcome));
            }
            Err(problem) => {
                failed += 1;
                println!("  FAIL  {label}: {problem}");
            }
        }
    }
    println!("fixtures: {passed} passed, {failed} failed");
    if failed > 0 { Err(CliError::Check) } else { Ok(()) }
}

fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Decision(d) => format!("{}, lineage {:?}", d.verdict.kind(), d.lineage).to_lowercase(),
        Outcome::Advice(a) => format!("advice {a:?}").to_lowercase(),
    }
}
