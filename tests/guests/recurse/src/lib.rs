//! Recurses without bound: the engine's stack limit must stop it.
// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]
use aq_sdk::{Context, Decision, Policy};

struct Recurse;

// No locals live in linear memory, so the recursion exhausts the engine's wasm stack rather
// than the guest's own shadow stack; the rotate keeps LLVM from turning it into a loop.
#[inline(never)]
#[allow(unconditional_recursion)]
fn depth(n: u64, limit: u64) -> u64 {
    if n == limit {
        return n;
    }
    depth(n + 1, limit).rotate_left(7) ^ n
}

impl Policy for Recurse {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, ctx: &Context) -> Decision {
        Decision::deny(format!("depth {}", depth(0, u64::MAX - ctx.ops.len() as u64)))
    }
}

aq_sdk::export_policy!(Recurse);
