//! Download segment PNGs from Kling's CDN, and only from there.
//!
//! The URL and every redirect hop must match `KLING_RESULT_HOSTS`; `https`
//! is required except for loopback hosts (the simulator). Bodies are
//! size-capped and must be a complete, fully decodable PNG before they
//! are stored. Transient CDN failures are retried here with backoff; 403,
//! 404 and 410 mean the result has expired.
//!
//! Sits on [`crate::net`] like `fetch`; knows nothing about jobs, the
//! archive or RabbitMQ.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;

use crate::error::{Classify, Disposition};
use crate::net::{
    self, AddressGuard, BodyError, ForbiddenTarget, HostPattern, RedirectRefused, error_chain,
    redact_url,
};

/// A segment PNG is at most the prepared image's pixels in RGBA, compressed;
/// this leaves room for pathological compression.
pub const MAX_SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

#[derive(Debug, Clone)]
pub struct ResultDownloader {
    http: reqwest::Client,
    hosts: std::sync::Arc<Vec<HostPattern>>,
}

/// A verified PNG.
#[derive(Debug, Clone)]
pub struct Png {
    pub bytes: Bytes,
    pub width: u32,
    pub height: u32,
}

impl ResultDownloader {
    pub fn new(hosts: Vec<HostPattern>) -> Result<Self, DownloadError> {
        let hosts = std::sync::Arc::new(hosts);
        let policy_hosts = hosts.clone();
        let redirect = net::checked_redirects(5, move |url| check_url(url, &policy_hosts));
        // An allowlisted *name* must still not lead into the network the
        // worker runs in (a `*.klingai.com` record pointing at 10.0.0.5);
        // IP literals in KLING_RESULT_HOSTS are the operator's explicit word.
        let http = net::client_builder(Duration::from_secs(10), Duration::from_secs(120))
            .redirect(redirect)
            .dns_resolver(AddressGuard::new(false, Vec::new()).resolver())
            .build()
            .map_err(|e| DownloadError::Network {
                reason: e.to_string(),
            })?;
        Ok(Self { http, hosts })
    }

    /// Download and verify one segment PNG.
    pub async fn download(&self, url: &url::Url) -> Result<Png, DownloadError> {
        check_url(url, &self.hosts)?;
        (|| self.download_once(url))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(500))
                    .with_max_delay(Duration::from_secs(8))
                    .with_max_times(4)
                    .with_jitter(),
            )
            .when(|e: &DownloadError| e.disposition() == Disposition::Transient)
            .notify(|e, after| tracing::debug!(error = %e, retry_in = ?after, "segment download failed; retrying"))
            .await
    }

    /// Does the CDN serve at `origin` (a result URL's `scheme://host/`)?
    /// Any HTTP answer below 500 means it does; what the worker asks
    /// while result downloads are suspended (see [`crate::health`]).
    pub async fn probe(&self, origin: &url::Url) -> Result<(), String> {
        check_url(origin, &self.hosts).map_err(|e| e.to_string())?;
        let resp = self
            .http
            .get(origin.clone())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| DownloadError::from_reqwest(e, origin).to_string())?;
        match resp.status().as_u16() {
            s if s < 500 => Ok(()),
            s => Err(format!("the CDN answered HTTP {s}")),
        }
    }

    async fn download_once(&self, url: &url::Url) -> Result<Png, DownloadError> {
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| DownloadError::from_reqwest(e, url))?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            403 | 404 | 410 => {
                return Err(DownloadError::Expired {
                    url: redact_url(url),
                    status,
                });
            }
            _ => {
                return Err(DownloadError::Status {
                    url: redact_url(url),
                    status,
                });
            }
        }
        let bytes = net::read_capped(resp, MAX_SEGMENT_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => DownloadError::TooLarge { limit },
                BodyError::Read(e) => DownloadError::from_reqwest(e, url),
            })?;
        let check = bytes.clone();
        let (width, height) = tokio::task::spawn_blocking(move || verify_png(&check))
            .await
            .map_err(|e| DownloadError::Network {
                reason: format!("PNG check task failed: {e}"),
            })?
            .map_err(|reason| DownloadError::NotPng {
                url: redact_url(url),
                reason,
            })?;
        Ok(Png {
            bytes,
            width,
            height,
        })
    }
}

