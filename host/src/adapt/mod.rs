//! Adaptive scopes: what each scope's load looks like ([`stats`], counted by the gate) and where
//! it could be split ([`split`]), and the loop that asks the policies for advice on it
//! ([`advise`], which runs above the gate).

pub mod advise;
pub mod groups;
pub mod migrate;
pub mod split;
pub mod stats;
