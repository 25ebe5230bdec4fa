//! Adaptive scopes: what each scope's load looks like ([`stats`]) and where it could be split
//! ([`split`]), for the policies' `advise`.

pub mod split;
pub mod stats;
