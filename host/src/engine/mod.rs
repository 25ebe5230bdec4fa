//! The policy engine: loads WebAssembly components, checks them against the
//! `aq:governance/governance` world, precompiles them once per digest, and evaluates each call in
//! a fresh sandboxed instance under a CPU deadline and a memory cap.
//!
//! The engine knows nothing of etcd: it takes an [`aq_sdk::Context`] and returns an
//! [`aq_sdk::Decision`]. A policy that traps, runs out of time or memory, or returns something
//! malformed never fails the host: the evaluation becomes a deny naming the policy digest and the
//! limit hit (fail-closed) or an allow (fail-open), with the failure reported beside it.

mod cache;
mod convert;
mod generated;
mod registry;
mod sandbox;
mod warm;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aq_sdk::{Advice, ConfigError, Context, Decision, ScopeStats};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Store, Trap};

use generated::{Governance, GovernancePre};
pub use generated::{POLICY_FUNCTIONS, POLICY_INTERFACE, POLICY_INTERFACE_0_1, WORLD};
pub use registry::{Registry, RegistryError, ScopeSlot};
use sandbox::{HostState, ReadScope, SandboxSetup};
pub use sandbox::{ObservedRead, ScopeReader};
pub use warm::Refill;

/// The blake3 digest of a component's bytes: a policy's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyDigest(pub [u8; 32]);

impl PolicyDigest {
    /// Digest of component bytes.
    pub fn of(bytes: &[u8]) -> Self {
        PolicyDigest(*blake3::hash(bytes).as_bytes())
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

impl fmt::Debug for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.short())
    }
}

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Where precompiled policies are cached; `None` compiles in memory every time.
    pub cache_dir: Option<PathBuf>,
    /// Most evaluations running at once (the size of the instance pool).
    pub max_concurrent: u32,
    /// The largest memory cap any scope may set, in bytes.
    pub memory_ceiling: usize,
    /// Wasm stack per evaluation, in bytes; deeper recursion is a stack-overflow failure.
    pub stack_bytes: usize,
    /// Granularity of CPU deadlines.
    pub epoch_tick: Duration,
    /// Instances each binding keeps instantiated and past `init`, ready for a request
    /// (`warm.rs`); 0 instantiates every evaluation on its request. Together they hold at most
    /// half of the instance pool.
    pub warm_per_binding: usize,
    /// Who makes the ready instances.
    pub refill: Refill,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cache_dir: None,
            max_concurrent: 128,
            memory_ceiling: 256 << 20,
            stack_bytes: 512 << 10,
            epoch_tick: Duration::from_millis(1),
            warm_per_binding: 4,
            refill: Refill::Background,
        }
    }
}

/// The WASI interface whose one function the engine answers itself (see
/// `HostState::insecure_seed`); the version wasmtime-wasi links.
const INSECURE_SEED_INTERFACE: &str = "wasi:random/insecure-seed@0.2.12";

/// Most core instances, memories and tables one component may hold (see `Engine::new`).
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 32;

/// Linear memory kept mapped per pool slot between evaluations: a Rust policy touches about
/// 1 MiB, an interpreter (Python, JavaScript) up to about 12 MiB. Only what an instance's memory
/// spans is reset, and with PAGEMAP_SCAN only its dirtied pages.
const RESIDENT_MEMORY_BYTES: usize = 16 << 20;
/// Table memory kept mapped per pool slot.
const RESIDENT_TABLE_BYTES: usize = 64 << 10;

/// Per-scope limits of one binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// CPU deadline of one call: `evaluate`, plus instantiation and `init` when no instance
    /// was made ready ahead of the request.
    pub timeout: Duration,
    /// Linear memory cap, in bytes.
    pub memory_bytes: usize,
    /// Largest decision, counted as bytes of reason, annotations and voter names.
    pub max_result_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { timeout: Duration::from_millis(50), memory_bytes: 32 << 20, max_result_bytes: 64 << 10 }
    }
}

/// What a scope does when its policy fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Deny (the default).
    #[default]
    Closed,
    /// Allow, for scopes where availability beats governance (events, leases).
    Open,
}

/// A loaded, validated, compiled policy component.
pub struct PolicyModule {
    digest: PolicyDigest,
    size: usize,
    pre: GovernancePre<HostState>,
    exports: Vec<String>,
    imports: Vec<String>,
}

