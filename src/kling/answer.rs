//! Reading Kling's answer.
//!
//! An answer with HTTP 200, code 0 and a `request_id` was **billed**: it is
//! never turned into an error, whatever else is wrong with it. It comes back
//! as a [`Recognition`] carrying the raw body, with what we could not read
//! noted per segment ([`SegmentResult::problem`]) or for the whole answer
//! ([`Recognition::problem`]), so the pipeline stores it before anything
//! else and never pays for the image again. Everything else is a classified
//! [`KlingError`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SegmentType;
use super::codes::KlingError;

/// The most segments read from one answer. Kling's answers list a handful
/// (four types today); about 15,000 entries fit in the 1 MiB an answer may
/// be. Entries past the cap stay in the raw answer, unread, and the
/// answer's [`Recognition::problem`] says so: the job archives the first
/// ones and never downloads the rest.
pub const MAX_SEGMENTS: usize = 64;

/// A successful (billed) recognition: what Kling billed and where the masks are.
///
/// Read back from a stored record through the same cap as a fresh answer
/// ([`MAX_SEGMENTS`]), so no stored record can make a job download more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredRecognition")]
pub struct Recognition {
    pub request_id: String,
    pub final_unit_deduction: String,
    pub segments: Vec<SegmentResult>,
    /// What in the answer as a whole we could not read (no `data`, no
    /// `task_result`, …); the call is kept all the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The answer's JSON body as Kling sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Value>,
}

/// A [`Recognition`] as stored, before the segment cap.
#[derive(Deserialize)]
struct StoredRecognition {
    request_id: String,
    final_unit_deduction: String,
    segments: Vec<SegmentResult>,
    #[serde(default)]
    problem: Option<String>,
    #[serde(default)]
    raw: Option<Value>,
}

impl From<StoredRecognition> for Recognition {
    fn from(s: StoredRecognition) -> Self {
        let (segments, over) = cap_segments(s.segments);
        Recognition {
            request_id: s.request_id,
            final_unit_deduction: s.final_unit_deduction,
            segments,
            problem: s.problem.or(over),
            raw: s.raw,
        }
    }
}

/// The first [`MAX_SEGMENTS`] entries, and the problem to record when
/// there were more.
fn cap_segments<T>(mut entries: Vec<T>) -> (Vec<T>, Option<String>) {
    let listed = entries.len();
    if listed <= MAX_SEGMENTS {
        return (entries, None);
    }
    entries.truncate(MAX_SEGMENTS);
    (entries, Some(too_many_segments(listed)))
}

fn too_many_segments(listed: usize) -> String {
    format!(
        "too_many_segments: the answer lists {listed} segments, over the cap of \
         {MAX_SEGMENTS}; only the first {MAX_SEGMENTS} are archived, the rest are \
         in the raw answer of the recognition record"
    )
}

impl Recognition {
    /// True when part of the answer could not be read.
    pub fn is_broken(&self) -> bool {
        self.problem.is_some() || self.segments.iter().any(|s| s.problem.is_some())
    }
}

/// One entry of `task_result.images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentResult {
    /// Kling's type, or a key-safe rendering of it (see [`safe_type`]).
    #[serde(rename = "type")]
    pub kind: SegmentType,
    pub is_contain: bool,
    /// Present when `is_contain` is true and the URL parses.
    pub url: Option<url::Url>,
    /// Why this segment cannot be downloaded (e.g. its URL does not parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Turn an HTTP answer into a recognition or a classified error.
