//! One job, end to end: fetch → prepare → recognize → archive → manifest.
//!
//! The order of writes is the durability contract:
//!
//! 1. source and prepared images (content-addressed, create-if-absent);
//! 2. the recognition record, the moment Kling answers (before any
//!    download), so nothing after a billed call can make us pay again;
//! 3. every segment PNG;
//! 4. the manifest, create-if-absent, last.
//!
//! A job whose manifest exists is done. A job that finds a recognition
//! record for its prepared image reuses it instead of calling Kling.
//!
//! Knows nothing about RabbitMQ: the broker calls [`Pipeline::run`] and acts
//! on the result.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::archive::lease::{Holder, Leases};
use crate::archive::{ObjectKey, PutMeta, Sha256, Store, layout};
use crate::budget::MemoryBudget;
use crate::download::{DownloadError, ResultDownloader};
use crate::fetch::Fetcher;
use crate::health::{Dependency, Outages};
use crate::job::{Job, JobId, Source, labels_metadata_value};
use crate::kling::{KlingClient, Recognition};
use crate::manifest::ResultEvent;
use crate::prepare::{self, Limits, Prepared, Spec};

mod error;
mod finish;
mod flight;
mod once;
mod outage;

pub use error::PipelineError;
use finish::Archived;
use once::Once;

/// Default lease TTL (`LEASE_TTL_SECS`).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
/// Default per-job deadline (`JOB_DEADLINE_SECS`): under RabbitMQ's
/// default `consumer_timeout` of 30 min.
pub const DEFAULT_JOB_DEADLINE: Duration = Duration::from_secs(25 * 60);

mod align;
mod segments;

/// A test seam: code run just before the manifest is written.
pub type Hook = Arc<dyn Fn(JobId) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Hooks {
    pub before_manifest: Option<Hook>,
}

/// What a finished job produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Archived {
        manifest_key: String,
        request_id: String,
        reused_recognition: bool,
        segments: usize,
        cost: String,
        event: Box<ResultEvent>,
    },
    /// The manifest already existed: nothing to do (redelivery, duplicate).
    AlreadyArchived {
        manifest_key: String,
        event: Box<ResultEvent>,
    },
}

impl Outcome {
    /// What the broker publishes to `<queue>.results` before the ack.
    pub fn event(&self) -> &ResultEvent {
        match self {
            Outcome::Archived { event, .. } | Outcome::AlreadyArchived { event, .. } => event,
        }
    }
}

/// Everything a job needs; shared by all jobs of a worker.
pub struct Pipeline {
    fetcher: Fetcher,
    kling: Arc<KlingClient>,
    store: Store,
    downloader: ResultDownloader,
    spec: Spec,
    limits: Limits,
    cpu: Arc<Semaphore>,
    pixels: Arc<Semaphore>,
    pixel_permits: u32,
    /// Bytes held by jobs in flight (`MEMORY_BUDGET_MB`).
    budget: MemoryBudget,
    hooks: Hooks,
    /// Reuse a recognition of the same prepared image made for another job
    /// (one billed call per distinct image). Off: one call per job.
    share_recognitions: bool,
    /// The fleet-wide claim on each recognition key.
    once: Arc<Once>,
    /// Billed calls in flight, each its own task (see [`flight`]).
    calls: TaskTracker,
    /// Cancelled when the worker drains: no new Kling call starts.
    draining: CancellationToken,
    job_deadline: Duration,
    source_masks: bool,
    /// Whether the archive and the CDN are down (see [`crate::health`]).
    outages: Arc<Outages>,
}

impl Pipeline {
    pub fn new(
        fetcher: Fetcher,
        kling: KlingClient,
        store: Store,
        downloader: ResultDownloader,
        limits: Limits,
        pixel_budget: u64,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pixel_permits = u32::try_from(pixel_budget.div_ceil(1_000_000))
            .unwrap_or(u32::MAX)
            .max(1);
        let once = Arc::new(Once::new(Leases::new(
            store.clone(),
            DEFAULT_LEASE_TTL,
            Holder::current(),
        )));
        Self {
            fetcher,
            kling: Arc::new(kling),
            store,
            downloader,
            spec: Spec::KLING,
            limits,
            cpu: Arc::new(Semaphore::new(cores)),
            pixels: Arc::new(Semaphore::new(pixel_permits as usize)),
            pixel_permits,
            budget: MemoryBudget::new(
                crate::config::DEFAULT_MEMORY_BUDGET_MB,
                crate::config::FetchConfig::default().max_bytes,
            ),
            hooks: Hooks::default(),
            share_recognitions: true,
            once,
            calls: TaskTracker::new(),
            draining: CancellationToken::new(),
            job_deadline: DEFAULT_JOB_DEADLINE,
            source_masks: true,
            outages: Arc::new(Outages::new()),
        }
    }

