//! Hostile input through the real worker: malformed and oversized
//! messages, hostile job ids and labels, bombs, polyglots, a redirect to a
//! private address, a server that streams forever and one that never
//! finishes. Every one is dead-lettered with its own reason, nothing
//! reaches Kling, the process's peak memory stays bounded, and the worker
//! is still there to archive a good job at the end.
//!
//! And hostile *billed* answers from Kling (10,000 segments, masks of the
//! wrong size): archived, never paid for twice, with the problem recorded
//! and the work bounded.

mod common;

use std::time::Duration;

use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use common::{Backend, TestEnv, b64, jpeg};
use kling_archiver::archive::{Sha256, layout};
use kling_archiver::broker::JobEvent;
use kling_archiver::job::JobId;
use kling_archiver::kling::answer::MAX_SEGMENTS;
use kling_archiver::pipeline::Hooks;
use kling_archiver::sim::Fault;

/// Peak resident memory of this process so far, in MB.
fn peak_rss_mb() -> f64 {
    common::rss::vm_hwm_kb() as f64 / 1024.0
}

/// An in-spec PNG with an iCCP chunk that inflates to 1 GiB, before the
/// pixels: a decoder that reads metadata without a limit is the victim.
fn png_chunk_bomb() -> Vec<u8> {
    use std::io::Write as _;
    let png = common::png(400, 400);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        z.write_all(&zeros).unwrap();
    }
    let mut iccp = b"bomb\0\0".to_vec();
    iccp.extend_from_slice(&z.finish().unwrap());
    // Signature (8) + IHDR chunk (25): insert right after.
    let mut out = png[..33].to_vec();
    out.extend_from_slice(&common::png_chunk(b"iCCP", &iccp));
    out.extend_from_slice(&png[33..]);
    out
}

/// Header of a 16x16 GIF followed by JavaScript (a GIF/JS polyglot).
fn gif_js_polyglot() -> Vec<u8> {
    b"GIF89a\x10\x00\x10\x00\x00\x00\x00/*\x00*/=1;alert(document.domain)//".to_vec()
}

