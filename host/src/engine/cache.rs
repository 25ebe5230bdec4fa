//! On-disk cache of precompiled policies, keyed by content digest and the engine's
//! compatibility hash, so a policy is compiled once per digest per aq build and host.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::component::Component;

use super::PolicyDigest;

pub(super) struct CompileCache {
    dir: PathBuf,
    compatibility: String,
}

impl CompileCache {
    pub(super) fn new(engine: &wasmtime::Engine, dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache { dir: dir.to_path_buf(), compatibility: format!("{:016x}", hasher.finish()) })
    }

    fn path(&self, digest: &PolicyDigest) -> PathBuf {
        self.dir.join(format!("{}-{}.cwasm", digest.to_hex(), self.compatibility))
    }

    /// The cached compilation, if there is a usable one.
    pub(super) fn load(&self, engine: &wasmtime::Engine, digest: &PolicyDigest) -> Option<Component> {
        let path = self.path(digest);
        // Read into memory rather than map the file: a mapped file truncated by someone else
        // would crash the process.
        let bytes = std::fs::read(&path).ok()?;
        // SAFETY: the cache directory belongs to aq, and files in it are only ever written by
        // `store` below from `Component::serialize` output of this engine configuration (the
        // compatibility hash is in the name). wasmtime checks the header and the compatibility
        // of what it deserialises, so a damaged file fails here and we recompile.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable precompiled policy");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a compilation; failures only cost a recompile later, so they are logged.
    pub(super) fn store(&self, digest: &PolicyDigest, component: &Component) {
        let result = component.serialize().map_err(std::io::Error::other).and_then(|bytes| {
            let mut tmp = tempfile_in(&self.dir)?;
            tmp.1.write_all(&bytes)?;
            tmp.1.sync_all()?;
            std::fs::rename(&tmp.0, self.path(digest))
        });
        if let Err(e) = result {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot cache a precompiled policy");
        }
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(".tmp-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    Ok((path, file))
}
