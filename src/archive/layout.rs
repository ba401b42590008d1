//! Every key the worker writes, in one place. See `docs/s3-layout.md`.
//!
//! ```text
//! jobs/<job_id>/manifest.json          entry point, written last (the contract)
//! images/<sha256>.<jpg|png|...>        source and prepared images, by content
//! recognitions/<prepared_sha256>.json  Kling's answer for a prepared image
//! segments/<request_id>/<type>.png     segment PNGs, byte for byte as Kling sent them
//! masks/<sha256>.png                   segment masks on the source's pixel grid, by content
//! ```
//!
//! Keys are deterministic: a redelivered job computes the same keys and
//! overwrites identical bytes. Segments are keyed by the Kling request that
//! produced them, so a re-recognition (after results expired) never
//! overwrites objects an older manifest names.

use super::{ObjectKey, Sha256};
use crate::job::JobId;

pub const MANIFEST_FILE: &str = "manifest.json";

fn key(s: String) -> ObjectKey {
    // Every caller builds from parsed parts whose characters are key-safe.
    ObjectKey::parse(&s).unwrap_or_else(|e| unreachable!("layout produced an invalid key: {e}"))
}

pub fn manifest(job: &JobId) -> ObjectKey {
    key(format!("jobs/{job}/{MANIFEST_FILE}"))
}

pub fn image(sha: &Sha256, extension: &str) -> ObjectKey {
    let ext: String = extension
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let ext = if ext.is_empty() {
        "bin".to_owned()
    } else {
        ext.to_ascii_lowercase()
    };
    key(format!("images/{sha}.{ext}"))
}

/// A mask aligned to its source, keyed by its own content: the same mask
/// (the same image under two job ids, a repeated attempt) is stored once.
pub fn aligned_mask(sha: &Sha256) -> ObjectKey {
    key(format!("masks/{sha}.png"))
}

pub fn recognition(prepared: &Sha256) -> ObjectKey {
    key(format!("recognitions/{prepared}.json"))
}

/// The lease on a recognition key: `leases/<name>` for
/// `recognitions/<name>` (see `archive::lease`).
pub fn lease(recognition: &ObjectKey) -> ObjectKey {
    let name = recognition
        .as_str()
        .strip_prefix("recognitions/")
        .unwrap_or(recognition.as_str());
    key(format!("leases/{name}"))
}

/// The day index: `index/dt=<YYYY-MM-DD>/<job_id>.json`, one small object
/// per job archived that day (UTC), so a downstream job lists one day's
/// prefix instead of the whole archive.
pub fn day_index(day: &str, job: &JobId) -> Option<ObjectKey> {
    let ok = day.len() == 10
        && day.chars().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    ok.then(|| key(format!("index/dt={day}/{job}.json")))
}

/// With `SHARE_RECOGNITIONS=false`: one record per job, so a redelivery
/// still reuses its own answer but no other job does.
pub fn recognition_of_job(prepared: &Sha256, job: &JobId) -> ObjectKey {
    key(format!("recognitions/{prepared}.{job}.json"))
}

/// `n` disambiguates a type that appears more than once in one answer.
/// A type that is not key-safe is stored under a hash of it.
pub fn segment(request_id: &str, kind: &str, n: usize) -> ObjectKey {
    let suffix = if n == 0 {
        String::new()
    } else {
        format!("-{n}")
    };
    key(format!(
        "segments/{}/{}{suffix}.png",
        key_segment(request_id, 96),
        key_segment(kind, 64)
    ))
}

/// A value from Kling (a request id, a segment type) as one key segment:
/// kept when it is short and key-safe, otherwise replaced by a hash of it.
fn key_segment(value: &str, max: usize) -> String {
    let safe = !value.is_empty()
        && value.len() <= max
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if safe {
        value.to_owned()
    } else {
        format!("h-{}", &Sha256::of(value.as_bytes()).hex()[..32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let job = JobId::parse("catalog-2026-11-000123").unwrap();
        assert_eq!(
            day_index("2026-11-25", &job).unwrap().as_str(),
            "index/dt=2026-11-25/catalog-2026-11-000123.json"
        );
        assert!(day_index("2026-11-2", &job).is_none());
        assert!(day_index("../../etc/x", &job).is_none());
        assert_eq!(
            manifest(&job).as_str(),
            "jobs/catalog-2026-11-000123/manifest.json"
        );
        let sha = Sha256::of(b"x");
        assert_eq!(image(&sha, "JPG").as_str(), format!("images/{sha}.jpg"));
        assert_eq!(aligned_mask(&sha).as_str(), format!("masks/{sha}.png"));
        assert_eq!(
            recognition(&sha).as_str(),
            format!("recognitions/{sha}.json")
        );
        assert_eq!(
            lease(&recognition(&sha)).as_str(),
            format!("leases/{sha}.json")
        );
        assert_eq!(
            segment("req-1", "face_seg", 0).as_str(),
            "segments/req-1/face_seg.png"
        );
        assert_eq!(
            segment("req-1", "face_seg", 2).as_str(),
            "segments/req-1/face_seg-2.png"
        );
    }

    proptest! {
        #[test]
        fn any_request_id_or_type_gives_a_valid_key(rid in ".{0,200}", kind in ".{0,100}") {
            let k = segment(&rid, &kind, 0);
            prop_assert!(k.as_str().starts_with("segments/"));
        }
    }
}
