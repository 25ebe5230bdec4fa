//! The `aq` binary: `policy test` and `policy inspect`, their output and exit codes. These live
//! in `aq-host` (not `tests/all`) because only a package's own tests are sure to have its
//! binary built.

use std::process::{Command, Output};

use aq_tests::guests::{OTHER_WORLD, TRAP};
use aq_tests::workspace_root;

fn aq() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aq"));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = cmd.output().unwrap();
    (status.code().unwrap_or(-1), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

/// Runs `aq <args> FILE` on generated damage of the valid file `good` (empty, truncated at
/// several points, random bytes): each is refused (exit 1 for a file that is wrong, 2 for one
/// that cannot be read as the format) with a short message, never accepted and never a panic.
fn refuses_damaged(args: &[&str], good: &[u8], dir: &std::path::Path) {
    let mut rng = aq_tests::Rng(0x2545_f491_4f6c_dd1d_u64);
    let mut random = |n: usize| rng.bytes(n);
    let mut inputs: Vec<(String, Vec<u8>)> = vec![("an empty file".into(), Vec::new())];
    for cut in [1, good.len() / 10, good.len() / 3, good.len() / 2, good.len() - 1] {
        inputs.push((format!("the file cut at byte {cut}"), good[..cut].to_vec()));
    }
    for n in [1, 100, 10_000] {
        inputs.push((format!("{n} random bytes"), random(n)));
    }
    let path = dir.join("damaged");
    for (what, bytes) in inputs {
        std::fs::write(&path, &bytes).unwrap();
        let (code, out, err) = run(aq().args(args).arg(&path));
        let said = format!("{out}{err}");
        assert!(code == 1 || code == 2, "aq {} on {what}: exit {code}\n{said}", args.join(" "));
        assert!(!said.contains("panicked") && !said.trim().is_empty() && said.lines().count() <= 3, "aq {} on {what}:\n{said}", args.join(" "));
    }
}

#[test]
fn policy_test_passes_on_the_builtin_fixtures() {
    for name in ["open", "ephemeral", "critical", "quota"] {
        let (code, out, err) = run(aq().args([
            "policy",
            "test",
            &format!("builtin:{name}"),
            "--config",
            &format!("policies/{name}/config.json"),
            &format!("policies/{name}/fixtures"),
        ]));
        assert_eq!(code, 0, "{name}: {out}{err}");
        assert!(out.contains(" passed, 0 failed"), "{out}");
        assert!(!out.contains("FAIL"), "{out}");
    }
}

#[test]
fn policy_test_exits_1_on_a_mismatch_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("wrong.json");
    std::fs::write(
        &fixture,
        r#"{"cases": [{"name": "unsigned write wrongly expected to pass",
             "context": {"ops": [{"put": {"key": "/registry/secrets/a", "value": "x"}}]},
             "expect": {"verdict": "allow"}}]}"#,
    )
    .unwrap();
    let (code, out, _) = run(aq().args(["policy", "test", "builtin:critical", "--config", "policies/critical/config.json"]).arg(&fixture));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  wrong.json / unsigned write wrongly expected to pass: verdict: expected Allow"), "{out}");
    assert!(out.contains("0 passed, 1 failed"), "{out}");
}

#[test]
fn a_policy_failure_in_a_fixture_is_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("f.json");
    std::fs::write(&fixture, r#"{"cases": [{"name": "n", "context": {}, "expect": {"verdict": "deny"}}]}"#).unwrap();
    let (code, out, _) = run(aq().args(["policy", "test", TRAP]).arg(&fixture));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("policy failed: trapped"), "{out}");
}