impl PolicyModule {
    /// Content digest.
    pub fn digest(&self) -> PolicyDigest {
        self.digest
    }
    /// Size of the component in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
    /// Names of the component's exports.
    pub fn exports(&self) -> &[String] {
        &self.exports
    }
    /// Names of the component's imports.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }
}

impl fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyModule").field("digest", &self.digest).field("size", &self.size).finish()
    }
}

/// A policy bound to a scope: module, configuration, limits, fail mode. Immutable; a swap
/// replaces the whole binding.
#[derive(Debug)]
pub struct Binding {
    /// The policy.
    pub module: Arc<PolicyModule>,
    /// The configuration passed to `init`.
    pub config: Arc<str>,
    /// Limits for each call.
    pub limits: Limits,
    /// Behaviour on policy failure.
    pub fail_mode: FailMode,
    /// Scope name used in log lines.
    pub scope: Arc<str>,
    /// Instances made ready for this binding's next requests.
    warm: Arc<warm::WarmPool>,
}

impl Binding {
    fn recipe(&self) -> warm::Recipe {
        warm::Recipe {
            module: self.module.clone(),
            config: self.config.clone(),
            limits: self.limits,
            scope: self.scope.clone(),
        }
    }

    /// How many instances are ready for this binding's next requests.
    pub fn ready_instances(&self) -> usize {
        self.warm.len()
    }
}

/// Why component bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not WebAssembly at all.
    #[error("not a WebAssembly component: the file does not start with the wasm magic bytes; build the policy for wasm32-wasip2")]
    NotWasm,
    /// A core module rather than a component.
    #[error("a core WebAssembly module, not a component: build the policy for wasm32-wasip2 (or wrap it with `wasm-tools component new`)")]
    CoreModule,
    /// Malformed or unsupported component.
    #[error("invalid WebAssembly component: {0}")]
    Invalid(String),
    /// A valid component of another world.
    #[error("component does not fit world {WORLD}: {0}")]
    WorldMismatch(String),
}

/// Why a binding was refused.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The policy's `init` refused the configuration.
    #[error("policy {digest:?} refused its configuration: {error}")]
    Config {
        /// The policy.
        digest: PolicyDigest,
        /// What it said.
        error: ConfigError,
    },
    /// The policy failed while checking the configuration.
    #[error("policy {digest:?} failed while checking its configuration: {failure}")]
    Failed {
        /// The policy.
        digest: PolicyDigest,
        /// How it failed.
        failure: PolicyFailure,
    },
    /// The component needs more memory than the scope's limit as soon as it starts.
    #[error(
        "policy {digest:?} needs {} MiB of linear memory as soon as it starts, over the scope's memory limit of {} MiB; \
         bind it with a memory limit of at least {} MiB (memory_mib; the engine allows up to {} MiB)",
        needed.div_ceil(1 << 20), limit >> 20, needed.div_ceil(1 << 20), ceiling >> 20
    )]
    TooLarge {
        /// The policy.
        digest: PolicyDigest,
        /// Bytes its memory takes at instantiation.
        needed: usize,
        /// The scope's limit in bytes.
        limit: usize,
        /// The engine's ceiling in bytes.
        ceiling: usize,
    },
    /// The limits exceed what the engine allows.
    #[error("memory limit of {requested} bytes exceeds the engine's ceiling of {ceiling} bytes")]
    Limits {
        /// Asked for.
        requested: usize,
        /// Allowed.
        ceiling: usize,
    },
}

/// How a policy call failed. Never the host's crash: always turned into a decision.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyFailure {
    /// The CPU deadline passed.
    #[error("exceeded its CPU deadline of {}", fmt_duration(*limit))]
    Timeout {
        /// The deadline.
        limit: Duration,
    },
    /// The memory cap was hit.
    #[error("exceeded its memory limit of {limit} bytes")]
    Memory {
        /// The cap.
        limit: usize,
    },
    /// Recursion too deep for the wasm stack.
    #[error("exceeded its stack limit of {limit} bytes")]
    Stack {
        /// The stack size.
        limit: usize,
    },
    /// Any other trap: `unreachable`, a panic, an out-of-bounds access.
    #[error("trapped: {detail}")]
    Trap {
        /// The trap and what the policy printed to standard error.
        detail: String,
    },
    /// The decision was larger than allowed.
    #[error("returned a result of {size} bytes, over the result size limit of {limit} bytes")]
    OversizedResult {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The decision makes no sense (an unmeetable approval rule, a config refused at run time).
    #[error("returned a malformed result: {detail}")]
    MalformedResult {
        /// What is wrong.
        detail: String,
    },
    /// No instance slot was free: the engine is overloaded, not the policy broken.
    #[error("could not start: {detail}")]
    Capacity {
        /// What ran out.
        detail: String,
    },
}

