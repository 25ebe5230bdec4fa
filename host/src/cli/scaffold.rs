//! `aq policy new`: a policy project to start from, in Rust, Python or JavaScript. Each builds
//! with one script and passes its own fixtures as made. Every language's project is the same
//! policy, read-only key prefixes; the Rust one is `examples/deny-prefix` itself.

use std::path::{Path, PathBuf};

use super::CliError;

/// The languages a policy can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Language {
    /// Rust, with aq's SDK (`aq-sdk`).
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-js.
    Js,
}

impl Language {
    fn name(self) -> &'static str {
        match self {
            Language::Rust => "Rust",
            Language::Python => "Python",
            Language::Js => "JavaScript",
        }
    }
}

const WIT: &str = include_str!("../../../wit/governance.wit");
const README: &str = include_str!("../../templates/common/README.md");
const CONFIG: &str = include_str!("../../templates/common/config.json");
const FIXTURES: &str = include_str!("../../templates/common/fixtures.json");

/// `aq policy new --lang <language> <dir>`.
pub(super) fn new_policy(language: Language, dir: &Path, sdk: Option<&Path>) -> Result<(), CliError> {
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(CliError::Input(format!("{} already exists and is not empty; give a new directory", dir.display())));
    }
    let name = project_name(dir)?;
    let mut files: Vec<(PathBuf, String, bool)> = vec![
        ("README.md".into(), README.replace("{{language}}", language.name()), false),
        ("config.json".into(), CONFIG.to_string(), false),
        (PathBuf::from("fixtures").join("policy.json"), FIXTURES.to_string(), false),
        (PathBuf::from("wit").join("governance.wit"), WIT.to_string(), false),
    ];
    match language {
        Language::Python => {
            files.push(("app.py".into(), include_str!("../../templates/python/app.py").to_string(), false));
            files.push(("build.sh".into(), include_str!("../../templates/python/build.sh").to_string(), true));
        }
        Language::Js => {
            files.push(("policy.js".into(), include_str!("../../templates/js/policy.js").to_string(), false));
            files.push(("build.sh".into(), include_str!("../../templates/js/build.sh").to_string(), true));
        }
        Language::Rust => {
            let sdk = sdk_path(sdk)?;
            let manifest = include_str!("../../templates/rust/Cargo.toml").replace("{{sdk}}", &sdk.display().to_string());
            files.push(("Cargo.toml".into(), manifest, false));
            files.push((PathBuf::from("src").join("lib.rs"), include_str!("../../../examples/deny-prefix/src/lib.rs").to_string(), false));
            let build = include_str!("../../templates/rust/build.sh").replace("{{crate}}", &name.replace('-', "_"));
            files.push(("build.sh".into(), build, true));
        }
    }
    for (path, text, executable) in files {
        let path = dir.join(path);
        let text = text.replace("{{name}}", &name);
        write_file(&path, &text, executable)?;
        println!("created {}", path.display());
    }
    println!("next: {}/build.sh, then aq policy test {}/policy.wasm --config {0}/config.json {0}/fixtures", dir.display(), dir.display());
    Ok(())
}

/// The project's name: the directory's, as a package name (letters, digits, `-`).
fn project_name(dir: &Path) -> Result<String, CliError> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(CliError::Input(format!(
            "{:?} cannot name a policy: use lowercase letters, digits and '-', starting with a letter",
            name
        )));
    }
    Ok(name)
}

/// Where `aq-sdk` is: `--sdk`, or the copy in the source tree aq was built from.
fn sdk_path(given: Option<&Path>) -> Result<PathBuf, CliError> {
    let candidate = match given {
        Some(path) => path.to_path_buf(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("sdk"),
    };
    candidate.join("Cargo.toml").is_file().then(|| candidate.canonicalize().unwrap_or(candidate.clone())).ok_or_else(|| {
        CliError::Input(format!(
            "no aq-sdk at {}; give the path of aq's sdk/ directory with --sdk",
            candidate.display()
        ))
    })
}

fn write_file(path: &Path, text: &str, executable: bool) -> Result<(), CliError> {
    let failed = |e: std::io::Error| CliError::Input(format!("cannot write {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    std::fs::write(path, text).map_err(failed)?;
    if executable {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(failed)?;
    }
    Ok(())
}
