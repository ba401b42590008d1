//! `worker report`: one self-contained HTML page of what an archive holds,
//! for people who would rather look than read JSON.
//!
//! For each job (newest first): a thumbnail of the source, upright, with
//! each segment mask overlaid where it belongs on the *source* (placed with
//! the manifest's transform record, so rotation, scaling and padding done
//! for Kling do not shift it; a segment's `aligned` mask, already on the
//! source's grid, is used as it is when the manifest names one), toggles per segment type, and the job's
//! labels, transforms, cost and request id. A summary header counts jobs by
//! outcome and totals the cost.
//!
//! Reads only: manifests, the images and segment PNGs they name. A job whose
//! objects are missing or unreadable still gets a card saying so.

mod html;
pub mod pixels;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::StreamExt as _;

use crate::archive::{ObjectKey, Store, StoreError};
use crate::manifest::Manifest;
use crate::prepare::{Transform, TransformRecord};

pub use html::esc;

/// Archive reads in flight while the report is built.
const FETCH_CONCURRENCY: usize = 8;
/// Opacity of a mask overlay (0-255).
const OVERLAY_ALPHA: u8 = 140;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only jobs archived on or after this day (`YYYY-MM-DD`, UTC); read
    /// from the day index, so older days are not even listed.
    pub since: Option<String>,
    /// At most this many jobs, the newest.
    pub limit: Option<usize>,
    /// Jobs that never reached the archive (the demo passes its
    /// dead-lettered jobs) get a card too.
    pub failed: Vec<FailedJob>,
    pub progress: bool,
}

/// A job that was dead-lettered, for the report's outcome counts.
#[derive(Debug, Clone)]
pub struct FailedJob {
    pub job_id: String,
    pub code: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--since must be a day, YYYY-MM-DD: {0:?}")]
    Since(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Nothing to show: a wrong ARCHIVE_URL, or an archive not written yet.
    #[error(
        "no manifests under {archive}: nothing to report; check --archive / ARCHIVE_URL \
         (manifests are at <archive>/jobs/<job_id>/manifest.json)"
    )]
    NoManifests { archive: String },
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    pub summary: Summary,
}

/// The summary header.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub archive: String,
    pub jobs: usize,
    /// Jobs by outcome: `archived` (a new Kling call), `reused` (an earlier
    /// recognition of the same image), `incomplete` (objects missing or
    /// unreadable), `dead-lettered`.
    pub outcomes: BTreeMap<String, usize>,
    /// Units charged, summed over jobs that made a call.
    pub cost: f64,
    /// Earliest and latest `archived_at`.
    pub first: Option<String>,
    pub last: Option<String>,
    pub segments: usize,
    pub segments_found: usize,
    /// Every segment type met, in order of first appearance.
    pub kinds: Vec<String>,
    /// Jobs left out by `limit`.
    pub jobs_not_shown: usize,
}

pub(crate) struct Card {
    index: usize,
    job_id: String,
    body: CardBody,
    problems: Vec<String>,
}

enum CardBody {
    Archived(Box<JobView>),
    Failed { code: String, reason: String },
}

struct JobView {
    thumb: Option<pixels::Thumb>,
    segments: Vec<SegmentView>,
    labels: Vec<(String, String)>,
    source: String,
    sent: String,
    transforms: String,
    cost: String,
    /// Units charged for this job's own call (0 when it reused one).
    units: f64,
    reused: bool,
    request_id: String,
    /// RFC 3339, for sorting and the summary.
    archived_at: String,
    /// The same, for people.
    archived_at_shown: String,
}

struct SegmentView {
    kind: String,
    found: bool,
    overlay: Option<Vec<u8>>,
    coverage: f64,
}

/// Build the report of `store` and write it to `out`.
pub async fn write(store: &Store, opts: &Options, out: &Path) -> Result<Written, ReportError> {
    let (page, summary) = render(store, opts).await?;
    let tmp = out.with_extension("html.partial");
    let write_err = |source| ReportError::Write {
        path: out.to_owned(),
        source,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await.map_err(write_err)?;
    }
    tokio::fs::write(&tmp, page.as_bytes())
        .await
        .map_err(write_err)?;
    tokio::fs::rename(&tmp, out).await.map_err(write_err)?;
    Ok(Written {
        path: out.to_owned(),
        bytes: page.len() as u64,
        summary,
    })
}

