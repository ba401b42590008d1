//! Where `worker demo` archives, and the promise that it never deletes
//! what it did not create.
//!
//! The demo starts from an empty archive so every job runs afresh. It
//! takes an archive (a directory, or an `s3://bucket/prefix`) only when it
//! is empty or holds a marker object, [`MARKER`], that an earlier demo
//! wrote there. The marker lists every object that demo made; the next run
//! deletes exactly those (and, in a directory, the folders they leave
//! empty), nothing else. Anything else in the archive refuses the run with
//! a message saying what to do. The marker is written before the first
//! job, so even a demo killed mid-run leaves an archive the next run
//! accepts (its unlisted leftovers are then kept, never guessed at).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::archive::{ArchiveTarget, ObjectKey, PutMeta, Sha256, Store, StoreError};
use crate::error::{Classify, Disposition};

/// The marker object at the archive's root.
pub const MARKER: &str = "kling-demo.json";
/// The report the demo writes into a directory archive.
pub const REPORT: &str = "report.html";

/// What the marker says.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Marker {
    /// Always "kling-archiver demo": what wrote it.
    written_by: String,
    /// Object keys the demo made, relative to the archive.
    objects: Vec<String>,
    /// Plain files the demo wrote into a directory archive (the report).
    files: Vec<String>,
}

const WRITTEN_BY: &str = "kling-archiver demo";

/// Why the demo will not use an archive.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DemoArchiveError {
    #[error(
        "{archive} is not empty and is not an earlier demo archive (it has no {MARKER}); \
         the demo clears its earlier results before each run, so it only archives into an \
         empty place or one it made itself. Nothing was touched. Pass an empty or new one: \
         --archive ./demo-archive-2 (or ARCHIVE_URL=...)"
    )]
    NotEmpty { archive: String },
    #[error("{path} is not a directory; pass a directory or s3://bucket/prefix as --archive")]
    NotADirectory { path: String },
    #[error("{archive}/{MARKER} is not a demo marker ({reason}); nothing was touched")]
    BadMarker { archive: String, reason: String },
    #[error("demo archive: {0}")]
    Store(#[from] StoreError),
}

impl Classify for DemoArchiveError {
    fn disposition(&self) -> Disposition {
        match self {
            DemoArchiveError::Store(e) => e.disposition(),
            _ => Disposition::Fatal,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            DemoArchiveError::NotEmpty { .. } => "demo_archive_not_empty",
            DemoArchiveError::NotADirectory { .. } => "demo_archive_not_a_directory",
            DemoArchiveError::BadMarker { .. } => "demo_archive_bad_marker",
            DemoArchiveError::Store(e) => e.code(),
        }
    }
}

/// An archive the demo has claimed: emptied of its own earlier objects,
/// marked, and remembering what was there before this run (nothing, or
/// what it found and may not touch).
pub struct Claimed {
    pub store: Store,
    /// The directory of a local archive.
    pub dir: Option<PathBuf>,
    before: BTreeSet<String>,
    files: Vec<String>,
}

/// Claim `target` for a demo run (module docs). `store` is the archive
/// opened on it; for a directory, `target` is created if missing.
pub async fn claim(
    target: &ArchiveTarget,
    s3: &aws_sdk_s3::Client,
) -> Result<Claimed, DemoArchiveError> {
    let (store, dir) = match target {
        ArchiveTarget::Local(path) => {
            let dir = open_dir(path)?;
            (Store::local(dir.clone()), Some(dir))
        }
        ArchiveTarget::S3 { .. } => (Store::open(target, s3), None),
    };
    let archive = store.describe();
    let marker_key = key(MARKER);
    match store.get(&marker_key).await? {
        Some(bytes) => {
            let marker: Marker = serde_json::from_slice(&bytes)
                .ok()
                .filter(|m: &Marker| m.written_by == WRITTEN_BY)
                .ok_or_else(|| DemoArchiveError::BadMarker {
                    archive: archive.clone(),
                    reason: format!("it was not written by the {WRITTEN_BY}"),
                })?;
            clear(&store, dir.as_deref(), &marker).await?;
        }
        None if !is_empty(&store, dir.as_deref()).await? => {
            return Err(DemoArchiveError::NotEmpty { archive });
        }
        None => {}
    }
    let before = store
        .list("")
        .await?
        .into_iter()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k != MARKER)
        .collect();
    let claimed = Claimed {
        store,
        dir,
        before,
        files: Vec::new(),
    };
    // Marked before the first job: a run killed mid-way stays claimable.
    claimed.write_marker(Vec::new()).await?;
    Ok(claimed)
}

impl Claimed {
    /// Where the report goes: inside a directory archive (`None` when a
    /// file of that name is there and not the demo's); for S3, the temp
    /// directory.
    pub fn report_path(&mut self) -> Option<PathBuf> {
        match &self.dir {
            Some(dir) if dir.join(REPORT).exists() => None,
            Some(dir) => {
                self.files.push(REPORT.to_owned());
                Some(dir.join(REPORT))
            }
            None => Some(std::env::temp_dir().join("kling-archiver-demo-report.html")),
        }
    }

    /// Record what this run made (every object now in the archive that was
    /// not there when it was claimed) in the marker.
    pub async fn finish(&self) -> Result<usize, DemoArchiveError> {
        let made: Vec<String> = self
            .store
            .list("")
            .await?
            .into_iter()
            .map(|k| k.as_str().to_owned())
            .filter(|k| k != MARKER && !self.before.contains(k) && !self.files.contains(k))
            .collect();
        let n = made.len();
        self.write_marker(made).await?;
        Ok(n)
    }

