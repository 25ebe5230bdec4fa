//! aq's own etcd users and roles: what `etcdctl user|role|auth` manage through aq, kept as one
//! record in the meta group (`\xffaq/meta/auth`) so every replica enforces the same. Not the
//! backend groups' credentials, which are aq's alone.
//!
//! The rules are etcd's (3.4): `auth enable` needs a `root` user holding the `root` role; once
//! enabled every request names a user through a token from `Authenticate`, the `root` role
//! may do anything, and other users may touch only the key ranges their roles grant (READ for
//! ranges, compares and watches, WRITE for puts and deletes). Passwords are bcrypt hashes
//! (cost 10, as etcd's default).
//!
//! Tokens are stateless, so any replica accepts a token another issued: the user (hex), the
//! record's generation at issue, an expiry, and a keyed BLAKE3 MAC under a key kept in the
//! record. A token dies when it expires (`--auth-token-ttl`, etcd's 300 s by default; clients
//! then authenticate again on etcd's `invalid auth token`), when its user goes, or when the
//! user's password changes. A replica handed a token newer than its copy of the record reads
//! the record from the meta group before judging it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::clock::unix_now;
use crate::meta::{MetaError, MetaStore};

/// The user and role that may do anything, as in etcd.
pub const ROOT: &str = "root";

/// bcrypt's cost for stored passwords: etcd's default `--bcrypt-cost`.
pub const BCRYPT_COST: u32 = 10;

/// How long a token is good for unless configured otherwise: etcd's `--auth-token-ttl`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// The gRPC metadata that carry a token: etcd 3.4 clients send `token`, later ones may send
/// `authorization`.
const TOKEN_HEADERS: [&str; 2] = ["token", "authorization"];

/// What a key-range permission allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Range, compares, watches.
    Read,
    /// Put and delete.
    Write,
    /// Both.
    Readwrite,
}

impl Access {
    /// etcd's `authpb.Permission.Type`.
    pub fn from_etcd(value: i32) -> Option<Access> {
        match value {
            0 => Some(Access::Read),
            1 => Some(Access::Write),
            2 => Some(Access::Readwrite),
            _ => None,
        }
    }

    /// The `authpb.Permission.Type` of this access.
    pub fn to_etcd(self) -> i32 {
        match self {
            Access::Read => 0,
            Access::Write => 1,
            Access::Readwrite => 2,
        }
    }

    fn allows(self, need: Need) -> bool {
        matches!((self, need), (Access::Readwrite, _) | (Access::Read, Need::Read) | (Access::Write, Need::Write))
    }
}

/// What a request needs of a key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// To read it.
    Read,
    /// To change it.
    Write,
}

/// One key-range permission of a role, in etcd's form: `range_end` empty for one key,
/// `\0` for every key from `key` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    /// What it allows.
    pub access: Access,
    /// The first key.
    #[serde(with = "hex")]
    pub key: Vec<u8>,
    /// The end of the range (exclusive).
    #[serde(with = "hex")]
    pub range_end: Vec<u8>,
}

/// An etcd user of aq.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Its bcrypt password hash; none for a user added with `--no-password`, who cannot
    /// authenticate with a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Its roles.
    #[serde(default)]
    pub roles: BTreeSet<String>,
    /// Tokens issued before this generation of the record are void (the user was added again
    /// or its password changed).
    #[serde(default)]
    pub tokens_from: u64,
}

/// A role: the key ranges it grants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Its permissions, in the order granted.
    #[serde(default)]
    pub permissions: Vec<Permission>,
}

/// aq's users and roles and whether auth is on: the record in the meta group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRecord {
    /// Whether requests must name a user.
    #[serde(default)]
    pub enabled: bool,
    /// Counts the record's changes; tokens carry the generation they were issued at.
    #[serde(default)]
    pub generation: u64,
    /// The key of the token MACs (32 bytes), made with the first change.
    #[serde(default, with = "hex")]
    pub token_key: Vec<u8>,
    /// Users by name.
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    /// Roles by name.
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
}