/// The page and its summary, without writing anything.
pub async fn render(store: &Store, opts: &Options) -> Result<(String, Summary), ReportError> {
    let mut manifests = read_manifests(store, opts).await?;
    // An archive with no manifests at all is a mistake (a wrong
    // ARCHIVE_URL, nothing archived yet); `--since` that selects none of
    // its jobs is an answer, an empty page.
    if manifests.is_empty() && opts.failed.is_empty() && opts.since.is_none() {
        return Err(ReportError::NoManifests {
            archive: store.describe(),
        });
    }
    // Newest first; ties by job id so the page is stable.
    manifests.sort_by(|a, b| {
        b.archived_at
            .cmp(&a.archived_at)
            .then_with(|| a.job_id.cmp(&b.job_id))
    });
    let mut summary = Summary {
        archive: store.describe(),
        ..Summary::default()
    };
    if let Some(limit) = opts.limit
        && manifests.len() > limit
    {
        summary.jobs_not_shown = manifests.len() - limit;
        manifests.truncate(limit);
    }

    let bar = progress_bar(opts.progress, manifests.len() + opts.failed.len());
    let mut cards: Vec<Card> = futures::stream::iter(manifests.into_iter().enumerate())
        .map(|(index, m)| {
            let bar = bar.clone();
            async move {
                let card = job_card(store, index, m).await;
                bar.inc(1);
                card
            }
        })
        .buffered(FETCH_CONCURRENCY / 2)
        .collect::<Vec<_>>()
        .await;
    for f in &opts.failed {
        bar.inc(1);
        cards.push(Card {
            index: cards.len(),
            job_id: f.job_id.clone(),
            body: CardBody::Failed {
                code: f.code.clone(),
                reason: f.reason.clone(),
            },
            problems: Vec::new(),
        });
    }
    bar.finish_and_clear();
    for card in &cards {
        tally(&mut summary, card);
    }
    Ok((html::page(&summary, &cards), summary))
}

