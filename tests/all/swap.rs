//! Hot swap, rollback and determinism at the engine and registry level.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aq_host::engine::{Binding, EvalRequest, FailMode, Limits, Registry, ScopeReader};
use aq_sdk::{ReadError, StoredValue, Verdict};
use aq_tests::guests::{self, PROBE};
use aq_tests::{engine, put_context};

fn builtin_binding(engine: &aq_host::engine::Engine, name: &str) -> Arc<Binding> {
    let builtin = aq_host::builtin::find(name).unwrap();
    let module = engine.load(builtin.component).unwrap();
    engine.bind("secrets", module, builtin.example_config, Limits::default(), FailMode::Closed).unwrap()
}

#[test]
fn every_evaluation_completes_on_exactly_one_version_while_swapping() {
    let engine = engine();
    // `open` allows an unsigned write; `critical` denies it. The decision tells which ran.
    let open = builtin_binding(&engine, "open");
    let critical = builtin_binding(&engine, "critical");
    let ctx = put_context("/registry/secrets/ns/a", "v");
    // Swap at least 200 times, and until both versions have decided 50 requests.
    let swaps = aq_tests::swap_under_load(&engine, "secrets", &ctx, (&open, &critical), (200, 50), |decision| match &decision.verdict {
        Verdict::Allow => true,
        Verdict::Deny(_) => false,
        other => panic!("unexpected {other:?}"),
    });
    assert!(swaps >= 200);
}

#[test]
fn rollback_returns_to_the_last_known_good_binding() {
    let engine = engine();
    let registry = Registry::new();
    let open = builtin_binding(&engine, "open");
    let critical = builtin_binding(&engine, "critical");
    assert!(registry.rollback("secrets").is_err(), "unknown scope");
    registry.bind("secrets", open.clone());
    let err = registry.rollback("secrets").expect_err("nothing to roll back to");
    assert!(err.to_string().contains("no previous policy"), "{err}");
    registry.bind("secrets", critical.clone());
    assert_eq!(registry.active("secrets").unwrap().module.digest(), critical.module.digest());
    registry.rollback("secrets").unwrap();
    assert_eq!(registry.active("secrets").unwrap().module.digest(), open.module.digest());
    // A second rollback undoes the first.
    registry.rollback("secrets").unwrap();
    assert_eq!(registry.active("secrets").unwrap().module.digest(), critical.module.digest());
    assert_eq!(registry.scopes(), ["secrets"]);
}

/// A reader that answers one key, for the probe's reads.
struct OneKey;

impl ScopeReader for OneKey {
    fn read(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        Ok((key == b"/scope/k").then(|| StoredValue { value: "v".into(), mod_revision: 41, lease: 0 }))
    }
    fn count(&self, _prefix: &[u8]) -> Result<u64, ReadError> {
        Ok(7)
    }
}

fn probe(engine: &aq_host::engine::Engine, seed: [u8; 32]) -> aq_host::engine::Evaluation {
    let module = engine.load(&guests::bytes(PROBE)).unwrap();
    let binding = engine.bind("probe", module, "{}", Limits::default(), FailMode::Closed).unwrap();
    let mut ctx = put_context("/scope/k", "v");
    ctx.scope.key_start = "/scope/".into();
    ctx.scope.key_end = "/scope0".into();
    engine.evaluate(&binding, EvalRequest { context: &ctx, seed, reader: Some(Arc::new(OneKey)) })
}

#[test]
fn the_same_request_gets_the_same_decision_on_every_engine() {
    let (a, b) = (engine(), engine());
    let first = probe(&a, [9; 32]);
    let again = probe(&a, [9; 32]);
    let elsewhere = probe(&b, [9; 32]);
    assert!(first.failure.is_none(), "{first:?}");
    assert_eq!(first.decision, again.decision);
    assert_eq!(first.decision, elsewhere.decision);
    // Every call starts from a fresh instance: no state survives from the previous one.
    for evaluation in [&first, &again, &elsewhere] {
        assert_eq!(evaluation.decision.annotations["calls_in_this_instance"], "1");
    }
    // Randomness follows the request digest.
    let other = probe(&a, [10; 32]);
    assert_ne!(first.decision.annotations["random"], other.decision.annotations["random"]);
}

