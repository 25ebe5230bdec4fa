//! Hostile guests are stopped within their limits, denied with a reason naming the limit, and
//! the engine keeps serving other policies afterwards.

use std::time::{Duration, Instant};

use aq_host::engine::{Engine, EvalRequest, Evaluation, FailMode, Limits, PolicyFailure};
use aq_sdk::Verdict;
use aq_tests::guests::{self, GROW, OVERSIZE, RECURSE, SPIN, TRAP};
use aq_tests::{engine, put_context};

const LIMITS: Limits = Limits { timeout: Duration::from_millis(100), memory_bytes: 16 << 20, max_result_bytes: 4096 };

fn run(engine: &Engine, guest: &str, fail_mode: FailMode) -> Evaluation {
    let module = engine.load(&guests::bytes(guest)).expect("guest loads");
    let binding = engine.bind("hostile", module, "{}", LIMITS, fail_mode).expect("bind");
    let ctx = put_context("/k", "v");
    engine.evaluate(&binding, EvalRequest { context: &ctx, seed: [1; 32], reader: None })
}

fn deny_reason(evaluation: &Evaluation) -> &str {
    match &evaluation.decision.verdict {
        Verdict::Deny(reason) => reason,
        other => panic!("expected a deny, got {other:?}"),
    }
}

/// After any failure the same engine still evaluates a well-behaved policy.
fn assert_still_serving(engine: &Engine) {
    let open = aq_host::builtin::find("open").unwrap();
    let module = engine.load(open.component).unwrap();
    let binding = engine.bind("open", module, "{}", Limits::default(), FailMode::Closed).unwrap();
    let ctx = put_context("/k", "v");
    let evaluation = engine.evaluate(&binding, EvalRequest { context: &ctx, seed: [2; 32], reader: None });
    assert!(evaluation.failure.is_none() && evaluation.decision.is_allow(), "{evaluation:?}");
}

#[test]
fn an_infinite_loop_is_stopped_at_its_deadline() {
    let engine = engine();
    let started = Instant::now();
    let evaluation = run(&engine, SPIN, FailMode::Closed);
    let took = started.elapsed();
    assert_eq!(evaluation.failure, Some(PolicyFailure::Timeout { limit: LIMITS.timeout }));
    let reason = deny_reason(&evaluation);
    assert!(reason.contains("exceeded its CPU deadline of 100 ms"), "{reason}");
    assert!(reason.contains(&evaluation.digest.short()), "reason names the digest: {reason}");
    // Loading and compiling dominate the slack; the loop itself ran about 100 ms.
    assert!(evaluation.elapsed >= LIMITS.timeout - Duration::from_millis(5), "{:?}", evaluation.elapsed);
    assert!(evaluation.elapsed < LIMITS.timeout * 3, "stopped late: {:?} (whole test {took:?})", evaluation.elapsed);
    assert_still_serving(&engine);
}

#[test]
fn ready_instances_are_held_to_the_same_deadline_and_memory_cap() {
    use aq_host::engine::{EngineConfig, Refill};
    let engine = Engine::new(EngineConfig { refill: Refill::Caller, ..EngineConfig::default() }).unwrap();
    let ctx = put_context("/k", "v");
    for (guest, failure) in [
        (SPIN, PolicyFailure::Timeout { limit: LIMITS.timeout }),
        (GROW, PolicyFailure::Memory { limit: LIMITS.memory_bytes }),
    ] {
        let binding = engine.bind("hostile", engine.load(&guests::bytes(guest)).unwrap(), "{}", LIMITS, FailMode::Closed).unwrap();
        // Made ready long before the request: the deadline counts from the request.
        assert!(engine.needs_replenish(&binding));
        engine.replenish(&binding);
        std::thread::sleep(LIMITS.timeout * 2);
        for seed in [[3u8; 32], [4; 32]] {
            let evaluation = engine.evaluate(&binding, EvalRequest { context: &ctx, seed, reader: None });
            assert!(evaluation.prepared);
            assert_eq!(evaluation.failure.as_ref(), Some(&failure), "{guest}");
            assert!(evaluation.elapsed < LIMITS.timeout * 3, "stopped late: {:?}", evaluation.elapsed);
        }
    }
    assert_still_serving(&engine);
}

#[test]
fn unbounded_memory_growth_hits_the_memory_cap() {
    let engine = engine();
    let evaluation = run(&engine, GROW, FailMode::Closed);
    assert_eq!(evaluation.failure, Some(PolicyFailure::Memory { limit: LIMITS.memory_bytes }));
    assert!(deny_reason(&evaluation).contains("exceeded its memory limit of 16777216 bytes"));
    assert_still_serving(&engine);
}

#[test]
fn a_trap_is_denied_with_the_panic_message() {
    let engine = engine();
    let evaluation = run(&engine, TRAP, FailMode::Closed);
    let Some(PolicyFailure::Trap { detail }) = &evaluation.failure else { panic!("{evaluation:?}") };
    assert!(detail.contains("guest gave up on 1 ops"), "the policy's panic message is reported: {detail}");
    assert!(deny_reason(&evaluation).contains("trapped"));
    assert_still_serving(&engine);
}

