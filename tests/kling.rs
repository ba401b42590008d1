//! The Kling client as production needs it, against the simulator, real
//! RabbitMQ and a real S3 server: what every answer does to the message,
//! exactly one billed call per job under faults, suspension on account
//! errors and outages, and a fleet converging under the account's limit.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Backend, RunningWorker, TestEnv, b64, eventually, jpeg};
use kling_archiver::broker::{BrokerError, JobEvent};
use kling_archiver::config::Config;
use kling_archiver::pipeline::Hooks;
use kling_archiver::sim::Fault;
use tokio::time::Instant;

const SETTLE: Duration = Duration::from_secs(60);

/// A job with an image no other job in the test has.
fn job(tag: &str, i: u32) -> serde_json::Value {
    serde_json::json!({
        "job_id": format!("{tag}-{i}"),
        "image_base64": b64(&jpeg(320 + i % 64, 320 + i / 64)),
    })
}

fn config(env: &TestEnv, concurrency: usize) -> Config {
    let mut cfg = env.config();
    cfg.concurrency = concurrency;
    cfg.prefetch = concurrency;
    cfg.kling.max_in_flight = concurrency;
    cfg.kling.probe_interval = Duration::from_millis(300);
    cfg
}

/// The next event that is not a requeue.
async fn next_event(w: &mut RunningWorker, within: Duration) -> JobEvent {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, w.events.recv()).await {
            Ok(Some(JobEvent::Requeued { .. })) => {}
            Ok(Some(e)) => return e,
            Ok(None) => panic!("worker stopped"),
            Err(_) => panic!("no event within {within:?}"),
        }
    }
}

/// Wait until the simulator has answered `n` more calls: while suspended
/// those are the supervisor's probes, so "nothing moved" is checked after
/// the worker had real chances to move, not after a guessed sleep.
async fn probes(env: &TestEnv, n: u64) {
    let start = env.sim.stats().recognize_calls;
    eventually(&format!("{n} probes"), Duration::from_secs(30), || async {
        (env.sim.stats().recognize_calls >= start + n).then_some(())
    })
    .await;
}

fn archived(events: &[JobEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, JobEvent::Archived { .. }))
        .count()
}

/// One row of the contract table: the code, and what must happen.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Retried within the job, archived, billed once.
    Archived,
    /// Dead-lettered with `kling_<code>`, nothing billed.
    DeadLettered,
    /// Worker suspended, message back in the queue uncharged, resumed.
    Suspended,
}

