//! Host bindings of the `aq:governance/governance` world, generated once. Other modules use the
//! curated names re-exported here, never the generated paths.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "aq:governance/governance",
});

pub use aq::governance::host::{Host as HostImports, LogLevel, ReadError as WitReadError, StoredValue as WitStoredValue};
pub use aq::governance::types::{self as wit, Host as TypesHost};

/// The exported interface every policy must provide.
pub const POLICY_INTERFACE: &str = "aq:governance/policy@0.1.0";
/// The functions of [`POLICY_INTERFACE`].
pub const POLICY_FUNCTIONS: [&str; 3] = ["init", "evaluate", "advise"];
/// The world, as `aq policy inspect` names it.
pub const WORLD: &str = "aq:governance/governance@0.1.0";
