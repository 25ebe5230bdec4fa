//! Denies writes under configured read-only prefixes, and asks for digest lineage on the rest.
//!
//! Configuration: `{ "read_only": ["/registry/apiregistration.k8s.io/", ...] }`.

use aq_sdk::{Context, Decision, LineageLevel, Policy};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    read_only: Vec<String>,
}

pub struct DenyPrefix;

impl Policy for DenyPrefix {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        if config.read_only.iter().any(String::is_empty) {
            return Err("an empty prefix would make every key read-only; remove it".into());
        }
        Ok(())
    }

    fn evaluate(config: &Config, ctx: &Context) -> Decision {
        for op in &ctx.ops {
            if let Some(prefix) = config.read_only.iter().find(|p| op.key().starts_with(p.as_bytes())) {
                return Decision::deny(format!(
                    "{} is under the read-only prefix {prefix}; change it through its owner instead",
                    String::from_utf8_lossy(op.key())
                ));
            }
        }
        Decision::allow().with_lineage(LineageLevel::Digest)
    }
}

aq_sdk::export_policy!(DenyPrefix);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        aq_sdk::testing::assert_fixtures::<super::DenyPrefix>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
        );
    }
}
