//! Command-line flags and environment variables, and the validated
//! [`Config`] they become.
//!
//! `Args` is the raw shape clap parses (`args`: every flag has an env var,
//! names fixed by the user contract in `docs/operations.md`).
//! [`WorkerArgs::into_config`] (`validate`) checks it once and produces a
//! `Config` that the rest of the worker trusts. Secrets come only from the
//! environment or a file and are held as [`SecretString`], whose `Debug` is
//! redacted.
//!
//! A leaf: plain values, one default per setting, and no import of any
//! other module of the crate. Stages build their own types from these
//! values (the broker its `Topology`, the pipeline its `Limits`, the result
//! downloader its host patterns).

mod args;
mod validate;

pub use args::{
    Cli, Command, DemoArgs, DlqAction, DlqArgs, EnqueueArgs, LogFormat, ReportArgs, SimArgs,
    VerifyArgs, WorkerArgs,
};

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_QUEUE: &str = "kling.jobs";
pub const DEFAULT_KLING_BASE_URL: &str = "https://api-singapore.klingai.com";
pub const DEFAULT_ARCHIVE: &str = "./kling-archive";
/// Kling's result CDN. `*.` matches any subdomain.
pub const DEFAULT_RESULT_HOSTS: &str = "*.klingai.com";
/// Default `MEMORY_BUDGET_MB`.
pub const DEFAULT_MEMORY_BUDGET_MB: u32 = 1024;
/// Default retry delays: transient failures that outlast a job's own
/// retries wait 5 s, then 30 s, then 5 min per further attempt.
pub const DEFAULT_RETRY_DELAYS_SECS: [u64; 3] = [5, 30, 300];
/// Where `worker demo` archives when neither `--archive` nor `--out` is given.
pub const DEMO_ARCHIVE: &str = "./demo-archive";

/// Validated configuration of a consuming worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_url: SecretString,
    pub queue: String,
    /// Ceiling of Kling calls in flight (`--concurrency`).
    pub concurrency: usize,
    /// Deliveries held at once (`--prefetch`): jobs in flight.
    pub prefetch: usize,
    pub delivery_limit: u32,
    pub retry_delays: Vec<Duration>,
    pub kling: KlingConfig,
    pub archive: ArchiveTarget,
    /// A local archive is intended (`ARCHIVE_LOCAL_OK`): no warning.
    pub archive_local_ok: bool,
    pub s3_force_path_style: bool,
    pub fetch: FetchConfig,
    /// `KLING_RESULT_HOSTS` entries (`host`, `host:port`, `*.domain`); the
    /// result downloader parses them.
    pub result_hosts: Vec<String>,
    /// Largest image, in pixels, the worker will decode.
    pub max_image_pixels: u64,
    pub pixel_budget: u64,
    /// MiB of the byte budget (`MEMORY_BUDGET_MB`).
    pub memory_budget_mb: u32,
    pub share_recognitions: bool,
    /// See `SOURCE_MASKS`.
    pub source_masks: bool,
    pub shutdown_timeout: Duration,
    pub lease_ttl: Duration,
    pub job_deadline: Duration,
    pub allow_unsafe_conditional_writes: bool,
    /// Where `/metrics`, `/healthz`, `/readyz` listen; `None` when `off`.
    pub http_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct KlingConfig {
    pub base_url: url::Url,
    /// Explicit proxy for the Kling API host (`KLING_PROXY`).
    pub proxy: Option<url::Url>,
    pub access_key: String,
    pub secret_key: SecretString,
    pub max_attempts: u32,
    pub job_deadline: Duration,
    pub request_timeout: Duration,
    /// First backoff delay; Kling asks for at least 1 s.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Upper bound of the adaptive in-flight limit (`--concurrency`).
    pub max_in_flight: usize,
    /// Time between probes while the worker is suspended.
    pub probe_interval: Duration,
    pub breaker: BreakerConfig,
}

