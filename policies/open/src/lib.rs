//! `open`: allows every mutation and keeps no lineage. The catch-all for keys nobody governs.
//!
//! Configuration: none (`{}`); unknown fields are refused so a typo does not pass silently.

use aq_sdk::{Context, Decision, Policy};

/// No settings.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// Allows everything.
pub struct Open;

impl Policy for Open {
    type Config = Config;

    fn evaluate(_config: &Config, _ctx: &Context) -> Decision {
        Decision::allow()
    }
}

aq_sdk::export_policy!(Open);

#[cfg(test)]
mod tests {
    #[test]
    fn fixtures() {
        aq_sdk::testing::assert_fixtures::<super::Open>(
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"),
        );
    }

    #[test]
    fn unknown_settings_are_refused() {
        let err = aq_sdk::parse_config::<super::Open>(r#"{"mode": "strict"}"#).err().expect("refused");
        assert!(err.to_string().contains("unknown field `mode`"), "{err}");
    }
}
