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
