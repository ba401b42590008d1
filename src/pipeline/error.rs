//! Why a job failed: one variant per stage, plus the pipeline's own.

use std::time::Duration;

use crate::archive::StoreError;
use crate::download::DownloadError;
use crate::error::{Classify, Disposition};
use crate::fetch::FetchError;
use crate::health::Dependency;
use crate::kling::KlingError;
use crate::prepare::PrepareError;

/// Why a job failed, from whichever stage failed it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Kling(#[from] KlingError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// Another job holds this image's claim and did not finish within the
    /// wait: the job is retried later (it never calls Kling itself).
    #[error("another job ({}) holds the claim on this image; retrying later", holder.as_deref().unwrap_or("unknown"))]
    ClaimBusy { holder: Option<String> },
    /// The job outlived `JOB_DEADLINE_SECS`.
    #[error("the job ran past its {0:?} deadline; retrying later")]
    JobDeadline(Duration),
    /// The broker connection the message came on was lost: the job stops
    /// (its message is redelivered; a billed call in flight still stores
    /// its answer).
    #[error("the broker connection was lost; the message is redelivered")]
    Abandoned,
    /// A dependency (the archive, Kling's CDN) is down: the job goes back
    /// to the queue uncharged and the worker waits (see [`crate::health`]).
    #[error("the {} is down; the job goes back to the queue uncharged", .0.as_str())]
    DependencyDown(Dependency),
    /// The worker is draining: no new Kling call starts.
    #[error("the worker is shutting down; the job goes back to the queue")]
    ShuttingDown,
    /// A bug or a panic; retried, and the delivery limit ends a poison loop.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PipelineError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        PipelineError::Internal(e.to_string())
    }
}

impl Classify for PipelineError {
    fn disposition(&self) -> Disposition {
        match self {
            PipelineError::Fetch(e) => e.disposition(),
            PipelineError::Prepare(e) => e.disposition(),
            PipelineError::Kling(e) => e.disposition(),
            PipelineError::Store(e) => e.disposition(),
            PipelineError::Download(e) => e.disposition(),
            PipelineError::ClaimBusy { .. }
            | PipelineError::JobDeadline(_)
            | PipelineError::Abandoned => Disposition::Transient,
            // Put back uncharged: the job did nothing wrong.
            PipelineError::ShuttingDown | PipelineError::DependencyDown(_) => Disposition::Suspend,
            PipelineError::Internal(_) => Disposition::Transient,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            PipelineError::Fetch(e) => e.code(),
            PipelineError::Prepare(e) => e.code(),
            PipelineError::Kling(e) => e.code(),
            PipelineError::Store(e) => e.code(),
            PipelineError::Download(e) => e.code(),
            PipelineError::ClaimBusy { .. } => "lease_busy",
            PipelineError::JobDeadline(_) => "job_deadline",
            PipelineError::ShuttingDown => "shutting_down",
            PipelineError::DependencyDown(dep) => dep.code(),
            PipelineError::Abandoned => "abandoned",
            PipelineError::Internal(_) => "internal",
        }
    }
}
