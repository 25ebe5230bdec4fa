//! `aq bench policy`: evaluation latency of each built-in policy with a fresh instance per
//! call, and the cost of instantiation alone.

use std::time::{Duration, Instant};

use aq_sdk::{Context, Credential, Op, PutOp, ScopeInfo, Timestamp};

use super::CliError;
use crate::engine::{Engine, EngineConfig, EvalRequest, FailMode, Limits};

/// A representative write: one put of a 256-byte value, signed by a principal with a role.
fn sample_context() -> Context {
    Context {
        scope: ScopeInfo { id: "bench".into(), key_start: "/registry/".into(), ..Default::default() },
        ops: vec![Op::Put(PutOp {
            key: "/registry/configmaps/team-a/settings".into(),
            value: vec![b'x'; 256].into(),
            lease: 7587,
            ..Default::default()
        })],
        credentials: vec![Credential { principal: "alice".into(), roles: vec!["secret-writer".into()] }],
        request_time: Timestamp { seconds: 1_790_000_000, nanoseconds: 0 },
        ..Default::default()
    }
}

/// The `p` quantile (0.0 to 1.0) of sorted durations.
pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

pub(super) fn policy(iterations: u32) -> Result<(), CliError> {
    if iterations == 0 {
        return Err(CliError::Input("--iterations must be at least 1".into()));
    }
    let engine = Engine::new(EngineConfig::default()).map_err(|e| CliError::Input(e.to_string()))?;
    let ctx = sample_context();
    println!("{iterations} evaluations per policy, one fresh instance each, on one thread");
    println!("{:<10} {:>10} {:>10} {:>10} {:>16} {:>16}", "policy", "eval p50", "eval p99", "eval mean", "instantiate p50", "instantiate p99");
    for builtin in crate::builtin::BUILTINS {
        let module = engine.load(builtin.component).map_err(|e| CliError::Input(e.to_string()))?;
        let binding = engine
            .bind("bench", module, builtin.example_config, Limits::default(), FailMode::Closed)
            .map_err(|e| CliError::Input(e.to_string()))?;
        let mut evals = Vec::with_capacity(iterations as usize);
        let mut instantiations = Vec::with_capacity(iterations as usize);
        // Warm up caches and the allocator's slots.
        for _ in 0..1000.min(iterations) {
            engine.evaluate(&binding, EvalRequest { context: &ctx, seed: [7; 32], reader: None });
        }
        for i in 0..iterations {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            let started = Instant::now();
            let evaluation = engine.evaluate(&binding, EvalRequest { context: &ctx, seed, reader: None });
            evals.push(started.elapsed());
            if let Some(failure) = evaluation.failure {
                return Err(CliError::Input(format!("{} failed during the benchmark: {failure}", builtin.name)));
            }
            instantiations.push(engine.instantiate_only(&binding).map_err(|f| CliError::Input(f.to_string()))?);
        }
        evals.sort();
        instantiations.sort();
        let mean = evals.iter().sum::<Duration>() / iterations;
        println!(
            "{:<10} {:>8} µs {:>8} µs {:>8} µs {:>13} µs {:>13} µs",
            builtin.name,
            micros(percentile(&evals, 0.5)),
            micros(percentile(&evals, 0.99)),
            micros(mean),
            micros(percentile(&instantiations, 0.5)),
            micros(percentile(&instantiations, 0.99)),
        );
    }
    Ok(())
}
