//! The recognition step: reuse the stored answer, or get the image's claim
//! ([`super::once`]) and make the billed call: call Kling while renewing the
//! claim, store the answer (raw, before anything checks it), release the
//! claim.
//!
//! A flight runs as its own task on the pipeline's tracker, not inside the
//! job: when the job is cancelled (job deadline, shutdown timeout, a lost
//! broker connection) the flight still finishes and stores what Kling
//! billed. The worker waits for open flights before it exits
//! ([`super::Pipeline::drain_calls`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use tracing::Instrument as _;

use super::once::{Held, Once, Turn, WaitError};
use super::{Pipeline, PipelineError, PreparedJob, base_metadata, outage};
use crate::archive::{ObjectKey, PutMeta, Sha256, Store, StoreError, layout};
use crate::error::{Classify, Disposition};
use crate::health::{Dependency, Outages};
use crate::job::Job;
use crate::kling::{KlingClient, KlingError, Recognition};
use crate::manifest::{RecognitionRecord, SCHEMA_VERSION, now_rfc3339};

impl Pipeline {
    /// The stored answer for this prepared image, or a new (billed) call
    /// made under the image's claim (see [`once`]). `stale`: a stored
    /// answer with this request id does not count (its results expired).
    pub(super) async fn recognition(
        &self,
        job: &Job,
        p: &PreparedJob,
        stale: Option<&str>,
    ) -> Result<(RecognitionRecord, bool), PipelineError> {
        let key = self.recognition_key(job, &p.prepared_sha);
        let lease_key = layout::lease(&key);
        let read = || self.read_record(&key, p, stale);
        let turn = self
            .once
            .turn(&key, &lease_key, job.id.as_str(), read)
            .await
            .map_err(|e| match e {
                WaitError::Store(e) => PipelineError::Store(e),
                WaitError::Busy { holder } => PipelineError::ClaimBusy { holder },
            })?;
        let held = match turn {
            Turn::Recorded(rec) => {
                crate::ops::metrics::recognition_reused();
                tracing::info!(
                    request_id = rec.recognition.request_id,
                    first_job = rec.job_id,
                    "reusing stored recognition; no Kling call"
                );
                return Ok((rec, true));
            }
            Turn::Call(held) => held,
        };
        if self.draining.is_cancelled() {
            self.once.release(held.lease).await;
            return Err(PipelineError::ShuttingDown);
        }
        // No billed call while its answer could not be stored.
        if let Err(e) = self.refuse_while_down() {
            self.once.release(held.lease).await;
            return Err(e);
        }
        let bytes = p.prepared.bytes.clone();
        let b64 = self
            .cpu_task(move || {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            })
            .await?;
        let flight = Flight {
            kling: self.kling.clone(),
            store: self.store.clone(),
            once: self.once.clone(),
            record_key: key,
            job: job.clone(),
            prepared_sha: p.prepared_sha,
            stale: stale.map(str::to_owned),
            outages: self.outages.clone(),
            record_by: tokio::time::Instant::now() + self.job_deadline,
        };
        let task = self
            .calls
            .spawn(flight.run(held, b64).instrument(tracing::Span::current()));
        let record = task.await.map_err(PipelineError::internal)??;
        Ok((record, false))
    }

    /// The stored record for this prepared image, if usable.
    async fn read_record(
        &self,
        key: &ObjectKey,
        p: &PreparedJob,
        stale: Option<&str>,
    ) -> Result<Option<RecognitionRecord>, StoreError> {
        let Some(bytes) = self.store.get(key).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<RecognitionRecord>(&bytes) {
            Ok(rec) if rec.prepared_sha256 != p.prepared_sha => {
                tracing::warn!(key = %key, "recognition record is for another image; ignoring it");
                Ok(None)
            }
            Ok(rec) if Some(rec.recognition.request_id.as_str()) == stale => Ok(None),
            Ok(rec) => Ok(Some(rec)),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "recognition record unreadable; ignoring it");
                Ok(None)
            }
        }
    }
}

/// Everything a flight needs, owned: it outlives the job's future.
pub(super) struct Flight {
    pub kling: Arc<KlingClient>,
    pub store: Store,
    pub once: Arc<Once>,
    pub record_key: ObjectKey,
    pub job: Job,
    pub prepared_sha: Sha256,
    /// A stored answer with this request id does not count (its results
    /// expired; this flight replaces it).
    pub stale: Option<String>,
    pub outages: Arc<Outages>,
    /// Until when a billed answer's record write is retried (the archive
    /// may be away): the job's deadline, counted from the call.
    pub record_by: tokio::time::Instant,
}

