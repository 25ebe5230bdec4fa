//! The commands that talk to a running aq's admin API: `aq policy push|ls|bind|rollback|rm`,
//! `aq scopes ls|move`, `aq migrations ls|show` and `aq eval`. Tables for people by default, the API's JSON with `--json`.

use std::path::PathBuf;

use serde_json::{Value, json};
use tonic::Status;

use super::CliError;
use crate::engine::PolicyDigest;

/// Where the admin API is and how to authenticate.
#[derive(clap::Args, Clone)]
pub(super) struct Remote {
    /// The admin API's base URL.
    #[arg(long, env = "AQ_ADMIN_URL", default_value = "http://127.0.0.1:7070")]
    admin_url: String,
    /// Bearer token; default: the `admin-token` file in the data directory.
    #[arg(long, env = "AQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The data directory of a local `aq serve`, where its generated admin token is.
    #[arg(long, default_value = "aq-data")]
    data_dir: PathBuf,
    /// CA certificate (PEM) to trust for an https admin URL, e.g. a self-signed aq certificate.
    #[arg(long, env = "AQ_CACERT")]
    cacert: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// An answer of the admin API.
struct Answer {
    status: u16,
    body: Value,
}

impl Remote {
    fn token(&self) -> Option<String> {
        if let Some(token) = &self.token {
            return Some(token.clone());
        }
        std::fs::read_to_string(crate::serve::admin_token_path(&self.data_dir)).ok().map(|t| t.trim().to_string())
    }

    fn send(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>, headers: &[(&str, String)]) -> Result<Answer, CliError> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)));
        if let Some(path) = &self.cacert {
            config = config.tls_config(crate::tls::client_roots(path).map_err(|e| CliError::Input(format!("--cacert: {e}")))?);
        }
        let agent: ureq::Agent = config.build().into();
        let url = format!("{}{path}", self.admin_url.trim_end_matches('/'));
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = self.token() {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let (content_type, bytes) = body.unwrap_or(("application/json", Vec::new()));
        let request = request
            .header("content-type", content_type)
            .body(bytes)
            .map_err(|e| CliError::Input(format!("bad admin URL {url}: {e}")))?;
        let mut response = agent.run(request).map_err(|e| {
            CliError::Input(format!("cannot reach the admin API at {}: {e}; is aq serving there? (--admin-url)", self.admin_url))
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| CliError::Input(format!("cannot read the admin API's answer: {e}")))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
    }

    /// Sends a request; a non-2xx answer becomes the API's error, exit 1.
    fn call(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>, headers: &[(&str, String)]) -> Result<Value, CliError> {
        let answer = self.send(method, path, body, headers)?;
        if (200..300).contains(&answer.status) {
            return Ok(answer.body);
        }
        let detail = answer.body["detail"].as_str().map(str::to_string).unwrap_or_else(|| answer.body.to_string());
        let error = answer.body["error"].as_str().unwrap_or("error");
        Err(CliError::Refused(format!("{detail} (HTTP {} {error})", answer.status)))
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(method, path, Some(("application/json", serde_json::to_vec(body).expect("JSON"))), &[])
    }

    /// Prints the JSON when asked to; true when it did.
    fn print_json(&self, value: &Value) -> bool {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value).expect("JSON"));
        }
        self.json
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// Prints rows as left-aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// Reads an ed25519 signing key file: 64 hex digits (as `aq keys gen` writes).
pub(super) fn read_signing_key(path: &std::path::Path) -> Result<ed25519_dalek::SigningKey, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Input(format!("cannot read key {}: {e}", path.display())))?;
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| CliError::Input(format!("{} is not an ed25519 private key (64 hex digits)", path.display())))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&bytes))
}

/// `aq policy push`.
pub(super) fn push(remote: &Remote, component: &str, sign_key: Option<&std::path::Path>) -> Result<(), CliError> {
    let bytes = super::policy::component_bytes(component)?;
    let mut headers = Vec::new();
    if let Some(path) = sign_key {
        use ed25519_dalek::Signer;
        let key = read_signing_key(path)?;
        let signature = key.sign(&crate::admin::signed_message(&PolicyDigest::of(&bytes)));
        headers.push((crate::admin::SIGNATURE_HEADER, hex::encode(signature.to_bytes())));
    }
    let body = remote.call("POST", "/v1/policies", Some(("application/wasm", bytes)), &headers)?;
    if !remote.print_json(&body) {
        let digest = body["digest"].as_str().unwrap_or_default();
        let what = if body["created"] == json!(true) { "stored" } else { "already stored" };
        println!("{what} blake3:{digest} ({} bytes)", body["size"]);
    }
    Ok(())
}

