//! The contract's JWT check, with its precise error codes (1000–1004).
//!
//! Checked in the order a real key service must: parse the token, find the
//! account by `iss` (unknown → 1000), verify the HS256 signature with that
//! account's secret (→ 1002), then the times (`nbf` → 1003, `exp` → 1004).
//! Never logs the token or the secret.

use axum::http::{HeaderMap, header::AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AuthError {
    /// 1000: the access key is unknown.
    Failed,
    /// 1001: no `Authorization` header, or an empty one.
    Empty,
    /// 1002: not `Bearer <JWT>`, not a JWT, not HS256, or a bad signature.
    Invalid,
    /// 1003: `nbf` is in the future.
    NotYetValid,
    /// 1004: `exp` has passed.
    Expired,
}

impl AuthError {
    pub fn code(self) -> u32 {
        match self {
            AuthError::Failed => 1000,
            AuthError::Empty => 1001,
            AuthError::Invalid => 1002,
            AuthError::NotYetValid => 1003,
            AuthError::Expired => 1004,
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    // Numbers, possibly written as floats by some JWT libraries.
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// Check the request's bearer token against the configured keys at `now`
/// (unix seconds).
pub(super) fn check(
    headers: &HeaderMap,
    access_key: &str,
    secret: &SecretString,
    now: u64,
) -> Result<(), AuthError> {
    let value = match headers.get(AUTHORIZATION) {
        None => return Err(AuthError::Empty),
        Some(v) if v.as_bytes().iter().all(u8::is_ascii_whitespace) => {
            return Err(AuthError::Empty);
        }
        Some(v) => v.to_str().map_err(|_| AuthError::Invalid)?,
    };
    let token = value.strip_prefix("Bearer ").ok_or(AuthError::Invalid)?;
    if token.is_empty() || token.starts_with(char::is_whitespace) {
        return Err(AuthError::Invalid);
    }

    let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
    if header.alg != Algorithm::HS256 {
        return Err(AuthError::Invalid);
    }
    let unverified: Claims =
        jsonwebtoken::dangerous::insecure_decode_claims(token).map_err(|_| AuthError::Invalid)?;
    if unverified.iss.as_deref() != Some(access_key) {
        return Err(AuthError::Failed);
    }

    // Times are checked below so each failure gets its own code.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    validation.required_spec_claims.clear();
    let key = DecodingKey::from_secret(secret.expose_secret().as_bytes());
    let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map_err(|_| AuthError::Invalid)?
        .claims;

    let now = now as f64;
    if claims.nbf.is_some_and(|nbf| nbf > now) {
        return Err(AuthError::NotYetValid);
    }
    match claims.exp {
        None => Err(AuthError::Invalid),
        Some(exp) if exp <= now => Err(AuthError::Expired),
        Some(_) => Ok(()),
    }
}
