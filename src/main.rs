//! The `worker` binary: parse flags, validate config, start telemetry, run
//! until a signal, map the result to an exit code. Everything else is in
//! the library.

use std::process::ExitCode;

use clap::Parser;
use kling_archiver::archive::{ArchiveTarget, Store};
use kling_archiver::broker::{BrokerError, Topology};
use kling_archiver::config::{
    Cli, Command, DlqAction, DlqArgs, EnqueueArgs, ReportArgs, SimArgs, VerifyArgs, WorkerArgs,
};
use kling_archiver::{BuildError, RunError, demo, sim, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit codes (documented in docs/operations.md).
const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_FATAL: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Some(Command::Demo(_)) => telemetry::DEMO_LOG,
        _ => telemetry::WORKER_LOG,
    };
    telemetry::init(cli.log_format, default_log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(run(cli))
}

/// Why a command did not succeed, and so the exit code.
enum Failure {
    /// Bad flags or environment: exit 2.
    Config(String),
    /// The command ran and failed, or found problems: exit 1.
    Failed(String),
    /// The worker stopped on a fatal error (logged already): exit 3.
    Fatal,
}

impl Failure {
    fn config(e: impl std::fmt::Display) -> Self {
        Failure::Config(e.to_string())
    }

    fn failed(e: impl std::fmt::Display) -> Self {
        Failure::Failed(e.to_string())
    }
}

/// The one mapping from a command's result to the process's exit code.
fn exit_code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(msg)) => {
            tracing::error!(error = %msg, "invalid configuration");
            eprintln!("error: {msg}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Failed(msg)) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            ExitCode::from(EXIT_FAILURE)
        }
        Err(Failure::Fatal) => ExitCode::from(EXIT_FATAL),
    }
}

async fn run(cli: Cli) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    exit_code(match cli.command {
        None => consume(cli.worker, shutdown).await,
        Some(Command::Demo(args)) => demo::run(cli.worker, args)
            .await
            .map_err(|e| Failure::failed(format!("demo failed: {e:#}"))),
        Some(Command::Enqueue(args)) => enqueue(&cli.worker, args).await,
        Some(Command::Dlq(args)) => dlq(&cli.worker, args).await,
        Some(Command::Verify(args)) => verify(&cli.worker, args).await,
        Some(Command::Report(args)) => report(&cli.worker, args).await,
        Some(Command::Sim(args)) => {
            let cfg = sim_config(&args).map_err(Failure::config);
            match cfg {
                Ok(cfg) => sim::run(cfg, async move { shutdown.cancelled().await })
                    .await
                    .map_err(|e| Failure::failed(format!("simulator failed: {e}"))),
                Err(e) => Err(e),
            }
        }
    })
}

async fn consume(args: WorkerArgs, shutdown: CancellationToken) -> Result<(), Failure> {
    let config = args.into_config().map_err(Failure::config)?;
    match kling_archiver::run_worker(config, shutdown).await {
        Ok(()) => Ok(()),
        Err(RunError::Broker(BrokerError::Fatal)) => Err(Failure::Fatal),
        Err(RunError::Build(e @ BuildError::ResultHosts(_))) => Err(Failure::config(e)),
        Err(e @ RunError::UnsafeArchive { .. }) => {
            tracing::error!(error = %e, "refusing to start");
            Err(Failure::config(e))
        }
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            Err(Failure::failed(e))
        }
    }
}

