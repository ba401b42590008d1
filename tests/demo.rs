//! `worker demo` and `worker report` as a newcomer runs them: the real
//! binary, real RabbitMQ, a temp directory or the in-process S3 server as
//! the archive. The demo archives where `--archive` / `ARCHIVE_URL` says,
//! and never deletes what it did not make.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{S3_AK, S3_SK, amqp_url, create_bucket, start_s3, unique};

/// The binary with a clean environment: RabbitMQ and nothing else.
fn worker(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", amqp_url())
        .args(args);
    cmd
}

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("worker runs"))
        .await
        .expect("join")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `jobs/<id>/manifest.json` under `dir`.
fn manifests(dir: &Path) -> Vec<String> {
    let Ok(jobs) = std::fs::read_dir(dir.join("jobs")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = jobs
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("manifest.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// The demo's six samples that archive (the seventh is broken).
const ARCHIVED: [&str; 6] = [
    "demo-in-spec-jpeg",
    "demo-in-spec-png",
    "demo-panorama",
    "demo-rotated",
    "demo-thumbnail",
    "demo-webp",
];

#[tokio::test]
async fn demo_out_refuses_a_directory_holding_a_users_file() {
    let tmp = tempfile::tempdir().unwrap();
    let photo: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    std::fs::write(tmp.path().join("holiday.jpg"), &photo).unwrap();
    let dir = tmp.path().to_str().unwrap();

    let out = run(worker(&["demo", "--out", dir, "--latency-ms", "0"])).await;
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("not empty"), "says why: {t}");
    assert!(t.contains("--archive"), "says what to do: {t}");
    assert_eq!(
        std::fs::read(tmp.path().join("holiday.jpg")).unwrap(),
        photo,
        "the user's file is untouched, byte for byte"
    );
    let entries: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "nothing was added either");
}

#[tokio::test]
async fn demo_archives_under_archive_url_and_reruns_keeping_a_users_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-demo");

    let mut cmd = worker(&["demo", "--latency-ms", "0"]);
    cmd.env("ARCHIVE_URL", &dir).current_dir(tmp.path());
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(manifests(&dir), ARCHIVED, "{}", text(&out));
    assert!(dir.join("report.html").is_file());
    assert!(dir.join("kling-demo.json").is_file());
    assert!(
        !tmp.path().join("demo-archive").exists(),
        "nothing went to the default"
    );

    // A second run in the same archive clears only its own objects.
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let mut cmd = worker(&["demo", "--latency-ms", "0", "--archive"]);
    cmd.arg(&dir);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(manifests(&dir), ARCHIVED, "{}", text(&out));
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
}

#[tokio::test]
async fn demo_archives_into_s3_and_touches_nothing_else_in_the_bucket() {
    let s3 = start_s3().await;
    let bucket = unique("d");
    create_bucket(&s3.client, &bucket).await;
    let put = |key: &'static str| {
        s3.client
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(b"someone else's".to_vec().into())
            .send()
    };
    put("other/keep.txt").await.unwrap();
    put("demo2/keep.txt").await.unwrap();

    let demo = |extra: &[&str]| {
        let mut cmd = worker(&["demo", "--latency-ms", "0", "--s3-force-path-style"]);
        cmd.args(extra)
            .env("AWS_ENDPOINT_URL", &s3.endpoint)
            .env("AWS_ACCESS_KEY_ID", S3_AK)
            .env("AWS_SECRET_ACCESS_KEY", S3_SK)
            .env("AWS_REGION", "us-east-1");
        cmd
    };
    let url = format!("s3://{bucket}/demo");
    let keys = || async {
        let listed = s3
            .client
            .list_objects_v2()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        let mut keys: Vec<String> = listed
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect();
        keys.sort();
        keys
    };

    let mut cmd = demo(&[]);
    cmd.env("ARCHIVE_URL", &url);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let manifests: Vec<String> = keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with("demo/jobs/") && k.ends_with("/manifest.json"))
        .collect();
    let expected: Vec<String> = ARCHIVED
        .iter()
        .map(|j| format!("demo/jobs/{j}/manifest.json"))
        .collect();
    assert_eq!(manifests, expected, "{}", text(&out));

    // Again, with a user's object under the demo's prefix: it stays, and
    // so does everything outside the prefix.
    put("demo/user/keep.txt").await.unwrap();
    let out = run(demo(&["--archive", &url])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = keys().await;
    for kept in ["other/keep.txt", "demo2/keep.txt", "demo/user/keep.txt"] {
        assert!(after.iter().any(|k| k == kept), "{kept} kept: {after:?}");
    }

    // A prefix that holds someone else's objects and no marker: refused.
    let out = run(demo(&["--archive", &format!("s3://{bucket}/other")])).await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("not empty"), "{}", text(&out));
    let listed = keys().await;
    let under_other: Vec<_> = listed.iter().filter(|k| k.starts_with("other/")).collect();
    assert_eq!(under_other, ["other/keep.txt"], "nothing added or removed");
}

#[tokio::test]
async fn report_on_an_archive_without_manifests_fails_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("empty");
    std::fs::create_dir(&archive).unwrap();
    let page = tmp.path().join("report.html");
    let mut cmd = worker(&["report", "--out"]);
    cmd.arg(&page).arg("--archive").arg(&archive);
    let out = run(cmd).await;
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("no manifests under"), "{t}");
    assert!(!page.exists(), "no empty page written");
}
