//! Archiving a recognition's segments: download each contained one (at
//! most [`crate::kling::answer::MAX_SEGMENTS`] per answer, read so by the
//! answer parser), verify it, compare its size with the prepared image's,
//! store it byte for byte and, when it matches, align it onto the source.
//!
//! A hostile or broken answer is recorded, not trusted:
//!
//! - a body or header over the caps derived from the prepared image
//!   ([`segment_limits`]) is refused before any inflate work and named in
//!   the segment's `problem`, with nothing stored;
//! - a PNG whose size is not the prepared image's is stored (Kling billed
//!   for it) with a `size_mismatch` problem, and never aligned as if it
//!   matched.
//!
//! The full PNG check and the hash run inside the pipeline's CPU permits.

use std::collections::{BTreeMap, HashMap};

use futures::{StreamExt, TryStreamExt};

use super::{Pipeline, PipelineError, PreparedJob, base_metadata};
use crate::archive::{ObjectKey, PutMeta, Sha256, layout};
use crate::download::{DownloadError, SegmentLimits};
use crate::error::Classify;
use crate::job::Job;
use crate::kling::{Recognition, SegmentResult};
use crate::manifest::{RecognitionRecord, SegmentEntry};

/// Segment downloads in flight per job.
const SEGMENT_PARALLELISM: usize = 4;

impl Pipeline {
    /// Download every contained segment (skipping those already stored by
    /// an earlier attempt) and store it byte for byte. `reused`: the
    /// recognition was stored before this attempt, so some of its segments
    /// may be too; an answer this attempt paid for has a new request id,
    /// under which nothing can be stored yet, and is not looked up (one S3
    /// request and its round trip saved per segment).
    pub(super) async fn archive_segments(
        &self,
        job: &Job,
        record: &RecognitionRecord,
        p: &PreparedJob,
        reused: bool,
    ) -> Result<Vec<SegmentEntry>, PipelineError> {
        let rec = &record.recognition;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let planned: Vec<_> = rec
            .segments
            .iter()
            .map(|s| {
                let n = seen.entry(s.kind.as_str()).or_default();
                let key = layout::segment(&rec.request_id, s.kind.as_str(), *n);
                *n += 1;
                (s, key)
            })
            .collect();
        let turn = tokio::sync::Mutex::new(());
        let work: Vec<_> = planned
            .into_iter()
            .map(|(seg, key)| self.archive_segment(job, rec, p, (seg, key), reused, &turn))
            .collect();
        futures::stream::iter(work)
            .buffered(SEGMENT_PARALLELISM)
            .try_collect()
            .await
    }

    async fn archive_segment(
        &self,
        job: &Job,
        rec: &Recognition,
        p: &PreparedJob,
        (seg, key): (&SegmentResult, ObjectKey),
        reused: bool,
        turn: &tokio::sync::Mutex<()>,
    ) -> Result<SegmentEntry, PipelineError> {
        let url = match (&seg.url, seg.is_contain) {
            (Some(url), true) => url,
            // A contained segment we cannot download stays contained,
            // with the reason (Kling billed for it).
            _ => {
                let contained = seg.is_contain && seg.problem.is_some();
                return Ok(unarchived(seg, contained, seg.problem.clone()));
            }
        };
        if reused && let Some(entry) = self.stored_segment(job, rec, p, seg, &key, turn).await? {
            return Ok(entry);
        }
        let prepared = [p.prepared.width, p.prepared.height];
        let _held = (self.budget.segment(prepared[0], prepared[1]).await)
            .map_err(PipelineError::internal)?;
        let limits = segment_limits(prepared[0], prepared[1]);
        let got = match self.downloader.download(url, limits).await {
            Ok(got) => got,
            Err(e @ (DownloadError::TooLarge { .. } | DownloadError::DecodeTooLarge { .. })) => {
                tracing::warn!(kind = %seg.kind, code = e.code(), error = %e, "segment refused: too large for its image");
                return Ok(unarchived(seg, true, Some(format!("{}: {e}", e.code()))));
            }
            Err(e) => return Err(self.download_failed(url, e).await),
        };
        let (png, sha) = self
            .cpu_task(move || {
                got.verify().map(|png| {
                    let sha = Sha256::of(&png.bytes);
                    (png, sha)
                })
            })
            .await??;
        crate::ops::metrics::archived_bytes(png.bytes.len());
        let problem = size_problem([png.width, png.height], prepared);
        let metadata = segment_metadata(job, rec, p, seg, [png.width, png.height], &problem);
        let size = png.bytes.len() as u64;
        let aligned = match &problem {
            None => {
                let copy = Some(png.bytes.clone());
                self.aligned(job, rec, p, seg, &key, copy, turn).await?
            }
            Some(problem) => {
                tracing::warn!(kind = %seg.kind, problem, "segment kept, not aligned: its size is not the prepared image's");
                None
            }
        };
        let meta = PutMeta {
            content_type: "image/png",
            sha256: sha,
            metadata,
        };
        self.store.put(&key, png.bytes, &meta).await?;
        tracing::debug!(kind = %seg.kind, bytes = size, "segment archived");
        Ok(SegmentEntry {
            kind: seg.kind.clone(),
            is_contain: true,
            key: Some(self.store.full_key(&key)),
            sha256: Some(sha),
            bytes: Some(size),
            width: Some(png.width),
            height: Some(png.height),
            problem,
            aligned,
        })
    }

