//! Plain Rust mirror of the `aq:governance` WIT types.
//!
//! These are what policy code, fixtures and the host's gate speak. In JSON (fixtures, the admin
//! API) keys and values are strings when they are UTF-8 and arrays of byte values otherwise;
//! enums are `snake_case`, and variants with data are objects with one field, e.g.
//! `{"put": {"key": "/a", "value": "v"}}` or `{"deny": "reason"}`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An etcd key or value: arbitrary bytes, usually UTF-8.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// The bytes as text, with invalid UTF-8 replaced, for messages.
    pub fn lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Bytes {
    fn from(s: &str) -> Self {
        Bytes(s.as_bytes().to_vec())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(v.to_vec())
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "{:?}", self.0),
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(s) => serializer.serialize_str(s),
            Err(_) => self.0.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of byte values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
                Ok(Bytes(v.as_bytes().to_vec()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        deserializer.deserialize_any(BytesVisitor)
    }
}

/// A point in time: seconds and nanoseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    /// Whole seconds since the epoch.
    pub seconds: u64,
    /// Nanoseconds within the second.
    #[serde(default)]
    pub nanoseconds: u32,
}

/// The scope that owns every key of the request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScopeInfo {
    /// Stable scope identifier, e.g. `secrets`.
    pub id: String,
    /// The first key of the scope's range.
    pub key_start: Bytes,
    /// The first key after the scope's range; empty means the end of the keyspace.
    pub key_end: Bytes,
    /// Operator-assigned labels.
    pub labels: BTreeMap<String, String>,
}

/// Writes one key, as etcd's `Put`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PutOp {
    /// The key written.
    pub key: Bytes,
    /// The new value (empty when `ignore_value`).
    pub value: Bytes,
    /// Lease to attach; 0 means none.
    pub lease: i64,
    /// Keep the current value.
    pub ignore_value: bool,
    /// Keep the current lease.
    pub ignore_lease: bool,
}

/// Deletes a key or range, as etcd's `DeleteRange`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeleteRangeOp {
    /// The first key deleted.
    pub key: Bytes,
    /// Empty: only `key`; `[0]`: every key from `key` on; otherwise `[key, range_end)`.
    pub range_end: Bytes,
}

/// One mutation of a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A put.
    Put(PutOp),
    /// A delete of a key or range.
    DeleteRange(DeleteRangeOp),
}

impl Op {
    /// The key the op starts at.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put(p) => &p.key,
            Op::DeleteRange(d) => &d.key,
        }
    }
}

/// What a compare looks at, and the value it is compared with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareTarget {
    /// The key's version.
    Version(i64),
    /// The key's create revision.
    CreateRevision(i64),
    /// The key's last modification revision.
    ModRevision(i64),
    /// The key's value.
    Value(Bytes),
    /// The key's lease.
    Lease(i64),
}

/// How a compare relates the current state to its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareResult {
    /// `==`
    Equal,
    /// `>`
    Greater,
    /// `<`
    Less,
    /// `!=`
    NotEqual,
}

/// A client-supplied transaction guard, as etcd's `Compare`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    /// The key compared.
    pub key: Bytes,
    /// Range end, with the same convention as [`DeleteRangeOp::range_end`].
    #[serde(default)]
    pub range_end: Bytes,
    /// The relation.
    pub result: CompareResult,
    /// The field and value compared.
    pub target: CompareTarget,
}

/// A principal whose signature over the request the host has verified.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Credential {
    /// Principal identifier.
    pub principal: String,
    /// The principal's roles.
    pub roles: Vec<String>,
}

/// Who is connected, as far as the transport can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportIdentity {
    /// Name from a verified mTLS client certificate.
    pub tls_name: Option<String>,
    /// The etcd user the client authenticated as.
    pub etcd_user: Option<String>,
    /// The Kubernetes user of an admission review (its `userInfo`); `None` through the etcd API.
    pub kube_user: Option<KubeUser>,
}

/// The Kubernetes user an admission review is made for, as kube-apiserver authenticated them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeUser {
    /// `userInfo.username`.
    pub username: String,
    /// `userInfo.uid`.
    pub uid: String,
    /// `userInfo.groups`.
    pub groups: Vec<String>,
}

/// Everything a policy sees about one mutation request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Context {
    /// The scope that owns every key of the request.
    pub scope: ScopeInfo,
    /// The mutations, in request order.
    pub ops: Vec<Op>,
    /// The client's own compares.
    pub compares: Vec<Compare>,
    /// Verified credentials.
    pub credentials: Vec<Credential>,
    /// Transport identity.
    pub transport: TransportIdentity,
    /// When the gateway received the request.
    pub request_time: Timestamp,
}