/// Why an auth request or check failed, with etcd's messages (clients match them) and codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    NotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// A request aq cannot make sense of; says what to send instead.
    #[error("{0}")]
    Invalid(String),
    /// The meta group did not answer.
    #[error("aq cannot reach its users and roles in the meta group: {0}")]
    Store(String),
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Status {
        let message = error.to_string();
        match error {
            AuthError::UserEmpty | AuthError::RoleEmpty | AuthError::AuthFailed | AuthError::InvalidAuthMgmt | AuthError::Invalid(_) => {
                Status::invalid_argument(message)
            }
            AuthError::PermissionDenied => Status::permission_denied(message),
            AuthError::InvalidToken => Status::unauthenticated(message),
            AuthError::Store(_) => Status::unavailable(message),
            _ => Status::failed_precondition(message),
        }
    }
}

impl From<MetaError> for AuthError {
    fn from(error: MetaError) -> AuthError {
        AuthError::Store(error.to_string())
    }
}

/// The end of a key range: a key (exclusive), or no end.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Unbounded,
}

/// `[start, end)` of etcd's `(key, range_end)`: one key when `range_end` is empty, every key
/// from `key` on when it is `\0`.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    match range_end {
        [] => {
            let mut next = key.to_vec();
            next.push(0);
            (key.to_vec(), End::Key(next))
        }
        [0] => (key.to_vec(), End::Unbounded),
        end => (key.to_vec(), End::Key(end.to_vec())),
    }
}

/// Whether the union of `granted` (sorted by start) covers all of `[start, end)`.
fn covered(granted: &[(Vec<u8>, End)], start: Vec<u8>, end: End) -> bool {
    if matches!(&end, End::Key(e) if *e <= start) {
        return true; // an empty range reads and writes nothing
    }
    let mut reached = start;
    for (from, to) in granted {
        if *from > reached {
            break;
        }
        match to {
            End::Unbounded => return true,
            End::Key(to) if *to > reached => reached = to.clone(),
            End::Key(_) => {}
        }
        if matches!(&end, End::Key(e) if *e <= reached) {
            return true;
        }
    }
    false
}

/// What one user may touch, worked out once per record: whether it holds the root role, and
/// the intervals its roles grant for reading and for writing, each sorted by start.
#[derive(Debug, Default)]
struct Grants {
    admin: bool,
    read: Vec<(Vec<u8>, End)>,
    write: Vec<(Vec<u8>, End)>,
}

impl Grants {
    fn of(record: &AuthRecord, user: &User) -> Grants {
        let permissions = || user.roles.iter().filter_map(|role| record.roles.get(role)).flat_map(|role| role.permissions.iter());
        let granted = |need: Need| {
            let mut intervals: Vec<_> =
                permissions().filter(|p| p.access.allows(need)).map(|p| interval(&p.key, &p.range_end)).collect();
            intervals.sort();
            intervals
        };
        Grants { admin: user.roles.contains(ROOT), read: granted(Need::Read), write: granted(Need::Write) }
    }

    fn covers(&self, need: Need, key: &[u8], range_end: &[u8]) -> bool {
        if self.admin {
            return true;
        }
        let granted = match need {
            Need::Read => &self.read,
            Need::Write => &self.write,
        };
        let (start, end) = interval(key, range_end);
        covered(granted, start, end)
    }
}

impl AuthRecord {
    fn user_mut(&mut self, name: &str) -> Result<&mut User, AuthError> {
        self.users.get_mut(name).ok_or(AuthError::UserNotFound)
    }

    /// Whether `user` may do `need` on every key of etcd's `(key, range_end)`.
    pub fn permitted(&self, user: &str, need: Need, key: &[u8], range_end: &[u8]) -> bool {
        self.users.get(user).is_some_and(|found| Grants::of(self, found).covers(need, key, range_end))
    }

