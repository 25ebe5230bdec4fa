//! aq's policy engine embedded in a program: three scopes bound to the built-in policies, then
//! decisions on writes and on a Kubernetes admission review, with no etcd anywhere. Prints one
//! line per decision: `<scope> <verdict>[: <reason>]`. With an argument, decisions are also
//! logged, as JSON lines, to the file it names.

use aq_host::embed::{BindOptions, Gate, GateConfig, Request};
use aq_host::gate::decisions::DecisionSink;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let decision_log = std::env::args().nth(1).map(|path| DecisionSink::File(path.into())).unwrap_or_default();
    let gate = Gate::new(GateConfig { decision_log, log_allows: true, ..Default::default() })?;
    let builtin = |name: &str| gate.load(aq_host::builtin::find(name).expect("a built-in policy").component);

    // The catch-all allows; tenants get a value size limit; secrets need a signer's role.
    gate.bind("catch-all", b"", builtin("open")?, "", BindOptions::default())?;
    let quota = r#"{"tenant_segment": 1, "default": {"max_value_bytes": 16}}"#;
    gate.bind("tenants", b"/tenants/", builtin("quota")?, quota, BindOptions::default())?;
    gate.bind("secrets", b"/registry/secrets/", builtin("critical")?, r#"{"role": "secret-writer"}"#, BindOptions::default())?;

    let show = |request: Request| -> Result<(), Box<dyn std::error::Error>> {
        let decided = gate.decide(request)?;
        match &decided.evaluation.decision.verdict {
            aq_sdk::Verdict::Deny(reason) => println!("{} deny: {reason}", decided.scope),
            verdict => println!("{} {}", decided.scope, verdict.kind()),
        }
        Ok(())
    };
    show(Request::put(b"/config/motd", b"hello"))?;
    show(Request::put(b"/tenants/acme/small", b"fits"))?;
    show(Request::put(b"/tenants/acme/large", &[b'x'; 64]))?;
    show(Request::put(b"/registry/secrets/prod/db", b"s3cr3t"))?;
    // The embedder verified alice's signature itself and says so.
    let mut signed = Request::put(b"/registry/secrets/prod/db", b"s3cr3t");
    signed.credentials.push(aq_sdk::Credential { principal: "alice".into(), roles: vec!["secret-writer".into()] });
    show(signed)?;

    // The same gate as an admission controller: a secret created through Kubernetes.
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3f6c1c6e-0001",
            "resource": { "group": "", "version": "v1", "resource": "secrets" },
            "namespace": "prod",
            "name": "api-key",
            "operation": "CREATE",
            "userInfo": { "username": "bob", "groups": ["dev"] },
            "object": { "metadata": { "name": "api-key", "namespace": "prod" } }
        }
    });
    let answer = gate.admit(&review, "/registry")?;
    let response = &answer["response"];
    println!(
        "admission {} allowed={} code={}",
        response["uid"].as_str().unwrap_or_default(),
        response["allowed"],
        response["status"]["code"]
    );
    Ok(())
}