/// `aq policy ls`.
pub(super) fn list_policies(remote: &Remote) -> Result<(), CliError> {
    let body = remote.call("GET", "/v1/policies", None, &[])?;
    if remote.print_json(&body) {
        return Ok(());
    }
    let rows = body["policies"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let bound: Vec<&str> = p["bound_to"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            vec![
                short(p["digest"].as_str().unwrap_or_default()).to_string(),
                p["size"].to_string(),
                if bound.is_empty() { "-".into() } else { bound.join(",") },
                p["publisher"].as_str().map(|k| short(k).to_string()).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["DIGEST", "BYTES", "BOUND TO", "PUBLISHER"], rows);
    Ok(())
}

/// Options of `aq policy bind`.
pub(super) struct BindOptions<'a> {
    pub config: Option<&'a str>,
    pub fail_mode: Option<&'a str>,
    pub timeout_ms: Option<u64>,
    pub memory_mib: Option<u64>,
}

/// `aq policy bind`.
pub(super) fn bind(remote: &Remote, scope: &str, digest: &str, options: BindOptions<'_>) -> Result<(), CliError> {
    let mut body = json!({ "digest": digest });
    if let Some(config) = options.config {
        let text = match config.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path).map_err(|e| CliError::Input(format!("cannot read {path}: {e}")))?,
            None => config.to_string(),
        };
        body["config"] = serde_json::from_str(&text)
            .map_err(|e| CliError::Input(format!("--config is not JSON ({e}); give JSON text or @file")))?;
    }
    if let Some(mode) = options.fail_mode {
        body["fail_mode"] = json!(mode);
    }
    if options.timeout_ms.is_some() || options.memory_mib.is_some() {
        let current = remote.call("GET", &format!("/v1/scopes/{scope}"), None, &[])?;
        let limits = &current["binding"]["limits"];
        body["limits"] = json!({
            "timeout_ms": options.timeout_ms.map(Value::from).unwrap_or_else(|| limits["timeout_ms"].clone()),
            "memory_mib": options.memory_mib.map(Value::from).unwrap_or_else(|| limits["memory_mib"].clone()),
        });
    }
    let answer = remote.json("PUT", &format!("/v1/scopes/{scope}/policy"), &body)?;
    print_change(remote, &answer, "bound");
    Ok(())
}

fn print_change(remote: &Remote, answer: &Value, verb: &str) {
    if remote.print_json(answer) {
        return;
    }
    let previous = answer["previous"]["digest"].as_str().map(short).unwrap_or("none");
    println!(
        "scope {}: policy {} {verb} (generation {}, previous {previous})",
        answer["scope"].as_str().unwrap_or_default(),
        short(answer["active"]["digest"].as_str().unwrap_or_default()),
        answer["generation"],
    );
}

/// `aq policy rollback`.
pub(super) fn rollback(remote: &Remote, scope: &str) -> Result<(), CliError> {
    let answer = remote.json("POST", &format!("/v1/scopes/{scope}/rollback"), &json!({}))?;
    print_change(remote, &answer, "restored");
    Ok(())
}

/// `aq policy rm`.
pub(super) fn remove(remote: &Remote, digest: &str) -> Result<(), CliError> {
    let answer = remote.call("DELETE", &format!("/v1/policies/{digest}"), None, &[])?;
    if !remote.print_json(&answer) {
        println!("deleted blake3:{}", answer["deleted"].as_str().unwrap_or_default());
    }
    Ok(())
}

