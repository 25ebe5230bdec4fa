//! Runs the embedding example and checks every decision it prints and logs.

#[test]
fn the_embedded_gate_decides_writes_and_an_admission_review_without_etcd() {
    let dir = std::env::temp_dir().join(format!("aq-embed-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("decisions.log");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_aq-embed-example")).arg(&log).output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert_eq!(lines[0], "catch-all allow");
    assert_eq!(lines[1], "tenants allow");
    assert!(lines[2].starts_with("tenants deny: ") && lines[2].contains("64"), "the quota names the size: {}", lines[2]);
    assert!(lines[3].starts_with("secrets deny: ") && lines[3].contains("the request is unsigned"), "{}", lines[3]);
    assert_eq!(lines[4], "secrets allow");
    assert_eq!(lines[5], "admission 3f6c1c6e-0001 allowed=false code=403");

    // Every decision reached the log (written out before the program ended), the admission
    // review's with its Kubernetes user.
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = logged.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let scopes: Vec<&str> = lines.iter().map(|l| l["scope"].as_str().unwrap()).collect();
    assert_eq!(scopes, ["catch-all", "tenants", "tenants", "secrets", "secrets", "secrets"]);
    assert_eq!(lines[5]["transport"], "bob");
    assert_eq!(lines[5]["key"], "/registry/secrets/prod/api-key");
    std::fs::remove_dir_all(&dir).unwrap();
}
