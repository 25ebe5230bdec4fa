//! Recurses without bound: the engine's stack limit must stop it.
use aq_sdk::{Context, Decision, Policy};

struct Recurse;

#[inline(never)]
fn depth(n: u64, pad: [u64; 16]) -> u64 {
    let pad = std::hint::black_box(pad);
    std::hint::black_box(depth(n + 1, pad)) + pad[(n % 16) as usize]
}

impl Policy for Recurse {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, _: &Context) -> Decision {
        Decision::deny(format!("depth {}", depth(0, [3; 16])))
    }
}

aq_sdk::export_policy!(Recurse);