/// `aq scopes ls`.
pub(super) fn list_scopes(remote: &Remote) -> Result<(), CliError> {
    let body = remote.call("GET", "/v1/scopes", None, &[])?;
    if remote.print_json(&body) {
        return Ok(());
    }
    fn walk(nodes: &Value, depth: usize, rows: &mut Vec<Vec<String>>) {
        for node in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
            let range = &node["range"];
            let end = range["end"].as_str().unwrap_or_default();
            let counters = &node["counters"];
            rows.push(vec![
                format!("{}{}", "  ".repeat(depth), node["id"].as_str().unwrap_or_default()),
                format!("[{:?}, {})", range["start"].as_str().unwrap_or_default(), if end.is_empty() { "∞".to_string() } else { format!("{end:?}") }),
                node["group"].as_str().unwrap_or_default().to_string(),
                short(node["binding"]["digest"].as_str().unwrap_or("-")).to_string(),
                node["binding"]["fail_mode"].as_str().unwrap_or("-").to_string(),
                counters["allowed"].to_string(),
                counters["denied"].to_string(),
                counters["swaps"].to_string(),
            ]);
            walk(&node["children"], depth + 1, rows);
        }
    }
    let mut rows = Vec::new();
    walk(&body["scopes"], 0, &mut rows);
    table(&["SCOPE", "KEYS", "GROUP", "POLICY", "FAILS", "ALLOWED", "DENIED", "SWAPS"], rows);
    Ok(())
}

/// `aq scopes move`: starts the move and, unless `detach`, prints each phase it reaches until
/// it ends.
pub(super) fn move_scope(remote: &Remote, scope: &str, to: &str, detach: bool) -> Result<(), CliError> {
    let started = remote.json("POST", &format!("/v1/scopes/{scope}/move"), &json!({ "group": to }))?;
    let id = started["id"].as_str().unwrap_or_default().to_string();
    if detach {
        if !remote.print_json(&started) {
            println!("migration {id} started: scope {scope} moves to group {to}; aq migrations show {id}");
        }
        return Ok(());
    }
    follow_migration(remote, &id)
}

/// `aq scopes split`: splits, then follows the new scope's move, if any, as `aq scopes move`.
pub(super) fn split_scope(remote: &Remote, scope: &str, at: &str, to: Option<&str>, id: Option<&str>, detach: bool) -> Result<(), CliError> {
    let answer = remote.json("POST", &format!("/v1/scopes/{scope}/split"), &json!({ "at": at, "group": to, "id": id }))?;
    let new = answer["scope"].as_str().unwrap_or_default();
    let migration = answer["migration"]["id"].as_str().map(str::to_string);
    if detach || migration.is_none() {
        if !remote.print_json(&answer) {
            println!("scope {new} split off {scope} at {at:?}");
            if let Some(migration) = &migration {
                println!("migration {migration} started: scope {new} moves to group {}; aq migrations show {migration}", to.unwrap_or_default());
            }
        }
        return Ok(());
    }
    if !remote.json {
        println!("scope {new} split off {scope} at {at:?}");
    }
    follow_migration(remote, &migration.expect("checked"))
}

/// `aq scopes merge`: merges, then follows the move onto the parent's group, if any.
pub(super) fn merge_scope(remote: &Remote, scope: &str, detach: bool) -> Result<(), CliError> {
    let answer = remote.json("POST", &format!("/v1/scopes/{scope}/merge"), &json!({}))?;
    let into = answer["into"].as_str().unwrap_or_default();
    let migration = answer["migration"]["id"].as_str().map(str::to_string);
    if detach || migration.is_none() {
        if !remote.print_json(&answer) {
            match &migration {
                Some(migration) => println!("migration {migration} started: scope {scope} merges into {into}; aq migrations show {migration}"),
                None => println!("scope {scope} merged into {into}"),
            }
        }
        return Ok(());
    }
    if !remote.json {
        println!("scope {scope} merges into {into}");
    }
    follow_migration(remote, &migration.expect("checked"))
}

