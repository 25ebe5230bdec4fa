//! aq's policy engine as a library, without etcd: load components, bind them to scopes (key
//! prefixes), and ask for decisions on writes or on Kubernetes admission reviews, with the same
//! sandbox, registry, routing by key and decision log as `aq serve`.
//!
//! ```no_run
//! use aq_host::embed::{Gate, Request};
//!
//! let gate = Gate::new(Default::default())?;
//! let critical = gate.load(aq_host::builtin::find("critical").unwrap().component)?;
//! gate.bind("secrets", b"/registry/secrets/", critical, r#"{"role": "secret-writer"}"#, Default::default())?;
//! let decided = gate.decide(Request::put(b"/registry/secrets/ns/db", b"s3cr3t"))?;
//! assert_eq!(decided.evaluation.decision.verdict.kind(), "deny");
//! # Ok::<(), aq_host::embed::EmbedError>(())
//! ```
//!
//! Policy reads (`host.read`, `host.count`) answer `unavailable` unless the request carries a
//! [`ScopeReader`] over the embedder's own store. Time and randomness are the request's, as in
//! the gateway, so two embedders deciding the same request at the same time agree.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use aq_sdk as m;

use crate::engine::{BindError, Engine, EngineConfig, EngineError, EvalRequest, Evaluation, FailMode, Limits, LoadError};
use crate::engine::{PolicyModule, Registry, ScopeReader};
use crate::gate::decisions::{DecisionLog, DecisionSink};
use crate::index::{KeyRange, Owner, Scope, ScopeIndex};

/// How an embedded gate is set up.
#[derive(Default)]
pub struct GateConfig {
    /// The sandbox's engine (instance pool, memory ceiling, cache of compiled components).
    pub engine: EngineConfig,
    /// Where decisions are logged (JSON lines, as `aq serve --decision-log` writes them).
    pub decision_log: DecisionSink,
    /// Log allowed requests too, not only denials.
    pub log_allows: bool,
}

/// How a scope binding evaluates.
#[derive(Clone, Debug, Default)]
pub struct BindOptions {
    /// CPU deadline, memory cap and result size of each call.
    pub limits: Limits,
    /// What a failing policy decides.
    pub fail_mode: FailMode,
    /// Labels the policy sees on its scope.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A request for a decision: mutations of keys inside one scope.
#[derive(Default)]
pub struct Request {
    /// The mutations.
    pub ops: Vec<m::Op>,
    /// The guards the write would carry.
    pub compares: Vec<m::Compare>,
    /// Principals whose signatures the embedder has verified.
    pub credentials: Vec<m::Credential>,
    /// Who is asking, as far as the embedder's transport can tell.
    pub transport: m::TransportIdentity,
    /// Same-scope reads for the policy, over the embedder's store.
    pub reader: Option<Arc<dyn ScopeReader>>,
}

impl Request {
    /// A put of `value` at `key`.
    pub fn put(key: &[u8], value: &[u8]) -> Self {
        let put = m::PutOp { key: m::Bytes(key.to_vec()), value: m::Bytes(value.to_vec()), ..Default::default() };
        Request { ops: vec![m::Op::Put(put)], ..Default::default() }
    }

    /// A delete of `key`.
    pub fn delete(key: &[u8]) -> Self {
        let delete = m::DeleteRangeOp { key: m::Bytes(key.to_vec()), range_end: m::Bytes::default() };
        Request { ops: vec![m::Op::DeleteRange(delete)], ..Default::default() }
    }
}

/// A decision and the scope that made it.
#[derive(Debug)]
pub struct Decided {
    /// The scope whose policy decided.
    pub scope: String,
    /// The evaluation: decision, policy digest, failure if any, time taken.
    pub evaluation: Evaluation,
}

/// What an embedded gate refuses.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Not a policy component.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The policy refused its configuration or the limits are too high.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The scopes' prefixes do not nest.
    #[error("{0}")]
    Layout(String),
    /// The request's keys belong to no bound scope, or to several.
    #[error("{0}")]
    Route(String),
    /// The request has no ops.
    #[error("the request has no ops; give at least one put or delete")]
    Empty,
    /// The decision log could not be opened.
    #[error("{0}")]
    Log(#[from] std::io::Error),
}

/// The policy engine, its scopes and their bindings, without etcd.
pub struct Gate {
    engine: Arc<Engine>,
    registry: Registry,
    scopes: RwLock<(Vec<Scope>, Arc<ScopeIndex>)>,
    decisions: DecisionLog,
}

impl Gate {
    /// A gate with no scopes.
    pub fn new(config: GateConfig) -> Result<Gate, EmbedError> {
        let engine = Arc::new(Engine::new(config.engine)?);
        let decisions = DecisionLog::open(&config.decision_log, config.log_allows, Default::default())?;
        let index = Arc::new(ScopeIndex::new(Vec::new()).map_err(|e| EmbedError::Layout(e.to_string()))?);
        Ok(Gate { engine, registry: Registry::new(), scopes: RwLock::new((Vec::new(), index)), decisions })
    }

