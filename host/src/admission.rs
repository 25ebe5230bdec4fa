//! Kubernetes admission reviews as aq requests. kube-apiserver asks a validating admission
//! webhook about each create, update and delete with an `admission.k8s.io/v1` AdmissionReview;
//! aq turns the review into the write kube-apiserver would send etcd for it (the object at the
//! key kube-apiserver stores it under, guarded as kube-apiserver guards it), so the scope that
//! governs the key in etcd decides the review too, with the same policy.
//!
//! What the policy sees of a review:
//! - CREATE: a put of the object (JSON, as the review carries it) at its storage key, with the
//!   compare `mod_revision(key) == 0` kube-apiserver's create carries;
//! - UPDATE: a put of the new object, with `mod_revision(key) == resourceVersion` of the old
//!   object when it has one;
//! - DELETE: a delete of the key, with the same compare on the old object's resourceVersion;
//! - `userInfo` (username, uid, groups) as the transport identity's Kubernetes user.
//!
//! Through etcd, kube-apiserver stores built-in types as protobuf and custom resources as JSON;
//! a policy that reads values sees JSON here in both cases.

use aq_sdk as m;
use serde_json::{Value, json};

/// kube-apiserver's storage prefix unless `--etcd-prefix` changes it.
pub const DEFAULT_ETCD_PREFIX: &str = "/registry";

/// API groups whose resources kube-apiserver stores under the bare resource name; every other
/// group's (custom resources, CRDs and API services among them) are stored under
/// `<group>/<resource>`.
const UNQUALIFIED_GROUPS: &[&str] = &[
    "",
    "admissionregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "extensions",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

/// The review versions aq answers; the answer carries the version asked in.
const API_VERSIONS: &[&str] = &["admission.k8s.io/v1", "admission.k8s.io/v1beta1"];

/// What kube-apiserver asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Operation {
    /// A new object.
    Create,
    /// A change to an object.
    Update,
    /// An object removed.
    Delete,
}

impl Operation {
    /// The name Kubernetes gives the operation.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

/// An admission review, as the write it stands for.
#[derive(Clone, Debug)]
pub struct Review {
    /// The review's `apiVersion`, which the answer repeats.
    pub api_version: String,
    /// `request.uid`, which the answer must carry.
    pub uid: String,
    /// What kube-apiserver asked.
    pub operation: Operation,
    /// The object's storage key.
    pub key: Vec<u8>,
    /// The write: one put or one delete of `key`.
    pub ops: Vec<m::Op>,
    /// The guard kube-apiserver's own write would carry.
    pub compares: Vec<m::Compare>,
    /// `request.userInfo`.
    pub user: m::KubeUser,
    /// `request.dryRun`: kube-apiserver will not persist the change.
    pub dry_run: bool,
}

/// A review that cannot be read: the field and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ReviewError {
    /// The JSON path of the field, e.g. `request.uid`.
    pub field: String,
    /// What is wrong and what was expected.
    pub problem: String,
}

fn wrong(field: &str, problem: impl Into<String>) -> ReviewError {
    ReviewError { field: field.to_string(), problem: problem.into() }
}

/// The string at `path` under `value`: `Ok(None)` when absent or null, an error when another type.
fn text<'a>(value: &'a Value, path: &str, name: &str) -> Result<Option<&'a str>, ReviewError> {
    match value.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong(&format!("{path}.{name}"), format!("must be a string, not {}", kind(other)))),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a serde_json::Map<String, Value>, ReviewError> {
    value.as_object().ok_or_else(|| wrong(path, format!("must be an object, not {}", kind(value))))
}

