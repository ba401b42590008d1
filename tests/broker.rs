//! The worker against RabbitMQ misbehaving: the connection closed from the
//! broker side mid-batch.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Backend, TestEnv, b64, eventually, jpeg};
use kling_archiver::broker::JobEvent;
use kling_archiver::pipeline::{Hooks, Outcome};
use tokio::time::Instant;

/// Close, from the broker side, the worker connection consuming `queue`.
fn kill_worker_connection(queue: &str) {
    common::close_connection_matching(&format!("queue {queue}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_killed_mid_batch_loses_nothing_and_bills_nothing_twice() {
    let env = TestEnv::new(Backend::S3).await;
    // Slow enough that jobs are in flight whenever rabbitmqctl gets there.
    env.sim.set_latency(Duration::from_millis(1000));
    let jobs = 40u32;
    for i in 0..jobs {
        let img = jpeg(320 + i, 320);
        env.publish_json(
            serde_json::json!({"job_id": format!("k-{i}"), "image_base64": b64(&img)}),
        )
        .await;
    }
    let mut cfg = env.config();
    cfg.concurrency = 8;
    cfg.kling.max_in_flight = 8;
    let mut w = env.start_worker(cfg, Hooks::default());
    let mut done = BTreeSet::new();
    let mut reused = 0;
    let mut take = |e: JobEvent, done: &mut BTreeSet<String>| match e {
        JobEvent::Archived { job_id, outcome } => {
            // A redelivered copy finds its manifest, or the recognition
            // its abandoned original stored (jobs stop when their
            // connection is lost; a Kling call in flight still records).
            if matches!(
                outcome,
                Outcome::AlreadyArchived { .. }
                    | Outcome::Archived {
                        reused_recognition: true,
                        ..
                    }
            ) {
                reused += 1;
            }
            done.insert(job_id);
        }
        JobEvent::Requeued { .. } => {}
        e => panic!("{e:?}"),
    };
    while done.len() < 10 {
        let e = tokio::time::timeout(Duration::from_secs(60), w.events.recv())
            .await
            .expect("progress")
            .expect("worker running");
        take(e, &mut done);
    }
    let at = done.len();
    tokio::task::spawn_blocking({
        let q = env.queue.clone();
        move || kill_worker_connection(&q)
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.len() < jobs as usize {
        let e = tokio::time::timeout_at(deadline, w.events.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {jobs} done after the kill", done.len()))
            .expect("worker running");
        take(e, &mut done);
    }
    env.wait_ready(&env.queue, 0, Duration::from_secs(10)).await;
    let stats = env.sim.stats();
    eprintln!(
        "killed the connection after {at} jobs; all {jobs} archived, {reused} redeliveries found their manifest or their original's recognition, {} billed",
        stats.billed_calls
    );
    assert_eq!(stats.billed_calls, u64::from(jobs), "nothing billed twice");
    assert!(env.drain_dead_letters().await.is_empty());
    assert!(reused > 0, "jobs in flight at the kill were redelivered");
    eventually("consuming again", Duration::from_secs(15), || async {
        w.status.readiness().ok()
    })
    .await;
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enqueue_then_dlq_replay_round_trip() {
    use kling_archiver::admin::{dlq, enqueue};
    let env = TestEnv::new(Backend::Local).await;
    let topology = env.topology();
    let url = secrecy::SecretString::from(common::amqp_url());

    // A directory: three images, a broken one, a file that is not an image.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        std::fs::write(dir.path().join(format!("p{i}.jpg")), jpeg(400 + i, 400)).unwrap();
    }
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/broken.jpg"), b"\xff\xd8 not a jpeg").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    let opts = |source, dry_run| enqueue::Options {
        source,
        labels: [("batch".to_owned(), "t1".to_owned())].into(),
        dry_run,
        progress: false,
    };
    let source = enqueue::Source::detect(dir.path().to_str().unwrap()).unwrap();
    let dry = enqueue::run(&opts(source.clone(), true), &topology, &url, None)
        .await
        .unwrap();
    assert_eq!(dry.published, 4);
    assert_eq!(
        env.ready(&env.queue).await,
        0,
        "a dry run publishes nothing"
    );
    let real = enqueue::run(&opts(source, false), &topology, &url, None)
        .await
        .unwrap();
    assert_eq!(
        real.job_ids, dry.job_ids,
        "job ids are derived deterministically"
    );
    assert!(real.job_ids.iter().all(|id| id.starts_with("f-")));

    // A file of URLs with one line the worker would refuse.
    let base = common::serve_files(vec![("u.png", common::png(500, 300))]).await;
    let urls = dir.path().join("urls.txt");
    std::fs::write(
        &urls,
        format!("# sources\n{base}/u.png\nftp://nope/x.png\n"),
    )
    .unwrap();
    let source = enqueue::Source::detect(urls.to_str().unwrap()).unwrap();
    let r = enqueue::run(&opts(source, false), &topology, &url, None)
        .await
        .unwrap();
    assert_eq!(r.published, 1);
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    env.wait_ready(&env.queue, 5, Duration::from_secs(10)).await;

    // An s3:// prefix: image objects only (dry run).
    for (key, body) in [
        ("in/a.jpg", jpeg(300, 300)),
        ("in/readme.txt", b"x".to_vec()),
    ] {
        env.s3
            .client
            .put_object()
            .bucket(&env.bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    let source = enqueue::Source::detect(&format!("s3://{}/in/", env.bucket)).unwrap();
    let r = enqueue::run(&opts(source, true), &topology, &url, Some(&env.s3.client))
        .await
        .unwrap();
    assert_eq!(r.published, 1, "{r:?}");
    assert!(r.job_ids[0].starts_with("s-"));

    let mut cfg = env.config();
    cfg.fetch.allow_private = true;
    let mut w = env.start_worker(cfg.clone(), Hooks::default());
    let events = w.settled(5, Duration::from_secs(60)).await;
    let dead: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::DeadLettered { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(dead.len(), 1, "{events:?}");
    w.stop().await;

    let groups = dlq::list(&topology, &url).await.unwrap();
    eprint!("{}", dlq::render(&groups, &topology.dead_letter_queue()));
    assert_eq!(groups.len(), 1);
    let (code, group) = groups.iter().next().unwrap();
    assert_eq!(code, dead[0]);
    assert_eq!(group.count, 1);
    assert!(!group.sample_reason.is_empty());
    // Listing leaves the dead letters where they are.
    assert_eq!(env.ready(&topology.dead_letter_queue()).await, 1);

    assert_eq!(
        dlq::replay(&topology, &url, Some("no_such_code"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(dlq::replay(&topology, &url, Some(code)).await.unwrap(), 1);
    assert_eq!(env.ready(&topology.dead_letter_queue()).await, 0);
    env.wait_ready(&env.queue, 1, Duration::from_secs(10)).await;

    // The replayed job fails the same way (the image is still broken) and
    // comes back with a fresh reason; then it is purged.
    let mut w = env.start_worker(cfg, Hooks::default());
    let e = w.settled(1, Duration::from_secs(60)).await;
    assert!(matches!(e[0], JobEvent::DeadLettered { .. }), "{e:?}");
    w.stop().await;
    assert!(matches!(
        dlq::purge(&topology, &url, None, false).await,
        Err(dlq::DlqError::NotConfirmed)
    ));
    assert_eq!(
        dlq::purge(&topology, &url, Some(code), false)
            .await
            .unwrap(),
        1
    );
    assert!(dlq::list(&topology, &url).await.unwrap().is_empty());
    assert_eq!(env.sim.stats().billed_calls, 4);
    env.cleanup().await;
}