#[test]
fn an_instance_made_ready_ahead_serves_one_request_as_a_fresh_one_would() {
    use aq_host::engine::{Engine, EngineConfig, Refill};
    let cold = Engine::new(EngineConfig { warm_per_binding: 0, ..Default::default() }).unwrap();
    for refill in [Refill::Background, Refill::Caller] {
        let ready = Engine::new(EngineConfig { refill, ..Default::default() }).unwrap();
        let module = ready.load(&guests::bytes(PROBE)).unwrap();
        let binding = ready.bind("probe", module, "{}", Limits::default(), FailMode::Closed).unwrap();
        let mut ctx = put_context("/scope/k", "v");
        ctx.scope.key_start = "/scope/".into();
        ctx.scope.key_end = "/scope0".into();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for seed in [[21u8; 32], [22; 32], [23; 32], [24; 32]] {
            if ready.needs_replenish(&binding) {
                assert_eq!(refill, Refill::Caller, "only a caller is asked to replenish");
                ready.replenish(&binding);
            }
            while binding.ready_instances() == 0 {
                assert!(std::time::Instant::now() < deadline, "no instance was made ready ({refill:?})");
                std::thread::yield_now();
            }
            let warm = ready.evaluate(&binding, EvalRequest { context: &ctx, seed, reader: Some(Arc::new(OneKey)) });
            assert!(warm.prepared, "the evaluation took a ready instance ({refill:?})");
            // The same request on an engine that instantiates on the request: the same
            // decision, down to the request's clock and randomness, and the instance served no
            // one before.
            let fresh = probe(&cold, seed);
            assert!(warm.failure.is_none(), "{warm:?}");
            assert_eq!(warm.decision, fresh.decision, "{refill:?}");
            assert_eq!(warm.decision.annotations["calls_in_this_instance"], "1");
            assert_eq!(warm.observed_reads, fresh.observed_reads);
        }
    }
    let module = cold.load(&guests::bytes(PROBE)).unwrap();
    let binding = cold.bind("probe", module, "{}", Limits::default(), FailMode::Closed).unwrap();
    assert!(!cold.needs_replenish(&binding));
    assert_eq!(binding.ready_instances(), 0);
    assert!(!probe(&cold, [25; 32]).prepared);
}

#[test]
fn the_sandbox_shows_the_request_time_and_nothing_of_the_host() {
    let evaluation = probe(&engine(), [3; 32]);
    let notes = &evaluation.decision.annotations;
    assert_eq!(notes["now_ns"], (1_790_000_000u128 * 1_000_000_000 + 123_456_789).to_string());
    assert_eq!(notes["monotonic_elapsed_ns"], "0");
    assert_eq!(notes["env_vars"], "0");
    assert_eq!(notes["args"], "0");
    assert!(notes["fs_root"].starts_with("error"), "{}", notes["fs_root"]);
    assert!(notes["net"].starts_with("error"), "{}", notes["net"]);
    assert!(notes["read_inside"].contains("mod_revision: 41"), "{}", notes["read_inside"]);
    assert_eq!(notes["read_outside"], "Err(OutsideScope)");
    assert_eq!(notes["count_inside"], "Ok(7)");
    // The read is reported so the gateway can guard the write on it.
    assert_eq!(evaluation.observed_reads.len(), 1);
    assert_eq!(evaluation.observed_reads[0].mod_revision, Some(41));
}

#[test]
fn instances_made_ready_ahead_never_starve_evaluations_of_instance_slots() {
    // A small pool makes the bound tight: ready instances and used stores waiting for the
    // background thread to drop them together stay under half of it, so evaluations that
    // instantiate on their request always find a slot, however fast requests come.
    let engine = aq_host::engine::Engine::new(aq_host::engine::EngineConfig {
        max_concurrent: 12,
        warm_per_binding: 4,
        ..Default::default()
    })
    .unwrap();
    let bindings = [builtin_binding(&engine, "open"), builtin_binding(&engine, "open")];
    let prepared = AtomicU64::new(0);
    std::thread::scope(|s| {
        for thread in 0..3u8 {
            let (engine, bindings, prepared) = (&engine, &bindings, &prepared);
            s.spawn(move || {
                let ctx = put_context("/registry/secrets/ns/a", "v");
                for round in 0..3000usize {
                    let binding = &bindings[round % 2];
                    let evaluation = engine.evaluate(binding, EvalRequest { context: &ctx, seed: [thread; 32], reader: None });
                    assert!(evaluation.failure.is_none(), "round {round}: {evaluation:?}");
                    assert_eq!(evaluation.decision.verdict, Verdict::Allow);
                    prepared.fetch_add(evaluation.prepared as u64, Ordering::Relaxed);
                }
            });
        }
    });
    assert!(prepared.into_inner() > 0, "some evaluations ran on instances made ready ahead");
}
