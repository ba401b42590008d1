//! Fetch the source image of a job: `http(s)://`, `s3://bucket/key`, or the
//! inline bytes already decoded by [`crate::job`].
//!
//! Owns the SSRF guard: unless `SOURCE_ALLOW_PRIVATE=true`, a URL may not
//! reach loopback, private, link-local (cloud metadata), CGNAT, multicast or
//! otherwise reserved addresses. The check runs on every address DNS returns
//! (a custom resolver, so a rebinding name cannot slip through between check
//! and connect) and on every redirect hop. Bodies are streamed with a size
//! cap. Transient failures are retried here, with backoff; this module is the
//! one owner of retries for source downloads.
//!
//! Knows nothing about RabbitMQ, images or Kling.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::config::FetchConfig;
use crate::error::{Classify, Disposition};
use crate::job::{Source, redact_url};

const MAX_REDIRECTS: usize = 5;

/// Downloads source images.
#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    s3: aws_sdk_s3::Client,
    cfg: FetchConfig,
    guard: Guard,
}

/// Which addresses a source URL may reach.
#[derive(Clone)]
struct Guard {
    allow_private: bool,
    allow_nets: Arc<Vec<ipnet::IpNet>>,
}

impl Guard {
    fn refuses(&self, ip: IpAddr) -> bool {
        !self.allow_private
            && is_forbidden_ip(ip)
            && !self.allow_nets.iter().any(|net| net.contains(&ip))
    }

    /// IP-literal hosts (names are checked by the resolver).
    fn check_literal_host(&self, url: &url::Url) -> Result<(), ForbiddenTarget> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        if self.refuses(ip) {
            return Err(ForbiddenTarget {
                host: url.host_str().unwrap_or_default().to_owned(),
                ip,
            });
        }
        Ok(())
    }
}

impl Fetcher {
    pub fn new(cfg: FetchConfig, s3: aws_sdk_s3::Client) -> Result<Self, FetchError> {
        let guard = Guard {
            allow_private: cfg.allow_private,
            allow_nets: Arc::new(cfg.allow_nets.clone()),
        };
        let redirect_guard = guard.clone();
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(RedirectRefused(format!(
                    "more than {MAX_REDIRECTS} redirects"
                )));
            }
            let url = attempt.url();
            if !matches!(url.scheme(), "http" | "https") {
                let reason = format!("redirect to scheme {:?}", url.scheme());
                return attempt.error(RedirectRefused(reason));
            }
            // Names are checked by the resolver; IP literals never reach it.
            if let Err(e) = redirect_guard.check_literal_host(url) {
                return attempt.error(e);
            }
            attempt.follow()
        });
        let http = reqwest::Client::builder()
            .user_agent(concat!("kling-archiver/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.timeout)
            .redirect(redirect)
            .dns_resolver(Arc::new(GuardedResolver {
                guard: guard.clone(),
            }))
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

    /// The source's bytes, at most `SOURCE_MAX_BYTES`.
    pub async fn fetch(&self, source: &Source) -> Result<Bytes, FetchError> {
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
        read_capped(resp, self.cfg.max_bytes, url).await
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

/// Read a response body, refusing more than `max` bytes (checked against
/// `Content-Length` first, then while streaming, so a lying or endless
/// server cannot exhaust memory).
pub async fn read_capped(
    resp: reqwest::Response,
    max: u64,
    url: &url::Url,
) -> Result<Bytes, FetchError> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(FetchError::TooLarge { limit: max });
    }
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| FetchError::from_reqwest(e, url))?;
        if (buf.len() + chunk.len()) as u64 > max {
            return Err(FetchError::TooLarge { limit: max });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Resolves names and refuses any whose addresses include a forbidden one.
struct GuardedResolver {
    guard: Guard,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| guard.refuses(a.ip())) {
                return Err(Box::new(ForbiddenTarget { host, ip: bad.ip() })
                    as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A URL whose host is (or resolves to) an address the guard refuses.
#[derive(Debug, thiserror::Error)]
#[error("{host} is {ip}, a loopback/private/link-local or reserved address")]
pub struct ForbiddenTarget {
    pub host: String,
    pub ip: IpAddr,
}

#[derive(Debug, thiserror::Error)]
#[error("redirect refused: {0}")]
struct RedirectRefused(String);

/// Addresses a source URL may not reach unless private sources are allowed.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_forbidden_v4(v4);
            }
            let seg0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                // 64:ff9b::/96 (NAT64) embeds an IPv4 address: judge that one.
                || (v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_forbidden_v4(embedded_v4(v6)))
                // site-local (deprecated) and documentation ranges
                || (seg0 & 0xffc0) == 0xfec0
                || (seg0 == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Ipv4Addr {
    let o = v6.octets();
    Ipv4Addr::new(o[12], o[13], o[14], o[15])
}

fn is_forbidden_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240 // reserved
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
        let mut cause: Option<&(dyn StdError + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(f) = c.downcast_ref::<ForbiddenTarget>() {
                return FetchError::Forbidden(ForbiddenTarget {
                    host: f.host.clone(),
                    ip: f.ip,
                });
            }
            if let Some(r) = c.downcast_ref::<RedirectRefused>() {
                return FetchError::Redirect {
                    reason: r.0.clone(),
                };
            }
            cause = c.source();
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

impl Classify for FetchError {
    fn disposition(&self) -> Disposition {
        match self {
            FetchError::Forbidden(_)
            | FetchError::Redirect { .. }
            | FetchError::NotFound { .. }
            | FetchError::Denied { .. }
            | FetchError::TooLarge { .. }
            | FetchError::Empty => Disposition::Permanent,
            FetchError::Status { status, .. } if *status == 429 || *status >= 500 => {
                Disposition::Transient
            }
            FetchError::Status { .. } => Disposition::Permanent,
            FetchError::Timeout { .. } | FetchError::Network { .. } | FetchError::S3 { .. } => {
                Disposition::Transient
            }
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
            FetchError::Network { .. } => "source_network",
            FetchError::S3 { .. } => "source_s3_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_ranges_cover_ssrf_targets() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_forbidden_ip(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert!(
                !is_forbidden_ip(ip.parse().unwrap()),
                "{ip} must be allowed"
            );
        }
    }

    #[test]
    fn literal_hosts_are_checked_without_dns() {
        let guard = |allow_private, nets: &[&str]| Guard {
            allow_private,
            allow_nets: Arc::new(nets.iter().map(|n| n.parse().unwrap()).collect()),
        };
        let url = url::Url::parse("http://[::1]:8080/x.jpg").unwrap();
        assert!(guard(false, &[]).check_literal_host(&url).is_err());
        assert!(guard(true, &[]).check_literal_host(&url).is_ok());
        let url = url::Url::parse("http://2130706433/x.jpg").unwrap(); // 127.0.0.1 as an integer
        assert!(guard(false, &[]).check_literal_host(&url).is_err(), "{url}");
        // An allowed network opens exactly that network.
        let nets = guard(false, &["127.0.0.1/32", "10.20.0.0/16"]);
        for (url, ok) in [
            ("http://127.0.0.1/x.jpg", true),
            ("http://10.20.3.4/x.jpg", true),
            ("http://127.0.0.2/x.jpg", false),
            ("http://10.21.0.1/x.jpg", false),
            ("http://169.254.169.254/latest/", false),
        ] {
            let url = url::Url::parse(url).unwrap();
            assert_eq!(nets.check_literal_host(&url).is_ok(), ok, "{url}");
        }
    }

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
