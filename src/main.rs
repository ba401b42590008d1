//! The `worker` binary: parse flags, validate config, start telemetry, run
//! until a signal, map the result to an exit code. Everything else is in
//! the library.

use std::process::ExitCode;

use clap::Parser;
use kling_archiver::config::{Cli, Command};
use kling_archiver::{broker, demo, sim, telemetry};
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

async fn run(cli: Cli) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match cli.command {
        None => {
            let config = match cli.worker.into_config() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "invalid configuration");
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match kling_archiver::run_worker(config, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(kling_archiver::RunError::Broker(broker::BrokerError::Fatal)) => {
                    ExitCode::from(EXIT_FATAL)
                }
                Err(e) => {
                    tracing::error!(error = %e, "worker failed");
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Some(Command::Demo(args)) => match demo::run(cli.worker, args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Some(Command::Enqueue(args)) => enqueue(&cli.worker, args).await,
        Some(Command::Dlq(args)) => dlq(&cli.worker, args).await,
        Some(Command::Verify(args)) => verify(&cli.worker, args).await,
        Some(Command::Report(args)) => report(&cli.worker, args).await,
        Some(Command::Sim(args)) => {
            let cfg = match sim_config(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match sim::run(cfg, async move { shutdown.cancelled().await }).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("simulator failed: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

async fn enqueue(
    worker: &kling_archiver::config::WorkerArgs,
    args: kling_archiver::config::EnqueueArgs,
) -> ExitCode {
    use kling_archiver::admin::enqueue;
    let source = match enqueue::Source::detect(&args.source) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
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
    let topology = worker.topology();
    let url = secrecy::SecretString::from(worker.amqp_url.clone());
    let started = std::time::Instant::now();
    match enqueue::run(&opts, &topology, &url, s3.as_ref()).await {
        Ok(report) => {
            println!(
                "{}",
                enqueue::summary(&report, &worker.queue, args.dry_run, started.elapsed())
            );
            if report.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn dlq(
    worker: &kling_archiver::config::WorkerArgs,
    args: kling_archiver::config::DlqArgs,
) -> ExitCode {
    use kling_archiver::admin::dlq;
    use kling_archiver::config::DlqAction;
    let topology = worker.topology();
    let url = secrecy::SecretString::from(worker.amqp_url.clone());
    let dead = topology.dead_letter_queue();
    let result = match args.action {
        DlqAction::List => dlq::list(&topology, &url)
            .await
            .map(|groups| print!("{}", dlq::render(&groups, &dead))),
        DlqAction::Replay { reason } => dlq::replay(&topology, &url, reason.as_deref())
            .await
            .map(|n| println!("replayed {n} dead letters from {dead} to {}", worker.queue)),
        DlqAction::Purge { reason, yes } => dlq::purge(&topology, &url, reason.as_deref(), yes)
            .await
            .map(|n| println!("purged {n} dead letters from {dead}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The archive named by `--archive` / `ARCHIVE_URL`.
async fn open_archive(
    worker: &kling_archiver::config::WorkerArgs,
) -> Result<kling_archiver::archive::Store, ExitCode> {
    let target =
        kling_archiver::archive::ArchiveTarget::parse(worker.archive_url()).map_err(|e| {
            eprintln!("error: ARCHIVE_URL: {e}");
            ExitCode::from(EXIT_CONFIG)
        })?;
    let s3 = kling_archiver::s3_client(worker.s3_force_path_style).await;
    Ok(kling_archiver::archive::Store::open(&target, &s3))
}

async fn report(
    worker: &kling_archiver::config::WorkerArgs,
    args: kling_archiver::config::ReportArgs,
) -> ExitCode {
    use kling_archiver::report;
    let store = match open_archive(worker).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let opts = report::Options {
        since: args.since,
        limit: args.limit,
        failed: Vec::new(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let started = std::time::Instant::now();
    match report::write(&store, &opts, &args.out).await {
        Ok(w) => {
            println!(
                "wrote {} ({} jobs, {:.1} MB) in {:.1}s",
                w.path.display(),
                w.summary.jobs,
                w.bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn verify(
    worker: &kling_archiver::config::WorkerArgs,
    args: kling_archiver::config::VerifyArgs,
) -> ExitCode {
    use kling_archiver::admin::verify;
    let store = match open_archive(worker).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let opts = verify::Options {
        since: args.since,
        quick: args.quick,
        progress: !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let started = std::time::Instant::now();
    match verify::run(&store, &opts).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("{}", report.summary(started.elapsed()));
            }
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn sim_config(
    args: &kling_archiver::config::SimArgs,
) -> Result<sim::SimConfig, kling_archiver::config::ConfigError> {
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
