//! `worker demo`: the whole product in one command, with nothing but
//! RabbitMQ running. It starts the Kling simulator in-process, archives into
//! `--archive` / `ARCHIVE_URL` (default `./demo-archive`; a directory or
//! `s3://bucket/prefix`), publishes generated sample images to a private
//! queue, runs the real worker on them, prints what happened, and removes
//! its queues so nothing is left behind. It never deletes what it did not
//! make (`archive.rs`).

mod archive;
mod samples;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use lapin::BasicProperties;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::archive::{ArchiveTarget, ObjectKey, Store};
use crate::broker::{JobEvent, Topology};
use crate::config::{Config, DEMO_ARCHIVE, DemoArgs, WorkerArgs};
use crate::manifest::Manifest;
use crate::pipeline::Outcome;
use crate::sim::{SimConfig, SimHandle, Simulator};
use crate::worker::Worker;

pub use self::samples::{Sample, samples, scene, with_exif_orientation};

pub async fn run(worker_args: WorkerArgs, args: DemoArgs) -> anyhow::Result<()> {
    crate::build_info::warn_if_slow();
    let target = demo_target(&worker_args, &args)?;
    let s3 = crate::worker::s3_client(worker_args.s3_force_path_style).await;
    let mut claimed = archive::claim(&target, &s3).await?;
    let target = match &claimed.dir {
        Some(dir) => ArchiveTarget::Local(dir.clone()),
        None => target,
    };
    let (sim, keys) = start_simulator(args.latency_ms).await?;
    let config = demo_config(worker_args, &sim, target, keys)?;

    println!("kling-archiver demo");
    println!(
        "  Kling simulator  {} ({} ms per call)",
        sim.base_url(),
        args.latency_ms
    );
    println!("  RabbitMQ queue   {} (removed at the end)", config.queue);
    println!("  archive          {}", claimed.store.describe());
    println!();

    let conn = crate::broker::connect(&config.amqp_url, "demo")
        .await
        .context("RabbitMQ is not reachable at AMQP_URL; start it (e.g. `rabbitmq-server -detached`) and retry")?;
    let ch = conn.create_channel().await?;
    let topology = Topology::of(&config);
    topology.declare(&ch).await?;
    let samples = samples();
    publish(&ch, &config.queue, &samples).await?;
    println!("published {} jobs; processing…", samples.len());

    let (events, store) = process(config, samples.len()).await?;
    remove_topology(&ch, &topology).await?;
    let _ = conn.close(200, "demo done".into()).await;

    print_summary(&samples, &events, &store, &sim).await;
    sim.shutdown();
    write_report(&mut claimed, &store, &events).await?;
    claimed.finish().await?;
    Ok(())
}

/// The demo's own Kling keys, minted fresh for each run.
struct DemoKeys {
    access_key: String,
    secret_key: String,
}

/// An in-process Kling simulator that knows only the demo's fresh keys.
async fn start_simulator(latency_ms: u64) -> anyhow::Result<(SimHandle, DemoKeys)> {
    let keys = DemoKeys {
        access_key: format!("demo-ak-{:08x}", fastrand::u32(..)),
        secret_key: format!(
            "demo-sk-{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        ),
    };
    let mut sim_cfg = SimConfig::new(keys.access_key.clone(), keys.secret_key.clone());
    sim_cfg.latency = Duration::from_millis(latency_ms);
    let sim = Simulator::start(sim_cfg)
        .await
        .context("starting the Kling simulator")?;
    Ok((sim, keys))
}

/// The worker's configuration pointed at the simulator, a private queue
/// and the claimed archive.
fn demo_config(
    worker_args: WorkerArgs,
    sim: &SimHandle,
    target: ArchiveTarget,
    keys: DemoKeys,
) -> anyhow::Result<Config> {
    let queue = format!(
        "kling.demo.{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    );
    let mut config = worker_args
        .into_config_with_keys(keys.access_key, keys.secret_key.into())
        .context("demo configuration")?;
    config.queue = queue;
    config.concurrency = 4;
    config.kling.base_url = url::Url::parse(&sim.base_url())?;
    config.kling.min_backoff = Duration::from_millis(200);
    config.archive = target;
    config.result_hosts = vec![sim.result_host()];
    config.shutdown_timeout = Duration::from_secs(10);
    Ok(config)
}

/// Publish each sample as an inline job, confirmed by the broker.
async fn publish(ch: &lapin::Channel, queue: &str, samples: &[Sample]) -> anyhow::Result<()> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for s in samples {
        let body = serde_json::json!({
            "job_id": s.job_id,
            "image_base64": base64::engine::general_purpose::STANDARD.encode(&s.bytes),
            "labels": { "source": "demo" },
        });
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("RabbitMQ did not confirm the demo job {}", s.job_id);
        }
    }
    Ok(())
}

