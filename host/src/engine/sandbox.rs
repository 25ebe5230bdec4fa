//! The per-evaluation store: WASI with nothing granted, a clock frozen at the request time,
//! randomness derived from the request, a memory cap, and the host imports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aq_sdk::keys::prefix_end;
use aq_sdk::{Bytes, ReadError, StoredValue};
use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::generated::{HostImports, LogLevel, TypesHost, WitKubeUser, WitReadError, WitStoredValue};

/// Lines a policy may log per evaluation; more are dropped.
const LOG_LINES_PER_CALL: u32 = 32;
/// Longest log line kept, in bytes.
const LOG_LINE_BYTES: usize = 1024;
/// Bytes of a policy's standard error kept for failure reports (a Rust panic message).
const STDERR_BYTES: usize = 2048;
/// Most table elements a policy may grow to.
const TABLE_ELEMENTS: usize = 100_000;

/// Same-scope reads offered to policies. The gateway implements it over etcd; `aq policy test`
/// over a fixture's `reads` and `counts`. The engine has already checked that the key or prefix
/// lies inside the scope.
pub trait ScopeReader: Send + Sync {
    /// The key's current state, `None` if absent.
    fn read(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError>;
    /// Keys starting with `prefix`.
    fn count(&self, prefix: &[u8]) -> Result<u64, ReadError>;
}

/// A read a policy made, so the write can be guarded on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedRead {
    /// The key read.
    pub key: Bytes,
    /// Its `mod_revision` when read; `None` when the key was absent.
    pub mod_revision: Option<i64>,
}

/// Tracks memory growth against the per-scope cap and remembers whether the cap was hit.
pub(super) struct Limiter {
    pub(super) memory_cap: usize,
    pub(super) memory_cap_hit: bool,
    /// The largest size any of the instance's memories asked for, granted or not.
    pub(super) memory_peak: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.memory_peak = self.memory_peak.max(desired);
        if desired > self.memory_cap {
            self.memory_cap_hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS)
    }
}

/// The request a store serves: what its clocks and random streams answer. Shared between the
/// store's state and the WASI implementations inside it, so that a store made ready before its
/// request (see `warm.rs`) is set to the request when it is taken.
struct RequestCell {
    /// The request time, in nanoseconds since the Unix epoch.
    nanos: AtomicU64,
    random: Mutex<RequestRandom>,
}

/// A request's randomness; the streams are derived on first use (most policies draw none).
struct RequestRandom {
    seed: [u8; 32],
    secure: Option<blake3::OutputReader>,
    insecure: Option<blake3::OutputReader>,
}

impl RequestCell {
    fn new(request_time: Duration, seed: &[u8; 32]) -> Self {
        RequestCell {
            nanos: AtomicU64::new(nanos(request_time)),
            random: Mutex::new(RequestRandom { seed: *seed, secure: None, insecure: None }),
        }
    }

    fn set(&self, request_time: Duration, seed: &[u8; 32]) {
        self.nanos.store(nanos(request_time), Ordering::Relaxed);
        *self.random.lock().expect("random lock") = RequestRandom { seed: *seed, secure: None, insecure: None };
    }

    fn fill(&self, secure: bool, dst: &mut [u8]) {
        let mut random = self.random.lock().expect("random lock");
        let RequestRandom { seed, secure: s, insecure: i } = &mut *random;
        let (stream, purpose) = if secure { (s, SECURE_PURPOSE) } else { (i, INSECURE_PURPOSE) };
        stream.get_or_insert_with(|| random_stream(seed, purpose)).fill(dst);
    }

    /// The insecure seed of the request: the first 16 bytes of its digest.
    fn insecure_seed(&self) -> (u64, u64) {
        let seed = self.random.lock().expect("random lock").seed;
        let half = |at: usize| u64::from_le_bytes(seed[at..at + 8].try_into().expect("8 bytes"));
        (half(0), half(8))
    }
}

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
}

const SECURE_PURPOSE: &str = "aq policy random 2026-11 secure";
const INSECURE_PURPOSE: &str = "aq policy random 2026-11 insecure";

/// A random stream derived from the request digest: the same request draws the same bytes on
/// every replica.
fn random_stream(seed: &[u8; 32], purpose: &str) -> blake3::OutputReader {
    let mut hasher = blake3::Hasher::new_derive_key(purpose);
    hasher.update(seed);
    hasher.finalize_xof()
}

/// The wall clock a policy sees: always the request time.
struct FrozenWallClock(Arc<RequestCell>);

impl HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.nanos.load(Ordering::Relaxed))
    }
}

/// The monotonic clock a policy sees: never advances within a request.
struct FrozenMonotonicClock(Arc<RequestCell>);

impl HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.0.nanos.load(Ordering::Relaxed)
    }
}

/// One of the request's random streams.
struct SeededRandom {
    cell: Arc<RequestCell>,
    secure: bool,
}

impl SeededRandom {
    fn fill(&self, dst: &mut [u8]) {
        self.cell.fill(self.secure, dst);
    }
}

impl rand_core::TryRng for SeededRandom {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.fill(dst);
        Ok(())
    }
}

/// Where the evaluation runs: its scope range (to keep reads inside it) and its reader; and
/// the Kubernetes user it runs for, when it decides an admission review.
pub(super) struct ReadScope {
    pub(super) start: Vec<u8>,
    pub(super) end: Vec<u8>,
    pub(super) reader: Option<Arc<dyn ScopeReader>>,
    pub(super) kube_user: Option<WitKubeUser>,
}

