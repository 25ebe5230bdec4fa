//! Backups of everything aq serves: one tar archive holding each etcd group's own snapshot
//! (the home group's carries the meta records: policies, bindings, users, lineage), the scope
//! layout they were taken under, and a manifest with each file's size, BLAKE3 digest and the
//! group's revision around it. Every scope lives on one group, so each scope is captured
//! at one revision of its group; no migration may run meanwhile, and the layout must not
//! change while the groups are read (a cut-over in between is refused, to be taken again).
//!
//! The same archive is what `aq snapshot save` writes and what the etcd API's `Snapshot` call
//! streams (`etcdctl snapshot save` through aq), and `aq snapshot verify` checks it offline.
//! Restoring it is aq's business, not etcdctl's: the file is not one etcd database.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::gate::Gateway;
use crate::meta::MetaStore;
use crate::meta::layout::LayoutRecord;

/// The archive format this build writes and reads.
pub const FORMAT: &str = "aq-snapshot/1";

/// The manifest's name in the archive; it comes first.
pub const MANIFEST: &str = "manifest.json";

/// What an archive holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// When the snapshots were taken (unix seconds).
    pub taken_at: u64,
    /// The group holding the meta records.
    pub home: String,
    /// The stored scope layout the groups were read under.
    pub layout: Option<LayoutRecord>,
    /// Each group's etcd snapshot.
    pub groups: Vec<GroupSnapshot>,
}

/// One group's etcd snapshot in an archive.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GroupSnapshot {
    /// The group.
    pub name: String,
    /// Its path in the archive.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// BLAKE3 of its bytes (hex).
    pub blake3: String,
    /// The group's revision just before its snapshot was asked for, and just after it was
    /// read: the snapshot's own revision lies between (etcd 3.4 streams it without a header),
    /// and the two are equal when the group was quiet.
    pub revision_from: i64,
    /// See `revision_from`.
    pub revision_to: i64,
    /// For a group aq manages, the path in the archive of its credentials (aq's etcd users'
    /// passwords, which the restored etcd still expects) and their BLAKE3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<(String, String)>,
}

/// The size and BLAKE3 of an etcd snapshot fed to it in pieces, and whether its last 32 bytes
/// are the SHA-256 of the rest (the checksum etcd appends to the snapshots it streams).
struct DbDigest {
    blake: blake3::Hasher,
    sha: sha2::Sha256,
    /// The last (up to) 32 bytes seen, held back from the SHA-256.
    tail: Vec<u8>,
    total: u64,
}

impl DbDigest {
    fn new() -> Self {
        DbDigest { blake: blake3::Hasher::new(), sha: sha2::Sha256::new(), tail: Vec::with_capacity(64), total: 0 }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        self.blake.update(bytes);
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 32 {
            let cut = self.tail.len() - 32;
            self.sha.update(&self.tail[..cut]);
            self.tail.drain(..cut);
        }
    }

    /// Size, BLAKE3 (hex), and whether the trailing checksum holds.
    fn finish(self) -> (u64, String, bool) {
        let checksum_good = self.tail.len() == 32 && self.sha.finalize().as_slice() == self.tail.as_slice();
        (self.total, self.blake.finalize().to_hex().to_string(), checksum_good)
    }
}

/// [`DbDigest`] of everything `reader` holds.
fn digest_db(mut reader: impl Read) -> std::io::Result<(u64, String, bool)> {
    let mut digest = DbDigest::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            return Ok(digest.finish());
        }
        digest.update(&buffer[..read]);
    }
}

