//! Load benchmark: N jobs through the release `worker` binary against the
//! Kling simulator with a fixed latency L, at several concurrencies.
//! Run it with `bash tests/bench/load.sh` (RabbitMQ must be up).
//!
//! With L per call and C jobs in flight, Little's law bounds throughput by
//! C / L. The table gives the measured throughput against that bound
//! (overall, and after the adaptive Kling limit's slow start), the worker
//! process's CPU seconds per job and its peak RSS, for in-spec traffic
//! (passed through) and out-of-spec traffic (200x150 photos: decoded,
//! upscaled, re-encoded, masks aligned back). Every job carries a distinct
//! image, so no call is saved by reuse. The simulator and the S3 server run
//! in this process, the worker in its own, RabbitMQ in its own: all on the
//! same machine, so the table also gives the whole machine's CPU per job and
//! the throughput that CPU allows (`machine's ceiling / bound`: below 1 the
//! machine, not the worker, caps the run).
//!
//! Production's shape: the archive is the in-process S3 server behind a
//! per-request delay (`--s3-latency-ms`, default 30), each segment PNG
//! download waits `--cdn-latency-ms` (default 300). Every case runs twice:
//! with the prefetch equal to the concurrency (how the worker ran before
//! `--prefetch`) and with the default prefetch (2 x C), in one table. The
//! mean of Kling calls in flight after the ramp (sampled every 10 ms from
//! the simulator) is given as a fraction of C; `first call s` is the time
//! from the worker's start to its first Kling call; the stage means come
//! from the worker's `/metrics`.
//!
//! Flags: `--jobs-per-slot K` (default 64: N = K x C, about 64 s at the
//! bound), `--latency-ms L` (default 1000), `--concurrency 32,128`,
//! `--mix in,out`, `--cdn-latency-ms`, `--s3-latency-ms`, `--prefetch 1,default`
//! (each case's prefetch: a multiple of C, or the worker's default).

#[path = "../common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt as _;
use kling_archiver::broker::Topology;
use kling_archiver::sim::{SimConfig, Simulator};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const AK: &str = "load-ak";
const SK: &str = "load-sk-0123456789";

struct Args {
    jobs_per_slot: usize,
    latency: Duration,
    concurrency: Vec<usize>,
    mixes: Vec<String>,
    cdn_latency: Duration,
    s3_latency: Duration,
    /// Prefetch per case: a multiple of C, or `default` (the worker's).
    prefetch: Vec<String>,
}

fn args() -> Option<Args> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if !raw.iter().any(|a| a == "--bench") {
        println!("the load benchmark runs with `bash tests/bench/load.sh`");
        return None;
    }
    let get = |name: &str| {
        raw.iter()
            .position(|a| a == name)
            .and_then(|i| raw.get(i + 1))
            .cloned()
    };
    Some(Args {
        jobs_per_slot: get("--jobs-per-slot").map_or(64, |v| v.parse().unwrap()),
        cdn_latency: Duration::from_millis(
            get("--cdn-latency-ms").map_or(300, |v| v.parse().unwrap()),
        ),
        s3_latency: Duration::from_millis(
            get("--s3-latency-ms").map_or(30, |v| v.parse().unwrap()),
        ),
        latency: Duration::from_millis(get("--latency-ms").map_or(1000, |v| v.parse().unwrap())),
        concurrency: get("--concurrency")
            .unwrap_or_else(|| "32,128".into())
            .split(',')
            .map(|c| c.parse().unwrap())
            .collect(),
        prefetch: get("--prefetch")
            .unwrap_or_else(|| "1,default".into())
            .split(',')
            .map(str::to_owned)
            .collect(),
        mixes: get("--mix")
            .unwrap_or_else(|| "in,out".into())
            .split(',')
            .map(str::to_owned)
            .collect(),
    })
}

/// A JPEG with a comment segment carrying `n`, so every job's image (and
/// so its recognition) is distinct while all share one encode.
fn distinct(base: &[u8], n: usize) -> Vec<u8> {
    let text = format!("load-{n}");
    let mut out = base[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&u16::try_from(text.len() + 2).unwrap().to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&base[2..]);
    out
}

