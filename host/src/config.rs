//! `aq serve` configuration (TOML): backend groups and scopes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::engine::{FailMode, Limits};
use crate::index::{KeyRange, Scope};

/// The built-in default layout.
pub const DEFAULT_LAYOUT: &str = include_str!("default-layout.toml");

/// A whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// etcd clusters.
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    /// Scopes.
    #[serde(default)]
    pub scopes: Vec<ScopeConfig>,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Acting on the policies' advice.
    #[serde(default)]
    pub adapt: AdaptConfig,
}

/// How the advising replica acts on the policies' advice (`[adapt]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptConfig {
    /// Carry out `split` and `merge` advice; off: advice is only counted and logged. On unless
    /// turned off.
    #[serde(default = "yes")]
    pub act: bool,
    /// Seconds a scope is left alone after a split, merge or move changed it, so a scope near
    /// its policy's threshold does not flap.
    #[serde(default = "default_cooldown_s")]
    pub cooldown_s: u64,
    /// Groups a scope split on advice may be moved to: the one holding the fewest scopes that
    /// is not the parent's. With none, a group is started (`start_groups`) or the split waits
    /// (and says so in the log).
    #[serde(default)]
    pub pool: Vec<String>,
    /// With no pool group free, start a managed etcd for the new part, when aq manages every
    /// group itself. On unless turned off.
    #[serde(default = "yes")]
    pub start_groups: bool,
    /// At most this many groups started that way at once.
    #[serde(default = "default_max_started_groups")]
    pub max_started_groups: usize,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        AdaptConfig {
            act: true,
            cooldown_s: default_cooldown_s(),
            pool: Vec::new(),
            start_groups: true,
            max_started_groups: default_max_started_groups(),
        }
    }
}

fn default_max_started_groups() -> usize {
    4
}

fn default_cooldown_s() -> u64 {
    300
}

/// The admin API's settings (`[admin]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Require bearer tokens on `/v1/` routes (probes, metrics and the OpenAPI document stay
    /// open). On unless turned off.
    #[serde(default = "yes")]
    pub auth: bool,
    /// Tokens, stored as hashes.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Largest policy component accepted, in bytes.
    #[serde(default = "default_max_policy_bytes")]
    pub max_policy_bytes: usize,
    /// Refuse policies without a valid signature by a trusted publisher.
    #[serde(default)]
    pub require_signed_policies: bool,
    /// ed25519 public keys (hex) whose policy signatures are trusted.
    #[serde(default)]
    pub trusted_publishers: Vec<String>,
    /// kube-apiserver's `--etcd-prefix`: admission reviews map objects to their keys under it.
    #[serde(default = "default_kube_etcd_prefix")]
    pub kube_etcd_prefix: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            auth: true,
            tokens: Vec::new(),
            max_policy_bytes: default_max_policy_bytes(),
            require_signed_policies: false,
            trusted_publishers: Vec::new(),
            kube_etcd_prefix: default_kube_etcd_prefix(),
        }
    }
}

fn default_kube_etcd_prefix() -> String {
    crate::admission::DEFAULT_ETCD_PREFIX.to_string()
}

fn yes() -> bool {
    true
}

/// Room for components that carry an interpreter: a Python policy built with componentize-py is
/// about 18 MiB, more with the libraries it bundles.
fn default_max_policy_bytes() -> usize {
    64 << 20
}

/// One admin API token (`[[admin.tokens]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it, for logs.
    pub name: String,
    /// `webhook`, `reader`, `operator` or `admin`.
    pub role: String,
    /// `blake3:<hex>` of the token; `aq token` prints it.
    pub hash: String,
}

/// One backend group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Name scopes refer to.
    pub name: String,
    /// etcd client URLs; none means aq starts and supervises an etcd for this group (with etcd
    /// auth on and credentials of its own).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The etcd user aq sends requests as (external groups). Its role must grant read-write on
    /// the group's ranges only: that is what keeps a stale replica from writing a range the
    /// group gave away. Without one, ownership is not enforced by the store.
    pub user: Option<String>,
    /// `user`'s password.
    pub password: Option<String>,
    /// A user with etcd's root role, with which aq grants and revokes the group's ranges on
    /// `user`'s role `aq-owner`. Without one, the operator keeps that role's ranges.
    pub admin_user: Option<String>,
    /// `admin_user`'s password.
    pub admin_password: Option<String>,
    /// For a managed group: how many etcd members aq starts (1, 3 or 5; default 1). With 3 a
    /// group keeps serving through the loss of one member, with 5 of two. A group keeps the
    /// count it was first started with.
    pub members: Option<usize>,
    /// For a managed group: etcd's `--quota-backend-bytes` (default etcd's own, 2 GiB). Past
    /// it, etcd raises its NOSPACE alarm and refuses writes to the group's scopes until space
    /// is freed (compact, defragment) and the alarm disarmed.
    pub quota_backend_bytes: Option<u64>,
}