impl Context {
    /// The puts of the request.
    pub fn puts(&self) -> impl Iterator<Item = &PutOp> {
        self.ops.iter().filter_map(|op| match op {
            Op::Put(p) => Some(p),
            Op::DeleteRange(_) => None,
        })
    }

    /// The delete-ranges of the request.
    pub fn deletes(&self) -> impl Iterator<Item = &DeleteRangeOp> {
        self.ops.iter().filter_map(|op| match op {
            Op::DeleteRange(d) => Some(d),
            Op::Put(_) => None,
        })
    }

    /// Whether any verified credential holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.credentials.iter().any(|c| c.roles.iter().any(|r| r == role))
    }

    /// The verified principals, in the order given.
    pub fn principals(&self) -> impl Iterator<Item = &str> {
        self.credentials.iter().map(|c| c.principal.as_str())
    }
}

/// A principal allowed to approve, and how much its approval counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Voter {
    /// Principal identifier.
    pub principal: String,
    /// Weight of its approval.
    pub weight: u32,
}

/// Approvals a write needs before it commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    /// Who may approve.
    pub voters: Vec<Voter>,
    /// Sum of distinct voters' weights needed.
    pub threshold: u32,
    /// How long approvals may be gathered, in seconds.
    pub expiry_seconds: u64,
}

/// The outcome of an evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Forward the request.
    Allow,
    /// Refuse the request with this reason.
    Deny(String),
    /// Hold the request until the rule is met.
    RequireApproval(ApprovalRule),
}

impl Verdict {
    /// The verdict's name: `allow`, `deny` or `require_approval`.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny(_) => "deny",
            Verdict::RequireApproval(_) => "require_approval",
        }
    }
}

/// How much lineage to keep about an allowed mutation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineageLevel {
    /// No record.
    #[default]
    None,
    /// Keys, value hashes and principals.
    Digest,
    /// As `Digest`, plus compares and annotations.
    Full,
}

/// A policy's answer to `evaluate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Allow, deny or require approval.
    pub verdict: Verdict,
    /// Lineage to keep.
    #[serde(default)]
    pub lineage: LineageLevel,
    /// Key-value pairs for the decision log.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Decision {
    /// Allow, without lineage.
    pub fn allow() -> Self {
        Decision { verdict: Verdict::Allow, lineage: LineageLevel::None, annotations: BTreeMap::new() }
    }

    /// Deny with a reason the client will read: say what was wrong and what to do.
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision { verdict: Verdict::Deny(reason.into()), ..Decision::allow() }
    }

    /// Hold the write until `rule` is satisfied.
    pub fn require_approval(rule: ApprovalRule) -> Self {
        Decision { verdict: Verdict::RequireApproval(rule), ..Decision::allow() }
    }

    /// Sets the lineage level.
    pub fn with_lineage(mut self, level: LineageLevel) -> Self {
        self.lineage = level;
        self
    }

    /// Adds an annotation for the decision log.
    pub fn annotate(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Whether the verdict is `allow`.
    pub fn is_allow(&self) -> bool {
        matches!(self.verdict, Verdict::Allow)
    }
}

/// Per-scope statistics over the latest sampling window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScopeStats {
    /// Keys stored.
    pub keys: u64,
    /// Bytes of keys and values stored.
    pub bytes: u64,
    /// Mutations per second.
    pub write_rate: f64,
    /// Reads per second.
    pub read_rate: f64,
    /// Entropy in bits of the next path segment of written keys.
    pub key_entropy: f64,
    /// Fraction of guarded writes whose compares failed.
    pub conflict_rate: f64,
    /// Sampled split keys, the most balanced first.
    pub split_candidates: Vec<Bytes>,
}

/// A policy's answer to `advise`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advice {
    /// Leave the scope as it is.
    Keep,
    /// Split the scope at this key.
    Split(Bytes),
    /// Merge the scope into its neighbour.
    Merge,
}

/// Why a policy refused its configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigError {
    /// The configuration does not parse.
    Malformed(String),
    /// A value is not acceptable.
    Invalid(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Malformed(m) => write!(f, "malformed config: {m}"),
            ConfigError::Invalid(m) => write!(f, "invalid config: {m}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A key's state as a same-scope read returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoredValue {
    /// The value.
    pub value: Bytes,
    /// The key's `mod_revision`; the write is guarded on it.
    pub mod_revision: i64,
    /// The key's lease.
    pub lease: i64,
}

/// Why a host read returned no answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadError {
    /// The key or prefix is outside the scope under evaluation.
    OutsideScope,
    /// The host offers no reads here.
    Unavailable,
    /// The read failed.
    Failed(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::OutsideScope => f.write_str("key outside the scope under evaluation"),
            ReadError::Unavailable => f.write_str("reads are not available here"),
            ReadError::Failed(m) => write!(f, "read failed: {m}"),
        }
    }
}

impl std::error::Error for ReadError {}
