//! Command-line flags and environment variables, and the validated
//! [`Config`] they become.
//!
//! `Args` is the raw shape clap parses (every flag has an env var, names fixed
//! by the user contract in `docs/operations.md`). [`WorkerArgs::into_config`]
//! checks it once and produces a `Config` that the rest of the worker trusts.
//! Secrets come only from the environment or a file and are held as
//! [`SecretString`], whose `Debug` is redacted.
//!
//! A leaf: plain values, one default per setting, and no import of any
//! other module of the crate. Stages build their own types from these
//! values (the broker its `Topology`, the pipeline its `Limits`, the result
//! downloader its host patterns).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
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

/// kling-archiver: archive Kling AI image-segmentation results from RabbitMQ
/// jobs into S3 (or a local directory) before Kling deletes them.
///
/// With no subcommand, `worker` consumes jobs until SIGTERM/SIGINT.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub worker: WorkerArgs,

    /// Log format: `json` for containers, `pretty` for a terminal.
    /// Levels come from RUST_LOG (default `info`).
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "pretty",
        global = true
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a self-contained demo: an in-process Kling simulator, a local
    /// archive, sample images through RabbitMQ, and a summary.
    Demo(DemoArgs),
    /// Run the Kling API simulator as an HTTP server (for local runs and tests).
    Sim(SimArgs),
    /// Publish jobs from a directory of images, a file of URLs, an NDJSON
    /// file of job messages, or an s3:// prefix (publisher confirms).
    Enqueue(EnqueueArgs),
    /// Inspect, replay or purge the dead-letter queue (`<queue>.dead`).
    Dlq(DlqArgs),
    /// Check an archive: every object each manifest names exists with the
    /// recorded size and SHA-256. Exits 1 on any problem.
    Verify(VerifyArgs),
    /// Write one self-contained HTML page of an archive: each job's source
    /// thumbnail with its segment masks overlaid, labels, transforms, cost.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Only jobs archived on or after this day (YYYY-MM-DD, UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many jobs, the newest.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Where to write the page.
    #[arg(long, default_value = "report.html")]
    pub out: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only manifests archived on or after this day (YYYY-MM-DD).
    #[arg(long)]
    pub since: Option<String>,
    /// Read metadata only (size and sha256), do not download.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// A directory (images, recursively, sent inline), a text file of URLs
    /// (one per line), an `.ndjson`/`.jsonl` file of job messages, or
    /// `s3://bucket/prefix`.
    pub source: String,
    /// Label added to every job (`key=value`, repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Check and count the jobs; publish nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// A flag value that may carry credentials: held as a [`SecretString`], so
/// `Debug` of the flags never prints it.
fn parse_secret(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected key=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Count dead letters by reason code, with example job ids.
    List,
    /// Put dead letters back on the job queue (confirmed), all or by reason.
    Replay {
        /// Only those with this reason code (e.g. `source_not_found`).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Drop dead letters with a reason code, or all of them with `--yes`.
    Purge {
        #[arg(long)]
        reason: Option<String>,
        /// Confirm dropping every dead letter.
        #[arg(long)]
        yes: bool,
    },
}

/// Where `worker demo` archives when neither `--archive` nor `--out` is given.
pub const DEMO_ARCHIVE: &str = "./demo-archive";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The demo's archive: the same setting as `--archive` / `ARCHIVE_URL`
    /// (a directory or `s3://bucket/prefix`), kept under this older name;
    /// default ./demo-archive. It must be empty, new, or an earlier demo
    /// archive: the demo removes only what it made there (listed in
    /// kling-demo.json) and refuses anything else.
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub out: Option<String>,
    /// Simulated Kling latency per call, in milliseconds.
    #[arg(long, default_value_t = 150)]
    pub latency_ms: u64,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, env = "SIM_BIND", default_value = "127.0.0.1:8089")]
    pub bind: SocketAddr,
    /// Latency added to every recognize call, in milliseconds.
    #[arg(long, env = "SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// How long result URLs stay valid, in seconds (Kling: 30 days).
    #[arg(long, env = "SIM_RESULT_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    pub result_ttl_secs: u64,
}

