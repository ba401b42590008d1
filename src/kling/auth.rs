//! Kling's JWT: HS256 over `{iss: access key, exp: now + 1800, nbf: now - 5}`.
//!
//! One [`TokenCache`] per process is shared by every job. A token is reused
//! until less than [`REFRESH_MARGIN`] of its life is left, then re-minted;
//! [`TokenCache::invalidate`] forces a new one after a 1003/1004 answer.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};

/// Life of a minted token, as Kling's samples use.
pub const TOKEN_TTL: Duration = Duration::from_secs(1800);
/// `nbf` is back-dated by this much to tolerate clock skew.
pub const NBF_SKEW: Duration = Duration::from_secs(5);
/// Re-mint when less than this is left.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub exp: u64,
    pub nbf: u64,
}

impl Claims {
    pub fn new(access_key: &str, now: u64) -> Self {
        Self {
            iss: access_key.to_owned(),
            exp: now + TOKEN_TTL.as_secs(),
            nbf: now.saturating_sub(NBF_SKEW.as_secs()),
        }
    }
}

struct Cached {
    token: SecretString,
    exp: u64,
}

/// Mints and caches the bearer token.
pub struct TokenCache {
    access_key: String,
    key: jsonwebtoken::EncodingKey,
    current: Mutex<Option<Cached>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    pub fn new(access_key: String, secret_key: &SecretString) -> Self {
        Self {
            access_key,
            key: jsonwebtoken::EncodingKey::from_secret(secret_key.expose_secret().as_bytes()),
            current: Mutex::new(None),
        }
    }

    /// A token valid for at least [`REFRESH_MARGIN`].
    pub fn token(&self) -> Result<SecretString, jsonwebtoken::errors::Error> {
        self.token_at(unix_now())
    }

    pub fn token_at(&self, now: u64) -> Result<SecretString, jsonwebtoken::errors::Error> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = current.as_ref()
            && c.exp > now + REFRESH_MARGIN.as_secs()
        {
            return Ok(c.token.clone());
        }
        let claims = Claims::new(&self.access_key, now);
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        let token = SecretString::from(jsonwebtoken::encode(&header, &claims, &self.key)?);
        tracing::debug!(exp = claims.exp, "minted a Kling token");
        *current = Some(Cached {
            token: token.clone(),
            exp: claims.exp,
        });
        Ok(token)
    }

    /// Drop the cached token so the next call mints a fresh one.
    pub fn invalidate(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(token: &SecretString, secret: &str) -> (jsonwebtoken::Header, Claims) {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(
            token.expose_secret(),
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &v,
        )
        .unwrap();
        (data.header, data.claims)
    }

    #[test]
    fn token_has_the_claims_kling_documents() {
        let cache = TokenCache::new("AK".into(), &SecretString::from("SK"));
        let t = cache.token_at(1_000_000).unwrap();
        let (header, claims) = decode(&t, "SK");
        assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(
            claims,
            Claims {
                iss: "AK".into(),
                exp: 1_001_800,
                nbf: 999_995
            }
        );
    }

    #[test]
    fn token_is_cached_then_reminted_before_expiry() {
        let cache = TokenCache::new("AK".into(), &SecretString::from("SK"));
        let t0 = cache.token_at(1_000_000).unwrap();
        let t1 = cache.token_at(1_000_000 + 1000).unwrap();
        assert_eq!(t0.expose_secret(), t1.expose_secret(), "reused while fresh");
        let t2 = cache.token_at(1_000_000 + 1800 - 299).unwrap();
        assert_ne!(
            t0.expose_secret(),
            t2.expose_secret(),
            "re-minted inside the margin"
        );
        let (_, c2) = decode(&t2, "SK");
        assert_eq!(c2.exp, 1_000_000 + 1800 - 299 + 1800);
    }

    #[test]
    fn invalidate_forces_a_new_token() {
        let cache = TokenCache::new("AK".into(), &SecretString::from("SK"));
        let t0 = cache.token_at(1_000_000).unwrap();
        cache.invalidate();
        let t1 = cache.token_at(1_000_001).unwrap();
        assert_ne!(t0.expose_secret(), t1.expose_secret());
        assert!(
            !format!("{cache:?}").contains("SK\""),
            "Debug must not show the key"
        );
    }
}
