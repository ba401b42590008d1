//! The job message, version 1: the contract with the publishers.
//!
//! A delivery's body is parsed here, once, into a [`Job`] whose fields are
//! already valid (`JobId`, one [`Source`], bounded [`Labels`]). Nothing
//! downstream re-validates. This module knows nothing about RabbitMQ, images
//! or Kling; a malformed body is a [`JobError`] that the broker dead-letters.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{Classify, Disposition};
use crate::net::redact_url;

/// Bodies larger than this are refused before JSON parsing: an inline image
/// of 10 MB base64-encodes to ~13.4 MB, and anything the worker accepts
/// inline must fit a RabbitMQ frame budget anyway.
pub const MAX_BODY_BYTES: usize = 48 * 1024 * 1024;
/// Job ids: 1..=128 characters of `[A-Za-z0-9._-]`.
pub const MAX_JOB_ID_LEN: usize = 128;
/// Label limits keep the labels inside S3's 2 KB user-metadata budget.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_LEN: usize = 64;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_LABELS_JSON_BYTES: usize = 1024;

/// What no job id may contain: the archive's own file names hold it.
pub const RESERVED_ID_PART: &str = ".kling-";

/// The publisher's id for a job. The same id twice is the same job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    pub fn parse(s: &str) -> Result<Self, JobError> {
        if s.is_empty() || s.len() > MAX_JOB_ID_LEN {
            return Err(JobError::InvalidJobId {
                reason: format!(
                    "must be 1..={MAX_JOB_ID_LEN} characters, got {}",
                    s.chars().count()
                ),
            });
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(JobError::InvalidJobId {
                reason: format!("character {c:?} is not in [A-Za-z0-9._-]"),
            });
        }
        // "." and ".." would be path segments in a local-directory archive
        // and look like traversal in S3 consoles; refuse them outright.
        if s == "." || s == ".." {
            return Err(JobError::InvalidJobId {
                reason: "\".\" and \"..\" are not job ids".into(),
            });
        }
        // The archive's own names (temporary files, metadata, the health
        // probe) contain `.kling-`: a job id holding it would be hidden
        // from listings, or collide with them.
        if s.contains(RESERVED_ID_PART) {
            return Err(JobError::InvalidJobId {
                reason: format!("{RESERVED_ID_PART:?} is reserved for the archive's own files"),
            });
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the source image comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// `https://` or `http://`; reached through the SSRF guard.
    Http(url::Url),
    /// `s3://bucket/key`, read with the worker's S3 credentials.
    S3 { bucket: String, key: String },
    /// Bytes carried in the message itself (already base64-decoded).
    Inline(bytes::Bytes),
}

impl Source {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Http(_) => "http",
            Source::S3 { .. } => "s3",
            Source::Inline(_) => "inline",
        }
    }

    /// What the manifest records as the origin; never the inline bytes.
    pub fn describe(&self) -> String {
        match self {
            Source::Http(url) => redact_url(url),
            Source::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
            Source::Inline(b) => format!("inline:{} bytes", b.len()),
        }
    }
}

impl fmt::Debug for Source {
    // Never print inline image bytes or URL credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Free-form publisher labels, copied into the manifest and object metadata.
pub type Labels = BTreeMap<String, String>;

/// A parsed, valid job.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: JobId,
    pub source: Source,
    pub labels: Labels,
}

/// The wire shape of job message v1. Unknown fields are refused so a typo
/// (`image_ulr`) is a clear dead letter, not a silently ignored field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireJob {
    job_id: String,
    #[serde(default)]
    image_url: Option<String>,
    #[serde(default)]
    image_base64: Option<String>,
    #[serde(default)]
    labels: Option<Labels>,
}

