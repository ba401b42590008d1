//! Worker processes of the real binary, and what tests read off them and
//! the archive.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kling_archiver::archive::{Store, layout};
use kling_archiver::job::JobId;

use super::{TestEnv, free_port};

/// One `worker` process, its ops port and its log file.
pub struct Proc {
    pub child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Proc {
    pub fn start(env: &TestEnv, extra: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = super::worker_binary(env);
        cmd.env("WORKER_CONCURRENCY", "16")
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "RUST_LOG",
                "info,aws=warn,hyper=warn,h2=warn,rustls=warn,lapin=warn",
            )
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().expect("start worker"),
            port,
            log,
        }
    }

    /// A counter's value on this worker's `/metrics` (0 when absent).
    pub async fn counter(&self, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let Ok(resp) = reqwest::get(&url).await else {
            return 0.0;
        };
        metric(&resp.text().await.unwrap_or_default(), name)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn sigterm(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of the samples in a `/metrics` body whose series starts with
/// `name` (a metric name, or a name with its labels: `x_sum{stage="a"}`);
/// 0 when there is none.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn sum(procs: &[Proc], name: &str) -> f64 {
    let mut total = 0.0;
    for p in procs {
        total += p.counter(name).await;
    }
    total
}

pub fn bin_store(env: &TestEnv) -> Store {
    Store::s3(env.s3.client.clone(), env.bucket.clone(), "bin")
}

pub async fn missing_manifests(store: &Store, ids: &BTreeSet<String>) -> Vec<String> {
    let mut missing = Vec::new();
    for id in ids {
        let key = layout::manifest(&JobId::parse(id).unwrap());
        if store.head(&key).await.unwrap().is_none() {
            missing.push(id.clone());
        }
    }
    missing
}

/// Poll until every job has a manifest.
pub async fn wait_all_archived(
    store: &Store,
    ids: &BTreeSet<String>,
    within: Duration,
    procs: &[Proc],
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let missing = missing_manifests(store, ids).await;
        if missing.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            for p in procs {
                eprintln!("--- worker log ---\n{}", p.logs());
            }
            panic!("{} jobs without a manifest: {missing:?}", missing.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
