//! Host bindings of the `aq:governance/governance` world, generated once. Other modules use the
//! curated names re-exported here, never the generated paths.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "aq:governance/governance",
});

pub use aq::governance::host::{Host as HostImports, LogLevel, ReadError as WitReadError, StoredValue as WitStoredValue};
pub use aq::governance::types::{self as wit, Host as TypesHost, KubeUserInfo as WitKubeUser};

/// The exported interface every policy must provide, at this version or an earlier 0.1 one
/// (the 0.1 versions only add to the host's side).
pub const POLICY_INTERFACE: &str = "aq:governance/policy@0.1.1";
/// What every 0.1 version of [`POLICY_INTERFACE`] is named before its patch number.
pub const POLICY_INTERFACE_0_1: &str = "aq:governance/policy@0.1.";
/// The functions of [`POLICY_INTERFACE`].
pub const POLICY_FUNCTIONS: [&str; 3] = ["init", "evaluate", "advise"];
/// The world, as `aq policy inspect` names it.
pub const WORLD: &str = "aq:governance/governance@0.1.1";
