//! `namespaces`: per-namespace rules for Kubernetes objects, the Rust edition.
//!
//! The same policy is written in Python (`../python/app.py`) and JavaScript (`../js/policy.js`);
//! aq's conformance suite runs all three on `../fixtures` and requires identical answers, so
//! the three follow `../README.md` line by line.
//!
//! A key `/registry/<resource>/<namespace>/<name>` (exactly four segments) belongs to
//! `<namespace>`; other keys belong to none.

use aq_sdk::{ApprovalRule, Context, Decision, LineageLevel, Op, Policy, ReadError, ScopeStats, Voter, host};
use aq_sdk::{Advice, host::LogLevel};

/// Settings of a binding; see `../README.md` for each field.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    max_value_bytes: Option<u64>,
    #[serde(default)]
    frozen: Vec<String>,
    #[serde(default)]
    guarded: Vec<String>,
    #[serde(default)]
    approvers: Vec<Voter>,
    #[serde(default = "one")]
    threshold: u32,
    #[serde(default = "hour")]
    expiry_seconds: u64,
    admin_role: Option<String>,
    max_keys_per_namespace: Option<u64>,
    split_write_rate: Option<f64>,
    merge_write_rate: Option<f64>,
}

fn one() -> u32 {
    1
}

fn hour() -> u64 {
    3600
}

/// Where a key sits: its resource and namespace, when it has them.
struct Object<'a> {
    resource: &'a str,
    namespace: &'a str,
}

fn object(key: &[u8]) -> Option<Object<'_>> {
    let key = std::str::from_utf8(key).ok()?;
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        ["", "registry", resource, namespace, _name] => Some(Object { resource, namespace }),
        _ => None,
    }
}

/// Per-namespace rules.
pub struct Namespaces;

impl Policy for Namespaces {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        for (field, names) in [("frozen", &config.frozen), ("guarded", &config.guarded)] {
            if let Some(name) = names.iter().find(|n| n.is_empty() || n.contains('/')) {
                return Err(format!("{field}: {name:?} is not a namespace name; give names without '/'"));
            }
        }
        let total: u64 = config.approvers.iter().map(|v| u64::from(v.weight)).sum();
        if !config.guarded.is_empty() && config.approvers.is_empty() {
            return Err("guarded: guarded namespaces need approvers; list them under approvers".into());
        }
        if config.threshold == 0 || (!config.approvers.is_empty() && u64::from(config.threshold) > total) {
            return Err(format!(
                "threshold: {} cannot be met by the approvers' weights, which add up to {total}; give 1 to {total}",
                config.threshold
            ));
        }
        if let (Some(split), Some(merge)) = (config.split_write_rate, config.merge_write_rate)
            && merge >= split
        {
            return Err("merge_write_rate: must be below split_write_rate, or a scope would split and merge back in turn".into());
        }
        Ok(())
    }

    fn evaluate(config: &Config, ctx: &Context) -> Decision {
        let mut namespaces: Vec<&str> = Vec::new();
        for op in &ctx.ops {
            let key = op.key();
            let shown = String::from_utf8_lossy(key);
            let object = object(key);
            if let Some(object) = &object {
                if config.frozen.iter().any(|n| n == object.namespace) {
                    host::log(LogLevel::Debug, &format!("namespaces: {shown} is in a frozen namespace"));
                    return Decision::deny(format!(
                        "{shown}: namespace {} is frozen; writes to it are refused until an operator unfreezes it",
                        object.namespace
                    ));
                }
                if !namespaces.contains(&object.namespace) {
                    namespaces.push(object.namespace);
                }
            }
            match op {
                Op::Put(put) => {
                    if let Some(max) = config.max_value_bytes
                        && !put.ignore_value
                        && put.value.len() as u64 > max
                    {
                        return Decision::deny(format!(
                            "{shown}: the value is {} bytes, over max_value_bytes = {max}; store less",
                            put.value.len()
                        ));
                    }
                }
                Op::DeleteRange(delete) => {
                    if !delete.range_end.is_empty() {
                        return Decision::deny(format!(
                            "{shown}: deleting a range is refused in this scope; delete keys one at a time"
                        ));
                    }
                }
            }
        }

        if let Some(role) = &config.admin_role
            && let Some(admin) = ctx.credentials.iter().find(|c| c.roles.contains(role))
        {
            return Decision::allow().with_lineage(LineageLevel::Full).annotate("admin", admin.principal.clone());
        }

        if let Some(max) = config.max_keys_per_namespace {
            for put in ctx.puts() {
                let Some(object) = object(&put.key) else { continue };
                let prefix = format!("/registry/{}/{}/", object.resource, object.namespace);
                if let Err(reason) = check_room(&put.key, &object, prefix.as_bytes(), max) {
                    return Decision::deny(reason);
                }
            }
        }

        if let Some(namespace) = namespaces.iter().find(|n| config.guarded.iter().any(|g| g == *n)) {
            let rule = ApprovalRule {
                voters: config.approvers.clone(),
                threshold: config.threshold,
                expiry_seconds: config.expiry_seconds,
            };
            return Decision::require_approval(rule).with_lineage(LineageLevel::Full).annotate("namespace", *namespace);
        }

        let decision = Decision::allow().with_lineage(LineageLevel::Digest);
        if namespaces.is_empty() { decision } else { decision.annotate("namespaces", namespaces.join(",")) }
    }

    fn advise(config: &Config, stats: &ScopeStats) -> Advice {
        if let Some(split) = config.split_write_rate
            && stats.write_rate >= split
            && let Some(at) = stats.split_candidates.first()
        {
            return Advice::Split(at.clone());
        }
        if let Some(merge) = config.merge_write_rate
            && stats.write_rate < merge
        {
            return Advice::Merge;
        }
        Advice::Keep
    }
}

/// Whether a put of `key` leaves its namespace within `max` keys of its resource.
fn check_room(key: &[u8], object: &Object<'_>, prefix: &[u8], max: u64) -> Result<(), String> {
    let shown = String::from_utf8_lossy(key);
    let unchecked = |e: ReadError| {
        let why = match e {
            ReadError::OutsideScope => "the key is outside the scope".to_string(),
            ReadError::Unavailable => "reads are unavailable here".to_string(),
            ReadError::Failed(m) => format!("a read failed: {m}"),
        };
        format!("{shown}: cannot check max_keys_per_namespace ({why}); retry later")
    };
    let held = host::count(prefix).map_err(unchecked)?;
    if held < max || host::read(key).map_err(unchecked)?.is_some() {
        return Ok(());
    }
    Err(format!(
        "{shown}: namespace {} already holds {held} {}, the most max_keys_per_namespace = {max} allows; delete one first",
        object.namespace, object.resource
    ))
}

aq_sdk::export_policy!(Namespaces);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        aq_sdk::testing::assert_fixtures::<super::Namespaces>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"),
        );
    }
}
