//! Groups started at run time: when a scope splits on advice and the layout's `[adapt]` pool
//! has no group for the new part, an aq that manages its etcd itself starts one more managed
//! etcd (`auto-<n>`) under its data directory, secured like the others (auth on, credentials of
//! aq's own), supervised like them, and started again with aq (its record is in meta). When a
//! merge leaves such a group without scopes, and with none of the keyspace on it, aq stops it
//! and removes its data.
//!
//! Only an aq whose every configured group is managed starts groups: its groups live under its
//! own data directory, where no other replica could reach them in any case.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::proto as pb;

use super::migrate::Migrator;
use crate::backend::Group;
use crate::backend::managed::EtcdProcess;
use crate::gate::Gateway;
use crate::index::ScopeIndex;
use crate::meta::{MetaStore, StartedGroup};

/// How long a started etcd has to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the managed group `name` keeps its data under aq's data directory.
pub fn group_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("etcd").join(name)
}

/// Starts and stops the groups of run-time splits.
pub struct Starter {
    binary: String,
    data_dir: PathBuf,
    /// Every managed etcd of this aq, by group: the supervisor restarts what exits. Held by
    /// the running aq, whose end stops them.
    managed: std::sync::Weak<Mutex<BTreeMap<String, Vec<EtcdProcess>>>>,
    gateway: Arc<Gateway>,
    migrator: Arc<Migrator>,
    store: MetaStore,
    replica: String,
    /// At most this many groups started at run time at once.
    max: usize,
}

impl Starter {
    /// A starter running `binary` for groups under `data_dir`, keeping the processes in
    /// `managed`, on the replica named `replica`, with at most `max` groups at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        binary: String,
        data_dir: PathBuf,
        managed: Arc<Mutex<BTreeMap<String, Vec<EtcdProcess>>>>,
        gateway: Arc<Gateway>,
        migrator: Arc<Migrator>,
        store: MetaStore,
        replica: String,
        max: usize,
    ) -> Self {
        Starter { binary, data_dir, managed: Arc::downgrade(&managed), gateway, migrator, store, replica, max }
    }

    /// Whether another group may be started.
    pub async fn can_start(&self) -> Result<bool, String> {
        Ok(self.store.started_groups().await.map_err(|e| e.to_string())?.len() < self.max)
    }

    /// Starts a new managed group and adds it to the gateway and the migrator; answers its name.
    pub async fn start(&self) -> Result<String, String> {
        let groups = self.gateway.groups();
        let name = (1..)
            .map(|n| format!("auto-{n}"))
            .find(|name| !groups.contains_key(name) && !group_dir(&self.data_dir, name).exists())
            .expect("a free name");
        let dir = group_dir(&self.data_dir, &name);
        let Some(managed) = self.managed.upgrade() else { return Err("aq is stopping".into()) };
        // Recorded first: a start cut short leaves a record whose directory a reap removes.
        let record = StartedGroup { name: name.clone(), replica: self.replica.clone(), started_ms: crate::clock::unix_ms() };
        self.store.put_started_group(&record).await.map_err(|e| e.to_string())?;
        let up = match crate::backend::managed::start_secured(&self.binary, &name, &dir, Default::default(), READY_TIMEOUT).await {
            Ok(up) => up,
            Err(e) => {
                self.forget(&name).await;
                return Err(format!("cannot start a managed etcd for group {name}: {e}"));
            }
        };
        let replayer = Group::connect_lazy(&name, up.group.endpoints()).map_err(|e| e.to_string())?.with_login(up.admin.clone());
        self.migrator.add_admin(&name, up.admin);
        self.gateway.add_group(&name, up.group, Some(replayer));
        managed.lock().expect("managed etcd lock").insert(name.clone(), up.processes);
        self.gateway.metrics().group_started();
        tracing::info!(group = %name, dir = %dir.display(), "started a managed etcd group for a split");
        Ok(name)
    }

    /// Stops every started group that `index` gives no scope and that holds none of the
    /// keyspace (a merge moved its keys away and deleted them), and removes its data. Not while
    /// a migration runs: it may be about to use or leave the group.
    pub async fn reap(&self, index: &ScopeIndex) {
        let started = match self.store.started_groups().await {
            Ok(started) => started,
            Err(e) => {
                tracing::warn!("cannot read the groups started at run time: {e}");
                return;
            }
        };
        for record in started {
            if record.replica != self.replica || index.scopes().iter().any(|s| s.group == record.name) {
                continue;
            }
            match self.store.active_migration().await {
                Ok(None) => {}
                Ok(Some(_)) => return,
                Err(e) => {
                    tracing::warn!("cannot read whether a migration runs: {e}");
                    return;
                }
            }
            if let Some(group) = self.gateway.replayer(&record.name) {
                // Keys below aq's reserved prefix: what clients could have written.
                let request = pb::PbRangeRequest { key: vec![0], range_end: vec![0xff], count_only: true, ..Default::default() };
                match group.range(request).await {
                    Ok(answer) if answer.count == 0 => {}
                    Ok(answer) => {
                        tracing::warn!(group = %record.name, keys = answer.count, "a group started for a split holds no scope but still holds keys; it is kept");
                        continue;
                    }
                    Err(status) => {
                        tracing::warn!(group = %record.name, "cannot count a started group's keys: {}", status.message());
                        continue;
                    }
                }
            }
            self.forget(&record.name).await;
            tracing::info!(group = %record.name, "stopped a managed etcd group no scope uses any more, and removed its data");
        }
    }

    /// Stops group `name`'s etcd, drops it from the gateway and removes its data and record.
    async fn forget(&self, name: &str) {
        self.gateway.remove_group(name);
        if let Some(managed) = self.managed.upgrade() {
            let process = managed.lock().expect("managed etcd lock").remove(name);
            drop(process);
        }
        let dir = group_dir(&self.data_dir, name);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(group = name, "cannot remove {}: {e}", dir.display());
            return;
        }
        if let Err(e) = self.store.delete_started_group(name).await {
            tracing::warn!(group = name, "cannot forget the started group's record: {e}");
        }
    }
}