#[test]
fn deep_recursion_hits_the_stack_limit() {
    let engine = engine();
    let evaluation = run(&engine, RECURSE, FailMode::Closed);
    assert!(matches!(evaluation.failure, Some(PolicyFailure::Stack { .. })), "{evaluation:?}");
    assert!(deny_reason(&evaluation).contains("exceeded its stack limit"));
    assert_still_serving(&engine);
}

#[test]
fn an_oversized_result_is_refused() {
    let engine = engine();
    let evaluation = run(&engine, OVERSIZE, FailMode::Closed);
    assert_eq!(evaluation.failure, Some(PolicyFailure::OversizedResult { size: 4 << 20, limit: 4096 }));
    let reason = deny_reason(&evaluation);
    assert!(reason.contains("over the result size limit of 4096 bytes"), "{reason}");
    assert!(reason.len() < 1024, "the oversized reason itself is not passed on");
    assert_still_serving(&engine);
}

#[test]
fn fail_open_scopes_allow_but_report_the_failure() {
    let engine = engine();
    let evaluation = run(&engine, SPIN, FailMode::Open);
    assert!(evaluation.decision.is_allow(), "{evaluation:?}");
    assert_eq!(evaluation.failure.as_ref().map(PolicyFailure::kind), Some("timeout"));
    assert_eq!(evaluation.decision.annotations.get("policy_failure").map(String::as_str), Some("timeout"));
}

#[test]
fn hostile_guests_in_parallel_do_not_disturb_each_other() {
    let engine = engine();
    std::thread::scope(|s| {
        let handles: Vec<_> = [SPIN, GROW, TRAP, RECURSE, OVERSIZE]
            .into_iter()
            .map(|guest| {
                let engine = &engine;
                s.spawn(move || run(engine, guest, FailMode::Closed).failure.map(|f| f.kind()))
            })
            .collect();
        let kinds: Vec<_> = handles.into_iter().map(|h| h.join().expect("no host panic")).collect();
        assert_eq!(kinds, [Some("timeout"), Some("memory"), Some("trap"), Some("stack"), Some("oversized_result")]);
    });
    assert_still_serving(&engine);
}

#[test]
fn python_and_javascript_guests_are_stopped_at_their_deadline_and_memory_cap() {
    use aq_tests::guests::HOSTILE_SCRIPTS;
    use aq_tests::{shared_engine, shared_module};
    // Room for an interpreter: a scope's memory limit sized for its policy, not every scope's.
    let limits = Limits { timeout: Duration::from_millis(200), memory_bytes: 96 << 20, max_result_bytes: 4096 };
    let engine = shared_engine();
    let languages: Vec<&str> = HOSTILE_SCRIPTS.iter().map(|(language, _)| *language).collect();
    assert_eq!(languages, ["python", "js"]);
    for (language, path) in HOSTILE_SCRIPTS {
        for (mode, expected) in [
            ("allow", None),
            ("spin", Some(PolicyFailure::Timeout { limit: limits.timeout })),
            ("grow", Some(PolicyFailure::Memory { limit: limits.memory_bytes })),
        ] {
            let binding = engine
                .bind("hostile", shared_module(path), &format!("{mode:?}"), limits, FailMode::Closed)
                .unwrap_or_else(|e| panic!("{language} binds: {e}"));
            let ctx = put_context("/k", "v");
            let evaluation = engine.evaluate(&binding, EvalRequest { context: &ctx, seed: [5; 32], reader: None });
            assert_eq!(evaluation.failure, expected, "{language} {mode}: {evaluation:?}");
            assert!(evaluation.elapsed < limits.timeout * 3, "{language} {mode} stopped late: {:?}", evaluation.elapsed);
            if expected.is_some() {
                assert!(deny_reason(&evaluation).contains(&evaluation.digest.short()), "{language} {mode}");
            } else {
                assert!(evaluation.decision.is_allow(), "{language}: {evaluation:?}");
            }
        }
    }
    assert_still_serving(engine);
}

#[test]
fn a_component_too_large_for_its_scope_is_refused_at_bind_naming_the_size_it_needs() {
    use aq_host::engine::BindError;
    use aq_tests::guests::NAMESPACES;
    let (_, python) = NAMESPACES.iter().find(|(language, _)| *language == "python").unwrap();
    let small = Limits { memory_bytes: 4 << 20, ..Limits::default() };
    let engine = aq_tests::shared_engine();
    let refused = engine.bind("tiny", aq_tests::shared_module(python), "{}", small, FailMode::Closed).unwrap_err();
    let BindError::TooLarge { needed, limit, .. } = &refused else { panic!("{refused:?}") };
    assert_eq!(*limit, 4 << 20);
    assert!(*needed > *limit, "{refused}");
    let message = refused.to_string();
    let mib = needed.div_ceil(1 << 20);
    assert!(message.contains(&format!("bind it with a memory limit of at least {mib} MiB")), "{message}");
    // With that much it binds.
    let enough = Limits { memory_bytes: mib << 20, ..Limits::default() };
    engine.bind("tiny", aq_tests::shared_module(python), "{}", enough, FailMode::Closed).unwrap_or_else(|e| panic!("{e}"));
}
