//! Allows a write only from the etcd users its config names (`{"writers": ["alice"]}`) or from
//! the Kubernetes users of an admission review in a group it names (`{"groups": ["ops"]}`), and
//! says whom it refused: shows that an etcd user authenticated through aq, and the `userInfo`
//! of an admission review, reach the policy as its transport identity.

// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]

use aq_sdk::{Context, Decision, Policy};

struct Writers;

fn named(config: &serde_json::Value, list: &str, name: &str) -> bool {
    config[list].as_array().is_some_and(|names| names.iter().any(|n| n.as_str() == Some(name)))
}

impl Policy for Writers {
    type Config = serde_json::Value;
    fn evaluate(config: &serde_json::Value, ctx: &Context) -> Decision {
        if let Some(kube) = &ctx.transport.kube_user {
            return if kube.groups.iter().any(|g| named(config, "groups", g)) {
                Decision::allow().annotate("kube-user", kube.username.as_str())
            } else {
                Decision::deny(format!("Kubernetes user {} (groups {}) may not write here", kube.username, kube.groups.join(", ")))
            };
        }
        let user = ctx.transport.etcd_user.as_deref();
        if user.is_some_and(|u| named(config, "writers", u)) {
            Decision::allow()
        } else {
            Decision::deny(format!("etcd user {} may not write here", user.unwrap_or("(none)")))
        }
    }
}

aq_sdk::export_policy!(Writers);
