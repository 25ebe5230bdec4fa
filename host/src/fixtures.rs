//! Running fixture cases on a component in the real engine, as `aq policy test` does.

use std::collections::BTreeMap;
use std::sync::Arc;

use aq_sdk::fixture::{Call, Case, Outcome};
use aq_sdk::{ReadError, StoredValue};

use crate::engine::{Binding, Engine, EvalRequest, ScopeReader};

/// What `read` and `count` answer during a fixture case.
pub struct FixtureReader {
    reads: BTreeMap<Vec<u8>, StoredValue>,
    counts: BTreeMap<Vec<u8>, u64>,
}

impl FixtureReader {
    /// Answers from the case's `reads` and `counts`.
    pub fn new(case: &Case) -> Self {
        FixtureReader {
            reads: case.reads_by_key(),
            counts: case.counts_by_prefix(),
        }
    }
}

impl ScopeReader for FixtureReader {
    fn read(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        Ok(self.reads.get(key).cloned())
    }
    fn count(&self, prefix: &[u8]) -> Result<u64, ReadError> {
        Ok(self.counts.get(prefix).copied().unwrap_or(0))
    }
}

/// Runs one case on a binding, as the gateway would; a policy failure is an `Err` naming it.
pub fn run_case(engine: &Engine, binding: &Binding, case: &Case) -> Result<Outcome, String> {
    match case.call()? {
        Call::Evaluate(ctx) => {
            let seed = *blake3::hash(&serde_json::to_vec(ctx).expect("contexts serialise")).as_bytes();
            let reader: Arc<dyn ScopeReader> = Arc::new(FixtureReader::new(case));
            let evaluation = engine.evaluate(binding, EvalRequest { context: ctx, seed, reader: Some(reader) });
            match evaluation.failure {
                Some(failure) => Err(format!("policy failed: {failure}")),
                None => Ok(Outcome::Decision(evaluation.decision)),
            }
        }
        Call::Advise(stats) => engine
            .advise(binding, stats, [0; 32])
            .map(Outcome::Advice)
            .map_err(|failure| format!("policy failed: {failure}")),
    }
}

