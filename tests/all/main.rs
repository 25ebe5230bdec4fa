//! aq's integration tests: one binary, one module per area.

mod admin;
mod admission;
mod bad_input;
mod auth;
mod builtins;
mod concurrency;
mod conformance;
mod gateway;
mod hostile;
mod hotswap;
mod lineage;
mod linearizable;
mod maintenance;
mod migrate;
mod revisions;
mod swap;
mod trust;
mod ui;
mod validation;
mod watch;