    /// See `LEASE_TTL_SECS`: how long a claim outlives its holder's last
    /// renewal.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.once = Arc::new(Once::new(Leases::new(
            self.store.clone(),
            ttl,
            Holder::current(),
        )));
        self
    }

    /// See `JOB_DEADLINE_SECS`.
    pub fn with_job_deadline(mut self, deadline: Duration) -> Self {
        self.job_deadline = deadline;
        self
    }

    /// Once `draining` is cancelled no new Kling call starts (calls in
    /// flight finish and store their answer).
    pub fn with_draining(mut self, draining: CancellationToken) -> Self {
        self.draining = draining;
        self
    }

    /// Wait (at most `within`) for billed calls in flight to store their
    /// answers. Called once the broker has stopped.
    pub async fn drain_calls(&self, within: Duration) {
        self.calls.close();
        if tokio::time::timeout(within, self.calls.wait())
            .await
            .is_err()
        {
            let unrecorded = self.outages.unrecorded();
            crate::ops::metrics::answers_lost(unrecorded);
            tracing::warn!(
                left = self.calls.len(),
                unrecorded,
                "Kling calls still open at exit; their answers may be paid for again"
            );
        }
    }

    /// See `SHARE_RECOGNITIONS`.
    pub fn with_shared_recognitions(mut self, share: bool) -> Self {
        self.share_recognitions = share;
        self
    }

    fn recognition_key(&self, job: &Job, prepared: &Sha256) -> ObjectKey {
        if self.share_recognitions {
            layout::recognition(prepared)
        } else {
            layout::recognition_of_job(prepared, &job.id)
        }
    }

    /// See `MEMORY_BUDGET_MB`.
    pub fn with_memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = budget;
        self
    }

    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn kling(&self) -> &KlingClient {
        &self.kling
    }

    /// Run one job within the job deadline. The caller acks on `Ok`, and
    /// acts on the error's [`Classify::disposition`] otherwise. A billed
    /// call in flight at the deadline still stores its answer.
    pub async fn run(&self, job: &Job) -> Result<Outcome, PipelineError> {
        match tokio::time::timeout(self.job_deadline, self.run_job(job)).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(self.judge(e).await),
            Err(_) => Err(PipelineError::JobDeadline(self.job_deadline)),
        }
    }

    /// As [`Self::run`], stopped at once when `stop` is cancelled (the
    /// broker lost the connection the message came on: its redelivery is
    /// someone else's). A billed call already in flight is not stopped: it
    /// runs on its own task and stores its answer, which the redelivered
    /// copy finds after waiting on the claim.
    pub async fn run_until(
        &self,
        job: &Job,
        stop: CancellationToken,
    ) -> Result<Outcome, PipelineError> {
        tokio::select! {
            r = self.run(job) => r,
            () = stop.cancelled() => Err(PipelineError::Abandoned),
        }
    }

    async fn run_job(&self, job: &Job) -> Result<Outcome, PipelineError> {
        // A suspended worker does no work it would have to throw away
        // (with the archive down it cannot even check the manifest).
        if self.outages.is_down(Dependency::Archive) {
            return Err(PipelineError::DependencyDown(Dependency::Archive));
        }
        if let Some(done) = self.already_archived(job).await? {
            tracing::info!("manifest exists; job already archived");
            return Ok(done);
        }
        self.refuse_while_down()?;
        // The job's bytes, reserved before they exist (see `budget`).
        let inline = match &job.source {
            Source::Inline(b) => Some(b.len() as u64),
            _ => None,
        };
        let mut held = (self.budget.admit(inline).await).map_err(PipelineError::internal)?;
        let timer = crate::ops::metrics::StageTimer::start("fetch");
        let source = self.fetcher.fetch(&job.source).await?;
        timer.stop();
        held.settle(source.len() as u64);
        let timer = crate::ops::metrics::StageTimer::start("prepare");
        let p = self.prepare(source.clone()).await?;
        timer.stop();
        tracing::info!(
            source.bytes = p.source_bytes,
            source.format = ?p.prepared.source.format,
            prepared.bytes = p.prepared.bytes.len(),
            passthrough = p.prepared.is_passthrough(),
            "prepared"
        );
        let (source_key, prepared_key) = self.store_images(job, source, &p).await?;

        let timer = crate::ops::metrics::StageTimer::start("kling");
        let (mut record, mut reused) = self.recognition(job, &p, None).await?;
        timer.stop();
        tracing::Span::current().record("kling.request_id", record.recognition.request_id.as_str());
        let timer = crate::ops::metrics::StageTimer::start("archive");
        let segments = match self.archive_segments(job, &record, &p, reused).await {
            Err(PipelineError::Download(DownloadError::Expired { .. })) if reused => {
                // The stored answer's URLs are gone (Kling keeps them 30 days):
                // pay for one new call rather than lose the job.
                tracing::warn!(
                    stale_request_id = record.recognition.request_id,
                    "stored recognition's results expired; recognizing again"
                );
                crate::ops::metrics::results_expired();
                let stale = record.recognition.request_id.clone();
                (record, reused) = self.recognition(job, &p, Some(&stale)).await?;
                tracing::Span::current()
                    .record("kling.request_id", record.recognition.request_id.as_str());
                self.archive_segments(job, &record, &p, reused).await?
            }
            other => other?,
        };
        timer.stop();

        if let Some(hook) = &self.hooks.before_manifest {
            hook(job.id.clone()).await;
        }

        self.write_manifest(
            job,
            &p,
            Archived {
                record,
                reused,
                segments,
                source_key,
                prepared_key,
            },
        )
        .await
    }

    /// Probe, fix and hash on the blocking pool, within the CPU and pixel budgets.
    async fn prepare(&self, source: Bytes) -> Result<PreparedJob, PipelineError> {
        let probe = prepare::probe(&source)?;
        prepare::check_limits(&probe, &self.limits)?;
        let needs_decode = !prepare::check(&probe, &self.spec).is_empty();
        let mp = if needs_decode {
            let px = prepare::estimate_decode_pixels(&probe);
            u32::try_from(px.div_ceil(1_000_000))
                .unwrap_or(u32::MAX)
                .clamp(1, self.pixel_permits)
        } else {
            0
        };
        let _pixels = if mp > 0 {
            Some(
                self.pixels
                    .clone()
                    .acquire_many_owned(mp)
                    .await
                    .map_err(PipelineError::internal)?,
            )
        } else {
            None
        };
        let spec = self.spec;
        let limits = self.limits.clone();
        self.cpu_task(move || {
            let source_sha = Sha256::of(&source);
            let source_bytes = source.len() as u64;
            let prepared = prepare::prepare(source, &spec, &limits)?;
            let prepared_sha = if prepared.is_passthrough() {
                source_sha
            } else {
                Sha256::of(&prepared.bytes)
            };
            Ok(PreparedJob {
                prepared,
                source_sha,
                source_bytes,
                prepared_sha,
            })
        })
        .await?
    }

    /// Run CPU-bound work on the blocking pool, at most one task per core,
    /// inside the current job's span.
    async fn cpu_task<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PipelineError> {
        let _cpu = self
            .cpu
            .clone()
            .acquire_owned()
            .await
            .map_err(PipelineError::internal)?;
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(f))
            .await
            .map_err(PipelineError::internal)
    }

    /// Archive the source and the prepared image (one object when passed through).
    async fn store_images(
        &self,
        job: &Job,
        source: Bytes,
        p: &PreparedJob,
    ) -> Result<(String, String), PipelineError> {
        let src_format = p.prepared.source.format;
        let source_key = layout::image(&p.source_sha, src_format.extension());
        let meta = BTreeMap::from([
            ("job-id".to_owned(), job.id.to_string()),
            ("role".to_owned(), "source".to_owned()),
        ]);
        let source_meta = PutMeta {
            content_type: src_format.content_type(),
            sha256: p.source_sha,
            metadata: meta.clone(),
        };
        let put_source = self.store.put_if_absent(&source_key, source, &source_meta);
        if p.prepared.is_passthrough() {
            put_source.await?;
            let key = self.store.full_key(&source_key);
            return Ok((key.clone(), key));
        }
        let prepared_key = layout::image(&p.prepared_sha, p.prepared.format.extension());
        let mut metadata = meta;
        metadata.insert("role".into(), "prepared".into());
        metadata.insert("source-sha256".into(), p.source_sha.hex());
        let prepared_meta = PutMeta {
            content_type: p.prepared.format.content_type(),
            sha256: p.prepared_sha,
            metadata,
        };
        // Two independent writes: one round trip, not two.
        let put_prepared =
            self.store
                .put_if_absent(&prepared_key, p.prepared.bytes.clone(), &prepared_meta);
        futures::try_join!(put_source, put_prepared)?;
        Ok((
            self.store.full_key(&source_key),
            self.store.full_key(&prepared_key),
        ))
    }
}

pub(crate) struct PreparedJob {
    prepared: Prepared,
    source_sha: Sha256,
    source_bytes: u64,
    prepared_sha: Sha256,
}

/// Metadata every object of a job carries: who asked, Kling's request id
/// (Kling support asks for it) and what the call cost.
pub(crate) fn base_metadata(job: &Job, rec: &Recognition) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([
        ("job-id".to_owned(), job.id.to_string()),
        ("request-id".to_owned(), ascii(&rec.request_id)),
        (
            "final-unit-deduction".to_owned(),
            ascii(&rec.final_unit_deduction),
        ),
    ]);
    if !job.labels.is_empty() {
        m.insert("labels".into(), labels_metadata_value(&job.labels));
    }
    m
}

/// Metadata values travel as HTTP headers: keep them printable ASCII.
fn ascii(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