impl PolicyFailure {
    /// A short, stable name, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyFailure::Timeout { .. } => "timeout",
            PolicyFailure::Memory { .. } => "memory",
            PolicyFailure::Stack { .. } => "stack",
            PolicyFailure::Trap { .. } => "trap",
            PolicyFailure::OversizedResult { .. } => "oversized_result",
            PolicyFailure::MalformedResult { .. } => "malformed_result",
            PolicyFailure::Capacity { .. } => "capacity",
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.as_millis() > 0 { format!("{} ms", d.as_millis()) } else { format!("{} µs", d.as_micros()) }
}

/// One evaluation request.
pub struct EvalRequest<'a> {
    /// What the policy sees.
    pub context: &'a Context,
    /// Digest of the request, seeding the policy's randomness; replicas must pass the same.
    pub seed: [u8; 32],
    /// Same-scope reads, if the caller offers them.
    pub reader: Option<Arc<dyn ScopeReader>>,
}

/// The outcome of an evaluation.
#[derive(Debug)]
pub struct Evaluation {
    /// The decision to enforce: the policy's, or the fail mode's when it failed.
    pub decision: Decision,
    /// The version that decided.
    pub digest: PolicyDigest,
    /// How the policy failed, if it did.
    pub failure: Option<PolicyFailure>,
    /// Reads the policy made; the write must be guarded on them.
    pub observed_reads: Vec<ObservedRead>,
    /// Wall time of the whole call.
    pub elapsed: Duration,
    /// Whether the instance was made ready ahead of the request (`false`: instantiated on it).
    pub prepared: bool,
}

/// Errors creating an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime refused the configuration.
    #[error("cannot configure the wasm engine: {0}")]
    Config(String),
    /// The compile cache directory is unusable.
    #[error("cannot use the policy cache directory {path}: {error}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// The policy engine. Cheap to share behind an `Arc`; evaluations run on the caller's thread.
pub struct Engine {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    cache: Option<cache::CompileCache>,
    config: EngineConfig,
    warmer: warm::Warmer,
}

