//! Write aq governance policies in Rust.
//!
//! A policy is a type implementing [`Policy`], exported with [`export_policy!`] and compiled to
//! a `wasm32-wasip2` component:
//!
//! ```
//! use aq_sdk::{Context, Decision, Policy};
//!
//! #[derive(serde::Deserialize, Default)]
//! struct Config {
//!     #[serde(default)]
//!     read_only_prefix: String,
//! }
//!
//! struct NoWritesUnder;
//!
//! impl Policy for NoWritesUnder {
//!     type Config = Config;
//!
//!     fn evaluate(config: &Config, ctx: &Context) -> Decision {
//!         let prefix = config.read_only_prefix.as_bytes();
//!         match ctx.ops.iter().find(|op| !prefix.is_empty() && op.key().starts_with(prefix)) {
//!             Some(op) => Decision::deny(format!(
//!                 "{} is read-only; write elsewhere",
//!                 String::from_utf8_lossy(op.key())
//!             )),
//!             None => Decision::allow(),
//!         }
//!     }
//! }
//!
//! aq_sdk::export_policy!(NoWritesUnder);
//! ```
//!
//! The host calls `init` with the scope binding's configuration (JSON) in every fresh instance,
//! so [`Policy::Config`] is parsed once per call; keep it small. Fixtures (see [`fixture`]) run
//! natively under `cargo test` through [`testing`], and on the built component through
//! `aq policy test`.
#![deny(missing_docs)]

pub mod fixture;
pub mod host;
pub mod keys;
mod model;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use model::*;

use serde::de::DeserializeOwned;

/// A governance policy.
pub trait Policy {
    /// The configuration of a scope binding, parsed from JSON. An empty configuration parses
    /// as `{}`.
    type Config: DeserializeOwned + Send + Sync + 'static;

    /// Rejects configurations that parse but make no sense. The message says what to change.
    fn validate(config: &Self::Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Decides on one mutation request.
    fn evaluate(config: &Self::Config, ctx: &Context) -> Decision;

    /// Advises on the scope's shape; the default keeps it as it is.
    fn advise(config: &Self::Config, stats: &ScopeStats) -> Advice {
        let _ = (config, stats);
        Advice::Keep
    }
}

/// Parses and validates a configuration as the exported `init` does.
pub fn parse_config<P: Policy>(text: &str) -> Result<P::Config, ConfigError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    let mut json = serde_json::Deserializer::from_str(text);
    let config: P::Config = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // The path is `.` when the problem is the document itself (not JSON, not an object).
        ConfigError::Malformed(if path == "." { inner.to_string() } else { format!("{path}: {inner}") })
    })?;
    json.end().map_err(|e| ConfigError::Malformed(e.to_string()))?;
    P::validate(&config).map_err(ConfigError::Invalid)?;
    Ok(config)
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __private;

/// Exports a [`Policy`] as the component's `aq:governance/policy` implementation.
///
/// Invoke it once, at the top level of the policy crate. On targets other than `wasm32` it
/// expands to nothing, so the crate still builds natively for its fixture tests.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        mod __aq_policy_export {
            use super::*;

            static CONFIG: ::std::sync::OnceLock<<$policy as $crate::Policy>::Config> =
                ::std::sync::OnceLock::new();

            struct Export;

            impl $crate::__private::Guest for Export {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), $crate::__private::WitConfigError> {
                    $crate::__private::init::<$policy>(&CONFIG, config)
                }
                fn evaluate(ctx: $crate::__private::WitContext) -> $crate::__private::WitDecision {
                    $crate::__private::evaluate::<$policy>(&CONFIG, ctx)
                }
                fn advise(stats: $crate::__private::WitScopeStats) -> $crate::__private::WitAdvice {
                    $crate::__private::advise::<$policy>(&CONFIG, stats)
                }
            }

            $crate::__private::wit::__export_governance!(Export with_types_in $crate::__private::wit);
        }
    };
}