    /// Turns auth on, as `etcdctl auth enable`: needs `root` with the root role.
    pub fn enable(&mut self) -> Result<(), AuthError> {
        let root = self.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
        if !root.roles.contains(ROOT) {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    /// Adds a user; `password` is its bcrypt hash, none for a user without a password.
    pub fn add_user(&mut self, name: &str, password: Option<String>) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let tokens_from = self.generation + 1;
        self.users.insert(name.to_string(), User { password, roles: BTreeSet::new(), tokens_from });
        Ok(())
    }

    /// Deletes a user; root cannot go while auth is on.
    pub fn delete_user(&mut self, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.users.remove(name).map(drop).ok_or(AuthError::UserNotFound)
    }

    /// Sets a user's password (its bcrypt hash); its tokens issued before stop working.
    pub fn change_password(&mut self, name: &str, password: String) -> Result<(), AuthError> {
        let tokens_from = self.generation + 1;
        let user = self.user_mut(name)?;
        user.password = Some(password);
        user.tokens_from = tokens_from;
        Ok(())
    }

    /// Grants a role to a user.
    pub fn grant_role(&mut self, name: &str, role: &str) -> Result<(), AuthError> {
        if role != ROOT && !self.roles.contains_key(role) {
            return Err(AuthError::RoleNotFound);
        }
        self.user_mut(name)?.roles.insert(role.to_string());
        Ok(())
    }

    /// Revokes a role from a user; root keeps the root role while auth is on.
    pub fn revoke_role(&mut self, name: &str, role: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT && role == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        if !self.user_mut(name)?.roles.remove(role) {
            return Err(AuthError::RoleNotGranted);
        }
        Ok(())
    }

    /// Adds a role.
    pub fn add_role(&mut self, name: &str) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        self.roles.insert(name.to_string(), Role::default());
        Ok(())
    }

    /// Deletes a role and takes it from every user; the root role stays while auth is on.
    pub fn delete_role(&mut self, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.remove(name);
        }
        Ok(())
    }

    /// Grants a permission to a role; one on the same range replaces its access, as in etcd.
    pub fn grant_permission(&mut self, role: &str, permission: Permission) -> Result<(), AuthError> {
        if permission.key.is_empty() {
            return Err(AuthError::Invalid("a permission needs a key; grant `\\0` to `\\0` for every key".into()));
        }
        let found = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
        match found.permissions.iter_mut().find(|p| p.key == permission.key && p.range_end == permission.range_end) {
            Some(existing) => existing.access = permission.access,
            None => found.permissions.push(permission),
        }
        Ok(())
    }

    /// Revokes the permission on exactly `(key, range_end)` from a role.
    pub fn revoke_permission(&mut self, role: &str, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        let found = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
        let before = found.permissions.len();
        found.permissions.retain(|p| !(p.key == key && p.range_end == range_end));
        if found.permissions.len() == before {
            return Err(AuthError::PermissionNotGranted);
        }
        Ok(())
    }

    /// A token for `user`, good until `expires` (unix seconds).
    fn issue(&self, user: &str, expires: u64) -> String {
        let payload = format!("{}.{}.{expires}", hex::encode(user), self.generation);
        let mac = self.mac(&payload);
        format!("{payload}.{mac}")
    }

    fn mac(&self, payload: &str) -> String {
        let key: [u8; 32] = self.token_key.as_slice().try_into().unwrap_or([0; 32]);
        hex::encode(&blake3::keyed_hash(&key, payload.as_bytes()).as_bytes()[..16])
    }

    /// The user a token names, if it is good at `now`.
    fn check_token(&self, token: &str, now: u64) -> Result<String, TokenProblem> {
        let mut parts = token.split('.');
        let (Some(user), Some(generation), Some(expires), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenProblem::Invalid);
        };
        let generation: u64 = generation.parse().map_err(|_| TokenProblem::Invalid)?;
        let expires: u64 = expires.parse().map_err(|_| TokenProblem::Invalid)?;
        if generation > self.generation {
            return Err(TokenProblem::Newer(generation));
        }
        let payload = &token[..token.len() - mac.len() - 1];
        if self.token_key.len() != 32 || self.mac(payload) != mac || expires <= now {
            return Err(TokenProblem::Invalid);
        }
        let user = hex::decode(user).ok().and_then(|u| String::from_utf8(u).ok()).ok_or(TokenProblem::Invalid)?;
        match self.users.get(&user) {
            Some(found) if found.tokens_from <= generation => Ok(user),
            _ => Err(TokenProblem::Invalid),
        }
    }
}

#[derive(Debug, PartialEq)]
enum TokenProblem {
    Invalid,
    /// Issued at a generation of the record this replica has not seen yet.
    Newer(u64),
}

