//! Allocates until the engine's memory cap stops it.
// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]
use aq_sdk::{Context, Decision, Policy};

struct Grow;

impl Policy for Grow {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, _: &Context) -> Decision {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
        }
    }
}

aq_sdk::export_policy!(Grow);
