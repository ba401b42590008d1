//! Logging setup. One `tracing` subscriber for the process: JSON lines in
//! containers, pretty text in a terminal, levels from `RUST_LOG`.
//!
//! What may be logged is a rule of the whole codebase (see
//! `docs/operations.md`): never a secret, a JWT, credentials in a URL, or
//! image bytes; facts go in fields, messages stay short.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::LogFormat;

/// Default levels of the worker when `RUST_LOG` is unset.
pub const WORKER_LOG: &str = "info,lapin=warn,aws_config=warn,aws_smithy_runtime=warn,hyper=warn";
/// The demo prints its own summary; logs only say what went wrong.
pub const DEMO_LOG: &str = "warn,lapin=error";

/// Install the global subscriber. Safe to call more than once (later calls
/// are ignored), so tests and the demo can share it. `default` applies when
/// `RUST_LOG` is unset.
pub fn init(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// For tests: quiet unless `TEST_LOG=1`.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                EnvFilter::new("debug,lapin=info,aws=info,hyper=info,h2=info,rustls=info")
            }))
            .with_test_writer()
            .try_init();
    }
}
