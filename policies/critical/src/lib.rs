//! `critical`: for keys whose every change must be attributable and approved, such as
//! Kubernetes secrets, cluster roles and admission configuration.
//!
//! Every mutation needs a verified credential (a principal's signature the gateway checked)
//! holding the configured role. With an `approval` rule, writes are held until distinct voters
//! whose weights reach the threshold have approved; the signatures that came with the request
//! count. Lineage is kept in full. The scope is never split: critical data stays in one
//! consistency domain.
//!
//! Configuration (JSON):
//!
//! | field                      | type    | default  | meaning                                    |
//! |----------------------------|---------|----------|--------------------------------------------|
//! | `role`                     | string  | required | role a signer must hold                    |
//! | `approval`                 | object  | none     | if given, writes need approvals:           |
//! | `approval.voters`          | array   | required | `{ "principal": id, "weight": n }`         |
//! | `approval.threshold`       | integer | required | sum of distinct voters' weights needed     |
//! | `approval.expiry_seconds`  | integer | `3600`   | how long a proposal stays open             |
//! | `lineage`                  | string  | `"full"` | `"digest"` or `"full"`                     |

use aq_sdk::{ApprovalRule, Context, Decision, LineageLevel, Policy, Voter};

fn default_expiry() -> u64 {
    3600
}

fn default_lineage() -> LineageLevel {
    LineageLevel::Full
}

/// Approval settings.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Who may approve and with what weight.
    pub voters: Vec<Voter>,
    /// Weight needed.
    pub threshold: u32,
    /// Proposal lifetime in seconds.
    #[serde(default = "default_expiry")]
    pub expiry_seconds: u64,
}

/// Settings of a `critical` binding.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Role every signer must hold.
    pub role: String,
    /// Approvals needed, if any.
    #[serde(default)]
    pub approval: Option<Approval>,
    /// Lineage kept for allowed writes.
    #[serde(default = "default_lineage")]
    pub lineage: LineageLevel,
}

/// Requires a credential with a role, and approvals if configured.
pub struct Critical;

impl Policy for Critical {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        if config.role.trim().is_empty() {
            return Err("role must name the role a signer needs, e.g. \"secret-writer\"".into());
        }
        if config.lineage == LineageLevel::None {
            return Err("lineage must be \"digest\" or \"full\": critical writes are always recorded".into());
        }
        if let Some(approval) = &config.approval {
            let mut seen = std::collections::BTreeSet::new();
            for voter in &approval.voters {
                if !seen.insert(voter.principal.as_str()) {
                    return Err(format!("voter {} is listed twice; give it one entry", voter.principal));
                }
            }
            let total: u64 = approval.voters.iter().map(|v| u64::from(v.weight)).sum();
            if approval.threshold == 0 {
                return Err("approval.threshold must be at least 1; drop `approval` to need none".into());
            }
            if u64::from(approval.threshold) > total {
                return Err(format!(
                    "approval.threshold {} exceeds the voters' total weight {total}: no write could ever commit",
                    approval.threshold
                ));
            }
            if approval.expiry_seconds == 0 {
                return Err("approval.expiry_seconds must be at least 1".into());
            }
        }
        Ok(())
    }

    fn evaluate(config: &Config, ctx: &Context) -> Decision {
        if !ctx.has_role(&config.role) {
            let who = if ctx.credentials.is_empty() {
                "the request is unsigned".to_string()
            } else {
                format!("signers {} lack it", ctx.principals().collect::<Vec<_>>().join(", "))
            };
            return Decision::deny(format!(
                "writes to scope {} need a verified credential with role {} ({who}); \
                 sign the request with the key of a principal holding that role",
                ctx.scope.id, config.role
            ));
        }
        let decision = match &config.approval {
            Some(approval) => Decision::require_approval(ApprovalRule {
                voters: approval.voters.clone(),
                threshold: approval.threshold,
                expiry_seconds: approval.expiry_seconds,
            }),
            None => Decision::allow(),
        };
        decision.with_lineage(config.lineage).annotate("role", config.role.as_str())
    }
}

aq_sdk::export_policy!(Critical);

#[cfg(test)]
mod tests {
    use aq_sdk::parse_config;

    use super::Critical;

    #[test]
    fn fixtures() {
        aq_sdk::testing::assert_fixtures::<Critical>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
        );
    }

    #[test]
    fn fixtures_without_approvals() {
        aq_sdk::testing::assert_fixtures::<Critical>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/direct/config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/direct/fixtures.json"),
        );
    }

    #[test]
    fn unreachable_thresholds_are_refused() {
        let config = r#"{"role": "w", "approval": {"voters": [{"principal": "a", "weight": 1}], "threshold": 2}}"#;
        let err = parse_config::<Critical>(config).err().expect("refused");
        assert!(err.to_string().contains("exceeds the voters' total weight 1"), "{err}");
    }

    #[test]
    fn duplicate_voters_and_empty_roles_are_refused() {
        let twice = r#"{"role": "w", "approval": {"voters": [{"principal": "a", "weight": 1}, {"principal": "a", "weight": 1}], "threshold": 2}}"#;
        assert!(parse_config::<Critical>(twice).err().expect("refused").to_string().contains("listed twice"));
        assert!(parse_config::<Critical>(r#"{"role": " "}"#).err().expect("refused").to_string().contains("role"));
        assert!(parse_config::<Critical>(r#"{"role": "w", "lineage": "none"}"#).is_err());
    }
}