const TABLE: &[(u32, Fate)] = &[
    (1003, Fate::Archived),
    (1004, Fate::Archived),
    (1302, Fate::Archived),
    (1303, Fate::Archived),
    (5000, Fate::Archived),
    (5001, Fate::Archived),
    (5002, Fate::Archived),
    (7777, Fate::Archived), // unknown code, HTTP 500
    (1200, Fate::DeadLettered),
    (1201, Fate::DeadLettered),
    (1203, Fate::DeadLettered),
    (1300, Fate::DeadLettered),
    (1301, Fate::DeadLettered),
    (1000, Fate::Suspended),
    (1002, Fate::Suspended),
    (1100, Fate::Suspended),
    (1101, Fate::Suspended),
    (1102, Fate::Suspended),
    (1103, Fate::Suspended),
    (1304, Fate::Suspended),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_kling_answer_decides_the_message_fate() {
    let env = TestEnv::new(Backend::Local).await;
    let mut w = env.start_worker(config(&env, 4), Hooks::default());
    let mut billed = 0;
    let mut dead = BTreeMap::new();
    for (i, &(code, fate)) in TABLE.iter().enumerate() {
        let i = i as u32;
        match fate {
            Fate::Archived | Fate::DeadLettered => env.sim.faults().push(Fault::Code(code)),
            Fate::Suspended => env.sim.faults().set_account_error(Some(code)),
        }
        env.publish_json(job("code", i)).await;
        let label = format!("kling_{code}");
        let label = if code == 7777 {
            "kling_unknown_5xx".to_owned()
        } else {
            label
        };
        match fate {
            Fate::Archived => {
                let e = next_event(&mut w, SETTLE).await;
                assert!(matches!(e, JobEvent::Archived { .. }), "{code}: {e:?}");
                billed += 1;
            }
            Fate::DeadLettered => {
                let e = next_event(&mut w, SETTLE).await;
                match e {
                    JobEvent::DeadLettered { code: c, .. } => assert_eq!(c, label, "{code}"),
                    e => panic!("{code}: {e:?}"),
                }
                dead.insert(format!("code-{i}"), label.clone());
            }
            Fate::Suspended => {
                let e = next_event(&mut w, SETTLE).await;
                match e {
                    JobEvent::Returned { code: c, .. } => assert_eq!(c, label, "{code}"),
                    e => panic!("{code}: {e:?}"),
                }
                // Not ready, the message waits in the queue, nothing dead.
                let why = w
                    .status
                    .readiness()
                    .expect_err("suspended worker is not ready");
                assert_eq!(why.code, Some(label.as_str()), "{code}");
                env.wait_ready(&env.queue, 1, Duration::from_secs(10)).await;
                // Still suspended after several probes: nothing moved.
                probes(&env, 3).await;
                assert!(w.status.readiness().is_err());
                assert_eq!(env.ready(&env.queue).await, 1, "{code}");
                env.sim.faults().set_account_error(None);
                let e = next_event(&mut w, SETTLE).await;
                assert!(matches!(e, JobEvent::Archived { .. }), "{code}: {e:?}");
                assert!(w.status.readiness().is_ok(), "{code}: ready again");
                billed += 1;
            }
        }
        assert_eq!(env.sim.stats().billed_calls, billed, "after code {code}");
    }
    let letters = env.drain_dead_letters().await;
    let got: BTreeMap<_, _> = letters
        .iter()
        .map(|l| (l.job_id.clone().unwrap(), l.code.clone().unwrap()))
        .collect();
    assert_eq!(
        got, dead,
        "dead letters carry their code; no account error among them"
    );
    w.stop().await;

    // 1001 and 1202 mean the worker itself is broken: it stops, the
    // message goes back, nothing is dead-lettered.
    for (i, code) in [1001u32, 1202].into_iter().enumerate() {
        let w = env.start_worker(config(&env, 4), Hooks::default());
        env.sim.faults().push(Fault::Code(code));
        // An image no earlier job sent: its recognition is not on record.
        env.publish_json(job("bug", 100 + i as u32)).await;
        let r = tokio::time::timeout(SETTLE, w.handle)
            .await
            .expect("worker stops")
            .expect("join");
        assert!(matches!(r, Err(BrokerError::Fatal)), "{code}: {r:?}");
        env.wait_ready(&env.queue, 1, Duration::from_secs(10)).await;
        assert!(env.drain_dead_letters().await.is_empty());
        // The next worker (keys fixed, bug fixed) archives it.
        let mut w = env.start_worker(config(&env, 4), Hooks::default());
        let e = next_event(&mut w, SETTLE).await;
        assert!(matches!(e, JobEvent::Archived { .. }), "{code}: {e:?}");
        w.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_jobs_under_twenty_percent_faults_are_billed_once_each() {
    // The process-wide recorder: this test reads the ambiguous-call count.
    let metrics = kling_archiver::ops::metrics::install();
    let env = TestEnv::new(Backend::S3).await;
    env.sim.faults().set_random(
        0.2,
        vec![
            Fault::Code(5000),
            Fault::Code(5001),
            Fault::Code(5002),
            Fault::Code(1302),
            Fault::Code(1303),
            Fault::Code(1004),
            Fault::NonJson200,
            Fault::DropConnection,
            Fault::Hang(Duration::from_millis(200)),
        ],
    );
    let mut cfg = config(&env, 32);
    cfg.kling.max_attempts = 8;
    let mut w = env.start_worker(cfg, Hooks::default());
    let jobs = 200;
    for i in 0..jobs {
        env.publish_json(job("flt", i)).await;
    }
    let events = w.settled(jobs as usize, Duration::from_secs(600)).await;
    assert_eq!(archived(&events), jobs as usize, "{events:?}");
    let stats = env.sim.stats();
    let faults: u64 = stats
        .calls_by_code
        .iter()
        .filter(|(c, _)| **c != 0)
        .map(|(_, n)| n)
        .sum();
    let ambiguous: f64 = metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(kling_archiver::ops::metrics::KLING_AMBIGUOUS))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!(
        "{jobs} jobs: {} calls, {} billed, {faults} answered with an error code, {ambiguous} ambiguous (sent, no answer; in this test binary), by code {:?}",
        stats.recognize_calls, stats.billed_calls, stats.calls_by_code
    );
    assert_eq!(
        stats.billed_calls,
        u64::from(jobs),
        "exactly one billed call per job"
    );
    assert!(
        stats.recognize_calls >= u64::from(jobs) * 115 / 100,
        "the faults did happen: {} calls",
        stats.recognize_calls
    );
    assert!(env.drain_dead_letters().await.is_empty());
    assert!(
        w.status.readiness().is_ok(),
        "20 % faults must not open the breaker"
    );
    let store = env.store();
    for i in 0..jobs {
        let id = kling_archiver::job::JobId::parse(&format!("flt-{i}")).unwrap();
        let key = kling_archiver::archive::layout::manifest(&id);
        assert!(
            store.head(&key).await.unwrap().is_some(),
            "manifest of flt-{i}"
        );
    }
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arrears_mid_run_suspend_the_worker_and_it_resumes_by_itself() {
    let env = TestEnv::new(Backend::Local).await;
    env.sim.set_latency(Duration::from_millis(300));
    let jobs = 60u32;
    for i in 0..jobs {
        env.publish_json(job("arr", i)).await;
    }
    let w = env.start_worker(config(&env, 4), Hooks::default());
    // Readiness as Kubernetes sees it.
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, _ops) = kling_archiver::ops::serve(
        "127.0.0.1:0".parse().unwrap(),
        w.status.clone(),
        None,
        stop.clone(),
    )
    .await
    .unwrap();
    let readyz = format!("http://{addr}/readyz");
    let http = reqwest::Client::new();
    let ready_status = || async { http.get(&readyz).send().await.unwrap().status().as_u16() };
    let mut w = w;
    let mut events = w.settled(15, SETTLE).await;
    assert_eq!(ready_status().await, 200);

    env.sim.faults().set_account_error(Some(1101));
    let switched = Instant::now();
    eventually("worker not ready", Duration::from_secs(5), || async {
        w.status.readiness().is_err().then_some(())
    })
    .await;
    let stopped_in = switched.elapsed();
    assert_eq!(ready_status().await, 503);
    // In-flight jobs either finish (already billed) or come back; then
    // every unfinished job waits in the queue, none unacked, none dead.
    eventually(
        "unfinished jobs back in the queue",
        Duration::from_secs(10),
        || {
            while let Ok(e) = w.events.try_recv() {
                events.push(e);
            }
            let left = jobs as usize - archived(&events);
            let env = &env;
            async move { (env.ready(&env.queue).await as usize == left).then_some(()) }
        },
    )
    .await;
    let billed_while_suspended = env.sim.stats().billed_calls;
    probes(&env, 3).await;
    assert_eq!(
        env.sim.stats().billed_calls,
        billed_while_suspended,
        "nothing billed while suspended"
    );
    assert!(
        env.drain_dead_letters().await.is_empty(),
        "no account error is dead-lettered"
    );
    let held = jobs as usize - archived(&events);
    eprintln!("arrears: readiness off after {stopped_in:?}; {held} jobs held in the queue");

    env.sim.faults().set_account_error(None);
    let rest = jobs as usize - archived(&events);
    events.extend(w.settled(rest, SETTLE).await);
    assert_eq!(archived(&events), jobs as usize);
    assert_eq!(env.sim.stats().billed_calls, u64::from(jobs));
    assert_eq!(ready_status().await, 200);
    assert!(env.drain_dead_letters().await.is_empty());
    stop.cancel();
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sustained_outage_opens_the_breaker_instead_of_burning_deliveries() {
    let env = TestEnv::new(Backend::Local).await;
    env.sim.faults().set_random(1.0, vec![Fault::Code(5001)]);
    let mut cfg = config(&env, 8);
    cfg.kling.max_attempts = 3;
    let mut w = env.start_worker(cfg, Hooks::default());
    let jobs = 20;
    for i in 0..jobs {
        env.publish_json(job("out", i)).await;
    }
    eventually("breaker open", Duration::from_secs(30), || async {
        w.status
            .readiness()
            .is_err_and(|n| n.code == Some("kling_5001"))
            .then_some(())
    })
    .await;
    env.wait_ready(&env.queue, jobs, Duration::from_secs(30))
        .await;
    // While open only the supervisor calls: every job stays in the queue
    // through several probes, and nothing is billed.
    let billed = env.sim.stats().billed_calls;
    probes(&env, 3).await;
    assert_eq!(env.ready(&env.queue).await, jobs, "no job ran while open");
    assert_eq!(
        env.sim.stats().billed_calls,
        billed,
        "only probes while open"
    );
    env.sim.faults().set_random(0.0, vec![]);
    let events = w.settled(jobs as usize, SETTLE).await;
    assert_eq!(archived(&events), jobs as usize, "{events:?}");
    assert_eq!(env.sim.stats().billed_calls, u64::from(jobs));
    assert!(env.drain_dead_letters().await.is_empty());
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_of_64_callers_converges_under_the_account_limit() {
    let env = TestEnv::new(Backend::Local).await;
    let cap = 8u64;
    env.sim.faults().set_max_concurrency(Some(cap as usize));
    env.sim.set_latency(Duration::from_millis(400));
    let jobs = 320u32;
    for i in 0..jobs {
        env.publish_json(job("flt", i)).await;
    }
    // Two workers of 32, with production backoff (1 s first, 30 s cap).
    let mut workers: Vec<RunningWorker> = (0..2)
        .map(|_| {
            let mut cfg = config(&env, 32);
            cfg.kling.min_backoff = Duration::from_secs(1);
            cfg.kling.max_backoff = Duration::from_secs(30);
            cfg.kling.max_attempts = 30;
            cfg.kling.job_deadline = Duration::from_secs(600);
            env.start_worker(cfg, Hooks::default())
        })
        .collect();
    let mut done = 0usize;
    let mut half_stats = None;
    // Samples of (sum of adaptive limits, sum of calls in flight), second half.
    let mut samples: Vec<(usize, usize)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while done < jobs as usize {
        for w in &mut workers {
            while let Ok(e) = w.events.try_recv() {
                match e {
                    JobEvent::Archived { .. } => done += 1,
                    JobEvent::Requeued { .. } => {}
                    e => panic!("{e:?}"),
                }
            }
        }
        if half_stats.is_none() && done >= jobs as usize / 2 {
            half_stats = Some(env.sim.stats());
        }
        if half_stats.is_some() {
            let limits = workers
                .iter()
                .map(|w| w.pipeline.kling().current_limit())
                .sum();
            let in_flight = workers.iter().map(|w| w.pipeline.kling().in_flight()).sum();
            samples.push((limits, in_flight));
        }
        assert!(Instant::now() < deadline, "{done} of {jobs} archived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end = env.sim.stats();
    let half = half_stats.unwrap();
    let over = |s: &kling_archiver::sim::SimStats| s.calls_by_code.get(&1303).copied().unwrap_or(0);
    let first = (over(&half), half.recognize_calls);
    let second = (over(&end) - first.0, end.recognize_calls - first.1);
    let frac = |(o, n): (u64, u64)| o as f64 / n.max(1) as f64;
    let mean = |f: fn(&(usize, usize)) -> usize| {
        samples.iter().map(f).sum::<usize>() as f64 / samples.len().max(1) as f64
    };
    let mean_limit = mean(|s| s.0);
    let mean_in_flight = mean(|s| s.1);
    let max_in_flight = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "fleet 2×32 vs cap {cap}, {jobs} jobs: {} calls, {} billed; 1303: first half {}/{} ({:.1} %), second half {}/{} ({:.1} %); second half: mean sum of limits {mean_limit:.1}, mean in flight {mean_in_flight:.1}, max in flight {max_in_flight}; sim peak in flight {}",
        end.recognize_calls,
        end.billed_calls,
        first.0,
        first.1,
        frac(first) * 100.0,
        second.0,
        second.1,
        frac(second) * 100.0,
        end.peak_in_flight,
    );
    assert_eq!(
        end.billed_calls,
        u64::from(jobs),
        "exactly one billed call per job"
    );
    assert!(
        frac(second) < 0.25,
        "1303s stay a small fraction once settled"
    );
    assert!(
        mean_in_flight <= cap as f64 * 1.5,
        "the fleet settles near the cap"
    );
    for w in workers {
        w.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_that_outlast_the_job_wait_in_the_retry_queue() {
    let env = TestEnv::new(Backend::Local).await;
    let mut cfg = config(&env, 4);
    cfg.kling.max_attempts = 2;
    let mut w = env.start_worker(cfg, Hooks::default());
    // Two failures use up the job's own attempts: it waits in the retry
    // queue (1 s here), comes back and is archived.
    env.sim.faults().push(Fault::Code(5001));
    env.sim.faults().push(Fault::Code(5001));
    env.publish_json(job("rq", 0)).await;
    let e = tokio::time::timeout(SETTLE, w.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            e,
            JobEvent::Requeued {
                code: "kling_5001",
                ..
            }
        ),
        "{e:?}"
    );
    let e = next_event(&mut w, SETTLE).await;
    assert!(matches!(e, JobEvent::Archived { .. }), "{e:?}");
    assert_eq!(env.sim.stats().billed_calls, 1);

    // A job that always fails ends in the dead-letter queue once its
    // charges (carried across copies) pass the delivery limit.
    env.sim.faults().set_random(1.0, vec![Fault::Code(5000)]);
    env.publish_json(job("rq", 1)).await;
    let started = Instant::now();
    let e = next_event(&mut w, Duration::from_secs(120)).await;
    match e {
        JobEvent::DeadLettered { code, .. } => assert_eq!(code, "delivery_limit"),
        e => panic!("{e:?}"),
    }
    eprintln!("poison job dead-lettered after {:?}", started.elapsed());
    let letters = env.drain_dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].code.as_deref(), Some("delivery_limit"));
    assert!(
        w.status.readiness().is_ok(),
        "one bad job does not open the breaker"
    );
    w.stop().await;
    env.cleanup().await;
}

/// `--prefetch` above `--concurrency`: the worker holds more deliveries
/// than it has Kling calls, and the calls in flight never pass the
/// ceiling. Every job parks before its manifest until released, so the
/// jobs parked at once are deliveries held at once: with a prefetch equal
/// to the concurrency no more than C could ever park.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_deliveries_than_kling_calls_in_flight_and_calls_stay_under_the_ceiling() {
    const C: usize = 2;
    const P: usize = 8;
    let env = TestEnv::new(Backend::Local).await;
    env.sim.set_latency(Duration::from_millis(100));
    let jobs = 24u32;
    for i in 0..jobs {
        env.publish_json(job("pf", i)).await;
    }
    let parked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let hold = {
        let parked = parked.clone();
        Hooks {
            before_manifest: Some(std::sync::Arc::new(move |_| {
                let parked = parked.clone();
                let mut release = release_rx.clone();
                Box::pin(async move {
                    parked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = release.wait_for(|go| *go).await;
                    parked.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })),
        }
    };
    let mut cfg = config(&env, C);
    cfg.prefetch = P;
    let mut w = env.start_worker(cfg, hold);
    eventually("all prefetched jobs parked", SETTLE, || async {
        (parked.load(std::sync::atomic::Ordering::SeqCst) == P).then_some(())
    })
    .await;
    let stats = env.sim.stats();
    assert_eq!(stats.billed_calls, P as u64, "each held job made its call");
    assert!(
        stats.peak_in_flight <= C as u64,
        "{} Kling calls at once while holding {P} deliveries; the ceiling is {C}",
        stats.peak_in_flight
    );
    release_tx.send_replace(true);
    let events = w.settled(jobs as usize, SETTLE).await;
    assert_eq!(archived(&events), jobs as usize);
    let stats = env.sim.stats();
    assert!(
        stats.peak_in_flight <= C as u64,
        "peak {} Kling calls over {jobs} jobs; the ceiling is {C}",
        stats.peak_in_flight
    );
    assert_eq!(
        stats.peak_in_flight, C as u64,
        "the calls did fill the ceiling"
    );
    w.stop().await;
    env.cleanup().await;
}