/// A generated in-spec picture with a subject for the simulator's masks.
fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = kling_archiver::demo::scene(w, h, 1);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// (busy, total) jiffies of the whole machine, from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Clock ticks per second of `/proc`'s CPU times (USER_HZ on Linux).
const USER_HZ: f64 = 100.0;

/// (utime + stime seconds, VmHWM kB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name; utime and stime are
    // the 14th and 15th fields overall.
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks / USER_HZ, common::rss::vm_hwm_kb_of(&pid.to_string()))
}

struct Run {
    jobs: usize,
    seconds: f64,
    after_ramp: f64,
    cpu_per_job_ms: f64,
    peak_rss_mb: f64,
    billed: u64,
    /// Share of all the machine's cores busy during the run (worker,
    /// simulator, RabbitMQ, everything).
    machine_busy: f64,
    /// Mean Kling calls in flight after the ramp.
    kling_in_flight: f64,
    /// CPU of the whole machine per job (every process), ms.
    machine_cpu_per_job_ms: f64,
    /// From the worker's start to its first Kling call, s.
    first_call_s: f64,
    /// Mean seconds per job in each stage, from the worker's /metrics.
    stages: Stages,
    /// S3 requests per job (every method), from the S3 server.
    s3_requests_per_job: f64,
}

/// Mean seconds per job of the worker's stages (`kling` includes the wait
/// for a Kling permit and the claim; `archive` the segment downloads and
/// writes). What Little's law needs: deliveries = C x (L + S) / L.
#[derive(Default)]
struct Stages {
    fetch: f64,
    prepare: f64,
    kling: f64,
    archive: f64,
}

/// The stage means from a worker's `/metrics` text.
fn stages(metrics: &str) -> Stages {
    let mean = |stage: &str| {
        let find = |suffix: &str| {
            let series = format!("kling_archiver_stage_seconds_{suffix}{{stage=\"{stage}\"}}");
            common::procs::metric(metrics, &series)
        };
        find("sum") / find("count").max(1.0)
    };
    Stages {
        fetch: mean("fetch"),
        prepare: mean("prepare"),
        kling: mean("kling"),
        archive: mean("archive"),
    }
}

/// Where a case archives: the bench's S3 server and a bucket.
struct Archive<'a> {
    s3: &'a common::S3Server,
    bucket: &'a str,
}

