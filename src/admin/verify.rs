//! `worker verify`: walk the manifests of an archive and check that every
//! object each one names exists with the recorded size and SHA-256.
//!
//! By default every object is downloaded and hashed, which catches any
//! change of content on any backend. `--quick` only reads metadata (size
//! and the `sha256` metadata written with the object): cheap, and enough to
//! catch deleted or replaced objects on S3, whose own checksum guards the
//! bytes at rest.

use std::time::Duration;

use serde::Serialize;

use crate::archive::{ObjectKey, Sha256, Store, StoreError};
use crate::manifest::Manifest;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only manifests archived on or after this day (`YYYY-MM-DD`).
    pub since: Option<String>,
    /// Metadata only: no download.
    pub quick: bool,
    pub progress: bool,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub job_id: String,
    pub key: String,
    /// `missing`, `size_mismatch`, `sha256_mismatch`, `no_checksum`,
    /// `unreadable_manifest`, `outside_archive`, `aligned_size_mismatch`
    /// (an aligned mask that is not the source's size).
    pub problem: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub archive: String,
    pub manifests: usize,
    pub skipped_before_since: usize,
    pub objects_checked: usize,
    pub bytes_checked: u64,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// What a terminal user reads.
    pub fn summary(&self, took: Duration) -> String {
        let mut out = format!(
            "{}: {} manifests, {} objects ({:.1} MB) checked in {:.1}s",
            self.archive,
            self.manifests,
            self.objects_checked,
            self.bytes_checked as f64 / 1e6,
            took.as_secs_f64()
        );
        if self.skipped_before_since > 0 {
            out.push_str(&format!(
                ", {} manifests before --since skipped",
                self.skipped_before_since
            ));
        }
        if self.findings.is_empty() {
            out.push_str("; all good");
        } else {
            out.push_str(&format!("; {} problems:", self.findings.len()));
            for f in &self.findings {
                out.push_str(&format!(
                    "\n  {:<19} {}  (job {}) {}",
                    f.problem, f.key, f.job_id, f.detail
                ));
            }
        }
        out
    }
}

/// An object a manifest vouches for.
struct Expected {
    key: String,
    sha256: Sha256,
    bytes: Option<u64>,
}

fn expected(m: &Manifest) -> Vec<Expected> {
    let mut out = vec![
        Expected {
            key: m.source.key.clone(),
            sha256: m.source.sha256,
            bytes: Some(m.source.bytes),
        },
        Expected {
            key: m.prepared.key.clone(),
            sha256: m.prepared.sha256,
            bytes: Some(m.prepared.bytes),
        },
    ];
    for s in &m.segments {
        if let (Some(key), Some(sha256)) = (&s.key, s.sha256) {
            out.push(Expected {
                key: key.clone(),
                sha256,
                bytes: s.bytes,
            });
        }
        if let Some(a) = &s.aligned {
            out.push(Expected {
                key: a.key.clone(),
                sha256: a.sha256,
                bytes: Some(a.bytes),
            });
        }
    }
    // An in-spec image is its own prepared image: check it once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|e| seen.insert(e.key.clone()));
    out
}

/// Aligned masks whose recorded size is not the source's: (key, detail).
fn aligned_size_problems(m: &Manifest) -> Vec<(String, String)> {
    m.segments
        .iter()
        .filter_map(|s| s.aligned.as_ref())
        .filter(|a| [a.width, a.height] != [m.source.width, m.source.height])
        .map(|a| {
            let detail = format!(
                "{}x{}, the source is {}x{}",
                a.width, a.height, m.source.width, m.source.height
            );
            (a.key.clone(), detail)
        })
        .collect()
}

/// Walk every manifest under `jobs/` and check what it names.
pub async fn run(store: &Store, opts: &Options) -> Result<Report, StoreError> {
    let manifests: Vec<ObjectKey> = store
        .list("jobs/")
        .await?
        .into_iter()
        .filter(|k| k.as_str().ends_with("/manifest.json"))
        .collect();
    let bar = progress_bar(opts.progress, manifests.len());
    let mut report = Report {
        archive: store.describe(),
        ..Report::default()
    };
    for key in manifests {
        bar.inc(1);
        check_job(store, opts, &key, &mut report).await?;
    }
    bar.finish_and_clear();
    Ok(report)
}