#[test]
fn bad_inputs_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("policy.wasm");
    std::fs::write(&text, "not a component").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["policy", "inspect", "/nonexistent/policy.wasm"], "cannot read component /nonexistent/policy.wasm"),
        (&["policy", "inspect", text.to_str().unwrap()], "not a WebAssembly component"),
        (&["policy", "inspect", OTHER_WORLD], "does not fit world aq:governance/governance@0.1.1: missing export"),
        (&["policy", "inspect", "builtin:nope"], "no built-in policy \"nope\""),
        (&["policy", "test", "builtin:open", "/nonexistent/fixture.json"], "fixture /nonexistent/fixture.json does not exist"),
    ];
    for (args, expected) in cases {
        let (code, out, err) = run(aq().args(args));
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("aq: error: ") && err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn policy_inspect_describes_every_builtin_component_under_target() {
    let dir = workspace_root().join("target/wasm/wasm32-wasip2/wasm");
    for name in ["open", "ephemeral", "critical", "quota"] {
        let path = dir.join(format!("aq_policy_{name}.wasm"));
        let (code, out, err) = run(aq().args(["policy", "inspect"]).arg(&path));
        assert_eq!(code, 0, "{err}");
        let digest = blake3::hash(&std::fs::read(&path).unwrap()).to_hex().to_string();
        assert!(out.contains(&format!("digest     blake3:{digest}")), "{out}");
        assert!(out.contains("world      aq:governance/governance@0.1.1"), "{out}");
        assert!(out.contains("exports\n  aq:governance/policy@0.1.1"), "{out}");
        assert!(out.contains("imports\n  aq:governance/types@0.1.1"), "{out}");
        // The SDK asks the host for an admission review's Kubernetes user, so every Rust policy
        // imports the host interface.
        assert!(out.contains("aq:governance/host@0.1.1"), "{out}");
    }
}

/// Starts `aq serve` on a one-group managed layout in `data`; returns the process and the
/// managed etcd's address from its banner.
fn start_serve(data: &std::path::Path) -> (std::process::Child, String) {
    let served = aq_tests::serve_process(std::path::Path::new(env!("CARGO_BIN_EXE_aq")), aq_tests::ONE_GROUP_LAYOUT, data);
    // "aq: group main: etcd at http://127.0.0.1:<port> (managed, ...)"
    let etcd = served
        .banner
        .split("etcd at http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the banner names the managed etcd")
        .to_string();
    (served.child, etcd)
}

fn signal(child: &std::process::Child, signal: &str) {
    Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
}

#[test]
fn serve_stops_cleanly_on_sigterm_and_stops_its_managed_etcd() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, etcd) = start_serve(data.path());
    assert!(std::net::TcpStream::connect(&etcd).is_ok(), "managed etcd is up at {etcd}");
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "aq exits 0 on SIGTERM: {status}");
    // Dropping the gateway killed and reaped its etcd before aq exited.
    assert!(std::net::TcpStream::connect(&etcd).is_err(), "managed etcd at {etcd} was stopped");
}

