//! The governance pipeline. A mutation goes through four steps, one file each, in order:
//!
//! 1. **route** (`route.rs`): the scope owning every key it touches, from the routing in force
//!    (the scope index and each scope's group and binding, swapped whole by [`Gateway::reroute`]);
//! 2. **verify** (`verify.rs`): its signatures, into the credentials the policy sees, and the
//!    nonce that makes a replay fail;
//! 3. **decide** (`decide.rs`): the scope's active policy on what the client sent (translated
//!    once, by `model.rs`), into a verdict, the compares that guard the write on what the policy
//!    read, and the lineage record to keep;
//! 4. **send** (`send.rs`): to the scope's group as the client sent it: a Put stays a Put. The
//!    group's etcd enforces that it still holds the keys (see [`crate::backend::ownership`]);
//!    aq adds only the compares it needs (policy reads, a signed request's nonce), in a Txn
//!    around the client's op so its else-branch answers as etcd's would.
//!
//! `write.rs` runs the steps for each etcd write (Put, DeleteRange, Txn) and retries when a
//! guard failed or the scope moved; `approvals.rs` and `anchors.rs` take over when the verdict
//! asks for approvals. Reads (`read.rs`) are routed, split across scopes and merged, and counted.

pub mod anchors;
mod approvals;
pub use approvals::ApprovalError;
pub use decide::Decided;
pub(crate) use decide::request_seed;
pub(crate) use approvals::decode_request;
pub(crate) use model::model_of;
mod decide;
pub mod hash;
pub mod decisions;
mod lease;
pub mod metrics;
mod model;
mod read;
mod reader;
pub mod revision;
mod route;
mod send;
mod stored;
mod verify;
mod write;

pub use route::{Routing, ScopeRuntime};

use std::collections::BTreeMap;
use std::sync::Arc;

use aq_sdk as m;
use tonic::Status;

use crate::backend::Group;
use crate::engine::{Engine, Registry};
use crate::index::ScopeIndex;
use crate::trust::SignedRequest;

/// Why the gate refused or could not complete a request.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The policy denied the write.
    #[error("{reason}")]
    Denied {
        /// The policy's reason.
        reason: String,
    },
    /// The policy requires approval weight the request's signatures do not carry.
    #[error("{}", .0.message)]
    NeedsApproval(Box<Shortfall>),
    /// The write became a proposal and waits for approvals.
    #[error("{message}")]
    Proposed {
        /// The proposal's id.
        id: String,
        /// What to do.
        message: String,
    },
    /// A write or transaction touches keys of several scopes.
    #[error("the request touches keys of several scopes ({}); a write or transaction must stay within one scope", .0.join(", "))]
    CrossScope(Vec<String>),
    /// No scope owns the key.
    #[error("no scope owns key {0:?}; configure a scope covering it (a catch-all scope has prefix \"\")")]
    Unowned(String),
    /// The key is in aq's reserved keyspace.
    #[error("key {0:?} is in aq's reserved keyspace and cannot be written through aq")]
    Reserved(String),
    /// A read at one revision across groups with separate revision spaces.
    #[error("{0}")]
    Unsupported(String),
    /// The request's signatures were refused.
    #[error("{0}")]
    Unauthenticated(#[from] crate::trust::TrustError),
    /// What a policy read kept moving.
    #[error("scope {0} changed under the policy's reads on every attempt; retry the request")]
    Contended(String),
    /// The scope's group refused the write: it no longer holds the scope's keys.
    #[error("etcd group {group} no longer holds the keys of scope {scope} (the scope moved): {detail}; retry the request")]
    NotOwner {
        /// The scope.
        scope: String,
        /// The group that refused.
        group: String,
        /// etcd's words.
        detail: String,
    },
    /// A read or watch at a revision before the scope last moved: that history stayed behind.
    #[error("{}", revision::COMPACTED)]
    Compacted {
        /// The revision asked for.
        revision: i64,
        /// The first revision the scope can be read at.
        floor: i64,
    },
    /// etcd answered with an error; passed through unchanged.
    #[error("{0}")]
    Backend(Status),
}

