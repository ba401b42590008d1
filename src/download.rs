//! Download segment PNGs from Kling's CDN, and only from there.
//!
//! The URL and every redirect hop must match `KLING_RESULT_HOSTS`; `https`
//! is required except for loopback hosts (the simulator). Bodies are
//! size-capped by [`SegmentLimits`] (derived by the caller from the image
//! the mask is of) and must be a complete, fully decodable PNG before they
//! are stored: the cheap structural check runs here, the full decode in
//! [`Downloaded::verify`], which is CPU work the caller runs inside its CPU
//! permits. Transient CDN failures are retried here with backoff; 403, 404
//! and 410 mean the result has expired.
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

/// The ceiling over any [`SegmentLimits`]: no segment body is read past it,
/// whatever image it is a mask of.
pub const MAX_SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// What one segment PNG may weigh, set by the caller from the image it is
/// a mask of (a mask of a W×H image has no business being larger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLimits {
    /// The body as sent (compressed); capped at [`MAX_SEGMENT_BYTES`].
    pub max_bytes: u64,
    /// The raw pixel bytes its header declares (width × height × bytes
    /// per pixel), which bounds the inflate work of the full check.
    pub max_decoded: u64,
}

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

/// A downloaded body whose structure (signature, IHDR within the limits,
/// IEND) is checked; [`Self::verify`] does the full decode.
#[derive(Debug, Clone)]
pub struct Downloaded {
    bytes: Bytes,
    url: String,
    limits: SegmentLimits,
}

impl Downloaded {
    /// Decode every row (CRCs, the whole zlib stream) within the limits.
    /// CPU work, bounded by `max_decoded`: run it on the caller's CPU pool.
    pub fn verify(self) -> Result<Png, DownloadError> {
        let (width, height) =
            verify_png(&self.bytes, &self.limits).map_err(|reason| DownloadError::NotPng {
                url: self.url,
                reason,
            })?;
        Ok(Png {
            bytes: self.bytes,
            width,
            height,
        })
    }
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

