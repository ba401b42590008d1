//! `worker report` against real archives (the S3 server and a local
//! directory), rendered in headless Chromium: the page loads, shows one
//! card per job, and logs no console error. The browser is Debian's
//! `chromium` (tests/run.sh installs it where missing); a missing browser
//! fails the test, it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Backend, TestEnv, b64};
use kling_archiver::broker::JobEvent;
use kling_archiver::pipeline::Hooks;
use kling_archiver::report;

/// Where screenshots are kept after the run (for people to look at).
fn shots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-shots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chromium() -> PathBuf {
    let candidates = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];
    let found = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(candidates.iter().map(PathBuf::from))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("Chromium is required for the report tests: `apt-get install chromium` (tests/run.sh does it)")
    })
}

/// What a headless Chromium made of a page.
struct Rendered {
    /// The DOM after scripts ran.
    dom: String,
    /// Every console message and uncaught exception. Chromium's stderr log
    /// does not say a message's level, so the report is held to the
    /// stricter rule: it logs nothing at all.
    console: Vec<String>,
}

/// Load `page` in headless Chromium, screenshot it to `shot`, and return
/// the DOM after scripts ran and every console error.
///
/// Console output: with `--enable-logging=stderr` Chromium logs each
/// console message and uncaught exception to stderr as
/// `[…:INFO:CONSOLE:<line>] "<text>", source: <url>`. A negative control
/// below proves the detector sees both.
fn render(page: &Path, shot: &Path) -> Rendered {
    let url = format!("file://{}", page.display());
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
                "--window-size=1280,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let shot_run = run(&[&format!("--screenshot={}", shot.display())]);
    let dom_run = run(&["--dump-dom"]);
    let mut console = Vec::new();
    for out in [&shot_run, &dom_run] {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            if line.contains(":CONSOLE") || line.contains("Uncaught") {
                console.push(line.to_owned());
            }
        }
    }
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    Rendered {
        dom: String::from_utf8_lossy(&dom_run.stdout).into_owned(),
        console,
    }
}

fn cards(dom: &str) -> usize {
    dom.matches("<article class=\"card").count()
}

#[test]
fn the_console_error_detector_sees_errors_and_exceptions() {
    // The assertion "no console errors" means something only if a page
    // with errors is caught.
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("bad.html");
    std::fs::write(
        &page,
        "<!doctype html><html><body><article class=\"card\">x</article>\
         <script>console.error('deliberate console error'); undefined_fn();</script></body></html>",
    )
    .unwrap();
    let r = render(&page, &shots_dir().join("control.png"));
    assert_eq!(cards(&r.dom), 1);
    let all = r.console.join("\n");
    assert!(all.contains("deliberate console error"), "{all}");
    assert!(all.contains("undefined_fn"), "{all}");
}

/// Archive a mix of jobs (in spec, padded panorama, EXIF-rotated, upscaled
/// thumbnail, one reusing another's recognition, one broken), then return
/// the env and what settled.
async fn archive_a_mix(backend: Backend) -> (TestEnv, Vec<JobEvent>) {
    use kling_archiver::demo::{scene, with_exif_orientation};
    let env = TestEnv::new(backend).await;
    let jpeg = |img: &image::RgbImage| common::encode(img, image::ImageFormat::Jpeg);
    let rotated = with_exif_orientation(
        &jpeg(
            &image::DynamicImage::ImageRgb8(scene(480, 640, 6))
                .rotate270()
                .into_rgb8(),
        ),
        6,
    );
    let jobs = [
        ("r-spec", jpeg(&scene(800, 1000, 1))),
        ("r-pano", jpeg(&scene(2000, 500, 4))),
        ("r-rot", rotated),
        (
            "r-tiny",
            common::encode(&scene(200, 150, 3), image::ImageFormat::Png),
        ),
        ("r-bad", b"\xff\xd8\xff\xe0 truncated".to_vec()),
        // The first image again, once it is archived: reuses its recognition.
        ("r-again", jpeg(&scene(800, 1000, 1))),
    ];
    let mut w = env.start_worker(env.config(), Hooks::default());
    let publish = |id: &str, bytes: &[u8]| {
        env.publish_json(serde_json::json!({
            "job_id": id,
            "image_base64": b64(bytes),
            "labels": {"batch": "report-test", "note": "<b>not markup</b>"},
        }))
    };
    let (again, first) = jobs.split_last().unwrap();
    for (id, bytes) in first {
        publish(id, bytes).await;
    }
    let mut events = w.settled(first.len(), Duration::from_secs(120)).await;
    publish(again.0, &again.1).await;
    events.extend(w.settled(1, Duration::from_secs(60)).await);
    w.stop().await;
    (env, events)
}

