//! A RabbitMQ node restarted under a running worker (not just a cut
//! connection): `rabbitmqctl stop_app` / `start_app` on a second node this
//! test starts on its own ports and data directory, so the shared broker is
//! not disturbed. The worker (the real binary) consumes again by itself and
//! nothing is lost.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::{Proc, bin_store, missing_manifests};
use common::{Backend, TestEnv, b64, free_port, jpeg};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// A RabbitMQ node of this test's own.
struct Node {
    name: String,
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Start a node on free ports with its own data, log and config (no
    /// plugins), and wait until it takes AMQP connections.
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir(root.join(sub)).expect("mkdir");
        }
        let port = free_port();
        std::fs::write(root.join("enabled_plugins"), "[].\n").expect("plugins");
        std::fs::write(
            root.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("conf");
        std::fs::write(root.join("rabbitmq-env.conf"), "").expect("env conf");
        // Run as root, the server drops to the rabbitmq user: let it write.
        let _ = Command::new("chmod")
            .args(["-R", "a+rwX"])
            .arg(root)
            .status();
        let name = format!("kt{}@localhost", std::process::id());
        let p = |s: &str| root.join(s).display().to_string();
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", p("pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server is on PATH (the test command checks RabbitMQ is installed)");
        let node = Self {
            name,
            port,
            child,
            _dir: dir,
        };
        node.wait_amqp().await;
        node
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, command: &str) {
        common::rabbitmqctl(&["-n", &self.name, command]);
    }

    async fn wait_amqp(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(c) = Connection::connect(&self.url(), ConnectionProperties::default()).await {
                let _ = c.close(200, "".into()).await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never took AMQP",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.name, "stop"])
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn ready(p: &Proc) -> bool {
    let url = format!("http://127.0.0.1:{}/readyz", p.port);
    matches!(reqwest::get(&url).await, Ok(r) if r.status().as_u16() == 200)
}

async fn wait_ready(p: &Proc, within: Duration, what: &str) -> f64 {
    let started = Instant::now();
    while !ready(p).await {
        assert!(started.elapsed() < within, "{what}\n{}", p.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_node_restart_mid_batch_loses_nothing_and_needs_no_operator() {
    const JOBS: u32 = 40;
    let node = Node::start().await;
    // The env's S3 server and simulator; its queue name, on the new node.
    let env = TestEnv::new(Backend::S3).await;
    env.sim.set_latency(Duration::from_millis(300));
    let mut p = Proc::start(
        &env,
        &[
            ("AMQP_URL", node.url().as_str()),
            ("WORKER_CONCURRENCY", "8"),
        ],
    );
    wait_ready(&p, Duration::from_secs(60), "the worker never got ready").await;

    let conn = Connection::connect(&node.url(), ConnectionProperties::default())
        .await
        .expect("connect to the node");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut ids = BTreeSet::new();
    for i in 0..JOBS {
        let id = format!("node-{i}");
        let body = serde_json::json!({"job_id": id, "image_base64": b64(&jpeg(300 + i, 300))});
        let confirm = ch
            .basic_publish(
                "".into(),
                env.queue.clone().into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
        ids.insert(id);
    }
    let _ = conn.close(200, "".into()).await;

    let store = bin_store(&env);
    let deadline = Instant::now() + Duration::from_secs(120);
    while missing_manifests(&store, &ids).await.len() > ids.len() * 3 / 4 {
        assert!(Instant::now() < deadline, "no progress\n{}", p.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.ctl("stop_app");
    tokio::time::sleep(Duration::from_secs(5)).await;
    node.ctl("start_app");
    let back_s = wait_ready(
        &p,
        Duration::from_secs(120),
        "the worker did not consume again after the node came back",
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let missing = missing_manifests(&store, &ids).await;
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} jobs never archived: {missing:?}\n{}",
            missing.len(),
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        p.child.try_wait().expect("wait").is_none(),
        "the same worker process, never restarted"
    );
    // Nothing went to the node's dead-letter queue.
    let conn = Connection::connect(&node.url(), ConnectionProperties::default())
        .await
        .expect("reconnect");
    let ch = conn.create_channel().await.expect("channel");
    let dead = ch
        .basic_get(
            env.topology().dead_letter_queue().into(),
            BasicGetOptions::default(),
        )
        .await
        .expect("basic_get");
    assert!(dead.is_none(), "a dead letter: {dead:?}");
    let _ = conn.close(200, "".into()).await;
    let billed = env.sim.stats().billed_calls;
    eprintln!(
        "broker node stop_app/start_app mid-batch: {JOBS} jobs archived, 0 dead-lettered, worker ready again {back_s:.1} s after start_app, {billed} billed calls"
    );
    assert!(
        p.logs().contains("lost RabbitMQ"),
        "the log says the broker was lost"
    );
    p.sigterm();
    drop(node);
    env.cleanup().await;
}
