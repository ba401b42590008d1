//! Fetch the source image of a job: `http(s)://`, `s3://bucket/key`, or the
//! inline bytes already decoded by [`crate::job`].
//!
//! Puts the SSRF guard ([`crate::net::guard`]) on every source URL: unless
//! `SOURCE_ALLOW_PRIVATE=true`, a URL may not reach loopback, private,
//! link-local (cloud metadata), CGNAT, multicast or otherwise reserved
//! addresses, checked on every address DNS returns and on every redirect
//! hop. Bodies are streamed with a size cap. Transient failures are retried
//! here, with backoff; this module is the one owner of retries for source
//! downloads.
//!
//! Knows nothing about RabbitMQ, images or Kling.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};

use crate::config::FetchConfig;
use crate::error::{Classify, Disposition};
use crate::job::Source;
use crate::net::{
    self, AddressGuard, BodyError, ForbiddenTarget, RedirectRefused, error_chain, redact_url,
};

const MAX_REDIRECTS: usize = 5;

/// Downloads source images.
#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    s3: aws_sdk_s3::Client,
    cfg: FetchConfig,
    guard: AddressGuard,
}

impl Fetcher {
    pub fn new(cfg: FetchConfig, s3: aws_sdk_s3::Client) -> Result<Self, FetchError> {
        let guard = AddressGuard::new(cfg.allow_private, cfg.allow_nets.clone());
        let redirect_guard = guard.clone();
        let redirect = net::checked_redirects(MAX_REDIRECTS, move |url| {
            if !matches!(url.scheme(), "http" | "https") {
                let reason = format!("redirect to scheme {:?}", url.scheme());
                return Err(FetchError::Redirect { reason });
            }
            // Names are checked by the resolver; IP literals never reach it.
            redirect_guard.check_literal_host(url)?;
            Ok(())
        });
        let http = net::client_builder(cfg.connect_timeout, cfg.timeout)
            .redirect(redirect)
            .dns_resolver(guard.resolver())
            .build()
            .map_err(|e| FetchError::Network {
                reason: format!("building the HTTP client: {e}"),
            })?;
        Ok(Self {
            http,
            s3,
            cfg,
            guard,
        })
    }

    /// The source's bytes, at most `SOURCE_MAX_BYTES`, within one overall
    /// deadline (`SOURCE_FETCH_DEADLINE_SECS`) whatever the retries: a
    /// source that drips cannot hold a job slot for retries × timeout.
    pub async fn fetch(&self, source: &Source) -> Result<Bytes, FetchError> {
        let deadline = self.cfg.deadline;
        match tokio::time::timeout(deadline, self.fetch_with_retries(source)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Deadline {
                uri: source.describe(),
                secs: deadline.as_secs(),
            }),
        }
    }

    async fn fetch_with_retries(&self, source: &Source) -> Result<Bytes, FetchError> {
        let bytes = match source {
            Source::Inline(b) => {
                if b.len() as u64 > self.cfg.max_bytes {
                    return Err(FetchError::TooLarge {
                        limit: self.cfg.max_bytes,
                    });
                }
                b.clone()
            }
            Source::Http(url) => {
                self.guard.check_literal_host(url)?;
                (|| self.fetch_http(url))
                    .retry(retry_policy())
                    .when(|e: &FetchError| e.disposition() == Disposition::Transient)
                    .notify(|e, after| tracing::debug!(error = %e, retry_in = ?after, "source fetch failed; retrying"))
                    .await?
            }
            Source::S3 { bucket, key } => {
                if !self.cfg.s3_buckets.iter().any(|b| b == bucket) {
                    return Err(FetchError::BucketNotAllowed {
                        bucket: bucket.clone(),
                    });
                }
                (|| self.fetch_s3(bucket, key))
                    .retry(retry_policy())
                    .when(|e: &FetchError| e.disposition() == Disposition::Transient)
                    .await?
            }
        };
        if bytes.is_empty() {
            return Err(FetchError::Empty);
        }
        Ok(bytes)
    }

    async fn fetch_http(&self, url: &url::Url) -> Result<Bytes, FetchError> {
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| FetchError::from_reqwest(e, url))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(FetchError::from_status(status.as_u16(), url));
        }
        net::read_capped(resp, self.cfg.max_bytes)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => FetchError::TooLarge { limit },
                BodyError::Read(e) => FetchError::from_reqwest(e, url),
            })
    }

    async fn fetch_s3(&self, bucket: &str, key: &str) -> Result<Bytes, FetchError> {
        use aws_sdk_s3::error::ProvideErrorMetadata;
        let uri = format!("s3://{bucket}/{key}");
        let out = self
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                let code = e.code().unwrap_or_default().to_owned();
                let status = e.raw_response().map(|r| r.status().as_u16());
                match (code.as_str(), status) {
                    ("NoSuchKey" | "NoSuchBucket", _) | (_, Some(404)) => {
                        FetchError::NotFound { uri: uri.clone() }
                    }
                    ("AccessDenied", _) | (_, Some(403)) => FetchError::Denied { uri: uri.clone() },
                    _ => FetchError::S3 {
                        uri: uri.clone(),
                        reason: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                    },
                }
            })?;
        if let Some(len) = out.content_length()
            && len as u64 > self.cfg.max_bytes
        {
            return Err(FetchError::TooLarge {
                limit: self.cfg.max_bytes,
            });
        }
        let mut body = out.body;
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FetchError::S3 {
                uri: uri.clone(),
                reason: e.to_string(),
            })?;
            if (buf.len() + chunk.len()) as u64 > self.cfg.max_bytes {
                return Err(FetchError::TooLarge {
                    limit: self.cfg.max_bytes,
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

/// Source downloads retry a few times quickly; a source that stays down
/// sends the message back to the queue.
fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(3)
        .with_jitter()
}

/// Why a source could not be fetched.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "source refused: {0}; set SOURCE_ALLOW_PRIVATE=true only if the worker runs on a trusted private network"
    )]
    Forbidden(#[from] ForbiddenTarget),
    #[error("source redirect refused: {reason}")]
    Redirect { reason: String },
    #[error("source not found: {uri}")]
    NotFound { uri: String },
    #[error("source access denied: {uri}; check the URL or the worker's S3 permissions")]
    Denied { uri: String },
    #[error("source answered HTTP {status}: {uri}")]
    Status { status: u16, uri: String },
    #[error("source is larger than the {limit}-byte limit (SOURCE_MAX_BYTES)")]
    TooLarge { limit: u64 },
    #[error("source is empty (0 bytes)")]
    Empty,
    #[error("source download timed out: {uri}")]
    Timeout { uri: String },
    #[error(
        "source fetch took longer than its {secs}-second deadline, retries included (SOURCE_FETCH_DEADLINE_SECS): {uri}"
    )]
    Deadline { uri: String, secs: u64 },
    #[error(
        "s3:// source bucket {bucket:?} is not in SOURCE_S3_BUCKETS; the worker reads only the buckets listed there"
    )]
    BucketNotAllowed { bucket: String },
    #[error("source download failed: {reason}")]
    Network { reason: String },
    #[error("reading {uri} from S3 failed: {reason}")]
    S3 { uri: String, reason: String },
}

