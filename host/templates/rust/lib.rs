//! {{name}}: an aq policy in Rust. Denies writes under the key prefixes listed in the binding's
//! configuration (`{"read_only": [...]}`) and keeps digest lineage of the rest.

use aq_sdk::{Context, Decision, LineageLevel, Policy};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    read_only: Vec<String>,
}

pub struct ThisPolicy;

impl Policy for ThisPolicy {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        if config.read_only.iter().any(String::is_empty) {
            return Err("read_only: an empty prefix would make every key read-only; remove it".into());
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

aq_sdk::export_policy!(ThisPolicy);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        aq_sdk::testing::assert_fixtures::<super::ThisPolicy>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
        );
    }
}