async fn report_renders(backend: Backend, name: &str) {
    let (env, events) = archive_a_mix(backend).await;
    let archived = events
        .iter()
        .filter(|e| matches!(e, JobEvent::Archived { .. }))
        .count();
    assert_eq!(archived, 5, "{events:?}");
    let failed: Vec<report::FailedJob> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::DeadLettered {
                job_id: Some(id),
                code,
                reason,
                ..
            } => Some(report::FailedJob {
                job_id: id.clone(),
                code: (*code).to_owned(),
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    let opts = report::Options {
        failed,
        ..report::Options::default()
    };
    let written = report::write(&env.store(), &opts, &page).await.unwrap();
    let s = &written.summary;
    assert_eq!(s.jobs, 6);
    assert_eq!(s.outcomes.get("archived"), Some(&4), "{:?}", s.outcomes);
    assert_eq!(s.outcomes.get("reused"), Some(&1), "{:?}", s.outcomes);
    assert_eq!(
        s.outcomes.get("dead-lettered"),
        Some(&1),
        "{:?}",
        s.outcomes
    );
    assert_eq!(s.cost, 4.0, "one billed call per distinct image");
    assert!(s.kinds.iter().any(|k| k == "object_seg"), "{:?}", s.kinds);

    let html = std::fs::read_to_string(&page).unwrap();
    // Self-contained: no fetch of anything, anywhere.
    for needle in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "src=\"//",
    ] {
        assert!(!html.contains(needle), "external reference {needle}");
    }
    assert!(
        html.contains("&lt;b&gt;not markup&lt;/b&gt;"),
        "labels are escaped"
    );
    assert!(html.contains("orient (EXIF 6)"), "the rotation is listed");
    assert!(html.contains("pad l0 t"), "the padding is listed");

    let shot = shots_dir().join(format!("{name}.png"));
    let r = render(&page, &shot);
    assert_eq!(cards(&r.dom), 6, "one card per job");
    assert!(r.console.is_empty(), "{:#?}", r.console);
    // The script ran: it filled the toolbar with per-type buttons.
    assert!(
        r.dom.contains("Hide all object_seg"),
        "the toolbar script did not run"
    );
    let png = image::open(&shot).unwrap().into_rgb8();
    assert_eq!(png.dimensions(), (1280, 1400));
    // Not a blank page: many distinct colours (thumbnails and overlays).
    let colours: std::collections::HashSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 500, "{} colours", colours.len());
    eprintln!("screenshot: {}", shot.display());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_of_an_s3_archive_renders_in_chromium() {
    report_renders(Backend::S3, "s3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_of_a_local_archive_renders_in_chromium() {
    report_renders(Backend::Local, "local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn since_and_limit_select_jobs() {
    let (env, _) = archive_a_mix(Backend::Local).await;
    let store = env.store();
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let (_, s) = report::render(
        &store,
        &report::Options {
            since: Some(today),
            limit: Some(2),
            ..report::Options::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((s.jobs, s.jobs_not_shown), (2, 3));
    let (_, s) = report::render(
        &store,
        &report::Options {
            since: Some("2999-01-01".into()),
            ..report::Options::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(s.jobs, 0);
    let bad = report::render(
        &store,
        &report::Options {
            since: Some("yesterday".into()),
            ..report::Options::default()
        },
    )
    .await;
    assert!(matches!(bad, Err(report::ReportError::Since(_))));
    env.cleanup().await;
}