/// Allowlist and scheme check for a result URL or a redirect hop.
fn check_url(url: &url::Url, hosts: &[HostPattern]) -> Result<(), DownloadError> {
    let host = url.host_str().unwrap_or_default().to_owned();
    if !hosts.iter().any(|h| h.matches(url)) {
        let host_port = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        return Err(DownloadError::HostNotAllowed { host: host_port });
    }
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        other => Err(DownloadError::InsecureScheme {
            scheme: other.to_owned(),
        }),
    }
}

/// A complete, decodable PNG. The cheap structural check first (signature,
/// IHDR, IEND), then a full streaming decode row by row: every chunk CRC
/// and the whole zlib stream are checked without holding the image in
/// memory (the decoder's allocations are capped). Returns its size.
pub fn verify_png(b: &[u8]) -> Result<(u32, u32), String> {
    let (width, height) = verify_png_structure(b)?;
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(b),
        png::Limits {
            bytes: 64 * 1024 * 1024,
        },
    );
    decoder.set_ignore_text_chunk(true);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("undecodable: {e}"))?;
    while reader
        .next_row()
        .map_err(|e| format!("undecodable: {e}"))?
        .is_some()
    {}
    reader.finish().map_err(|e| format!("undecodable: {e}"))?;
    Ok((width, height))
}

/// Signature, a sane IHDR first, IEND last.
fn verify_png_structure(b: &[u8]) -> Result<(u32, u32), String> {
    if b.len() < 8 + 25 + 12 || &b[..8] != PNG_SIGNATURE {
        return Err("not a PNG (bad signature)".into());
    }
    if &b[12..16] != b"IHDR" {
        return Err("first chunk is not IHDR".into());
    }
    let width = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    let height = u32::from_be_bytes([b[20], b[21], b[22], b[23]]);
    if width == 0 || height == 0 {
        return Err("IHDR declares a zero dimension".into());
    }
    let tail = &b[b.len() - 12..];
    if tail[..4] != [0, 0, 0, 0] || &tail[4..8] != b"IEND" {
        return Err("truncated: no IEND chunk at the end".into());
    }
    Ok((width, height))
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "segment URL host {host} is not in KLING_RESULT_HOSTS; add it only if it really is Kling's CDN"
    )]
    HostNotAllowed { host: String },
    #[error(
        "segment URL refused: {0}; a result host must resolve to a public address (list an IP literal in KLING_RESULT_HOSTS to allow a private one)"
    )]
    Forbidden(ForbiddenTarget),
    #[error("segment URL scheme {scheme:?} refused: results are fetched over https")]
    InsecureScheme { scheme: String },
    #[error("segment URL answered HTTP {status}: the result has expired or was removed ({url})")]
    Expired { url: String, status: u16 },
    #[error("segment URL answered HTTP {status} ({url})")]
    Status { url: String, status: u16 },
    #[error("segment URL redirect refused: {reason} ({url})")]
    Redirects { url: String, reason: String },
    #[error("segment is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("segment from {url} is not a valid PNG: {reason}")]
    NotPng { url: String, reason: String },
    #[error("segment download failed: {reason}")]
    Network { reason: String },
}

impl DownloadError {
    fn from_reqwest(e: reqwest::Error, url: &url::Url) -> Self {
        if let Some(f) = net::find_cause::<ForbiddenTarget>(&e) {
            return DownloadError::Forbidden(f.clone());
        }
        match net::find_cause::<DownloadError>(&e) {
            Some(DownloadError::HostNotAllowed { host }) => {
                return DownloadError::HostNotAllowed { host: host.clone() };
            }
            Some(DownloadError::InsecureScheme { scheme }) => {
                return DownloadError::InsecureScheme {
                    scheme: scheme.clone(),
                };
            }
            Some(other) => {
                return DownloadError::Network {
                    reason: other.to_string(),
                };
            }
            None => {}
        }
        if let Some(r) = net::find_cause::<RedirectRefused>(&e) {
            return DownloadError::Redirects {
                url: redact_url(url),
                reason: r.0.clone(),
            };
        }
        DownloadError::Network {
            reason: format!("{}: {}", redact_url(url), error_chain(&e.without_url())),
        }
    }
}