/// A hostile HTTP server on loopback: redirects to private addresses and
/// to `file:`, an endless body, a body that never finishes.
async fn hostile_server() -> String {
    let forever = || async {
        let chunk = bytes::Bytes::from(vec![0xFFu8; 1 << 16]);
        let stream = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
        axum::body::Body::from_stream(stream).into_response()
    };
    let drip = || async {
        let stream = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"\xFF")),
                (),
            ))
        });
        axum::body::Body::from_stream(stream).into_response()
    };
    let router = axum::Router::new()
        .route(
            "/to-metadata",
            get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
        )
        .route(
            "/to-loopback",
            get(|| async { Redirect::temporary("http://127.0.0.2:9/secret.jpg") }),
        )
        .route(
            "/to-file",
            get(|| async { Redirect::temporary("file:///etc/passwd") }),
        )
        .route("/forever.jpg", get(forever))
        .route("/drip.jpg", get(drip));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_is_dead_lettered_with_a_reason_and_the_worker_carries_on() {
    let env = TestEnv::new(Backend::Local).await;
    let http = hostile_server().await;
    let mut cfg = env.config();
    // Only the hostile server itself is reachable: not the rest of loopback,
    // not private ranges, not cloud metadata.
    cfg.fetch.allow_private = false;
    cfg.fetch.allow_nets = vec!["127.0.0.1/32".parse().unwrap()];
    cfg.fetch.timeout = Duration::from_secs(2);
    let rss_before = peak_rss_mb();
    let mut w = env.start_worker(cfg, Hooks::default());

    let job = |id: &str, source: serde_json::Value| {
        let mut v = serde_json::json!({ "job_id": id });
        v.as_object_mut()
            .unwrap()
            .extend(source.as_object().unwrap().clone());
        v
    };
    let inline = |bytes: &[u8]| serde_json::json!({ "image_base64": b64(bytes) });
    let url = |path: &str| serde_json::json!({ "image_url": format!("{http}{path}") });

    // (job id in the message, expected dead-letter code)
    let mut expected: Vec<(Option<&str>, &str)> = Vec::new();
    let mut publish_raw = Vec::new();

    // Messages.
    publish_raw.push(b"\x00\x01 not json at all".to_vec());
    expected.push((None, "job_malformed"));
    publish_raw.push(br#"{"job_id": 5, "image_url": ["https://x.test/a.jpg"]}"#.to_vec());
    expected.push((None, "job_malformed"));
    let huge = format!(
        r#"{{"job_id":"h-oversize","image_base64":"{}"}}"#,
        "A".repeat(49 * 1024 * 1024)
    );
    publish_raw.push(huge.into_bytes());
    // The id is salvaged from the first bytes, so the dead letter names it.
    expected.push((Some("h-oversize"), "job_too_large"));
    for id in ["../x", "a/b", "", "%2e%2e", "x\u{0}y"] {
        let body = serde_json::json!({"job_id": id, "image_base64": b64(&jpeg(400, 400))});
        publish_raw.push(body.to_string().into_bytes());
        expected.push((None, "job_invalid_id"));
    }
    let long_id = "x".repeat(300);
    publish_raw.push(
        serde_json::json!({"job_id": long_id, "image_base64": b64(&jpeg(400, 400))})
            .to_string()
            .into_bytes(),
    );
    expected.push((None, "job_invalid_id"));
    let many: serde_json::Map<String, serde_json::Value> = (0..500)
        .map(|i| (format!("k{i}"), serde_json::Value::from("v")))
        .collect();
    let mut labels_job = job("h-labels", inline(&jpeg(400, 400)));
    labels_job["labels"] = serde_json::Value::Object(many);
    publish_raw.push(labels_job.to_string().into_bytes());
    expected.push((Some("h-labels"), "job_invalid_labels"));
    let mut long_label = job("h-label-len", inline(&jpeg(400, 400)));
    long_label["labels"] = serde_json::json!({"k": "v".repeat(100_000)});
    publish_raw.push(long_label.to_string().into_bytes());
    expected.push((Some("h-label-len"), "job_invalid_labels"));

    // Images.
    let mut truncated = jpeg(640, 480);
    truncated.truncate(truncated.len() / 3);
    let images: Vec<(&str, Vec<u8>, &str)> = vec![
        ("h-trunc", truncated, "image_truncated"),
        (
            "h-garbage",
            b"\x89PNG\r\n\x1a\n\x00\x00garbage".to_vec(),
            "image_undecodable",
        ),
        (
            "h-bomb",
            common::dimension_bomb_png(),
            "image_too_many_pixels",
        ),
        ("h-chunk-bomb", png_chunk_bomb(), "image_resource_limit"),
        ("h-polyglot", gif_js_polyglot(), "image_undecodable"),
        (
            "h-html",
            b"<html><script>alert(1)</script></html>".to_vec(),
            "image_format_unknown",
        ),
    ];
    for (id, bytes, code) in &images {
        publish_raw.push(job(id, inline(bytes)).to_string().into_bytes());
        expected.push((Some(id), code));
    }
    // Sources.
    for (id, path, code) in [
        ("h-to-metadata", "/to-metadata", "source_forbidden_address"),
        ("h-to-loopback", "/to-loopback", "source_forbidden_address"),
        ("h-to-file", "/to-file", "source_redirect_refused"),
        ("h-forever", "/forever.jpg", "source_too_large"),
    ] {
        publish_raw.push(job(id, url(path)).to_string().into_bytes());
        expected.push((Some(id), code));
    }
    let direct = serde_json::json!({"job_id": "h-direct", "image_url": "http://10.0.0.1/x.jpg"});
    publish_raw.push(direct.to_string().into_bytes());
    expected.push((Some("h-direct"), "source_forbidden_address"));

    for body in &publish_raw {
        env.publish(body).await;
    }
    let events = w.settled(expected.len(), Duration::from_secs(180)).await;
    assert!(
        events
            .iter()
            .all(|e| matches!(e, JobEvent::DeadLettered { .. })),
        "{events:?}"
    );

    // A source that never finishes: a timeout, retried, then dead-lettered
    // once its deliveries are spent (it never blocks other jobs).
    env.publish_json(job("h-drip", url("/drip.jpg"))).await;
    // And the worker is still there for good work.
    env.publish_json(job("h-good", inline(&jpeg(500, 400))))
        .await;
    let mut rest = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while rest.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "{rest:?}");
        for e in w.settled(1, Duration::from_secs(120)).await {
            if !matches!(e, JobEvent::Requeued { .. }) {
                rest.push(e);
            }
        }
    }
    assert!(
        rest.iter()
            .any(|e| matches!(e, JobEvent::Archived { job_id, .. } if job_id == "h-good")),
        "{rest:?}"
    );
    w.stop().await;

    let dead = env.drain_dead_letters().await;
    let mut problems = Vec::new();
    let mut unnamed: Vec<&str> = dead
        .iter()
        .filter(|d| d.job_id.is_none())
        .filter_map(|d| d.code.as_deref())
        .collect();
    for (id, code) in &expected {
        match id {
            Some(id) => match dead.iter().find(|d| d.job_id.as_deref() == Some(*id)) {
                Some(d) if d.code.as_deref() == Some(*code) => {
                    if d.reason.as_deref().is_none_or(|r| r.len() < 15) {
                        problems.push(format!("{id}: no usable reason: {d:?}"));
                    }
                }
                other => problems.push(format!(
                    "{id}: expected {code}, got {:?}",
                    other.map(|d| (&d.code, &d.reason))
                )),
            },
            None => match unnamed.iter().position(|c| c == code) {
                Some(i) => {
                    unnamed.swap_remove(i);
                }
                None => problems.push(format!("no dead letter with {code} among {unnamed:?}")),
            },
        }
    }
    match dead.iter().find(|d| d.job_id.as_deref() == Some("h-drip")) {
        Some(d)
            if d.code
                .as_deref()
                .is_some_and(|c| c.starts_with("source_timeout") || c == "delivery_limit") => {}
        other => problems.push(format!("h-drip: expected a timeout, got {other:?}")),
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        env.sim.stats().recognize_calls,
        1,
        "only the good job reached Kling"
    );
    let grew = peak_rss_mb() - rss_before;
    eprintln!("peak RSS grew by {grew:.0} MB over the hostile batch");
    assert!(grew < 768.0, "peak RSS grew by {grew:.0} MB");
    env.cleanup().await;
}