    /// Download one segment PNG and check its structure against `limits`
    /// (the caller runs [`Downloaded::verify`]).
    pub async fn download(
        &self,
        url: &url::Url,
        limits: SegmentLimits,
    ) -> Result<Downloaded, DownloadError> {
        check_url(url, &self.hosts)?;
        (|| self.download_once(url, limits))
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

    async fn download_once(
        &self,
        url: &url::Url,
        limits: SegmentLimits,
    ) -> Result<Downloaded, DownloadError> {
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
        let bytes = net::read_capped(resp, limits.max_bytes.min(MAX_SEGMENT_BYTES))
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => DownloadError::TooLarge { limit },
                BodyError::Read(e) => DownloadError::from_reqwest(e, url),
            })?;
        // O(1): a body cut short is retried here; a header over the limits
        // is refused before any inflate work.
        verify_png_structure(&bytes, &limits).map_err(|e| match e {
            Structure::Broken(reason) => DownloadError::NotPng {
                url: redact_url(url),
                reason,
            },
            Structure::OverCap(reason) => DownloadError::DecodeTooLarge { reason },
        })?;
        Ok(Downloaded {
            bytes,
            url: redact_url(url),
            limits,
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

/// A complete, decodable PNG within `limits`. The cheap structural check
/// first (signature, IHDR, IEND, the declared raw size), then a full
/// streaming decode row by row: every chunk CRC and the whole zlib stream
/// are checked without holding the image in memory (the decoder's
/// allocations are capped). Returns its size.
pub fn verify_png(b: &[u8], limits: &SegmentLimits) -> Result<(u32, u32), String> {
    let (width, height) = verify_png_structure(b, limits).map_err(|e| match e {
        Structure::Broken(r) | Structure::OverCap(r) => r,
    })?;
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(b),
        png::Limits {
            bytes: usize::try_from(limits.max_decoded)
                .unwrap_or(usize::MAX)
                .clamp(1 << 20, 64 << 20),
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

/// Why a body fails the structural check.
enum Structure {
    /// Not a whole PNG (maybe cut short in transit).
    Broken(String),
    /// A PNG whose header declares more pixels than the limits allow.
    OverCap(String),
}

/// Signature, a sane IHDR first within the limits, IEND last.
fn verify_png_structure(b: &[u8], limits: &SegmentLimits) -> Result<(u32, u32), Structure> {
    let broken = |r: &str| Err(Structure::Broken(r.to_owned()));
    if b.len() < 8 + 25 + 12 || &b[..8] != PNG_SIGNATURE {
        return broken("not a PNG (bad signature)");
    }
    if &b[12..16] != b"IHDR" {
        return broken("first chunk is not IHDR");
    }
    let width = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    let height = u32::from_be_bytes([b[20], b[21], b[22], b[23]]);
    if width == 0 || height == 0 {
        return broken("IHDR declares a zero dimension");
    }
    let tail = &b[b.len() - 12..];
    if tail[..4] != [0, 0, 0, 0] || &tail[4..8] != b"IEND" {
        return broken("truncated: no IEND chunk at the end");
    }
    let decoded = declared_raw_bytes(width, height, b[24], b[25]);
    if decoded > limits.max_decoded {
        return Err(Structure::OverCap(format!(
            "header declares {width}x{height} ({decoded} bytes decoded), over the cap of {} bytes",
            limits.max_decoded
        )));
    }
    Ok((width, height))
}

/// Raw bytes a PNG header declares: rows of `width` pixels at the colour
/// type's samples and bit depth (an unknown colour type counts as RGBA 16).
fn declared_raw_bytes(width: u32, height: u32, depth: u8, colour: u8) -> u64 {
    let samples: u64 = match colour {
        0 | 3 => 1,
        4 => 2,
        2 => 3,
        _ => 4,
    };
    let bits = match (colour, depth) {
        (0 | 2 | 3 | 4 | 6, 1 | 2 | 4 | 8 | 16) => u64::from(depth),
        _ => 16,
    };
    (u64::from(width) * samples * bits).div_ceil(8) * u64::from(height)
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
    #[error("segment is too large for the image it is a mask of: {reason}")]
    DecodeTooLarge { reason: String },
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
            | DownloadError::TooLarge { .. }
            | DownloadError::DecodeTooLarge { .. } => Disposition::Permanent,
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
            DownloadError::TooLarge { .. } | DownloadError::DecodeTooLarge { .. } => {
                "result_too_large"
            }
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
        let err = d.download(&url, ROOMY).await.unwrap_err();
        assert_eq!(err.code(), "result_forbidden_address", "{err}");
        assert_eq!(err.disposition(), Disposition::Permanent);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    const ROOMY: SegmentLimits = SegmentLimits {
        max_bytes: 1 << 20,
        max_decoded: 1 << 20,
    };

    fn rgba_png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_pixel(w, h, image::Rgba([1, 2, 3, 255]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    }

    #[test]
    fn png_verification_catches_truncation_and_impostors() {
        let png = rgba_png(4, 3);
        assert_eq!(verify_png(&png, &ROOMY), Ok((4, 3)));
        assert!(
            verify_png(&png[..png.len() - 5], &ROOMY)
                .unwrap_err()
                .contains("truncated")
        );
        assert!(verify_png(b"<html>expired</html>", &ROOMY).is_err());
        assert!(verify_png(&[], &ROOMY).is_err());
        // Intact structure, damaged pixels: only the full decode sees it.
        let at = png.windows(4).position(|w| w == b"IDAT").unwrap() + 6;
        let mut damaged = png.clone();
        damaged[at] ^= 0x55;
        assert!(verify_png_structure(&damaged, &ROOMY).is_ok());
        let err = verify_png(&damaged, &ROOMY).unwrap_err();
        assert!(err.contains("undecodable"), "{err}");
    }

    /// The header's declared pixels are judged before any inflate work: a
    /// mask that decodes to more than the cap is refused from 45 bytes.
    #[test]
    fn a_png_declaring_more_pixels_than_the_cap_is_refused_before_decoding() {
        let png = rgba_png(64, 64);
        let exact = SegmentLimits {
            max_bytes: 1 << 20,
            max_decoded: 64 * 64 * 4,
        };
        assert_eq!(verify_png(&png, &exact), Ok((64, 64)));
        let tight = SegmentLimits {
            max_bytes: 1 << 20,
            max_decoded: 64 * 64 * 4 - 1,
        };
        match verify_png_structure(&png, &tight) {
            Err(Structure::OverCap(r)) => assert!(r.contains("64x64"), "{r}"),
            _ => panic!("a header over the cap must be refused"),
        }
        // A bomb header: 30000 x 30000 RGBA, a few dozen bytes long.
        let mut bomb = png.clone();
        bomb[16..20].copy_from_slice(&30_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&30_000u32.to_be_bytes());
        let err = verify_png(&bomb, &ROOMY).unwrap_err();
        assert!(err.contains("over the cap"), "{err}");
        // Colour types and depths: grey 8, RGB 8, RGBA 16, palette 1-bit.
        assert_eq!(declared_raw_bytes(10, 2, 8, 0), 20);
        assert_eq!(declared_raw_bytes(10, 2, 8, 2), 60);
        assert_eq!(declared_raw_bytes(10, 2, 16, 6), 160);
        assert_eq!(declared_raw_bytes(10, 2, 1, 3), 4);
        assert_eq!(declared_raw_bytes(10, 2, 3, 9), 160, "nonsense counts high");
    }

    #[tokio::test]
    async fn a_body_over_the_callers_cap_is_cut_and_refused() {
        let png = rgba_png(32, 32);
        let len = png.len() as u64;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", png.len());
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&png).await;
            }
        });
        let d = ResultDownloader::new(hosts(&[&format!("127.0.0.1:{port}")])).unwrap();
        let url = url::Url::parse(&format!("http://127.0.0.1:{port}/seg.png")).unwrap();
        let fits = SegmentLimits {
            max_bytes: len,
            max_decoded: 32 * 32 * 4,
        };
        let got = d.download(&url, fits).await.unwrap().verify().unwrap();
        assert_eq!((got.width, got.height), (32, 32));
        let small = SegmentLimits {
            max_bytes: len - 1,
            ..fits
        };
        let err = d.download(&url, small).await.unwrap_err();
        assert_eq!(err.code(), "result_too_large", "{err}");
        assert_eq!(err.disposition(), Disposition::Permanent);
        let narrow = SegmentLimits {
            max_decoded: 32 * 32 * 4 - 1,
            ..fits
        };
        let err = d.download(&url, narrow).await.unwrap_err();
        assert!(matches!(err, DownloadError::DecodeTooLarge { .. }), "{err}");
    }
}