impl Classify for DownloadError {
    fn disposition(&self) -> Disposition {
        match self {
            DownloadError::HostNotAllowed { .. }
            | DownloadError::Forbidden(_)
            | DownloadError::InsecureScheme { .. }
            | DownloadError::Redirects { .. }
            | DownloadError::TooLarge { .. } => Disposition::Permanent,
            // Expired is decided by the pipeline: re-recognize once, then give up.
            DownloadError::Expired { .. } => Disposition::Permanent,
            DownloadError::Status { status, .. } if *status == 429 || *status >= 500 => {
                Disposition::Transient
            }
            DownloadError::Status { .. } => Disposition::Permanent,
            DownloadError::NotPng { .. } | DownloadError::Network { .. } => Disposition::Transient,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            DownloadError::HostNotAllowed { .. } => "result_host_not_allowed",
            DownloadError::Forbidden(_) => "result_forbidden_address",
            DownloadError::InsecureScheme { .. } => "result_insecure_scheme",
            DownloadError::Expired { .. } => "results_expired",
            DownloadError::Status { .. } => "result_http_error",
            DownloadError::Redirects { .. } => "result_redirect_refused",
            DownloadError::TooLarge { .. } => "result_too_large",
            DownloadError::NotPng { .. } => "result_not_png",
            DownloadError::Network { .. } => "result_network",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[&str]) -> Vec<HostPattern> {
        list.iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect()
    }

    #[test]
    fn allowlist_and_scheme_are_enforced() {
        let h = hosts(&["*.klingai.com", "127.0.0.1:9000"]);
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert!(check_url(&u("https://cdn.klingai.com/a.png"), &h).is_ok());
        assert!(check_url(&u("http://127.0.0.1:9000/a.png"), &h).is_ok());
        assert_eq!(
            check_url(&u("http://cdn.klingai.com/a.png"), &h)
                .unwrap_err()
                .code(),
            "result_insecure_scheme"
        );
        assert_eq!(
            check_url(&u("https://evil.com/a.png"), &h)
                .unwrap_err()
                .code(),
            "result_host_not_allowed"
        );
        assert_eq!(
            check_url(&u("http://127.0.0.1:9001/a.png"), &h)
                .unwrap_err()
                .code(),
            "result_host_not_allowed"
        );
        assert_eq!(
            check_url(&u("https://169.254.169.254/latest"), &h)
                .unwrap_err()
                .code(),
            "result_host_not_allowed"
        );
    }

    #[tokio::test]
    async fn an_allowlisted_name_that_resolves_inside_the_network_is_refused() {
        // A server that would answer: the download must never reach it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = hits.clone();
        tokio::spawn(async move {
            while let Ok((_sock, _)) = listener.accept().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let d = ResultDownloader::new(hosts(&[&format!("localhost:{port}")])).unwrap();
        let url = url::Url::parse(&format!("http://localhost:{port}/seg.png")).unwrap();
        let err = d.download(&url).await.unwrap_err();
        assert_eq!(err.code(), "result_forbidden_address", "{err}");
        assert_eq!(err.disposition(), Disposition::Permanent);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn png_verification_catches_truncation_and_impostors() {
        let img = image::RgbaImage::from_pixel(4, 3, image::Rgba([1, 2, 3, 255]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(verify_png(&png), Ok((4, 3)));
        assert!(
            verify_png(&png[..png.len() - 5])
                .unwrap_err()
                .contains("truncated")
        );
        assert!(verify_png(b"<html>expired</html>").is_err());
        assert!(verify_png(&[]).is_err());
        // Intact structure, damaged pixels: only the full decode sees it.
        let at = png.windows(4).position(|w| w == b"IDAT").unwrap() + 6;
        let mut damaged = png.clone();
        damaged[at] ^= 0x55;
        assert!(verify_png_structure(&damaged).is_ok());
        let err = verify_png(&damaged).unwrap_err();
        assert!(err.contains("undecodable"), "{err}");
    }
}
