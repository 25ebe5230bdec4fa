//! Step 1, route: the scope that owns a request's keys, from the routing in force.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::GateError;
use crate::adapt::stats::{ScopeCounters, Stats};
use crate::backend::Group;
use crate::engine::{Registry, ScopeSlot};
use crate::index::{KeyRange, Owner, Scope, ScopeIndex};

/// One scope at run time.
pub struct ScopeRuntime {
    /// Index entry.
    pub scope: Arc<Scope>,
    /// Its group.
    pub group: Group,
    /// Its policy binding.
    pub slot: Arc<ScopeSlot>,
    /// Its load on this replica, for `advise` (shared by every routing holding the scope).
    pub stats: Arc<ScopeCounters>,
}

/// What routes requests: the scope index and each scope's run-time state, replaced as one
/// ([`Gateway::reroute`]). A request loads it once and finishes on it.
pub struct Routing {
    index: ScopeIndex,
    scopes: HashMap<String, ScopeRuntime>,
}

impl Routing {
    /// Each scope of `index` with its group and policy binding.
    pub(super) fn build(
        index: ScopeIndex,
        groups: &BTreeMap<String, Group>,
        registry: &Registry,
        stats: &Stats,
    ) -> Result<Self, String> {
        let mut scopes = HashMap::new();
        for scope in index.scopes() {
            let group = groups
                .get(&scope.group)
                .ok_or_else(|| format!("scope {} names backend group {}, which is not configured", scope.id, scope.group))?
                .clone();
            let slot = registry.slot(&scope.id).ok_or_else(|| format!("scope {} has no policy bound", scope.id))?;
            let stats = stats.counters(scope);
            scopes.insert(scope.id.clone(), ScopeRuntime { scope: scope.clone(), group, slot, stats });
        }
        Ok(Routing { index, scopes })
    }

    /// The scope index.
    pub fn index(&self) -> &ScopeIndex {
        &self.index
    }

    /// A scope's run-time state.
    pub fn scope(&self, id: &str) -> Option<&ScopeRuntime> {
        self.scopes.get(id)
    }

    /// The scopes sharing keys with `range`, in key order, each with the shared part: what a
    /// Range or a Watch over `range` reads. Reserved keys are never part of it.
    pub fn parts(&self, range: &KeyRange) -> Vec<(&ScopeRuntime, KeyRange)> {
        self.index.overlapping(range).into_iter().map(|(scope, part)| (self.runtime(scope), part)).collect()
    }

    pub(super) fn runtime(&self, scope: &Scope) -> &ScopeRuntime {
        self.scopes.get(&scope.id).expect("every indexed scope has a runtime")
    }

    /// Resolves one key to its scope: the Put path, a single binary search.
    pub(super) fn route_key(&self, key: &[u8]) -> Result<&ScopeRuntime, GateError> {
        match self.index.lookup(key) {
            Owner::Scope(scope) => Ok(self.runtime(scope)),
            Owner::Reserved => Err(GateError::Reserved(String::from_utf8_lossy(key).into_owned())),
            Owner::Unowned => Err(GateError::Unowned(String::from_utf8_lossy(key).into_owned())),
        }
    }

    /// Resolves the keys and ranges a mutation touches to exactly one scope.
    pub(super) fn route_write(&self, ranges: &[KeyRange]) -> Result<&ScopeRuntime, GateError> {
        let mut owner: Option<&Arc<Scope>> = None;
        let mut all: Vec<String> = Vec::new();
        for range in ranges {
            if let Owner::Reserved = self.index.lookup(&range.start) {
                return Err(GateError::Reserved(String::from_utf8_lossy(&range.start).into_owned()));
            }
            let parts = self.index.overlapping(range);
            if parts.is_empty() {
                return Err(GateError::Unowned(String::from_utf8_lossy(&range.start).into_owned()));
            }
            for (scope, _) in parts {
                if !all.contains(&scope.id) {
                    all.push(scope.id.clone());
                }
                owner.get_or_insert(scope);
            }
        }
        if all.len() > 1 {
            all.sort();
            return Err(GateError::CrossScope(all));
        }
        let scope = owner.ok_or_else(|| GateError::Unowned(String::new()))?;
        Ok(self.runtime(scope))
    }
}