/// Everything a store holds for one call.
pub(super) struct HostState {
    wasi: WasiCtx,
    request: Arc<RequestCell>,
    table: ResourceTable,
    pub(super) limiter: Limiter,
    pub(super) stderr: MemoryOutputPipe,
    log_lines: u32,
    log_target: Arc<str>,
    read_scope: Option<ReadScope>,
    pub(super) observed: Vec<ObservedRead>,
}

/// What the store is set up from.
pub(super) struct SandboxSetup<'a> {
    pub(super) memory_cap: usize,
    pub(super) request_time: Duration,
    pub(super) seed: &'a [u8; 32],
    pub(super) log_target: Arc<str>,
    pub(super) read_scope: Option<ReadScope>,
}

impl HostState {
    pub(super) fn new(setup: SandboxSetup<'_>) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_BYTES);
        let request = Arc::new(RequestCell::new(setup.request_time, setup.seed));
        let mut builder = WasiCtx::builder();
        // Nothing is granted: no preopened directories, environment, arguments, stdin or
        // network. Standard output is discarded; standard error is kept for failure reports.
        builder
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenWallClock(request.clone()))
            .monotonic_clock(FrozenMonotonicClock(request.clone()))
            .secure_random(SeededRandom { cell: request.clone(), secure: true })
            .insecure_random(SeededRandom { cell: request.clone(), secure: false })
            // The linker answers `insecure-seed` from the request instead (see
            // `HostState::insecure_seed`); this value is never read.
            .insecure_random_seed(0)
            .max_random_size(1 << 20);
        HostState {
            wasi: builder.build(),
            request,
            table: ResourceTable::new(),
            limiter: Limiter { memory_cap: setup.memory_cap, memory_cap_hit: false, memory_peak: 0 },
            stderr,
            log_lines: 0,
            log_target: setup.log_target,
            read_scope: setup.read_scope,
            observed: Vec::new(),
        }
    }

    /// Sets a store made ready ahead of time to its request: clocks, randomness and reader.
    pub(super) fn begin(&mut self, request_time: Duration, seed: &[u8; 32], read_scope: Option<ReadScope>) {
        self.request.set(request_time, seed);
        self.read_scope = read_scope;
        self.observed.clear();
        self.log_lines = 0;
    }

    /// What `wasi:random/insecure-seed` answers: derived from the request, like every other
    /// random value. WASI fixes its own value when the store is built, which for a store made
    /// ready ahead of its request would come from no request at all.
    pub(super) fn insecure_seed(&self) -> (u64, u64) {
        self.request.insecure_seed()
    }

    fn in_scope(&self, start: &[u8], end_inclusive_check: impl Fn(&[u8]) -> bool) -> Result<&ReadScope, WitReadError> {
        let scope = self.read_scope.as_ref().ok_or(WitReadError::Unavailable)?;
        if start < scope.start.as_slice() || !end_inclusive_check(&scope.end) {
            return Err(WitReadError::OutsideScope);
        }
        Ok(scope)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl TypesHost for HostState {}

fn read_error(e: ReadError) -> WitReadError {
    match e {
        ReadError::OutsideScope => WitReadError::OutsideScope,
        ReadError::Unavailable => WitReadError::Unavailable,
        ReadError::Failed(msg) => WitReadError::Failed(msg),
    }
}

impl HostImports for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        self.log_lines += 1;
        if self.log_lines > LOG_LINES_PER_CALL {
            return;
        }
        let mut message = message;
        if message.len() > LOG_LINE_BYTES {
            let mut cut = LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let policy = &*self.log_target;
        match level {
            LogLevel::Trace => tracing::trace!(target: "aq::policy", policy, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "aq::policy", policy, "{message}"),
            LogLevel::Info => tracing::info!(target: "aq::policy", policy, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "aq::policy", policy, "{message}"),
            LogLevel::Error => tracing::error!(target: "aq::policy", policy, "{message}"),
        }
    }

    fn read(&mut self, key: Vec<u8>) -> Result<Option<WitStoredValue>, WitReadError> {
        let scope = self.in_scope(&key, |end| end.is_empty() || key.as_slice() < end)?;
        let reader = scope.reader.as_ref().ok_or(WitReadError::Unavailable)?;
        let found = reader.read(&key).map_err(read_error)?;
        self.observed.push(ObservedRead { key: Bytes(key), mod_revision: found.as_ref().map(|v| v.mod_revision) });
        Ok(found.map(|v| WitStoredValue { value: v.value.0, mod_revision: v.mod_revision, lease: v.lease }))
    }

    fn count(&mut self, prefix: Vec<u8>) -> Result<u64, WitReadError> {
        let end = prefix_end(&prefix);
        let scope =
            self.in_scope(&prefix, |scope_end| scope_end.is_empty() || (!end.is_empty() && end.as_slice() <= scope_end))?;
        let reader = scope.reader.as_ref().ok_or(WitReadError::Unavailable)?;
        reader.count(&prefix).map_err(read_error)
    }

    fn kube_user(&mut self) -> Option<WitKubeUser> {
        self.read_scope.as_ref().and_then(|scope| scope.kube_user.clone())
    }
}
