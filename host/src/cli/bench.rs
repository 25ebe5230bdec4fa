//! `aq bench policy`: evaluation latency of each built-in policy, in an instance made ready
//! ahead of the request and in one instantiated on it, and the cost of instantiation alone.

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

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1 << 20))
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// A policy to measure: its name, component and configuration.
struct Measured {
    name: String,
    component: Vec<u8>,
    config: String,
}

/// The built-ins, then each `NAME=PATH` of `components` bound with `config`.
fn measured(components: &[String], config: Option<&std::path::Path>) -> Result<Vec<Measured>, CliError> {
    let mut all: Vec<Measured> = crate::builtin::BUILTINS
        .iter()
        .map(|b| Measured { name: b.name.to_string(), component: b.component.to_vec(), config: b.example_config.to_string() })
        .collect();
    let config = match config {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::Input(format!("cannot read --component-config {}: {e}", path.display())))?,
        None => "{}".to_string(),
    };
    for given in components {
        let Some((name, path)) = given.split_once('=') else {
            return Err(CliError::Input(format!("--component {given}: give NAME=PATH, e.g. python=policy.wasm")));
        };
        let component = std::fs::read(path).map_err(|e| CliError::Input(format!("cannot read component {path}: {e}")))?;
        all.push(Measured { name: name.to_string(), component, config: config.clone() });
    }
    Ok(all)
}

pub(super) fn policy(iterations: u32, components: &[String], component_config: Option<&std::path::Path>) -> Result<(), CliError> {
    if iterations == 0 {
        return Err(CliError::Input("--iterations must be at least 1".into()));
    }
    let policies = measured(components, component_config)?;
    // As `aq serve` runs it: the caller makes ready instances between requests.
    let ready = Engine::new(EngineConfig { refill: crate::engine::Refill::Caller, ..EngineConfig::default() })
        .map_err(|e| CliError::Input(e.to_string()))?;
    let cold = Engine::new(EngineConfig { warm_per_binding: 0, ..EngineConfig::default() })
        .map_err(|e| CliError::Input(e.to_string()))?;
    let ctx = sample_context();
    println!("{iterations} evaluations per policy and kind, on one thread; each instance serves one evaluation");
    println!("ready: the instance was instantiated and init'ed ahead of the request, between requests on the");
    println!("same thread (as `aq serve` does while a write is at etcd); cold: instantiated on the request");
    println!("memory: the instance's linear memory once instantiated (its largest memory)");
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>16} {:>9} {:>9}",
        "policy", "ready p50", "ready p99", "ready mean", "cold p50", "cold p99", "cold mean", "instantiate p50", "memory", "size"
    );
    for policy in &policies {
        let mut memory = 0;
        // On a terminal, a bar of this policy's evaluations (ready, then cold).
        let bar = super::progress_bar(
            2 * u64::from(iterations + 1000.min(iterations)),
            "{msg:18} [{bar:30}] {pos}/{len} evaluations, {per_sec}",
        );
        if let Some(bar) = &bar {
            bar.set_message(policy.name.clone());
        }
        let mut run = |engine: &Engine, wait_ready: bool| -> Result<(Vec<Duration>, Vec<Duration>), CliError> {
            let module = engine.load(&policy.component).map_err(|e| CliError::Input(format!("{}: {e}", policy.name)))?;
            let binding = engine
                .bind("bench", module, &policy.config, Limits::default(), FailMode::Closed)
                .map_err(|e| CliError::Input(format!("{}: {e}", policy.name)))?;
            memory = engine.memory_at_start(&binding).unwrap_or(0);
            let mut evals = Vec::with_capacity(iterations as usize);
            let mut instantiations = Vec::new();
            let warmup = 1000.min(iterations);
            for i in 0..warmup + iterations {
                if wait_ready {
                    // Between requests, as the gateway does while a write is at etcd.
                    if engine.needs_replenish(&binding) {
                        engine.replenish(&binding);
                    }
                    if binding.ready_instances() == 0 {
                        return Err(CliError::Input(format!("{} made no ready instance", policy.name)));
                    }
                }
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&i.to_le_bytes());
                let started = Instant::now();
                let evaluation = engine.evaluate(&binding, EvalRequest { context: &ctx, seed, reader: None });
                let took = started.elapsed();
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
                if let Some(failure) = evaluation.failure {
                    return Err(CliError::Input(format!("{} failed during the benchmark: {failure}", policy.name)));
                }
                if i >= warmup {
                    evals.push(took);
                    if !wait_ready {
                        instantiations.push(engine.instantiate_only(&binding).map_err(|f| CliError::Input(f.to_string()))?);
                    }
                }
            }
            evals.sort();
            instantiations.sort();
            Ok((evals, instantiations))
        };
        let (warm, _) = run(&ready, true)?;
        let (fresh, instantiations) = run(&cold, false)?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let mean = |d: &[Duration]| d.iter().sum::<Duration>() / d.len() as u32;
        println!(
            "{:<18} {:>7} µs {:>7} µs {:>7} µs {:>7} µs {:>7} µs {:>7} µs {:>13} µs {:>5} MiB {:>5} MiB",
            policy.name,
            micros(percentile(&warm, 0.5)),
            micros(percentile(&warm, 0.99)),
            micros(mean(&warm)),
            micros(percentile(&fresh, 0.5)),
            micros(percentile(&fresh, 0.99)),
            micros(mean(&fresh)),
            micros(percentile(&instantiations, 0.5)),
            mib(memory),
            mib(policy.component.len()),
        );
    }
    Ok(())
}
