// Shared by the build scripts of `aq-host` (built-in policies) and `aq-tests` (test guests):
// compiles workspace crates to wasm32-wasip2 components with a nested cargo, into
// `target/wasm`, so `cargo build` and `cargo test` alone produce every component.

/// Builds `packages` and returns, per package, the path of its `.wasm` component.
fn build_wasm_components(packages: &[&str]) -> Vec<(String, std::path::PathBuf)> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .ancestors()
        .find(|dir| dir.join("wit").is_dir() && dir.join("sdk").is_dir())
        .expect("the aq workspace root (a directory with wit/ and sdk/)")
        .to_path_buf();
    let target_dir = workspace.join("target").join("wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&workspace)
        .arg("build")
        .arg("--quiet")
        .arg("--target=wasm32-wasip2")
        .arg("--profile=wasm")
        .arg("--target-dir")
        .arg(&target_dir);
    for package in packages {
        cmd.arg("-p").arg(package);
    }
    // Flags meant for the host build must not leak into the wasm build.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the wasm components");
    if !status.success() {
        panic!(
            "building wasm components failed ({status}); is the target installed? \
             `rustup target add wasm32-wasip2` (make run / make test do this)"
        );
    }
    for dir in ["wit", "sdk", "policies", "examples", "tests/guests"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    packages
        .iter()
        .map(|package| {
            let file = format!("{}.wasm", package.replace('-', "_"));
            let path = target_dir.join("wasm32-wasip2").join("wasm").join(file);
            assert!(path.exists(), "cargo built {package} but {} is missing", path.display());
            (package.to_string(), path)
        })
        .collect()
}
