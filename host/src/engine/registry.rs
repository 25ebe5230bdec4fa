//! The active policy binding of each scope, swappable while evaluations run.
//!
//! Each scope has a slot holding its active binding behind an atomic pointer, plus the
//! previous one as last-known-good. An evaluation takes an `Arc` of the active binding and
//! finishes on it, whatever swaps happen meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arc_swap::{ArcSwap, ArcSwapOption};

use super::Binding;

/// One scope's bindings.
pub struct ScopeSlot {
    active: ArcSwap<Binding>,
    last_known_good: ArcSwapOption<Binding>,
}

impl ScopeSlot {
    /// The binding an evaluation should use now.
    pub fn active(&self) -> Arc<Binding> {
        self.active.load_full()
    }

    fn replace(&self, binding: Arc<Binding>) -> Arc<Binding> {
        let previous = self.active.swap(binding);
        self.last_known_good.store(Some(previous.clone()));
        previous
    }

    /// The binding before the latest swap.
    pub fn last_known_good(&self) -> Option<Arc<Binding>> {
        self.last_known_good.load_full()
    }
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No binding for the scope.
    #[error("scope {0} has no policy bound; bind one first")]
    UnknownScope(String),
    /// Rollback with no previous binding.
    #[error("scope {0} has no previous policy to roll back to")]
    NothingToRollBack(String),
}

/// Bindings of every scope.
#[derive(Default)]
pub struct Registry {
    slots: RwLock<HashMap<String, Arc<ScopeSlot>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The slot of a scope; callers on a hot path may keep it.
    pub fn slot(&self, scope: &str) -> Option<Arc<ScopeSlot>> {
        self.slots.read().expect("registry lock").get(scope).cloned()
    }

    /// The active binding of a scope.
    pub fn active(&self, scope: &str) -> Option<Arc<Binding>> {
        self.slot(scope).map(|s| s.active())
    }

    /// Makes `binding` active for `scope`; the binding it replaces becomes last-known-good and
    /// is returned.
    pub fn bind(&self, scope: &str, binding: Arc<Binding>) -> Option<Arc<Binding>> {
        if let Some(slot) = self.slot(scope) {
            return Some(slot.replace(binding));
        }
        let mut slots = self.slots.write().expect("registry lock");
        // Another thread may have created the slot between our read and write locks.
        if let Some(slot) = slots.get(scope) {
            return Some(slot.replace(binding));
        }
        let slot = ScopeSlot { active: ArcSwap::new(binding), last_known_good: ArcSwapOption::empty() };
        slots.insert(scope.to_string(), Arc::new(slot));
        None
    }

    /// Returns `scope` to its last-known-good binding; the binding rolled back from becomes the
    /// new last-known-good, so a second rollback undoes the first.
    pub fn rollback(&self, scope: &str) -> Result<Arc<Binding>, RegistryError> {
        let slot = self.slot(scope).ok_or_else(|| RegistryError::UnknownScope(scope.to_string()))?;
        let previous = slot.last_known_good().ok_or_else(|| RegistryError::NothingToRollBack(scope.to_string()))?;
        slot.replace(previous.clone());
        Ok(previous)
    }

    /// The scopes with a binding, sorted.
    pub fn scopes(&self) -> Vec<String> {
        let mut scopes: Vec<String> = self.slots.read().expect("registry lock").keys().cloned().collect();
        scopes.sort();
        scopes
    }
}