/// The least backend quota a managed group may have: etcd's empty store with aq's users and
/// roles takes about 20 KiB, and a quota much closer to it leaves no room to write. The home
/// group also keeps aq's meta data and every policy component, and needs more.
pub const MIN_QUOTA_BYTES: u64 = 1 << 20;

/// The member counts a managed group may have: odd, so that a majority survives a split.
pub const MEMBER_COUNTS: [usize; 3] = [1, 3, 5];

impl GroupConfig {
    /// How aq runs this group's etcd when it manages it.
    pub fn spec(&self) -> crate::backend::managed::Spec {
        crate::backend::managed::Spec { members: self.members.unwrap_or(1), quota_backend_bytes: self.quota_backend_bytes }
    }

    /// The credentials aq's requests use, when configured.
    pub fn credentials(&self) -> Option<crate::backend::Credentials> {
        Some(crate::backend::Credentials { user: self.user.clone()?, password: self.password.clone()? })
    }

    /// The administrator's credentials, when configured.
    pub fn admin_credentials(&self) -> Option<crate::backend::Credentials> {
        Some(crate::backend::Credentials { user: self.admin_user.clone()?, password: self.admin_password.clone()? })
    }
}

/// One scope.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// Stable identifier.
    pub id: String,
    /// Every key starting with this; or give `start` (and `end`).
    pub prefix: Option<String>,
    /// First key of the range.
    pub start: Option<String>,
    /// First key after the range; absent: no bound.
    pub end: Option<String>,
    /// The group holding it.
    pub group: String,
    /// `builtin:<name>` or a path to a component.
    pub policy: String,
    /// The policy's configuration, as a TOML table (passed to the policy as JSON).
    #[serde(default)]
    pub config: Option<toml::Table>,
    /// What happens when the policy fails.
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Labels the policy sees.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CPU deadline per evaluation, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Memory cap per evaluation, in MiB.
    pub memory_mib: Option<usize>,
}

impl Config {
    /// Parses a configuration, naming the file and the problem on failure.
    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        for group in &config.groups {
            for (user, password, what) in [
                (&group.user, &group.password, "user and password"),
                (&group.admin_user, &group.admin_password, "admin_user and admin_password"),
            ] {
                if user.is_some() != password.is_some() {
                    return Err(format!("{origin}: group {} must give both {what}, or neither", group.name));
                }
            }
            if let Some(members) = group.members {
                if !group.endpoints.is_empty() {
                    return Err(format!(
                        "{origin}: group {} has endpoints, so its members are the operator's; remove members, or remove endpoints to have aq start the group",
                        group.name
                    ));
                }
                if !MEMBER_COUNTS.contains(&members) {
                    return Err(format!("{origin}: group {} has members = {members}; give 1, 3 or 5", group.name));
                }
            }
            if let Some(quota) = group.quota_backend_bytes {
                if !group.endpoints.is_empty() {
                    return Err(format!(
                        "{origin}: group {} has endpoints, so its quota is set on the operator's etcd (--quota-backend-bytes); remove quota_backend_bytes",
                        group.name
                    ));
                }
                if quota < MIN_QUOTA_BYTES {
                    return Err(format!(
                        "{origin}: group {} has quota_backend_bytes = {quota}; give at least {MIN_QUOTA_BYTES} (1 MiB), or leave it out for etcd's default of 2 GiB",
                        group.name
                    ));
                }
            }
            if group.endpoints.is_empty() && (group.user.is_some() || group.admin_user.is_some()) {
                return Err(format!(
                    "{origin}: group {} is managed (no endpoints), so aq makes its credentials; remove user and admin_user, or give endpoints",
                    group.name
                ));
            }
        }
        for scope in &config.scopes {
            if scope.id.is_empty() || scope.id.starts_with('@') || scope.id.contains('/') {
                return Err(format!("{origin}: scope id {:?} must be non-empty, without '/', and not start with '@' (aq's own logs use it)", scope.id));
            }
            if !config.groups.iter().any(|g| g.name == scope.group) {
                return Err(format!("{origin}: scope {} names group {}, which is not in [[groups]]", scope.id, scope.group));
            }
        }
        for name in &config.adapt.pool {
            if !config.groups.iter().any(|g| &g.name == name) {
                return Err(format!("{origin}: [adapt] pool names group {name}, which is not in [[groups]]"));
            }
        }
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The default layout.
    pub fn default_layout() -> Self {
        Self::parse(DEFAULT_LAYOUT, "default layout").expect("the default layout parses")
    }
}