/// Prints each phase migration `id` reaches until it ends; exit 1 unless it is done cleanly.
fn follow_migration(remote: &Remote, id: &str) -> Result<(), CliError> {
    // On a terminal (stderr, where the bar draws), a bar of the keys copied and their rate under
    // a line per phase; a line per phase alone otherwise; only the final record with --json.
    let bar = if remote.json { None } else { super::progress_bar(0, "{prefix} {msg:9} [{bar:30}] {pos}/{len} keys, {per_sec}, {elapsed}") }
        .map(|bar| bar.with_prefix(id.to_string()));
    let mut last_phase = String::new();
    let migration = loop {
        let migration = remote.call("GET", &format!("/v1/migrations/{id}"), None, &[])?;
        let phase = migration["phase"].as_str().unwrap_or_default().to_string();
        let line = format!("{id}: {phase} ({} of {} keys copied)", migration["keys_copied"], migration["keys_total"]);
        if let Some(bar) = &bar {
            bar.set_length(migration["keys_total"].as_u64().unwrap_or_default());
            bar.set_position(migration["keys_copied"].as_u64().unwrap_or_default());
            bar.set_message(phase.clone());
        }
        if phase != last_phase && !remote.json {
            match &bar {
                Some(bar) => bar.println(&line),
                None => println!("{line}"),
            }
            last_phase = phase.clone();
        }
        if phase == "done" || phase == "rolled-back" {
            break migration;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    if let Some(bar) = bar {
        bar.finish();
    }
    remote.print_json(&migration);
    match (migration["phase"].as_str(), migration["error"].as_str()) {
        (Some("done"), None) => Ok(()),
        (_, Some(error)) => Err(CliError::Refused(format!("migration {id} ended {}: {error}", migration["phase"]))),
        _ => Err(CliError::Refused(format!("migration {id} ended {}", migration["phase"]))),
    }
}

/// One migration as a table row.
fn migration_row(m: &Value) -> Vec<String> {
    let started = m["started_ms"].as_u64().unwrap_or_default();
    vec![
        m["id"].as_str().unwrap_or_default().to_string(),
        m["scope"].as_str().unwrap_or_default().to_string(),
        format!("{} → {}", m["from"].as_str().unwrap_or_default(), m["to"].as_str().unwrap_or_default()),
        m["phase"].as_str().unwrap_or_default().to_string(),
        format!("{}/{}", m["keys_copied"], m["keys_total"]),
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(started)).to_string(),
        m["error"].as_str().unwrap_or("-").to_string(),
    ]
}

const MIGRATION_COLUMNS: [&str; 7] = ["ID", "SCOPE", "GROUPS", "PHASE", "COPIED/KEYS", "STARTED", "ERROR"];

/// `aq migrations ls`.
pub(super) fn list_migrations(remote: &Remote) -> Result<(), CliError> {
    let body = remote.call("GET", "/v1/migrations", None, &[])?;
    if remote.print_json(&body) {
        return Ok(());
    }
    let rows = body["migrations"].as_array().map(Vec::as_slice).unwrap_or_default().iter().map(migration_row).collect();
    table(&MIGRATION_COLUMNS, rows);
    Ok(())
}

/// `aq groups ls`.
pub(super) fn list_groups(remote: &Remote) -> Result<(), CliError> {
    let body = remote.call("GET", "/v1/groups", None, &[])?;
    if remote.print_json(&body) {
        return Ok(());
    }
    let text = |v: &Value| -> String {
        v.as_array().map(Vec::as_slice).unwrap_or_default().iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")
    };
    let rows = body["groups"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|g| {
            let how = if g["started"].as_bool().unwrap_or_default() { "started for a split" } else { "configured" };
            vec![g["name"].as_str().unwrap_or_default().to_string(), text(&g["endpoints"]), text(&g["scopes"]), how.to_string()]
        })
        .collect();
    table(&["GROUP", "ENDPOINTS", "SCOPES", "ORIGIN"], rows);
    Ok(())
}

/// `aq migrations show`.
pub(super) fn show_migration(remote: &Remote, id: &str) -> Result<(), CliError> {
    let body = remote.call("GET", &format!("/v1/migrations/{id}"), None, &[])?;
    if remote.print_json(&body) {
        return Ok(());
    }
    table(&MIGRATION_COLUMNS, vec![migration_row(&body)]);
    println!(
        "copy revision {}, {} writes caught up, hand-off at revision {}",
        body["copy_revision"], body["events_applied"], body["handoff_revision"]
    );
    if let Some(shift) = body.get("revisions") {
        println!("revisions on {}: offset {}, floor {}, base {}", body["to"].as_str().unwrap_or_default(), shift["offset"], shift["floor"], shift["base"]);
    }
    Ok(())
}

/// `aq eval`: exit 0 when allowed, 1 when denied or approvals are needed.
pub(super) fn eval(remote: &Remote, scope: &str, puts: &[String], deletes: &[String]) -> Result<(), CliError> {
    let mut ops = Vec::new();
    for put in puts {
        let (key, value) = put.split_once('=').unwrap_or((put, ""));
        ops.push(json!({ "put": { "key": key, "value": value } }));
    }
    for key in deletes {
        ops.push(json!({ "delete": { "key": key } }));
    }
    if ops.is_empty() {
        return Err(CliError::Input("give at least one --put key=value or --delete key".into()));
    }
    let answer = remote.json("POST", &format!("/v1/scopes/{scope}/evaluate"), &json!({ "ops": ops }))?;
    if !remote.print_json(&answer) {
        let verdict = answer["verdict"].as_str().unwrap_or_default();
        let why = match verdict {
            "deny" => format!(": {}", answer["reason"].as_str().unwrap_or_default()),
            "require_approval" => format!(": threshold {} from {}", answer["rule"]["threshold"], answer["rule"]["voters"]),
            _ => String::new(),
        };
        println!(
            "{verdict}{why}\n  scope {scope}, policy {}, {:.1} µs, nothing written",
            short(answer["policy"].as_str().unwrap_or_default()),
            answer["elapsed_us"].as_f64().unwrap_or_default()
        );
    }
    if answer["verdict"] == "allow" { Ok(()) } else { Err(CliError::Check) }
}

/// `aq token`: a new admin API token and the configuration lines that accept it.
pub(super) fn token(name: &str, role: &str) -> Result<(), CliError> {
    crate::admin::Role::parse(role).map_err(CliError::Input)?;
    let token = crate::admin::auth::new_token().map_err(CliError::Input)?;
    println!("token: {token}");
    println!("# add to the [admin] section of aq's configuration; aq keeps only the hash");
    println!("[[admin.tokens]]\nname = {name:?}\nrole = {role:?}\nhash = {:?}", crate::admin::auth::hash_token(&token));
    Ok(())
}

/// `aq keys gen`: an ed25519 key pair; the private part mode 0600.
pub(super) fn keygen(out: &std::path::Path) -> Result<(), CliError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| CliError::Input(format!("the system random source failed: {e}")))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let public = hex::encode(key.verifying_key().as_bytes());
    crate::private_file::create(out, format!("{}\n", hex::encode(secret)).as_bytes()).map_err(CliError::Input)?;
    let public_path = PathBuf::from(format!("{}.pub", out.display()));
    std::fs::write(&public_path, format!("{public}\n"))?;
    println!("private key: {} (mode 0600)\npublic key:  {} = {public}", out.display(), public_path.display());
    Ok(())
}

