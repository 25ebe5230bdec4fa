//! A policy built against `aq:governance@0.1.0` as it was first published (a frozen copy in
//! `wit/`), without the SDK: later 0.1 versions of the host must load and run it unchanged.
//! Denies puts of keys that end in `/frozen`, naming the etcd user, and allows the rest.

// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "wit", world: "aq:governance/governance" });

use aq::governance::types::{Advice, ConfigError, Context, Decision, LineageLevel, Op, ScopeStats, Verdict};

struct Frozen;

impl exports::aq::governance::policy::Guest for Frozen {
    fn init(_config: String) -> Result<(), ConfigError> {
        Ok(())
    }

    fn evaluate(ctx: Context) -> Decision {
        let frozen = ctx.ops.iter().any(|op| matches!(op, Op::Put(p) if p.key.ends_with(b"/frozen")));
        let verdict = if frozen {
            Verdict::Deny(format!("a 0.1.0 policy refuses {} here", ctx.transport.etcd_user.as_deref().unwrap_or("anyone")))
        } else {
            Verdict::Allow
        };
        Decision { verdict, lineage: LineageLevel::None, annotations: Vec::new() }
    }

    fn advise(_stats: ScopeStats) -> Advice {
        Advice::Keep
    }
}

export!(Frozen);
