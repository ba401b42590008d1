//! The place that assembles a worker: the pipeline from the [`Config`],
//! the consumer, and the wiring between them that no single stage owns.
//!
//! - the Kling supervisor (probes while the gate is closed);
//! - the dependency supervisor: checks the archive, and probes the archive
//!   or the CDN while one is down (see [`crate::health`]);
//! - the bridge from the Kling gate and the dependencies to readiness and
//!   to the consumer, which only hears "pause" and "resume";
//! - the ops HTTP listener.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::archive::Store;
use crate::broker::{BrokerError, Controls, JobConsumer, JobEvent};
use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::download::{DownloadError, ResultDownloader};
use crate::fetch::{FetchError, Fetcher};
use crate::health::{self, Dependency, Down, Outages};
use crate::kling::gate::{Cause, Suspension};
use crate::kling::{KlingClient, KlingError};
use crate::net::{HostPattern, HostPatternError};
use crate::ops::{self, NotReady, Status};
use crate::pipeline::Pipeline;
use crate::prepare::Limits;

/// How often the archive is checked while it is up.
const STORE_CHECK_EVERY: Duration = Duration::from_secs(15);
/// How long a recovered archive waits for billed answers held in memory to
/// be written before new jobs may claim their images.
const UNRECORDED_FLUSH: Duration = Duration::from_secs(10);

/// Build the S3 client from the AWS SDK's standard environment
/// (`AWS_ENDPOINT_URL`, `AWS_REGION`, credentials, profiles, roles).
/// Nothing is contacted until the first request.
pub async fn s3_client(force_path_style: bool) -> aws_sdk_s3::Client {
    use aws_config::meta::region::RegionProviderChain;
    // Region from AWS_REGION or the profile; no EC2 metadata probe (slow and
    // noisy off EC2): set AWS_REGION where it matters.
    let region = RegionProviderChain::first_try(
        aws_config::environment::region::EnvironmentVariableRegionProvider::new(),
    )
    .or_else(aws_config::profile::ProfileFileRegionProvider::new())
    .or_else(aws_sdk_s3::config::Region::new("us-east-1"));
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(region)
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(Duration::from_secs(120))
                .operation_timeout(Duration::from_secs(600))
                .build(),
        )
        .load()
        .await;
    let conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(force_path_style);
    aws_sdk_s3::Client::from_conf(conf.build())
}

