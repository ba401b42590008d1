//! `worker enqueue`: turn a directory of images, a file of URLs, an NDJSON
//! file of job messages or an `s3://` prefix into job messages, and publish
//! them with publisher confirms.
//!
//! Job ids are derived deterministically when the source does not give one
//! (`f-<sha256 of the file>`, `u-<sha256 of the URL>`, `s-<sha256 of the s3
//! URI>`, `n-<sha256 of the line>`), so running the same enqueue twice
//! publishes the same jobs: the worker acks the second copy at the cost of
//! one HEAD. Every message is checked with the worker's own parser before
//! it is published: what enqueue accepts, the worker accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use sha2::Digest;

use crate::broker::{BrokerError, Topology};
use crate::job::{Job, MAX_BODY_BYTES};

/// Image file extensions a directory source picks up.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Confirms awaited at once; bounds memory and keeps the broker busy.
const IN_FLIGHT_CONFIRMS: usize = 256;

/// Where jobs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Every image file under a directory, recursively, sent inline.
    Dir(PathBuf),
    /// One `https://`, `http://` or `s3://` URL per line; `#` comments.
    Urls(PathBuf),
    /// One job message (JSON) per line; `job_id` optional.
    Ndjson(PathBuf),
    /// Every image object under an S3 prefix, as `s3://` URLs.
    S3 { bucket: String, prefix: String },
}

impl Source {
    /// `s3://…` is a prefix, a directory is a directory, `*.ndjson` /
    /// `*.jsonl` is NDJSON, any other file is a list of URLs.
    pub fn detect(arg: &str) -> Result<Self, EnqueueError> {
        if let Some(rest) = arg.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(EnqueueError::Source(format!("{arg}: no bucket")));
            }
            return Ok(Source::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        let path = PathBuf::from(arg);
        let meta =
            std::fs::metadata(&path).map_err(|e| EnqueueError::Source(format!("{arg}: {e}")))?;
        if meta.is_dir() {
            return Ok(Source::Dir(path));
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("ndjson" | "jsonl") => Ok(Source::Ndjson(path)),
            _ => Ok(Source::Urls(path)),
        }
    }
}

/// One job to publish, before its body is built (directory images are read
/// only when their turn comes).
#[derive(Debug, Clone)]
enum Item {
    File(PathBuf),
    Url(String),
    Line { n: usize, text: String },
}

#[derive(Debug, Clone)]
pub struct Options {
    pub source: Source,
    pub labels: BTreeMap<String, String>,
    pub dry_run: bool,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// What an enqueue did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub published: usize,
    /// Items that could not become a valid job: (what, why).
    pub skipped: Vec<(String, String)>,
    /// The job ids, in publishing order.
    pub job_ids: Vec<String>,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("cannot read the source: {0}")]
    Source(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "RabbitMQ refused or did not confirm a publish: {0}; jobs before it were published, re-run enqueue (it is idempotent)"
    )]
    Publish(String),
}

/// Plan, check and (unless `dry_run`) publish.
pub async fn run(
    opts: &Options,
    topology: &Topology,
    amqp_url: &secrecy::SecretString,
    s3: Option<&aws_sdk_s3::Client>,
) -> Result<Report, EnqueueError> {
    let items = list(&opts.source, s3).await?;
    let bar = progress_bar(items.len() as u64, opts.progress);
    let mut report = Report::default();
    let channel = if opts.dry_run {
        None
    } else {
        let conn = crate::broker::connect(amqp_url, "enqueue").await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::Channel(e.to_string()))?;
        topology.declare(&ch).await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| BrokerError::Channel(e.to_string()))?;
        Some((conn, ch))
    };
    let mut confirms = FuturesUnordered::new();
    for item in items {
        let what = item.describe();
        let (job_id, body) = match build(&item, &opts.labels).await {
            Ok(job) => job,
            Err(why) => {
                bar.println(format!("skipped {what}: {why}"));
                report.skipped.push((what, why));
                bar.inc(1);
                continue;
            }
        };
        if let Some((_, ch)) = &channel {
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(job_id.clone().into());
            let confirm = ch
                .basic_publish(
                    "".into(),
                    topology.queue.clone().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    props,
                )
                .await
                .map_err(|e| EnqueueError::Publish(e.to_string()))?;
            confirms.push(confirm);
            while confirms.len() >= IN_FLIGHT_CONFIRMS {
                settle(confirms.next().await)?;
            }
        }
        report.job_ids.push(job_id);
        report.published += 1;
        bar.inc(1);
    }
    while !confirms.is_empty() {
        settle(confirms.next().await)?;
    }
    bar.finish_and_clear();
    if let Some((conn, _)) = channel {
        let _ = conn.close(200, "enqueue done".into()).await;
    }
    Ok(report)
}

