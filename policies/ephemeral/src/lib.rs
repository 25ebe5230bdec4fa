//! `ephemeral`: for short-lived, high-volume keys such as Kubernetes events and leases.
//!
//! Allows writes without lineage and advises a split when the scope's write rate passes a
//! threshold, so a hot event stream gets an etcd cluster of its own, and a merge when it falls
//! below a lower one, so a cooled-down part goes back (aq merges only scopes a split made). The
//! gap between the two thresholds keeps a scope from flapping. Scopes bound to it are usually
//! configured fail-open: losing governance of events briefly is better than losing them.
//!
//! Configuration (JSON):
//!
//! | field               | type    | default  | meaning                                              |
//! |---------------------|---------|----------|------------------------------------------------------|
//! | `split_write_rate`  | number  | required | writes per second above which to advise a split      |
//! | `merge_write_rate`  | number  | a quarter of `split_write_rate` | writes per second below which to advise a merge |
//! | `min_keys_to_split` | integer | `0`      | never split a scope holding fewer keys               |
//! | `require_lease`     | bool    | `false`  | deny puts that attach no lease (keys must expire)    |

use aq_sdk::{Advice, Context, Decision, Policy, ScopeStats};

/// Settings of an `ephemeral` binding.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Writes per second above which a split is advised.
    pub split_write_rate: f64,
    /// Writes per second below which a merge is advised; a quarter of `split_write_rate`
    /// when absent.
    #[serde(default)]
    pub merge_write_rate: Option<f64>,
    /// Scopes with fewer keys are never split.
    #[serde(default)]
    pub min_keys_to_split: u64,
    /// Deny puts without a lease.
    #[serde(default)]
    pub require_lease: bool,
}

/// Allows writes; splits hot scopes.
pub struct Ephemeral;

impl Policy for Ephemeral {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        if !(config.split_write_rate.is_finite() && config.split_write_rate > 0.0) {
            return Err(format!(
                "split_write_rate must be a positive number of writes per second, got {}",
                config.split_write_rate
            ));
        }
        if let Some(merge) = config.merge_write_rate
            && !(merge.is_finite() && merge >= 0.0 && merge < config.split_write_rate)
        {
            return Err(format!(
                "merge_write_rate must be at least 0 and below split_write_rate ({}), got {merge}: \
                 a scope between the two thresholds is left as it is",
                config.split_write_rate
            ));
        }
        Ok(())
    }

    fn evaluate(config: &Config, ctx: &Context) -> Decision {
        if config.require_lease {
            // `ignore_lease` keeps the key's current lease, which was checked when it was set.
            if let Some(put) = ctx.puts().find(|p| p.lease == 0 && !p.ignore_lease) {
                return Decision::deny(format!(
                    "{} has no lease, but scope {} holds only expiring keys: attach a lease (etcdctl put --lease=<id>)",
                    put.key.lossy(),
                    ctx.scope.id
                ));
            }
        }
        Decision::allow()
    }

    fn advise(config: &Config, stats: &ScopeStats) -> Advice {
        let merge_below = config.merge_write_rate.unwrap_or(config.split_write_rate / 4.0);
        if stats.write_rate < merge_below {
            return Advice::Merge;
        }
        if stats.write_rate <= config.split_write_rate || stats.keys < config.min_keys_to_split {
            return Advice::Keep;
        }
        match stats.split_candidates.first() {
            Some(key) => Advice::Split(key.clone()),
            None => Advice::Keep,
        }
    }
}

aq_sdk::export_policy!(Ephemeral);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        aq_sdk::testing::assert_fixtures::<super::Ephemeral>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
        );
    }

    #[test]
    fn a_threshold_is_required_and_positive() {
        let missing = aq_sdk::parse_config::<super::Ephemeral>("{}").err().expect("refused");
        assert!(missing.to_string().contains("split_write_rate"), "{missing}");
        let zero = aq_sdk::parse_config::<super::Ephemeral>(r#"{"split_write_rate": 0}"#).err().expect("refused");
        assert!(zero.to_string().contains("positive"), "{zero}");
        let above = aq_sdk::parse_config::<super::Ephemeral>(r#"{"split_write_rate": 10, "merge_write_rate": 10}"#)
            .err()
            .expect("refused");
        assert!(above.to_string().contains("below split_write_rate"), "{above}");
    }
}