/// Flags of the consuming worker. Each has an environment variable.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// RabbitMQ URL. May carry credentials; it is never logged.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, global = true, hide_env_values = true, value_parser = parse_secret)]
    pub amqp_url: SecretString,

    /// Job queue. Dead letters go to `<queue>.dead`.
    #[arg(long, env = "WORKER_QUEUE", default_value = DEFAULT_QUEUE, global = true)]
    pub queue: String,

    /// Kling calls in flight per process, at most (the account's
    /// concurrency is about these; the adaptive limit stays under it).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Deliveries a worker holds (the RabbitMQ prefetch), so that jobs
    /// fetch, prepare and archive while others hold the Kling calls.
    /// Default: 2 × `--concurrency` (see docs/operations.md, Sizing).
    #[arg(long, env = "WORKER_PREFETCH")]
    pub prefetch: Option<u16>,

    /// `x-delivery-limit` of the job queue: redeliveries before RabbitMQ
    /// dead-letters a message. Every declarer must use the same value.
    #[arg(
        long,
        env = "WORKER_DELIVERY_LIMIT",
        default_value_t = 10,
        global = true
    )]
    pub delivery_limit: u32,

    /// Delays of the retry queues `<queue>.retry.<n>s`, in seconds,
    /// comma-separated: a job whose transient failures outlast its own
    /// retries waits the first, then the second, … (the last repeats).
    /// Every declarer must use the same values.
    #[arg(
        long,
        env = "WORKER_RETRY_DELAYS_SECS",
        default_values_t = DEFAULT_RETRY_DELAYS_SECS,
        value_delimiter = ',',
        global = true
    )]
    pub retry_delays_secs: Vec<u64>,

    /// Kling API base URL. https, or http to a loopback address only.
    #[arg(long, env = "KLING_BASE_URL", default_value = DEFAULT_KLING_BASE_URL)]
    pub kling_base_url: String,

    /// Proxy for calls to the Kling API host, and nothing else
    /// (`http://host:port`). The worker ignores HTTP_PROXY, HTTPS_PROXY and
    /// ALL_PROXY: a proxy would fetch job-named URLs past the address guard.
    #[arg(long, env = "KLING_PROXY", hide_env_values = true)]
    pub kling_proxy: Option<String>,

    /// Where results go: a local directory (path or file:// URL) or
    /// `s3://bucket/prefix` [default: ./kling-archive; for `worker demo`:
    /// ./demo-archive].
    #[arg(long = "archive", env = "ARCHIVE_URL", global = true)]
    pub archive_url: Option<String>,

    /// Keep archiving into a local directory on purpose (a single machine
    /// with a persistent disk). Without it, a worker on a local archive
    /// warns at start: in a container that directory dies with it, and a
    /// fleet does not share it.
    #[arg(long, env = "ARCHIVE_LOCAL_OK", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub archive_local_ok: bool,

    /// Use path-style S3 addressing (MinIO and most S3-compatible servers).
    #[arg(long, env = "S3_FORCE_PATH_STYLE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", global = true)]
    pub s3_force_path_style: bool,

    /// Let `image_url` reach loopback, link-local and private addresses
    /// (refused by default: SSRF). For tests and private networks.
    #[arg(long, env = "SOURCE_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub source_allow_private: bool,

    /// Comma-separated networks `image_url` may reach although they are
    /// private (e.g. `10.20.0.0/16` for an internal image server): narrower
    /// than SOURCE_ALLOW_PRIVATE, which opens every private range.
    #[arg(long, env = "SOURCE_ALLOW_NETS", value_delimiter = ',')]
    pub source_allow_nets: Vec<ipnet::IpNet>,

    /// Buckets `s3://` sources may be read from, comma-separated. The
    /// worker reads them with its own credentials, so a publisher could
    /// otherwise have it send any object its role can read to Kling.
    /// Empty (the default) refuses `s3://` sources.
    #[arg(long, env = "SOURCE_S3_BUCKETS", value_delimiter = ',')]
    pub source_s3_buckets: Vec<String>,

    /// Overall time for fetching one source, retries included, in seconds.
    #[arg(long, env = "SOURCE_FETCH_DEADLINE_SECS", default_value_t = 90)]
    pub source_fetch_deadline_secs: u64,

    /// Largest source image accepted, in bytes.
    #[arg(long, env = "SOURCE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub source_max_bytes: u64,

    /// Hosts segmentation PNGs may be downloaded from, comma-separated.
    /// `host`, `host:port`, or `*.domain` for any subdomain.
    #[arg(long, env = "KLING_RESULT_HOSTS", default_value = DEFAULT_RESULT_HOSTS, value_delimiter = ',')]
    pub result_hosts: Vec<String>,

    /// Largest image (in pixels) the worker will decode; bigger is refused as
    /// a decompression bomb.
    #[arg(long, env = "MAX_IMAGE_PIXELS", default_value_t = 100_000_000)]
    pub max_image_pixels: u64,

    /// Pixels being decoded at once, worker-wide, in megapixels. Jobs wait
    /// for budget; this bounds decode memory (~4 bytes/pixel per copy).
    #[arg(long, env = "PIXEL_BUDGET_MP", default_value_t = 300)]
    pub pixel_budget_mp: u32,

    /// Bytes held by jobs in flight, worker-wide, in MiB: sources,
    /// prepared bodies, their base64, segment PNGs (3/4 for jobs, 1/4 for
    /// segment downloads). Jobs wait for budget; see docs/operations.md.
    #[arg(long, env = "MEMORY_BUDGET_MB", default_value_t = DEFAULT_MEMORY_BUDGET_MB)]
    pub memory_budget_mb: u32,

    /// Attempts per Kling call for transient failures (including the first).
    #[arg(long, env = "KLING_MAX_ATTEMPTS", default_value_t = 6)]
    pub kling_max_attempts: u32,

    /// Time budget for a job's Kling call, retries included, in seconds.
    /// When it runs out the message goes back to the queue.
    #[arg(long, env = "KLING_JOB_DEADLINE_SECS", default_value_t = 300)]
    pub kling_job_deadline_secs: u64,

    /// Timeout of one Kling HTTP request, in seconds.
    #[arg(long, env = "KLING_REQUEST_TIMEOUT_SECS", default_value_t = 120)]
    pub kling_request_timeout_secs: u64,

    /// Reuse the stored recognition of an identical prepared image made for
    /// another job: the same image under two job ids is recognized (and
    /// billed) once. `false`: every job gets its own call.
    #[arg(long, env = "SHARE_RECOGNITIONS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub share_recognitions: bool,

    /// For every job whose image was turned, resized or padded before
    /// Kling saw it, also store each mask on the source's own pixel grid
    /// (`masks/<sha256>.png`). `false`: keep only Kling's PNGs.
    #[arg(long, env = "SOURCE_MASKS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub source_masks: bool,

    /// While Kling refuses the account (arrears, bad keys, …) or the
    /// circuit breaker is open, seconds between unbillable probe calls.
    #[arg(long, env = "KLING_PROBE_INTERVAL_SECS", default_value_t = 30)]
    pub kling_probe_interval_secs: u64,

    /// Address of the HTTP listener for `/metrics`, `/healthz` and
    /// `/readyz`; `off` disables it.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9464")]
    pub http_addr: String,

    /// Seconds in-flight jobs get to finish after SIGTERM before their
    /// messages are left unacked for redelivery.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", default_value_t = 60)]
    pub shutdown_timeout_secs: u64,

    /// Seconds a claim on an image (the lease that makes one worker of the
    /// fleet pay for it) outlives its holder's last renewal; renewed every
    /// third of it. A dead holder's claim is taken over after this.
    #[arg(long, env = "LEASE_TTL_SECS", default_value_t = 60)]
    pub lease_ttl_secs: u64,

    /// Seconds a job may run before it is handed back to the retry queue
    /// (a Kling call in flight still stores its answer). Keep it under
    /// RabbitMQ's `consumer_timeout` (default 30 min).
    #[arg(long, env = "JOB_DEADLINE_SECS", default_value_t = 1500)]
    pub job_deadline_secs: u64,

    /// Start even though the archive ignores `If-None-Match` (the start-up
    /// probe failed). Leases and create-if-absent then do not hold across
    /// workers: duplicate Kling bills become possible. Run one worker only.
    #[arg(long, env = "ARCHIVE_UNSAFE_CONDITIONAL_WRITES", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_unsafe_conditional_writes: bool,
}

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

