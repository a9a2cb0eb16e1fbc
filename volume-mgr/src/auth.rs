//! Bearer-token authentication of the API.
//!
//! With no token configured (the default) the API is open, as on a single host where only
//! local processes reach the manager. Once one token is configured every request but
//! `GET /healthz` needs `Authorization: Bearer TOKEN` with a configured token:
//! - none or an unknown one: 401 `unauthenticated` with `WWW-Authenticate: Bearer`;
//! - a `read-only` token may GET (and HEAD) everything, `/metrics` and `/v1/openapi.json`
//!   included; any other method: 403 `forbidden`;
//! - an `admin` token may do everything. The agents (blockd, vswitch, lb-vip) register,
//!   heartbeat, report and take leases, so they need an `admin` token (`--manager-token`).
//!
//! Tokens come from the config (`[[tokens]]` tables with `token` and `role`) and/or a
//! `--tokens-file` holding such tables. Tokens are compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    Admin,
    /// `GET` (and `HEAD`) only.
    ReadOnly,
}

/// One configured token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub token: String,
    pub role: Role,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("token", &"[redacted]")
            .field("role", &self.role)
            .finish()
    }
}

/// A tokens file: `[[tokens]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<Token>,
}

/// Reads a tokens file (`[[tokens]] token = "…" role = "admin" | "read-only"`).
pub fn load_tokens_file(path: &std::path::Path) -> Result<Vec<Token>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("tokens file {}: {e}", path.display()))?;
    let f: TokensFile = toml::from_str(&text)
        .map_err(|e| format!("tokens file {}: {}", path.display(), e.message().trim()))?;
    Ok(f.tokens)
}

/// Checks tokens: 16 to 512 visible ASCII characters (they travel in an HTTP header), no
/// token twice.
pub fn validate(tokens: &[Token]) -> Result<(), String> {
    for (i, t) in tokens.iter().enumerate() {
        if !(16..=512).contains(&t.token.len()) {
            return Err(format!(
                "token {} ({:?}): must be 16 to 512 characters, has {}",
                i + 1,
                t.role,
                t.token.len()
            ));
        }
        if !t.token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "token {} ({:?}): only visible ASCII characters (no spaces) are allowed",
                i + 1,
                t.role
            ));
        }
        if tokens[..i].iter().any(|o| o.token == t.token) {
            return Err(format!("token {} is configured twice", i + 1));
        }
    }
    Ok(())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The role of `presented` (every token is compared, so timing does not tell which matched).
pub fn role_of(tokens: &[Token], presented: &str) -> Option<Role> {
    let mut found = None;
    for t in tokens {
        if ct_eq(t.token.as_bytes(), presented.as_bytes()) {
            found = Some(t.role);
        }
    }
    found
}

fn deny(status: StatusCode, code: &str, message: &str) -> Response {
    let body = axum::Json(crate::api::ApiError {
        code: code.into(),
        message: message.into(),
    });
    if status == StatusCode::UNAUTHORIZED {
        (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
    } else {
        (status, body).into_response()
    }
}

/// The middleware (see the module documentation).
pub async fn check(State(tokens): State<Arc<Vec<Token>>>, req: Request, next: Next) -> Response {
    if tokens.is_empty() || req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let Some(presented) = presented else {
        return deny(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "this manager requires a bearer token (Authorization: Bearer TOKEN)",
        );
    };
    match role_of(&tokens, presented) {
        None => deny(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "unknown bearer token",
        ),
        Some(Role::ReadOnly) if !matches!(*req.method(), Method::GET | Method::HEAD) => deny(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a read-only token may only read (GET); this needs an admin token",
        ),
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, role: Role) -> Token {
        Token {
            token: s.into(),
            role,
        }
    }

    #[test]
    fn roles_and_validation() {
        let ts = vec![
            t("aaaaaaaaaaaaaaaa1", Role::Admin),
            t("bbbbbbbbbbbbbbbb2", Role::ReadOnly),
        ];
        assert!(validate(&ts).is_ok());
        assert_eq!(role_of(&ts, "aaaaaaaaaaaaaaaa1"), Some(Role::Admin));
        assert_eq!(role_of(&ts, "bbbbbbbbbbbbbbbb2"), Some(Role::ReadOnly));
        assert_eq!(role_of(&ts, "aaaaaaaaaaaaaaaa"), None);
        assert_eq!(role_of(&ts, ""), None);
        assert!(validate(&[t("short", Role::Admin)])
            .unwrap_err()
            .contains("16 to 512"));
        assert!(validate(&[t("has a space in it!!", Role::Admin)])
            .unwrap_err()
            .contains("visible ASCII"));
        let dup = vec![ts[0].clone(), ts[0].clone()];
        assert!(validate(&dup).unwrap_err().contains("twice"));
    }
}