/// Takes every group's snapshot into `dir` (one `<group>.db` each) and returns the manifest.
/// With `data_dir`, the credentials of the groups aq manages there go into the archive too.
pub async fn take(
    gateway: &Gateway,
    dir: &Path,
    data_dir: Option<&Path>,
) -> Result<Manifest, String> {
    let meta = MetaStore::new(gateway.home().clone());
    let read_layout = async || meta.layout().await.map(|found| found.map(|(record, _)| record)).map_err(|e| e.to_string());
    if let Some(id) = meta.active_migration().await.map_err(|e| e.to_string())? {
        return Err(format!(
            "migration {id} is moving a scope between groups; take the snapshot once it is done (aq migrations show {id})"
        ));
    }
    let layout = read_layout().await?;
    let taken_at = crate::clock::unix_now();
    let mut groups = Vec::new();
    for name in gateway.groups().keys() {
        let group = gateway.replayer(name).ok_or_else(|| format!("group {name} is gone"))?;
        let revision_of = async || {
            let status = group.status().await.map_err(|s| format!("group {name} does not answer: {}", s.message()))?;
            Ok::<i64, String>(status.header.map(|h| h.revision).unwrap_or_default())
        };
        let revision_from = revision_of().await?;
        let mut stream = group.snapshot().await.map_err(|s| format!("group {name} refused its snapshot: {}", s.message()))?;
        let path = dir.join(format!("{name}.db"));
        let mut file = std::fs::File::create(&path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let mut digest = DbDigest::new();
        loop {
            let message = stream.message().await.map_err(|s| format!("group {name}'s snapshot broke off: {}", s.message()))?;
            let Some(message) = message else { break };
            file.write_all(&message.blob).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            digest.update(&message.blob);
        }
        file.sync_all().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let (bytes, blake3, checksum_good) = digest.finish();
        if !checksum_good {
            return Err(format!("group {name}'s snapshot does not match its own SHA-256; take it again"));
        }
        let revision_to = revision_of().await?;
        let secrets = data_dir.map(|d| crate::backend::ownership::ManagedSecrets::path(&crate::adapt::groups::group_dir(d, name)));
        let credentials = match secrets.filter(|path| path.exists()) {
            Some(path) => {
                let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                std::fs::write(dir.join(format!("{name}.credentials.json")), &bytes).map_err(|e| format!("cannot write the archive: {e}"))?;
                Some((format!("credentials/{name}.json"), blake3::hash(&bytes).to_hex().to_string()))
            }
            None => None,
        };
        groups.push(GroupSnapshot { name: name.clone(), file: format!("groups/{name}.db"), bytes, blake3, revision_from, revision_to, credentials });
    }
    if read_layout().await?.map(|l| l.epoch) != layout.as_ref().map(|l| l.epoch) {
        return Err("the scope layout changed while the groups were read; take the snapshot again".into());
    }
    Ok(Manifest { format: FORMAT.into(), taken_at, home: gateway.home().name().to_string(), layout, groups })
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    sha: sha2::Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.sha.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the archive of the snapshots [`take`] left in `dir`: a tar of the manifest, then
/// each group, followed by the SHA-256 of the tar as its last 32 bytes, as etcd ends its own
/// snapshots (so `etcdctl snapshot save` through aq accepts the file).
pub fn write_archive(manifest: &Manifest, dir: &Path, out: impl Write) -> std::io::Result<()> {
    let mut archive = tar::Builder::new(Hashing { inner: out, sha: sha2::Sha256::new() });
    let text = serde_json::to_vec_pretty(manifest).expect("JSON");
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(manifest.taken_at);
    header.set_cksum();
    archive.append_data(&mut header, MANIFEST, text.as_slice())?;
    for group in &manifest.groups {
        let mut file = std::fs::File::open(dir.join(format!("{}.db", group.name)))?;
        archive.append_file(&group.file, &mut file)?;
        if let Some((path, _)) = &group.credentials {
            let mut secrets = std::fs::File::open(dir.join(format!("{}.credentials.json", group.name)))?;
            archive.append_file(path, &mut secrets)?;
        }
    }
    let Hashing { mut inner, sha } = archive.into_inner()?;
    inner.write_all(&sha.finalize())?;
    inner.flush()
}

/// Checks an archive offline: the manifest first, each group's file present once with the
/// size and digest the manifest gives and its etcd checksum good, nothing else in it, and a
/// group for every scope of the layout. Returns the manifest.
pub fn verify(path: &Path) -> Result<Manifest, String> {
    let open = || std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let size = open()?.metadata().map_err(|e| format!("cannot read {}: {e}", path.display()))?.len();
    if size % 512 != 32 {
        return Err(format!(
            "{} is not an aq snapshot archive, or is truncated ({size} bytes: a tar of 512-byte blocks and a 32-byte checksum)",
            path.display()
        ));
    }
    let tar_bytes = size - 32;
    let (_, _, checksum_good) = digest_db(open()?).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !checksum_good {
        return Err(format!("{} fails its SHA-256 checksum: the archive is damaged", path.display()));
    }
    let mut archive = tar::Archive::new(std::io::BufReader::new(open()?.take(tar_bytes)));
    let mut entries = archive.entries().map_err(|e| format!("{} is not an aq snapshot archive: {e}", path.display()))?;
    let not_archive = |e: std::io::Error| format!("{} is not an aq snapshot archive (or is truncated): {e}", path.display());
    let mut first = entries
        .next()
        .ok_or_else(|| format!("{} is empty", path.display()))?
        .map_err(not_archive)?;
    if first.path().map_err(not_archive)?.to_string_lossy() != MANIFEST {
        return Err(format!("{} does not start with {MANIFEST}: not an aq snapshot archive", path.display()));
    }
    let mut text = Vec::new();
    first.read_to_end(&mut text).map_err(not_archive)?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| format!("{MANIFEST} in {} does not parse: {e}", path.display()))?;
    if manifest.format != FORMAT {
        return Err(format!("{} is in format {:?}; this aq reads {FORMAT}", path.display(), manifest.format));
    }
    let mut seen = std::collections::BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(not_archive)?;
        let name = entry.path().map_err(not_archive)?.to_string_lossy().into_owned();
        if let Some((_, digest)) = manifest.groups.iter().filter_map(|g| g.credentials.as_ref()).find(|(path, _)| *path == name) {
            if !seen.insert(name.clone()) {
                return Err(format!("{name} is in the archive twice"));
            }
            let mut bytes = Vec::new();
            let mut entry = entry;
            entry.read_to_end(&mut bytes).map_err(not_archive)?;
            if blake3::hash(&bytes).to_hex().to_string() != *digest {
                return Err(format!("{name} does not match the manifest: the archive is damaged"));
            }
            continue;
        }
        let group = manifest
            .groups
            .iter()
            .find(|g| g.file == name)
            .ok_or_else(|| format!("{name} in the archive is not in its manifest"))?;
        if !seen.insert(name.clone()) {
            return Err(format!("{name} is in the archive twice"));
        }
        let (bytes, blake3, checksum_good) = digest_db(entry).map_err(not_archive)?;
        if bytes != group.bytes || blake3 != group.blake3 {
            return Err(format!(
                "{name} does not match the manifest ({bytes} bytes, BLAKE3 {blake3}; the manifest says {} bytes, {}): the archive is damaged",
                group.bytes, group.blake3
            ));
        }
        if !checksum_good {
            return Err(format!("{name} fails etcd's own SHA-256 checksum: the group's snapshot is damaged"));
        }
    }
    let expected = manifest.groups.iter().flat_map(|g| std::iter::once(&g.file).chain(g.credentials.as_ref().map(|(p, _)| p)));
    if let Some(missing) = expected.into_iter().find(|file| !seen.contains(*file)) {
        return Err(format!("{missing} is missing from the archive (truncated?)"));
    }
    let names: std::collections::BTreeSet<&str> = manifest.groups.iter().map(|g| g.name.as_str()).collect();
    if !names.contains(manifest.home.as_str()) {
        return Err(format!("the archive has no snapshot of the home group {}", manifest.home));
    }
    if let Some(layout) = &manifest.layout
        && let Some(scope) = layout.scopes.iter().find(|s| !names.contains(s.group.as_str()))
    {
        return Err(format!("scope {} lives on group {}, which the archive has no snapshot of", scope.id, scope.group));
    }
    Ok(manifest)
}