/// The key kube-apiserver stores an object under: `<prefix>/<resource>/<namespace>/<name>`,
/// `<prefix>/<resource>/<name>` for cluster-scoped ones, with kube-apiserver's historical names
/// for a few core resources and `<group>/<resource>` for resources of other API groups.
pub fn storage_key(prefix: &str, group: &str, resource: &str, namespace: &str, name: &str) -> String {
    let stored = match (group, resource) {
        ("", "nodes") => "minions".to_string(),
        ("", "services") => "services/specs".to_string(),
        ("", "endpoints") => "services/endpoints".to_string(),
        ("", "replicationcontrollers") => "controllers".to_string(),
        ("networking.k8s.io" | "extensions", "ingresses") => "ingress".to_string(),
        ("policy" | "extensions", "podsecuritypolicies") => "podsecuritypolicy".to_string(),
        (group, resource) if UNQUALIFIED_GROUPS.contains(&group) => resource.to_string(),
        (group, resource) => format!("{group}/{resource}"),
    };
    let prefix = prefix.trim_end_matches('/');
    if namespace.is_empty() { format!("{prefix}/{stored}/{name}") } else { format!("{prefix}/{stored}/{namespace}/{name}") }
}

/// The revision an object's `metadata.resourceVersion` names, when it names one.
fn resource_version(object: &Value) -> Option<i64> {
    object.get("metadata")?.get("resourceVersion")?.as_str()?.parse().ok().filter(|r| *r > 0)
}

fn mod_revision_is(key: &[u8], revision: i64) -> m::Compare {
    m::Compare {
        key: m::Bytes(key.to_vec()),
        range_end: m::Bytes::default(),
        result: m::CompareResult::Equal,
        target: m::CompareTarget::ModRevision(revision),
    }
}

