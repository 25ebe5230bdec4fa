// Shared by the build scripts of `aq-host` (built-in policies) and `aq-tests` (test guests):
// compiles workspace crates to wasm32-wasip2 components with a nested cargo, into
// `target/wasm`, so `cargo build` and `cargo test` alone produce every component.

/// The aq workspace root: the nearest directory above the crate being built with `wit/` and
/// `sdk/`.
fn workspace_root() -> std::path::PathBuf {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .find(|dir| dir.join("wit").is_dir() && dir.join("sdk").is_dir())
        .expect("the aq workspace root (a directory with wit/ and sdk/)")
        .to_path_buf()
}

/// Builds `packages` and returns, per package, the path of its `.wasm` component.
fn build_wasm_components(packages: &[&str]) -> Vec<(String, std::path::PathBuf)> {
    let workspace = workspace_root();
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

/// A policy written in another language than Rust, and how its component is built.
#[allow(dead_code)]
struct ScriptPolicy {
    /// The language, as the conformance suite names the edition (`python`, `js`).
    language: &'static str,
    /// The folder holding its sources, relative to the workspace root.
    dir: &'static str,
}

/// Builds policies written in Python (componentize-py) and JavaScript (componentize-js) with the
/// toolchains `scripts/setup.sh` installs under `target/tools`, into `target/wasm/script`.
/// A component newer than its sources, the WIT and the toolchain is not built again.
#[allow(dead_code)]
fn build_script_components(policies: &[ScriptPolicy]) -> Vec<std::path::PathBuf> {
    let workspace = workspace_root();
    let tools = workspace.join("target").join("tools");
    let out_dir = workspace.join("target").join("wasm").join("script");
    std::fs::create_dir_all(&out_dir).expect("create target/wasm/script");
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let newest = |paths: &[std::path::PathBuf]| -> Option<std::time::SystemTime> {
        let mut newest = None;
        for path in paths {
            let files: Vec<std::path::PathBuf> = if path.is_dir() {
                std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()
            } else {
                vec![path.clone()]
            };
            for file in files {
                newest = newest.max(modified(&file));
            }
        }
        newest
    };
    let mut built = Vec::new();
    for policy in policies {
        let dir = workspace.join(policy.dir);
        let name = dir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "policy".into());
        let output = out_dir.join(format!("{name}-{}.wasm", policy.language));
        println!("cargo:rerun-if-changed={}", dir.display());
        let (program, marker, args): (std::path::PathBuf, std::path::PathBuf, Vec<String>) = match policy.language {
            // componentize-py leaves __pycache__ beside the sources it reads, so it reads a copy.
            "python" => (
                tools.join("python").join("bin").join("componentize-py"),
                tools.join("python").join("requirements.txt"),
                vec![
                    "-d".into(), workspace.join("wit").display().to_string(),
                    "-w".into(), "governance".into(),
                    "componentize".into(),
                    "-p".into(), out_dir.join(format!("{name}-python-src")).display().to_string(),
                    "app".into(),
                    "-o".into(), output.display().to_string(),
                ],
            ),
            "js" => (
                tools.join("js").join("node_modules").join(".bin").join("componentize-js"),
                tools.join("js").join("installed-lock.json"),
                vec![
                    dir.join("policy.js").display().to_string(),
                    "--wit".into(), workspace.join("wit").display().to_string(),
                    "-n".into(), "governance".into(),
                    // No clocks, randomness or network inside policies: the host's WASI grants
                    // none of them anyway. stdio stays so that errors reach the host's report.
                    "-d".into(), "random".into(), "clocks".into(), "http".into(), "fetch-event".into(),
                    "-o".into(), output.display().to_string(),
                ],
            ),
            other => panic!("no build step for {other} policies"),
        };
        println!("cargo:rerun-if-changed={}", marker.display());
        if !program.exists() {
            panic!(
                "building {} needs {}, which `make test` / `make run` install (scripts/setup.sh); run it first",
                policy.dir,
                program.display()
            );
        }
        let inputs = [dir.clone(), workspace.join("wit"), marker.clone()];
        if let (Some(out), Some(src)) = (modified(&output), newest(&inputs))
            && out > src
        {
            built.push(output);
            continue;
        }
        if policy.language == "python" {
            let staged = out_dir.join(format!("{name}-python-src"));
            let _ = std::fs::remove_dir_all(&staged);
            std::fs::create_dir_all(&staged).expect("stage the Python sources");
            for entry in std::fs::read_dir(&dir).expect("read the Python sources").flatten() {
                if entry.path().extension().is_some_and(|e| e == "py") {
                    std::fs::copy(entry.path(), staged.join(entry.file_name())).expect("stage a Python source");
                }
            }
        }
        let result = std::process::Command::new(&program)
            .args(&args)
            .current_dir(&workspace)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
        if !result.status.success() || !output.exists() {
            panic!(
                "building {} failed ({}):\n{}\n{}",
                policy.dir,
                result.status,
                String::from_utf8_lossy(&result.stdout),
                String::from_utf8_lossy(&result.stderr)
            );
        }
        built.push(output);
    }
    built
}
