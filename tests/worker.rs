//! End to end: RabbitMQ → fetch → prepare → Kling simulator → archive →
//! manifest → ack, against real RabbitMQ, a real S3 server and the simulator.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestEnv, b64, jpeg, png, serve_files};
use kling_archiver::archive::{ObjectKey, Store};
use kling_archiver::broker::JobEvent;
use kling_archiver::manifest::Manifest;
use kling_archiver::pipeline::{Hooks, Outcome};
use kling_archiver::sim::Fault;

const SETTLE: Duration = Duration::from_secs(60);

async fn manifest(store: &Store, job_id: &str) -> Manifest {
    let key = ObjectKey::parse(&format!("jobs/{job_id}/manifest.json")).unwrap();
    let bytes = store
        .get(&key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no manifest for {job_id}"));
    // Every manifest a test reads is checked against the published schema,
    // and the schema is strict enough to notice a damaged one.
    common::assert_manifest_schema(&bytes);
    let mut damaged: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    damaged["segments"][0]["sha256"] = "not-a-digest".into();
    damaged["archived_at"] = "yesterday".into();
    let errors = common::manifest_schema_errors(damaged.to_string().as_bytes());
    assert_eq!(errors.len(), 2, "{errors:?}");
    serde_json::from_slice(&bytes).expect("manifest parses")
}

/// Strip the store prefix from a full key.
fn rel(store: &Store, full: &str) -> ObjectKey {
    store
        .relative_key(full)
        .unwrap_or_else(|| panic!("{full} is outside the archive"))
}

/// Every object a manifest names exists, with the recorded size and SHA-256.
async fn assert_manifest_complete(store: &Store, m: &Manifest) {
    let src = store
        .get(&rel(store, &m.source.key))
        .await
        .unwrap()
        .expect("source archived");
    assert_eq!(kling_archiver::archive::Sha256::of(&src), m.source.sha256);
    let prep = store
        .get(&rel(store, &m.prepared.key))
        .await
        .unwrap()
        .expect("prepared archived");
    assert_eq!(
        kling_archiver::archive::Sha256::of(&prep),
        m.prepared.sha256
    );
    assert!(
        m.segments.iter().any(|s| s.is_contain),
        "at least one segment found"
    );
    for seg in &m.segments {
        if !seg.is_contain {
            assert!(seg.key.is_none());
            continue;
        }
        let key = rel(store, seg.key.as_deref().expect("key"));
        let bytes = store.get(&key).await.unwrap().expect("segment archived");
        assert_eq!(Some(bytes.len() as u64), seg.bytes);
        assert_eq!(
            Some(kling_archiver::archive::Sha256::of(&bytes)),
            seg.sha256
        );
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let info = store.head(&key).await.unwrap().expect("head");
        assert_eq!(info.content_type.as_deref(), Some("image/png"));
        assert_eq!(
            info.metadata.get("job-id").map(String::as_str),
            Some(m.job_id.as_str())
        );
        assert_eq!(info.metadata.get("request-id"), Some(&m.request_id));
        assert_eq!(
            info.metadata.get("final-unit-deduction"),
            Some(&m.final_unit_deduction)
        );
        assert_eq!(
            info.metadata.get("segment-type").map(String::as_str),
            Some(seg.kind.as_str())
        );
        assert_eq!(info.sha256(), seg.sha256);
        // Kling returns masks at the size of the image it was sent.
        assert_eq!(
            (seg.width, seg.height),
            (Some(m.prepared.width), Some(m.prepared.height))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archives_a_job_from_each_source_kind() {
    let env = TestEnv::new(Backend::S3).await;
    // s3:// source in the same S3 server.
    env.s3
        .client
        .put_object()
        .bucket(&env.bucket)
        .key("in/photo.jpg")
        .body(jpeg(640, 800).into())
        .send()
        .await
        .unwrap();
    let http = serve_files(vec![("p/1.png", png(500, 400))]).await;
    let mut cfg = env.config();
    cfg.fetch.allow_private = true; // the HTTP source is on loopback
    let mut w = env.start_worker(cfg, Hooks::default());

    env.publish_json(serde_json::json!({"job_id": "src-http", "image_url": format!("{http}/p/1.png"), "labels": {"campaign": "winter"}})).await;
    env.publish_json(serde_json::json!({"job_id": "src-s3", "image_url": format!("s3://{}/in/photo.jpg", env.bucket)})).await;
    env.publish_json(
        serde_json::json!({"job_id": "src-inline", "image_base64": b64(&jpeg(400, 400))}),
    )
    .await;
    let events = w.settled(3, SETTLE).await;
    assert!(
        events.iter().all(|e| matches!(
            e,
            JobEvent::Archived {
                outcome: Outcome::Archived { .. },
                ..
            }
        )),
        "{events:?}"
    );

    let store = env.store();
    for id in ["src-http", "src-s3", "src-inline"] {
        let m = manifest(&store, id).await;
        assert_eq!(m.job_id, id);
        assert_eq!(m.schema_version, 1);
        assert!(m.prepared.passthrough, "in-spec images go out untouched");
        assert_eq!(m.final_unit_deduction, "1");
        assert!(!m.request_id.is_empty());
        assert_manifest_complete(&store, &m).await;
    }
    let m = manifest(&store, "src-http").await;
    assert_eq!(m.labels.get("campaign").map(String::as_str), Some("winter"));
    assert_eq!((m.source.width, m.source.height), (500, 400));
    assert!(m.source.uri.starts_with("http://127.0.0.1:"));
    assert_eq!(
        manifest(&store, "src-s3").await.source.uri,
        format!("s3://{}/in/photo.jpg", env.bucket)
    );
    assert_eq!(
        manifest(&store, "src-inline").await.source.uri,
        format!("inline:{} bytes", jpeg(400, 400).len())
    );
    assert_eq!(env.sim.stats().billed_calls, 3);
    assert_eq!(env.ready(&env.queue).await, 0);
    assert!(env.drain_dead_letters().await.is_empty());
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_spec_images_are_fixed_before_kling_sees_them() {
    let env = TestEnv::new(Backend::Local).await;
    let mut w = env.start_worker(env.config(), Hooks::default());
    env.publish_json(serde_json::json!({"job_id": "tiny", "image_base64": b64(&png(200, 150))}))
        .await;
    env.publish_json(serde_json::json!({"job_id": "pano", "image_base64": b64(&jpeg(2000, 500))}))
        .await;
    w.settled(2, SETTLE).await;
    let store = env.store();
    let tiny = manifest(&store, "tiny").await;
    assert!(!tiny.prepared.passthrough);
    assert!(
        tiny.prepared.width >= 300 && tiny.prepared.height >= 300,
        "{tiny:?}"
    );
    let pano = manifest(&store, "pano").await;
    let ratio = f64::from(pano.prepared.width) / f64::from(pano.prepared.height);
    assert!(ratio <= 2.5 + 1e-9, "aspect fixed: {ratio}");
    assert!(
        pano.prepared.width >= 2000,
        "padded, never cropped or shrunk: {}",
        pano.prepared.width
    );
    for m in [&tiny, &pano] {
        assert_manifest_complete(&store, m).await;
    }
    assert_eq!(
        env.sim.stats().calls_by_code.get(&1201),
        None,
        "the simulator never saw an out-of-spec image"
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivery_of_a_finished_job_makes_no_second_kling_call() {
    let env = TestEnv::new(Backend::S3).await;
    let mut w = env.start_worker(env.config(), Hooks::default());
    let job = serde_json::json!({"job_id": "again", "image_base64": b64(&jpeg(600, 600))});
    env.publish_json(job.clone()).await;
    w.settled(1, SETTLE).await;
    env.publish_json(job).await;
    let events = w.settled(1, SETTLE).await;
    assert!(
        matches!(
            &events[0],
            JobEvent::Archived {
                outcome: Outcome::AlreadyArchived { .. },
                ..
            }
        ),
        "{events:?}"
    );
    assert_eq!(
        env.sim.stats().recognize_calls,
        1,
        "one call for two deliveries"
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_messages_and_images_are_dead_lettered_with_a_reason() {
    let env = TestEnv::new(Backend::Local).await;
    let mut w = env.start_worker(env.config(), Hooks::default());
    let mut truncated = jpeg(640, 480);
    truncated.truncate(300);
    env.publish(b"this is not json").await;
    env.publish_json(serde_json::json!({"job_id": "../etc", "image_base64": b64(&jpeg(400, 400))}))
        .await;
    env.publish_json(serde_json::json!({"job_id": "both", "image_url": "https://x.test/a.jpg", "image_base64": "aGk="})).await;
    env.publish_json(serde_json::json!({"job_id": "corrupt", "image_base64": b64(&truncated)}))
        .await;
    env.publish_json(serde_json::json!({"job_id": "not-an-image", "image_base64": b64(b"%PDF-1.7 definitely not an image")})).await;
    env.publish_json(
        serde_json::json!({"job_id": "ssrf", "image_url": "http://127.0.0.1:1/secret.jpg"}),
    )
    .await;
    env.publish_json(serde_json::json!({"job_id": "metadata-svc", "image_url": "http://169.254.169.254/latest/meta-data/"})).await;
    let events = w.settled(7, SETTLE).await;
    assert!(
        events
            .iter()
            .all(|e| matches!(e, JobEvent::DeadLettered { .. })),
        "{events:?}"
    );

    let mut dead = env.drain_dead_letters().await;
    assert_eq!(dead.len(), 7);
    dead.sort_by_key(|d| d.job_id.clone());
    let by_id = |id: Option<&str>| {
        dead.iter()
            .find(|d| d.job_id.as_deref() == id)
            .unwrap_or_else(|| panic!("{id:?} in {dead:?}"))
    };
    for (id, code) in [
        ("both", "job_ambiguous_source"),
        ("corrupt", "image_truncated"),
        ("not-an-image", "image_format_unknown"),
        ("ssrf", "source_forbidden_address"),
        ("metadata-svc", "source_forbidden_address"),
    ] {
        assert_eq!(by_id(Some(id)).code.as_deref(), Some(code), "{id}");
    }
    assert!(
        by_id(Some("ssrf"))
            .reason
            .as_deref()
            .unwrap()
            .contains("SOURCE_ALLOW_PRIVATE")
    );
    // The invalid id is not salvaged, so two dead letters have no job id;
    // both keep their original body for replay.
    let no_id: Vec<_> = dead.iter().filter(|d| d.job_id.is_none()).collect();
    assert_eq!(no_id.len(), 2);
    assert!(no_id.iter().any(|d| d.body == b"this is not json"));
    assert!(
        no_id
            .iter()
            .any(|d| d.code.as_deref() == Some("job_invalid_id"))
    );
    assert_eq!(
        env.sim.stats().recognize_calls,
        0,
        "nothing bad reached Kling"
    );
    assert_eq!(env.ready(&env.queue).await, 0);
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kling_errors_are_retried_or_dead_lettered_by_code() {
    let env = TestEnv::new(Backend::Local).await;
    let mut w = env.start_worker(env.config(), Hooks::default());
    // Two transient faults, then success: archived after retries.
    env.sim.faults().push(Fault::Code(1302));
    env.sim.faults().push(Fault::Code(5001));
    env.publish_json(serde_json::json!({"job_id": "flaky", "image_base64": b64(&jpeg(400, 400))}))
        .await;
    let e = w.settled(1, SETTLE).await;
    assert!(matches!(&e[0], JobEvent::Archived { .. }), "{e:?}");
    // A content-policy refusal is permanent.
    env.sim.faults().push(Fault::Code(1301));
    env.publish_json(
        serde_json::json!({"job_id": "refused", "image_base64": b64(&jpeg(401, 401))}),
    )
    .await;
    let e = w.settled(1, SETTLE).await;
    assert!(
        matches!(
            &e[0],
            JobEvent::DeadLettered {
                code: "kling_1301",
                ..
            }
        ),
        "{e:?}"
    );
    let stats = env.sim.stats();
    assert_eq!(stats.billed_calls, 1);
    assert_eq!(stats.recognize_calls, 4);
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_before_the_manifest_leaves_the_message_for_the_next_run() {
    let env = TestEnv::new(Backend::S3).await;
    let (reached_tx, mut reached_rx) = tokio::sync::mpsc::unbounded_channel();
    let hold = Hooks {
        before_manifest: Some(Arc::new(move |id| {
            let _ = reached_tx.send(id);
            Box::pin(std::future::pending::<()>())
        })),
    };
    let mut cfg = env.config();
    cfg.shutdown_timeout = Duration::from_millis(200);
    let w1 = env.start_worker(cfg, hold);
    env.publish_json(serde_json::json!({"job_id": "held", "image_base64": b64(&jpeg(500, 500))}))
        .await;
    let id = tokio::time::timeout(SETTLE, reached_rx.recv())
        .await
        .expect("job reaches the hook")
        .unwrap();
    assert_eq!(id.as_str(), "held");
    let store = env.store();
    let segs = store.list("segments/").await.unwrap();
    assert!(!segs.is_empty(), "segments were uploaded before the stop");
    assert!(
        store
            .head(&ObjectKey::parse("jobs/held/manifest.json").unwrap())
            .await
            .unwrap()
            .is_none()
    );

    // Stop the worker; its shutdown timeout expires with the job held, and
    // the unacked message goes back to the queue.
    w1.stop().await;
    env.wait_ready(&env.queue, 1, Duration::from_secs(10)).await;
    assert!(
        store
            .head(&ObjectKey::parse("jobs/held/manifest.json").unwrap())
            .await
            .unwrap()
            .is_none()
    );

    // The next run completes it without paying Kling again.
    let mut w2 = env.start_worker(env.config(), Hooks::default());
    let e = w2.settled(1, SETTLE).await;
    match &e[0] {
        JobEvent::Archived {
            outcome: Outcome::Archived {
                reused_recognition, ..
            },
            ..
        } => assert!(reused_recognition),
        other => panic!("{other:?}"),
    }
    let m = manifest(&store, "held").await;
    assert!(m.reused_recognition);
    assert_manifest_complete(&store, &m).await;
    assert_eq!(
        env.sim.stats().billed_calls,
        1,
        "one billed call across both runs"
    );
    assert_eq!(env.ready(&env.queue).await, 0);
    w2.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn segment_urls_outside_the_allowlist_are_refused() {
    let env = TestEnv::new(Backend::Local).await;
    let mut cfg = env.config();
    cfg.result_hosts = vec!["*.klingai.com".to_owned()];
    let mut w = env.start_worker(cfg, Hooks::default());
    env.publish_json(serde_json::json!({"job_id": "cdn", "image_base64": b64(&jpeg(400, 400))}))
        .await;
    let e = w.settled(1, SETTLE).await;
    assert!(
        matches!(
            &e[0],
            JobEvent::DeadLettered {
                code: "result_host_not_allowed",
                ..
            }
        ),
        "{e:?}"
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_image_under_two_job_ids_is_recognized_once_unless_sharing_is_off() {
    let env = TestEnv::new(Backend::S3).await;
    let img = b64(&jpeg(640, 480));
    let mut w = env.start_worker(env.config(), Hooks::default());
    for id in ["twin-a", "twin-b"] {
        env.publish_json(serde_json::json!({"job_id": id, "image_base64": img}))
            .await;
        w.settled(1, SETTLE).await;
    }
    w.stop().await;
    let store = env.store();
    let a = manifest(&store, "twin-a").await;
    let b = manifest(&store, "twin-b").await;
    assert_eq!(
        env.sim.stats().billed_calls,
        1,
        "one billed call, two manifests"
    );
    assert!(!a.reused_recognition && b.reused_recognition);
    assert_eq!(a.request_id, b.request_id);
    assert_eq!(a.segments, b.segments, "the same stored segments");
    // Shared objects carry the first job's id in their metadata (documented).
    for seg in b.segments.iter().filter_map(|s| s.key.as_deref()) {
        assert!(
            store.head(&rel(&store, seg)).await.unwrap().is_some(),
            "{seg}"
        );
    }

    // SHARE_RECOGNITIONS=false: every job pays for its own call.
    let mut cfg = env.config();
    cfg.share_recognitions = false;
    let mut w = env.start_worker(cfg, Hooks::default());
    env.publish_json(serde_json::json!({"job_id": "twin-c", "image_base64": img}))
        .await;
    w.settled(1, SETTLE).await;
    w.stop().await;
    let c = manifest(&store, "twin-c").await;
    assert!(!c.reused_recognition);
    assert_ne!(c.request_id, a.request_id);
    assert_eq!(env.sim.stats().billed_calls, 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_archived_job_publishes_a_result_event_before_its_ack() {
    use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
    let env = TestEnv::new(Backend::S3).await;
    // A downstream consumer's queue on the results exchange.
    let ch = env.conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        env.topology().results_exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let mut w = env.start_worker(env.config(), Hooks::default());
    let job = serde_json::json!({"job_id": "ev-1", "image_base64": b64(&jpeg(500, 400)), "labels": {"team": "catalog"}});
    env.publish_json(job.clone()).await;
    w.settled(1, SETTLE).await;
    // A redelivery of the finished job repeats the event (at least once).
    env.publish_json(job).await;
    w.settled(1, SETTLE).await;
    w.stop().await;
    let store = env.store();
    let m = manifest(&store, "ev-1").await;
    let mut events = Vec::new();
    while let Some(msg) = ch
        .basic_get(q.name().clone(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert_eq!(
            msg.delivery
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("application/json")
        );
        events.push(serde_json::from_slice::<serde_json::Value>(&msg.delivery.data).unwrap());
    }
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["event"], "archived");
        assert_eq!(e["job_id"], "ev-1");
        assert_eq!(e["manifest_key"], "arch/jobs/ev-1/manifest.json");
        assert_eq!(e["request_id"], m.request_id.as_str());
        assert_eq!(e["final_unit_deduction"], "1");
        assert_eq!(e["labels"]["team"], "catalog");
        assert_eq!(e["segments"], serde_json::to_value(&m.segments).unwrap());
        assert_eq!(e["archive"], format!("s3://{}/arch", env.bucket));
    }
    // The day index names the job, so a day's work is one short listing.
    let day = &m.archived_at[..10];
    let listed = store.list(&format!("index/dt={day}/")).await.unwrap();
    let names: Vec<_> = listed.iter().map(|k| k.as_str().to_owned()).collect();
    assert_eq!(names, vec![format!("index/dt={day}/ev-1.json")]);
    let entry: serde_json::Value =
        serde_json::from_slice(&store.get(&listed[0]).await.unwrap().unwrap()).unwrap();
    assert_eq!(entry["manifest_key"], "arch/jobs/ev-1/manifest.json");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_recognition_whose_results_expired_is_recognized_again_once() {
    let env = TestEnv::new(Backend::S3).await;
    let img = b64(&jpeg(700, 500));
    let mut w = env.start_worker(env.config(), Hooks::default());
    env.publish_json(serde_json::json!({"job_id": "old", "image_base64": img}))
        .await;
    w.settled(1, SETTLE).await;
    let store = env.store();
    let old = manifest(&store, "old").await;
    // Thirty days later: Kling has deleted the results, and (say) the old
    // segments were lost too, so a new job of the same image must download.
    for seg in old.segments.iter().filter_map(|s| s.key.as_deref()) {
        store.delete(&rel(&store, seg)).await.unwrap();
    }
    env.sim.faults().expire_all_results();
    env.publish_json(serde_json::json!({"job_id": "new", "image_base64": img}))
        .await;
    let e = w.settled(1, SETTLE).await;
    assert!(matches!(e[0], JobEvent::Archived { .. }), "{e:?}");
    w.stop().await;
    let new = manifest(&store, "new").await;
    assert_ne!(new.request_id, old.request_id, "a fresh recognition");
    assert!(!new.reused_recognition);
    assert_manifest_complete(&store, &new).await;
    let stats = env.sim.stats();
    assert_eq!(stats.billed_calls, 2, "exactly one new call");
    assert!(
        stats.cdn_expired >= 1,
        "the stale URLs were tried and refused"
    );
    env.cleanup().await;
}