fn settle(confirm: Option<Result<lapin::Confirmation, lapin::Error>>) -> Result<(), EnqueueError> {
    match confirm {
        Some(Ok(c)) => {
            if c.is_ack() && c.take_message().is_none() {
                Ok(())
            } else {
                Err(EnqueueError::Publish(
                    "nacked or returned (queue full or missing)".into(),
                ))
            }
        }
        Some(Err(e)) => Err(EnqueueError::Publish(e.to_string())),
        None => Ok(()),
    }
}

fn progress_bar(len: u64, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} jobs  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

impl Item {
    fn describe(&self) -> String {
        match self {
            Item::File(p) => p.display().to_string(),
            Item::Url(u) => match url::Url::parse(u) {
                Ok(url) => crate::net::redact_url(&url),
                Err(_) => u.chars().take(80).collect(),
            },
            Item::Line { n, .. } => format!("line {n}"),
        }
    }
}

/// Everything to publish, in a stable order.
async fn list(source: &Source, s3: Option<&aws_sdk_s3::Client>) -> Result<Vec<Item>, EnqueueError> {
    match source {
        Source::Dir(dir) => {
            let mut files = Vec::new();
            walk(dir, &mut files)
                .map_err(|e| EnqueueError::Source(format!("{}: {e}", dir.display())))?;
            files.sort();
            Ok(files.into_iter().map(Item::File).collect())
        }
        Source::Urls(path) => Ok(read_lines(path)?
            .into_iter()
            .map(|(_, l)| l.trim().to_owned())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(Item::Url)
            .collect()),
        Source::Ndjson(path) => Ok(read_lines(path)?
            .into_iter()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, text)| Item::Line { n, text })
            .collect()),
        Source::S3 { bucket, prefix } => {
            let s3 = s3.ok_or_else(|| EnqueueError::Source("no S3 client".into()))?;
            let mut keys = Vec::new();
            let mut pages = s3
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| {
                    EnqueueError::Source(format!(
                        "listing s3://{bucket}/{prefix}: {}",
                        aws_sdk_s3::error::DisplayErrorContext(&e)
                    ))
                })?;
                for obj in page.contents() {
                    if let Some(key) = obj.key().filter(|k| is_image_name(k)) {
                        keys.push(Item::Url(format!("s3://{bucket}/{key}")));
                    }
                }
            }
            Ok(keys)
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let path = entry.path();
        if ty.is_dir() {
            walk(&path, out)?;
        } else if ty.is_file() && is_image_name(&path.to_string_lossy()) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_image_name(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, EnqueueError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EnqueueError::Source(format!("{}: {e}", path.display())))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect())
}

fn derive_id(prefix: &str, identity: &[u8]) -> String {
    let digest = sha2::Sha256::digest(identity);
    format!("{prefix}-{}", &hex::encode(digest)[..32])
}

/// Build the job message for one item and check it with the worker's parser.
async fn build(
    item: &Item,
    labels: &BTreeMap<String, String>,
) -> Result<(String, Vec<u8>), String> {
    let mut msg = match item {
        Item::File(path) => {
            let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
            // base64 grows by 4/3; leave room for the envelope.
            if bytes.len() / 3 * 4 + 4096 > MAX_BODY_BYTES {
                return Err(format!(
                    "{} bytes is too big to send inline (limit {} MiB of message); put it behind a URL or in S3",
                    bytes.len(),
                    MAX_BODY_BYTES / 1024 / 1024
                ));
            }
            use base64::Engine as _;
            serde_json::json!({
                "job_id": derive_id("f", &sha2::Sha256::digest(&bytes)),
                "image_base64": base64::engine::general_purpose::STANDARD.encode(&bytes),
            })
        }
        Item::Url(url) => {
            let prefix = if url.starts_with("s3://") { "s" } else { "u" };
            serde_json::json!({ "job_id": derive_id(prefix, url.as_bytes()), "image_url": url })
        }
        Item::Line { text, .. } => {
            let mut v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
            let obj = v.as_object_mut().ok_or("not a JSON object")?;
            if !obj.contains_key("job_id") {
                obj.insert(
                    "job_id".into(),
                    derive_id("n", text.trim().as_bytes()).into(),
                );
            }
            v
        }
    };
    if !labels.is_empty() {
        let obj = msg.as_object_mut().ok_or("not a JSON object")?;
        let entry = obj
            .entry("labels")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        let map = entry.as_object_mut().ok_or("labels is not an object")?;
        for (k, v) in labels {
            map.entry(k.clone()).or_insert_with(|| v.clone().into());
        }
    }
    let body = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
    let job = Job::parse(&body).map_err(|e| format!("the worker would refuse it: {e}"))?;
    Ok((job.id.to_string(), body))
}

