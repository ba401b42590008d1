//! The manifest — the contract with downstream readers — and the
//! recognition record that makes redeliveries free.
//!
//! A manifest at `jobs/<job_id>/manifest.json` means the job is complete:
//! it is written last, create-if-absent, after every object it names.
//!
//! Lives above the stages, beside the pipeline: it names types of
//! `prepare` and `kling`, which the archive (a store of keys and bytes)
//! must not know.

use serde::{Deserialize, Serialize};

use crate::archive::Sha256;
use crate::kling::{Recognition, SegmentType};
use crate::prepare::{OutputFormat, SourceFormat, TransformRecord, Violation};

/// Bumped on any change a reader must know about. See `docs/s3-layout.md`.
pub const SCHEMA_VERSION: u32 = 1;

/// What the worker publishes to `<queue>.results` for every archived job,
/// before acking it (see `docs/job-schema.md`). Built from the manifest, so
/// the event and the archive never disagree. Published again when a
/// redelivered job finds its manifest: consumers must be idempotent on
/// `job_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub schema_version: u32,
    /// Always `archived`.
    pub event: String,
    pub job_id: String,
    /// `s3://bucket/prefix` or the archive directory.
    pub archive: String,
    pub manifest_key: String,
    pub request_id: String,
    pub final_unit_deduction: String,
    pub reused_recognition: bool,
    pub archived_at: String,
    pub labels: crate::job::Labels,
    pub segments: Vec<SegmentEntry>,
}

impl ResultEvent {
    pub fn from_manifest(m: &Manifest, archive: String, manifest_key: String) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event: "archived".into(),
            job_id: m.job_id.clone(),
            archive,
            manifest_key,
            request_id: m.request_id.clone(),
            final_unit_deduction: m.final_unit_deduction.clone(),
            reused_recognition: m.reused_recognition,
            archived_at: m.archived_at.clone(),
            labels: m.labels.clone(),
            segments: m.segments.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub job_id: String,
    pub request_id: String,
    /// Units Kling charged for the call, as Kling wrote it.
    pub final_unit_deduction: String,
    pub labels: crate::job::Labels,
    pub source: SourceImage,
    pub prepared: PreparedImage,
    pub segments: Vec<SegmentEntry>,
    /// What in Kling's billed answer as a whole could not be read (see
    /// `docs/reliability.md`); the job is archived with what could.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub problem: Option<String>,
    /// True when this job reused an earlier recognition of the same prepared
    /// image (a redelivery, or the same image under another job id) instead
    /// of paying for a new call.
    pub reused_recognition: bool,
    /// How the masks sit on the source's pixels (absent in archives written
    /// before aligned masks existed).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_masks: Option<SourceMasks>,
    /// RFC 3339, when Kling answered.
    pub recognized_at: String,
    /// RFC 3339, when this manifest was written.
    pub archived_at: String,
    pub worker: WorkerInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceImage {
    /// Where the image came from (`https://…` without query, `s3://…`, or `inline`).
    pub uri: String,
    pub sha256: Sha256,
    pub format: SourceFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// EXIF orientation found in the source (1 = none).
    pub orientation: u8,
    /// Full key of the archived copy.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedImage {
    pub sha256: Sha256,
    pub format: OutputFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// Sent byte for byte as received (the source was in spec).
    pub passthrough: bool,
    /// What was out of spec in the source.
    pub violations: Vec<Violation>,
    /// How to map prepared (mask) coordinates back to the source.
    pub transforms: TransformRecord,
    /// Full key of the archived copy (the same object as the source's when
    /// passed through).
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentEntry {
    #[serde(rename = "type")]
    pub kind: SegmentType,
    pub is_contain: bool,
    /// Present when `is_contain`: the archived PNG.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sha256: Option<Sha256>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub height: Option<u32>,
    /// Why a contained segment was not archived (Kling's answer for it
    /// does not parse); the raw answer is in the recognition record.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub problem: Option<String>,
    /// The mask on the source's own pixel grid, when Kling's is not (see
    /// [`SourceMasks`]).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub aligned: Option<AlignedMaskEntry>,
}

/// A segment's mask moved onto the source's stored pixel grid: an 8-bit
/// greyscale PNG (0 outside, 255 inside) the size of the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignedMaskEntry {
    pub key: String,
    pub sha256: Sha256,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
}

/// Whether a job's masks line up with the source as stored, and in which
/// convention (`docs/s3-layout.md`, "Masks on the source").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceMasks {
    /// `aligned`: every found segment names an `aligned` mask;
    /// `already_aligned`: the image went to Kling with the source's own
    /// geometry, so Kling's PNGs are on the source grid; `disabled`:
    /// `SOURCE_MASKS=false`, only Kling's PNGs were kept.
    pub status: SourceMaskStatus,
    /// Always `stored`: the source's pixels as stored in its file.
    pub grid: String,
    /// Always false: the EXIF orientation is not applied to the grid.
    pub exif_orientation_applied: bool,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceMaskStatus {
    Aligned,
    AlreadyAligned,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub version: String,
}

impl WorkerInfo {
    pub fn current() -> Self {
        Self {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Kling's answer for one prepared image, stored the moment it arrives and
/// before any download, so that a crash, a redelivery or the same image
/// under another job id never pays for a second call while the result URLs
/// are still valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecognitionRecord {
    pub schema_version: u32,
    pub prepared_sha256: Sha256,
    /// The job whose call this was.
    pub job_id: String,
    pub recognized_at: String,
    pub recognition: Recognition,
}

/// Now, as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
