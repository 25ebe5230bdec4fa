//! Which key ranges a group's etcd lets aq write: the one place where a group's ownership of
//! ranges is granted and revoked.
//!
//! aq sends every request to a group as the etcd user [`DATA_USER`], whose one role
//! [`OWNER_ROLE`] grants read-write on exactly the ranges of the scopes the group holds, and on
//! aq's reserved keys. etcd checks these permissions when it applies a request, against the auth
//! revision the request was authorised at, and every grant or revoke moves that revision. So once
//! a range is revoked from a group, no write reaches it through aq: one authorised before the
//! revoke fails at apply (`revision of auth store is old`; nothing is written), one sent after it
//! is refused (`permission denied`). A replica paused mid-write with a stale layout cannot land
//! its write on a group that gave the range away, whatever its clocks say.
//!
//! Steady-state writes therefore carry no guard of their own: a Put is sent as a Put.
//! `ARCHITECTURE.md` has the measurement that chose this over a compare on every write.

use std::path::{Path, PathBuf};

use etcd_client::{Client, ConnectOptions, Permission};

use super::Credentials;
use crate::index::KeyRange;

/// The etcd user aq's requests are sent as.
pub const DATA_USER: &str = "aq";
/// The role holding a group's ranges.
pub const OWNER_ROLE: &str = "aq-owner";
/// etcd's administrator: only a user with the `root` role may change roles.
const ROOT: &str = "root";

/// The passwords of a managed etcd's users, generated at its first start and kept in
/// `credentials.json` beside its data (mode 0600), so that nothing but aq can write to it.
#[derive(serde::Deserialize, serde::Serialize)]
pub struct ManagedSecrets {
    root: String,
    aq: String,
}

impl ManagedSecrets {
    /// The file holding a managed etcd's secrets, in its directory.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("credentials.json")
    }

    /// Reads the secrets kept in `dir`, creating them (readable by this user only) at the first
    /// start.
    pub fn load_or_create(dir: &Path) -> Result<Self, String> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                return serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{} is damaged ({e}); restore it, or remove the group's data directory to start it afresh", path.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        let secrets = ManagedSecrets { root: random_password()?, aq: random_password()? };
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let json = serde_json::to_vec_pretty(&secrets).expect("secrets serialise");
        crate::private_file::create(&path, &json)?;
        Ok(secrets)
    }

    /// What aq's requests log in as.
    pub fn data(&self) -> Credentials {
        Credentials { user: DATA_USER.to_string(), password: self.aq.clone() }
    }

    /// The administrator, which grants and revokes ranges.
    pub fn admin(&self) -> Credentials {
        Credentials { user: ROOT.to_string(), password: self.root.clone() }
    }
}

fn random_password() -> Result<String, String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for etcd passwords: {e}"))?;
    Ok(hex::encode(bytes))
}

/// Turns etcd auth on in a managed etcd: the root user, aq's user and its role (holding no
/// range yet). Safe to run on every start: an etcd whose auth is already on is only checked.
pub async fn secure(group: &str, endpoint: &str, secrets: &ManagedSecrets) -> Result<(), String> {
    let admin = secrets.admin();
    match connect(endpoint, Some(&admin)).await {
        Ok(_) => return Ok(()),
        Err(e) if e.contains("authentication is not enabled") => {}
        Err(e) => {
            return Err(format!(
                "managed etcd of group {group} refuses aq's administrator ({e}); its credentials are kept in \
                 credentials.json in the group's directory: restore that file, or remove the directory to start afresh"
            ));
        }
    }
    let mut client = connect(endpoint, None).await?;
    let step = |what: &'static str| move |e: etcd_client::Error| format!("cannot {what} on managed etcd of group {group}: {e}");
    let exists = |e: &etcd_client::Error| e.to_string().contains("already exists") || e.to_string().contains("already granted");
    // An earlier start may have stopped half-way; steps already done answer "already exists".
    for result in [
        client.user_add(ROOT, secrets.root.clone(), None).await.map(drop),
        client.user_grant_role(ROOT, ROOT).await.map(drop),
        client.user_add(DATA_USER, secrets.aq.clone(), None).await.map(drop),
        client.role_add(OWNER_ROLE).await.map(drop),
        client.user_grant_role(DATA_USER, OWNER_ROLE).await.map(drop),
    ] {
        if let Err(e) = result
            && !exists(&e)
        {
            return Err(step("set up users")(e));
        }
    }
    if let Err(e) = client.auth_enable().await {
        // The enable can apply although its answer fails (etcd 3.4 may answer it "user name is
        // empty" once auth is on): aq's administrator logging in means it did.
        if connect(endpoint, Some(&admin)).await.is_err() {
            return Err(step("enable auth")(e));
        }
    }
    Ok(())
}

