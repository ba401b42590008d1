//! The pipeline's side of an outage of the archive or Kling's CDN (see
//! [`crate::health`]): refuse work while one is down, turn a job's failure
//! into "hand it back uncharged" when a probe confirms the dependency is
//! away, and the probes themselves.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::{Pipeline, PipelineError};
use crate::archive::{ObjectKey, Store};
use crate::download::DownloadError;
use crate::error::{Classify, Disposition};
use crate::health::{Dependency, Outages};

/// The object the archive probe asks about (absent is a fine answer).
const PROBE_KEY: &str = ".kling-archiver-health";

impl Pipeline {
    /// The archive's and the CDN's state, shared with the worker.
    pub fn outages(&self) -> &Arc<Outages> {
        &self.outages
    }

    /// A worker waiting for a dependency starts nothing it would have to
    /// throw away.
    pub(super) fn refuse_while_down(&self) -> Result<(), PipelineError> {
        if let Some(e) = self.kling.suspended_error() {
            return Err(e.into());
        }
        match self.outages.down() {
            Some(down) => Err(PipelineError::DependencyDown(down.dependency)),
            None => Ok(()),
        }
    }

    /// A failed job: its own failure, or an outage? A transient archive
    /// error is checked with a probe (shared by every job failing at that
    /// moment); any transient failure while a dependency is down is the
    /// outage's. An outage hands the job back uncharged.
    pub(super) async fn judge(&self, e: PipelineError) -> PipelineError {
        if e.disposition() != Disposition::Transient {
            return e;
        }
        if matches!(e, PipelineError::Store(_))
            && self
                .outages
                .confirm(Dependency::Archive, || probe_archive(&self.store))
                .await
        {
            return PipelineError::DependencyDown(Dependency::Archive);
        }
        match self.outages.down() {
            Some(down) => PipelineError::DependencyDown(down.dependency),
            None => e,
        }
    }

    /// A segment download failed: a transient failure that a probe of the
    /// CDN confirms is an outage of the CDN, not of this job.
    pub(super) async fn download_failed(&self, url: &url::Url, e: DownloadError) -> PipelineError {
        if e.disposition() != Disposition::Transient {
            return e.into();
        }
        self.outages.note_cdn_origin(url);
        let down = self
            .outages
            .confirm(Dependency::Cdn, || self.probe_cdn())
            .await;
        if down {
            PipelineError::DependencyDown(Dependency::Cdn)
        } else {
            e.into()
        }
    }

    /// Does the dependency answer? What the supervisor asks while it is
    /// marked down.
    pub async fn probe(&self, dep: Dependency) -> Result<(), String> {
        match dep {
            Dependency::Archive => probe_archive(&self.store).await,
            Dependency::Cdn => self.probe_cdn().await,
        }
    }

    /// Any HTTP answer below 500 from the CDN's host means it serves again.
    async fn probe_cdn(&self) -> Result<(), String> {
        let Some(origin) = self.outages.cdn_origin() else {
            return Ok(());
        };
        self.downloader.probe(&origin).await
    }
}

/// The archive answers a HEAD (found or not found). A refusal (bad
/// credentials) is an answer too: that is not an outage but a
/// configuration error, which jobs report as such.
pub(super) async fn probe_archive(store: &Store) -> Result<(), String> {
    let Ok(key) = ObjectKey::parse(PROBE_KEY) else {
        return Ok(());
    };
    match store.head(&key).await {
        Ok(_) => Ok(()),
        Err(e) if e.disposition() == Disposition::Transient => Err(e.to_string()),
        Err(_) => Ok(()),
    }
}

/// How a billed answer's record write waits between attempts while the
/// archive is away: short, so the record lands moments after it is back;
/// never giving up by count (the job's deadline bounds it).
pub(super) fn record_retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_retries_stay_short() {
        let delays: Vec<_> = record_retry_delays()
            .take(8)
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 2000, 2000, 2000, 2000]);
    }
}