/// A job's manifest, checked against the schema.
async fn manifest(env: &TestEnv, id: &str) -> serde_json::Value {
    let key = layout::manifest(&JobId::parse(id).unwrap());
    let body = env.store().get(&key).await.unwrap().expect("manifest");
    common::assert_manifest_schema(&body);
    serde_json::from_slice(&body).unwrap()
}

/// Kling bills an answer listing 10,000 segments (about 15,000 fit in its
/// 1 MiB): the job is archived, the raw answer with all 10,000 is kept, the
/// manifest names only the first MAX_SEGMENTS and says why, and no more
/// than MAX_SEGMENTS PNGs are downloaded. A second job on the same image
/// pays nothing and downloads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_with_10000_segments_is_archived_capped_with_its_problem() {
    let env = TestEnv::new(Backend::S3).await;
    env.sim.faults().push(Fault::ManySegments(10_000));
    let img = jpeg(500, 400);
    let mut w = env.start_worker(env.config(), Hooks::default());
    env.publish_json(serde_json::json!({"job_id": "many-1", "image_base64": b64(&img)}))
        .await;
    let events = w.settled(1, Duration::from_secs(120)).await;
    assert!(matches!(events[0], JobEvent::Archived { .. }), "{events:?}");
    let stats = env.sim.stats();
    assert_eq!(stats.billed_calls, 1);
    assert!(
        (1..=MAX_SEGMENTS as u64).contains(&stats.cdn_downloads),
        "downloads: {}",
        stats.cdn_downloads
    );

    let record = env
        .store()
        .get(&layout::recognition(&Sha256::of(&img)))
        .await
        .unwrap()
        .expect("the billed answer is kept");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let raw = &record["recognition"]["raw"]["data"]["task_result"]["images"];
    assert_eq!(raw.as_array().unwrap().len(), 10_000, "nothing lost");

    let m = manifest(&env, "many-1").await;
    let segs = m["segments"].as_array().unwrap();
    assert_eq!(segs.len(), MAX_SEGMENTS);
    let problem = m["problem"].as_str().unwrap();
    assert!(
        problem.starts_with("too_many_segments") && problem.contains("10000"),
        "{problem}"
    );
    let stored = segs.iter().filter(|s| s.get("key").is_some()).count();
    assert_eq!(stored as u64, stats.cdn_downloads, "{m}");

    // The same image again: the record is reused, the segments found stored.
    env.publish_json(serde_json::json!({"job_id": "many-2", "image_base64": b64(&img)}))
        .await;
    let events = w.settled(1, Duration::from_secs(120)).await;
    assert!(matches!(events[0], JobEvent::Archived { .. }), "{events:?}");
    let again = env.sim.stats();
    assert_eq!(again.billed_calls, 1);
    assert_eq!(again.cdn_downloads, stats.cdn_downloads);
    assert_eq!(manifest(&env, "many-2").await["segments"], m["segments"]);
    w.stop().await;
    env.cleanup().await;
}