/// Why the worker could not be assembled.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("KLING_RESULT_HOSTS: {0}")]
    ResultHosts(#[from] HostPatternError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Kling(#[from] KlingError),
    #[error(transparent)]
    Download(#[from] DownloadError),
}

/// Assemble the pipeline a [`Config`] describes.
pub async fn build_pipeline(config: &Config) -> Result<Pipeline, BuildError> {
    let s3 = s3_client(config.s3_force_path_style).await;
    build_pipeline_with(config, s3)
}

/// As [`build_pipeline`], with a given S3 client.
pub fn build_pipeline_with(
    config: &Config,
    s3: aws_sdk_s3::Client,
) -> Result<Pipeline, BuildError> {
    let store = Store::open(&config.archive, &s3);
    let hosts = HostPattern::parse_list(&config.result_hosts)?;
    let limits = Limits {
        max_pixels: config.max_image_pixels,
        max_input_bytes: config.fetch.max_bytes,
        ..Limits::default()
    };
    Ok(Pipeline::new(
        Fetcher::new(config.fetch.clone(), s3)?,
        KlingClient::new(config.kling.clone())?,
        store,
        ResultDownloader::new(hosts)?,
        limits,
        config.pixel_budget,
    )
    .with_shared_recognitions(config.share_recognitions)
    .with_lease_ttl(config.lease_ttl)
    .with_job_deadline(config.job_deadline)
    .with_source_masks(config.source_masks)
    .with_memory_budget(MemoryBudget::new(
        config.memory_budget_mb,
        config.fetch.max_bytes,
    )))
}

/// Check once that the archive honours conditional creates: leases and
/// create-if-absent manifests depend on it. Refuses to start unless the
/// operator accepted the risk (`ARCHIVE_UNSAFE_CONDITIONAL_WRITES=true`).
pub async fn check_conditional_writes(store: &Store, allow_unsafe: bool) -> Result<(), RunError> {
    let honoured = match store.conditional_writes_honoured().await {
        Ok(h) => h,
        // An archive down at start is reported by `/readyz` (the worker
        // runs, not ready); the check needs an answer to mean anything.
        Err(e) => {
            tracing::warn!(error = %e, "could not check that the archive honours If-None-Match (archive unreachable?); starting unchecked");
            return Ok(());
        }
    };
    match (honoured, allow_unsafe) {
        (true, _) => Ok(()),
        (false, true) => {
            tracing::warn!(
                archive = store.describe(),
                "the archive ignores If-None-Match; running anyway (ARCHIVE_UNSAFE_CONDITIONAL_WRITES=true): workers of a fleet may pay Kling twice for one image"
            );
            Ok(())
        }
        (false, false) => Err(RunError::UnsafeArchive {
            archive: store.describe(),
        }),
    }
}

/// A worker: the consumer and everything that runs beside it.
pub struct Worker {
    consumer: JobConsumer,
    pipeline: Arc<Pipeline>,
    status: Arc<Status>,
    pause: watch::Sender<bool>,
}

impl Worker {
    pub fn new(config: Arc<Config>, pipeline: Arc<Pipeline>) -> Self {
        let status = Arc::new(Status::new());
        let (pause, pause_rx) = watch::channel(false);
        let controls = Controls {
            status: status.clone(),
            pause: pause_rx,
        };
        Self {
            consumer: JobConsumer::new(config, pipeline.clone(), controls),
            pipeline,
            status,
            pause,
        }
    }

    /// Receive a [`JobEvent`] for every settled message.
    pub fn with_events(mut self, tx: mpsc::UnboundedSender<JobEvent>) -> Self {
        self.consumer = self.consumer.with_events(tx);
        self
    }

    /// What `/readyz` reports.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Run until `shutdown` (then drain) or a fatal error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let span = tracing::Span::current();
        // Probes Kling while the gate is closed; reopens it.
        let supervisor_stop = CancellationToken::new();
        let _supervisor = AbortOnDropHandle::new(tokio::spawn({
            let pipeline = self.pipeline.clone();
            let stop = supervisor_stop.clone();
            async move { pipeline.kling().supervise(stop).await }.instrument(span.clone())
        }));
        let _dependencies = AbortOnDropHandle::new(tokio::spawn(
            supervise_dependencies(self.pipeline.clone()).instrument(span.clone()),
        ));
        let _gate = AbortOnDropHandle::new(tokio::spawn(
            follow_suspensions(
                self.pipeline.kling().gate().subscribe(),
                self.pipeline.outages().subscribe(),
                self.status.clone(),
                self.pause,
            )
            .instrument(span),
        ));
        let result = self.consumer.run(shutdown).await;
        supervisor_stop.cancel();
        result
    }
}

/// Check the archive every [`STORE_CHECK_EVERY`] while all is well (an
/// archive that does not answer is an outage: the worker pauses); while the
/// archive or the CDN is down, probe it every [`health::PROBE_EVERY`] and
/// mark it up when it answers.
async fn supervise_dependencies(pipeline: Arc<Pipeline>) {
    let outages = pipeline.outages().clone();
    let mut changes = outages.subscribe();
    loop {
        let down: Vec<Dependency> = changes
            .borrow_and_update()
            .iter()
            .flatten()
            .map(|d| d.dependency)
            .collect();
        if down.is_empty() {
            if let Err(reason) = pipeline.probe(Dependency::Archive).await {
                outages.mark_down(Dependency::Archive, reason);
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(STORE_CHECK_EVERY) => {}
                _ = changes.changed() => {}
            }
            continue;
        }
        tokio::time::sleep(health::PROBE_EVERY).await;
        for dep in down {
            if pipeline.probe(dep).await.is_ok() {
                if dep == Dependency::Archive {
                    flush_unrecorded(&outages).await;
                }
                if let Some(was) = outages.mark_up(dep) {
                    tracing::info!(
                        cause = dep.as_str(),
                        down_s = was.as_secs(),
                        "dependency answers again; taking jobs"
                    );
                }
            }
        }
    }
}

