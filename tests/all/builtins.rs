//! Each built-in policy, compiled to a component and loaded into the real engine, answers its
//! fixtures exactly as the native harness does.

use std::path::Path;

use aq_host::builtin::BUILTINS;
use aq_host::engine::{FailMode, Limits};
use aq_host::fixtures::run_case;
use aq_sdk::fixture::{FixtureFile, Outcome};
use aq_sdk::testing::fixture_paths;
use aq_sdk::{Policy, parse_config};
use aq_tests::{engine, workspace_root};

/// Runs every fixture case of a built-in on its component and natively with `P`; returns the
/// verdict kinds and advice seen.
fn check_builtin<P: Policy>(name: &str, config_file: &Path, fixtures: &Path) -> Vec<String> {
    let builtin = aq_host::builtin::find(name).expect("built-in");
    let engine = engine();
    let module = engine.load(builtin.component).expect("built-in loads");
    let config_text = std::fs::read_to_string(config_file).unwrap();
    let binding = engine.bind("test", module, &config_text, Limits::default(), FailMode::Closed).expect("config accepted");
    let native_config = parse_config::<P>(&config_text).expect("native config");
    let mut seen = Vec::new();
    for file in fixture_paths(fixtures).unwrap() {
        let cases = FixtureFile::parse(&std::fs::read_to_string(&file).unwrap()).unwrap().cases;
        for case in cases {
            let wasm = run_case(&engine, &binding, &case).unwrap_or_else(|e| panic!("{name} / {}: {e}", case.name));
            if let Err(problem) = case.expect.check(&wasm) {
                panic!("{name} / {}: {problem}", case.name);
            }
            let native = aq_sdk::testing::run_case::<P>(&native_config, &case).unwrap();
            assert_eq!(wasm, native, "{name} / {}: component and native harness disagree", case.name);
            seen.push(match &wasm {
                Outcome::Decision(d) => d.verdict.kind().to_string(),
                Outcome::Advice(a) => format!("advice:{a:?}"),
            });
        }
    }
    seen
}

fn policy_dir(name: &str) -> std::path::PathBuf {
    workspace_root().join("policies").join(name)
}

#[test]
fn every_builtin_is_embedded() {
    let names: Vec<&str> = BUILTINS.iter().map(|b| b.name).collect();
    assert_eq!(names, ["open", "ephemeral", "critical", "quota"]);
}

#[test]
fn open_allows_everything() {
    let dir = policy_dir("open");
    let seen = check_builtin::<aq_policy_open::Open>("open", &dir.join("config.json"), &dir.join("fixtures"));
    assert!(seen.iter().all(|v| v == "allow" || v.starts_with("advice")), "{seen:?}");
    assert!(seen.iter().any(|v| v == "allow"));
}

#[test]
fn ephemeral_allows_leased_writes_denies_unleased_and_splits_hot_scopes() {
    let dir = policy_dir("ephemeral");
    let seen = check_builtin::<aq_policy_ephemeral::Ephemeral>("ephemeral", &dir.join("config.json"), &dir.join("fixtures"));
    for expected in ["allow", "deny"] {
        assert!(seen.iter().any(|v| v == expected), "no {expected} case in {seen:?}");
    }
    assert!(seen.iter().any(|v| v.starts_with("advice:Split")), "{seen:?}");
}

#[test]
fn critical_requires_a_role_and_approvals() {
    let dir = policy_dir("critical");
    let seen = check_builtin::<aq_policy_critical::Critical>("critical", &dir.join("config.json"), &dir.join("fixtures"));
    assert!(seen.iter().any(|v| v == "deny") && seen.iter().any(|v| v == "require_approval"), "{seen:?}");
    let direct = check_builtin::<aq_policy_critical::Critical>(
        "critical",
        &dir.join("direct/config.json"),
        &dir.join("direct/fixtures.json"),
    );
    assert!(direct.iter().any(|v| v == "allow") && direct.iter().any(|v| v == "deny"), "{direct:?}");
}

#[test]
fn quota_allows_within_limits_and_denies_over_them() {
    let dir = policy_dir("quota");
    let seen = check_builtin::<aq_policy_quota::Quota>("quota", &dir.join("config.json"), &dir.join("fixtures"));
    assert!(seen.iter().any(|v| v == "allow") && seen.iter().any(|v| v == "deny"), "{seen:?}");
}

#[test]
fn a_wrong_expectation_is_reported() {
    // The harness itself must be able to fail: flip one expectation and check it is caught.
    let builtin = aq_host::builtin::find("critical").unwrap();
    let engine = engine();
    let module = engine.load(builtin.component).unwrap();
    let binding = engine.bind("test", module, builtin.example_config, Limits::default(), FailMode::Closed).unwrap();
    let text = std::fs::read_to_string(policy_dir("critical").join("fixtures/critical.json")).unwrap();
    let mut case = FixtureFile::parse(&text).unwrap().cases.remove(0);
    case.expect.verdict = Some(aq_sdk::fixture::VerdictKind::Allow);
    let outcome = run_case(&engine, &binding, &case).unwrap();
    let problem = case.expect.check(&outcome).expect_err("a deny must not match an expected allow");
    assert!(problem.contains("verdict: expected Allow"), "{problem}");
}