impl Job {
    /// Parse a delivery body. Every failure is permanent: the same bytes will
    /// never parse on a retry.
    pub fn parse(body: &[u8]) -> Result<Job, JobError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(JobError::TooLarge { bytes: body.len() });
        }
        let wire: WireJob = serde_json::from_slice(body).map_err(|e| JobError::Malformed {
            reason: e.to_string(),
        })?;
        let id = JobId::parse(&wire.job_id)?;
        let source = match (wire.image_url, wire.image_base64) {
            (Some(url), None) => parse_url(&url)?,
            (None, Some(b64)) => parse_base64(&b64)?,
            (Some(_), Some(_)) => return Err(JobError::AmbiguousSource),
            (None, None) => return Err(JobError::MissingSource),
        };
        let labels = wire.labels.unwrap_or_default();
        validate_labels(&labels)?;
        Ok(Job { id, source, labels })
    }

    /// A job's id, recovered from a body that failed to parse, so a dead
    /// letter can still say which job it was. Best effort only.
    pub fn salvage_id(body: &[u8]) -> Option<String> {
        #[derive(Deserialize)]
        struct IdOnly {
            job_id: String,
        }
        let v: IdOnly = serde_json::from_slice(body).ok()?;
        JobId::parse(&v.job_id).ok().map(|id| id.0)
    }
}

fn parse_url(raw: &str) -> Result<Source, JobError> {
    let url = url::Url::parse(raw).map_err(|e| JobError::InvalidUrl {
        reason: e.to_string(),
    })?;
    match url.scheme() {
        "https" | "http" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(JobError::InvalidUrl {
                    reason: "URL has no host".into(),
                });
            }
            Ok(Source::Http(url))
        }
        "s3" => {
            let bucket = url.host_str().unwrap_or_default().to_owned();
            let key = url.path().trim_start_matches('/').to_owned();
            if bucket.is_empty() || key.is_empty() {
                return Err(JobError::InvalidUrl {
                    reason: "s3 URI must be s3://bucket/key".into(),
                });
            }
            // Keys are percent-decoded: s3://b/a%20b names the key "a b".
            let key = percent_decode(&key);
            Ok(Source::S3 { bucket, key })
        }
        other => Err(JobError::InvalidUrl {
            reason: format!("scheme {other:?} is not https, http or s3"),
        }),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn parse_base64(b64: &str) -> Result<Source, JobError> {
    if b64.trim_start().starts_with("data:") {
        return Err(JobError::InvalidBase64 {
            reason: "image_base64 must be bare base64, without a data: prefix".into(),
        });
    }
    // Publishers wrap long base64 at 76 columns; whitespace is not data.
    let compact: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| JobError::InvalidBase64 {
            reason: e.to_string(),
        })?;
    if bytes.is_empty() {
        return Err(JobError::InvalidBase64 {
            reason: "image_base64 is empty".into(),
        });
    }
    Ok(Source::Inline(bytes.into()))
}

fn validate_labels(labels: &Labels) -> Result<(), JobError> {
    let bad = |reason: String| Err(JobError::InvalidLabels { reason });
    if labels.len() > MAX_LABELS {
        return bad(format!("{} labels, at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        if k.is_empty() || k.chars().count() > MAX_LABEL_KEY_LEN {
            return bad(format!(
                "label key must be 1..={MAX_LABEL_KEY_LEN} characters"
            ));
        }
        if v.chars().count() > MAX_LABEL_VALUE_LEN {
            return bad(format!(
                "label {k:?}: value over {MAX_LABEL_VALUE_LEN} characters"
            ));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return bad(format!("label {k:?}: control characters are not allowed"));
        }
    }
    let json_len = labels_metadata_value(labels).len();
    if json_len > MAX_LABELS_JSON_BYTES {
        return bad(format!(
            "labels take {json_len} bytes as metadata, at most {MAX_LABELS_JSON_BYTES}"
        ));
    }
    Ok(())
}

/// Labels as one ASCII-only JSON string, fit for an HTTP header / S3 user
/// metadata value (non-ASCII is `\u` escaped).
pub fn labels_metadata_value(labels: &Labels) -> String {
    let json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Why a message is not a valid job. Always permanent.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "message body is {bytes} bytes, over the {MAX_BODY_BYTES}-byte limit; send large images by URL"
    )]
    TooLarge { bytes: usize },
    #[error("message is not a valid job v1 JSON object: {reason}")]
    Malformed { reason: String },
    #[error("job_id is invalid: {reason}")]
    InvalidJobId { reason: String },
    #[error("job has neither image_url nor image_base64; give exactly one")]
    MissingSource,
    #[error("job has both image_url and image_base64; give exactly one")]
    AmbiguousSource,
    #[error("image_url is invalid: {reason}")]
    InvalidUrl { reason: String },
    #[error("image_base64 is invalid: {reason}")]
    InvalidBase64 { reason: String },
    #[error("labels are invalid: {reason}")]
    InvalidLabels { reason: String },
}