impl From<Status> for GateError {
    fn from(status: Status) -> Self {
        GateError::Backend(status)
    }
}

/// What the gate works with besides the layout: the policy engine and bindings, metrics, the
/// decision log and signature checks.
pub struct GateServices {
    /// The policy engine.
    pub engine: Arc<Engine>,
    /// Each scope's active binding.
    pub registry: Arc<Registry>,
    /// The request path's metrics.
    pub metrics: Arc<metrics::GateMetrics>,
    /// Where decisions are logged.
    pub decisions: decisions::DecisionLog,
    /// Principals and signature checks.
    pub trust: Arc<crate::trust::Trust>,
    /// This replica as an anchor, when it serves peers.
    pub anchor: Option<Arc<anchors::Anchor>>,
}

/// What a request carries besides its message: signatures, and how long to wait for
/// approvals.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// Signatures from the request's metadata.
    pub signed: Option<SignedRequest>,
    /// Wait this long for a proposal's outcome instead of answering with its id at once.
    pub wait: Option<std::time::Duration>,
    /// The etcd user the request authenticated as (aq's own etcd auth), which policies see
    /// as the transport identity.
    pub user: Option<String>,
}

/// A write whose signatures fall short of its policy's approval rule.
#[derive(Debug)]
pub struct Shortfall {
    /// The rule.
    pub rule: m::ApprovalRule,
    /// The weight the request's signatures carry.
    pub weight: u32,
    /// The policy that asked.
    pub policy: crate::engine::PolicyDigest,
    /// Why, in words.
    pub message: String,
}

/// How long a write that a group refused because it handed the scope off waits for routing to
/// name the new owner (a live move's cut-over) before the refusal reaches the client.
pub const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The gateway core shared by every front-end service.
pub struct Gateway {
    routing: arc_swap::ArcSwap<Routing>,
    /// Counts reroutes, so a write a group refused mid hand-off can wait for the next one.
    rerouted: tokio::sync::watch::Sender<u64>,
    /// Per group, a connection as its etcd administrator, which can still read ranges the
    /// group handed off: watches replay a moved scope's old copy through it.
    replayers: arc_swap::ArcSwap<BTreeMap<String, Group>>,
    /// The backend groups by name; a group started at run time is added ([`Gateway::add_group`]).
    groups: arc_swap::ArcSwap<BTreeMap<String, Group>>,
    /// The group where leases are granted and which answers for aq itself (status).
    home: Group,
    engine: Arc<Engine>,
    registry: Arc<Registry>,
    leases: lease::LeaseCopies,
    metrics: Arc<metrics::GateMetrics>,
    decisions: decisions::DecisionLog,
    trust: Arc<crate::trust::Trust>,
    anchor: Option<Arc<anchors::Anchor>>,
    stats: Arc<crate::adapt::stats::Stats>,
}

impl Gateway {
    /// Assembles a gateway. Every scope of `index` must have a binding in the registry and a
    /// group in `groups`. `home` names the group that grants leases and holds the meta records.
    pub async fn new(
        index: ScopeIndex,
        groups: BTreeMap<String, Group>,
        home: &str,
        services: GateServices,
    ) -> Result<Self, String> {
        let GateServices { engine, registry, metrics, decisions, trust, anchor } = services;
        let stats = Arc::new(crate::adapt::stats::Stats::default());
        let routing = Routing::build(index, &groups, &registry, &stats)?;
        let home = groups.get(home).ok_or_else(|| format!("the home group {home} is not configured"))?.clone();
        Ok(Gateway {
            routing: arc_swap::ArcSwap::from_pointee(routing),
            rerouted: tokio::sync::watch::Sender::new(0),
            replayers: arc_swap::ArcSwap::from_pointee(BTreeMap::new()),
            groups: arc_swap::ArcSwap::from_pointee(groups),
            home,
            engine,
            registry,
            leases: lease::LeaseCopies::default(),
            metrics,
            decisions,
            trust,
            anchor,
            stats,
        })
    }