/// Kling bills masks half the size of the image it was sent: each is kept
/// (billed bytes) with a `size_mismatch` problem naming both sizes, and
/// none is moved onto the source grid as if it matched, on the first
/// attempt or when another job finds them stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn masks_of_the_wrong_size_are_kept_with_a_size_mismatch_and_not_aligned() {
    let env = TestEnv::new(Backend::Local).await;
    env.sim.faults().push(Fault::WrongSizeMasks);
    // Under 300 px: resized up for Kling, so its masks would be aligned.
    let img = jpeg(250, 200);
    let mut w = env.start_worker(env.config(), Hooks::default());
    for id in ["small-1", "small-2"] {
        env.publish_json(serde_json::json!({"job_id": id, "image_base64": b64(&img)}))
            .await;
        let events = w.settled(1, Duration::from_secs(120)).await;
        assert!(matches!(events[0], JobEvent::Archived { .. }), "{events:?}");
    }
    assert_eq!(env.sim.stats().billed_calls, 1);
    for id in ["small-1", "small-2"] {
        let m = manifest(&env, id).await;
        assert_eq!(m["source_masks"]["status"], "aligned", "{m}");
        let (pw, ph) = (
            m["prepared"]["width"].as_u64().unwrap(),
            m["prepared"]["height"].as_u64().unwrap(),
        );
        let found: Vec<_> = m["segments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s.get("key").is_some())
            .collect();
        assert!(!found.is_empty(), "{m}");
        for s in found {
            let (w, h) = (s["width"].as_u64().unwrap(), s["height"].as_u64().unwrap());
            assert_eq!((w, h), (pw / 2, ph / 2), "{s}");
            assert_eq!(
                s["problem"].as_str().unwrap(),
                format!("size_mismatch: {w}x{h}, prepared image is {pw}x{ph}"),
                "{s}"
            );
            assert!(s.get("aligned").is_none(), "aligned as if it matched: {s}");
        }
    }
    w.stop().await;
    env.cleanup().await;
}

/// Job ids holding the local store's own names (`.kling-tmp-`,
/// `.kling-meta`) are dead-lettered at parse with `job_invalid_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_ids_holding_the_archives_own_names_are_dead_lettered() {
    let env = TestEnv::new(Backend::Local).await;
    let mut w = env.start_worker(env.config(), Hooks::default());
    for id in ["x.kling-tmp-0123", "y.kling-meta"] {
        env.publish_json(serde_json::json!({"job_id": id, "image_base64": b64(&jpeg(400, 400))}))
            .await;
    }
    for e in w.settled(2, Duration::from_secs(60)).await {
        match e {
            JobEvent::DeadLettered { code, reason, .. } => {
                assert_eq!(code, "job_invalid_id");
                assert!(reason.contains("reserved"), "{reason}");
            }
            e => panic!("{e:?}"),
        }
    }
    assert_eq!(env.sim.stats().recognize_calls, 0);
    w.stop().await;
    env.cleanup().await;
}
