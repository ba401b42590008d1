//! Shared test harness: a real S3 server (s3s-fs, in-process), the Kling
//! simulator, real RabbitMQ with per-test queue names, and helpers to run
//! the worker in-process and inspect queues over AMQP.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kling_archiver::archive::{ArchiveTarget, Store};
use kling_archiver::broker::{JobEvent, Topology};
use kling_archiver::config::{Cli, Config};
use kling_archiver::net::HostPattern;
use kling_archiver::pipeline::{Hooks, Pipeline};
use kling_archiver::sim::{SimConfig, SimHandle, Simulator};
use kling_archiver::worker::Worker;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod atomic_s3;
pub mod procs;
pub mod rss;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const S3_AK: &str = "test-ak";
pub const S3_SK: &str = "test-sk-0123456789";
pub const KLING_AK: &str = "kling-test-ak";
pub const KLING_SK: &str = "kling-test-sk";
/// Short retry-queue delays, so tests of transient failures stay quick.
pub const RETRY_DELAYS: &str = "1,2";
pub const RETRY_DELAYS_SECS: [u64; 2] = [1, 2];

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| AMQP_URL.to_owned())
}

/// A loopback port nothing listens on (for a worker's ops listener, a
/// Prometheus).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A short random suffix for queue, bucket and prefix names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:08x}", fastrand::u32(..))
}

/// An in-process S3 server over a temp directory.
pub struct S3Server {
    pub endpoint: String,
    pub client: aws_sdk_s3::Client,
    pub dir: tempfile::TempDir,
    stop: CancellationToken,
    down: tokio::sync::watch::Sender<bool>,
    requests: Arc<std::sync::atomic::AtomicU64>,
}

impl S3Server {
    /// Requests answered so far (every method, every client).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Take the server down (every open connection is cut, new ones are
    /// closed at once) or bring it back on the same address.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The test S3 server: s3s-fs, with conditional writes made atomic (see
/// [`atomic_s3`]).
pub async fn start_s3() -> S3Server {
    start_s3_with(atomic_s3::Conditional::Atomic, Duration::ZERO).await
}

/// An S3 server that ignores `If-None-Match` (as some S3-compatible
/// servers do): every conditional create succeeds.
pub async fn start_s3_ignoring_if_none_match() -> S3Server {
    start_s3_with(atomic_s3::Conditional::IgnoreIfNoneMatch, Duration::ZERO).await
}

/// A service that answers each request `delay` later (S3's latency), and
/// counts them.
#[derive(Clone)]
struct Delayed<S> {
    inner: S,
    delay: Duration,
    requests: Arc<std::sync::atomic::AtomicU64>,
}

impl<S, R> hyper::service::Service<R> for Delayed<S>
where
    S: hyper::service::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, req: R) -> Self::Future {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answer = self.inner.call(req);
        let delay = self.delay;
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer.await
        })
    }
}

/// [`start_s3`] with every request answered `latency` later (the load
/// bench's production shape: 30 ms).
pub async fn start_s3_with_latency(latency: Duration) -> S3Server {
    start_s3_with(atomic_s3::Conditional::Atomic, latency).await
}

async fn start_s3_with(mode: atomic_s3::Conditional, latency: Duration) -> S3Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let fs = s3s_fs::FileSystem::new(dir.path()).expect("s3s-fs");
    let fs = atomic_s3::AtomicFs::new(fs, mode);
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(S3_AK, S3_SK));
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let service = Delayed {
        inner: b.build(),
        delay: latency,
        requests: requests.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    let (down, down_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                () = stop2.cancelled() => return,
            };
            if *down_rx.borrow() {
                drop(sock);
                continue;
            }
            let service = service.clone();
            let mut down_rx = down_rx.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let serve = builder.serve_connection(TokioIo::new(sock), service);
                tokio::select! {
                    _ = serve => {}
                    _ = down_rx.wait_for(|d| *d) => {}
                }
            });
        }
    });
    let endpoint = format!("http://{addr}");
    S3Server {
        client: s3_client(&endpoint),
        endpoint,
        dir,
        stop,
        down,
        requests,
    }
}