impl Flight {
    pub async fn run(
        self,
        held: Held,
        image_b64: String,
    ) -> Result<RecognitionRecord, PipelineError> {
        let Held { mut lease, flight } = held;
        // After an ambiguous call: did another holder store a (fresh) answer?
        let recorded = || async {
            match self.store.get(&self.record_key).await {
                Ok(Some(b)) => serde_json::from_slice::<RecognitionRecord>(&b).is_ok_and(|r| {
                    Some(r.recognition.request_id.as_str()) != self.stale.as_deref()
                }),
                _ => false,
            }
        };
        let answer = self
            .once
            .renewing(
                &mut lease,
                self.kling.recognize_checked(&image_b64, recorded),
            )
            .await;
        drop(image_b64);
        let result = match answer {
            // The claim stays renewed while the record waits for the
            // archive: nobody else calls for this image meanwhile.
            Ok(recognition) => {
                self.once
                    .renewing(&mut lease, self.record(recognition))
                    .await
            }
            Err(KlingError::RecordedMeanwhile) => self.stored().await,
            Err(e) => Err(e.into()),
        };
        // Released after the record is durable (or the call failed
        // unbilled): a waiter that claims next finds the record first.
        self.once.release(lease).await;
        drop(flight);
        result
    }

    /// Store a billed answer at once, trying hard: losing it means paying
    /// again.
    async fn record(&self, recognition: Recognition) -> Result<RecognitionRecord, PipelineError> {
        crate::ops::metrics::cost(&recognition.final_unit_deduction);
        let record = RecognitionRecord {
            schema_version: SCHEMA_VERSION,
            prepared_sha256: self.prepared_sha,
            job_id: self.job.id.to_string(),
            recognized_at: now_rfc3339(),
            recognition,
        };
        let rec = &record.recognition;
        tracing::info!(
            kling.request_id = rec.request_id,
            cost = rec.final_unit_deduction,
            segments = rec.segments.len(),
            "kling recognized the image"
        );
        if rec.is_broken() {
            crate::ops::metrics::kling_bad_answer();
            tracing::warn!(
                error.code = "kling_bad_answer",
                kling.request_id = rec.request_id,
                problem = rec.problem.as_deref(),
                broken_segments = rec.segments.iter().filter(|s| s.problem.is_some()).count(),
                "Kling's billed answer fails our checks; kept as it came, never sent again"
            );
        }
        let body =
            Bytes::from(serde_json::to_vec_pretty(&record).map_err(PipelineError::internal)?);
        let meta = PutMeta {
            content_type: "application/json",
            sha256: Sha256::of(&body),
            metadata: base_metadata(&self.job, rec),
        };
        self.write_record(body, &meta).await?;
        Ok(record)
    }

    /// Write the record, retrying while the archive is away, until
    /// [`Self::record_by`]: the answer is paid for, and losing it means
    /// paying again. Held in memory meanwhile, and counted.
    async fn write_record(&self, body: Bytes, meta: &PutMeta) -> Result<(), PipelineError> {
        let _held = self.outages.hold_unrecorded();
        let mut delays = outage::record_retry_delays();
        let mut attempt = 0u32;
        loop {
            let e = match self.store.put(&self.record_key, body.clone(), meta).await {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(
                            attempts = attempt + 1,
                            "billed recognition stored after the archive came back"
                        );
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            let wait = delays.next().unwrap_or(Duration::from_secs(2));
            if e.disposition() != Disposition::Transient
                || tokio::time::Instant::now() + wait > self.record_by
            {
                crate::ops::metrics::answers_lost(1);
                tracing::error!(error = %e, attempts = attempt + 1, "could not store a billed recognition; a retry will pay again");
                return Err(e.into());
            }
            if attempt == 0 {
                tracing::warn!(error = %e, "the archive does not take the billed recognition; keeping it in memory and retrying");
                self.outages
                    .confirm(Dependency::Archive, || outage::probe_archive(&self.store))
                    .await;
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// The record another holder stored while our call was ambiguous.
    async fn stored(&self) -> Result<RecognitionRecord, PipelineError> {
        let bytes = self
            .store
            .get(&self.record_key)
            .await?
            .ok_or_else(|| PipelineError::internal("the recognition record vanished"))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| PipelineError::internal(format!("recognition record unreadable: {e}")))
    }
}
