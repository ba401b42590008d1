//! kling-archiver: a RabbitMQ worker that sends images to Kling's
//! image-recognize API and archives every returned segmentation PNG, with a
//! manifest, before Kling deletes them.
//!
//! Data flows one way: [`broker`] → [`pipeline`] → stages ([`fetch`],
//! [`prepare`], [`kling`]) → [`archive`]. Start at `docs/ARCHITECTURE.md`.

pub mod admin;
pub mod archive;
pub mod broker;
pub mod config;
pub mod demo;
pub mod error;
pub mod fetch;
pub mod job;
pub mod kling;
pub mod ops;
pub mod pipeline;
pub mod prepare;
pub mod report;
pub mod sim;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::archive::Store;
use crate::archive::download::ResultDownloader;
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::kling::KlingClient;
use crate::pipeline::Pipeline;

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
                .connect_timeout(std::time::Duration::from_secs(10))
                .operation_attempt_timeout(std::time::Duration::from_secs(120))
                .operation_timeout(std::time::Duration::from_secs(600))
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
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error(transparent)]
    Kling(#[from] kling::KlingError),
    #[error(transparent)]
    Download(#[from] archive::download::DownloadError),
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
    Ok(Pipeline::new(
        Fetcher::new(config.fetch.clone(), s3)?,
        KlingClient::new(config.kling.clone())?,
        store,
        ResultDownloader::new(config.result_hosts.clone())?,
        config.limits.clone(),
        config.pixel_budget,
    )
    .with_shared_recognitions(config.share_recognitions)
    .with_lease_ttl(config.lease_ttl)
    .with_job_deadline(config.job_deadline))
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

/// Run a consuming worker until `shutdown` or a fatal error, with the ops
/// HTTP listener (`/metrics`, `/healthz`, `/readyz`) when configured.
pub async fn run_worker(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let pipeline = build_pipeline(&config)
        .await?
        .with_draining(shutdown.clone());
    check_conditional_writes(pipeline.store(), config.allow_unsafe_conditional_writes).await?;
    let pipeline = Arc::new(pipeline);
    let http_addr = config.http_addr;
    // The longest a billed call can still be open when the broker is done.
    let calls_grace = config.kling.request_timeout + Duration::from_secs(10);
    let worker = broker::Worker::new(Arc::new(config), pipeline.clone());
    let ops_stop = CancellationToken::new();
    let mut ops_task = None;
    if let Some(addr) = http_addr {
        let metrics = ops::metrics::install();
        ops::metrics::suspended(None);
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

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
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