impl ScopeConfig {
    /// The key range the scope names.
    pub fn range(&self) -> Result<KeyRange, String> {
        match (&self.prefix, &self.start) {
            (Some(prefix), None) if self.end.is_none() => Ok(if prefix.is_empty() {
                KeyRange { start: Vec::new(), end: Vec::new() }
            } else {
                KeyRange::prefix(prefix.as_bytes())
            }),
            (None, Some(start)) => Ok(KeyRange {
                start: start.as_bytes().to_vec(),
                end: self.end.as_deref().unwrap_or_default().as_bytes().to_vec(),
            }),
            _ => Err(format!("scope {}: give either `prefix`, or `start` (and optionally `end`)", self.id)),
        }
    }

    /// The index entry.
    pub fn to_scope(&self) -> Result<Scope, String> {
        Ok(Scope { id: self.id.clone(), range: self.range()?, group: self.group.clone(), labels: self.labels.clone(), revisions: Default::default(), adapted: Default::default() })
    }

    /// The policy configuration as JSON text.
    pub fn policy_config_json(&self) -> String {
        match &self.config {
            Some(table) => serde_json::to_string(table).expect("TOML tables serialise as JSON"),
            None => "{}".to_string(),
        }
    }

    /// Evaluation limits.
    pub fn limits(&self) -> Limits {
        let defaults = Limits::default();
        Limits {
            timeout: self.timeout_ms.map(std::time::Duration::from_millis).unwrap_or(defaults.timeout),
            memory_bytes: self.memory_mib.map(|m| m << 20).unwrap_or(defaults.memory_bytes),
            ..defaults
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Config;

    #[test]
    fn scope_ids_reserved_for_aq_are_refused() {
        let layout = |id: &str| format!("[[groups]]\nname = \"g\"\n[[scopes]]\nid = \"{id}\"\nprefix = \"\"\ngroup = \"g\"\npolicy = \"builtin:open\"\n");
        assert!(Config::parse(&layout("catch-all"), "t").is_ok());
        for id in ["@meta", "", "a/b"] {
            let error = Config::parse(&layout(id), "t").unwrap_err();
            assert!(error.contains("must be non-empty"), "{id}: {error}");
        }
    }

    #[test]
    fn adapt_defaults_to_acting_and_its_pool_must_name_groups() {
        let default = Config::default_layout().adapt;
        assert!(default.act && default.start_groups && default.pool.is_empty());
        assert_eq!((default.cooldown_s, default.max_started_groups), (300, 4));
        let layout = |adapt: &str| format!("[[groups]]\nname = \"g\"\n[[groups]]\nname = \"spare\"\n[adapt]\n{adapt}\n");
        let parsed = Config::parse(&layout("pool = [\"spare\"]\ncooldown_s = 0\nact = false"), "t").unwrap().adapt;
        assert_eq!((parsed.pool, parsed.cooldown_s, parsed.act), (vec!["spare".to_string()], 0, false));
        let error = Config::parse(&layout("pool = [\"nowhere\"]"), "t").unwrap_err();
        assert!(error.contains("[adapt] pool names group nowhere, which is not in [[groups]]"), "{error}");
        let error = Config::parse(&layout("cool_down = 5"), "t").unwrap_err();
        assert!(error.contains("unknown field") && error.contains("cool_down"), "{error}");
    }

    #[test]
    fn how_a_managed_group_runs_is_checked_and_external_groups_refuse_it() {
        let group = |fields: &str| format!("[[groups]]\nname = \"g\"\n{fields}\n");
        let spec = Config::parse(&group("members = 3\nquota_backend_bytes = 8589934592"), "t").unwrap().groups[0].spec();
        assert_eq!((spec.members, spec.quota_backend_bytes), (3, Some(8 << 30)));
        assert_eq!(Config::parse(&group(""), "t").unwrap().groups[0].spec(), Default::default());
        let refused = [
            ("members = 2", "has members = 2; give 1, 3 or 5"),
            ("quota_backend_bytes = 1000", "has quota_backend_bytes = 1000; give at least 1048576"),
            ("quota_backend_bytes = -1", "quota_backend_bytes"),
            ("endpoints = [\"http://127.0.0.1:2379\"]\nmembers = 3", "so its members are the operator's"),
            ("endpoints = [\"http://127.0.0.1:2379\"]\nquota_backend_bytes = 1048576", "its quota is set on the operator's etcd"),
        ];
        for (fields, expected) in refused {
            let error = Config::parse(&group(fields), "t").unwrap_err();
            assert!(error.contains(expected), "{fields}: {error}");
        }
    }
}
