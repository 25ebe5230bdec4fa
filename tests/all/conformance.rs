//! One policy in every language: `examples/namespaces` written in Rust, Python and JavaScript,
//! each built from source by the normal build, loaded into the real engine and run on one shared
//! set of fixtures. Every edition must answer every case as the fixture expects and exactly as
//! the others do. A new language is a folder and a build step (`tests/build.rs`); this suite
//! takes it from `guests::NAMESPACES` without a change.

use std::sync::Arc;

use aq_host::engine::{BindError, Binding, Engine, FailMode, Limits};
use aq_host::fixtures::run_case;
use aq_sdk::ConfigError;
use aq_sdk::fixture::{FixtureFile, Outcome};
use aq_sdk::testing::fixture_paths;
use aq_tests::{guests, shared_engine, shared_module, workspace_root};

fn example_dir() -> std::path::PathBuf {
    workspace_root().join("examples").join("namespaces")
}

/// A scope's default limits, but a deadline of seconds: what these tests hold is that every
/// language answers alike, not how fast, and on a machine busy with other tests a cold Python
/// call (about 2 ms alone) has taken over the default 50 ms by the clock.
fn limits() -> Limits {
    Limits { timeout: std::time::Duration::from_secs(5), ..Limits::default() }
}

/// Every edition bound with `config` (the scope's default limits, but for the deadline), by
/// language.
fn bind_all(engine: &Engine, config: &str) -> Vec<(&'static str, Result<Arc<Binding>, BindError>)> {
    guests::NAMESPACES
        .iter()
        .map(|(language, path)| (*language, engine.bind("namespaces", shared_module(path), config, limits(), FailMode::Closed)))
        .collect()
}

#[test]
fn every_language_answers_every_fixture_alike_and_as_expected() {
    let languages: Vec<&str> = guests::NAMESPACES.iter().map(|(language, _)| *language).collect();
    assert_eq!(languages, ["rust", "python", "js"], "every edition is built");
    let engine = shared_engine();
    let config = std::fs::read_to_string(example_dir().join("config.json")).unwrap();
    let bindings: Vec<(&str, Arc<Binding>)> = bind_all(engine, &config)
        .into_iter()
        .map(|(language, bound)| (language, bound.unwrap_or_else(|e| panic!("the {language} edition takes config.json: {e}"))))
        .collect();

    let mut kinds = std::collections::BTreeSet::new();
    let mut cases = 0;
    for file in fixture_paths(&example_dir().join("fixtures")).unwrap() {
        for case in FixtureFile::parse(&std::fs::read_to_string(&file).unwrap()).unwrap().cases {
            let mut answers: Vec<(&str, Outcome)> = Vec::new();
            for (language, binding) in &bindings {
                let outcome = run_case(engine, binding, &case).unwrap_or_else(|e| panic!("{language} / {}: {e}", case.name));
                if let Err(problem) = case.expect.check(&outcome) {
                    panic!("{language} / {}: {problem}", case.name);
                }
                answers.push((language, outcome));
            }
            let (first_language, first) = &answers[0];
            for (language, outcome) in &answers[1..] {
                assert_eq!(outcome, first, "{}: {language} and {first_language} disagree", case.name);
            }
            kinds.insert(match first {
                Outcome::Decision(d) => d.verdict.kind().to_string(),
                Outcome::Advice(a) => format!("advice {a:?}").split('(').next().unwrap().to_string(),
            });
            cases += 1;
        }
    }
    assert!(cases >= 15, "the shared fixtures hold {cases} cases");
    // The fixtures exercise every kind of answer, so no branch of any edition goes unchecked.
    for kind in ["allow", "deny", "require_approval", "advice Keep", "advice Split", "advice Merge"] {
        assert!(kinds.contains(kind), "no case answers {kind}: {kinds:?}");
    }
}

#[test]
fn every_language_refuses_the_same_bad_configurations_naming_the_field() {
    let engine = shared_engine();
    // (configuration, malformed?, text every edition's message contains)
    let bad: [(&str, bool, &str); 6] = [
        ("not json", true, ""),
        (r#"{"frozen": "kube-system"}"#, true, "frozen"),
        (r#"{"colour": "blue"}"#, true, "colour"),
        (r#"{"guarded": ["prod"]}"#, false, "guarded namespaces need approvers"),
        (r#"{"approvers": [{"principal": "a", "weight": 1}], "threshold": 5}"#, false, "threshold: 5 cannot be met by the approvers' weights, which add up to 1"),
        (r#"{"split_write_rate": 10, "merge_write_rate": 20}"#, false, "merge_write_rate: must be below split_write_rate"),
    ];
    for (config, malformed, names) in bad {
        for (language, bound) in bind_all(engine, config) {
            match bound {
                Err(BindError::Config { error: ConfigError::Malformed(message), .. }) if malformed => {
                    assert!(message.contains(names), "{language} on {config}: {message:?} does not name {names:?}")
                }
                Err(BindError::Config { error: ConfigError::Invalid(message), .. }) if !malformed => {
                    assert!(message.contains(names), "{language} on {config}: {message:?} does not say {names:?}")
                }
                other => panic!("{language} on {config}: expected a {} config error, got {other:?}", if malformed { "malformed" } else { "invalid" }),
            }
        }
    }
    // And an empty configuration is `{}`: nothing limited, every edition allows.
    for (language, bound) in bind_all(engine, "") {
        let binding = bound.unwrap_or_else(|e| panic!("{language} takes an empty configuration: {e}"));
        let case: aq_sdk::fixture::Case = serde_json::from_value(serde_json::json!({
            "name": "anything goes",
            "context": { "ops": [ { "put": { "key": "/registry/pods/kube-system/dns", "value": "x" } } ] },
            "expect": { "verdict": "allow" }
        }))
        .unwrap();
        let outcome = run_case(engine, &binding, &case).unwrap();
        case.expect.check(&outcome).unwrap_or_else(|p| panic!("{language}: {p}"));
    }
}

/// A scope's policy swapped back and forth between the Rust and the Python edition while three
/// threads evaluate: every request completes on the version it started with, none fails.
#[test]
fn hot_swaps_between_a_rust_and_a_python_policy_fail_no_request() {
    use aq_sdk::Verdict;

    let engine = shared_engine();
    let edition = |language: &str| guests::NAMESPACES.iter().find(|(l, _)| *l == language).unwrap().1;
    // The Rust edition limits values to 1 byte and so denies the request; the Python edition,
    // unconfigured, allows it. The verdict tells which decided.
    let limits = limits();
    let rust = engine.bind("ns", shared_module(edition("rust")), r#"{"max_value_bytes": 1}"#, limits, FailMode::Closed).unwrap();
    let python = engine.bind("ns", shared_module(edition("python")), "{}", limits, FailMode::Closed).unwrap();
    let ctx = aq_tests::put_context("/registry/configmaps/team-a/settings", "two bytes");
    let swaps = aq_tests::swap_under_load(engine, "ns", &ctx, (&rust, &python), (100, 30), |decision| match &decision.verdict {
        Verdict::Deny(reason) => {
            assert!(reason.contains("over max_value_bytes = 1"), "{reason}");
            true
        }
        Verdict::Allow => false,
        other => panic!("{other:?}"),
    });
    assert!(swaps >= 100);
}