impl Engine {
    /// An engine with the pooling allocator, epoch deadlines and WASI linked with nothing
    /// granted.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        // Per-component counts admit the largest guests aq knows: a Python component
        // (componentize-py) holds 14 core instances, several memories and tables; a Rust one
        // 2 or 3. The totals bound what live evaluations hold together; a slot costs address
        // space, not memory, until a guest touches it.
        pool.total_component_instances(config.max_concurrent)
            .total_core_instances(config.max_concurrent * CORE_INSTANCES_PER_COMPONENT)
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .total_memories(config.max_concurrent * MEMORIES_PER_COMPONENT)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_tables(config.max_concurrent * TABLES_PER_COMPONENT)
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .max_memory_size(config.memory_ceiling)
            .total_stacks(0)
            // Reset a finished instance's memory by rewriting only its dirty pages (PAGEMAP_SCAN,
            // Linux 6.7+; plain memset of the low pages otherwise) instead of madvise: no page
            // faults and no TLB shootdowns on the next evaluation in the slot.
            .linear_memory_keep_resident(RESIDENT_MEMORY_BYTES)
            .table_keep_resident(RESIDENT_TABLE_BYTES)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut wasm = wasmtime::Config::new();
        wasm.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .max_wasm_stack(config.stack_bytes)
            .memory_reservation(config.memory_ceiling as u64)
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            .wasm_component_model(true);
        let engine = wasmtime::Engine::new(&wasm).map_err(|e| EngineError::Config(format!("{e:#}")))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| EngineError::Config(format!("{e:#}")))?;
        linker.allow_shadowing(true);
        linker
            .instance(INSECURE_SEED_INTERFACE)
            .and_then(|mut seed| {
                seed.func_wrap("insecure-seed", |store: wasmtime::StoreContextMut<'_, HostState>, (): ()| {
                    Ok((store.data().insecure_seed(),))
                })
            })
            .map_err(|e| EngineError::Config(format!("{e:#}")))?;
        linker.allow_shadowing(false);
        Governance::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|e| EngineError::Config(format!("{e:#}")))?;

        let cache = match &config.cache_dir {
            Some(dir) => Some(
                cache::CompileCache::new(&engine, dir).map_err(|error| EngineError::Cache { path: dir.clone(), error })?,
            ),
            None => None,
        };
        spawn_epoch_ticker(&engine, config.epoch_tick)
            .map_err(|e| EngineError::Config(format!("cannot start the policy deadline thread: {e}")))?;
        let caps = warm::WarmCaps { per_binding: config.warm_per_binding, total: config.max_concurrent as usize / 2 };
        let warmer = warm::Warmer::start(engine.clone(), config.epoch_tick, caps, config.refill)
            .map_err(|e| EngineError::Config(format!("cannot start the policy instance thread: {e}")))?;
        Ok(Engine { engine, linker, cache, config, warmer })
    }

    /// Validates, content-addresses and compiles (or fetches from the cache) a component.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<PolicyModule>, LoadError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        // Bytes 4..8 are the version and layer: 1, 0 for core modules; 0x0d, 1 for components.
        if bytes[6..8] == [0, 0] {
            return Err(LoadError::CoreModule);
        }
        let digest = PolicyDigest::of(bytes);
        let cached = self.cache.as_ref().and_then(|c| c.load(&self.engine, &digest));
        let component = match cached {
            Some(component) => component,
            None => {
                let component =
                    Component::new(&self.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
                // Only components that fit the world are worth caching.
                self.check_world(&component)?;
                if let Some(cache) = &self.cache {
                    cache.store(&digest, &component);
                }
                component
            }
        };
        let (exports, imports) = self.check_world(&component)?;
        let instance_pre =
            self.linker.instantiate_pre(&component).map_err(|e| LoadError::WorldMismatch(format!("{e:#}")))?;
        let pre = GovernancePre::new(instance_pre).map_err(|e| LoadError::WorldMismatch(format!("{e:#}")))?;
        Ok(Arc::new(PolicyModule { digest, size: bytes.len(), pre, exports, imports }))
    }

    /// Checks the component's exports by name, so a mismatch names exactly what is missing.
    /// Types (and imports) are then checked by the linker.
    fn check_world(&self, component: &Component) -> Result<(Vec<String>, Vec<String>), LoadError> {
        let ty = component.component_type();
        let exports: Vec<String> = ty.exports(&self.engine).map(|(name, _)| name.to_string()).collect();
        let imports: Vec<String> = ty.imports(&self.engine).map(|(name, _)| name.to_string()).collect();
        let policy = ty
            .exports(&self.engine)
            .find(|(name, _)| name.strip_prefix(POLICY_INTERFACE_0_1).is_some_and(|patch| patch.parse::<u32>().is_ok()))
            .map(|(_, item)| item.ty);
        match policy {
            Some(ComponentItem::ComponentInstance(instance)) => {
                let missing: Vec<&str> = POLICY_FUNCTIONS
                    .iter()
                    .copied()
                    .filter(|f| !matches!(instance.get_export(&self.engine, f).map(|e| e.ty), Some(ComponentItem::ComponentFunc(_))))
                    .collect();
                if !missing.is_empty() {
                    return Err(LoadError::WorldMismatch(format!(
                        "export {POLICY_INTERFACE} lacks function(s) {}",
                        missing.join(", ")
                    )));
                }
            }
            Some(_) => {
                return Err(LoadError::WorldMismatch(format!("export {POLICY_INTERFACE} is not an interface instance")));
            }
            None => {
                let found = if exports.is_empty() { "none".to_string() } else { exports.join(", ") };
                return Err(LoadError::WorldMismatch(format!(
                    "missing export {POLICY_INTERFACE} (the component exports: {found})"
                )));
            }
        }
        Ok((exports, imports))
    }

    /// Binds a module to a scope after checking `config` with the policy's `init`.
    pub fn bind(
        &self,
        scope: &str,
        module: Arc<PolicyModule>,
        config: &str,
        limits: Limits,
        fail_mode: FailMode,
    ) -> Result<Arc<Binding>, BindError> {
        if limits.memory_bytes > self.config.memory_ceiling {
            return Err(BindError::Limits { requested: limits.memory_bytes, ceiling: self.config.memory_ceiling });
        }
        let binding = Binding {
            module,
            config: Arc::from(config),
            limits,
            fail_mode,
            scope: Arc::from(scope),
            warm: self.warmer.pool(),
        };
        let digest = binding.module.digest;
        let seed = init_seed(config);
        let outcome = self.call(&binding, Duration::ZERO, &seed, None, |_, _, _| Ok(()));
        match outcome {
            Ok(((), _)) => {
                self.warmer.after(&binding.warm, || binding.recipe(), None);
                Ok(Arc::new(binding))
            }
            Err(CallError::Config(error)) => Err(BindError::Config { digest, error }),
            Err(CallError::Failed(failure @ PolicyFailure::Memory { .. })) => {
                // A component whose memories are larger than the scope allows as soon as it is
                // instantiated can never run there: say how much it needs.
                match self.memory_at_start(&binding) {
                    Some(needed) if needed > limits.memory_bytes => {
                        Err(BindError::TooLarge { digest, needed, limit: limits.memory_bytes, ceiling: self.config.memory_ceiling })
                    }
                    _ => Err(BindError::Failed { digest, failure }),
                }
            }
            Err(CallError::Failed(failure)) => Err(BindError::Failed { digest, failure }),
        }
    }

    /// The linear memory the binding's module takes when instantiated (its largest memory's
    /// initial size), measured under the engine's ceiling; `None` if it does not instantiate.
    pub fn memory_at_start(&self, binding: &Binding) -> Option<usize> {
        let limits = Limits { memory_bytes: self.config.memory_ceiling, ..binding.limits };
        let mut store = new_store(&self.engine, self.config.epoch_tick, &limits, &binding.scope, Duration::ZERO, &[0; 32], None);
        binding.module.pre.instantiate(&mut store).ok()?;
        Some(store.data().limiter.memory_peak)
    }

    /// Evaluates a mutation request on a binding. Never fails: policy failures become the
    /// decision of the binding's fail mode, reported in [`Evaluation::failure`].
    pub fn evaluate(&self, binding: &Binding, request: EvalRequest<'_>) -> Evaluation {
        let started = Instant::now();
        let ctx = request.context;
        let request_time = Duration::new(ctx.request_time.seconds, ctx.request_time.nanoseconds.min(999_999_999));
        let read_scope = ReadScope {
            start: ctx.scope.key_start.0.clone(),
            end: ctx.scope.key_end.0.clone(),
            reader: request.reader,
            kube_user: ctx.transport.kube_user.as_ref().map(convert::kube_user),
        };
        let wit_ctx = convert::context(ctx);
        let limit = binding.limits.max_result_bytes;
        let (outcome, prepared) = self.call_ready(binding, request_time, &request.seed, read_scope, |store, policy| {
            let decision = policy.aq_governance_policy().call_evaluate(store, &wit_ctx)?;
            let size = convert::decision_size(&decision);
            if size > limit {
                return Ok(Err(PolicyFailure::OversizedResult { size, limit }));
            }
            let decision = convert::decision(decision);
            Ok(check_decision(&decision).map(|()| decision))
        });
        let digest = binding.module.digest;
        let (decision, failure, observed_reads) = match outcome {
            Ok((Ok(decision), observed)) => (decision, None, observed),
            Ok((Err(failure), observed)) => (failed_decision(binding, &failure), Some(failure), observed),
            Err(CallError::Failed(failure)) => (failed_decision(binding, &failure), Some(failure), Vec::new()),
            Err(CallError::Config(error)) => {
                let failure =
                    PolicyFailure::MalformedResult { detail: format!("refused its configuration at evaluation: {error}") };
                (failed_decision(binding, &failure), Some(failure), Vec::new())
            }
        };
        Evaluation { decision, digest, failure, observed_reads, elapsed: started.elapsed(), prepared }
    }

    /// Whether `binding` wants [`Engine::replenish`] now: with [`Refill::Caller`], after an
    /// evaluation left it with half its ready instances or fewer.
    pub fn needs_replenish(&self, binding: &Binding) -> bool {
        self.warmer.needs_replenish(&binding.warm)
    }

    /// Drops `binding`'s used instances and makes it ready ones, on this thread. With
    /// [`Refill::Caller`], call it off the request's path (the gateway runs it in a task of its
    /// own once the request has gone to etcd); it takes about 10 µs per instance.
    pub fn replenish(&self, binding: &Binding) {
        self.warmer.replenish(&binding.warm, &binding.recipe());
    }

    /// Asks a binding for advice on its scope's shape.
    pub fn advise(&self, binding: &Binding, stats: &ScopeStats, seed: [u8; 32]) -> Result<Advice, PolicyFailure> {
        let wit_stats = convert::stats(stats);
        match self.call(binding, Duration::ZERO, &seed, None, |store, policy, _| {
            policy.aq_governance_policy().call_advise(store, &wit_stats)
        }) {
            Ok((advice, _)) => Ok(convert::advice(advice)),
            Err(CallError::Failed(failure)) => Err(failure),
            Err(CallError::Config(error)) => {
                Err(PolicyFailure::MalformedResult { detail: format!("refused its configuration at advise: {error}") })
            }
        }
    }

    /// A fresh store for one call of `binding`, with its deadline and memory cap armed.
    fn new_store(
        &self,
        binding: &Binding,
        request_time: Duration,
        seed: &[u8; 32],
        read_scope: Option<ReadScope>,
    ) -> Store<HostState> {
        new_store(&self.engine, self.config.epoch_tick, &binding.limits, &binding.scope, request_time, seed, read_scope)
    }

    /// Runs `f` (an `evaluate`) in an instance made ready ahead of the request when one is
    /// left, otherwise in a fresh one after `init`; then asks for the binding's ready instances
    /// to be topped up. Says which it was.
    fn call_ready<R>(
        &self,
        binding: &Binding,
        request_time: Duration,
        seed: &[u8; 32],
        read_scope: ReadScope,
        f: impl FnOnce(&mut Store<HostState>, &Governance) -> wasmtime::Result<R>,
    ) -> (Result<(R, Vec<ObservedRead>), CallError>, bool) {
        let Some(warm::Ready { mut store, policy }) = binding.warm.take() else {
            let outcome = self.call(binding, request_time, seed, Some(read_scope), |store, policy, _| f(store, policy));
            self.warmer.after(&binding.warm, || binding.recipe(), None);
            return (outcome, false);
        };
        store.data_mut().begin(request_time, seed, Some(read_scope));
        arm_deadline(&mut store, self.config.epoch_tick, binding.limits.timeout);
        let outcome = match f(&mut store, &policy) {
            Ok(value) => Ok((value, std::mem::take(&mut store.data_mut().observed))),
            Err(error) => Err(CallError::Failed(classify(&error, store.data(), binding.limits, self.config.stack_bytes))),
        };
        self.warmer.after(&binding.warm, || binding.recipe(), Some(store));
        (outcome, true)
    }

    /// Creates a store and instantiates the binding's module without calling it: the fixed
    /// cost every evaluation pays. For benchmarks.
    pub fn instantiate_only(&self, binding: &Binding) -> Result<Duration, PolicyFailure> {
        let started = Instant::now();
        let mut store = self.new_store(binding, Duration::ZERO, &[0; 32], None);
        match binding.module.pre.instantiate(&mut store) {
            Ok(_) => Ok(started.elapsed()),
            Err(error) => Err(classify(&error, store.data(), binding.limits, self.config.stack_bytes)),
        }
    }

    /// Runs `f` in a fresh instance after `init`, under the binding's deadline and memory cap,
    /// and classifies any failure.
    fn call<R>(
        &self,
        binding: &Binding,
        request_time: Duration,
        seed: &[u8; 32],
        read_scope: Option<ReadScope>,
        f: impl FnOnce(&mut Store<HostState>, &Governance, &Binding) -> wasmtime::Result<R>,
    ) -> Result<(R, Vec<ObservedRead>), CallError> {
        let limits = binding.limits;
        let mut store = self.new_store(binding, request_time, seed, read_scope);
        let result = binding.module.pre.instantiate(&mut store).and_then(|policy| {
            match policy.aq_governance_policy().call_init(&mut store, &binding.config)? {
                Ok(()) => f(&mut store, &policy, binding).map(Ok),
                Err(config_error) => Ok(Err(convert::config_error(config_error))),
            }
        });
        match result {
            Ok(Ok(value)) => Ok((value, std::mem::take(&mut store.data_mut().observed))),
            Ok(Err(config_error)) => Err(CallError::Config(config_error)),
            Err(error) => Err(CallError::Failed(classify(&error, store.data(), limits, self.config.stack_bytes))),
        }
    }
}

