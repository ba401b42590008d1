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
    .with_source_masks(config.source_masks))
}

/// Run a consuming worker until `shutdown` or a fatal error, with the ops
/// HTTP listener (`/metrics`, `/healthz`, `/readyz`) when configured.
pub async fn run_worker(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let pipeline = Arc::new(build_pipeline(&config).await?);
    let http_addr = config.http_addr;
    let worker = broker::Worker::new(Arc::new(config), pipeline);
    let ops_stop = CancellationToken::new();
    let mut ops_task = None;
    if let Some(addr) = http_addr {
        let metrics = ops::metrics::install();
        ops::metrics::suspended(None);
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
    Broker(#[from] broker::BrokerError),
    #[error("cannot listen on HTTP_ADDR {addr}: {reason}; pick a free port or set HTTP_ADDR=off")]
    Http {
        addr: std::net::SocketAddr,
        reason: String,
    },
}