/// Who a request comes from, as far as aq's auth can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// Auth is off: anyone may do anything, and no user is named.
    Anyone,
    /// Auth is on and the request carries no token.
    Nobody,
    /// The user a valid token names.
    User(String),
}

impl Who {
    /// The etcd user, for policies' transport identity.
    pub fn user(&self) -> Option<&str> {
        match self {
            Who::User(name) => Some(name),
            _ => None,
        }
    }
}

/// The record as this replica holds it, and the meta revision it was read at.
#[derive(Debug, Default)]
struct Held {
    record: AuthRecord,
    revision: i64,
    /// Each user's [`Grants`], so a request's check neither walks roles nor sorts.
    grants: std::collections::HashMap<String, Grants>,
}

impl Held {
    fn new(record: AuthRecord, revision: i64) -> Held {
        let grants = record.users.iter().map(|(name, user)| (name.clone(), Grants::of(&record, user))).collect();
        Held { record, revision, grants }
    }

    fn grants(&self, user: &str) -> Option<&Grants> {
        self.grants.get(user)
    }
}

/// aq's auth on this replica: the record from the meta group, followed by the meta watch
/// ([`crate::meta::sync::Syncer`] calls [`Auth::reload`] on every change).
pub struct Auth {
    store: MetaStore,
    held: ArcSwap<Held>,
    token_ttl: Duration,
}

impl Auth {
    /// Auth over the record in `store`; tokens it issues last `token_ttl`. Holds an empty
    /// record (auth off) until [`Auth::reload`].
    pub fn new(store: MetaStore, token_ttl: Duration) -> Self {
        Auth {
            store,
            held: ArcSwap::from_pointee(Held::default()),
            token_ttl,
        }
    }

    /// Reads the record from the meta group and holds it, unless what is held is newer.
    pub async fn reload(&self) -> Result<(), MetaError> {
        let (record, revision) = self.store.auth().await?.unwrap_or_default();
        self.hold(record, revision);
        Ok(())
    }

    fn hold(&self, record: AuthRecord, revision: i64) {
        let fresh = Arc::new(Held::new(record, revision));
        self.held.rcu(|current| {
            let older = fresh.revision < current.revision
                || (fresh.revision > 0 && fresh.record.generation < current.record.generation);
            if older { current.clone() } else { fresh.clone() }
        });
    }

    /// A copy of the record as held here.
    pub fn record(&self) -> AuthRecord {
        self.held.load().record.clone()
    }

    /// Whether auth is on.
    pub fn enabled(&self) -> bool {
        self.held.load().record.enabled
    }

    /// The meta revision of the record held here (etcd's auth revision).
    pub fn revision(&self) -> i64 {
        self.held.load().revision
    }

    /// Who sent a request with `metadata`: a present token must be good, or the request is
    /// refused with etcd's `invalid auth token` (clients then authenticate again).
    pub async fn who(&self, metadata: &MetadataMap) -> Result<Who, Status> {
        if !self.enabled() {
            return Ok(Who::Anyone);
        }
        let token = TOKEN_HEADERS.iter().find_map(|name| metadata.get(*name).and_then(|v| v.to_str().ok()));
        let Some(token) = token else { return Ok(Who::Nobody) };
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        match self.held.load().record.check_token(token, unix_now()) {
            Ok(user) => return Ok(Who::User(user)),
            Err(TokenProblem::Invalid) => return Err(AuthError::InvalidToken.into()),
            Err(TokenProblem::Newer(_)) => {}
        }
        // Issued by a replica that has read a newer record than this one holds: the meta
        // group has it.
        self.reload().await.map_err(|e| Status::from(AuthError::from(e)))?;
        match self.held.load().record.check_token(token, unix_now()) {
            Ok(user) => Ok(Who::User(user)),
            Err(_) => Err(AuthError::InvalidToken.into()),
        }
    }

    /// Refuses unless `who` may do `need` on etcd's `(key, range_end)`.
    pub fn require(&self, who: &Who, need: Need, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        match who {
            Who::Anyone => Ok(()),
            Who::Nobody => Err(AuthError::UserEmpty.into()),
            Who::User(user) if self.held.load().grants(user).is_some_and(|g| g.covers(need, key, range_end)) => Ok(()),
            Who::User(_) => Err(AuthError::PermissionDenied.into()),
        }
    }