enum CallError {
    Config(ConfigError),
    Failed(PolicyFailure),
}

/// Names the limit a failed call hit.
fn classify(error: &wasmtime::Error, state: &HostState, limits: Limits, stack_bytes: usize) -> PolicyFailure {
    if state.limiter.memory_cap_hit {
        return PolicyFailure::Memory { limit: limits.memory_bytes };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PolicyFailure::Timeout { limit: limits.timeout },
        Some(Trap::StackOverflow) => PolicyFailure::Stack { limit: stack_bytes },
        Some(trap) => {
            let stderr = String::from_utf8_lossy(&state.stderr.contents()).trim().to_string();
            let detail = if stderr.is_empty() { trap.to_string() } else { format!("{trap}; it printed: {stderr}") };
            PolicyFailure::Trap { detail }
        }
        None => {
            let message = format!("{error:#}");
            if message.contains("concurrent") || message.contains("pooling") || message.contains("limit reached") {
                PolicyFailure::Capacity { detail: message }
            } else {
                PolicyFailure::Trap { detail: message }
            }
        }
    }
}

/// Rejects decisions that cannot be acted on.
fn check_decision(decision: &Decision) -> Result<(), PolicyFailure> {
    if let aq_sdk::Verdict::RequireApproval(rule) = &decision.verdict {
        let total: u64 = rule.voters.iter().map(|v| u64::from(v.weight)).sum();
        if rule.threshold == 0 || u64::from(rule.threshold) > total {
            return Err(PolicyFailure::MalformedResult {
                detail: format!("approval rule needs weight {} but its voters total {total}", rule.threshold),
            });
        }
    }
    Ok(())
}

