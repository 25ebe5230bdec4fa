//! Reports, as annotations, what the sandbox lets a policy observe. Tests compare the values
//! across runs (determinism) and against what must be hidden (environment, files, network).
// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aq_sdk::{Context, Decision, Policy, host};

struct Probe;

/// Counts evaluations in this instance; a fresh instance per call keeps it at 1.
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Policy for Probe {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, ctx: &Context) -> Decision {
        // RandomState draws its keys from the WASI random source.
        let random = RandomState::new().hash_one(42u64);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let elapsed = Instant::now().elapsed().as_nanos();
        let env = std::env::vars().count();
        let args = std::env::args().count();
        let root = match std::fs::read_dir("/") {
            Ok(_) => "readable".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let net = match std::net::TcpStream::connect("127.0.0.1:2379") {
            Ok(_) => "connected".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let inside = ctx.ops.first().map(|op| op.key().to_vec()).unwrap_or_default();
        let read_inside = format!("{:?}", host::read(&inside));
        let read_outside = format!("{:?}", host::read(b"\xff\xff outside every scope"));
        let count_inside = format!("{:?}", host::count(&inside));
        host::log(host::LogLevel::Info, "probe ran");
        let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        Decision::allow()
            .annotate("calls_in_this_instance", calls.to_string())
            .annotate("random", random.to_string())
            .annotate("now_ns", now.to_string())
            .annotate("monotonic_elapsed_ns", elapsed.to_string())
            .annotate("env_vars", env.to_string())
            .annotate("args", args.to_string())
            .annotate("fs_root", root)
            .annotate("net", net)
            .annotate("read_inside", read_inside)
            .annotate("read_outside", read_outside)
            .annotate("count_inside", count_inside)
    }
}

aq_sdk::export_policy!(Probe);