    /// Validates and compiles a component.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<PolicyModule>, EmbedError> {
        Ok(self.engine.load(bytes)?)
    }

    /// Binds `module` with `config` to scope `id`, the keys starting with `prefix`: a new scope,
    /// or a hot swap of an existing one (its prefix unchanged). Scopes nest as in a layout; a key
    /// belongs to the innermost scope holding it.
    pub fn bind(&self, id: &str, prefix: &[u8], module: Arc<PolicyModule>, config: &str, options: BindOptions) -> Result<(), EmbedError> {
        let binding = self.engine.bind(id, module, config, options.limits, options.fail_mode)?;
        let mut scopes = self.scopes.write().expect("scopes lock");
        let range = KeyRange::prefix(prefix);
        let mut next = scopes.0.clone();
        match next.iter_mut().find(|s| s.id == id) {
            Some(scope) if scope.range != range => {
                return Err(EmbedError::Layout(format!(
                    "scope {id} already holds {:?}; a binding keeps its scope's keys",
                    String::from_utf8_lossy(&scope.range.start)
                )));
            }
            Some(scope) => scope.labels = options.labels,
            None => next.push(Scope {
                id: id.to_string(),
                range,
                group: String::new(),
                labels: options.labels,
                revisions: Default::default(),
                adapted: Default::default(),
            }),
        }
        let index = ScopeIndex::new(next.clone()).map_err(|e| EmbedError::Layout(e.to_string()))?;
        self.registry.bind(id, binding);
        *scopes = (next, Arc::new(index));
        Ok(())
    }

    /// The scope that owns `key`, if any.
    pub fn scope_of(&self, key: &[u8]) -> Option<String> {
        match self.scopes.read().expect("scopes lock").1.lookup(key) {
            Owner::Scope(scope) => Some(scope.id.clone()),
            _ => None,
        }
    }

    /// Decides `request` with the policy of the scope that owns its keys; the decision is logged
    /// as the gateway logs its own.
    pub fn decide(&self, request: Request) -> Result<Decided, EmbedError> {
        let index = self.scopes.read().expect("scopes lock").1.clone();
        let mut owner: Option<&Arc<Scope>> = None;
        for op in &request.ops {
            let range = match op {
                m::Op::Put(p) => KeyRange::from_request(&p.key, &[]),
                m::Op::DeleteRange(d) => KeyRange::from_request(&d.key, &d.range_end),
            };
            let parts = index.overlapping(&range);
            let key = String::from_utf8_lossy(&range.start).into_owned();
            match parts.as_slice() {
                [] => return Err(EmbedError::Route(format!("no scope owns {key}; bind a scope whose prefix holds it"))),
                [(scope, _)] if owner.is_none_or(|o| o.id == scope.id) => owner = Some(scope),
                _ => return Err(EmbedError::Route(format!("the request's keys span several scopes (at {key}); decide each scope's part on its own"))),
            }
        }
        let scope = owner.ok_or(EmbedError::Empty)?;
        let binding = self.registry.active(&scope.id).expect("every indexed scope is bound");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let context = m::Context {
            scope: m::ScopeInfo {
                id: scope.id.clone(),
                key_start: m::Bytes(scope.range.start.clone()),
                key_end: m::Bytes(scope.range.end.clone()),
                labels: scope.labels.clone(),
            },
            ops: request.ops,
            compares: request.compares,
            credentials: request.credentials,
            transport: request.transport,
            request_time: m::Timestamp { seconds: now.as_secs(), nanoseconds: now.subsec_nanos() },
        };
        let seed = crate::gate::request_seed(&context, now);
        let evaluation = self.engine.evaluate(&binding, EvalRequest { context: &context, seed, reader: request.reader });
        if self.decisions.wants(evaluation.decision.verdict.kind()) {
            self.decisions.record_evaluation(&context, &evaluation);
        }
        Ok(Decided { scope: scope.id.clone(), evaluation })
    }

    /// Answers a Kubernetes AdmissionReview (JSON) as `POST /v1/admission/validate` does,
    /// mapping objects to keys under `etcd_prefix` (kube-apiserver's, `/registry` by default).
    /// A review that cannot be read is an error naming the field.
    pub fn admit(&self, review: &serde_json::Value, etcd_prefix: &str) -> Result<serde_json::Value, crate::admission::ReviewError> {
        let review = crate::admission::parse(review, etcd_prefix)?;
        let request = Request {
            ops: review.ops.clone(),
            compares: review.compares.clone(),
            transport: m::TransportIdentity { kube_user: Some(review.user.clone()), ..Default::default() },
            ..Default::default()
        };
        let verdict = match self.decide(request) {
            Ok(decided) => crate::admission::verdict(&decided.scope, &decided.evaluation),
            Err(e) => crate::admission::Verdict { allowed: false, message: Some(e.to_string()), audit: Vec::new() },
        };
        Ok(crate::admission::answer(&review, &verdict))
    }
}