async fn run_one(
    conn: &Connection,
    sim: &kling_archiver::sim::SimHandle,
    (concurrency, prefetch): (usize, usize),
    mix: &str,
    jobs: usize,
    archive: &Archive<'_>,
) -> Run {
    let queue = format!(
        "t.kling.load.{}-{concurrency}-{prefetch}-{mix}",
        std::process::id()
    );
    let topology = Topology::new(queue.clone(), 20);
    let ch = conn.create_channel().await.unwrap();
    topology.declare(&ch).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Count result events: one per archived job, published before its ack.
    let results = format!("{queue}.bench-results");
    ch.queue_declare(
        results.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        results.as_str().into(),
        topology.results_exchange().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let in_spec = jpeg(320, 320);
    let small = kling_archiver::demo::scene(200, 150, 1);
    for n in 0..jobs {
        let image = match mix {
            "in" => distinct(&in_spec, n),
            // Out of spec: the pixels themselves must differ, or every
            // prepared image would be the same and reuse one recognition.
            _ => {
                // The job number as 16 black or white 8x8 blocks: survives
                // JPEG quantisation, so no two prepared images are equal.
                let mut img = small.clone();
                for bit in 0..16u32 {
                    let v = if (n >> bit) & 1 == 1 { 255 } else { 0 };
                    for dx in 0..8 {
                        for dy in 0..8 {
                            img.put_pixel(bit * 8 + dx, dy, image::Rgb([v, v, v]));
                        }
                    }
                }
                let mut out = std::io::Cursor::new(Vec::new());
                img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
                out.into_inner()
            }
        };
        let body = serde_json::json!({
            "job_id": format!("load-{concurrency}-{prefetch}-{mix}-{n}"),
            "image_base64": base64::engine::general_purpose::STANDARD.encode(image),
        });
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let billed_before = sim.stats().billed_calls;
    let s3_before = archive.s3.requests();
    let mut consumer = ch
        .basic_consume(
            results.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ops_port = common::free_port();
    let started = Instant::now();
    let machine_before = machine_jiffies();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", AMQP)
        .env("WORKER_QUEUE", &queue)
        .env("WORKER_DELIVERY_LIMIT", "20")
        .env("WORKER_CONCURRENCY", concurrency.to_string())
        .env("WORKER_PREFETCH", prefetch.to_string())
        .env("KLING_BASE_URL", sim.base_url())
        .env("KLING_ACCESS_KEY", AK)
        .env("KLING_SECRET_KEY", SK)
        .env("KLING_RESULT_HOSTS", sim.result_host())
        .env(
            "ARCHIVE_URL",
            format!("s3://{}/{concurrency}-{prefetch}-{mix}", archive.bucket),
        )
        .env("AWS_ENDPOINT_URL", &archive.s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", common::S3_AK)
        .env("AWS_SECRET_ACCESS_KEY", common::S3_SK)
        .env("AWS_REGION", "us-east-1")
        .env("S3_FORCE_PATH_STYLE", "true")
        .env("HTTP_ADDR", format!("127.0.0.1:{ops_port}"))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the worker binary");
    let pid = child.id();

    // Kling calls in flight, sampled every 50 ms from the end of the ramp
    // (state 1) until the tail (state 2), when the calls drain below C.
    let phase = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let sampler = tokio::spawn({
        let (sim, phase) = (sim.clone(), phase.clone());
        async move {
            let (mut sum, mut n) = (0u64, 0u64);
            let mut first_call = None;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let in_flight = sim.stats().in_flight;
                if first_call.is_none() && in_flight > 0 {
                    first_call = Some(Instant::now());
                }
                match phase.load(std::sync::atomic::Ordering::Relaxed) {
                    0 => {}
                    1 => {
                        sum += in_flight;
                        n += 1;
                    }
                    _ => return (sum as f64 / n.max(1) as f64, first_call),
                }
            }
        }
    });
    let mut seen = 0;
    let mut ramp_done: Option<Instant> = None;
    let mut peak = (0.0, 0);
    while seen < jobs {
        let d = tokio::time::timeout(Duration::from_secs(120), consumer.next())
            .await
            .expect("results keep coming")
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        seen += 1;
        if seen == jobs / 10 {
            ramp_done = Some(Instant::now());
            phase.store(1, std::sync::atomic::Ordering::Relaxed);
        }
        if seen == jobs - jobs / 20 {
            // The tail drains below C: not part of the steady state.
            phase.store(2, std::sync::atomic::Ordering::Relaxed);
        }
        if seen % 64 == 0 {
            peak = usage(pid);
        }
    }
    let elapsed = started.elapsed();
    phase.store(2, std::sync::atomic::Ordering::Relaxed);
    let (kling_in_flight, first_call) = sampler.await.unwrap_or((0.0, None));
    let machine_after = machine_jiffies();
    let (cpu, hwm) = usage(pid);
    let hwm = hwm.max(peak.1);
    let ramp = ramp_done.unwrap_or(started);
    let after_ramp = (jobs - jobs / 10) as f64 / ramp.elapsed().as_secs_f64();
    let metrics = match reqwest::get(format!("http://127.0.0.1:{ops_port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    for q in std::iter::once(queue.clone())
        .chain([topology.dead_letter_queue()])
        .chain(
            topology
                .retry_delays
                .iter()
                .map(|d| topology.retry_queue(*d)),
        )
    {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    Run {
        jobs,
        seconds: elapsed.as_secs_f64(),
        after_ramp,
        cpu_per_job_ms: cpu * 1e3 / jobs as f64,
        peak_rss_mb: hwm as f64 / 1024.0,
        billed: sim.stats().billed_calls - billed_before,
        machine_busy: (machine_after.0 - machine_before.0) as f64
            / (machine_after.1 - machine_before.1).max(1) as f64,
        // Busy ticks of every process: worker, simulator, S3, broker.
        machine_cpu_per_job_ms: (machine_after.0 - machine_before.0) as f64 / USER_HZ * 1e3
            / jobs as f64,
        first_call_s: first_call.map_or(f64::NAN, |t| (t - started).as_secs_f64()),
        kling_in_flight,
        stages: stages(&metrics),
        s3_requests_per_job: (archive.s3.requests() - s3_before) as f64 / jobs as f64,
    }
}

#[tokio::main]
async fn main() {
    let Some(args) = args() else { return };
    let mut cfg = SimConfig::new(AK, SK);
    cfg.latency = args.latency;
    let sim = Simulator::start(cfg).await.expect("simulator");
    sim.set_cdn_latency(args.cdn_latency);
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ at 127.0.0.1:5672");
    let s3 = common::start_s3_with_latency(args.s3_latency).await;
    let bucket = "load";
    common::create_bucket(&s3.client, bucket).await;
    let archive = Archive { s3: &s3, bucket };
    let l = args.latency.as_secs_f64();
    // What the whole machine could sustain at its CPU per job.
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let mut table = format!(
        "load: Kling latency {:.0} ms, segment download {} ms, S3 request {} ms, {} jobs per slot, worker binary in its own process\n\n\
         | concurrency | prefetch | mix | jobs | seconds | jobs/s | bound C/L | ratio | ratio after ramp | Kling in flight / C | worker CPU ms/job | worker peak RSS MB | billed | machine busy | machine CPU ms/job | machine's ceiling / bound | first call s | fetch / prepare / kling / archive ms | S3 requests/job |\n\
         | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        l * 1e3,
        args.cdn_latency.as_millis(),
        args.s3_latency.as_millis(),
        args.jobs_per_slot
    );
    for &c in &args.concurrency {
        for mix in &args.mixes {
            // Before `--prefetch` (prefetch = C), then the default.
            for factor in &args.prefetch {
                let prefetch = match factor.as_str() {
                    "default" => usize::from(kling_archiver::config::default_prefetch(
                        u16::try_from(c).unwrap(),
                    )),
                    k => c * k.parse::<usize>().expect("--prefetch: multiples of C"),
                };
                let jobs = c * args.jobs_per_slot;
                let r = run_one(&conn, &sim, (c, prefetch), mix, jobs, &archive).await;
                let rate = r.jobs as f64 / r.seconds;
                let bound = c as f64 / l;
                let row = format!(
                    "| {c} | {prefetch} | {mix} | {} | {:.1} | {rate:.1} | {bound:.0} | {:.3} | {:.3} | {:.3} | {:.1} | {:.0} | {} | {:.0} % | {:.1} | {:.2} | {:.2} | {:.0} / {:.0} / {:.0} / {:.0} | {:.1} |\n",
                    r.jobs,
                    r.seconds,
                    rate / bound,
                    r.after_ramp / bound,
                    r.kling_in_flight / c as f64,
                    r.cpu_per_job_ms,
                    r.peak_rss_mb,
                    r.billed,
                    r.machine_busy * 100.0,
                    r.machine_cpu_per_job_ms,
                    cores * 1e3 / r.machine_cpu_per_job_ms / bound,
                    r.first_call_s,
                    r.stages.fetch * 1e3,
                    r.stages.prepare * 1e3,
                    r.stages.kling * 1e3,
                    r.stages.archive * 1e3,
                    r.s3_requests_per_job,
                );
                eprint!("{row}");
                table.push_str(&row);
            }
        }
    }
    println!("{table}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-load.md");
    std::fs::write(&path, &table).unwrap();
    eprintln!("written to {}", path.display());
    sim.shutdown();
}