/// `aq principals add`.
pub(super) fn add_principal(remote: &Remote, id: &str, keys: &[String], roles: &[String]) -> Result<(), CliError> {
    let mut hex_keys = Vec::new();
    for key in keys {
        // A key is hex, or a file holding it (`aq keys gen` writes `<name>.pub`).
        let text = if std::path::Path::new(key).exists() {
            std::fs::read_to_string(key).map_err(|e| CliError::Input(format!("cannot read {key}: {e}")))?
        } else {
            key.clone()
        };
        crate::trust::parse_public_key(&text).map_err(CliError::Input)?;
        hex_keys.push(text.trim().to_string());
    }
    let answer = remote.json("POST", "/v1/principals", &json!({ "id": id, "keys": hex_keys, "roles": roles }))?;
    if !remote.print_json(&answer) {
        println!("principal {id}: {} key(s), roles {}", hex_keys.len(), if roles.is_empty() { "none".into() } else { roles.join(",") });
    }
    Ok(())
}

/// `aq principals ls`.
pub(super) fn list_principals(remote: &Remote) -> Result<(), CliError> {
    let body = remote.call("GET", "/v1/principals", None, &[])?;
    if remote.print_json(&body) {
        return Ok(());
    }
    let strings = |v: &Value| -> Vec<String> { v.as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default() };
    let rows = body["principals"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let keys: Vec<String> = strings(&p["keys"]).iter().map(|k| short(k).to_string()).collect();
            vec![p["id"].as_str().unwrap_or_default().to_string(), strings(&p["roles"]).join(","), keys.join(",")]
        })
        .collect();
    table(&["PRINCIPAL", "ROLES", "KEYS"], rows);
    Ok(())
}

/// `aq principals rm`.
pub(super) fn remove_principal(remote: &Remote, id: &str) -> Result<(), CliError> {
    let answer = remote.call("DELETE", &format!("/v1/principals/{id}"), None, &[])?;
    if !remote.print_json(&answer) {
        println!("removed principal {id}");
    }
    Ok(())
}

