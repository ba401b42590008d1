//! The place that assembles a worker: the pipeline from the [`Config`],
//! the consumer, and the wiring between them that no single stage owns.
//!
//! - the Kling supervisor (probes while the gate is closed);
//! - the archive health check (readiness);
//! - the bridge from the Kling gate to readiness and to the consumer,
//!   which only hears "pause" and "resume";
//! - the ops HTTP listener.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::archive::{ObjectKey, Store};
use crate::broker::{BrokerError, Controls, JobConsumer, JobEvent};
use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::download::{DownloadError, ResultDownloader};
use crate::fetch::{FetchError, Fetcher};
use crate::kling::gate::{Cause, Suspension};
use crate::kling::{KlingClient, KlingError};
use crate::net::{HostPattern, HostPatternError};
use crate::ops::{self, NotReady, Status};
use crate::pipeline::Pipeline;
use crate::prepare::Limits;

/// How often readiness checks that the archive answers.
const STORE_CHECK_EVERY: Duration = Duration::from_secs(15);

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
    .with_memory_budget(MemoryBudget::new(
        config.memory_budget_mb,
        config.fetch.max_bytes,
    )))
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
        let _store_check = AbortOnDropHandle::new(tokio::spawn(
            check_store(self.pipeline.clone(), self.status.clone()).instrument(span.clone()),
        ));
        let _gate = AbortOnDropHandle::new(tokio::spawn(
            follow_gate(
                self.pipeline.kling().gate().subscribe(),
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

/// Readiness includes the archive answering.
async fn check_store(pipeline: Arc<Pipeline>, status: Arc<Status>) {
    let Ok(probe) = ObjectKey::parse(".kling-archiver-health") else {
        return;
    };
    loop {
        let ok = match pipeline.store().head(&probe).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the archive does not answer");
                false
            }
        };
        status.set_store_reachable(ok);
        ops::metrics::store_reachable(ok);
        tokio::time::sleep(STORE_CHECK_EVERY).await;
    }
}

/// While the Kling gate is closed the consumer is paused and readiness
/// says why; it resumes when the gate reopens.
async fn follow_gate(
    mut gate: watch::Receiver<Option<Suspension>>,
    status: Arc<Status>,
    pause: watch::Sender<bool>,
) {
    loop {
        let suspension = gate.borrow_and_update().clone();
        status.set_suspended(suspension.as_ref().map(not_ready));
        pause.send_replace(suspension.is_some());
        if gate.changed().await.is_err() {
            return;
        }
    }
}

/// What readiness says while the gate is closed.
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

/// Run a consuming worker until `shutdown` or a fatal error, with the ops
/// HTTP listener (`/metrics`, `/healthz`, `/readyz`) when configured.
pub async fn run_worker(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let pipeline = Arc::new(build_pipeline(&config).await?);
    let http_addr = config.http_addr;
    let worker = Worker::new(Arc::new(config), pipeline);
    let ops_stop = CancellationToken::new();
    let mut ops_task = None;
    if let Some(addr) = http_addr {
        let metrics = ops::metrics::install();
        ops::metrics::not_suspended();
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
    ops_stop.cancel();
    if let Some(task) = ops_task {
        let _ = task.await;
    }
    result?;
    Ok(())
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot listen on HTTP_ADDR {addr}: {reason}; pick a free port or set HTTP_ADDR=off")]
    Http {
        addr: std::net::SocketAddr,
        reason: String,
    },
}