/// Print the report the way a terminal user reads it.
pub fn summary(report: &Report, queue: &str, dry_run: bool, took: Duration) -> String {
    let rate = report.published as f64 / took.as_secs_f64().max(1e-3);
    let verb = if dry_run {
        "would publish"
    } else {
        "published"
    };
    let mut out = format!(
        "{verb} {} jobs to {queue} in {:.1}s ({rate:.0} jobs/s)",
        report.published,
        took.as_secs_f64()
    );
    if !report.skipped.is_empty() {
        out.push_str(&format!("; skipped {}:", report.skipped.len()));
        for (what, why) in report.skipped.iter().take(20) {
            out.push_str(&format!("\n  {what}: {why}"));
        }
    }
    if dry_run {
        for id in report.job_ids.iter().take(5) {
            out.push_str(&format!("\n  {id}"));
        }
        if report.job_ids.len() > 5 {
            out.push_str("\n  …");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_detected() {
        assert_eq!(
            Source::detect("s3://b/p/q").unwrap(),
            Source::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert!(Source::detect("s3:///x").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Source::detect(dir.path().to_str().unwrap()).unwrap(),
            Source::Dir(dir.path().into())
        );
        let nd = dir.path().join("jobs.ndjson");
        std::fs::write(&nd, "").unwrap();
        assert!(matches!(
            Source::detect(nd.to_str().unwrap()).unwrap(),
            Source::Ndjson(_)
        ));
        let urls = dir.path().join("urls.txt");
        std::fs::write(&urls, "").unwrap();
        assert!(matches!(
            Source::detect(urls.to_str().unwrap()).unwrap(),
            Source::Urls(_)
        ));
        assert!(Source::detect("/no/such/file").is_err());
    }

    #[tokio::test]
    async fn ids_are_deterministic_and_messages_pass_the_worker_parser() {
        let labels = BTreeMap::from([("batch".to_owned(), "b1".to_owned())]);
        let item = Item::Url("https://cdn.example.com/a.jpg".into());
        let (a, body) = build(&item, &labels).await.unwrap();
        let (b, _) = build(&item, &labels).await.unwrap();
        assert_eq!(a, b);
        assert!(a.starts_with("u-") && a.len() == 34, "{a}");
        let job = Job::parse(&body).unwrap();
        assert_eq!(job.labels.get("batch").map(String::as_str), Some("b1"));

        let line = Item::Line {
            n: 1,
            text: r#"{"job_id":"given","image_url":"s3://b/k.png"}"#.into(),
        };
        assert_eq!(build(&line, &BTreeMap::new()).await.unwrap().0, "given");
        let line = Item::Line {
            n: 2,
            text: r#"{"image_url":"s3://b/k.png"}"#.into(),
        };
        assert!(
            build(&line, &BTreeMap::new())
                .await
                .unwrap()
                .0
                .starts_with("n-")
        );
        let bad = Item::Line {
            n: 3,
            text: r#"{"image_url":"ftp://x/y"}"#.into(),
        };
        let why = build(&bad, &BTreeMap::new()).await.unwrap_err();
        assert!(why.contains("worker would refuse"), "{why}");
        let bad = Item::Url("not a url".into());
        assert!(build(&bad, &BTreeMap::new()).await.is_err());
    }

    #[test]
    fn image_names_by_extension() {
        assert!(is_image_name("a/b/c.JPG"));
        assert!(is_image_name("x.webp"));
        assert!(!is_image_name("notes.txt"));
        assert!(!is_image_name("noext"));
    }
}