impl WorkerArgs {
    /// Validate flags into a [`Config`]. Kling keys come from the environment.
    /// `--archive` / `ARCHIVE_URL`, or the worker's default.
    pub fn archive_url(&self) -> &str {
        self.archive_url.as_deref().unwrap_or(DEFAULT_ARCHIVE)
    }

    pub fn into_config(self) -> Result<Config, ConfigError> {
        let access_key = secret_from_env("KLING_ACCESS_KEY")?;
        let secret_key = secret_from_env("KLING_SECRET_KEY")?;
        self.into_config_with_keys(
            secrecy::ExposeSecret::expose_secret(&access_key).to_owned(),
            secret_key,
        )
    }

    /// Validate flags with keys given directly (the demo mints its own).
    pub fn into_config_with_keys(
        self,
        access_key: String,
        secret_key: SecretString,
    ) -> Result<Config, ConfigError> {
        let invalid = |name: &'static str, reason: String| ConfigError::Invalid { name, reason };
        if self.queue.is_empty() || self.queue.len() > 200 {
            return Err(invalid("WORKER_QUEUE", "must be 1..=200 characters".into()));
        }
        if self.concurrency == 0 {
            return Err(invalid("WORKER_CONCURRENCY", "must be at least 1".into()));
        }
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| default_prefetch(self.concurrency));
        if prefetch == 0 {
            return Err(invalid("WORKER_PREFETCH", "must be at least 1".into()));
        }
        if self.retry_delays_secs.is_empty() || self.retry_delays_secs.contains(&0) {
            return Err(invalid(
                "WORKER_RETRY_DELAYS_SECS",
                "give one or more delays of at least 1 second".into(),
            ));
        }
        if self.delivery_limit == 0 {
            return Err(invalid(
                "WORKER_DELIVERY_LIMIT",
                "must be at least 1".into(),
            ));
        }
        let base_url = url::Url::parse(&self.kling_base_url)
            .map_err(|e| invalid("KLING_BASE_URL", e.to_string()))?;
        let loopback = match base_url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        match base_url.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(invalid(
                    "KLING_BASE_URL",
                    "must be https (http would send the JWT in clear); http is allowed only for a loopback simulator".into(),
                ));
            }
            _ => return Err(invalid("KLING_BASE_URL", "must be an https URL".into())),
        }
        let proxy = match self.kling_proxy.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => Some(
                url::Url::parse(p)
                    .map_err(|e| invalid("KLING_PROXY", format!("{e}: give http://host:port")))?,
            ),
        };
        let archive = ArchiveTarget::parse(self.archive_url())
            .map_err(|reason| invalid("ARCHIVE_URL", reason))?;
        let result_hosts: Vec<String> = self
            .result_hosts
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if result_hosts.is_empty() {
            return Err(invalid("KLING_RESULT_HOSTS", "lists no host".into()));
        }
        if self.kling_max_attempts == 0 {
            return Err(invalid("KLING_MAX_ATTEMPTS", "must be at least 1".into()));
        }
        let pixel_budget = u64::from(self.pixel_budget_mp) * 1_000_000;
        if pixel_budget < self.max_image_pixels {
            return Err(invalid(
                "PIXEL_BUDGET_MP",
                format!(
                    "budget {pixel_budget} px is below MAX_IMAGE_PIXELS {}; the largest allowed image could never run",
                    self.max_image_pixels
                ),
            ));
        }
        if self.memory_budget_mb < 4 {
            return Err(invalid("MEMORY_BUDGET_MB", "must be at least 4".into()));
        }
        let http_addr = match self.http_addr.trim() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|e| {
                invalid(
                    "HTTP_ADDR",
                    format!("{e}: give ip:port (e.g. 0.0.0.0:9464) or off"),
                )
            })?),
        };
        if self.lease_ttl_secs == 0 {
            return Err(invalid("LEASE_TTL_SECS", "must be at least 1".into()));
        }
        let lease_ttl = Duration::from_secs(self.lease_ttl_secs);
        // A job must outlive its own Kling budget plus a claim's wait.
        let floor = self.kling_job_deadline_secs + 2 * self.lease_ttl_secs;
        if self.job_deadline_secs <= floor {
            return Err(invalid(
                "JOB_DEADLINE_SECS",
                format!(
                    "{} s leaves no room: it must exceed KLING_JOB_DEADLINE_SECS + 2 x LEASE_TTL_SECS = {floor} s",
                    self.job_deadline_secs
                ),
            ));
        }
        let job_deadline = Duration::from_secs(self.job_deadline_secs);
        Ok(Config {
            amqp_url: self.amqp_url,
            queue: self.queue,
            concurrency: usize::from(self.concurrency),
            prefetch: usize::from(prefetch),
            delivery_limit: self.delivery_limit,
            retry_delays: self
                .retry_delays_secs
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            kling: KlingConfig {
                base_url,
                proxy,
                access_key,
                secret_key,
                max_attempts: self.kling_max_attempts,
                job_deadline: Duration::from_secs(self.kling_job_deadline_secs),
                request_timeout: Duration::from_secs(self.kling_request_timeout_secs),
                min_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(30),
                max_in_flight: usize::from(self.concurrency),
                probe_interval: Duration::from_secs(self.kling_probe_interval_secs.max(1)),
                breaker: BreakerConfig::default(),
            },
            archive,
            archive_local_ok: self.archive_local_ok,
            s3_force_path_style: self.s3_force_path_style,
            fetch: FetchConfig {
                s3_buckets: self
                    .source_s3_buckets
                    .iter()
                    .map(|b| b.trim().to_owned())
                    .filter(|b| !b.is_empty())
                    .collect(),
                deadline: Duration::from_secs(self.source_fetch_deadline_secs.max(1)),
                allow_private: self.source_allow_private,
                allow_nets: self.source_allow_nets.clone(),
                max_bytes: self.source_max_bytes,
                ..FetchConfig::default()
            },
            result_hosts,
            max_image_pixels: self.max_image_pixels,
            pixel_budget,
            memory_budget_mb: self.memory_budget_mb,
            share_recognitions: self.share_recognitions,
            source_masks: self.source_masks,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            lease_ttl,
            job_deadline,
            allow_unsafe_conditional_writes: self.allow_unsafe_conditional_writes,
            http_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn cli_parses_the_contract_defaults() {
        let cli = Cli::try_parse_from(["worker"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.worker.amqp_url.expose_secret(), DEFAULT_AMQP_URL);
        assert_eq!(cli.worker.queue, DEFAULT_QUEUE);
        assert_eq!(cli.worker.kling_base_url, DEFAULT_KLING_BASE_URL);
        let cli = Cli::try_parse_from(["worker", "--concurrency", "32", "--source-allow-private"])
            .unwrap();
        assert_eq!(cli.worker.concurrency, 32);
        assert!(cli.worker.source_allow_private);
        assert_eq!(cli.worker.retry_delays_secs, DEFAULT_RETRY_DELAYS_SECS);
        assert!(cli.worker.source_masks, "aligned masks are on by default");
        let cli = Cli::try_parse_from(["worker", "--source-masks=false"]).unwrap();
        assert!(!cli.worker.source_masks);
    }

    #[test]
    fn kling_base_url_is_https_unless_loopback() {
        let cfg = |url: &str| {
            Cli::try_parse_from(["worker", "--kling-base-url", url])
                .unwrap()
                .worker
                .into_config_with_keys("ak".into(), SecretString::from("sk"))
        };
        assert!(cfg("https://api-singapore.klingai.com").is_ok());
        assert!(cfg("http://127.0.0.1:8089").is_ok());
        assert!(cfg("http://localhost:8089").is_ok());
        assert!(cfg("http://[::1]:8089").is_ok());
        let err = cfg("http://api.klingai.com").unwrap_err().to_string();
        assert!(
            err.contains("KLING_BASE_URL") && err.contains("https"),
            "{err}"
        );
        assert!(cfg("ftp://x").is_err());
    }

    #[test]
    fn prefetch_defaults_to_twice_the_kling_ceiling() {
        let cfg = |args: &[&str]| {
            Cli::try_parse_from(args)
                .unwrap()
                .worker
                .into_config_with_keys("ak".into(), SecretString::from("sk"))
        };
        let c = cfg(&["worker", "--concurrency", "32"]).unwrap();
        assert_eq!(
            (c.concurrency, c.prefetch, c.kling.max_in_flight),
            (32, 64, 32)
        );
        let c = cfg(&["worker", "--concurrency", "32", "--prefetch", "40"]).unwrap();
        assert_eq!(
            (c.concurrency, c.prefetch, c.kling.max_in_flight),
            (32, 40, 32)
        );
        assert_eq!(default_prefetch(u16::MAX), u16::MAX, "saturates");
        assert!(cfg(&["worker", "--prefetch", "0"]).is_err());
    }

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

    #[test]
    fn config_debug_redacts_secrets() {
        let cli = Cli::try_parse_from(["worker", "--amqp-url", "amqp://u:hunter2@h/%2f"]).unwrap();
        let flags = format!("{:?}", cli.worker);
        assert!(!flags.contains("hunter2"), "{flags}");
        let cfg = cli
            .worker
            .into_config_with_keys("ak".into(), SecretString::from("very-secret-key"))
            .unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("very-secret-key"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
