//! Instances made ready before their request arrives.
//!
//! Creating a store, instantiating a component, running `init` and tearing the instance down
//! afterwards cost most of an evaluation; only `evaluate` depends on the request. So each
//! binding keeps a few instances that have already been instantiated and `init`ed. An evaluation
//! takes one, sets the request's clock, randomness and reader in its store, arms its deadline,
//! calls `evaluate` once, and sets the store aside to be dropped. No instance ever serves two
//! requests, so no state of one request can reach another: the sandbox contract of a fresh
//! instance per call holds, with the instantiation done ahead of time.
//!
//! Who makes them ([`Refill`]): a background thread (`aq-warm`), woken when a pool runs down to
//! half so that one wake-up serves several requests; or the caller, through
//! [`super::Engine::replenish`], which the gateway runs in a task of its own on the same worker
//! thread, after the request has gone on to etcd. The second keeps the instance on the core that
//! will run it (an instance made on another core costs its request about 2 µs more in cache
//! misses) and adds no thread hand-offs, so a saturated gateway spends no more CPU than one that
//! instantiates on every request.
//!
//! When no ready instance is left (a burst, a binding not used before), the evaluation
//! instantiates one itself, as before. Ready instances occupy slots of the engine's instance
//! pool, so they are capped per binding and in total.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
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

/// Who makes ready instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refill {
    /// The engine's own thread.
    Background,
    /// The caller, by calling [`super::Engine::replenish`] when
    /// [`super::Engine::needs_replenish`] says so.
    Caller,
}

/// A binding's ready instances, and its used stores not yet dropped.
pub(super) struct WarmPool {
    ready: Mutex<Vec<Ready>>,
    retired: Mutex<Vec<Store<HostState>>>,
    /// Ready instances over every pool of the engine.
    total: Arc<AtomicUsize>,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool").field("ready", &self.len()).finish()
    }
}

impl WarmPool {
    /// A ready instance, if one is left.
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

    /// Sets a used store aside for [`Warmer::replenish`] to drop.
    pub(super) fn retire(&self, store: Store<HostState>) {
        self.retired.lock().expect("warm pool lock").push(store);
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        let left = self.ready.get_mut().map(|r| r.len()).unwrap_or_default();
        self.total.fetch_sub(left, Ordering::Relaxed);
    }
}

/// Work for the background thread: drop a used store (resetting its slot) off the request's
/// thread, then top a pool up to the per-binding cap with instances made from its recipe.
struct Job {
    retired: Option<Box<Store<HostState>>>,
    refill: Option<(Weak<WarmPool>, Recipe)>,
}

/// Caps on ready instances.
#[derive(Clone, Copy, Debug)]
pub(super) struct WarmCaps {
    pub(super) per_binding: usize,
    pub(super) total: usize,
}

/// Jobs waiting for the thread, which sleeps while there are none.
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// The thread is waiting on the condition variable.
    sleeping: bool,
    /// The engine is gone: the thread ends.
    closed: bool,
}

/// Jobs queued before the thread is woken even though no pool runs low: bounds the used
/// stores (each holding a slot of the instance pool) waiting to be dropped.
const WAKE_AT_JOBS: usize = 16;

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// Makes ready instances, on its thread or when the caller asks.
pub(super) struct Warmer {
    engine: wasmtime::Engine,
    epoch_tick: Duration,
    /// The background thread's queue; `None` when the caller refills.
    shared: Option<Arc<Shared>>,
    total: Arc<AtomicUsize>,
    /// Used stores queued for the background thread to drop: they hold slots of the instance
    /// pool as long as ready ones do, so they count against the total cap.
    retiring: Arc<AtomicUsize>,
    caps: WarmCaps,
}

