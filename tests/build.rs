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
    let mut built = build_wasm_components(&packages);
    let (_, example) = built.pop().expect("deny-prefix was built");
    let mut out = String::new();
    for (name, (_, path)) in names.iter().zip(&built) {
        let constant = name.to_uppercase().replace('-', "_");
        out.push_str(&format!("/// The `{name}` test guest component.\npub const {constant}: &str = {:?};\n", path.display().to_string()));
    }
    out.push_str(&format!("/// Every test guest, by name.\npub const ALL: &[(&str, &str)] = &[{}];\n",
        names.iter().map(|n| format!("({n:?}, {})", n.to_uppercase().replace('-', "_"))).collect::<Vec<_>>().join(", ")));
    out.push_str(&format!("/// The `examples/deny-prefix` policy component.\npub const EXAMPLE_DENY_PREFIX: &str = {:?};\n", example.display().to_string()));
    std::fs::write(std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("guests.rs"), out).unwrap();
}
