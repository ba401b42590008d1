//! The archive step that puts each segment mask on the source's own pixel
//! grid (`prepare::align` does the pixels): for every found segment of a
//! job whose image was turned, resized or padded before Kling saw it, store
//! `masks/<sha256>.png` and name it in the segment's `aligned` entry.
//!
//! Bounded like every other pixel job: one mask at a time per job (the
//! caller's `turn` lock), on the blocking pool inside a CPU permit, with
//! the mask's working planes reserved from the pixel budget. Only the
//! one-byte coverage plane is decoded, never Kling's RGBA, so a 12 MP phone
//! photo holds about 24 MB while one of its masks is aligned.

use bytes::Bytes;

use super::{Pipeline, PipelineError, PreparedJob, base_metadata};
use crate::archive::{ObjectKey, PutMeta, Sha256, layout};
use crate::error::Classify;
use crate::job::Job;
use crate::kling::{Recognition, SegmentResult};
use crate::manifest::{AlignedMaskEntry, SourceMaskStatus, SourceMasks};
use crate::prepare::align::{self, AlignError, AlignedMask};

impl Pipeline {
    /// See `SOURCE_MASKS`.
    pub fn with_source_masks(mut self, on: bool) -> Self {
        self.source_masks = on;
        self
    }

    /// The manifest's job-level `source_masks` entry.
    pub(super) fn source_masks_entry(&self, p: &PreparedJob) -> SourceMasks {
        let status = if !align::needs_alignment(&p.prepared.transforms) {
            SourceMaskStatus::AlreadyAligned
        } else if self.source_masks {
            SourceMaskStatus::Aligned
        } else {
            SourceMaskStatus::Disabled
        };
        SourceMasks {
            status,
            grid: align::GRID.to_owned(),
            exif_orientation_applied: false,
            width: p.prepared.source.width,
            height: p.prepared.source.height,
        }
    }

    /// The segment's mask on the source grid, stored (`segment` is the
    /// key of Kling's PNG; `png` its bytes when just downloaded, else they
    /// are read back). `None` when the job needs no alignment or it is
    /// switched off, or when the PNG cannot be read as a mask (logged;
    /// Kling's original stays). `turn` makes a job's masks wait for each
    /// other while aligning: one at a time per job bounds its memory.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn aligned(
        &self,
        job: &Job,
        rec: &Recognition,
        p: &PreparedJob,
        seg: &SegmentResult,
        segment: &ObjectKey,
        png: Option<Bytes>,
        turn: &tokio::sync::Mutex<()>,
    ) -> Result<Option<AlignedMaskEntry>, PipelineError> {
        if !self.source_masks || !align::needs_alignment(&p.prepared.transforms) {
            return Ok(None);
        }
        let kind = &seg.kind;
        let png = match png {
            Some(png) => png,
            None => self.store.get(segment).await?.ok_or_else(|| {
                PipelineError::internal(format!("segment {segment} vanished before alignment"))
            })?,
        };
        // Held while the working planes exist, not while the encoded mask
        // (a fraction of their size) is written: the job's other masks
        // align while this one's write waits on the archive.
        let one_at_a_time = turn.lock().await;
        let aligned = self.align_on_pool(png, p).await;
        drop(one_at_a_time);
        let aligned = match aligned? {
            Ok(aligned) => aligned,
            Err(e) => {
                tracing::warn!(kind = %kind, code = e.code(), error = %e, "no aligned mask for this segment");
                return Ok(None);
            }
        };
        let (mask, sha) = aligned;
        let key = layout::aligned_mask(&sha);
        let mut metadata = base_metadata(job, rec);
        metadata.insert("role".into(), "aligned-mask".into());
        metadata.insert("segment-type".into(), kind.to_string());
        metadata.insert("source-sha256".into(), p.source_sha.hex());
        metadata.insert("prepared-sha256".into(), p.prepared_sha.hex());
        metadata.insert("grid".into(), align::GRID.into());
        metadata.insert("width".into(), mask.width.to_string());
        metadata.insert("height".into(), mask.height.to_string());
        let bytes = mask.png.len() as u64;
        let meta = PutMeta {
            content_type: "image/png",
            sha256: sha,
            metadata,
        };
        self.store
            .put_if_absent(&key, Bytes::from(mask.png), &meta)
            .await?;
        tracing::debug!(kind = %kind, bytes, "aligned mask archived");
        Ok(Some(AlignedMaskEntry {
            key: self.store.full_key(&key),
            sha256: sha,
            bytes,
            width: mask.width,
            height: mask.height,
        }))
    }

    /// Decode, align, encode and hash on the blocking pool, holding the
    /// mask's working planes in the pixel budget.
    async fn align_on_pool(
        &self,
        png: Bytes,
        p: &PreparedJob,
    ) -> Result<Result<(AlignedMask, Sha256), AlignError>, PipelineError> {
        let record = p.prepared.transforms.clone();
        let dims = align::png_dimensions(&png).unwrap_or(record.output);
        let mp = u32::try_from(align::working_pixels(&record, dims).div_ceil(1_000_000))
            .unwrap_or(u32::MAX)
            .clamp(1, self.pixel_permits);
        let _pixels = self
            .pixels
            .clone()
            .acquire_many_owned(mp)
            .await
            .map_err(PipelineError::internal)?;
        let max_pixels = self.limits.max_pixels;
        self.cpu_task(move || {
            let mask = align::align_png(&png, &record, max_pixels)?;
            let sha = Sha256::of(&mask.png);
            Ok((mask, sha))
        })
        .await
    }
}
