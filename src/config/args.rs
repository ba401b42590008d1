//! The raw flags: the shape clap parses from the command line and the
//! environment, before anything is checked. Each flag's env var and default
//! are the user contract in `docs/operations.md`; `validate` turns
//! [`WorkerArgs`] into a [`super::Config`].

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use super::{
    DEFAULT_AMQP_URL, DEFAULT_KLING_BASE_URL, DEFAULT_MEMORY_BUDGET_MB, DEFAULT_QUEUE,
    DEFAULT_RESULT_HOSTS, DEFAULT_RETRY_DELAYS_SECS,
};

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

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

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
}