async fn enqueue(worker: &WorkerArgs, args: EnqueueArgs) -> Result<(), Failure> {
    use kling_archiver::admin::enqueue;
    let source = enqueue::Source::detect(&args.source).map_err(Failure::config)?;
    let s3 = match source {
        enqueue::Source::S3 { .. } => {
            Some(kling_archiver::s3_client(worker.s3_force_path_style).await)
        }
        _ => None,
    };
    let opts = enqueue::Options {
        source,
        labels: args.labels.into_iter().collect(),
        dry_run: args.dry_run,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let topology = Topology::from_args(worker);
    let url = worker.amqp_url.clone();
    let started = std::time::Instant::now();
    let report = enqueue::run(&opts, &topology, &url, s3.as_ref())
        .await
        .map_err(Failure::failed)?;
    println!(
        "{}",
        enqueue::summary(&report, &worker.queue, args.dry_run, started.elapsed())
    );
    if report.skipped.is_empty() {
        Ok(())
    } else {
        Err(Failure::failed(""))
    }
}

async fn dlq(worker: &WorkerArgs, args: DlqArgs) -> Result<(), Failure> {
    use kling_archiver::admin::dlq;
    let topology = Topology::from_args(worker);
    let url = worker.amqp_url.clone();
    let dead = topology.dead_letter_queue();
    match args.action {
        DlqAction::List => dlq::list(&topology, &url)
            .await
            .map(|groups| print!("{}", dlq::render(&groups, &dead))),
        DlqAction::Replay { reason } => dlq::replay(&topology, &url, reason.as_deref())
            .await
            .map(|n| println!("replayed {n} dead letters from {dead} to {}", worker.queue)),
        DlqAction::Purge { reason, yes } => dlq::purge(&topology, &url, reason.as_deref(), yes)
            .await
            .map(|n| println!("purged {n} dead letters from {dead}")),
    }
    .map_err(Failure::failed)
}

/// The archive named by `--archive` / `ARCHIVE_URL`.
async fn open_archive(worker: &WorkerArgs) -> Result<Store, Failure> {
    let target = ArchiveTarget::parse(worker.archive_url())
        .map_err(|e| Failure::config(format!("ARCHIVE_URL: {e}")))?;
    let s3 = kling_archiver::s3_client(worker.s3_force_path_style).await;
    Ok(Store::open(&target, &s3))
}

async fn report(worker: &WorkerArgs, args: ReportArgs) -> Result<(), Failure> {
    use kling_archiver::report;
    let store = open_archive(worker).await?;
    let opts = report::Options {
        since: args.since,
        limit: args.limit,
        failed: Vec::new(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let started = std::time::Instant::now();
    let w = report::write(&store, &opts, &args.out)
        .await
        .map_err(Failure::failed)?;
    println!(
        "wrote {} ({} jobs, {:.1} MB) in {:.1}s",
        w.path.display(),
        w.summary.jobs,
        w.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn verify(worker: &WorkerArgs, args: VerifyArgs) -> Result<(), Failure> {
    use kling_archiver::admin::verify;
    let store = open_archive(worker).await?;
    let opts = verify::Options {
        since: args.since,
        quick: args.quick,
        progress: !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let started = std::time::Instant::now();
    let report = verify::run(&store, &opts).await.map_err(Failure::failed)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!("{}", report.summary(started.elapsed()));
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(Failure::failed(""))
    }
}

fn sim_config(args: &SimArgs) -> Result<sim::SimConfig, kling_archiver::config::ConfigError> {
    use secrecy::ExposeSecret;
    let ak = kling_archiver::config::secret_from_env("KLING_ACCESS_KEY")?;
    let sk = kling_archiver::config::secret_from_env("KLING_SECRET_KEY")?;
    let mut cfg = sim::SimConfig::new(ak.expose_secret(), sk.expose_secret());
    cfg.bind = args.bind;
    cfg.latency = std::time::Duration::from_millis(args.latency_ms);
    cfg.result_ttl = std::time::Duration::from_secs(args.result_ttl_secs);
    Ok(cfg)
}

/// SIGTERM or SIGINT start a graceful shutdown; a second one exits at once.
async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    for n in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if n > 0 {
            tracing::warn!("second signal: exiting now; unacked messages will be redelivered");
            std::process::exit(130);
        }
        tracing::info!("signal received: draining");
        token.cancel();
    }
}