/// Run the real worker until `jobs` jobs have settled (archived or
/// dead-lettered), then stop it. Returns their events and the archive.
async fn process(config: Config, jobs: usize) -> anyhow::Result<(Vec<JobEvent>, Store)> {
    let pipeline = Arc::new(crate::worker::build_pipeline(&config).await?);
    let store = pipeline.store().clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(Arc::new(config), pipeline)
            .with_events(tx)
            .run(shutdown.clone()),
    );

    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while events.len() < jobs {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(JobEvent::Requeued { .. })) => {}
            Ok(Some(JobEvent::Fatal { reason, .. })) => {
                shutdown.cancel();
                bail!("the worker stopped on a fatal error: {reason}");
            }
            Ok(Some(e)) => events.push(e),
            Ok(None) => bail!("the worker stopped early: {:?}", worker.await),
            Err(_) => bail!("timed out: {} of {jobs} jobs settled", events.len()),
        }
    }
    shutdown.cancel();
    worker.await?.context("worker")?;
    Ok((events, store))
}

/// Leave nothing behind on the broker: the queues and exchanges the
/// topology declared.
async fn remove_topology(ch: &lapin::Channel, topology: &Topology) -> anyhow::Result<()> {
    ch.queue_delete(
        topology.queue.as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await?;
    ch.queue_delete(
        topology.dead_letter_queue().into(),
        QueueDeleteOptions::default(),
    )
    .await?;
    for delay in &topology.retry_delays {
        ch.queue_delete(
            topology.retry_queue(*delay).into(),
            QueueDeleteOptions::default(),
        )
        .await?;
    }
    for exchange in [topology.dead_letter_exchange(), topology.results_exchange()] {
        ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

/// A picture of it: every job, its masks on the source, and the jobs that
/// were dead-lettered with their reasons. Only into an archive the demo
/// owns.
async fn write_report(
    claimed: &mut archive::Claimed,
    store: &Store,
    events: &[JobEvent],
) -> anyhow::Result<()> {
    let failed = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::DeadLettered {
                job_id: Some(job_id),
                code,
                reason,
                ..
            } => Some(crate::report::FailedJob {
                job_id: job_id.clone(),
                code: (*code).to_owned(),
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect();
    let opts = crate::report::Options {
        failed,
        ..crate::report::Options::default()
    };
    match claimed.report_path() {
        Some(path) => {
            let written = crate::report::write(store, &opts, &path)
                .await
                .context("writing the HTML report")?;
            println!(
                "Report: {} (open it in a browser: sources with their masks overlaid).",
                written.path.display()
            );
        }
        None => println!(
            "Report not written: {} is not the demo's, and is left alone.",
            archive::REPORT
        ),
    }
    Ok(())
}

/// The demo's archive: `--out`, or `--archive` / `ARCHIVE_URL`, or
/// `./demo-archive`. `--out` and `--archive` are one setting; both at once
/// must agree.
fn demo_target(worker: &WorkerArgs, args: &DemoArgs) -> anyhow::Result<ArchiveTarget> {
    let url = match (&args.out, &worker.archive_url) {
        (Some(out), Some(archive)) if out != archive => bail!(
            "--out {out} and --archive/ARCHIVE_URL {archive} disagree; --out is the demo's \
             older name for --archive: give one"
        ),
        (Some(url), _) | (None, Some(url)) => url.as_str(),
        (None, None) => DEMO_ARCHIVE,
    };
    ArchiveTarget::parse(url).map_err(|e| anyhow::anyhow!("ARCHIVE_URL: {e}"))
}

async fn print_summary(samples: &[Sample], events: &[JobEvent], store: &Store, sim: &SimHandle) {
    println!();
    let mut archived = 0;
    let mut dead = 0;
    for s in samples {
        let ev = events.iter().find(|e| match e {
            JobEvent::Archived { job_id, .. } => job_id == s.job_id,
            JobEvent::DeadLettered { job_id, .. } => job_id.as_deref() == Some(s.job_id),
            _ => false,
        });
        println!("{}  ({})", s.job_id, s.what);
        match ev {
            Some(JobEvent::Archived {
                outcome:
                    Outcome::Archived {
                        manifest_key,
                        segments,
                        ..
                    },
                ..
            }) => {
                archived += 1;
                let detail = manifest_detail(store, manifest_key)
                    .await
                    .unwrap_or_default();
                println!("    archived   {segments} segment PNGs{detail}");
                println!("    manifest   {manifest_key}");
            }
            Some(JobEvent::Archived {
                outcome: Outcome::AlreadyArchived { manifest_key, .. },
                ..
            }) => {
                archived += 1;
                println!("    already archived: {manifest_key}");
            }
            Some(JobEvent::DeadLettered { code, reason, .. }) => {
                dead += 1;
                println!("    dead-lettered  [{code}] {reason}");
            }
            _ => println!("    (no outcome)"),
        }
    }
    let stats = sim.stats();
    println!();
    println!(
        "{archived} archived, {dead} dead-lettered; {} Kling calls billed.",
        stats.billed_calls
    );
    println!(
        "Results are under {}: start at jobs/<job_id>/manifest.json.",
        store.describe()
    );
}

async fn manifest_detail(store: &Store, key: &str) -> Option<String> {
    let bytes = store.get(&ObjectKey::parse(key).ok()?).await.ok()??;
    let m: Manifest = serde_json::from_slice(&bytes).ok()?;
    let ops: Vec<&str> = m.prepared.transforms.steps.iter().map(|s| s.op()).collect();
    let missing = m
        .segments
        .iter()
        .filter(|s| !s.is_contain)
        .map(|s| s.kind.to_string())
        .collect::<Vec<_>>();
    let mut d = format!(
        "; sent {}x{} {}",
        m.prepared.width,
        m.prepared.height,
        if m.prepared.passthrough {
            "untouched".to_owned()
        } else {
            format!("after {}", ops.join(" + "))
        }
    );
    if !missing.is_empty() {
        d.push_str(&format!("; not found: {}", missing.join(", ")));
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::config::{Cli, Command};

    fn target(argv: &[&str]) -> anyhow::Result<ArchiveTarget> {
        let cli = Cli::try_parse_from(argv).expect("flags");
        let Some(Command::Demo(demo)) = cli.command else {
            unreachable!("a demo command line")
        };
        demo_target(&cli.worker, &demo)
    }

    #[test]
    fn out_and_archive_are_one_setting() {
        let local = |p: &str| ArchiveTarget::Local(p.into());
        assert_eq!(target(&["worker", "demo"]).unwrap(), local(DEMO_ARCHIVE));
        assert_eq!(
            target(&["worker", "demo", "--out", "d"]).unwrap(),
            local("d")
        );
        assert_eq!(
            target(&["worker", "demo", "--archive", "d"]).unwrap(),
            local("d")
        );
        assert_eq!(
            target(&["worker", "--archive", "s3://bkt/demo", "demo"]).unwrap(),
            ArchiveTarget::S3 {
                bucket: "bkt".into(),
                prefix: "demo".into()
            }
        );
        let both = ["worker", "demo", "--out", "a", "--archive", "a"];
        assert_eq!(target(&both).unwrap(), local("a"));
        let clash = ["worker", "demo", "--out", "a", "--archive", "b"];
        assert!(target(&clash).unwrap_err().to_string().contains("disagree"));
    }
}