    /// Refuses unless `who` is a user (any user) or auth is off.
    pub fn require_user(&self, who: &Who) -> Result<(), Status> {
        match who {
            Who::Nobody => Err(AuthError::UserEmpty.into()),
            _ => Ok(()),
        }
    }

    /// Refuses unless `who` holds the root role or auth is off.
    pub fn require_admin(&self, who: &Who) -> Result<(), Status> {
        match who {
            Who::Anyone => Ok(()),
            Who::Nobody => Err(AuthError::UserEmpty.into()),
            Who::User(user) if self.held.load().grants(user).is_some_and(|g| g.admin) => Ok(()),
            Who::User(_) => Err(AuthError::PermissionDenied.into()),
        }
    }

    /// etcd's `Authenticate`: checks the password against the record as the meta group holds
    /// it now (so a user added through another replica can log in at once) and issues a token.
    pub async fn authenticate(&self, name: &str, password: &str) -> Result<String, AuthError> {
        self.reload().await?;
        let held = self.held.load_full();
        if !held.record.enabled {
            return Err(AuthError::NotEnabled);
        }
        let Some(hash) = held.record.users.get(name).and_then(|u| u.password.clone()) else {
            return Err(AuthError::AuthFailed);
        };
        let password = password.to_string();
        let good = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if !good {
            return Err(AuthError::AuthFailed);
        }
        let expires = unix_now() + self.token_ttl.as_secs().max(1);
        Ok(held.record.issue(name, expires))
    }

