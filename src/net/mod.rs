//! What every HTTP client of the worker shares: one client builder (user
//! agent, timeouts), the address guard that keeps job-named URLs off
//! private networks ([`guard`]), the host allowlist of result downloads
//! ([`HostPattern`]), size-capped body reads and error chains ([`body`]).
//!
//! `fetch` (source images) and `download` (segment PNGs) both sit on this
//! module; neither imports the other. Knows nothing about jobs, images,
//! Kling or S3.

pub mod body;
pub mod guard;
mod hosts;

use std::time::Duration;

pub use body::{BodyError, error_chain, read_capped, redact_url};
pub use guard::{AddressGuard, ForbiddenTarget, is_forbidden_ip};
pub use hosts::{HostPattern, HostPatternError};

/// The `User-Agent` of every request the worker makes.
pub const USER_AGENT: &str = concat!("kling-archiver/", env!("CARGO_PKG_VERSION"));

/// A client builder with the worker's user agent and the given timeouts,
/// deaf to `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY`: reqwest honours
/// those by default, and a proxy would fetch job-named URLs for us behind
/// the address guard's back (it only ever sees the proxy's name). The
/// Kling API client may add an explicit proxy (`KLING_PROXY`). Callers add
/// their redirect policy and resolver.
pub fn client_builder(connect_timeout: Duration, timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .no_proxy()
}

/// A redirect policy that follows at most `max` hops and runs `check` on
/// every hop's URL; a refusal becomes the request's error (find it again
/// with [`find_cause`]).
pub fn checked_redirects<E>(
    max: usize,
    check: impl Fn(&url::Url) -> Result<(), E> + Send + Sync + 'static,
) -> reqwest::redirect::Policy
where
    E: std::error::Error + Send + Sync + 'static,
{
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= max {
            return attempt.error(RedirectRefused(format!("more than {max} redirects")));
        }
        match check(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

/// A redirect the policy would not follow.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redirect refused: {0}")]
pub struct RedirectRefused(pub String);

/// The first error of type `T` in `e`'s source chain: our own refusals
/// (a forbidden address, a refused redirect) travel inside reqwest's error.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_cause_walks_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] RedirectRefused);
        let e = Outer(RedirectRefused("x".into()));
        assert_eq!(
            find_cause::<RedirectRefused>(&e).map(|r| r.0.as_str()),
            Some("x")
        );
        assert!(find_cause::<ForbiddenTarget>(&e).is_none());
    }
}
