//! Allows a write only from the etcd users its config names (`{"writers": ["alice"]}`), and
//! says whom it refused: shows that an etcd user authenticated through aq reaches the policy
//! as its transport identity.

// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]

use aq_sdk::{Context, Decision, Policy};

struct Writers;

impl Policy for Writers {
    type Config = serde_json::Value;
    fn evaluate(config: &serde_json::Value, ctx: &Context) -> Decision {
        let user = ctx.transport.etcd_user.as_deref();
        let named = |user: &str| config["writers"].as_array().is_some_and(|w| w.iter().any(|w| w.as_str() == Some(user)));
        let allowed = user.is_some_and(named);
        if allowed {
            Decision::allow()
        } else {
            Decision::deny(format!("etcd user {} may not write here", user.unwrap_or("(none)")))
        }
    }
}

aq_sdk::export_policy!(Writers);
