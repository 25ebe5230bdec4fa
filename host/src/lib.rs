//! aq: a gateway that governs etcd by scope.
//!
//! This crate holds the host: the policy engine (`engine`), the built-in policies (`builtin`)
//! and the command line (`cli`). See ARCHITECTURE.md for the map.

pub mod adapt;
pub mod auth;
pub mod admin;
pub mod admission;
pub mod backend;
pub mod builtin;
pub mod cli;
pub mod client;
pub mod clock;
pub mod embed;
pub mod config;
pub mod engine;
pub mod fixtures;
pub mod front;
pub mod gate;
pub mod index;
pub mod lineage;
pub mod meta;
pub mod private_file;
pub mod serve;
pub mod snapshot;
pub mod tls;
pub mod trust;
