//! Never returns from `evaluate`; the engine's CPU deadline must stop it.
// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]
use aq_sdk::{Context, Decision, Policy};

struct Spin;

impl Policy for Spin {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, ctx: &Context) -> Decision {
        let mut n = ctx.ops.len() as u64;
        loop {
            n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

aq_sdk::export_policy!(Spin);
