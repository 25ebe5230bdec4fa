//! Compiles the built-in policies to wasm components and embeds them in the `aq` binary.

include!("build/wasm_build.rs");

const BUILTINS: [&str; 4] = ["open", "ephemeral", "critical", "quota"];

fn main() {
    compile_protos();
    let packages: Vec<String> = BUILTINS.iter().map(|name| format!("aq-policy-{name}")).collect();
    let packages: Vec<&str> = packages.iter().map(String::as_str).collect();
    let built = build_wasm_components(&packages);
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let mut out = String::from("/// The built-in policies, compiled from `policies/` by this crate's build script.\n");
    out.push_str("pub const BUILTINS: &[Builtin] = &[\n");
    for (name, (_, path)) in BUILTINS.iter().zip(&built) {
        let config = manifest_dir.join("..").join("policies").join(name).join("config.json");
        out.push_str(&format!(
            "    Builtin {{ name: {name:?}, component: include_bytes!({path:?}), component_path: {path:?}, \
             example_config: include_str!({config:?}) }},\n",
            path = path.display().to_string(),
            config = config.canonicalize().expect("policy config.json").display().to_string(),
        ));
    }
    out.push_str("];\n");
    let out_path = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("builtin.rs");
    std::fs::write(out_path, out).expect("write builtin.rs");
}

/// The lock, election and auth services: messages and server traits generated from `proto/`,
/// with etcd's header and key-value taken from etcd-client so answers carry its types.
fn compile_protos() {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".etcdserverpb.ResponseHeader", "::etcd_client::proto::PbResponseHeader")
        .extern_path(".mvccpb.KeyValue", "::etcd_client::proto::PbKeyValue")
        .compile_protos(&["proto/v3lock.proto", "proto/v3election.proto", "proto/v3auth.proto"], &["proto"])
        .expect("the lock, election and auth protos compile (is protobuf-compiler installed?)");
}
