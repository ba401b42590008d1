//! The holes a security review found, each closed and tested against the
//! real thing: proxies in the environment, `s3://` sources from any
//! bucket, a source that drips, credentials in broker errors, and a worker
//! left on a throwaway local archive. (IPv6 forms that embed an IPv4
//! address are unit-tested in `src/net/guard.rs`, an allowlisted result
//! host that resolves inside the network in `src/download.rs`.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, TestEnv, eventually, jpeg, worker_binary};
use kling_archiver::broker::JobEvent;
use kling_archiver::pipeline::Hooks;

/// A forwarding proxy that forwards nothing: it records the request line
/// of every request it is asked to make and answers 502.
fn counting_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&sock).read_line(&mut line);
            log.lock().unwrap().push(line.trim().to_owned());
            let _ = sock.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (format!("http://{addr}"), seen)
}

/// A loopback image server (the "internal" target a proxy would reach).
fn image_server() -> (u16, Arc<Mutex<usize>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(Mutex::new(0usize));
    let count = hits.clone();
    let body = jpeg(400, 400);
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            *count.lock().unwrap() += 1;
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes());
            let _ = sock.write_all(&body);
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_in_the_environment_do_not_carry_a_private_source_past_the_guard() {
    let env = TestEnv::new(Backend::S3).await;
    let (proxy, seen) = counting_proxy();
    let (port, hits) = image_server();
    let mut child = worker_binary(&env)
        .env("HTTP_PROXY", &proxy)
        .env("HTTPS_PROXY", &proxy)
        .env("ALL_PROXY", &proxy)
        .env("http_proxy", &proxy)
        .env("https_proxy", &proxy)
        // The archive's S3 endpoint (the operator's own, 127.0.0.1 here) is
        // exempt, as ops would exempt theirs; the job-named source
        // (`localhost`) is not, so a client that honoured the proxy
        // variables would hand it to the proxy.
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .env("HTTP_ADDR", "off")
        .spawn()
        .expect("start worker");
    env.publish_json(serde_json::json!({
        "job_id": "via-proxy",
        "image_url": format!("http://localhost:{port}/internal.jpg"),
    }))
    .await;
    let dead = env.topology().dead_letter_queue();
    env.wait_ready(&dead, 1, Duration::from_secs(60)).await;
    let letters = env.drain_dead_letters().await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].code.as_deref(),
        Some("source_forbidden_address"),
        "{:?}",
        letters[0].reason
    );
    assert_eq!(*hits.lock().unwrap(), 0, "the internal server was reached");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.is_empty(), "the proxy was asked for: {seen:?}");
    assert_eq!(env.sim.stats().recognize_calls, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_source_outside_the_allowed_buckets_is_dead_lettered_unread() {
    let env = TestEnv::new(Backend::S3).await;
    env.s3
        .client
        .put_object()
        .bucket(&env.bucket)
        .key("secret/payroll.jpg")
        .body(jpeg(400, 400).into())
        .send()
        .await
        .unwrap();
    let mut cfg = env.config();
    cfg.fetch.s3_buckets = vec!["public-images".into()];
    let mut w = env.start_worker(cfg, Hooks::default());
    env.publish_json(serde_json::json!({
        "job_id": "exfil",
        "image_url": format!("s3://{}/secret/payroll.jpg", env.bucket),
    }))
    .await;
    match w.settled(1, Duration::from_secs(60)).await.remove(0) {
        JobEvent::DeadLettered { code, reason, .. } => {
            assert_eq!(code, "source_s3_bucket_not_allowed");
            assert!(reason.contains("SOURCE_S3_BUCKETS"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(env.sim.stats().recognize_calls, 0, "nothing went to Kling");
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dripping_source_is_cut_at_one_deadline_not_retries_times_timeout() {
    let env = TestEnv::new(Backend::Local).await;
    // A server that sends one byte a second, forever; counts requests.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(0usize));
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            *count.lock().unwrap() += 1;
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let head =
                    "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n";
                let _ = sock.write_all(head.as_bytes()).await;
                loop {
                    if sock.write_all(b"\xFF").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    });
    let mut cfg = env.config();
    cfg.fetch.allow_private = true;
    cfg.fetch.timeout = Duration::from_secs(60);
    cfg.fetch.deadline = Duration::from_secs(2);
    let mut w = env.start_worker(cfg, Hooks::default());
    env.publish_json(serde_json::json!({
        "job_id": "drip",
        "image_url": format!("http://{addr}/drip.jpg"),
    }))
    .await;
    // The first delivery ends at the deadline, as a retry: one request,
    // not four requests of 60 s each.
    let event = eventually("the drip is cut", Duration::from_secs(30), || {
        let got = w.events.try_recv().ok();
        async move { got }
    })
    .await;
    match event {
        JobEvent::Requeued { code, .. } => assert_eq!(code, "source_deadline"),
        e => panic!("{e:?}"),
    }
    assert_eq!(*requests.lock().unwrap(), 1, "one request per delivery");
    w.stop().await;
    env.cleanup().await;
}

/// Run the binary to its end; stdout and stderr together.
async fn run_to_end(mut cmd: std::process::Command) -> (Option<i32>, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run worker"))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_amqp_url_never_shows_its_password() {
    let env = TestEnv::new(Backend::S3).await;
    for url in [
        "amqp://archiver:hunter2-pw@127.0.0.1:notaport/%2f",
        "amqp://archiver:hunter2-pw@127.0.0.1:1/%2f",
        "amqp://archiver:hunter2-pw@[bad/%2f",
    ] {
        let mut cmd = worker_binary(&env);
        cmd.env("AMQP_URL", url).env("HTTP_ADDR", "off");
        let (code, text) = run_to_end(cmd).await;
        assert_ne!(code, Some(0), "{url}: {text}");
        assert!(!text.contains("hunter2"), "{url} leaked:\n{text}");
        assert!(text.contains("RabbitMQ"), "{url}: say what failed:\n{text}");
    }
    env.cleanup().await;
}

/// Start the binary, read its log (stderr) until `until` shows, then stop it.
fn output_until(mut cmd: std::process::Command, until: &str) -> String {
    let mut child = cmd.spawn().expect("start worker");
    let stdout = child.stderr.take().unwrap();
    let mut text = String::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        text.push_str(&line);
        text.push('\n');
        if line.contains(until) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_local_archive_warns_unless_told_it_is_meant() {
    let env = TestEnv::new(Backend::S3).await;
    let dir = tempfile::tempdir().unwrap();
    let cmd = |ok: Option<&str>| {
        let mut cmd = worker_binary(&env);
        cmd.env("ARCHIVE_URL", dir.path()).env("HTTP_ADDR", "off");
        if let Some(ok) = ok {
            cmd.env("ARCHIVE_LOCAL_OK", ok);
        }
        cmd
    };
    let warned = tokio::task::spawn_blocking({
        let c = cmd(None);
        move || output_until(c, "worker started")
    })
    .await
    .unwrap();
    assert!(
        warned.contains("LOCAL DIRECTORY") && warned.contains("ARCHIVE_LOCAL_OK"),
        "{warned}"
    );
    let quiet = tokio::task::spawn_blocking({
        let c = cmd(Some("true"));
        move || output_until(c, "worker started")
    })
    .await
    .unwrap();
    assert!(quiet.contains("worker started"), "{quiet}");
    assert!(!quiet.contains("LOCAL DIRECTORY"), "{quiet}");
    env.cleanup().await;
}
