//! Instances made ready before their request arrives.
//!
//! Creating a store, instantiating a component, running `init` and tearing the instance down
//! afterwards cost about four fifths of an evaluation; only `evaluate` depends on the request.
//! So each binding keeps a few instances that have already been instantiated and `init`ed, made
//! by one background thread (`aq-warm`), which also drops every used store. An evaluation takes
//! one, sets the request's clock, randomness and reader in its store, arms its deadline, calls
//! `evaluate` once, and hands the store back to be dropped. No instance ever serves two
//! requests, so no state of one request can reach another: the sandbox contract of a fresh
//! instance per call holds, with the instantiation done ahead of time.
//!
//! When no ready instance is left (a burst, a binding not used before), the evaluation
//! instantiates one itself, as before, and asks for refills. Ready instances occupy slots of the
//! engine's instance pool, so they are capped per binding and in total.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use wasmtime::Store;

use super::generated::Governance;
use super::sandbox::HostState;
use super::{Limits, PolicyModule};

/// An instance past `init`, not yet used.
pub(super) struct Ready {
    pub(super) store: Store<HostState>,
    pub(super) policy: Governance,
}

/// What a binding's instances are made from.
#[derive(Clone)]
pub(super) struct Recipe {
    pub(super) module: Arc<PolicyModule>,
    pub(super) config: Arc<str>,
    pub(super) limits: Limits,
    pub(super) scope: Arc<str>,
}

/// A binding's ready instances.
pub(super) struct WarmPool {
    ready: Mutex<Vec<Ready>>,
    /// Ready instances over every pool of the engine.
    total: Arc<AtomicUsize>,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool").field("ready", &self.len()).finish()
    }
}

impl WarmPool {
    /// A binding's ready instances.
    pub(super) fn take(&self) -> Option<Ready> {
        let ready = self.ready.lock().expect("warm pool lock").pop();
        if ready.is_some() {
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
        ready
    }

    /// How many are ready.
    pub(super) fn len(&self) -> usize {
        self.ready.lock().expect("warm pool lock").len()
    }

    fn put(&self, ready: Ready) {
        self.ready.lock().expect("warm pool lock").push(ready);
        self.total.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        let left = self.ready.get_mut().map(|r| r.len()).unwrap_or_default();
        self.total.fetch_sub(left, Ordering::Relaxed);
    }
}

/// Work for the background thread.
enum Job {
    /// Top `pool` up to the per-binding cap with instances made from the recipe.
    Refill(Weak<WarmPool>, Recipe),
    /// Drop a used store (resetting its slot) off the request's thread.
    Retire(Box<Store<HostState>>),
}

/// Caps on ready instances.
#[derive(Clone, Copy, Debug)]
pub(super) struct WarmCaps {
    pub(super) per_binding: usize,
    pub(super) total: usize,
}

/// The handle evaluations use to ask the background thread for work.
pub(super) struct Warmer {
    jobs: mpsc::Sender<Job>,
    total: Arc<AtomicUsize>,
    caps: WarmCaps,
}

impl Warmer {
    /// Starts the background thread; it ends when the engine (holding the only sender) drops.
    pub(super) fn start(engine: wasmtime::Engine, epoch_tick: Duration, caps: WarmCaps) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let total = Arc::new(AtomicUsize::new(0));
        let counted = total.clone();
        std::thread::Builder::new().name("aq-warm".into()).spawn(move || {
            while let Ok(job) = queue.recv() {
                match job {
                    Job::Retire(store) => drop(store),
                    Job::Refill(weak, recipe) => {
                        while let Some(pool) = weak.upgrade()
                            && pool.len() < caps.per_binding
                            && counted.load(Ordering::Relaxed) < caps.total
                        {
                            // A binding whose init fails here is served cold, where the failure
                            // is reported with the request it fails.
                            let Some(ready) = super::prepare(&engine, epoch_tick, &recipe) else { break };
                            pool.put(ready);
                        }
                    }
                }
            }
        })?;
        Ok(Warmer { jobs, total, caps })
    }

    /// An empty pool for a new binding.
    pub(super) fn pool(&self) -> Arc<WarmPool> {
        Arc::new(WarmPool { ready: Mutex::new(Vec::new()), total: self.total.clone() })
    }

    /// Whether bindings keep ready instances at all.
    pub(super) fn enabled(&self) -> bool {
        self.caps.per_binding > 0
    }

    /// Asks for `pool` to be topped up from `recipe`.
    pub(super) fn refill(&self, pool: &Arc<WarmPool>, recipe: Recipe) {
        if self.enabled() {
            self.send(Job::Refill(Arc::downgrade(pool), recipe));
        }
    }

    /// Hands a used store to the background thread to drop.
    pub(super) fn retire(&self, store: Store<HostState>) {
        self.send(Job::Retire(Box::new(store)));
    }

    fn send(&self, job: Job) {
        // The thread ends only with the engine, which owns this sender.
        let _ = self.jobs.send(job);
    }
}