/// The decision to enforce when a policy failed.
fn failed_decision(binding: &Binding, failure: &PolicyFailure) -> Decision {
    let digest = binding.module.digest.short();
    if let PolicyFailure::Capacity { .. } = failure {
        return Decision::deny(format!("aq is evaluating too many requests (policy {digest} {failure}); retry"))
            .annotate("policy_failure", failure.kind());
    }
    match binding.fail_mode {
        FailMode::Closed => Decision::deny(format!(
            "policy {digest} of scope {} {failure}; the request was refused (fail-closed); \
             ask the scope's operator to fix or roll back the policy",
            binding.scope
        )),
        FailMode::Open => Decision::allow(),
    }
    .annotate("policy_failure", failure.kind())
}

/// The seed of `init`'s randomness: the configuration's digest, the same on every replica.
fn init_seed(config: &str) -> [u8; 32] {
    *blake3::hash(config.as_bytes()).as_bytes()
}

/// A fresh store for one call under `limits`, with its deadline and memory cap armed.
fn new_store(
    engine: &wasmtime::Engine,
    epoch_tick: Duration,
    limits: &Limits,
    scope: &Arc<str>,
    request_time: Duration,
    seed: &[u8; 32],
    read_scope: Option<ReadScope>,
) -> Store<HostState> {
    let state = HostState::new(SandboxSetup {
        memory_cap: limits.memory_bytes,
        request_time,
        seed,
        log_target: scope.clone(),
        read_scope,
    });
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    arm_deadline(&mut store, epoch_tick, limits.timeout);
    store.epoch_deadline_trap();
    store
}