    /// Stored by an earlier attempt of this job: keep it, don't download
    /// again (its size is judged again from its metadata).
    async fn stored_segment(
        &self,
        job: &Job,
        rec: &Recognition,
        p: &PreparedJob,
        seg: &SegmentResult,
        key: &ObjectKey,
        turn: &tokio::sync::Mutex<()>,
    ) -> Result<Option<SegmentEntry>, PipelineError> {
        let Some(info) = self.store.head(key).await? else {
            return Ok(None);
        };
        let Some(sha) = info.sha256() else {
            return Ok(None);
        };
        let dim = |k: &str| info.metadata.get(k).and_then(|v| v.parse().ok());
        let (width, height) = (dim("width"), dim("height"));
        let problem = match (width, height) {
            (Some(w), Some(h)) => size_problem([w, h], [p.prepared.width, p.prepared.height]),
            _ => None,
        };
        let aligned = match problem {
            None => self.aligned(job, rec, p, seg, key, None, turn).await?,
            Some(_) => None,
        };
        Ok(Some(SegmentEntry {
            kind: seg.kind.clone(),
            is_contain: true,
            key: Some(self.store.full_key(key)),
            sha256: Some(sha),
            bytes: Some(info.size),
            width,
            height,
            problem,
            aligned,
        }))
    }
}

/// The stored PNG's metadata: whose it is, its size, and its problem.
fn segment_metadata(
    job: &Job,
    rec: &Recognition,
    p: &PreparedJob,
    seg: &SegmentResult,
    size: [u32; 2],
    problem: &Option<String>,
) -> BTreeMap<String, String> {
    let mut metadata = base_metadata(job, rec);
    metadata.insert("segment-type".into(), seg.kind.to_string());
    metadata.insert("source-sha256".into(), p.source_sha.hex());
    metadata.insert("prepared-sha256".into(), p.prepared_sha.hex());
    metadata.insert("width".into(), size[0].to_string());
    metadata.insert("height".into(), size[1].to_string());
    if let Some(problem) = problem {
        metadata.insert("problem".into(), problem.clone());
    }
    metadata
}

/// A segment with nothing archived: not found, or found and not kept
/// (`problem` says why).
fn unarchived(seg: &SegmentResult, is_contain: bool, problem: Option<String>) -> SegmentEntry {
    SegmentEntry {
        kind: seg.kind.clone(),
        is_contain,
        problem,
        key: None,
        sha256: None,
        bytes: None,
        width: None,
        height: None,
        aligned: None,
    }
}

/// What a mask of a `width` × `height` prepared image may weigh: its
/// pixels in 8-bit RGBA decoded, and as a body what the byte budget
/// reserves for it ([`crate::budget::segment_bytes`]).
pub(super) fn segment_limits(width: u32, height: u32) -> SegmentLimits {
    SegmentLimits {
        max_bytes: crate::budget::segment_bytes(width, height),
        max_decoded: u64::from(width) * u64::from(height) * 4,
    }
}

/// The manifest's `problem` for a mask whose size is not the prepared
/// image's (the image Kling saw), or `None` when they agree.
pub(super) fn size_problem(mask: [u32; 2], prepared: [u32; 2]) -> Option<String> {
    (mask != prepared).then(|| {
        format!(
            "size_mismatch: {}x{}, prepared image is {}x{}",
            mask[0], mask[1], prepared[0], prepared[1]
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_of_another_size_is_named_with_both_sizes() {
        assert_eq!(size_problem([1024, 768], [1024, 768]), None);
        assert_eq!(
            size_problem([512, 512], [1024, 768]).as_deref(),
            Some("size_mismatch: 512x512, prepared image is 1024x768")
        );
        assert!(size_problem([768, 1024], [1024, 768]).is_some(), "turned");
    }

    /// The caps follow the prepared image, stay within what the byte
    /// budget reserves, and are far under the old flat 256 MiB.
    #[test]
    fn limits_follow_the_prepared_image() {
        let l = segment_limits(1024, 768);
        assert_eq!(l.max_decoded, 1024 * 768 * 4);
        assert!(l.max_bytes >= l.max_decoded, "an incompressible mask fits");
        assert_eq!(l.max_bytes, crate::budget::segment_bytes(1024, 768));
        assert!(l.max_bytes < 4 << 20);
        let big = segment_limits(4000, 4000);
        assert!(big.max_decoded > l.max_decoded);
    }
}