    /// Changes the record with `change`, guarded on the stored one (retried when another
    /// replica changed it meanwhile), and holds the result here before answering. Returns
    /// `change`'s value and the meta revision of the write.
    pub async fn change<T>(&self, mut change: impl FnMut(&mut AuthRecord) -> Result<T, AuthError>) -> Result<(T, i64), AuthError> {
        for _ in 0..8 {
            let (mut record, expected) = self.store.auth().await?.unwrap_or_default();
            let value = change(&mut record)?;
            record.generation += 1;
            if record.token_key.len() != 32 {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| AuthError::Store(format!("no randomness for the token key: {e}")))?;
                record.token_key = key.to_vec();
            }
            match self.store.write_auth(&record, expected).await {
                Ok(revision) => {
                    self.hold(record, revision);
                    return Ok((value, revision));
                }
                Err(MetaError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AuthError::Store("the users and roles kept changing under this request; retry".into()))
    }
}

/// A bcrypt hash of `password` at [`BCRYPT_COST`], off the async workers.
pub async fn hash_password(password: String) -> Result<String, AuthError> {
    tokio::task::spawn_blocking(move || bcrypt::hash(password, BCRYPT_COST))
        .await
        .map_err(|e| AuthError::Store(e.to_string()))?
        .map_err(|e| AuthError::Invalid(format!("the password cannot be hashed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(access: Access, key: &str, end: &str) -> Permission {
        Permission { access, key: key.as_bytes().to_vec(), range_end: end.as_bytes().to_vec() }
    }

    fn record() -> AuthRecord {
        let mut record = AuthRecord { token_key: vec![7; 32], ..Default::default() };
        record.add_user(ROOT, Some("x".into())).unwrap();
        record.grant_role(ROOT, ROOT).unwrap();
        record.add_user("alice", Some("x".into())).unwrap();
        record.add_role("tenant").unwrap();
        record.grant_permission("tenant", perm(Access::Readwrite, "/t/a/", "/t/a0")).unwrap();
        record.grant_permission("tenant", perm(Access::Read, "/shared", "")).unwrap();
        record.grant_permission("tenant", perm(Access::Write, "/w/", "/w/m")).unwrap();
        record.grant_permission("tenant", perm(Access::Write, "/w/k", "/w0")).unwrap();
        record.grant_role("alice", "tenant").unwrap();
        record
    }

    #[test]
    fn permissions_cover_ranges_as_etcd_checks_them() {
        let r = record();
        assert!(r.permitted("alice", Need::Write, b"/t/a/x", b""));
        assert!(r.permitted("alice", Need::Read, b"/t/a/", b"/t/a0"));
        assert!(!r.permitted("alice", Need::Read, b"/t/", b"/t0"), "wider than the grant");
        assert!(!r.permitted("alice", Need::Write, b"/t/b/x", b""));
        assert!(r.permitted("alice", Need::Read, b"/shared", b""));
        assert!(!r.permitted("alice", Need::Write, b"/shared", b""), "read only");
        assert!(!r.permitted("alice", Need::Read, b"/shared", b"/shared0"), "one key, not its prefix");
        // Two overlapping grants together cover what neither does alone.
        assert!(r.permitted("alice", Need::Write, b"/w/a", b"/w/z"));
        assert!(!r.permitted("alice", Need::Read, b"/w/a", b""), "write only");
        assert!(!r.permitted("alice", Need::Write, b"/w/a", b"\0"), "to the end of the keyspace");
        assert!(r.permitted(ROOT, Need::Write, b"\0", b"\0"), "root may do anything");
        assert!(!r.permitted("nobody", Need::Read, b"/t/a/x", b""));
        assert!(r.permitted("alice", Need::Read, b"/z", b"/a"), "an empty range touches nothing");
    }

    #[test]
    fn management_follows_etcds_rules() {
        let mut r = AuthRecord::default();
        assert_eq!(r.enable(), Err(AuthError::RootUserNotExist));
        r.add_user(ROOT, None).unwrap();
        assert_eq!(r.enable(), Err(AuthError::RootRoleNotExist));
        assert_eq!(r.grant_role(ROOT, "ops"), Err(AuthError::RoleNotFound));
        r.grant_role(ROOT, ROOT).unwrap();
        r.enable().unwrap();
        assert_eq!(r.delete_user(ROOT), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(r.revoke_role(ROOT, ROOT), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(r.add_user(ROOT, None), Err(AuthError::UserAlreadyExist));
        assert_eq!(r.add_user("", None), Err(AuthError::UserEmpty));
        r.add_role("ops").unwrap();
        assert_eq!(r.add_role("ops"), Err(AuthError::RoleAlreadyExist));
        assert_eq!(r.revoke_permission("ops", b"/a", b""), Err(AuthError::PermissionNotGranted));
        r.grant_permission("ops", perm(Access::Read, "/a", "")).unwrap();
        r.grant_permission("ops", perm(Access::Readwrite, "/a", "")).unwrap();
        assert_eq!(r.roles["ops"].permissions.len(), 1, "a grant on the same range replaces the access");
        r.add_user("bob", None).unwrap();
        r.grant_role("bob", "ops").unwrap();
        r.delete_role("ops").unwrap();
        assert!(r.users["bob"].roles.is_empty(), "a deleted role leaves its users");
        assert_eq!(r.revoke_role("bob", "ops"), Err(AuthError::RoleNotGranted));
    }

    #[test]
    fn tokens_verify_on_any_holder_and_die_with_their_user() {
        let mut r = record();
        r.generation = 4;
        let token = r.issue("alice", 1_000);
        assert_eq!(r.check_token(&token, 999), Ok("alice".into()));
        assert_eq!(r.check_token(&token, 1_000), Err(TokenProblem::Invalid), "expired");
        let forged = token.replacen(&hex::encode("alice"), &hex::encode("root"), 1);
        assert_eq!(r.check_token(&forged, 999), Err(TokenProblem::Invalid), "the MAC covers the user");
        let mut older = r.clone();
        older.generation = 3;
        assert_eq!(older.check_token(&token, 999), Err(TokenProblem::Newer(4)));
        let mut changed = r.clone();
        changed.change_password("alice", "y".into()).unwrap();
        changed.generation += 1;
        assert_eq!(changed.check_token(&token, 999), Err(TokenProblem::Invalid), "a new password voids old tokens");
        let fresh = changed.issue("alice", 1_000);
        assert_eq!(changed.check_token(&fresh, 999), Ok("alice".into()));
        changed.delete_user("alice").unwrap();
        assert_eq!(changed.check_token(&fresh, 999), Err(TokenProblem::Invalid));
        assert_eq!(r.check_token("garbage", 0), Err(TokenProblem::Invalid));
    }
}