    async fn write_marker(&self, objects: Vec<String>) -> Result<(), DemoArchiveError> {
        let marker = Marker {
            written_by: WRITTEN_BY.to_owned(),
            objects,
            files: self.files.clone(),
        };
        let body = serde_json::to_vec_pretty(&marker).unwrap_or_default();
        let meta = PutMeta {
            content_type: "application/json",
            sha256: Sha256::of(&body),
            metadata: Default::default(),
        };
        self.store
            .put(&key(MARKER), Bytes::from(body), &meta)
            .await?;
        Ok(())
    }
}

fn key(s: &str) -> ObjectKey {
    ObjectKey::parse(s).unwrap_or_else(|e| unreachable!("a constant key: {e}"))
}

/// The directory at `path`, created if missing, as an absolute path.
fn open_dir(path: &Path) -> Result<PathBuf, DemoArchiveError> {
    if path.exists() && !path.is_dir() {
        return Err(DemoArchiveError::NotADirectory {
            path: path.display().to_string(),
        });
    }
    std::fs::create_dir_all(path).map_err(StoreError::from)?;
    Ok(std::fs::canonicalize(path).map_err(StoreError::from)?)
}

/// Nothing at all in the archive: no object, and for a directory no
/// entry of any kind (a user's file need not be a valid object key).
async fn is_empty(store: &Store, dir: Option<&Path>) -> Result<bool, DemoArchiveError> {
    match dir {
        Some(dir) => Ok(std::fs::read_dir(dir)
            .map_err(StoreError::from)?
            .next()
            .is_none()),
        None => Ok(store.list("").await?.is_empty()),
    }
}

/// Delete what `marker` lists, then (in a directory) the folders that
/// leaves empty, up to the archive's root.
async fn clear(store: &Store, dir: Option<&Path>, marker: &Marker) -> Result<(), DemoArchiveError> {
    for object in &marker.objects {
        // A key that does not parse was never ours to write; skip it.
        let Ok(k) = ObjectKey::parse(object) else {
            continue;
        };
        store.delete(&k).await?;
    }
    let Some(dir) = dir else {
        return Ok(());
    };
    for file in &marker.files {
        if ObjectKey::parse(file).is_ok() {
            match std::fs::remove_file(dir.join(file)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::from(e).into()),
            }
        }
    }
    let meta = dir.join(".kling-meta");
    let mut parents: BTreeSet<PathBuf> = BTreeSet::new();
    for object in &marker.objects {
        for base in [dir, meta.as_path()] {
            let mut p = base.join(object);
            while p.pop() && p.starts_with(dir) && p != dir {
                parents.insert(p.clone());
            }
        }
    }
    // Deepest first; `remove_dir` takes only empty folders.
    for p in parents.iter().rev() {
        let _ = std::fs::remove_dir(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3() -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::new()
                .behavior_version_latest()
                .region(aws_sdk_s3::config::Region::new("us-east-1"))
                .build(),
        )
    }

    async fn put(store: &Store, k: &str) {
        let body = b"x".to_vec();
        let meta = PutMeta {
            content_type: "image/png",
            sha256: Sha256::of(&body),
            metadata: Default::default(),
        };
        store.put(&key(k), Bytes::from(body), &meta).await.unwrap();
    }

    #[tokio::test]
    async fn a_directory_with_a_users_file_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("holiday.jpg"), b"precious").unwrap();
        let target = ArchiveTarget::Local(tmp.path().to_owned());
        let err = claim(&target, &s3()).await.err().expect("refused");
        assert_eq!(err.code(), "demo_archive_not_empty");
        assert!(err.to_string().contains("--archive"), "{err}");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "nothing added");
        assert_eq!(
            std::fs::read(tmp.path().join("holiday.jpg")).unwrap(),
            b"precious"
        );
    }

    #[tokio::test]
    async fn a_second_run_removes_only_what_the_first_made() {
        let tmp = tempfile::tempdir().unwrap();
        let target = ArchiveTarget::Local(tmp.path().join("demo"));
        let mut first = claim(&target, &s3()).await.unwrap();
        put(&first.store, "jobs/a/manifest.json").await;
        put(&first.store, "segments/r1/object.png").await;
        let report = first.report_path().expect("no report.html yet");
        std::fs::write(&report, b"<html>").unwrap();
        assert_eq!(first.finish().await.unwrap(), 2);

        // The user adds a file of their own next to the demo's.
        let dir = tmp.path().join("demo");
        std::fs::create_dir_all(dir.join("mine")).unwrap();
        std::fs::write(dir.join("mine/notes.txt"), b"keep me").unwrap();

        let second = claim(&target, &s3()).await.unwrap();
        assert!(!dir.join("jobs").exists(), "the demo's folders went");
        assert!(!dir.join("segments").exists());
        assert!(!report.exists());
        assert_eq!(
            std::fs::read(dir.join("mine/notes.txt")).unwrap(),
            b"keep me"
        );
        put(&second.store, "jobs/b/manifest.json").await;
        assert_eq!(second.finish().await.unwrap(), 1, "only this run's object");
    }

    #[tokio::test]
    async fn a_foreign_marker_is_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(MARKER), br#"{"objects":["x"]}"#).unwrap();
        let target = ArchiveTarget::Local(tmp.path().to_owned());
        let err = claim(&target, &s3()).await.err().expect("refused");
        assert_eq!(err.code(), "demo_archive_bad_marker");
    }

    #[test]
    fn a_file_is_not_an_archive_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"data").unwrap();
        let err = open_dir(&file).unwrap_err();
        assert_eq!(err.code(), "demo_archive_not_a_directory");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