#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// `s3://` sources are read only from these buckets; empty refuses them.
    pub s3_buckets: Vec<String>,
    /// One overall deadline per source fetch, retries included.
    pub deadline: Duration,
    pub allow_private: bool,
    /// Private networks allowed although `allow_private` is off.
    pub allow_nets: Vec<ipnet::IpNet>,
    pub max_bytes: u64,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            s3_buckets: Vec::new(),
            deadline: Duration::from_secs(90),
            allow_private: false,
            allow_nets: Vec::new(),
            max_bytes: 64 * 1024 * 1024,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The circuit breaker's window: how many recent Kling calls it looks at,
/// and how many of them must be outage failures to open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub window: usize,
    pub threshold: usize,
}

impl Default for BreakerConfig {
    /// 18 of the last 20 calls. With 20 % random transient faults a false
    /// trip has odds of about 3·10⁻¹¹ per window; a real outage fails
    /// every call and trips within 20 calls.
    fn default() -> Self {
        Self {
            window: 20,
            threshold: 18,
        }
    }
}

/// Where the archive is, from `ARCHIVE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveTarget {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl ArchiveTarget {
    /// `s3://bucket[/prefix]`, `file:///path`, or a plain path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !bucket_ok {
                return Err(format!("{bucket:?} is not a valid S3 bucket name"));
            }
            let prefix = prefix.trim_matches('/').to_owned();
            let segment_ok = |seg: &str| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._=-".contains(c))
            };
            if !prefix.is_empty() && (prefix.len() > 200 || !prefix.split('/').all(segment_ok)) {
                return Err(format!(
                    "prefix {prefix:?}: use up to 200 characters of [A-Za-z0-9._=-] between slashes"
                ));
            }
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                prefix,
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if path.is_empty() {
            return Err("empty path".into());
        }
        if s.contains("://") && !s.starts_with("file://") {
            return Err(format!(
                "{s:?}: use s3://bucket/prefix, file:///path or a path"
            ));
        }
        Ok(Self::Local(PathBuf::from(path)))
    }
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{name} is not set; the worker refuses to start without Kling keys (set it, or {name}_FILE to a file holding it)"
    )]
    MissingSecret { name: &'static str },
    #[error("could not read {name}_FILE {path}: {source}")]
    SecretFile {
        name: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// The prefetch when `--prefetch` is not given: twice the Kling ceiling.
/// A job spends L in the Kling call and S in every other stage (fetch,
/// prepare, S3 writes, segment downloads); to keep C calls busy a worker
/// needs C × (L + S) / L jobs in flight (Little's law), so 2 × C covers
/// other stages taking as long as the call itself (docs/operations.md).
pub fn default_prefetch(concurrency: u16) -> u16 {
    concurrency.saturating_mul(2)
}

/// Read a secret from `NAME`, or from the file named by `NAME_FILE`
/// (Kubernetes / Docker secrets). Trailing newlines of a file are dropped.
pub fn secret_from_env(name: &'static str) -> Result<SecretString, ConfigError> {
    if let Ok(v) = std::env::var(name)
        && !v.is_empty()
    {
        return Ok(SecretString::from(v));
    }
    let file_var = format!("{name}_FILE");
    if let Ok(path) = std::env::var(&file_var) {
        let v = std::fs::read_to_string(&path).map_err(|source| ConfigError::SecretFile {
            name,
            path: path.clone(),
            source,
        })?;
        let v = v.trim_end_matches(['\r', '\n']).to_owned();
        if !v.is_empty() {
            return Ok(SecretString::from(v));
        }
    }
    Err(ConfigError::MissingSecret { name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_targets_parse() {
        assert_eq!(
            ArchiveTarget::parse("s3://bucket/a/b/").unwrap(),
            ArchiveTarget::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            ArchiveTarget::parse("s3://my-bucket").unwrap(),
            ArchiveTarget::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            ArchiveTarget::parse("file:///tmp/x").unwrap(),
            ArchiveTarget::Local("/tmp/x".into())
        );
        assert_eq!(
            ArchiveTarget::parse("./arch").unwrap(),
            ArchiveTarget::Local("./arch".into())
        );
        for bad in [
            "s3://",
            "s3://B/x",
            "s3://ok-bucket/a/../b",
            "gs://x/y",
            "http://x/y",
            "",
        ] {
            assert!(ArchiveTarget::parse(bad).is_err(), "{bad:?}");
        }
    }
}
