//! Response bodies read with a size cap, error chains, and URLs made safe
//! to log.

use std::error::Error as StdError;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

/// Why a capped body read failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("reading the body failed: {0}")]
    Read(#[source] reqwest::Error),
}

/// Read a response body, refusing more than `max` bytes (checked against
/// `Content-Length` first, then while streaming, so a lying or endless
/// server cannot exhaust memory).
pub async fn read_capped(resp: reqwest::Response, max: u64) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(BodyError::TooLarge { limit: max });
    }
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        if (buf.len() + chunk.len()) as u64 > max {
            return Err(BodyError::TooLarge { limit: max });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// `a: b: c` from an error and its sources.
pub fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

/// A URL without userinfo and query string: signed URLs carry credentials in
/// the query (`X-Amz-Signature=`), which must not reach logs or manifests.
pub fn redact_url(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        u.set_query(Some("REDACTED"));
    }
    u.set_fragment(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_credentials_and_query() {
        let url = url::Url::parse("https://user:pw@x.test/a.jpg?X-Amz-Signature=abc#frag").unwrap();
        let d = redact_url(&url);
        assert_eq!(d, "https://x.test/a.jpg?REDACTED");
    }

    #[test]
    fn error_chain_skips_repeats() {
        let inner = std::io::Error::other("inner");
        let outer = std::io::Error::other(inner);
        assert_eq!(error_chain(&outer), "inner");
    }
}
