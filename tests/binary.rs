//! The `worker` binary as ops run it: configured only through the
//! contract's environment variables, against a real S3 server, RabbitMQ and
//! the Kling simulator. Also: SIGTERM drains and exits 0, missing keys exit
//! 2, and no secret ever reaches the logs.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Backend, TestEnv, b64, jpeg};
use kling_archiver::archive::ObjectKey;

fn worker(env: &TestEnv) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", common::amqp_url())
        .env("WORKER_QUEUE", &env.queue)
        .env("WORKER_DELIVERY_LIMIT", env.delivery_limit.to_string())
        .env("WORKER_CONCURRENCY", "32")
        .env("KLING_BASE_URL", env.sim.base_url())
        .env("KLING_ACCESS_KEY", common::KLING_AK)
        .env("KLING_SECRET_KEY", common::KLING_SK)
        .env("KLING_RESULT_HOSTS", env.sim.result_host())
        .env("ARCHIVE_URL", format!("s3://{}/bin", env.bucket))
        .env("S3_FORCE_PATH_STYLE", "true")
        .env("AWS_ENDPOINT_URL", &env.s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", common::S3_AK)
        .env("AWS_SECRET_ACCESS_KEY", common::S3_SK)
        .env("AWS_REGION", "us-east-1")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug,aws=info,hyper=info,h2=info,rustls=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_archives_with_env_config_and_drains_on_sigterm() {
    let env = TestEnv::new(Backend::S3).await;
    env.publish_json(serde_json::json!({"job_id": "bin-1", "image_base64": b64(&jpeg(500, 400))}))
        .await;
    env.publish_json(serde_json::json!({"job_id": "bin-2", "image_base64": b64(&jpeg(200, 100))}))
        .await;
    let child = worker(&env).spawn().expect("start worker");
    let pid = child.id();

    let store =
        kling_archiver::archive::Store::s3(env.s3.client.clone(), env.bucket.clone(), "bin");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for id in ["bin-1", "bin-2"] {
        let key = ObjectKey::parse(&format!("jobs/{id}/manifest.json")).unwrap();
        while store.head(&key).await.unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} not archived in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    env.wait_ready(&env.queue, 0, Duration::from_secs(10)).await;

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
    // Every log line is JSON.
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert_eq!(env.sim.stats().billed_calls, 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_to_start_without_kling_keys() {
    let env = TestEnv::new(Backend::Local).await;
    let out = worker(&env)
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
