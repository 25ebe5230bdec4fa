//! `quota`: per-tenant limits on key count and value size, where the tenant is a path segment
//! of the key (a namespace, a team, a customer).
//!
//! A put is checked against its tenant's limits: the value size directly, the key count through
//! the host (`count` of the tenant's prefix, and a guarded `read` of each key only when the
//! count is near the limit, to tell creations from updates). Deletes are always allowed. Keys
//! without the tenant segment are not limited.
//!
//! The key count is not guarded (see `count` in the WIT): concurrent creations can exceed
//! `max_keys` by at most the number of concurrent writers.
//!
//! Configuration (JSON):
//!
//! | field            | type    | default  | meaning                                              |
//! |------------------|---------|----------|------------------------------------------------------|
//! | `tenant_segment` | integer | required | which `/`-separated segment names the tenant, from 0 |
//! | `default`        | object  | no limit | `{ "max_keys": n, "max_value_bytes": n }`            |
//! | `tenants`        | object  | `{}`     | tenant name → limits overriding `default` per field  |
//! | `lineage`        | string  | `"none"` | lineage for allowed writes                           |
//!
//! With `"tenant_segment": 2`, the tenant of `/registry/configmaps/team-a/settings` is `team-a`.

use std::collections::BTreeMap;

use aq_sdk::keys::{segment, segment_prefix};
use aq_sdk::{Context, Decision, LineageLevel, Policy, host};

/// Limits of one tenant; a field left out falls back to `default`, then to no limit.
#[derive(serde::Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most keys the tenant may hold.
    pub max_keys: Option<u64>,
    /// Largest value the tenant may write, in bytes.
    pub max_value_bytes: Option<u64>,
}

/// Settings of a `quota` binding.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The segment naming the tenant.
    pub tenant_segment: usize,
    /// Limits for tenants not listed.
    #[serde(default)]
    pub default: Limits,
    /// Per-tenant overrides.
    #[serde(default)]
    pub tenants: BTreeMap<String, Limits>,
    /// Lineage for allowed writes.
    #[serde(default)]
    pub lineage: LineageLevel,
}

impl Config {
    fn limits(&self, tenant: &str) -> Limits {
        let own = self.tenants.get(tenant).copied().unwrap_or_default();
        Limits {
            max_keys: own.max_keys.or(self.default.max_keys),
            max_value_bytes: own.max_value_bytes.or(self.default.max_value_bytes),
        }
    }
}

/// Enforces per-tenant limits.
pub struct Quota;

impl Policy for Quota {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        if let Some(name) = config.tenants.keys().find(|t| t.is_empty() || t.contains('/')) {
            return Err(format!("tenant name {name:?} cannot be a path segment: use a name without '/'"));
        }
        Ok(())
    }

    fn evaluate(config: &Config, ctx: &Context) -> Decision {
        // Puts grouped by tenant prefix; the prefix ends with '/', so tenants never overlap.
        let mut by_tenant: BTreeMap<&[u8], Vec<&[u8]>> = BTreeMap::new();
        for put in ctx.puts() {
            let Some(prefix) = segment_prefix(&put.key, config.tenant_segment) else { continue };
            let tenant = tenant_name(&put.key, config.tenant_segment);
            let limits = config.limits(&tenant);
            if let Some(max) = limits.max_value_bytes
                && !put.ignore_value
                && put.value.len() as u64 > max
            {
                return Decision::deny(format!(
                    "tenant {tenant}: the value for {} is {} bytes, over max_value_bytes = {max}; \
                     store less or ask an operator to raise the tenant's limit",
                    put.key.lossy(),
                    put.value.len()
                ));
            }
            let keys = by_tenant.entry(prefix).or_default();
            if !keys.contains(&&put.key[..]) {
                keys.push(&put.key);
            }
        }
        for (prefix, keys) in by_tenant {
            let tenant = tenant_name(prefix, config.tenant_segment);
            let Some(max) = config.limits(&tenant).max_keys else { continue };
            if let Err(reason) = check_key_count(&tenant, prefix, &keys, max) {
                return Decision::deny(reason);
            }
        }
        Decision::allow().with_lineage(config.lineage)
    }
}

fn tenant_name(key: &[u8], index: usize) -> String {
    String::from_utf8_lossy(segment(key, index).unwrap_or_default()).into_owned()
}

/// Whether creating the keys among `keys` that do not exist yet keeps the tenant within `max`.
fn check_key_count(tenant: &str, prefix: &[u8], keys: &[&[u8]], max: u64) -> Result<(), String> {
    let unavailable = |e| format!("tenant {tenant}: cannot check max_keys = {max}: {e}; retry later");
    let held = host::count(prefix).map_err(unavailable)?;
    if held + keys.len() as u64 <= max {
        return Ok(());
    }
    // Near the limit: only creations count. Reading guards the write on each key's state.
    let mut created = 0u64;
    for key in keys {
        if host::read(key).map_err(unavailable)?.is_none() {
            created += 1;
        }
    }
    if created > 0 && held + created > max {
        return Err(format!(
            "tenant {tenant} holds {held} keys; creating {created} more exceeds max_keys = {max}; \
             delete keys first or ask an operator to raise the tenant's limit"
        ));
    }
    Ok(())
}

aq_sdk::export_policy!(Quota);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        aq_sdk::testing::assert_fixtures::<super::Quota>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
        );
    }

    #[test]
    fn tenant_names_with_slashes_are_refused() {
        let err = aq_sdk::parse_config::<super::Quota>(r#"{"tenant_segment": 2, "tenants": {"a/b": {}}}"#)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("\"a/b\""), "{err}");
    }
}