/// What [`restore`] did with each group.
#[derive(Debug)]
pub struct Restored {
    /// Managed groups rebuilt under the data directory.
    pub managed: Vec<String>,
    /// Groups aq does not manage: their snapshots written out for their operators, by path.
    pub external: Vec<(String, std::path::PathBuf)>,
}

/// Rebuilds a data directory from an archive: each group aq managed gets its etcd data
/// (`etcdctl snapshot restore` of its snapshot) and its credentials where `aq serve` looks
/// for them; the snapshot of a group aq does not manage is written to
/// `<data_dir>/restore/<group>.db`, to restore into that cluster with etcdctl. Refuses a data
/// directory that already holds etcd data. `aq serve --data-dir` then starts from it.
pub fn restore(archive_path: &Path, data_dir: &Path, etcdctl: &str) -> Result<Restored, String> {
    let manifest = verify(archive_path)?;
    let etcd_dir = data_dir.join("etcd");
    if std::fs::read_dir(&etcd_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(format!("{} already holds etcd data; restore into an empty data directory", etcd_dir.display()));
    }
    let scratch = data_dir.join("restore");
    std::fs::create_dir_all(&scratch).map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let size = std::fs::metadata(archive_path).map_err(|e| e.to_string())?.len();
    let file = std::fs::File::open(archive_path).map_err(|e| format!("cannot read {}: {e}", archive_path.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file.take(size - 32)));
    let mut restored = Restored { managed: Vec::new(), external: Vec::new() };
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        if let Some(group) = manifest.groups.iter().find(|g| g.file == name) {
            let db = scratch.join(format!("{}.db", group.name));
            entry.unpack(&db).map_err(|e| format!("cannot write {}: {e}", db.display()))?;
        } else if let Some(group) = manifest.groups.iter().find(|g| g.credentials.as_ref().is_some_and(|(p, _)| *p == name)) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
            let dir = crate::adapt::groups::group_dir(data_dir, &group.name);
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            crate::private_file::create(&crate::backend::ownership::ManagedSecrets::path(&dir), &bytes)?;
        }
    }
    for group in &manifest.groups {
        let db = scratch.join(format!("{}.db", group.name));
        if group.credentials.is_none() {
            restored.external.push((group.name.clone(), db));
            continue;
        }
        let dir = crate::adapt::groups::group_dir(data_dir, &group.name);
        let port = crate::backend::managed::free_port().map_err(|e| e.to_string())?;
        let member = format!("{}-restored", group.name);
        let peer = format!("http://127.0.0.1:{port}");
        let output = std::process::Command::new(etcdctl)
            .env("ETCDCTL_API", "3")
            .arg("snapshot")
            .arg("restore")
            .arg(&db)
            .arg(format!("--data-dir={}", dir.join("member-data").display()))
            .arg(format!("--name={member}"))
            .arg(format!("--initial-cluster={member}={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .output()
            .map_err(|e| format!("cannot run {etcdctl} (is etcd-client installed?): {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "etcdctl snapshot restore of group {} failed: {}",
                group.name,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let _ = std::fs::remove_file(&db);
        restored.managed.push(group.name.clone());
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(content: &[u8]) -> Vec<u8> {
        let mut bytes = content.to_vec();
        bytes.extend_from_slice(&sha2::Sha256::digest(content));
        bytes
    }

    #[test]
    fn etcds_trailing_checksum_is_checked_across_read_boundaries() {
        let good = db(&vec![7u8; 200_000]);
        let (bytes, blake, ok) = digest_db(good.as_slice()).unwrap();
        assert_eq!((bytes, ok), (good.len() as u64, true));
        assert_eq!(blake, blake3::hash(&good).to_hex().to_string());
        let mut bad = good.clone();
        bad[1000] ^= 1;
        assert!(!digest_db(bad.as_slice()).unwrap().2);
        assert!(!digest_db(&good[..20]).unwrap().2, "shorter than a checksum");
    }

    #[test]
    fn an_archive_verifies_and_any_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let main = db(b"main's store");
        std::fs::write(dir.path().join("main.db"), &main).unwrap();
        let manifest = Manifest {
            format: FORMAT.into(),
            taken_at: 1,
            home: "main".into(),
            layout: None,
            groups: vec![GroupSnapshot {
                name: "main".into(),
                file: "groups/main.db".into(),
                bytes: main.len() as u64,
                blake3: blake3::hash(&main).to_hex().to_string(),
                revision_from: 9,
                revision_to: 9,
                credentials: None,
            }],
        };
        let path = dir.path().join("archive.tar");
        write_archive(&manifest, dir.path(), std::fs::File::create(&path).unwrap()).unwrap();
        assert_eq!(verify(&path).unwrap(), manifest);

        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(12).position(|w| w == b"main's store").unwrap();
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = verify(&path).unwrap_err();
        assert!(err.contains("fails its SHA-256 checksum: the archive is damaged"), "{err}");
        // Damage with the archive's checksum made again: the group's own digest names it.
        let tar_len = bytes.len() - 32;
        let resummed = sha2::Sha256::digest(&bytes[..tar_len]);
        bytes[tar_len..].copy_from_slice(&resummed);
        std::fs::write(&path, &bytes).unwrap();
        let err = verify(&path).unwrap_err();
        assert!(err.contains("groups/main.db does not match the manifest"), "{err}");

        let truncated = &std::fs::read(&path).unwrap()[..1024];
        std::fs::write(&path, truncated).unwrap();
        let err = verify(&path).unwrap_err();
        assert!(err.contains("is not an aq snapshot archive, or is truncated"), "{err}");
    }
}
