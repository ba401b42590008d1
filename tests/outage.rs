//! Any outage, any length: the archive or Kling's CDN away mid-batch. The
//! worker (the real binary) pauses, hands held jobs back uncharged, keeps
//! billed answers until the archive takes them, and is back within seconds
//! of the dependency's return: 0 lost, 0 dead-lettered, 0 extra billed
//! calls, no job charged more than two deliveries.
//!
//! The S3 server is the in-process s3s-fs (taken down and brought back on
//! the same port and data); Kling and its CDN are the simulator.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::procs::{Proc, bin_store, missing_manifests, sum};
use common::{Backend, TestEnv, b64, jpeg};
use kling_archiver::archive::Store;

/// The contract's production retry tiers.
const DEFAULT_TIERS: &str = "5,30,300";
/// Every job must be archived this soon after the dependency's return.
const BACK_WITHIN: Duration = Duration::from_secs(30);

/// Publish `n` jobs, each a distinct image.
async fn publish_distinct(env: &TestEnv, prefix: &str, n: u32) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let body = serde_json::json!({"job_id": id, "image_base64": b64(&jpeg(320 + i, 300))});
        env.publish_json(body).await;
        ids.insert(id);
    }
    ids
}

/// Wait until at least `n` of `ids` have a manifest.
async fn wait_archived_at_least(store: &Store, ids: &BTreeSet<String>, n: usize, p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = ids.len() - missing_manifests(store, ids).await.len();
        if done >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} archived before the outage\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Seconds from `since` until every job has a manifest (panics after
/// `within`).
async fn seconds_until_all(store: &Store, ids: &BTreeSet<String>, since: Instant, p: &Proc) -> f64 {
    let within = Duration::from_secs(240);
    loop {
        let missing = missing_manifests(store, ids).await;
        if missing.is_empty() {
            return since.elapsed().as_secs_f64();
        }
        assert!(
            since.elapsed() < within,
            "{} jobs never archived: {missing:?}\n{}",
            missing.len(),
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The charged delivery (`job.attempt`) each job was archived on, from
/// the worker's JSON log.
fn archived_attempts(logs: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in logs.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if !matches!(v["message"].as_str(), Some("archived" | "already archived")) {
            continue;
        }
        let span = &v["span"];
        if let (Some(id), Some(attempt)) = (span["job.id"].as_str(), span["job.attempt"].as_u64()) {
            out.insert(id.to_owned(), attempt);
        }
    }
    out
}

/// What `/readyz` answers: (status, body).
async fn readyz(p: &Proc) -> (u16, String) {
    let url = format!("http://127.0.0.1:{}/readyz", p.port);
    match reqwest::get(&url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Poll until the worker reports itself suspended for `cause`: readiness
/// says so with the code and an action, and the gauge is 1.
async fn wait_suspended(p: &Proc, cause: &str) {
    let code = format!("{cause}_down");
    let gauge = format!("kling_archiver_suspended{{cause=\"{cause}\"}}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = readyz(p).await;
        if status == 503 && body.contains(&code) && p.counter(&gauge).await == 1.0 {
            assert!(body.contains("action"), "{body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not suspended for {cause}: /readyz {status} {body}\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Delete the retry queues the binary declared for `tiers` (the test env
/// cleans up its own).
async fn delete_tier_queues(env: &TestEnv, tiers: &str) {
    for t in tiers.split(',') {
        common::rabbitmqctl(&["delete_queue", &format!("{}.retry.{t}s", env.queue)]);
    }
}

struct Figures {
    what: &'static str,
    jobs: usize,
    billed: u64,
    dead: usize,
    max_attempt: u64,
    back_s: f64,
    answers_lost: f64,
    /// Billed answers that waited in memory for the archive.
    held_answers: usize,
    /// Jobs handed back uncharged while suspended.
    returned: usize,
}

impl Figures {
    fn check(&self) {
        eprintln!(
            "{}: {} jobs, {} billed calls ({} extra), {} dead-lettered, at most {} charged deliveries per job, last job archived {:.1} s after the return, {} answers lost, {} answers held in memory until the archive took them, {} jobs handed back uncharged",
            self.what,
            self.jobs,
            self.billed,
            self.billed as i64 - self.jobs as i64,
            self.dead,
            self.max_attempt,
            self.back_s,
            self.answers_lost,
            self.held_answers,
            self.returned
        );
        assert_eq!(self.dead, 0, "nothing dead-lettered");
        assert_eq!(self.billed, self.jobs as u64, "no extra billed call");
        assert!(
            self.max_attempt <= 2,
            "a job used {} deliveries",
            self.max_attempt
        );
        assert!(
            self.back_s <= BACK_WITHIN.as_secs_f64(),
            "the backlog took {:.1} s after the return",
            self.back_s
        );
        assert_eq!(self.answers_lost, 0.0);
    }
}

/// The dependency an outage takes away.
#[derive(Clone, Copy)]
enum Away {
    /// The S3 server: every connection cut, new ones closed at once.
    Archive,
    /// Kling's CDN: every result download answers 503.
    Cdn,
}

impl Away {
    /// The `cause` the worker reports it by.
    fn cause(self) -> &'static str {
        match self {
            Away::Archive => "archive",
            Away::Cdn => "cdn",
        }
    }

    fn set(self, env: &TestEnv, down: bool) {
        match self {
            Away::Archive => env.s3.set_down(down),
            Away::Cdn => env.sim.set_cdn_down(down),
        }
    }
}

/// Run `jobs` jobs on one worker (`--concurrency 8`) with `tiers`; after 24
/// manifests take `dependency` away for `away`, bring it back, and check
/// the figures.
async fn ride_out(
    what: &'static str,
    tiers: &'static str,
    jobs: u32,
    dependency: Away,
    away: Duration,
) {
    let env = TestEnv::new(Backend::S3).await;
    ride_out_in(&env, what, tiers, jobs, dependency, away)
        .await
        .check();
    env.cleanup().await;
}

async fn ride_out_in(
    env: &TestEnv,
    what: &'static str,
    tiers: &'static str,
    jobs: u32,
    dependency: Away,
    away: Duration,
) -> Figures {
    env.sim.set_latency(Duration::from_millis(300));
    let ids = publish_distinct(env, what.split(' ').next().unwrap_or("o"), jobs).await;
    let p = Proc::start(
        env,
        &[
            ("WORKER_CONCURRENCY", "8"),
            ("WORKER_RETRY_DELAYS_SECS", tiers),
            ("WORKER_DELIVERY_LIMIT", "5"),
        ],
    );
    let store = bin_store(env);
    wait_archived_at_least(&store, &ids, 24, &p).await;
    dependency.set(env, true);
    wait_suspended(&p, dependency.cause()).await;
    tokio::time::sleep(away).await;
    dependency.set(env, false);
    let back = Instant::now();
    let back_s = seconds_until_all(&store, &ids, back, &p).await;
    env.wait_ready(&env.queue, 0, Duration::from_secs(30)).await;
    let (status, body) = readyz(&p).await;
    assert_eq!(status, 200, "ready again: {body}");
    let logs = p.logs();
    let attempts = archived_attempts(&logs);
    let figures = Figures {
        what,
        jobs: ids.len(),
        billed: env.sim.stats().billed_calls,
        dead: env.drain_dead_letters().await.len(),
        max_attempt: attempts.values().copied().max().unwrap_or(0),
        back_s,
        answers_lost: sum(
            std::slice::from_ref(&p),
            "kling_archiver_answers_lost_total",
        )
        .await,
        held_answers: logs.matches("stored after the archive came back").count(),
        returned: logs
            .matches("message returned to the queue uncharged")
            .count(),
    };
    assert!(
        logs.contains("dependency down") && logs.contains("dependency answers again"),
        "one line says what the worker waits for, one that it is back"
    );
    drop(p);
    delete_tier_queues(env, tiers).await;
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_archive_away_90_s_with_the_default_tiers() {
    let away = Duration::from_secs(90);
    ride_out(
        "s3-away-90s with the default tiers",
        DEFAULT_TIERS,
        100,
        Away::Archive,
        away,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_archive_away_longer_than_every_retry_tier() {
    // 1 + 2 + 5 s of tiers against 60 s away: in production, an outage of
    // hours against 5 s + 30 s + 5 min.
    let away = Duration::from_secs(60);
    ride_out(
        "s3-away-60s past tiers of 1,2,5 s",
        "1,2,5",
        60,
        Away::Archive,
        away,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn klings_cdn_answering_503_for_2_minutes() {
    let away = Duration::from_secs(120);
    ride_out(
        "cdn-503-120s with the default tiers",
        DEFAULT_TIERS,
        100,
        Away::Cdn,
        away,
    )
    .await;
}
