//! The `worker` binary as ops run it: configured only through the
//! contract's environment variables, against a real S3 server, RabbitMQ and
//! the Kling simulator. Also: SIGTERM drains and exits 0, missing keys exit
//! 2, no secret ever reaches the logs, and `/metrics`, `/healthz` and
//! `/readyz` answer.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Backend, TestEnv, b64, eventually, free_port, jpeg};
use kling_archiver::archive::ObjectKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_archives_with_env_config_and_drains_on_sigterm() {
    let env = TestEnv::new(Backend::S3).await;
    env.publish_json(serde_json::json!({"job_id": "bin-1", "image_base64": b64(&jpeg(500, 400))}))
        .await;
    env.publish_json(serde_json::json!({"job_id": "bin-2", "image_base64": b64(&jpeg(200, 100))}))
        .await;
    // A free port for the ops listener.
    let port = free_port();
    let child = common::worker_binary(&env)
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .expect("start worker");
    let pid = child.id();

    let store =
        kling_archiver::archive::Store::s3(env.s3.client.clone(), env.bucket.clone(), "bin");
    for id in ["bin-1", "bin-2"] {
        let key = ObjectKey::parse(&format!("jobs/{id}/manifest.json")).unwrap();
        eventually(
            &format!("{id} archived"),
            Duration::from_secs(60),
            || async { store.head(&key).await.unwrap().map(|_| ()) },
        )
        .await;
    }
    env.wait_ready(&env.queue, 0, Duration::from_secs(10)).await;

    // What Kubernetes and Prometheus see.
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http.get(format!("http://127.0.0.1:{port}{path}")).send();
        async move {
            let resp = req.await.expect("ops listener answers");
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    let (code, body) = get("/readyz").await;
    assert_eq!((code, body.as_str()), (200, r#"{"ready":true}"#));
    let (code, metrics) = get("/metrics").await;
    assert_eq!(code, 200);
    let build_info = format!(
        r#"kling_archiver_build_info{{version="{}",jpeg_simd="{}"}} 1"#,
        env!("CARGO_PKG_VERSION"),
        kling_archiver::build_info::JPEG_SIMD
    );
    for needle in [
        r#"kling_archiver_jobs_total{outcome="archived",code="none"} 2"#,
        r#"kling_archiver_kling_calls_total{code="ok"} 2"#,
        "kling_archiver_kling_adaptive_limit ",
        "kling_archiver_cost_milliunits_total 2000",
        "kling_archiver_jobs_in_flight 0",
        r#"kling_archiver_stage_seconds_bucket{stage="kling",le="+Inf"} 2"#,
        r#"kling_archiver_stage_seconds_count{stage="archive"} 2"#,
        "kling_archiver_archived_bytes_total ",
        "kling_archiver_store_reachable 1",
        // The fleet's billing counters exist before their first event.
        "kling_archiver_recognitions_reused_total 0",
        "kling_archiver_lease_waits_total 0",
        "kling_archiver_lease_takeovers_total 0",
        "kling_archiver_kling_ambiguous_calls_total 0",
        build_info.as_str(),
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from /metrics:\n{metrics}"
        );
    }
    eprintln!("/metrics after two jobs:\n{metrics}");

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "SIGTERM drains and exits 0\n{logs}"
    );
    assert!(
        logs.contains("\"archived\"") || logs.contains("archived"),
        "{logs}"
    );
    for secret in [common::KLING_SK, common::S3_SK, "guest:guest", "Bearer ey"] {
        assert!(
            !logs.contains(secret),
            "a secret ({secret}) reached the logs"
        );
    }
    // Every log line is JSON, and a clean drain and stop logs no ERROR
    // (lapin used to, when a channel's close raced the connection's).
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v = serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_ne!(v["level"], "ERROR", "a clean stop logged an error: {line}");
    }
    assert_eq!(env.sim.stats().billed_calls, 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_to_start_without_kling_keys() {
    let env = TestEnv::new(Backend::Local).await;
    let out = common::worker_binary(&env)
        .env_remove("KLING_SECRET_KEY")
        .output()
        .expect("run worker");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KLING_SECRET_KEY is not set"), "{err}");
    assert!(!err.contains(common::S3_SK));
    env.cleanup().await;
}

#[test]
fn help_never_prints_the_amqp_password_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("--help")
        .env("AMQP_URL", "amqp://ops:hunter2-secret@broker/%2f")
        .output()
        .expect("run worker --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("AMQP_URL"), "{help}");
    assert!(!help.contains("hunter2-secret"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_job_finishes_that_job_takes_no_other_and_exits_0() {
    let env = TestEnv::new(Backend::S3).await;
    env.sim.set_latency(Duration::from_secs(3));
    for i in 0..3 {
        env.publish_json(serde_json::json!({"job_id": format!("mid-{i}"), "image_base64": b64(&jpeg(400 + i, 400))}))
            .await;
    }
    let port = free_port();
    let child = common::worker_binary(&env)
        .env("WORKER_CONCURRENCY", "1")
        // One delivery held: the other two stay in the queue.
        .env("WORKER_PREFETCH", "1")
        .env("SHUTDOWN_TIMEOUT_SECS", "30")
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .expect("start worker");
    let pid = child.id();
    // Wait for the first job's Kling call to be in flight.
    eventually(
        "a Kling call in flight",
        Duration::from_secs(30),
        || async { (env.sim.stats().in_flight > 0).then_some(()) },
    )
    .await;
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    // Draining: not ready, while the job is still running.
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let mut saw_503 = false;
    for _ in 0..50 {
        match reqwest::get(&readyz).await {
            Ok(r) if r.status().as_u16() == 503 => {
                let body = r.text().await.unwrap();
                assert!(body.contains("draining"), "{body}");
                saw_503 = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(saw_503, "/readyz never said draining");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{logs}");
    let store =
        kling_archiver::archive::Store::s3(env.s3.client.clone(), env.bucket.clone(), "bin");
    let key = ObjectKey::parse("jobs/mid-0/manifest.json").unwrap();
    assert!(
        store.head(&key).await.unwrap().is_some(),
        "the job in flight finished"
    );
    if env.ready(&env.queue).await != 2 {
        for l in logs.lines().filter(|l| l.contains("kling_archiver")) {
            eprintln!("{}", &l[..l.len().min(300)]);
        }
    }
    env.wait_ready(&env.queue, 2, Duration::from_secs(10)).await;
    assert_eq!(env.sim.stats().billed_calls, 1, "nothing new was taken");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_archive_makes_the_worker_not_ready() {
    let env = TestEnv::new(Backend::S3).await;
    let port = free_port();
    // Nothing listens on the S3 endpoint.
    let dead_port = free_port();
    let mut child = common::worker_binary(&env)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{dead_port}"))
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .expect("start worker");
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let body = eventually(
        "/readyz reports the archive",
        Duration::from_secs(60),
        || async {
            let r = reqwest::get(&readyz).await.ok()?;
            let status = r.status().as_u16();
            let body = r.text().await.ok()?;
            (status == 503 && body.contains("archive_down")).then_some(body)
        },
    )
    .await;
    assert!(body.contains("ARCHIVE_URL"), "{body}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_verify_catches_a_corrupted_and_a_deleted_object() {
    let env = TestEnv::new(Backend::S3).await;
    let mut w = env.start_worker(env.config(), kling_archiver::pipeline::Hooks::default());
    for i in 0..2 {
        env.publish_json(serde_json::json!({"job_id": format!("v-{i}"), "image_base64": b64(&jpeg(400 + i, 400))}))
            .await;
    }
    w.settled(2, Duration::from_secs(60)).await;
    w.stop().await;
    let verify = |extra: &[&str]| {
        let mut cmd = common::worker_binary(&env);
        cmd.arg("verify")
            .args(extra)
            .env("ARCHIVE_URL", format!("s3://{}/arch", env.bucket));
        cmd.output().expect("run worker verify")
    };
    let out = verify(&[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("$ worker verify --archive s3://…/arch\n{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("2 manifests,") && text.contains("all good"),
        "{text}"
    );

    // Corrupt one segment, delete another object.
    let store = env.store();
    let m0: kling_archiver::manifest::Manifest = serde_json::from_slice(
        &store
            .get(&ObjectKey::parse("jobs/v-0/manifest.json").unwrap())
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let seg = m0.segments.iter().find_map(|s| s.key.clone()).unwrap();
    env.s3
        .client
        .put_object()
        .bucket(&env.bucket)
        .key(&seg)
        .body(b"\x89PNG\r\n\x1a\nnot the mask".to_vec().into())
        .send()
        .await
        .unwrap();
    env.s3
        .client
        .delete_object()
        .bucket(&env.bucket)
        .key(&m0.prepared.key)
        .send()
        .await
        .unwrap();
    let out = verify(&[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("$ worker verify --archive s3://…/arch   (after damage)\n{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("sha256_mismatch") && text.contains(&seg),
        "{text}"
    );
    assert!(
        text.contains("missing") && text.contains(&m0.prepared.key),
        "{text}"
    );
    // --quick sees both from metadata alone; --json for machines.
    let out = verify(&["--quick", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems: Vec<_> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["problem"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(problems.len(), 2, "{report}");
    assert!(problems.contains(&"missing".to_owned()), "{report}");
    assert!(
        problems.iter().any(|p| p != "missing"),
        "the replaced segment is caught from metadata: {report}"
    );
    // --since in the future skips everything.
    let out = verify(&["--since", "2999-01-01"]);
    assert_eq!(out.status.code(), Some(0));
    env.cleanup().await;
}