pub fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(S3_AK, S3_SK, None, None, "test");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version_latest()
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .force_path_style(true)
        // As the worker's own client (src/lib.rs): a request to a server
        // that went away fails and is retried instead of waiting forever.
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

pub async fn create_bucket(client: &aws_sdk_s3::Client, bucket: &str) {
    client
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("create bucket");
}

/// RabbitMQ must be running: a missing broker fails the test, never skips it.
pub async fn amqp() -> lapin::Connection {
    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ is not reachable at {}: {e}. Start it with `rabbitmq-server -detached`.",
                amqp_url()
            )
        })
}

pub async fn start_sim() -> SimHandle {
    Simulator::start(SimConfig::new(KLING_AK, KLING_SK))
        .await
        .expect("start simulator")
}

/// Which archive backend a test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    S3,
    Local,
}

/// One test's world: its own queue, bucket/dir, simulator.
pub struct TestEnv {
    pub s3: S3Server,
    pub sim: SimHandle,
    pub queue: String,
    pub bucket: String,
    pub local_dir: tempfile::TempDir,
    pub backend: Backend,
    pub conn: lapin::Connection,
    pub channel: lapin::Channel,
    pub delivery_limit: u32,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> Self {
        kling_archiver::telemetry::init_for_tests();
        let s3 = start_s3().await;
        let bucket = unique("b");
        create_bucket(&s3.client, &bucket).await;
        let sim = start_sim().await;
        let conn = amqp().await;
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let queue = unique("t.kling.");
        let delivery_limit = 5;
        Topology::new(queue.clone(), delivery_limit)
            .with_retry_delays(
                RETRY_DELAYS_SECS
                    .iter()
                    .map(|s| Duration::from_secs(*s))
                    .collect(),
            )
            .declare(&channel)
            .await
            .expect("declare");
        Self {
            s3,
            sim,
            queue,
            bucket,
            local_dir: tempfile::tempdir().expect("tmp"),
            backend,
            conn,
            channel,
            delivery_limit,
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::new(self.queue.clone(), self.delivery_limit).with_retry_delays(
            RETRY_DELAYS_SECS
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
        )
    }

    /// The worker configuration for this environment, built through the
    /// real flag parser.
    pub fn config(&self) -> Config {
        let cli = Cli::try_parse_from([
            "worker",
            "--amqp-url",
            &amqp_url(),
            "--queue",
            &self.queue,
            "--concurrency",
            "4",
            "--delivery-limit",
            &self.delivery_limit.to_string(),
            "--retry-delays-secs",
            RETRY_DELAYS,
            "--kling-base-url",
            &self.sim.base_url(),
            "--archive",
            &match self.backend {
                Backend::S3 => format!("s3://{}/arch", self.bucket),
                Backend::Local => self.local_dir.path().display().to_string(),
            },
            "--result-hosts",
            &self.sim.result_host(),
            "--source-s3-buckets",
            &self.bucket,
            "--s3-force-path-style",
            "--shutdown-timeout-secs",
            "10",
        ])
        .expect("flags");
        let mut cfg = cli
            .worker
            .into_config_with_keys(KLING_AK.into(), KLING_SK.into())
            .expect("config");
        cfg.kling.min_backoff = Duration::from_millis(20);
        cfg.kling.max_backoff = Duration::from_millis(200);
        cfg
    }

    pub fn store(&self) -> Store {
        match self.backend {
            Backend::S3 => Store::open(
                &ArchiveTarget::S3 {
                    bucket: self.bucket.clone(),
                    prefix: "arch".into(),
                },
                &self.s3.client,
            ),
            Backend::Local => Store::local(self.local_dir.path()),
        }
    }

    pub fn pipeline(&self, config: &Config, hooks: Hooks) -> Arc<Pipeline> {
        let p =
            kling_archiver::build_pipeline_with(config, self.s3.client.clone()).expect("pipeline");
        Arc::new(p.with_hooks(hooks))
    }

    /// Start a worker in-process.
    pub fn start_worker(&self, config: Config, hooks: Hooks) -> RunningWorker {
        let pipeline = self.pipeline(&config, hooks);
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let worker = Worker::new(Arc::new(config), pipeline.clone()).with_events(tx);
        let status = worker.status();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        RunningWorker {
            handle,
            events: rx,
            shutdown,
            status,
            pipeline,
        }
    }

    pub async fn publish(&self, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.clone().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "publish not confirmed");
    }

