//! Chaos: a 200-job batch while the worker process is `kill -9`ed twice
//! and restarted, and while the S3 server is down for 20 s. For each: every
//! job ends archived (or dead-lettered with a reason), no manifest names a
//! missing object (`worker verify` logic), and Kling calls billed beyond
//! one per job stay within the jobs that were in flight at each failure.
//! (A cut broker connection and every transient Kling fault have their
//! own tests: `tests/broker.rs` and `tests/kling.rs`.)

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Backend, TestEnv, b64, eventually, jpeg};
use kling_archiver::admin::verify;
use kling_archiver::archive::Store;
use kling_archiver::broker::JobEvent;
use kling_archiver::pipeline::Hooks;

const JOBS: usize = 200;
const CONCURRENCY: usize = 16;

async fn publish_batch(env: &TestEnv) {
    for i in 0..JOBS {
        // Distinct images: each job is its own Kling call.
        let img = jpeg(400 + (i % 50) as u32, 400 + (i / 50) as u32);
        env.publish_json(
            serde_json::json!({"job_id": format!("x-{i}"), "image_base64": b64(&img)}),
        )
        .await;
    }
}

async fn archived(store: &Store) -> BTreeSet<String> {
    store
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|k| {
            k.as_str()
                .strip_suffix("/manifest.json")
                .map(|j| j.trim_start_matches("jobs/").to_owned())
        })
        .collect()
}

async fn wait_archived(store: &Store, n: usize, within: Duration) -> usize {
    eventually(&format!("{n} archived"), within, || async {
        let got = archived(store).await.len();
        (got >= n).then_some(got)
    })
    .await
}

/// Every manifest's objects exist with their recorded hash.
async fn assert_archive_sound(store: &Store) {
    let report = verify::run(
        store,
        &verify::Options {
            since: None,
            quick: false,
            progress: false,
        },
    )
    .await
    .unwrap();
    assert!(report.is_clean(), "{:#?}", report.findings);
    assert_eq!(report.manifests, JOBS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_twice_mid_batch_loses_nothing_and_bills_only_what_was_in_flight() {
    let env = TestEnv::new(Backend::S3).await;
    env.sim.set_latency(Duration::from_millis(400));
    publish_batch(&env).await;
    let store = Store::s3(env.s3.client.clone(), env.bucket.clone(), "bin");
    let start = || {
        common::worker_binary(&env)
            .env("WORKER_CONCURRENCY", CONCURRENCY.to_string())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start worker")
    };
    let mut in_flight_at_kills = Vec::new();
    for stop_at in [40, 110] {
        let mut child = start();
        wait_archived(&store, stop_at, Duration::from_secs(120)).await;
        // Kill while Kling calls are open: the window a kill can make the
        // worker pay for twice (at most its concurrency).
        eventually(
            "a Kling call in flight",
            Duration::from_secs(10),
            || async { (env.sim.stats().in_flight > 0).then_some(()) },
        )
        .await;
        in_flight_at_kills.push(env.sim.stats().in_flight);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let mut child = start();
    wait_archived(&store, JOBS, Duration::from_secs(180)).await;
    env.wait_ready(&env.queue, 0, Duration::from_secs(30)).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();

    assert!(
        env.drain_dead_letters().await.is_empty(),
        "nothing dead-lettered"
    );
    assert_archive_sound(&store).await;
    let billed = env.sim.stats().billed_calls as usize;
    let extra = billed - JOBS;
    eprintln!(
        "kill -9 x2: {billed} billed calls for {JOBS} jobs ({extra} extra); Kling calls open at the kills: {in_flight_at_kills:?}"
    );
    assert!(
        extra <= 2 * CONCURRENCY,
        "{extra} extra billed calls; at most {CONCURRENCY} jobs were in flight at each kill"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_outage_of_20_s_mid_batch_loses_nothing() {
    let env = TestEnv::new(Backend::S3).await;
    env.sim.set_latency(Duration::from_millis(200));
    publish_batch(&env).await;
    let mut cfg = env.config();
    cfg.concurrency = CONCURRENCY;
    cfg.prefetch = CONCURRENCY;
    let store = env.store();
    let mut w = env.start_worker(cfg, Hooks::default());
    wait_archived(&store, 50, Duration::from_secs(120)).await;
    let in_flight = env.sim.stats().in_flight;
    env.s3.set_down(true);
    tokio::time::sleep(Duration::from_secs(20)).await;
    env.s3.set_down(false);

    // Every job settles, archived: the outage outlasts the tests' retry
    // tiers (1 s, 2 s), but the worker suspends for its archive instead of
    // spending deliveries (`tests/outage.rs` has the longer outages).
    let mut settled = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(400);
    while settled.len() < JOBS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "{} of {JOBS} settled", settled.len());
        for e in w.settled(1, left).await {
            match e {
                JobEvent::Archived { job_id, .. } => {
                    settled.insert(job_id);
                }
                JobEvent::DeadLettered {
                    job_id: Some(id), ..
                } => {
                    settled.insert(id);
                }
                _ => {}
            }
        }
    }
    use kling_archiver::admin::dlq;
    let url = secrecy::SecretString::from(common::amqp_url());
    let groups = dlq::list(&env.topology(), &url).await.unwrap();
    let dead: usize = groups.values().map(|g| g.count).sum();
    for (code, g) in &groups {
        assert!(
            !code.is_empty() && !g.sample_reason.is_empty(),
            "{code}: {g:?}"
        );
    }
    assert_eq!(dead, 0, "nothing dead-lettered: {groups:?}");
    let first_pass = archived(&store).await.len();
    // A job can be both: archived, while a duplicate copy of its message
    // (at-least-once) ran out of deliveries. Replaying that copy finds the
    // manifest and does nothing.
    assert!(first_pass + dead >= JOBS, "{first_pass} + {groups:?}");
    // Nothing is lost: the dead letters keep their bodies; replaying them
    // archives every one.
    let replayed = dlq::replay(&env.topology(), &url, None).await.unwrap();
    assert_eq!(replayed, dead);
    wait_archived(&store, JOBS, Duration::from_secs(300)).await;
    w.stop().await;
    assert!(env.drain_dead_letters().await.is_empty());
    let billed = env.sim.stats().billed_calls as usize;
    eprintln!(
        "S3 down 20 s: {first_pass} archived and {dead} dead-lettered at first ({groups:?}), all {JOBS} after `dlq replay`; {billed} billed calls; {in_flight} Kling calls open at the cut"
    );
    assert_archive_sound(&store).await;
    assert!(
        billed <= JOBS + CONCURRENCY,
        "{billed} billed calls: more than one per job beyond the {CONCURRENCY} in flight"
    );
    env.cleanup().await;
}
