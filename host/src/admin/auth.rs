//! Bearer-token authentication of the admin API. Tokens are random strings; aq keeps only their
//! blake3 hashes. Each token has a role, and roles are ordered: an admin may do what an operator
//! may, an operator what a reader may, a reader what a webhook may.

use std::path::Path;

use axum::http::{HeaderMap, StatusCode, header};

use super::ApiError;
use crate::config::TokenConfig;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Ask for admission decisions (`/v1/admission/`) and nothing else: kube-apiserver's token.
    Webhook,
    /// Read policies, scopes and bindings.
    Reader,
    /// Also push, bind, roll back and dry-run policies.
    Operator,
    /// Also delete policies.
    Admin,
}

impl Role {
    /// Parses `webhook`, `reader`, `operator` or `admin`.
    pub fn parse(text: &str) -> Result<Role, String> {
        match text {
            "webhook" => Ok(Role::Webhook),
            "reader" => Ok(Role::Reader),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}; use webhook, reader, operator or admin")),
        }
    }

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Webhook => "webhook",
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// The stored form of a token: `blake3:<hex>`.
pub fn hash_token(token: &str) -> String {
    format!("blake3:{}", blake3::hash(token.trim().as_bytes()).to_hex())
}

/// A fresh random token.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("the system random source failed: {e}"))?;
    Ok(format!("aq_{}", hex::encode(bytes)))
}

/// Reads the token at `path`, or creates it (mode 0600) when the file does not exist.
pub fn load_or_create_token(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => return Err(format!("{} is empty; delete it and aq writes a new admin token", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read the admin token {}: {e}", path.display())),
    }
    let token = new_token()?;
    crate::private_file::create(path, format!("{token}\n").as_bytes()).map_err(|e| format!("the admin token: {e}"))?;
    Ok(token)
}

/// Who a request authenticated as.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// The known tokens.
pub struct Auth {
    enabled: bool,
    tokens: Vec<(blake3::Hash, Caller)>,
}

impl Auth {
    /// No authentication: every caller is an admin.
    pub fn disabled() -> Self {
        Auth { enabled: false, tokens: Vec::new() }
    }

    /// Tokens from the configuration, plus the generated admin token when given.
    pub fn new(tokens: &[TokenConfig], generated: Option<&str>) -> Result<Self, String> {
        let mut known = Vec::new();
        for token in tokens {
            let hex = token.hash.strip_prefix("blake3:").ok_or_else(|| {
                format!("admin token {}: hash must look like blake3:<64 hex digits> (see `aq token`)", token.name)
            })?;
            let hash = blake3::Hash::from_hex(hex)
                .map_err(|e| format!("admin token {}: hash is not 64 hex digits: {e}", token.name))?;
            known.push((hash, Caller { name: token.name.clone(), role: Role::parse(&token.role).map_err(|e| format!("admin token {}: {e}", token.name))? }));
        }
        if let Some(token) = generated {
            known.push((blake3::hash(token.as_bytes()), Caller { name: "generated-admin".into(), role: Role::Admin }));
        }
        Ok(Auth { enabled: true, tokens: known })
    }

    /// The caller of a request, if it may act as `needed`.
    pub fn check(&self, headers: &HeaderMap, needed: Role) -> Result<Caller, ApiError> {
        if !self.enabled {
            return Ok(Caller { name: "anonymous".into(), role: Role::Admin });
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "send `Authorization: Bearer <token>`; the default run writes an admin token to <data-dir>/admin-token",
                )
            })?;
        // blake3::Hash compares in constant time.
        let hash = blake3::hash(presented.as_bytes());
        let caller = self
            .tokens
            .iter()
            .find(|(known, _)| *known == hash)
            .map(|(_, caller)| caller.clone())
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "the bearer token is not known to aq"))?;
        if caller.role < needed {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("token {} has role {}; this needs role {} or above", caller.name, caller.role.name(), needed.name()),
            ));
        }
        Ok(caller)
    }
}