    pub async fn publish_json(&self, v: serde_json::Value) {
        self.publish(v.to_string().as_bytes()).await;
    }

    /// Messages ready in a queue (passive declare).
    pub async fn ready(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = ch.close(200, "".into()).await;
        q.message_count()
    }

    /// Poll until `queue` holds `n` ready messages (the broker returns
    /// unacked messages asynchronously after a connection closes).
    pub async fn wait_ready(&self, queue: &str, n: u32, within: Duration) {
        let what = format!("{queue}: {n} messages ready");
        eventually(&what, within, || async {
            (self.ready(queue).await == n).then_some(())
        })
        .await;
    }

    /// Drain the dead-letter queue: (reason code, reason, job id, body).
    pub async fn drain_dead_letters(&self) -> Vec<DeadLetter> {
        let ch = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(
                self.topology().dead_letter_queue().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic_get")
        {
            let headers = m.delivery.properties.headers().clone().unwrap_or_default();
            let get = |k: &str| match headers.inner().get(k) {
                Some(lapin::types::AMQPValue::LongString(s)) => Some(s.to_string()),
                _ => None,
            };
            out.push(DeadLetter {
                code: get("x-kling-reason-code"),
                reason: get("x-kling-reason"),
                job_id: get("x-kling-job-id"),
                first_death_reason: get("x-first-death-reason"),
                body: m.delivery.data.clone(),
            });
            m.delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        let _ = ch.close(200, "".into()).await;
        out
    }

    pub async fn cleanup(self) {
        let t = self.topology();
        let _ = self
            .channel
            .queue_delete(self.queue.clone().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .queue_delete(t.dead_letter_queue().into(), QueueDeleteOptions::default())
            .await;
        for delay in &t.retry_delays {
            let _ = self
                .channel
                .queue_delete(t.retry_queue(*delay).into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [t.dead_letter_exchange(), t.results_exchange()] {
            let _ = self
                .channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "".into()).await;
        self.sim.shutdown();
    }
}

#[derive(Debug)]
pub struct DeadLetter {
    pub code: Option<String>,
    pub reason: Option<String>,
    pub job_id: Option<String>,
    pub first_death_reason: Option<String>,
    pub body: Vec<u8>,
}

pub struct RunningWorker {
    pub handle: tokio::task::JoinHandle<Result<(), kling_archiver::broker::BrokerError>>,
    pub events: mpsc::UnboundedReceiver<JobEvent>,
    pub shutdown: CancellationToken,
    /// What `/readyz` would say.
    pub status: Arc<kling_archiver::ops::Status>,
    pub pipeline: Arc<Pipeline>,
}

impl RunningWorker {
    /// Wait for `n` settled events (archived or dead-lettered), ignoring
    /// requeues and uncharged returns, with a deadline.
    pub async fn settled(&mut self, n: usize, within: Duration) -> Vec<JobEvent> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(JobEvent::Requeued { .. } | JobEvent::Returned { .. })) => {}
                Ok(Some(e)) => out.push(e),
                Ok(None) => panic!("worker stopped; events so far: {out:?}"),
                Err(_) => panic!(
                    "only {} of {n} jobs settled within {within:?}: {out:?}",
                    out.len()
                ),
            }
        }
        out
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops")
            .expect("join");
        r.expect("worker result");
    }
}

/// The `worker` binary configured through the contract's environment
/// variables only, against this env's S3 server, queue and simulator.
pub fn worker_binary(env: &TestEnv) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", amqp_url())
        .env("WORKER_QUEUE", &env.queue)
        .env("WORKER_DELIVERY_LIMIT", env.delivery_limit.to_string())
        .env("WORKER_RETRY_DELAYS_SECS", RETRY_DELAYS)
        .env("WORKER_CONCURRENCY", "32")
        .env("KLING_BASE_URL", env.sim.base_url())
        .env("KLING_ACCESS_KEY", KLING_AK)
        .env("KLING_SECRET_KEY", KLING_SK)
        .env("KLING_RESULT_HOSTS", env.sim.result_host())
        .env("ARCHIVE_URL", format!("s3://{}/bin", env.bucket))
        .env("SOURCE_S3_BUCKETS", &env.bucket)
        .env("S3_FORCE_PATH_STYLE", "true")
        .env("AWS_ENDPOINT_URL", &env.s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", S3_AK)
        .env("AWS_SECRET_ACCESS_KEY", S3_SK)
        .env("AWS_REGION", "us-east-1")
        .env("LOG_FORMAT", "json")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "debug,aws=info,hyper=info,h2=info,rustls=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// One PNG chunk: length, type, data, CRC-32.
pub fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(data.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = 0xFFFF_FFFFu32;
    for &b in kind.iter().chain(data) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    out.extend_from_slice(&(!crc).to_be_bytes());
    out
}

/// A PNG whose (valid) header declares 60000x60000 pixels over a 64x64
/// body: a decompression bomb.
pub fn dimension_bomb_png() -> Vec<u8> {
    let mut png = png(64, 64);
    let mut ihdr = png[16..29].to_vec();
    ihdr[..4].copy_from_slice(&60_000u32.to_be_bytes());
    ihdr[4..8].copy_from_slice(&60_000u32.to_be_bytes());
    png.splice(8..33, png_chunk(b"IHDR", &ihdr));
    png
}

/// A generated test image.
pub fn jpeg(w: u32, h: u32) -> Vec<u8> {
    encode(
        &kling_archiver::demo::scene(w, h, 1),
        image::ImageFormat::Jpeg,
    )
}

pub fn png(w: u32, h: u32) -> Vec<u8> {
    encode(
        &kling_archiver::demo::scene(w, h, 2),
        image::ImageFormat::Png,
    )
}

pub fn encode(img: &image::RgbImage, f: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, f).expect("encode");
    out.into_inner()
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Serve fixed bytes over HTTP on loopback: `GET /<name>`.
pub async fn serve_files(files: Vec<(&'static str, Vec<u8>)>) -> String {
    use axum::routing::get;
    let mut router = axum::Router::new();
    for (name, body) in files {
        let body = bytes::Bytes::from(body);
        router = router.route(
            &format!("/{name}"),
            get(move || {
                let b = body.clone();
                async move { b }
            }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

pub fn result_hosts(sim: &SimHandle) -> Vec<HostPattern> {
    vec![HostPattern::parse(&sim.result_host()).expect("host")]
}

/// Check a manifest against the published schema, `docs/manifest.schema.json`.
pub fn assert_manifest_schema(manifest: &[u8]) {
    let errors = manifest_schema_errors(manifest);
    assert!(
        errors.is_empty(),
        "manifest breaks docs/manifest.schema.json:\n{}\n{}",
        errors.join("\n"),
        String::from_utf8_lossy(manifest)
    );
}

/// What the published schema says is wrong with a manifest.
pub fn manifest_schema_errors(manifest: &[u8]) -> Vec<String> {
    static VALIDATOR: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/manifest.schema.json"))
                .expect("the schema is JSON");
        jsonschema::validator_for(&schema).expect("the schema compiles")
    });
    let value: serde_json::Value = serde_json::from_slice(manifest).expect("manifest is JSON");
    validator
        .iter_errors(&value)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect()
}

/// Poll `check` until it gives `Some`, at most `within`: the one bounded
/// wait of the tests (no test sleeps to let things settle). Panics naming
/// `what` when the time runs out.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `rabbitmqctl` output lines, without the banner.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is installed with RabbitMQ");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Close, from the broker side, the first connection whose client
/// properties contain `needle` (worker connections are named
/// `kling-archiver worker pid <pid> queue <queue>`).
pub fn close_connection_matching(needle: &str) {
    let list = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let conn = list
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("no connection matching {needle:?} in:\n{list}"))
        .to_owned();
    rabbitmqctl(&["close_connection", &conn, "test: connection closed mid-run"]);
}