fn progress_bar(show: bool, manifests: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(manifests as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} manifests  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Check the manifest at `key` and every object it names, into `report`.
async fn check_job(
    store: &Store,
    opts: &Options,
    key: &ObjectKey,
    report: &mut Report,
) -> Result<(), StoreError> {
    let job_dir = key.as_str().trim_end_matches("/manifest.json");
    let job_id = job_dir.trim_start_matches("jobs/").to_owned();
    let finding = |key: &str, problem, detail: String| Finding {
        job_id: job_id.clone(),
        key: key.to_owned(),
        problem,
        detail,
    };
    let manifest: Manifest = match store.get(key).await? {
        None => return Ok(()), // deleted while we walked
        Some(body) => match serde_json::from_slice(&body) {
            Ok(m) => m,
            Err(e) => {
                report.findings.push(finding(
                    &store.full_key(key),
                    "unreadable_manifest",
                    e.to_string(),
                ));
                return Ok(());
            }
        },
    };
    if let Some(since) = &opts.since
        && manifest
            .archived_at
            .get(..10)
            .is_some_and(|day| day < since.as_str())
    {
        report.skipped_before_since += 1;
        return Ok(());
    }
    report.manifests += 1;
    for (key, detail) in aligned_size_problems(&manifest) {
        report
            .findings
            .push(finding(&key, "aligned_size_mismatch", detail));
    }
    for exp in expected(&manifest) {
        let Some(obj) = store.relative_key(&exp.key) else {
            report.findings.push(finding(
                &exp.key,
                "outside_archive",
                "the manifest names a key outside this archive".into(),
            ));
            continue;
        };
        report.objects_checked += 1;
        let checked = if opts.quick {
            check_metadata(store, &obj, &exp).await?
        } else {
            check_content(store, &obj, &exp).await?
        };
        report.bytes_checked += checked.bytes;
        if let Some((problem, detail)) = checked.problem {
            report.findings.push(finding(&exp.key, problem, detail));
        }
    }
    Ok(())
}

/// What checking one object found: the bytes it covered, and a problem
/// (`(problem, detail)`) if any.
struct Checked {
    bytes: u64,
    problem: Option<(&'static str, String)>,
}

impl Checked {
    const MISSING: Self = Self {
        bytes: 0,
        problem: Some(("missing", String::new())),
    };
}

/// `--quick`: the object's size and its `sha256` metadata, no download.
async fn check_metadata(
    store: &Store,
    obj: &ObjectKey,
    exp: &Expected,
) -> Result<Checked, StoreError> {
    let Some(info) = store.head(obj).await? else {
        return Ok(Checked::MISSING);
    };
    let problem = if exp.bytes.is_some_and(|b| b != info.size) {
        Some((
            "size_mismatch",
            format!("{} bytes, manifest says {:?}", info.size, exp.bytes),
        ))
    } else if info.sha256().is_none() {
        Some((
            "no_checksum",
            "no sha256 metadata; run without --quick".into(),
        ))
    } else if info.sha256() != Some(exp.sha256) {
        Some((
            "sha256_mismatch",
            "metadata sha256 differs from the manifest".into(),
        ))
    } else {
        None
    };
    Ok(Checked {
        bytes: info.size,
        problem,
    })
}

/// The default: download the object and hash it, off the runtime.
async fn check_content(
    store: &Store,
    obj: &ObjectKey,
    exp: &Expected,
) -> Result<Checked, StoreError> {
    let Some(body) = store.get(obj).await? else {
        return Ok(Checked::MISSING);
    };
    let bytes = body.len() as u64;
    let got = tokio::task::spawn_blocking(move || Sha256::of(&body))
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
    let problem = (got != exp.sha256).then(|| {
        (
            "sha256_mismatch",
            format!("content hashes to {}", &got.hex()[..16]),
        )
    });
    Ok(Checked { bytes, problem })
}
