//! Compiles the test guests in `guests/` to wasm components and generates a constant with the
//! path of each, plus the list of all of them.

include!("../host/build/wasm_build.rs");

fn main() {
    let guests_dir = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("guests");
    let mut names: Vec<String> = std::fs::read_dir(&guests_dir)
        .expect("tests/guests")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let packages: Vec<String> = names.iter().map(|n| format!("aq-guest-{n}")).collect();
    let mut packages: Vec<&str> = packages.iter().map(String::as_str).collect();
    // The example policy doubles as a second policy to push and swap in admin API tests.
    packages.push("deny-prefix");
    // The Rust edition of the conformance policy (examples/namespaces).
    packages.push("namespaces-policy");
    let mut built = build_wasm_components(&packages);
    let (_, namespaces_rust) = built.pop().expect("namespaces-policy was built");
    let (_, example) = built.pop().expect("deny-prefix was built");
    // Its other editions. A new language is a folder beside these and a build step in
    // `build_script_components`; the conformance suite picks it up from this list.
    let scripts = build_script_components(&[
        ScriptPolicy { language: "python", dir: "examples/namespaces/python" },
        ScriptPolicy { language: "js", dir: "examples/namespaces/js" },
    ]);
    let hostile = build_script_components(&[
        ScriptPolicy { language: "python", dir: "tests/script-guests/hostile/python" },
        ScriptPolicy { language: "js", dir: "tests/script-guests/hostile/js" },
    ]);
    let mut out = String::new();
    for (name, (_, path)) in names.iter().zip(&built) {
        let constant = name.to_uppercase().replace('-', "_");
        out.push_str(&format!("/// The `{name}` test guest component.\npub const {constant}: &str = {:?};\n", path.display().to_string()));
    }
    out.push_str(&format!("/// Every test guest, by name.\npub const ALL: &[(&str, &str)] = &[{}];\n",
        names.iter().map(|n| format!("({n:?}, {})", n.to_uppercase().replace('-', "_"))).collect::<Vec<_>>().join(", ")));
    out.push_str(&format!("/// The `examples/deny-prefix` policy component.\npub const EXAMPLE_DENY_PREFIX: &str = {:?};\n", example.display().to_string()));
    let mut editions = vec![("rust", namespaces_rust)];
    editions.extend(["python", "js"].into_iter().zip(scripts));
    out.push_str("/// The editions of `examples/namespaces`, one per language: (language, component path).\npub const NAMESPACES: &[(&str, &str)] = &[");
    for (language, path) in &editions {
        out.push_str(&format!("({language:?}, {:?}), ", path.display().to_string()));
    }
    out.push_str("];\n");
    out.push_str("/// The hostile guests in other languages than Rust (`script-guests/hostile`): (language, component path).\npub const HOSTILE_SCRIPTS: &[(&str, &str)] = &[");
    for (language, path) in ["python", "js"].into_iter().zip(&hostile) {
        out.push_str(&format!("({language:?}, {:?}), ", path.display().to_string()));
    }
    out.push_str("];\n");
    std::fs::write(std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("guests.rs"), out).unwrap();
}