fn progress_bar(show: bool, len: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} jobs  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Manifests to show: all under `jobs/`, or with `since` the day index
/// from that day on.
async fn read_manifests(store: &Store, opts: &Options) -> Result<Vec<Manifest>, ReportError> {
    let keys: Vec<ObjectKey> = match &opts.since {
        None => store
            .list("jobs/")
            .await?
            .into_iter()
            .filter(|k| k.as_str().ends_with("/manifest.json"))
            .collect(),
        Some(day) => {
            let valid = day.len() == 10
                && time::Date::parse(
                    day,
                    time::macros::format_description!("[year]-[month]-[day]"),
                )
                .is_ok();
            if !valid {
                return Err(ReportError::Since(day.clone()));
            }
            let from = format!("index/dt={day}/");
            store
                .list("index/")
                .await?
                .into_iter()
                .filter(|k| k.as_str() >= from.as_str())
                .filter_map(|k| {
                    let job = k.as_str().rsplit('/').next()?.strip_suffix(".json")?;
                    ObjectKey::parse(&format!("jobs/{job}/manifest.json")).ok()
                })
                .collect()
        }
    };
    let read = futures::stream::iter(keys)
        .map(|key| async move {
            match store.get(&key).await {
                Ok(Some(body)) => Ok(serde_json::from_slice::<Manifest>(&body)
                    .map_err(|e| tracing::warn!(key = %key.as_str(), error = %e, "unreadable manifest skipped"))
                    .ok()),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let mut out = Vec::with_capacity(read.len());
    let mut seen = std::collections::HashSet::new();
    for m in read {
        if let Some(m) = m?
            && seen.insert(m.job_id.clone())
        {
            out.push(m);
        }
    }
    Ok(out)
}

/// A segment's mask as fetched: its kind, whether Kling found it, and for
/// a found one the PNG (or why it could not be read) with whether it is
/// already on the source's grid (an `aligned` mask).
type FetchedMask = (String, bool, Option<(Result<bytes::Bytes, String>, bool)>);

/// Fetch what a manifest names (a missing or unreadable object becomes a
/// problem on the card) and draw the thumbnail and overlays.
async fn job_card(store: &Store, index: usize, m: Manifest) -> Card {
    let (source, masks) = fetch_objects(store, &m).await;
    let record = m.prepared.transforms.clone();
    let on_source = TransformRecord::identity(m.source.width, m.source.height);
    let orientation = m.source.orientation;
    let drawn =
        tokio::task::spawn_blocking(move || draw(source, orientation, masks, &record, &on_source))
            .await;
    // A segment with a problem (a mask of the wrong size) is named on the
    // card, never drawn as if it fitted (see `fetch_objects`).
    let mut problems: Vec<String> = m
        .segments
        .iter()
        .filter_map(|s| Some(format!("{}: {}", s.kind, s.problem.as_ref()?)))
        .collect();
    let (thumb, segments) = match drawn {
        Ok((thumb, segments, mut p)) => {
            problems.append(&mut p);
            (thumb, segments)
        }
        Err(e) => {
            problems.push(format!("drawing failed: {e}"));
            (None, Vec::new())
        }
    };
    Card {
        index,
        job_id: m.job_id.clone(),
        problems,
        body: CardBody::Archived(Box::new(job_view(&m, thumb, segments))),
    }
}

/// The source and each found segment's mask: the mask on the source's own
/// grid when the worker stored one (placed as it is), else Kling's (placed
/// through the transforms).
async fn fetch_objects(
    store: &Store,
    m: &Manifest,
) -> (Result<bytes::Bytes, String>, Vec<FetchedMask>) {
    let fetch = |full: String| async move {
        let key = store
            .relative_key(&full)
            .ok_or_else(|| format!("{full} is outside this archive"))?;
        match store.get(&key).await {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(format!("{full} is missing")),
            Err(e) => Err(format!("{full} cannot be read: {e}")),
        }
    };
    let source = fetch(m.source.key.clone()).await;
    let mut masks = Vec::new();
    for s in &m.segments {
        let png = match (&s.aligned, &s.key, s.is_contain) {
            _ if s.problem.is_some() => None,
            (Some(a), _, true) => Some((fetch(a.key.clone()).await, true)),
            (None, Some(key), true) => Some((fetch(key.clone()).await, false)),
            _ => None,
        };
        masks.push((s.kind.as_str().to_owned(), s.is_contain, png));
    }
    (source, masks)
}

/// The upright thumbnail and each segment's overlay on it, with the
/// problems met on the way (CPU work: run it off the runtime).
fn draw(
    source: Result<bytes::Bytes, String>,
    orientation: u8,
    masks: Vec<FetchedMask>,
    record: &TransformRecord,
    on_source: &TransformRecord,
) -> (Option<pixels::Thumb>, Vec<SegmentView>, Vec<String>) {
    let mut problems = Vec::new();
    let thumb = match source {
        Err(p) => {
            problems.push(p);
            None
        }
        Ok(bytes) => match pixels::thumbnail(&bytes, orientation) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        },
    };
    let mut segments = Vec::new();
    for (kind, found, png) in masks {
        let mut view = SegmentView {
            kind,
            found,
            overlay: None,
            coverage: 0.0,
        };
        match (png, &thumb) {
            (Some((Err(p), _)), _) => problems.push(p),
            (Some((Ok(png), aligned)), Some((_, frame))) => {
                let record = if aligned { on_source } else { record };
                let drawn = pixels::read_mask(&png).and_then(|mask| {
                    let ov = pixels::overlay(&mask, record, frame);
                    view.coverage = pixels::coverage(&ov);
                    pixels::overlay_png(&ov, html::colour(&view.kind), OVERLAY_ALPHA)
                });
                match drawn {
                    Ok(png) => view.overlay = Some(png),
                    Err(e) => problems.push(format!("{}: {e}", view.kind)),
                }
            }
            _ => {}
        }
        segments.push(view);
    }
    (thumb.map(|(t, _)| t), segments, problems)
}

/// What the card says of an archived job: source, what was sent, the
/// transforms, cost and when.
fn job_view(m: &Manifest, thumb: Option<pixels::Thumb>, segments: Vec<SegmentView>) -> JobView {
    JobView {
        thumb,
        segments,
        labels: m
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        source: format!(
            "{} · {} {}×{}{} · {}",
            m.source.uri,
            m.source.format.extension(),
            m.source.width,
            m.source.height,
            if m.source.orientation > 1 {
                format!(" (EXIF {})", m.source.orientation)
            } else {
                String::new()
            },
            human_bytes(m.source.bytes)
        ),
        sent: format!(
            "{} {}×{} · {}{}",
            m.prepared.format.extension(),
            m.prepared.width,
            m.prepared.height,
            human_bytes(m.prepared.bytes),
            if m.prepared.passthrough {
                " (the source, untouched)"
            } else {
                ""
            }
        ),
        transforms: describe_transforms(&m.prepared.transforms.steps),
        cost: if m.reused_recognition {
            format!(
                "0 (reused a recognition of {})",
                units(&m.final_unit_deduction)
            )
        } else {
            units(&m.final_unit_deduction)
        },
        units: if m.reused_recognition {
            0.0
        } else {
            m.final_unit_deduction.trim().parse().unwrap_or(0.0)
        },
        reused: m.reused_recognition,
        request_id: m.request_id.clone(),
        archived_at: m.archived_at.clone(),
        archived_at_shown: readable_time(&m.archived_at),
    }
}

fn tally(s: &mut Summary, card: &Card) {
    s.jobs += 1;
    let outcome = match &card.body {
        CardBody::Failed { .. } => "dead-lettered",
        CardBody::Archived(_) if !card.problems.is_empty() => "incomplete",
        CardBody::Archived(job) if job.reused => "reused",
        CardBody::Archived(_) => "archived",
    };
    *s.outcomes.entry(outcome.to_owned()).or_default() += 1;
    if let CardBody::Archived(job) = &card.body {
        s.cost += job.units;
        let at = &job.archived_at;
        if s.first.as_ref().is_none_or(|f| at < f) {
            s.first = Some(at.clone());
        }
        if s.last.as_ref().is_none_or(|l| at > l) {
            s.last = Some(at.clone());
        }
        for seg in &job.segments {
            s.segments += 1;
            s.segments_found += usize::from(seg.found);
            if seg.overlay.is_some() && !s.kinds.contains(&seg.kind) {
                s.kinds.push(seg.kind.clone());
            }
        }
    }
}

/// "orient (EXIF 6) → resize 240×300 → 300×375 → encode jpeg q90".
pub fn describe_transforms(steps: &[Transform]) -> String {
    if steps.is_empty() {
        return "none (sent as received)".into();
    }
    steps
        .iter()
        .map(|s| match *s {
            Transform::Orient { exif } => format!("orient (EXIF {exif})"),
            Transform::Resize { from, to } => {
                format!("resize {}×{} → {}×{}", from[0], from[1], to[0], to[1])
            }
            Transform::Pad {
                left,
                top,
                right,
                bottom,
                ..
            } => format!("pad l{left} t{top} r{right} b{bottom}"),
            Transform::Encode { format, quality } => match quality {
                Some(q) => format!("encode {} q{q}", format.extension()),
                None => format!("encode {}", format.extension()),
            },
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

/// "1 unit", "2.5 units", as Kling wrote the number.
fn units(deduction: &str) -> String {
    if deduction.trim() == "1" {
        "1 unit".into()
    } else {
        format!("{} units", deduction.trim())
    }
}

/// "2026-11-25 08:51:52 UTC" from RFC 3339 in UTC; anything else as is.
pub fn readable_time(rfc3339: &str) -> String {
    match (rfc3339.get(..10), rfc3339.get(11..19)) {
        (Some(day), Some(clock)) if rfc3339.ends_with('Z') => format!("{day} {clock} UTC"),
        _ => rfc3339.to_owned(),
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        _ => format!("{:.1} MB", b as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::OutputFormat;

    #[test]
    fn transforms_read_as_a_chain() {
        let steps = [
            Transform::Orient { exif: 6 },
            Transform::Resize {
                from: [240, 300],
                to: [300, 375],
            },
            Transform::Encode {
                format: OutputFormat::Jpeg,
                quality: Some(90),
            },
        ];
        assert_eq!(
            describe_transforms(&steps),
            "orient (EXIF 6) → resize 240×300 → 300×375 → encode jpg q90"
        );
        assert_eq!(describe_transforms(&[]), "none (sent as received)");
    }

    #[test]
    fn times_and_units_read_naturally() {
        assert_eq!(
            readable_time("2026-11-25T08:51:52.194096457Z"),
            "2026-11-25 08:51:52 UTC"
        );
        assert_eq!(readable_time("garbage"), "garbage");
        assert_eq!(units("1"), "1 unit");
        assert_eq!(units("2.5"), "2.5 units");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(160_730), "160.7 kB");
        assert_eq!(human_bytes(12_500_000), "12.5 MB");
    }
}
