//! Billed once per distinct image, across a fleet of real `worker`
//! processes on one queue: the claim (lease) in the archive, its takeover
//! after a holder is SIGKILLed, a billed but broken answer kept, and the
//! start-up refusal on an S3 server that ignores `If-None-Match`.
//!
//! The S3 server is s3s-fs behind `common::atomic_s3` (conditional writes
//! serialised per key, as real S3 does); Kling is the simulator, which
//! counts billed calls.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::procs::{Proc, bin_store, missing_manifests, sum, wait_all_archived};
use common::{Backend, TestEnv, b64, jpeg};
use kling_archiver::archive::{Sha256, Store, layout};
use kling_archiver::broker::JobEvent;
use kling_archiver::job::JobId;
use kling_archiver::pipeline::Hooks;
use kling_archiver::sim::Fault;

/// Close, from the broker side, the connection of the worker with `pid`.
fn close_connection_of(pid: u32, queue: &str) {
    common::close_connection_matching(&format!("worker pid {pid} queue {queue}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_bill_exactly_one_call_per_distinct_image_through_a_connection_cut() {
    const IMAGES: u32 = 40;
    let env = TestEnv::new(Backend::S3).await;
    env.sim.set_latency(Duration::from_millis(300));
    // Each image under three job ids, side by side in the queue (so its
    // jobs run at once on different workers), every third message twice.
    let mut ids = BTreeSet::new();
    let mut messages = 0;
    for i in 0..IMAGES {
        let image = b64(&jpeg(320 + i, 320));
        for copy in 0..3 {
            let id = format!("fl{copy}-{i}");
            let body = serde_json::json!({"job_id": id, "image_base64": image});
            env.publish_json(body.clone()).await;
            messages += 1;
            if messages % 3 == 0 {
                env.publish_json(body).await;
                messages += 1;
            }
            ids.insert(id);
        }
    }
    let started = std::time::Instant::now();
    let mut procs: Vec<Proc> = (0..3).map(|_| Proc::start(&env, &[])).collect();
    let store = bin_store(&env);
    // Mid-run: cut one worker's broker connection while jobs are in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while missing_manifests(&store, &ids).await.len() > ids.len() * 3 / 4 {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    close_connection_of(procs[0].child.id(), &env.queue);

    wait_all_archived(&store, &ids, Duration::from_secs(120), &procs).await;
    env.wait_ready(&env.queue, 0, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    let billed = env.sim.stats().billed_calls;
    let reused = sum(&procs, "kling_archiver_recognitions_reused_total").await;
    let waits = sum(&procs, "kling_archiver_lease_waits_total").await;
    let takeovers = sum(&procs, "kling_archiver_lease_takeovers_total").await;
    let ambiguous = sum(&procs, "kling_archiver_kling_ambiguous_calls_total").await;
    eprintln!(
        "fleet: 3 workers, {IMAGES} distinct images, {} jobs, {messages} messages, one connection closed: \
         {billed} billed calls ({:.2} per distinct image), {reused} recognitions reused, {waits} lease waits, \
         {takeovers} takeovers, {ambiguous} ambiguous calls, {:.1} s",
        ids.len(),
        billed as f64 / f64::from(IMAGES),
        elapsed.as_secs_f64()
    );
    for p in &mut procs {
        p.sigterm();
    }
    assert!(
        env.drain_dead_letters().await.is_empty(),
        "nothing dead-lettered"
    );
    assert_eq!(
        billed,
        u64::from(IMAGES),
        "exactly one billed call per distinct image"
    );
    assert_eq!(takeovers, 0.0, "no holder died");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_lease_holder_is_taken_over_by_exactly_one_worker() {
    let env = TestEnv::new(Backend::S3).await;
    // A long call, so the holder dies in the middle of it.
    env.sim.set_latency(Duration::from_secs(4));
    let ttl = [("LEASE_TTL_SECS", "2")];
    let image = b64(&jpeg(480, 360));
    let ids: BTreeSet<String> = (0..3).map(|i| format!("kill-{i}")).collect();
    for id in &ids {
        env.publish_json(serde_json::json!({"job_id": id, "image_base64": image}))
            .await;
    }
    let mut holder = Proc::start(&env, &ttl);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Kill once Kling has billed the call (the simulator counts it before
    // its latency): the answer dies with the holder.
    while env.sim.stats().billed_calls == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the holder never called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.child.kill().unwrap(); // SIGKILL, mid-call, lease held
    holder.child.wait().unwrap();
    let procs: Vec<Proc> = (0..2).map(|_| Proc::start(&env, &ttl)).collect();
    wait_all_archived(&bin_store(&env), &ids, Duration::from_secs(60), &procs).await;
    let takeovers = sum(&procs, "kling_archiver_lease_takeovers_total").await;
    let billed = env.sim.stats().billed_calls;
    eprintln!(
        "holder SIGKILLed mid-call: {takeovers} takeover(s), {billed} billed calls (the dead holder's included)"
    );
    assert_eq!(takeovers, 1.0, "exactly one worker takes over");
    assert_eq!(billed, 2, "the dead holder's call and the taker's, no more");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_server_that_ignores_if_none_match_is_refused_at_start_naming_the_flag() {
    let env = TestEnv::new(Backend::S3).await;
    let lax = common::start_s3_ignoring_if_none_match().await;
    common::create_bucket(&lax.client, &env.bucket).await;
    let out = common::worker_binary(&env)
        .env("AWS_ENDPOINT_URL", &lax.endpoint)
        .env("HTTP_ADDR", "off")
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("If-None-Match"), "{stderr}");
    assert!(
        stderr.contains("--allow-unsafe-conditional-writes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ARCHIVE_UNSAFE_CONDITIONAL_WRITES=true"),
        "{stderr}"
    );

    // With the risk accepted it runs (and says so).
    env.publish_json(serde_json::json!({"job_id": "lax-1", "image_base64": b64(&jpeg(400, 400))}))
        .await;
    let mut w = Proc::start(
        &env,
        &[
            ("AWS_ENDPOINT_URL", &lax.endpoint),
            ("ARCHIVE_UNSAFE_CONDITIONAL_WRITES", "true"),
        ],
    );
    let store = Store::s3(lax.client.clone(), env.bucket.clone(), "bin");
    let ids = BTreeSet::from(["lax-1".to_owned()]);
    wait_all_archived(
        &store,
        &ids,
        Duration::from_secs(60),
        std::slice::from_ref(&w),
    )
    .await;
    w.sigterm();
    assert!(
        w.logs().contains("ARCHIVE_UNSAFE_CONDITIONAL_WRITES=true"),
        "{}",
        w.logs()
    );
    env.cleanup().await;
}

/// Kling bills an answer whose first segment URL does not parse: the call
/// is made once, its raw answer is stored, the good segments are archived
/// and the broken one is named in the manifest; the same image under
/// another job id and a redelivery make no further call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_billed_but_broken_answer_is_kept_and_never_paid_for_again() {
    let env = TestEnv::new(Backend::S3).await;
    env.sim.faults().push(Fault::BadSegmentUrl);
    let img = jpeg(500, 400);
    let sha = Sha256::of(&img);
    let mut w = env.start_worker(env.config(), Hooks::default());
    for id in ["bad-1", "bad-2"] {
        env.publish_json(serde_json::json!({"job_id": id, "image_base64": b64(&img)}))
            .await;
    }
    let events = w.settled(2, Duration::from_secs(60)).await;
    assert!(
        events
            .iter()
            .all(|e| matches!(e, JobEvent::Archived { .. })),
        "{events:?}"
    );
    // Redelivery of the first job: already archived, no call.
    env.publish_json(serde_json::json!({"job_id": "bad-1", "image_base64": b64(&img)}))
        .await;
    w.settled(1, Duration::from_secs(30)).await;
    assert_eq!(
        env.sim.stats().billed_calls,
        1,
        "one billed call for the image"
    );

    let store = env.store();
    let record = store
        .get(&layout::recognition(&sha))
        .await
        .unwrap()
        .expect("record stored");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let raw = &record["recognition"]["raw"];
    assert_eq!(raw["code"], 0, "the raw answer is kept: {record}");
    assert!(raw.to_string().contains("exa mple.invalid"), "{raw}");
    for id in ["bad-1", "bad-2"] {
        let key = layout::manifest(&JobId::parse(id).unwrap());
        let body = store.get(&key).await.unwrap().unwrap();
        common::assert_manifest_schema(&body);
        let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let segs = m["segments"].as_array().unwrap();
        let broken: Vec<_> = segs.iter().filter(|s| s.get("problem").is_some()).collect();
        assert_eq!(broken.len(), 1, "{m}");
        assert_eq!(broken[0]["is_contain"], true);
        assert!(broken[0].get("key").is_none());
        let archived = segs.iter().filter(|s| s.get("key").is_some()).count();
        assert!(archived >= 1, "the good segments are archived: {m}");
        for s in segs.iter().filter(|s| s.get("key").is_some()) {
            let k = store.relative_key(s["key"].as_str().unwrap()).unwrap();
            assert!(store.head(&k).await.unwrap().is_some(), "{k}");
        }
    }
    w.stop().await;
    env.cleanup().await;
}

/// SIGTERM while a Kling call is open past the shutdown timeout: the job
/// is aborted, its call is not. The billed answer is stored before the
/// process exits, and the next worker archives the job without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_never_throws_away_a_call_between_its_answer_and_its_record() {
    let env = TestEnv::new(Backend::S3).await;
    env.sim.set_latency(Duration::from_secs(3));
    let img = jpeg(420, 380);
    let sha = Sha256::of(&img);
    env.publish_json(serde_json::json!({"job_id": "term-1", "image_base64": b64(&img)}))
        .await;
    let mut w = Proc::start(&env, &[("SHUTDOWN_TIMEOUT_SECS", "1")]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.sim.stats().billed_calls == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Billed, answer 3 s away, shutdown timeout 1 s.
    assert_eq!(w.sigterm(), Some(0), "a clean stop:\n{}", w.logs());
    let store = bin_store(&env);
    assert!(
        store
            .get(&layout::recognition(&sha))
            .await
            .unwrap()
            .is_some(),
        "the billed answer was stored before exit:\n{}",
        w.logs()
    );
    let next = Proc::start(&env, &[]);
    let ids = BTreeSet::from(["term-1".to_owned()]);
    wait_all_archived(
        &store,
        &ids,
        Duration::from_secs(60),
        std::slice::from_ref(&next),
    )
    .await;
    assert_eq!(env.sim.stats().billed_calls, 1, "never paid twice");
    env.cleanup().await;
}
