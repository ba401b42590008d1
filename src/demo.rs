//! `worker demo`: the whole product in one command, with nothing but
//! RabbitMQ running. It starts the Kling simulator in-process, archives into
//! `--archive` / `ARCHIVE_URL` (default `./demo-archive`; a directory or
//! `s3://bucket/prefix`), publishes generated sample images to a private
//! queue, runs the real worker on them, prints what happened, and removes
//! its queues so nothing is left behind. It never deletes what it did not
//! make (`archive.rs`).

mod archive;

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
use crate::broker::JobEvent;
use crate::config::{DEMO_ARCHIVE, DemoArgs, WorkerArgs};
use crate::manifest::Manifest;
use crate::pipeline::Outcome;
use crate::sim::{SimConfig, Simulator};
use crate::worker::Worker;

/// A generated sample and what the demo expects of it.
pub struct Sample {
    pub job_id: &'static str,
    pub what: &'static str,
    pub bytes: Vec<u8>,
}

/// Sample images: in spec, out of spec in each fixable way, and one broken.
pub fn samples() -> Vec<Sample> {
    vec![
        Sample {
            job_id: "demo-in-spec-jpeg",
            what: "800x1000 JPEG, in spec: sent untouched",
            bytes: encode(&scene(800, 1000, 1), image::ImageFormat::Jpeg),
        },
        Sample {
            job_id: "demo-in-spec-png",
            what: "640x480 PNG, in spec: sent untouched",
            bytes: encode(&scene(640, 480, 2), image::ImageFormat::Png),
        },
        Sample {
            job_id: "demo-thumbnail",
            what: "200x150 PNG: upscaled to 300 px",
            bytes: encode(&scene(200, 150, 3), image::ImageFormat::Png),
        },
        Sample {
            job_id: "demo-panorama",
            what: "2000x500 JPEG (4:1): padded to 2.5:1",
            bytes: encode(&scene(2000, 500, 4), image::ImageFormat::Jpeg),
        },
        Sample {
            job_id: "demo-webp",
            what: "600x600 WebP: re-encoded to JPEG",
            bytes: encode(&scene(600, 600, 5), image::ImageFormat::WebP),
        },
        Sample {
            job_id: "demo-rotated",
            what: "phone photo stored sideways (EXIF orientation 6): turned upright",
            bytes: with_exif_orientation(
                &encode(
                    &image::DynamicImage::ImageRgb8(scene(480, 640, 6))
                        .rotate270()
                        .into_rgb8(),
                    image::ImageFormat::Jpeg,
                ),
                6,
            ),
        },
        Sample {
            job_id: "demo-broken",
            what: "a truncated JPEG: dead-lettered",
            bytes: broken_jpeg(),
        },
    ]
}

pub use crate::prepare::with_exif_orientation;

/// A simple scene: a gradient background and a coloured "subject" with a
/// "head", so the simulator's masks have something to find.
pub fn scene(w: u32, h: u32, seed: u8) -> image::RgbImage {
    let (cx, cy) = (w as f32 / 2.0, h as f32 * 0.6);
    let (rx, ry) = (w as f32 * 0.22, h as f32 * 0.3);
    let (hx, hy, hr) = (cx, h as f32 * 0.22, (w.min(h) as f32) * 0.12);
    image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let body = ((fx - cx) / rx).powi(2) + ((fy - cy) / ry).powi(2) <= 1.0;
        let head = (fx - hx).powi(2) + (fy - hy).powi(2) <= hr * hr;
        if head {
            image::Rgb([230, 180, 150])
        } else if body {
            image::Rgb([40u8.wrapping_add(seed * 30), 60, 170])
        } else {
            let g = (200.0 + 40.0 * fy / h as f32) as u8;
            image::Rgb([g, g, g.saturating_sub(seed)])
        }
    })
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    // Encoding a generated in-memory image cannot fail for these formats.
    if let Err(e) = img.write_to(&mut out, format) {
        unreachable!("encoding a generated sample failed: {e}");
    }
    out.into_inner()
}

fn broken_jpeg() -> Vec<u8> {
    let mut b = encode(&scene(640, 480, 6), image::ImageFormat::Jpeg);
    b.truncate(400);
    b
}

pub async fn run(worker_args: WorkerArgs, args: DemoArgs) -> anyhow::Result<()> {
    crate::build_info::warn_if_slow();
    let target = demo_target(&worker_args, &args)?;
    let s3 = crate::worker::s3_client(worker_args.s3_force_path_style).await;
    let mut claimed = archive::claim(&target, &s3).await?;
    let target = match &claimed.dir {
        Some(dir) => ArchiveTarget::Local(dir.clone()),
        None => target,
    };
    let access_key = format!("demo-ak-{:08x}", fastrand::u32(..));
    let secret_key = format!(
        "demo-sk-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );
    let mut sim_cfg = SimConfig::new(access_key.clone(), secret_key.clone());
    sim_cfg.latency = Duration::from_millis(args.latency_ms);
    let sim = Simulator::start(sim_cfg)
        .await
        .context("starting the Kling simulator")?;

    let queue = format!(
        "kling.demo.{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    );
    let mut config = worker_args
        .into_config_with_keys(access_key, secret_key.into())
        .context("demo configuration")?;
    config.queue = queue.clone();
    config.concurrency = 4;
    config.kling.base_url = url::Url::parse(&sim.base_url())?;
    config.kling.min_backoff = Duration::from_millis(200);
    config.archive = target;
    config.result_hosts = vec![sim.result_host()];
    config.shutdown_timeout = Duration::from_secs(10);

    println!("kling-archiver demo");
    println!(
        "  Kling simulator  {} ({} ms per call)",
        sim.base_url(),
        args.latency_ms
    );
    println!("  RabbitMQ queue   {queue} (removed at the end)");
    println!("  archive          {}", claimed.store.describe());
    println!();

    let conn = crate::broker::connect(&config.amqp_url, "demo")
        .await
        .context("RabbitMQ is not reachable at AMQP_URL; start it (e.g. `rabbitmq-server -detached`) and retry")?;
    let ch = conn.create_channel().await?;
    let topology = crate::broker::Topology::of(&config);
    topology.declare(&ch).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;

    let samples = samples();
    for s in &samples {
        let body = serde_json::json!({
            "job_id": s.job_id,
            "image_base64": base64::engine::general_purpose::STANDARD.encode(&s.bytes),
            "labels": { "source": "demo" },
        });
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.clone().into(),
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
    println!("published {} jobs; processing…", samples.len());

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
    while events.len() < samples.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(JobEvent::Requeued { .. })) => {}
            Ok(Some(JobEvent::Fatal { reason, .. })) => {
                shutdown.cancel();
                bail!("the worker stopped on a fatal error: {reason}");
            }
            Ok(Some(e)) => events.push(e),
            Ok(None) => bail!("the worker stopped early: {:?}", worker.await),
            Err(_) => bail!(
                "timed out: {} of {} jobs settled",
                events.len(),
                samples.len()
            ),
        }
    }
    shutdown.cancel();
    worker.await?.context("worker")?;

    // Leave nothing behind on the broker.
    ch.queue_delete(queue.clone().into(), QueueDeleteOptions::default())
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
    let _ = conn.close(200, "demo done".into()).await;

    print_summary(&samples, &events, &store, &sim).await;
    sim.shutdown();

    // A picture of it: every job, its masks on the source.
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
            let written = crate::report::write(&store, &opts, &path)
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
    claimed.finish().await?;
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

async fn print_summary(
    samples: &[Sample],
    events: &[JobEvent],
    store: &Store,
    sim: &crate::sim::SimHandle,
) {
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