/// Gives the store `timeout` of CPU from now.
fn arm_deadline(store: &mut Store<HostState>, epoch_tick: Duration, timeout: Duration) {
    let tick = epoch_tick.as_nanos().max(1);
    let ticks = timeout.as_nanos().div_ceil(tick).max(1);
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
}

/// An instance of `recipe`'s module past `init`, as bind checked it (no request time, the
/// configuration's seed), or `None` if instantiation or `init` fails.
fn prepare(engine: &wasmtime::Engine, epoch_tick: Duration, recipe: &warm::Recipe) -> Option<warm::Ready> {
    let seed = init_seed(&recipe.config);
    let mut store = new_store(engine, epoch_tick, &recipe.limits, &recipe.scope, Duration::ZERO, &seed, None);
    let policy = recipe.module.pre.instantiate(&mut store).ok()?;
    match policy.aq_governance_policy().call_init(&mut store, &recipe.config) {
        Ok(Ok(())) => Some(warm::Ready { store, policy }),
        _ => None,
    }
}

/// Advances the engine's epoch every `tick` until the engine is dropped.
fn spawn_epoch_ticker(engine: &wasmtime::Engine, tick: Duration) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new().name("aq-epoch".into()).spawn(move || {
        loop {
            std::thread::sleep(tick);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        }
    })?;
    Ok(())
}