impl FetchError {
    fn from_status(status: u16, url: &url::Url) -> Self {
        let uri = redact_url(url);
        match status {
            // reqwest hands back a redirect it would not follow (to file:,
            // or with a broken Location) as the 3xx response itself.
            300..=399 => FetchError::Redirect {
                reason: format!("HTTP {status} to a location that is not an http(s) URL"),
            },
            404 | 410 => FetchError::NotFound { uri },
            401 | 403 => FetchError::Denied { uri },
            _ => FetchError::Status { status, uri },
        }
    }

    fn from_reqwest(e: reqwest::Error, url: &url::Url) -> Self {
        // Our own refusals travel inside reqwest's error chain.
        if let Some(f) = net::find_cause::<ForbiddenTarget>(&e) {
            return FetchError::Forbidden(f.clone());
        }
        if let Some(r) = net::find_cause::<FetchError>(&e)
            && let FetchError::Redirect { reason } = r
        {
            return FetchError::Redirect {
                reason: reason.clone(),
            };
        }
        if let Some(r) = net::find_cause::<RedirectRefused>(&e) {
            return FetchError::Redirect {
                reason: r.0.clone(),
            };
        }
        let uri = redact_url(url);
        if e.is_timeout() {
            FetchError::Timeout { uri }
        } else {
            // The URL inside reqwest's message may carry a signed query.
            FetchError::Network {
                reason: format!("{uri}: {}", error_chain(&e.without_url())),
            }
        }
    }
}

impl Classify for FetchError {
    fn disposition(&self) -> Disposition {
        match self {
            FetchError::Forbidden(_)
            | FetchError::Redirect { .. }
            | FetchError::NotFound { .. }
            | FetchError::Denied { .. }
            | FetchError::TooLarge { .. }
            | FetchError::BucketNotAllowed { .. }
            | FetchError::Empty => Disposition::Permanent,
            FetchError::Status { status, .. } if *status == 429 || *status >= 500 => {
                Disposition::Transient
            }
            FetchError::Status { .. } => Disposition::Permanent,
            FetchError::Timeout { .. }
            | FetchError::Deadline { .. }
            | FetchError::Network { .. }
            | FetchError::S3 { .. } => Disposition::Transient,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            FetchError::Forbidden(_) => "source_forbidden_address",
            FetchError::Redirect { .. } => "source_redirect_refused",
            FetchError::NotFound { .. } => "source_not_found",
            FetchError::Denied { .. } => "source_access_denied",
            FetchError::Status { status, .. } if *status >= 500 => "source_http_5xx",
            FetchError::Status { status: 429, .. } => "source_rate_limited",
            FetchError::Status { .. } => "source_http_4xx",
            FetchError::TooLarge { .. } => "source_too_large",
            FetchError::Empty => "source_empty",
            FetchError::Timeout { .. } => "source_timeout",
            FetchError::Deadline { .. } => "source_deadline",
            FetchError::BucketNotAllowed { .. } => "source_s3_bucket_not_allowed",
            FetchError::Network { .. } => "source_network",
            FetchError::S3 { .. } => "source_s3_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_of_statuses() {
        let u = url::Url::parse("https://x.test/a.jpg?sig=secret").unwrap();
        assert_eq!(FetchError::from_status(404, &u).code(), "source_not_found");
        assert_eq!(
            FetchError::from_status(403, &u).disposition(),
            Disposition::Permanent
        );
        assert_eq!(
            FetchError::from_status(503, &u).disposition(),
            Disposition::Transient
        );
        assert_eq!(
            FetchError::from_status(429, &u).code(),
            "source_rate_limited"
        );
        assert_eq!(FetchError::from_status(400, &u).code(), "source_http_4xx");
        assert!(
            !FetchError::from_status(404, &u)
                .to_string()
                .contains("secret")
        );
    }
}