/// The innermost scope owning `key`, from the admin API's scope tree.
fn owning_scope(remote: &Remote, key: &str) -> Result<String, CliError> {
    let body = remote.call("GET", "/v1/scopes", None, &[])?;
    fn find(nodes: &Value, key: &str, best: &mut Option<String>) {
        for node in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
            let start = node["range"]["start"].as_str().unwrap_or_default();
            let end = node["range"]["end"].as_str().unwrap_or_default();
            if key >= start && (end.is_empty() || key < end) {
                *best = node["id"].as_str().map(str::to_string);
                find(&node["children"], key, best);
            }
        }
    }
    let mut best = None;
    find(&body["scopes"], key, &mut best);
    best.ok_or_else(|| CliError::Input(format!("no scope owns {key}")))
}

/// `aq put` and `aq del`: a write signed with each `--key`.
pub(super) fn signed_write(remote: &Remote, signing: &super::SigningArgs, key: &str, value: Option<&str>) -> Result<(), CliError> {
    let keys: Vec<ed25519_dalek::SigningKey> = signing.keys.iter().map(|k| read_signing_key(k)).collect::<Result<_, _>>()?;
    let scope = match &signing.scope {
        Some(scope) => scope.clone(),
        None => owning_scope(remote, key)?,
    };
    let wait = match signing.wait {
        Some(s) if s.is_finite() && s >= 0.0 => Some(std::time::Duration::from_secs_f64(s)),
        Some(_) => return Err(CliError::Input("--wait takes seconds, 0 or more".into())),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let mut client = crate::client::SignedClient::connect(&signing.endpoint, keys).await.map_err(CliError::Input)?;
        if let Some(wait) = wait {
            client = client.with_wait(wait);
        }
        let refused = |status: Status| CliError::Refused(format!("{} ({:?})", status.message(), status.code()));
        match value {
            Some(value) => {
                let answer = client.put(&scope, key.as_bytes(), value.as_bytes()).await.map_err(refused)?;
                let revision = answer.header.map(|h| h.revision).unwrap_or_default();
                if remote.json {
                    println!("{}", json!({ "scope": scope, "revision": revision }));
                } else {
                    println!("OK (scope {scope}, revision {revision})");
                }
            }
            None => {
                let answer = client.delete(&scope, key.as_bytes(), &[]).await.map_err(refused)?;
                if remote.json {
                    println!("{}", json!({ "scope": scope, "deleted": answer.deleted }));
                } else {
                    println!("{}", answer.deleted);
                }
            }
        }
        Ok(())
    })
}

/// `aq proposals ls`.
pub(super) fn list_proposals(remote: &Remote, all: bool) -> Result<(), CliError> {
    let body = remote.call("GET", "/v1/proposals", None, &[])?;
    if remote.print_json(&body) {
        return Ok(());
    }
    let rows = body["proposals"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| all || p["state"] == "pending")
        .map(|p| {
            let approvers: Vec<&str> = p["approvals"].as_array().map(|a| a.iter().filter_map(|x| x["principal"].as_str()).collect()).unwrap_or_default();
            let expires = p["expires_at"].as_u64().unwrap_or_default();
            vec![
                p["id"].as_str().unwrap_or_default().to_string(),
                p["scope"].as_str().unwrap_or_default().to_string(),
                p["state"].as_str().unwrap_or_default().to_string(),
                format!("{}/{}", approvers.join(","), p["threshold"]),
                p["keys"].as_array().map(|k| k.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")).unwrap_or_default(),
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires)).to_string(),
            ]
        })
        .collect();
    table(&["ID", "SCOPE", "STATE", "APPROVED/NEEDED", "KEYS", "EXPIRES"], rows);
    Ok(())
}