async fn connect(endpoint: &str, credentials: Option<&Credentials>) -> Result<Client, String> {
    let options = credentials.map(|c| ConnectOptions::new().with_user(c.user.clone(), c.password.clone()));
    Client::connect([endpoint], options).await.map_err(|e| e.to_string())
}

/// A range as an etcd permission's `(key, range_end)`. etcd orders an empty key after every
/// other (it stands for "no bound"), so a range from the start of the keyspace begins at
/// `"\0"`, the least key a client can write.
fn permission(range: &KeyRange) -> (Vec<u8>, Vec<u8>) {
    let (key, range_end) = range.to_request();
    if key.is_empty() { (vec![0], range_end) } else { (key, range_end) }
}

/// The one spelling of a range for comparing permissions: one from `"\0"` is one from the
/// start (no key sorts between them).
fn normal(range: KeyRange) -> KeyRange {
    if range.start == [0] { KeyRange { start: Vec::new(), end: range.end } } else { range }
}

/// An administrator's connection to one group's etcd, to grant and revoke its ranges.
pub struct Owners {
    group: String,
    client: Client,
}

/// What [`Owners::reconcile`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Ranges granted.
    pub granted: Vec<KeyRange>,
    /// Ranges revoked.
    pub revoked: Vec<KeyRange>,
}

impl Owners {
    /// Connects to `group` at `endpoints` as `admin`, a user with etcd's root role.
    pub async fn connect(group: &str, endpoints: &[String], admin: &Credentials) -> Result<Self, String> {
        let options = ConnectOptions::new().with_user(admin.user.clone(), admin.password.clone());
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| format!("cannot log into group {group} as {}: {e}", admin.user))?;
        Ok(Owners { group: group.to_string(), client })
    }

    /// The root client, for aq's own work on the group (a migration's copy and clean-up),
    /// which the ownership role does not limit.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The ranges the group's role holds now.
    pub async fn ranges(&mut self) -> Result<Vec<KeyRange>, String> {
        let role = self
            .client
            .role_get(OWNER_ROLE)
            .await
            .map_err(|e| format!("cannot read role {OWNER_ROLE} of group {}: {e}", self.group))?;
        let mut ranges: Vec<KeyRange> =
            role.permissions().iter().map(|p| normal(KeyRange::from_request(p.key(), p.range_end()))).collect();
        ranges.sort_by(|a, b| a.start.cmp(&b.start));
        Ok(ranges)
    }

    /// Lets aq write `range` on this group.
    pub async fn grant(&mut self, range: &KeyRange) -> Result<(), String> {
        let (key, range_end) = permission(range);
        let permission = Permission::read_write(key).with_range_end(range_end);
        self.client
            .role_grant_permission(OWNER_ROLE, permission)
            .await
            .map_err(|e| format!("cannot grant {range:?} to group {}: {e}", self.group))?;
        Ok(())
    }

    /// Takes `range` away: from the answer on, no request of aq's touching it applies on this
    /// group, including requests already in flight. `range` must be one the role holds as a
    /// whole (see [`Owners::ranges`]).
    pub async fn revoke(&mut self, range: &KeyRange) -> Result<(), String> {
        let (key, range_end) = permission(range);
        let options = etcd_client::RoleRevokePermissionOptions::new().with_range_end(range_end);
        self.client
            .role_revoke_permission(OWNER_ROLE, key, Some(options))
            .await
            .map_err(|e| format!("cannot revoke {range:?} from group {}: {e}", self.group))?;
        Ok(())
    }

    /// Makes the role hold exactly `wanted` (ranges in key order, not overlapping): grants what
    /// is missing first, then revokes what it holds beyond them. In that order a range that
    /// stays wanted is never refused in between, also when a held range is cut in pieces (a
    /// move of the part in the middle): etcd holds the pieces and the whole side by side until
    /// the whole is revoked.
    pub async fn reconcile(&mut self, wanted: &[KeyRange]) -> Result<Changes, String> {
        let wanted: Vec<KeyRange> = wanted.iter().cloned().map(normal).collect();
        let wanted = wanted.as_slice();
        let held = self.ranges().await?;
        let mut changes = Changes::default();
        for range in wanted.iter().filter(|r| !held.contains(r)) {
            self.grant(range).await?;
            changes.granted.push(range.clone());
        }
        for range in held.iter().filter(|r| !wanted.contains(r)) {
            match self.revoke(range).await {
                Ok(()) => changes.revoked.push(range.clone()),
                // Another replica reconciling the same layout revoked it first.
                Err(e) if e.contains("permission is not granted") => {}
                Err(e) => return Err(e),
            }
        }
        if changes != Changes::default() {
            tracing::info!(group = %self.group, granted = ?changes.granted, revoked = ?changes.revoked, "group ownership changed");
        }
        Ok(changes)
    }
}