/// Runs `aq` against a gateway's admin API, off the async workers so the gateway keeps serving.
async fn remote(gw: &aq_tests::etcd::TestGateway, args: &[&str]) -> (i32, String, String) {
    let mut cmd = aq();
    cmd.args(args)
        .arg(format!("--admin-url=http://{}", gw.running.admin_addr.unwrap()))
        .arg("--data-dir")
        .arg(gw.data_dir())
        .env_remove("AQ_TOKEN")
        .env_remove("AQ_ADMIN_URL");
    tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pushes_binds_evaluates_and_rolls_back_over_the_admin_api() {
    let gw = aq_tests::etcd::TestGateway::start().await;
    let example = aq_tests::guests::EXAMPLE_DENY_PREFIX;
    let digest = blake3::hash(&std::fs::read(example).unwrap()).to_hex().to_string();
    let short = &digest[..12];

    let (code, out, err) = remote(&gw, &["policy", "push", example]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), format!("stored blake3:{digest} ({} bytes)", std::fs::metadata(example).unwrap().len()));
    let (code, out, _) = remote(&gw, &["policy", "ls"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("DIGEST"), "{out}");
    assert!(out.lines().any(|l| l.starts_with(short) && l.contains(" - ")), "unbound: {out}");

    let (code, out, err) =
        remote(&gw, &["policy", "bind", "registry", &digest, "--config", r#"{"read_only": ["/registry/ro/"]}"#]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("scope registry: policy {short} bound (generation 2")), "{out}");
    let (code, out, _) = remote(&gw, &["eval", "registry", "--put", "/registry/ro/x=v"]).await;
    assert_eq!(code, 1, "denied: {out}");
    assert!(out.starts_with("deny: /registry/ro/x is under the read-only prefix"), "{out}");
    let (code, out, _) = remote(&gw, &["eval", "registry", "--put", "/registry/rw/x=v", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(answer["policy"], digest);

    let (code, out, _) = remote(&gw, &["scopes", "ls"]).await;
    assert_eq!(code, 0);
    let registry = out.lines().find(|l| l.trim_start().starts_with("registry ")).unwrap_or_else(|| panic!("{out}"));
    assert!(registry.contains(short) && registry.contains("main"), "{registry}");
    assert!(out.lines().any(|l| l.starts_with("    secrets")), "nested under registry: {out}");

    let (code, out, err) = remote(&gw, &["policy", "rollback", "registry"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("restored"), "{out}");
    let (code, out, _) = remote(&gw, &["eval", "registry", "--put", "/registry/ro/x=v"]).await;
    assert_eq!(code, 0, "quota allows it again: {out}");

    // Refusals are the API's words, exit 1; a wrong token is named as such.
    let (code, _, err) = remote(&gw, &["policy", "rm", &digest]).await;
    assert_eq!(code, 1);
    assert!(err.contains("bound to scope(s) registry") && err.contains("HTTP 409"), "{err}");
    let (code, _, err) = remote(&gw, &["policy", "ls", "--token", "wrong"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not known") && err.contains("HTTP 401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_moves_a_scope_and_shows_its_migrations() {
    let gw = aq_tests::etcd::TestGateway::start().await;
    let mut client = gw.client().await;
    for i in 0..20 {
        client.put(format!("/registry/pods/p{i:02}"), "v", None).await.unwrap();
    }
    let (code, out, err) = remote(&gw, &["scopes", "move", "registry", "--to", "events"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let phases: Vec<&str> = out.lines().filter_map(|l| l.split(": ").nth(1)?.split(' ').next()).collect();
    assert_eq!(phases.last(), Some(&"done"), "{out}");
    assert!(out.contains("20 of 20 keys copied"), "{out}");
    let id = out.split(':').next().unwrap().to_string();
    let (code, out, _) = remote(&gw, &["scopes", "ls"]).await;
    assert_eq!(code, 0);
    let registry = out.lines().find(|l| l.trim_start().starts_with("registry ")).unwrap_or_else(|| panic!("{out}"));
    assert!(registry.contains("events"), "moved: {registry}");

    let (code, out, _) = remote(&gw, &["migrations", "ls"]).await;
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("registry") && row.contains("main → events") && row.contains("done") && row.contains("20/20"), "{row}");
    let (code, out, _) = remote(&gw, &["migrations", "show", &id, "--json"]).await;
    assert_eq!(code, 0);
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((record["phase"].as_str(), record["keys_copied"].as_u64()), (Some("done"), Some(20)));

    // Split the moved scope at p10: the upper half becomes its own scope and moves back to main.
    let (code, out, err) =
        remote(&gw, &["scopes", "split", "registry", "--at", "/registry/pods/p10", "--to", "main", "--id", "late-pods"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("scope late-pods split off registry"), "{out}");
    assert!(out.contains("10 of 10 keys copied") && out.lines().last().unwrap_or_default().contains("done"), "{out}");
    let (_, out, _) = remote(&gw, &["scopes", "ls"]).await;
    let late = out.lines().find(|l| l.trim_start().starts_with("late-pods ")).unwrap_or_else(|| panic!("{out}"));
    assert!(late.contains("main"), "split and moved back: {late}");
    // aq groups ls names each group's scopes as they are now.
    let (code, out, _) = remote(&gw, &["groups", "ls"]).await;
    assert_eq!(code, 0, "{out}");
    let row = |group: &str| out.lines().find(|l| l.starts_with(&format!("{group} "))).unwrap_or_else(|| panic!("{out}")).to_string();
    let (main, events) = (row("main"), row("events"));
    assert!(main.contains("late-pods") && main.contains(gw.main.url()) && main.contains("configured"), "{main}");
    assert!(events.contains("registry,") && !events.contains("late-pods"), "{events}");
    let mut keys = 0;
    for i in 0..20 {
        let got = client.get(format!("/registry/pods/p{i:02}"), None).await.unwrap();
        keys += got.kvs().len();
    }
    assert_eq!(keys, 20, "every key still reads after the split");
    // A split key outside the scope is refused, naming the key.
    let (code, _, err) = remote(&gw, &["scopes", "split", "registry", "--at", "/zzz"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 400") && err.contains("/zzz"), "{err}");

    // Merged back, the upper half returns to its parent on events.
    let (code, out, err) = remote(&gw, &["scopes", "merge", "late-pods"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("scope late-pods merges into registry"), "{out}");
    assert!(out.contains("10 of 10 keys copied") && out.lines().last().unwrap_or_default().contains("done"), "{out}");
    let (_, out, _) = remote(&gw, &["scopes", "ls"]).await;
    assert!(!out.contains("late-pods"), "merged: {out}");
    let pods = client.get("/registry/pods/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(pods.kvs().len(), 20, "every key still reads after the merge");
    let (code, _, err) = remote(&gw, &["scopes", "merge", "catch-all"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 400") && err.contains("nothing to merge"), "{err}");

    // A move to where the scope is, or to no such group, is refused with the reason, exit 1.
    let (code, _, err) = remote(&gw, &["scopes", "move", "registry", "--to", "events"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 400") && err.contains("events"), "{err}");
    let (code, _, err) = remote(&gw, &["migrations", "show", "no-such"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 404"), "{err}");
}

#[test]
fn keys_gen_writes_a_private_key_readable_only_by_its_owner_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("publisher.key");
    let (code, out, err) = run(aq().args(["keys", "gen", "--out"]).arg(&key));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let public = std::fs::read_to_string(dir.path().join("publisher.key.pub")).unwrap();
    assert_eq!(public.trim().len(), 64);
    assert!(out.contains(public.trim()), "{out}");
    let before = std::fs::read(&key).unwrap();
    let (code, _, err) = run(aq().args(["keys", "gen", "--out"]).arg(&key));
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_serve_tls_and_refuse_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.path().join("aq.pem"), dir.path().join("aq-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let gw = aq_tests::etcd::TestGateway::start_tls(aq_host::tls::TlsFiles { cert: cert.clone(), key }).await;
    let etcdctl = |scheme: &str, args: &[&str]| {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={scheme}://{}", gw.running.addr))
            .arg("--dial-timeout=3s")
            .arg("--command-timeout=5s")
            .args(args);
        async move { tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap() }
    };
    let cacert = format!("--cacert={}", cert.display());

    // The etcd API: etcdctl over TLS works and policies still govern.
    let (code, out, err) = etcdctl("https", &[&cacert, "put", "/registry/pods/ns/tls", "v"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = etcdctl("https", &[&cacert, "get", "/registry/pods/ns/tls", "--print-value-only"]).await;
    assert_eq!((code, out.trim()), (0, "v"));
    let (code, _, err) = etcdctl("https", &[&cacert, "put", "/registry/secrets/ns/s", "v"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("PermissionDenied"), "{err}");
    // Without TLS, or without trusting the certificate, nothing gets through.
    let (code, _, _) = etcdctl("http", &["put", "/registry/pods/ns/plain", "v"]).await;
    assert_ne!(code, 0, "plaintext must not be served");

    // The admin API: the CLI over https with the CA; refused without it.
    let admin_url = format!("--admin-url=https://127.0.0.1:{}", gw.running.admin_addr.unwrap().port());
    let cli = |args: Vec<String>| {
        let mut cmd = aq();
        cmd.args(args).arg(&admin_url).arg("--data-dir").arg(gw.data_dir()).env_remove("AQ_TOKEN").env_remove("AQ_CACERT");
        async move { tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap() }
    };
    let (code, out, err) = cli(vec!["scopes".into(), "ls".into(), format!("--cacert={}", cert.display())]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("registry"), "{out}");
    let (code, _, err) = cli(vec!["scopes".into(), "ls".into()]).await;
    assert_eq!(code, 2, "an untrusted certificate is refused: {err}");
    assert!(err.contains("cannot reach the admin API"), "{err}");

    // Unreadable or mismatched files are named at start-up.
    let error = aq_host::tls::TlsFiles { cert: dir.path().join("missing.pem"), key: cert.clone() }.server_config().unwrap_err();
    assert!(error.contains("cannot read the TLS certificate") && error.contains("missing.pem"), "{error}");
    let error = aq_host::tls::TlsFiles { cert: cert.clone(), key: cert.clone() }.server_config().unwrap_err();
    assert!(error.contains("not a PEM private key"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_added_with_the_cli_signs_a_secret_put_with_aq_put() {
    let gw = aq_tests::etcd::TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("alice.key");
    let (code, out, err) = run(aq().args(["keys", "gen", "--out"]).arg(&key));
    assert_eq!(code, 0, "{out}{err}");
    let public = dir.path().join("alice.key.pub");
    let (code, out, err) =
        remote(&gw, &["principals", "add", "alice", "--key", public.to_str().unwrap(), "--role", "secret-writer"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "principal alice: 1 key(s), roles secret-writer");
    let (code, out, _) = remote(&gw, &["principals", "ls"]).await;
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("alice") && l.contains("secret-writer")), "{out}");

    let endpoint = format!("--endpoint=http://{}", gw.endpoint());
    let key_arg = format!("--key={}", key.display());
    let (code, out, err) = remote(&gw, &["put", "/registry/secrets/default/db", "s3cr3t", &key_arg, &endpoint]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("OK (scope secrets, revision "), "the scope was looked up: {out}");
    let mut direct = gw.main.client().await;
    assert_eq!(direct.get("/registry/secrets/default/db", None).await.unwrap().kvs()[0].value(), b"s3cr3t");
    let (code, out, _) = remote(&gw, &["del", "/registry/secrets/default/db", &key_arg, &endpoint, "--scope=secrets"]).await;
    assert_eq!((code, out.trim()), (0, "1"));

    // Once alice is removed, her signature no longer counts.
    let (code, _, _) = remote(&gw, &["principals", "rm", "alice"]).await;
    assert_eq!(code, 0);
    let (code, _, err) = remote(&gw, &["put", "/registry/secrets/default/db", "again", &key_arg, &endpoint]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no principal has the public key") && err.contains("Unauthenticated"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_export_and_offline_verify_through_the_cli() {
    let gw = aq_tests::etcd::TestGateway::start().await;
    // secrets under critical keeps full lineage of signed writes.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("alice.key");
    assert_eq!(run(aq().args(["keys", "gen", "--out"]).arg(&key)).0, 0);
    let public = dir.path().join("alice.key.pub");
    let (code, out, err) =
        remote(&gw, &["principals", "add", "alice", "--key", public.to_str().unwrap(), "--role", "secret-writer"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let endpoint = format!("--endpoint=http://{}", gw.endpoint());
    let key_arg = format!("--key={}", key.display());
    for value in ["one", "two"] {
        let (code, out, err) = remote(&gw, &["put", "/registry/secrets/ns/db", value, &key_arg, &endpoint, "--scope=secrets"]).await;
        assert_eq!(code, 0, "{out}{err}");
    }

    let export = dir.path().join("secrets.json");
    let (code, _, err) = remote(&gw, &["lineage", "export", "secrets", "--out", export.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exported 2 records"), "{err}");
    let identity = std::fs::read_to_string(gw.data_dir().join("identity.key")).unwrap();
    let signer = ed25519_dalek::SigningKey::from_bytes(
        &(0..64).step_by(2).map(|i| u8::from_str_radix(&identity.trim()[i..i + 2], 16).unwrap()).collect::<Vec<_>>().try_into().unwrap(),
    );
    let trust = format!("--trust={}", signer.verifying_key().as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>());
    let (code, out, _) = run(aq().args(["lineage", "verify"]).arg(&export).arg(&trust));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: scope secrets: 2 records"), "{out}");

    // Swap the two records in the file: the offline check names the first out of place.
    let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&export).unwrap()).unwrap();
    let records = doc["records"].as_array_mut().unwrap();
    let first = records[0]["record"].clone();
    records[0]["record"] = records[1]["record"].clone();
    records[1]["record"] = first;
    std::fs::write(&export, serde_json::to_string(&doc).unwrap()).unwrap();
    let (code, out, _) = run(aq().args(["lineage", "verify"]).arg(&export));
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("FAILED: scope secrets: record 0:"), "{out}");
    refuses_damaged(&["lineage", "verify"], &std::fs::read(&export).unwrap(), dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_replica_never_lands_a_write_on_the_group_that_gave_its_scope_away() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let gw = aq_tests::etcd::TestGateway::start().await;
    // A second replica, as its own process, so that it can be paused.
    let dir = tempfile::tempdir().unwrap();
    let served = aq_tests::serve_process(std::path::Path::new(env!("CARGO_BIN_EXE_aq")), &gw.layout(), dir.path());
    let (mut replica, endpoint) = (served.child, served.endpoint);
    let mut client = etcd_client::Client::connect([endpoint.as_str()], None).await.unwrap();

    // A writer through the replica, one key after another, noting what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<i64>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match client.put(format!("/registry/pods/ns/k{n:06}"), "v", None).await {
                    Ok(answer) => acked.lock().unwrap().push(answer.header().unwrap().revision()),
                    Err(e) => refused.lock().unwrap().push(e.to_string()),
                }
                n += 1;
            }
        })
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what} did not happen within 30 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    tokio::task::block_in_place(|| wait_for("20 acknowledged writes", &|| acked.lock().unwrap().len() >= 20));

    // Pause the replica mid-stream, move the registry scope off main behind its back, resume it.
    let pid = replica.id() as i32;
    // SAFETY: signals to the child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    gw.revoke_from_main("registry").await;
    let mut main = gw.main.client().await;
    let moved_at = main.get("/", None).await.unwrap().header().unwrap().revision();
    unsafe { libc::kill(pid, libc::SIGCONT) };

    tokio::task::block_in_place(|| {
        wait_for("a refusal naming the move", &|| {
            refused.lock().unwrap().iter().any(|e| e.contains("no longer holds the keys of scope registry"))
        })
    });
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let _ = replica.kill();
    let _ = replica.wait();

    // Nothing reached main after the move; everything acknowledged had landed before it.
    let written = main.get("/registry/pods/ns/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert!(written.count() >= 20);
    for kv in written.kvs() {
        assert!(kv.mod_revision() <= moved_at, "{} landed at {} after the move at {moved_at}", kv.key_str().unwrap(), kv.mod_revision());
    }
    assert!(acked.lock().unwrap().iter().all(|rev| *rev <= moved_at), "an acknowledged write claims a revision after the move");
    let refused = refused.lock().unwrap();
    assert!(refused.iter().all(|e| e.contains("no longer holds the keys of scope registry")), "{refused:?}");
}

#[test]
fn bench_split_splits_a_loaded_scope_under_writers_and_loses_nothing() {
    let out = aq().args(["bench", "split", "--keys", "2000", "--writers", "4", "--seconds", "1"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("1000 keys copied"), "the upper half moves: {stdout}");
    for line in ["write errors              0", "lost writes               0", "aq after the split"] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aq_snapshot_save_writes_a_verified_archive_and_verify_names_damage() {
    let gw = aq_tests::etcd::TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/p", "v", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.aqsnap");
    let endpoint = gw.endpoint();
    let mut save = aq();
    save.args(["snapshot", "save"]).arg(&path).args(["--endpoints", &endpoint]);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(&mut save)).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with(&format!("snapshot saved at {}: 2 groups", path.display())), "{out}");
    assert!(out.contains("  events ") && out.contains("  main "), "{out}");
    assert!(!dir.path().join("backup.part").exists(), "the partial file was renamed");

    let (code, out, _) = run(aq().args(["snapshot", "verify"]).arg(&path));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: "), "{out}");
    let (code, out, _) = run(aq().args(["snapshot", "verify", "--json"]).arg(&path));
    assert_eq!(code, 0);
    let manifest: serde_json::Value = serde_json::from_str(&out).expect("--json prints the manifest");
    assert_eq!(manifest["format"], "aq-snapshot/1");
    // The test's groups are external: restore writes their snapshots out for their operators.
    let target = dir.path().join("restored");
    let (code, out, err) = run(aq().args(["snapshot", "restore"]).arg(&path).arg("--data-dir").arg(&target));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("group main: aq does not manage it"), "{out}");
    assert!(target.join("restore/events.db").exists() && target.join("restore/main.db").exists());

    refuses_damaged(&["snapshot", "verify"], &std::fs::read(&path).unwrap(), dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&path, &bytes).unwrap();
    let (code, out, _) = run(aq().args(["snapshot", "verify"]).arg(&path));
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("FAILED: ") && out.contains("truncated"), "{out}");
    let (code, _, err) = run(aq().args(["snapshot", "verify"]).arg(dir.path().join("absent")));
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");
}

/// `aq policy new` in every language: the project builds with its own script and passes its own
/// fixtures on the built component, and `aq policy inspect` reads it.
#[test]
fn policy_new_scaffolds_a_project_that_builds_and_passes_its_fixtures_in_every_language() {
    let root = workspace_root();
    let tools = root.join("target").join("tools");
    let dir = tempfile::tempdir().unwrap();
    let builders = [
        ("python", "COMPONENTIZE_PY", tools.join("python").join("bin").join("componentize-py")),
        ("js", "COMPONENTIZE_JS", tools.join("js").join("node_modules").join(".bin").join("componentize-js")),
        ("rust", "CARGO_TARGET_DIR", root.join("target").join("scaffolded")),
    ];
    for (language, variable, value) in builders {
        let project = dir.path().join(format!("my-{language}-policy"));
        let (code, out, err) = run(aq().args(["policy", "new", "--lang", language]).arg(&project));
        assert_eq!(code, 0, "{language}: {out}{err}");
        assert!(out.contains("created"), "{out}");
        let mut build = Command::new(project.join("build.sh"));
        build.env(variable, &value);
        for leaked in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
            build.env_remove(leaked);
        }
        let (code, out, err) = run(&mut build);
        assert_eq!(code, 0, "{language} build: {out}{err}");
        let component = project.join("policy.wasm");
        let (code, out, err) = run(aq()
            .args(["policy", "test"])
            .arg(&component)
            .arg("--config")
            .arg(project.join("config.json"))
            .arg(project.join("fixtures")));
        assert_eq!(code, 0, "{language} fixtures: {out}{err}");
        assert!(out.contains("3 passed, 0 failed"), "{language}: {out}");
        let (code, out, err) = run(aq().args(["policy", "inspect"]).arg(&component));
        assert_eq!(code, 0, "{language} inspect: {out}{err}");
        assert!(out.contains("aq:governance/policy@0.1.1"), "{language}: {out}");
    }
    // A directory that holds something, and a name that cannot name a package, are refused.
    let taken = dir.path().join("my-python-policy");
    let (code, _, err) = run(aq().args(["policy", "new", "--lang", "js"]).arg(&taken));
    assert_eq!(code, 2);
    assert!(err.contains("already exists and is not empty"), "{err}");
    let (code, _, err) = run(aq().args(["policy", "new", "--lang", "js"]).arg(dir.path().join("Bad_Name")));
    assert_eq!(code, 2);
    assert!(err.contains("use lowercase letters, digits and '-'"), "{err}");
}

#[test]
fn bench_soak_prints_every_interval_survives_its_faults_and_levels_off() {
    let soak = ["bench", "soak", "--minutes", "0.3", "--clients", "4", "--fault-every", "6", "--members", "3"];
    let (code, out, err) = run(aq().args(soak));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("one member of a managed 3-member group killed every 6 s"), "{out}");
    let rows: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    assert!(rows.len() >= 3, "a sample every 5 s:\n{out}");
    let faults: u64 = rows.last().unwrap().split_whitespace().last().unwrap().parse().unwrap();
    assert!(faults >= 2, "a member killed every 6 s:\n{out}");
    let ops: f64 = rows.last().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(ops > 0.0, "aq serves after the faults:\n{out}");
    assert!(out.contains("ok: aq's memory levelled off"), "{out}");
}