pub(crate) fn parse_answer(
    http: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<Recognition, KlingError> {
    let bad = |reason: String| KlingError::BadResponse { http, reason };
    let env: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) if (200..300).contains(&http) => return Err(bad("not a JSON object".into())),
        Err(e) if (200..300).contains(&http) => return Err(bad(format!("not JSON: {e}"))),
        // A non-JSON error page: classify by status alone.
        _ => {
            return Err(KlingError::Api {
                http,
                code: 0,
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                request_id: None,
                retry_after,
            });
        }
    };
    let code = env.get("code").and_then(Value::as_i64).unwrap_or(-1);
    let request_id = env
        .get("request_id")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
        .map(str::to_owned);
    if http != 200 || code != 0 {
        return Err(KlingError::Api {
            http,
            code: u32::try_from(code).unwrap_or(u32::MAX),
            message: env
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            request_id,
            retry_after,
        });
    }
    // Without a request id we cannot tell this answer from a proxy's page.
    let request_id = request_id.ok_or_else(|| bad("code 0 without request_id".into()))?;
    let data = env.get("data");
    let final_unit_deduction = match data.and_then(|d| d.get("final_unit_deduction")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let images = data
        .and_then(|d| d.get("task_result"))
        .and_then(|t| t.get("images"));
    let (segments, problem) = match (data, images) {
        (None | Some(Value::Null), _) => (Vec::new(), Some("code 0 without data".to_owned())),
        (_, Some(Value::Array(images))) => {
            let read = images.iter().take(MAX_SEGMENTS).map(segment).collect();
            let over = (images.len() > MAX_SEGMENTS).then(|| too_many_segments(images.len()));
            (read, over)
        }
        (_, None) => (Vec::new(), Some("no data.task_result.images".to_owned())),
        (_, Some(_)) => (
            Vec::new(),
            Some("data.task_result.images is not a list".to_owned()),
        ),
    };
    Ok(Recognition {
        request_id,
        final_unit_deduction,
        segments,
        problem,
        raw: Some(env),
    })
}

/// One image entry, read leniently: whatever is wrong goes in `problem`.
fn segment(img: &Value) -> SegmentResult {
    let raw_kind = img.get("type").and_then(Value::as_str).unwrap_or("");
    let kind = safe_type(raw_kind);
    let is_contain = img.get("is_contain").and_then(Value::as_bool);
    let url = img
        .get("url")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let (url, problem) = match (is_contain, url) {
        (None, _) => (
            None,
            Some("is_contain is missing or not a boolean".to_owned()),
        ),
        (Some(false), _) => (None, None),
        (Some(true), None) => (None, Some("is_contain without url".to_owned())),
        (Some(true), Some(u)) => match url::Url::parse(u) {
            Ok(u) => (Some(u), None),
            Err(e) => (None, Some(format!("url does not parse: {e}"))),
        },
    };
    SegmentResult {
        kind,
        // Unreadable `is_contain`: assume a segment we failed to read.
        is_contain: is_contain.unwrap_or(true),
        url,
        problem,
    }
}