/// Reads an AdmissionReview under kube-apiserver's storage prefix `prefix`.
pub fn parse(review: &Value, prefix: &str) -> Result<Review, ReviewError> {
    object(review, "(the body)")?;
    let api_version = text(review, "", "apiVersion")?.ok_or_else(|| wrong("apiVersion", "missing; send admission.k8s.io/v1"))?;
    if !API_VERSIONS.contains(&api_version) {
        return Err(wrong("apiVersion", format!("{api_version:?} is not served; use admission.k8s.io/v1")));
    }
    match text(review, "", "kind")? {
        Some("AdmissionReview") => {}
        Some(other) => return Err(wrong("kind", format!("{other:?}; an admission webhook takes kind AdmissionReview"))),
        None => return Err(wrong("kind", "missing; send kind AdmissionReview")),
    }
    let request = review.get("request").filter(|r| !r.is_null()).ok_or_else(|| wrong("request", "missing"))?;
    object(request, "request")?;
    let uid = text(request, "request", "uid")?.filter(|u| !u.is_empty()).ok_or_else(|| wrong("request.uid", "missing or empty"))?;
    let operation = match text(request, "request", "operation")? {
        Some("CREATE") => Operation::Create,
        Some("UPDATE") => Operation::Update,
        Some("DELETE") => Operation::Delete,
        Some("CONNECT") => {
            return Err(wrong(
                "request.operation",
                "CONNECT writes nothing to storage, so no scope governs it; leave CONNECT out of the webhook's rules",
            ));
        }
        Some(other) => return Err(wrong("request.operation", format!("{other:?} is not CREATE, UPDATE or DELETE"))),
        None => return Err(wrong("request.operation", "missing")),
    };
    let resource = request.get("resource").ok_or_else(|| wrong("request.resource", "missing"))?;
    object(resource, "request.resource")?;
    let group = text(resource, "request.resource", "group")?.unwrap_or("");
    let plural = text(resource, "request.resource", "resource")?
        .filter(|r| !r.is_empty())
        .ok_or_else(|| wrong("request.resource.resource", "missing or empty"))?;
    let namespace = text(request, "request", "namespace")?.unwrap_or("");
    let new = request.get("object").filter(|o| !o.is_null());
    let old = request.get("oldObject").filter(|o| !o.is_null());
    if let Some(new) = new {
        object(new, "request.object")?;
    }
    if let Some(old) = old {
        object(old, "request.oldObject")?;
    }
    // The name is empty on a create whose object asks for a generated one; its key then ends
    // in the name's prefix, which routes it to the same scope.
    let metadata_name = |field: &str| new.or(old).and_then(|o| o.get("metadata")).and_then(|m| m.get(field)).and_then(Value::as_str);
    let name = text(request, "request", "name")?
        .filter(|n| !n.is_empty())
        .or_else(|| metadata_name("name").filter(|n| !n.is_empty()))
        .or_else(|| metadata_name("generateName").filter(|n| !n.is_empty()))
        .ok_or_else(|| wrong("request.name", "empty, and the object has neither metadata.name nor metadata.generateName"))?;
    if name.contains('/') || (!namespace.is_empty() && namespace.contains('/')) {
        return Err(wrong("request.name", format!("{namespace}/{name} holds a '/'; Kubernetes names never do")));
    }
    let key = storage_key(prefix, group, plural, namespace, name).into_bytes();
    let (ops, compares) = match operation {
        Operation::Create | Operation::Update => {
            let object = new.ok_or_else(|| wrong("request.object", format!("missing; a {} review carries the object", operation.name())))?;
            let value = serde_json::to_vec(object).expect("a JSON value serializes");
            let guard = match operation {
                Operation::Create => Some(0),
                _ => old.and_then(resource_version),
            };
            let put = m::Op::Put(m::PutOp {
                key: m::Bytes(key.clone()),
                value: m::Bytes(value),
                lease: 0,
                ignore_value: false,
                ignore_lease: false,
            });
            (vec![put], guard.map(|rev| mod_revision_is(&key, rev)).into_iter().collect())
        }
        Operation::Delete => {
            let delete = m::Op::DeleteRange(m::DeleteRangeOp { key: m::Bytes(key.clone()), range_end: m::Bytes::default() });
            (vec![delete], old.and_then(resource_version).map(|rev| mod_revision_is(&key, rev)).into_iter().collect())
        }
    };
    let user = match request.get("userInfo").filter(|u| !u.is_null()) {
        None => m::KubeUser::default(),
        Some(info) => {
            object(info, "request.userInfo")?;
            let groups = match info.get("groups") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(groups)) => groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| {
                        g.as_str().map(str::to_string).ok_or_else(|| wrong(&format!("request.userInfo.groups[{i}]"), "must be a string"))
                    })
                    .collect::<Result<_, _>>()?,
                Some(other) => return Err(wrong("request.userInfo.groups", format!("must be an array, not {}", kind(other)))),
            };
            m::KubeUser {
                username: text(info, "request.userInfo", "username")?.unwrap_or("").to_string(),
                uid: text(info, "request.userInfo", "uid")?.unwrap_or("").to_string(),
                groups,
            }
        }
    };
    let dry_run = match request.get("dryRun") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(wrong("request.dryRun", format!("must be a boolean, not {}", kind(other)))),
    };
    Ok(Review { api_version: api_version.to_string(), uid: uid.to_string(), operation, key, ops, compares, user, dry_run })
}

/// The answer to a review.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// Whether kube-apiserver may go on.
    pub allowed: bool,
    /// Why not (or a note on an allow), shown to the user.
    pub message: Option<String>,
    /// Recorded in kube-apiserver's audit log under the webhook's name.
    pub audit: Vec<(String, String)>,
}