/// `aq approve`: checks that the proposal's digest is the digest of its request, then signs it.
pub(super) fn approve(remote: &Remote, id: &str, key: &std::path::Path) -> Result<(), CliError> {
    use ed25519_dalek::Signer;
    let signing = read_signing_key(key)?;
    let body = remote.call("GET", &format!("/v1/proposals/{id}"), None, &[])?;
    let proposal: crate::trust::proposal::Proposal =
        serde_json::from_value(body).map_err(|e| CliError::Input(format!("the admin API's proposal does not parse: {e}")))?;
    let request = crate::gate::decode_request(&proposal).map_err(CliError::Input)?;
    let (ops, compares, _) = crate::gate::model_of(&request);
    let digest = crate::trust::proposal::Proposal::approval_digest(
        proposal.cluster_id,
        &proposal.scope,
        &proposal.id,
        proposal.expires_at,
        &ops,
        &compares,
    );
    if hex::encode(digest) != proposal.approval_digest {
        return Err(CliError::Input(format!(
            "proposal {id}'s digest does not match its request; not signing (server says {}, request gives {})",
            proposal.approval_digest,
            hex::encode(digest)
        )));
    }
    let signature = signing.sign(&digest);
    let answer = remote.json(
        "POST",
        &format!("/v1/proposals/{id}/approve"),
        &json!({ "key": hex::encode(signing.verifying_key().as_bytes()), "signature": hex::encode(signature.to_bytes()) }),
    )?;
    if !remote.print_json(&answer) {
        let state = answer["state"].as_str().unwrap_or_default();
        match state {
            "committed" => println!("proposal {id} committed at revision {}", answer["committed_revision"]),
            "void" => println!("proposal {id} is void: {}", answer["reason"].as_str().unwrap_or_default()),
            "committing" => println!("proposal {id}: approved, committing: {}", answer["reason"].as_str().unwrap_or("in progress")),
            _ => println!("proposal {id}: approved, {state}, keys {}", proposal.keys.join(" ")),
        }
    }
    if answer["state"] == "void" { Err(CliError::Check) } else { Ok(()) }
}

/// `aq reject`.
pub(super) fn reject(remote: &Remote, id: &str, reason: &str) -> Result<(), CliError> {
    let answer = remote.json("POST", &format!("/v1/proposals/{id}/reject"), &json!({ "reason": reason }))?;
    if !remote.print_json(&answer) {
        println!("proposal {id} rejected");
    }
    Ok(())
}

/// `aq lineage export`.
pub(super) fn lineage_export(remote: &Remote, scope: &str, out: Option<&std::path::Path>) -> Result<(), CliError> {
    // The export is one answer: on a terminal, a spinner with the time it takes.
    let spinner = super::progress_bar(0, "{spinner} exporting the lineage of {msg}, {elapsed}");
    if let Some(spinner) = &spinner {
        spinner.set_message(scope.to_string());
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    }
    let export = remote.call("GET", &format!("/v1/lineage/{scope}/export"), None, &[]);
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    let export = export?;
    let text = serde_json::to_string_pretty(&export).expect("JSON");
    match out {
        Some(path) => {
            std::fs::write(path, format!("{text}\n")).map_err(|e| CliError::Input(format!("cannot write {}: {e}", path.display())))?;
            eprintln!(
                "exported {} records and {} checkpoints of scope {scope} to {}",
                export["records"].as_array().map(Vec::len).unwrap_or_default(),
                export["checkpoints"].as_array().map(Vec::len).unwrap_or_default(),
                path.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(())
}

/// `aq lineage verify`: offline; exit 1 naming the record when the export does not verify.
pub(super) fn lineage_verify(path: &std::path::Path, trusted: &[String]) -> Result<(), CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))?;
    let export: crate::lineage::log::Export =
        serde_json::from_str(&text).map_err(|e| CliError::Input(format!("{} is not a lineage export: {e}", path.display())))?;
    let mut keys = Vec::new();
    for key in trusted {
        let text = if std::path::Path::new(key).exists() {
            std::fs::read_to_string(key).map_err(|e| CliError::Input(format!("cannot read {key}: {e}")))?
        } else {
            key.clone()
        };
        keys.push(crate::trust::parse_public_key(&text).map_err(CliError::Input)?);
    }
    let bar = super::progress_bar(export.records.len() as u64, "verify [{bar:30}] {pos}/{len} records, {per_sec}, {elapsed}");
    let verified = crate::lineage::log::verify_with_progress(&export, &keys, &mut |done| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match verified {
        Ok(verified) => {
            println!(
                "ok: scope {}: {} records, {} checkpoints, root log of {}; signed by {}",
                export.scope,
                verified.records,
                verified.checkpoints,
                export.root_log.len(),
                verified.signers.iter().chain(std::iter::once(&export.root_checkpoint.signer)).map(|k| short(k)).collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", ")
            );
            if keys.is_empty() {
                println!("note: signer keys were not pinned; pass --trust <key> to require them");
            }
            Ok(())
        }
        Err(e) => {
            println!("FAILED: scope {}: {e}", export.scope);
            Err(CliError::Check)
        }
    }
}