impl Warmer {
    /// A warmer; with [`Refill::Background`] its thread ends when the engine (owning the
    /// warmer) drops.
    pub(super) fn start(engine: wasmtime::Engine, epoch_tick: Duration, caps: WarmCaps, refill: Refill) -> std::io::Result<Self> {
        let total = Arc::new(AtomicUsize::new(0));
        let retiring = Arc::new(AtomicUsize::new(0));
        let mut warmer = Warmer { engine, epoch_tick, shared: None, total, retiring, caps };
        if refill == Refill::Background && caps.per_binding > 0 {
            let shared = Arc::new(Shared { queue: Mutex::default(), wake: Condvar::new() });
            let (queue, maker) = (shared.clone(), warmer.maker());
            std::thread::Builder::new().name("aq-warm".into()).spawn(move || {
                loop {
                    let jobs = {
                        let mut waiting = queue.queue.lock().expect("warm queue lock");
                        while waiting.jobs.is_empty() && !waiting.closed {
                            waiting.sleeping = true;
                            waiting = queue.wake.wait(waiting).expect("warm queue lock");
                        }
                        if waiting.closed {
                            return;
                        }
                        std::mem::take(&mut waiting.jobs)
                    };
                    // One top-up per pool: a pass that topped a busy pool up once per queued
                    // job would make instances faster than the stores they replace are dropped.
                    let mut refills: Vec<(Weak<WarmPool>, Recipe)> = Vec::new();
                    for Job { retired, refill } in jobs {
                        if retired.is_some() {
                            drop(retired);
                            maker.retiring.fetch_sub(1, Ordering::Relaxed);
                        }
                        if let Some((weak, recipe)) = refill
                            && !refills.iter().any(|(seen, _)| seen.ptr_eq(&weak))
                        {
                            refills.push((weak, recipe));
                        }
                    }
                    for (weak, recipe) in refills {
                        if let Some(pool) = weak.upgrade() {
                            maker.top_up(&pool, &recipe);
                        }
                    }
                }
            })?;
            warmer.shared = Some(shared);
        }
        Ok(warmer)
    }

    /// What the background thread needs to make instances.
    fn maker(&self) -> Maker {
        Maker {
            engine: self.engine.clone(),
            epoch_tick: self.epoch_tick,
            total: self.total.clone(),
            retiring: self.retiring.clone(),
            caps: self.caps,
        }
    }

    /// An empty pool for a new binding.
    pub(super) fn pool(&self) -> Arc<WarmPool> {
        Arc::new(WarmPool { ready: Mutex::new(Vec::new()), retired: Mutex::new(Vec::new()), total: self.total.clone() })
    }

    /// Whether the caller refills and `pool` wants it: half its instances or fewer ready, or
    /// as many used stores waiting to be dropped.
    pub(super) fn needs_replenish(&self, pool: &WarmPool) -> bool {
        if self.shared.is_some() || self.caps.per_binding == 0 {
            return false;
        }
        let half = self.caps.per_binding / 2;
        pool.len() <= half || pool.retired.lock().expect("warm pool lock").len() >= half.max(1)
    }

    /// Drops `pool`'s used stores and tops it up, on the caller's thread.
    pub(super) fn replenish(&self, pool: &WarmPool, recipe: &Recipe) {
        drop(std::mem::take(&mut *pool.retired.lock().expect("warm pool lock")));
        self.maker().top_up(pool, recipe);
    }

    /// After an evaluation: sets `used` (its store, if it came ready) aside and, on the
    /// background thread, queues it to be dropped and `pool` to be topped up. The thread is
    /// woken only when `pool` has half its instances or fewer left, or many jobs wait: a
    /// wake-up costs both threads a system call, so a steady stream of requests shares each one.
    pub(super) fn after(&self, pool: &Arc<WarmPool>, recipe: impl FnOnce() -> Recipe, used: Option<Store<HostState>>) {
        let Some(shared) = &self.shared else {
            if let Some(store) = used {
                pool.retire(store);
            }
            return;
        };
        let low = pool.len() <= self.caps.per_binding / 2;
        if used.is_some() {
            self.retiring.fetch_add(1, Ordering::Relaxed);
        }
        let mut queue = shared.queue.lock().expect("warm queue lock");
        queue.jobs.push(Job { retired: used.map(Box::new), refill: Some((Arc::downgrade(pool), recipe())) });
        if queue.sleeping && (low || queue.jobs.len() >= WAKE_AT_JOBS) {
            queue.sleeping = false;
            drop(queue);
            shared.wake.notify_one();
        }
    }
}

impl Drop for Warmer {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.queue.lock().expect("warm queue lock").closed = true;
            shared.wake.notify_one();
        }
    }
}

/// Makes instances for pools, within the caps.
struct Maker {
    engine: wasmtime::Engine,
    epoch_tick: Duration,
    total: Arc<AtomicUsize>,
    retiring: Arc<AtomicUsize>,
    caps: WarmCaps,
}

impl Maker {
    /// Fills `pool` up to the per-binding cap while ready instances and used stores waiting to
    /// be dropped stay under the total cap, so evaluations that instantiate on their request
    /// always find free slots in the instance pool.
    fn top_up(&self, pool: &WarmPool, recipe: &Recipe) {
        let occupied = || self.total.load(Ordering::Relaxed) + self.retiring.load(Ordering::Relaxed);
        while pool.len() < self.caps.per_binding && occupied() < self.caps.total {
            // A binding whose init fails here is served cold, where the failure is reported
            // with the request it fails.
            let Some(ready) = super::prepare(&self.engine, self.epoch_tick, recipe) else { break };
            pool.put(ready);
        }
    }
}