/// A segment type as a key-safe name: Kling's own when it is one, else its
/// characters outside `[A-Za-z0-9_-]` replaced by `_`, shortened, with a
/// hash of the original so two odd types never share a key.
pub fn safe_type(raw: &str) -> SegmentType {
    if let Some(t) = SegmentType::parse(raw) {
        return t;
    }
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let cleaned = if cleaned.is_empty() {
        "unknown".to_owned()
    } else {
        cleaned
    };
    use sha2::Digest as _;
    let hash = &hex::encode(sha2::Sha256::digest(raw.as_bytes()))[..8];
    let name = format!("{cleaned}-x{hash}");
    SegmentType::parse(&name)
        .or_else(|| SegmentType::parse(&format!("unknown-x{hash}")))
        .unwrap_or_else(|| unreachable!("a hex name is a valid segment type"))
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs(
        delta.whole_seconds().clamp(0, 3600) as u64
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;

    #[test]
    fn parses_the_documented_success_answer() {
        let body = br#"{"code":0,"message":"SUCCEED","request_id":"r-1","data":{"final_unit_deduction":"1.5",
            "task_result":{"images":[{"type":"object_seg","is_contain":true,"url":"https://cdn.klingai.com/a.png"},
            {"type":"face_seg","is_contain":false,"url":""},{"type":"hair_seg","is_contain":true,"url":"https://cdn.klingai.com/h.png"}]}}}"#;
        let r = parse_answer(200, body, None).unwrap();
        assert_eq!(r.request_id, "r-1");
        assert_eq!(r.final_unit_deduction, "1.5");
        assert_eq!(r.segments.len(), 3);
        assert!(r.segments[1].url.is_none() && !r.segments[1].is_contain);
        assert_eq!(
            r.segments[2].kind.as_str(),
            "hair_seg",
            "unknown types are kept"
        );
        assert!(!r.is_broken());
        assert_eq!(
            r.raw.unwrap()["request_id"],
            "r-1",
            "the raw answer is kept"
        );
    }

    #[test]
    fn error_answers_are_classified() {
        let e = parse_answer(
            429,
            br#"{"code":1101,"message":"arrears","request_id":"r"}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(e.code(), "kling_1101");
        assert_eq!(e.disposition(), crate::error::Disposition::Suspend);
        let e = parse_answer(
            502,
            b"<html>bad gateway</html>",
            Some(Duration::from_secs(3)),
        )
        .unwrap_err();
        assert_eq!(e.disposition(), crate::error::Disposition::Transient);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        let e = parse_answer(200, b"<html>", None).unwrap_err();
        assert_eq!(e.code(), "kling_bad_response");
        let e = parse_answer(200, br#"{"code":0,"data":{}}"#, None).unwrap_err();
        assert_eq!(
            e.code(),
            "kling_bad_response",
            "no request_id: not known billed"
        );
    }

    /// Billed (code 0 + request_id) answers are never errors: what is wrong
    /// is noted, the rest kept.
    #[test]
    fn billed_answers_that_fail_our_checks_are_kept_with_their_problems() {
        let r = parse_answer(200, br#"{"code":0,"request_id":"r"}"#, None).unwrap();
        assert_eq!(r.problem.as_deref(), Some("code 0 without data"));
        assert!(r.is_broken() && r.raw.is_some());
        let body = br#"{"code":0,"request_id":"r","data":{"final_unit_deduction":1,"task_result":{"images":[
            {"type":"object_seg","is_contain":true,"url":"http://exa mple.com/%%"},
            {"type":"../x y","is_contain":true,"url":"https://a.b/c.png"},
            {"type":"face_seg","is_contain":true},
            {"type":"cloth_seg","is_contain":"yes"}]}}}"#;
        let r = parse_answer(200, body, None).unwrap();
        assert_eq!(r.final_unit_deduction, "1");
        let s = &r.segments;
        assert!(s[0].is_contain && s[0].url.is_none());
        assert!(
            s[0].problem
                .as_deref()
                .unwrap()
                .starts_with("url does not parse")
        );
        assert!(s[1].problem.is_none() && s[1].url.is_some());
        assert!(s[1].kind.as_str().starts_with("___x_y-x"), "{}", s[1].kind);
        assert_eq!(s[2].problem.as_deref(), Some("is_contain without url"));
        assert!(s[3].problem.is_some());
    }

    /// 10,000 entries (hostile, and billed): the first MAX_SEGMENTS are
    /// read, the answer says why, the raw body keeps them all; a stored
    /// record read back goes through the same cap.
    #[test]
    fn an_answer_over_the_segment_cap_is_kept_with_a_problem_and_read_only_up_to_it() {
        let images: Vec<Value> = (0..10_000)
            .map(|i| serde_json::json!({"type":"object_seg","is_contain":true,"url":format!("https://cdn.klingai.com/{i}.png")}))
            .collect();
        let body = serde_json::json!({"code":0,"request_id":"r-many","data":{"final_unit_deduction":"1","task_result":{"images":images}}});
        let r = parse_answer(200, body.to_string().as_bytes(), None).unwrap();
        assert_eq!(r.segments.len(), MAX_SEGMENTS);
        let problem = r.problem.clone().unwrap();
        assert!(problem.starts_with("too_many_segments"), "{problem}");
        assert!(problem.contains("10000"), "{problem}");
        assert!(r.is_broken());
        let raw = r.raw.as_ref().unwrap();
        assert_eq!(
            raw["data"]["task_result"]["images"]
                .as_array()
                .unwrap()
                .len(),
            10_000
        );
        assert_eq!(r.segments[63].url.as_ref().unwrap().path(), "/63.png");

        // A record stored without the cap (an older worker) reads back capped.
        let mut uncapped = serde_json::to_value(&r).unwrap();
        uncapped["problem"] = Value::Null;
        let entry = uncapped["segments"][0].clone();
        uncapped["segments"] = Value::Array(vec![entry; 500]);
        let back: Recognition = serde_json::from_value(uncapped).unwrap();
        assert_eq!(back.segments.len(), MAX_SEGMENTS);
        assert!(back.problem.unwrap().contains("500"));
        // Under the cap nothing changes, and a round trip is exact.
        let again: Recognition = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(again, r);
        let (few, none) = cap_segments(vec![1, 2, 3]);
        assert_eq!((few.len(), none), (3, None));
    }

    #[test]
    fn safe_types_are_key_safe_and_distinct() {
        assert_eq!(safe_type("face_seg").as_str(), "face_seg");
        let a = safe_type("a/b");
        let b = safe_type("a.b");
        assert_ne!(a, b);
        assert!(safe_type("").as_str().starts_with("unknown-x"));
        let long = safe_type(&"é".repeat(100));
        assert!(long.as_str().len() <= 64);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
