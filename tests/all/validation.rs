//! Components are checked before they are trusted: bad bytes, core modules and components of
//! other worlds are refused with errors that say what is wrong; configs are checked by `init`.

use aq_host::engine::{BindError, EngineConfig, FailMode, LoadError, Limits, PolicyDigest};
use aq_tests::engine;
use aq_tests::guests::{self, OTHER_WORLD};

#[test]
fn bytes_that_are_not_wasm_are_refused() {
    let engine = engine();
    for bytes in [&b""[..], b"hello, world", b"#!/bin/sh\necho policy\n"] {
        let err = engine.load(bytes).expect_err("refused");
        assert!(matches!(err, LoadError::NotWasm), "{err}");
        assert!(err.to_string().contains("wasm32-wasip2"), "says what to do: {err}");
    }
}

#[test]
fn a_core_module_is_refused_as_not_a_component() {
    // The smallest valid core module: magic and version 1.
    let err = engine().load(b"\0asm\x01\0\0\0").expect_err("refused");
    assert!(matches!(err, LoadError::CoreModule), "{err}");
}

#[test]
fn a_truncated_component_is_refused_as_invalid() {
    let open = aq_host::builtin::find("open").unwrap().component;
    let err = engine().load(&open[..open.len() / 2]).expect_err("refused");
    assert!(matches!(err, LoadError::Invalid(_)), "{err}");
}

#[test]
fn a_component_of_another_world_names_the_missing_export() {
    let err = engine().load(&guests::bytes(OTHER_WORLD)).expect_err("refused");
    let LoadError::WorldMismatch(detail) = &err else { panic!("{err}") };
    assert!(detail.contains("missing export aq:governance/policy@0.1.1"), "{detail}");
    assert!(detail.contains("other:greeter/greet@1.0.0"), "names what it exports instead: {detail}");
}

#[test]
fn components_are_content_addressed() {
    let engine = engine();
    let open = aq_host::builtin::find("open").unwrap().component;
    let module = engine.load(open).unwrap();
    assert_eq!(module.digest(), PolicyDigest::of(open));
    assert_eq!(module.digest().to_hex(), blake3::hash(open).to_hex().to_string());
    assert_ne!(module.digest(), engine.load(aq_host::builtin::find("quota").unwrap().component).unwrap().digest());
}

#[test]
fn a_config_the_policy_refuses_is_not_bound() {
    let engine = engine();
    let critical = engine.load(aq_host::builtin::find("critical").unwrap().component).unwrap();
    let err = engine.bind("secrets", critical.clone(), "{}", Limits::default(), FailMode::Closed).expect_err("refused");
    let BindError::Config { error, .. } = &err else { panic!("{err}") };
    assert!(error.to_string().contains("missing field `role`"), "{err}");
    let err = engine.bind("secrets", critical, "not json", Limits::default(), FailMode::Closed).expect_err("refused");
    assert!(err.to_string().contains("malformed config"), "{err}");
}

#[test]
fn limits_above_the_engine_ceiling_are_refused() {
    let engine = engine();
    let open = engine.load(aq_host::builtin::find("open").unwrap().component).unwrap();
    let limits = Limits { memory_bytes: EngineConfig::default().memory_ceiling + 1, ..Limits::default() };
    let err = engine.bind("s", open, "{}", limits, FailMode::Closed).expect_err("refused");
    assert!(matches!(err, BindError::Limits { .. }), "{err}");
}

#[test]
fn precompiled_components_are_cached_by_digest_and_survive_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { cache_dir: Some(dir.path().to_path_buf()), ..EngineConfig::default() };
    let quota = aq_host::builtin::find("quota").unwrap().component;
    let first = aq_host::engine::Engine::new(config.clone()).unwrap();
    let digest = first.load(quota).unwrap().digest();
    let cached: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let name = cached[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&digest.to_hex()) && name.ends_with(".cwasm"), "{name}");

    // A second engine loads from the cache and evaluates correctly.
    let second = aq_host::engine::Engine::new(config.clone()).unwrap();
    let module = second.load(quota).unwrap();
    let binding = second.bind("q", module, r#"{"tenant_segment": 0}"#, Limits::default(), FailMode::Closed).unwrap();
    assert!(binding.module.digest() == digest);

    // A corrupt cache entry is discarded and the component recompiled.
    std::fs::write(&cached[0], b"garbage").unwrap();
    let third = aq_host::engine::Engine::new(config).unwrap();
    assert_eq!(third.load(quota).unwrap().digest(), digest);
    assert!(std::fs::read(&cached[0]).unwrap().len() > 1000, "the entry was rewritten");
}

#[test]
fn a_policy_built_against_the_first_0_1_wit_loads_and_decides_unchanged() {
    use aq_host::engine::EvalRequest;
    let engine = engine();
    let module = engine.load(&guests::bytes(guests::ABI_0_1_0)).expect("a 0.1.0 component loads on a 0.1.1 host");
    assert!(module.exports().iter().any(|e| e == "aq:governance/policy@0.1.0"), "{:?}", module.exports());
    let binding = engine.bind("old", module, "{}", Limits::default(), FailMode::Closed).expect("its init runs");
    let decide = |key: &str| {
        let mut ctx = aq_tests::put_context(key, "v");
        ctx.transport.etcd_user = Some("carol".into());
        ctx.transport.kube_user = Some(aq_sdk::KubeUser { username: "k".into(), ..Default::default() });
        engine.evaluate(&binding, EvalRequest { context: &ctx, seed: [3; 32], reader: None })
    };
    let allowed = decide("/old/a");
    assert_eq!((allowed.decision.verdict.kind(), allowed.failure.is_none()), ("allow", true), "{allowed:?}");
    let denied = decide("/old/frozen");
    assert_eq!(denied.decision.verdict, aq_sdk::Verdict::Deny("a 0.1.0 policy refuses carol here".into()), "{denied:?}");
    assert!(denied.failure.is_none());
}