/// Let billed answers held in memory reach the archive before new jobs
/// may claim their images.
async fn flush_unrecorded(outages: &Outages) {
    let started = tokio::time::Instant::now();
    while outages.unrecorded() > 0 && started.elapsed() < UNRECORDED_FLUSH {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// While the Kling gate is closed or a dependency is down the consumer is
/// paused and readiness says why; it resumes when all is well again.
async fn follow_suspensions(
    mut gate: watch::Receiver<Option<Suspension>>,
    mut outages: watch::Receiver<[Option<Down>; 2]>,
    status: Arc<Status>,
    pause: watch::Sender<bool>,
) {
    loop {
        let suspension = gate.borrow_and_update().clone();
        let down = outages.borrow_and_update().clone();
        let is_down = |dep| down.iter().flatten().any(|d| d.dependency == dep);
        for dep in Dependency::ALL {
            ops::metrics::suspended(dep.as_str(), is_down(dep));
        }
        ops::metrics::store_reachable(!is_down(Dependency::Archive));
        let why = suspension
            .as_ref()
            .map(not_ready)
            .or_else(|| down.iter().flatten().next().map(dependency_not_ready));
        pause.send_replace(why.is_some());
        status.set_suspended(why);
        tokio::select! {
            r = gate.changed() => if r.is_err() { return },
            r = outages.changed() => if r.is_err() { return },
        }
    }
}

/// What readiness says while the Kling gate is closed.
fn not_ready(s: &Suspension) -> NotReady {
    NotReady {
        reason: match s.cause {
            Cause::Account => "suspended: Kling refuses the account",
            Cause::Outage => "suspended: Kling outage (circuit open)",
        },
        code: Some(s.code),
        action: Some(s.advice),
    }
}

/// What readiness says while a dependency is down.
fn dependency_not_ready(d: &Down) -> NotReady {
    NotReady {
        reason: match d.dependency {
            Dependency::Archive => "suspended: the archive does not answer",
            Dependency::Cdn => "suspended: Kling's result CDN does not answer",
        },
        code: Some(d.dependency.code()),
        action: Some(d.dependency.advice()),
    }
}

/// Run a consuming worker until `shutdown` or a fatal error, with the ops
/// HTTP listener (`/metrics`, `/healthz`, `/readyz`) when configured.
pub async fn run_worker(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    crate::build_info::warn_if_slow();
    warn_if_local(&config);
    let pipeline = build_pipeline(&config)
        .await?
        .with_draining(shutdown.clone());
    check_conditional_writes(pipeline.store(), config.allow_unsafe_conditional_writes).await?;
    let pipeline = Arc::new(pipeline);
    let http_addr = config.http_addr;
    // The longest a billed call can still be open when the broker is done.
    let calls_grace = config.kling.request_timeout + Duration::from_secs(10);
    let worker = Worker::new(Arc::new(config), pipeline.clone());
    let ops_stop = CancellationToken::new();
    let mut ops_task = None;
    if let Some(addr) = http_addr {
        let metrics = ops::metrics::install();
        ops::metrics::not_suspended();
        ops::metrics::claim_counters_at_zero();
        let (bound, task) = ops::serve(addr, worker.status(), Some(metrics), ops_stop.clone())
            .await
            .map_err(|e| RunError::Http {
                addr,
                reason: e.to_string(),
            })?;
        tracing::info!(addr = %bound, "ops HTTP listener: /metrics /healthz /readyz");
        ops_task = Some(task);
    }
    let result = worker.run(shutdown).await;
    // A call aborted with its job is still running on its own: let it
    // store what Kling billed.
    pipeline.drain_calls(calls_grace).await;
    ops_stop.cancel();
    if let Some(task) = ops_task {
        let _ = task.await;
    }
    result?;
    Ok(())
}

/// A worker archiving to a local directory is almost always a mistake in
/// production: say so loudly, and how to mean it.
fn warn_if_local(config: &Config) {
    if let crate::config::ArchiveTarget::Local(dir) = &config.archive
        && !config.archive_local_ok
    {
        tracing::warn!(
            dir = %dir.display(),
            "archiving to a LOCAL DIRECTORY: in a container it is lost with the container, and workers of a fleet do not share it. Set ARCHIVE_URL=s3://bucket/prefix for production, or ARCHIVE_LOCAL_OK=true if a local archive is what you mean"
        );
    }
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "the archive {archive} ignores If-None-Match (a second conditional create of a probe key succeeded): leases and create-if-absent would not hold, and workers could pay Kling twice for one image. Use an S3 server that honours conditional writes, or accept the risk with --allow-unsafe-conditional-writes / ARCHIVE_UNSAFE_CONDITIONAL_WRITES=true (run a single worker then)"
    )]
    UnsafeArchive { archive: String },
    #[error("cannot listen on HTTP_ADDR {addr}: {reason}; pick a free port or set HTTP_ADDR=off")]
    Http {
        addr: std::net::SocketAddr,
        reason: String,
    },
}