/// The answer to a review that scope `scope` decided with `evaluation`: its verdict, the
/// policy's reason, and the scope and policy digest for the audit log. A `require-approval`
/// verdict is a denial, since a review carries no signatures to approve with.
pub fn verdict(scope: &str, evaluation: &crate::engine::Evaluation) -> Verdict {
    let mut audit = vec![("scope".to_string(), scope.to_string()), ("policy".to_string(), evaluation.digest.to_hex())];
    if let Some(failure) = &evaluation.failure {
        audit.push(("policy-failure".to_string(), failure.kind().to_string()));
    }
    match &evaluation.decision.verdict {
        m::Verdict::Allow => Verdict { allowed: true, message: None, audit },
        m::Verdict::Deny(reason) => Verdict { allowed: false, message: Some(reason.clone()), audit },
        m::Verdict::RequireApproval(rule) => Verdict {
            allowed: false,
            message: Some(format!(
                "writes to scope {scope} need approvals of weight {} from {}; an admission review carries no signatures, \
                 so make this change as a signed write through aq's etcd API",
                rule.threshold,
                rule.voters.iter().map(|v| format!("{} (weight {})", v.principal, v.weight)).collect::<Vec<_>>().join(", ")
            )),
            audit,
        },
    }
}

/// The AdmissionReview answering `review` with `verdict`: a denial carries HTTP status 403, as
/// Kubernetes' own admission plugins give.
pub fn answer(review: &Review, verdict: &Verdict) -> Value {
    let mut response = json!({ "uid": review.uid, "allowed": verdict.allowed });
    if !verdict.allowed {
        response["status"] = json!({
            "code": 403,
            "reason": "Forbidden",
            "message": verdict.message.as_deref().unwrap_or("denied by aq"),
        });
    }
    if !verdict.audit.is_empty() {
        response["auditAnnotations"] = verdict.audit.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    }
    json!({ "apiVersion": review.api_version, "kind": "AdmissionReview", "response": response })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(operation: &str, resource: Value, namespace: &str, name: &str) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": resource,
                "namespace": namespace,
                "name": name,
                "operation": operation,
                "userInfo": {"username": "alice", "uid": "u-1", "groups": ["dev", "system:authenticated"]},
                "object": {"metadata": {"name": name, "namespace": namespace}},
                "oldObject": {"metadata": {"name": name, "resourceVersion": "41"}},
                "dryRun": false,
            }
        })
    }

    #[test]
    fn storage_keys_follow_kube_apiserver() {
        let key = |group, resource, ns, name| storage_key("/registry", group, resource, ns, name);
        assert_eq!(key("", "pods", "default", "web"), "/registry/pods/default/web");
        assert_eq!(key("", "namespaces", "", "default"), "/registry/namespaces/default");
        assert_eq!(key("", "nodes", "", "n1"), "/registry/minions/n1");
        assert_eq!(key("", "services", "ns", "api"), "/registry/services/specs/ns/api");
        assert_eq!(key("", "endpoints", "ns", "api"), "/registry/services/endpoints/ns/api");
        assert_eq!(key("apps", "deployments", "ns", "d"), "/registry/deployments/ns/d");
        assert_eq!(key("networking.k8s.io", "ingresses", "ns", "i"), "/registry/ingress/ns/i");
        assert_eq!(key("coordination.k8s.io", "leases", "kube-node-lease", "n1"), "/registry/leases/kube-node-lease/n1");
        assert_eq!(
            key("apiextensions.k8s.io", "customresourcedefinitions", "", "widgets.example.com"),
            "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.example.com"
        );
        assert_eq!(key("example.com", "widgets", "ns", "w"), "/registry/example.com/widgets/ns/w");
        assert_eq!(storage_key("/kube/", "", "pods", "a", "b"), "/kube/pods/a/b");
    }

    #[test]
    fn each_operation_becomes_the_write_kube_apiserver_sends() {
        let pods = json!({"group": "", "version": "v1", "resource": "pods"});
        let create = parse(&review("CREATE", pods.clone(), "default", "web"), DEFAULT_ETCD_PREFIX).unwrap();
        assert_eq!(create.key, b"/registry/pods/default/web");
        assert!(matches!(&create.ops[..], [m::Op::Put(p)] if p.key.0 == create.key && p.value.0.starts_with(b"{\"metadata\"")));
        assert_eq!(create.compares, vec![mod_revision_is(&create.key, 0)]);
        assert_eq!(create.user.username, "alice");
        assert_eq!(create.user.groups, vec!["dev", "system:authenticated"]);

        let update = parse(&review("UPDATE", pods.clone(), "default", "web"), DEFAULT_ETCD_PREFIX).unwrap();
        assert_eq!(update.compares, vec![mod_revision_is(&update.key, 41)]);
        let delete = parse(&review("DELETE", pods, "default", "web"), DEFAULT_ETCD_PREFIX).unwrap();
        assert!(matches!(&delete.ops[..], [m::Op::DeleteRange(d)] if d.key.0 == delete.key && d.range_end.0.is_empty()));
        assert_eq!(delete.compares, vec![mod_revision_is(&delete.key, 41)]);
    }

    #[test]
    fn a_generated_name_routes_by_its_prefix() {
        let mut body = review("CREATE", json!({"group": "", "version": "v1", "resource": "pods"}), "ns", "");
        body["request"]["object"]["metadata"] = json!({"generateName": "web-"});
        assert_eq!(parse(&body, DEFAULT_ETCD_PREFIX).unwrap().key, b"/registry/pods/ns/web-");
    }

    #[test]
    fn a_malformed_review_names_the_field() {
        let pods = json!({"group": "", "version": "v1", "resource": "pods"});
        let error = |change: &dyn Fn(&mut Value)| {
            let mut body = review("CREATE", pods.clone(), "ns", "p");
            change(&mut body);
            parse(&body, DEFAULT_ETCD_PREFIX).unwrap_err().to_string()
        };
        assert!(error(&|b| b["apiVersion"] = json!("v1")).starts_with("apiVersion: \"v1\" is not served"));
        assert!(error(&|b| b["kind"] = json!("Pod")).starts_with("kind: "));
        assert!(error(&|b| b["request"]["uid"] = json!(7)).starts_with("request.uid: must be a string"));
        assert!(error(&|b| b["request"]["operation"] = json!("CONNECT")).contains("leave CONNECT out"));
        assert!(error(&|b| b["request"]["resource"] = json!({})).starts_with("request.resource.resource: missing"));
        assert!(error(&|b| b["request"]["object"] = Value::Null).starts_with("request.object: missing"));
        assert!(error(&|b| b["request"]["userInfo"]["groups"] = json!(["a", 1])).starts_with("request.userInfo.groups[1]"));
        assert!(error(&|b| b["request"]["name"] = json!("a/b")).starts_with("request.name: "));
        assert!(error(&|b| b["request"] = Value::Null).starts_with("request: missing"));
        assert!(parse(&json!([]), DEFAULT_ETCD_PREFIX).unwrap_err().to_string().starts_with("(the body): must be an object"));
    }

    #[test]
    fn an_answer_repeats_the_uid_and_version_and_a_denial_is_forbidden() {
        let mut body = review("CREATE", json!({"group": "", "version": "v1", "resource": "pods"}), "ns", "p");
        body["apiVersion"] = json!("admission.k8s.io/v1beta1");
        let review = parse(&body, DEFAULT_ETCD_PREFIX).unwrap();
        let denied = answer(&review, &Verdict { allowed: false, message: Some("no".into()), audit: vec![("scope".into(), "registry".into())] });
        assert_eq!(denied["apiVersion"], "admission.k8s.io/v1beta1");
        assert_eq!(denied["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(denied["response"]["allowed"], false);
        assert_eq!(denied["response"]["status"]["code"], 403);
        assert_eq!(denied["response"]["status"]["message"], "no");
        assert_eq!(denied["response"]["auditAnnotations"]["scope"], "registry");
        let allowed = answer(&review, &Verdict { allowed: true, message: None, audit: Vec::new() });
        assert_eq!(allowed["response"]["allowed"], true);
        assert!(allowed["response"].get("status").is_none());
    }
}