    /// The routing requests take now: scope index and scope runtimes.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Routes requests by `index` from now on; requests under way finish on the routing they
    /// started with. Every scope of `index` needs a binding and a configured group. The
    /// ownership of ranges on the groups is not changed here: see [`crate::backend::ownership`].
    pub fn reroute(&self, index: ScopeIndex) -> Result<(), String> {
        let routing = Routing::build(index, &self.groups.load(), &self.registry, &self.stats)?;
        self.routing.store(Arc::new(routing));
        self.rerouted.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A receiver that sees every later [`Gateway::reroute`].
    pub fn reroutes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rerouted.subscribe()
    }

    /// Gives the gateway its groups' administrator connections (see [`Gateway::replayer`]).
    pub fn set_replayers(&self, replayers: BTreeMap<String, Group>) {
        self.replayers.store(Arc::new(replayers));
    }

    /// Adds a group started or joined at run time, with its administrator's connection if aq
    /// has one. Scopes route to it from the next [`Gateway::reroute`] that names it.
    pub fn add_group(&self, name: &str, group: Group, replayer: Option<Group>) {
        self.groups.rcu(|groups| {
            let mut groups = BTreeMap::clone(groups);
            groups.insert(name.to_string(), group.clone());
            groups
        });
        if let Some(replayer) = replayer {
            self.replayers.rcu(|replayers| {
                let mut replayers = BTreeMap::clone(replayers);
                replayers.insert(name.to_string(), replayer.clone());
                replayers
            });
        }
    }

    /// Forgets a group no scope is routed to any longer (a managed group a merge emptied).
    pub fn remove_group(&self, name: &str) {
        self.groups.rcu(|groups| {
            let mut groups = BTreeMap::clone(groups);
            groups.remove(name);
            groups
        });
        self.replayers.rcu(|replayers| {
            let mut replayers = BTreeMap::clone(replayers);
            replayers.remove(name);
            replayers
        });
    }

    /// The connection that reads what `group` handed off: its administrator's where aq has
    /// one, otherwise the group's own (which etcd then does not restrict to the group's ranges).
    pub fn replayer(&self, group: &str) -> Option<Group> {
        self.replayers.load().get(group).cloned().or_else(|| self.groups.load().get(group).cloned())
    }

    /// Every scope's load on this replica.
    pub fn stats(&self) -> &Arc<crate::adapt::stats::Stats> {
        &self.stats
    }

    /// The backend groups, as they are now.
    pub fn groups(&self) -> Arc<BTreeMap<String, Group>> {
        self.groups.load_full()
    }

    /// The request path's metrics.
    pub fn metrics(&self) -> &Arc<metrics::GateMetrics> {
        &self.metrics
    }

    /// Each group's state, by name: `Ok` if its etcd answers a status request within `wait`,
    /// else what went wrong. What the health routes of both listeners report.
    pub async fn group_states(&self, wait: std::time::Duration) -> Vec<(String, Result<(), String>)> {
        let mut states = Vec::new();
        for (name, group) in self.groups().iter() {
            let state = match tokio::time::timeout(wait, group.status()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(status)) => Err(format!("error: {}", status.message())),
                Err(_) => Err(format!("no answer within {wait:?}")),
            };
            states.push((name.clone(), state));
        }
        states
    }

    /// The latest decisions other than allows, newest first.
    pub fn recent_decisions(&self) -> Vec<serde_json::Value> {
        self.decisions.recent()
    }

    /// The group that grants leases and answers status.
    pub fn home(&self) -> &Group {
        &self.home
    }

    /// The policy registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The principals this replica knows, and its signature checks.
    pub fn trust(&self) -> &Arc<crate::trust::Trust> {
        &self.trust
    }
}