impl Classify for JobError {
    fn disposition(&self) -> Disposition {
        Disposition::Permanent
    }

    fn code(&self) -> &'static str {
        match self {
            JobError::TooLarge { .. } => "job_too_large",
            JobError::Malformed { .. } => "job_malformed",
            JobError::InvalidJobId { .. } => "job_invalid_id",
            JobError::MissingSource => "job_missing_source",
            JobError::AmbiguousSource => "job_ambiguous_source",
            JobError::InvalidUrl { .. } => "job_invalid_url",
            JobError::InvalidBase64 { .. } => "job_invalid_base64",
            JobError::InvalidLabels { .. } => "job_invalid_labels",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(v: serde_json::Value) -> Result<Job, JobError> {
        Job::parse(v.to_string().as_bytes())
    }

    #[test]
    fn parses_the_contract_example() {
        let job = parse(serde_json::json!({
            "job_id": "catalog-2026-11-000123",
            "image_url": "https://cdn.example.com/p/123.jpg",
            "labels": { "campaign": "winter" }
        }))
        .unwrap();
        assert_eq!(job.id.as_str(), "catalog-2026-11-000123");
        assert_eq!(job.source.kind(), "http");
        assert_eq!(job.labels["campaign"], "winter");
    }

    #[test]
    fn job_ids_that_collide_with_the_archives_own_names_are_refused() {
        for id in [
            "a.kling-tmp-0123",
            "x.kling-meta",
            ".kling-archiver-health",
            "p.kling-q",
        ] {
            let err = JobId::parse(id).unwrap_err();
            assert_eq!(err.code(), "job_invalid_id", "{id}");
            assert!(err.to_string().contains("reserved"), "{id}: {err}");
        }
        assert!(JobId::parse("kling-2026.batch-1").is_ok());
    }

    #[test]
    fn parses_s3_and_inline_sources() {
        let job = parse(serde_json::json!({"job_id": "a", "image_url": "s3://bkt/dir/a%20b.png"}))
            .unwrap();
        assert_eq!(
            job.source,
            Source::S3 {
                bucket: "bkt".into(),
                key: "dir/a b.png".into()
            }
        );
        let job = parse(serde_json::json!({"job_id": "a", "image_base64": "aGVs\nbG8="})).unwrap();
        assert_eq!(
            job.source,
            Source::Inline(bytes::Bytes::from_static(b"hello"))
        );
    }

    #[test]
    fn refuses_each_malformed_shape_with_its_own_code() {
        let cases = [
            (
                serde_json::json!({"image_url": "https://x/y"}),
                "job_malformed",
            ),
            (
                serde_json::json!({"job_id": 5, "image_url": "https://x/y"}),
                "job_malformed",
            ),
            (
                serde_json::json!({"job_id": "a", "image_url": "https://x/y", "extra": 1}),
                "job_malformed",
            ),
            (
                serde_json::json!({"job_id": "../x", "image_url": "https://x/y"}),
                "job_invalid_id",
            ),
            (
                serde_json::json!({"job_id": "..", "image_url": "https://x/y"}),
                "job_invalid_id",
            ),
            (
                serde_json::json!({"job_id": "", "image_url": "https://x/y"}),
                "job_invalid_id",
            ),
            (
                serde_json::json!({"job_id": "a".repeat(129), "image_url": "https://x/y"}),
                "job_invalid_id",
            ),
            (serde_json::json!({"job_id": "a"}), "job_missing_source"),
            (
                serde_json::json!({"job_id": "a", "image_url": "https://x/y", "image_base64": "aGk="}),
                "job_ambiguous_source",
            ),
            (
                serde_json::json!({"job_id": "a", "image_url": "ftp://x/y"}),
                "job_invalid_url",
            ),
            (
                serde_json::json!({"job_id": "a", "image_url": "file:///etc/passwd"}),
                "job_invalid_url",
            ),
            (
                serde_json::json!({"job_id": "a", "image_url": "s3://bucket-only"}),
                "job_invalid_url",
            ),
            (
                serde_json::json!({"job_id": "a", "image_base64": "data:image/png;base64,aGk="}),
                "job_invalid_base64",
            ),
            (
                serde_json::json!({"job_id": "a", "image_base64": "!!!"}),
                "job_invalid_base64",
            ),
            (
                serde_json::json!({"job_id": "a", "image_base64": ""}),
                "job_invalid_base64",
            ),
            (
                serde_json::json!({"job_id": "a", "image_base64": "aGk=", "labels": {"k": 1}}),
                "job_malformed",
            ),
            (
                serde_json::json!({"job_id": "a", "image_base64": "aGk=", "labels": {"k": "x".repeat(300)}}),
                "job_invalid_labels",
            ),
        ];
        for (body, code) in cases {
            let err = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(err.code(), code, "{body}: {err}");
            assert_eq!(err.disposition(), Disposition::Permanent);
        }
        assert_eq!(Job::parse(b"not json").unwrap_err().code(), "job_malformed");
        assert_eq!(Job::parse(b"[1,2]").unwrap_err().code(), "job_malformed");
    }

    #[test]
    fn too_many_labels_are_refused() {
        let labels: Labels = (0..40).map(|i| (format!("k{i}"), "v".into())).collect();
        let err =
            parse(serde_json::json!({"job_id": "a", "image_base64": "aGk=", "labels": labels}))
                .unwrap_err();
        assert_eq!(err.code(), "job_invalid_labels");
    }

    #[test]
    fn labels_metadata_value_is_ascii_json() {
        let labels: Labels = [("saison".to_string(), "hiver ❄".to_string())].into();
        let v = labels_metadata_value(&labels);
        assert!(v.is_ascii(), "{v}");
        let back: Labels = serde_json::from_str(&v).unwrap();
        assert_eq!(back, labels);
    }

    #[test]
    fn source_debug_never_shows_bytes_or_signatures() {
        let s = Source::Inline(bytes::Bytes::from_static(b"secret-bytes"));
        assert_eq!(format!("{s:?}"), "inline:12 bytes");
        let url = url::Url::parse("https://u:p@x.com/a.jpg?X-Amz-Signature=abc").unwrap();
        let d = redact_url(&url);
        assert!(!d.contains("abc") && !d.contains("u:p"), "{d}");
    }

    #[test]
    fn salvage_id_recovers_valid_ids_only() {
        assert_eq!(
            Job::salvage_id(br#"{"job_id":"ok-1","image_url":5}"#).as_deref(),
            Some("ok-1")
        );
        assert_eq!(Job::salvage_id(br#"{"job_id":"../bad"}"#), None);
    }

    proptest! {
        #[test]
        fn job_ids_are_accepted_iff_they_match_the_contract(s in "[ -~]{0,140}") {
            let ok = (1..=128).contains(&s.len())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
                && s != "." && s != "..";
            prop_assert_eq!(JobId::parse(&s).is_ok(), ok);
        }

        #[test]
        fn parse_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Job::parse(&body);
        }
    }
}
