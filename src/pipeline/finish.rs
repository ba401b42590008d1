//! The end of a job: the manifest (create-if-absent, last of all writes),
//! the day index entry, the result event; and the same for a job found
//! done already.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{Outcome, Pipeline, PipelineError, PreparedJob, base_metadata};
use crate::archive::{Created, PutMeta, Sha256, layout};
use crate::job::{Job, JobId};
use crate::manifest::{
    Manifest, PreparedImage, RecognitionRecord, ResultEvent, SCHEMA_VERSION, SegmentEntry,
    SourceImage, WorkerInfo, now_rfc3339,
};

/// What a job archived, ready for its manifest.
pub(super) struct Archived {
    pub record: RecognitionRecord,
    pub reused: bool,
    pub segments: Vec<SegmentEntry>,
    pub source_key: String,
    pub prepared_key: String,
}

impl Pipeline {
    /// The job is done already: read its manifest, and finish it as
    /// [`Self::finish`] does (the day index may be missing after a crash).
    pub(super) async fn already_archived(
        &self,
        job: &Job,
    ) -> Result<Option<Outcome>, PipelineError> {
        let key = layout::manifest(&job.id);
        let Some(body) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&body).map_err(|e| {
            PipelineError::internal(format!("the stored manifest is unreadable: {e}"))
        })?;
        let manifest_key = self.store.full_key(&key);
        let event = self.finish(&m, &manifest_key).await?;
        Ok(Some(Outcome::AlreadyArchived {
            manifest_key,
            event: Box::new(event),
        }))
    }

    /// After a job's manifest exists: make sure the day index names it
    /// (create-if-absent, so repeats are cheap) and build its result event.
    pub(super) async fn finish(
        &self,
        m: &Manifest,
        manifest_key: &str,
    ) -> Result<ResultEvent, PipelineError> {
        if let Ok(job) = JobId::parse(&m.job_id)
            && let Some(index) = m
                .archived_at
                .get(..10)
                .and_then(|day| layout::day_index(day, &job))
        {
            let entry = Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "job_id": m.job_id,
                    "manifest_key": manifest_key,
                    "archived_at": m.archived_at,
                }))
                .map_err(PipelineError::internal)?,
            );
            let meta = PutMeta {
                content_type: "application/json",
                sha256: Sha256::of(&entry),
                metadata: BTreeMap::from([("job-id".to_owned(), m.job_id.clone())]),
            };
            self.store.put_if_absent(&index, entry, &meta).await?;
        }
        Ok(ResultEvent::from_manifest(
            m,
            self.store.describe(),
            manifest_key.to_owned(),
        ))
    }

    /// Write the job's manifest (create-if-absent: a manifest another
    /// worker wrote first is the one that counts), then finish the job.
    pub(super) async fn write_manifest(
        &self,
        job: &Job,
        p: &PreparedJob,
        archived: Archived,
    ) -> Result<Outcome, PipelineError> {
        let Archived {
            record,
            reused,
            segments,
            source_key,
            prepared_key,
        } = archived;
        let manifest_key = layout::manifest(&job.id);
        let rec = &record.recognition;
        let manifest = Manifest {
            schema_version: SCHEMA_VERSION,
            job_id: job.id.to_string(),
            request_id: rec.request_id.clone(),
            final_unit_deduction: rec.final_unit_deduction.clone(),
            labels: job.labels.clone(),
            source: SourceImage {
                uri: job.source.describe(),
                sha256: p.source_sha,
                format: p.prepared.source.format,
                width: p.prepared.source.width,
                height: p.prepared.source.height,
                bytes: p.source_bytes,
                orientation: p.prepared.source.orientation,
                key: source_key,
            },
            prepared: PreparedImage {
                sha256: p.prepared_sha,
                format: p.prepared.format,
                width: p.prepared.width,
                height: p.prepared.height,
                bytes: p.prepared.bytes.len() as u64,
                passthrough: p.prepared.is_passthrough(),
                violations: p.prepared.violations.clone(),
                transforms: p.prepared.transforms.clone(),
                key: prepared_key,
            },
            segments,
            problem: rec.problem.clone(),
            reused_recognition: reused,
            source_masks: Some(self.source_masks_entry(p)),
            recognized_at: record.recognized_at.clone(),
            archived_at: now_rfc3339(),
            worker: WorkerInfo::current(),
        };
        let body =
            Bytes::from(serde_json::to_vec_pretty(&manifest).map_err(PipelineError::internal)?);
        let mut metadata = base_metadata(job, rec);
        metadata.insert("schema-version".into(), SCHEMA_VERSION.to_string());
        let meta = PutMeta {
            content_type: "application/json",
            sha256: Sha256::of(&body),
            metadata,
        };
        let created = self.store.put_if_absent(&manifest_key, body, &meta).await?;
        let manifest_key = self.store.full_key(&manifest_key);
        if created == Created::AlreadyExisted {
            tracing::info!("another worker wrote the manifest first");
            // Theirs is the manifest that counts: report it, not ours.
            return self
                .already_archived(job)
                .await?
                .ok_or_else(|| PipelineError::internal("the manifest vanished after archiving"));
        }
        let event = self.finish(&manifest, &manifest_key).await?;
        Ok(Outcome::Archived {
            request_id: rec.request_id.clone(),
            reused_recognition: reused,
            segments: manifest.segments.iter().filter(|s| s.key.is_some()).count(),
            cost: rec.final_unit_deduction.clone(),
            manifest_key,
            event: Box::new(event),
        })
    }
}
