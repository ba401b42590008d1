//! RabbitMQ: the topology, the consumer, and the one place a message's fate
//! is decided.
//!
//! - [`topology`]: the job queue is a durable quorum queue with an
//!   explicit `x-delivery-limit`, dead-lettering at-least-once to
//!   `<queue>.dlx`, routed to the quorum queue `<queue>.dead`; retry
//!   queues `<queue>.retry.<n>s`; the results exchange.
//! - [`consume`]: the consumer. It holds up to `--prefetch` deliveries, runs
//!   each as its own task, stops consuming while told to pause, reconnects
//!   after a lost connection and drains on shutdown.
//! - [`settle`]: **the ack**. A message is acked only after the pipeline
//!   says the manifest is durable and the result event is confirmed, or
//!   after its dead letter or retry copy is confirmed by the broker.
//! - [`publish`]: confirmed publishes and copies of a delivery.
//!
//! Knows nothing about images, Kling or S3: it runs [`Pipeline::run`],
//! reads the error's [`crate::error::Classify`] answer, and hears only
//! "pause" and "resume" from whoever assembles the worker.

pub mod consume;
pub mod publish;
mod settle;
pub mod topology;

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;

pub use consume::{Controls, JobConsumer};
pub use publish::{BROKER_COPY_HEADERS, PublishError, headers_for_copy, publish_confirmed};
pub use topology::Topology;

use crate::pipeline::Outcome;
#[cfg(doc)]
use crate::pipeline::Pipeline;

/// Headers the worker adds to a dead letter.
pub const HEADER_REASON_CODE: &str = "x-kling-reason-code";
pub const HEADER_REASON: &str = "x-kling-reason";
pub const HEADER_JOB_ID: &str = "x-kling-job-id";
pub const HEADER_FAILED_AT: &str = "x-kling-failed-at";
/// Deliveries charged to earlier copies of a message the worker put back
/// uncharged while suspended (see `settle::Settler::return_uncharged`).
pub const HEADER_PRIOR_DELIVERIES: &str = "x-kling-prior-deliveries";

/// Connect with a name that shows in `rabbitmqctl list_connections`.
pub async fn connect(url: &secrecy::SecretString, role: &str) -> Result<Connection, BrokerError> {
    connect_named(url, role, "").await
}

/// As [`connect`], naming the queue too (several workers of one process,
/// as in tests, stay apart).
pub async fn connect_named(
    url: &secrecy::SecretString,
    role: &str,
    queue: &str,
) -> Result<Connection, BrokerError> {
    let mut name = format!("kling-archiver {role} pid {}", std::process::id());
    if !queue.is_empty() {
        name.push_str(&format!(" queue {queue}"));
    }
    Connection::connect(
        url.expose_secret(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .map_err(|e| BrokerError::Connect {
        reason: scrub_credentials(&e.to_string(), url.expose_secret()),
    })
}

/// `msg` without the AMQP URL or its password: the AMQP client repeats a
/// malformed URL whole in its error, credentials included.
fn scrub_credentials(msg: &str, url: &str) -> String {
    let mut out = msg.replace(url, "<AMQP_URL>");
    // user:password@ between the scheme and the host, parsed by hand so a
    // URL the url crate refuses is scrubbed too.
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
        && !password.is_empty()
    {
        out = out.replace(password, "***");
        // A password in a URL may be percent-encoded.
        if let Ok(decoded) = percent_encoding::percent_decode_str(password).decode_utf8()
            && !decoded.is_empty()
        {
            out = out.replace(decoded.as_ref(), "***");
        }
    }
    out
}

/// What happened to one message; sent to an optional observer (the demo,
/// tests) after the message is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Archived {
        job_id: String,
        outcome: Outcome,
    },
    DeadLettered {
        job_id: Option<String>,
        code: &'static str,
        reason: String,
    },
    Requeued {
        job_id: String,
        code: &'static str,
    },
    /// Put back without charging a delivery: the worker is suspended.
    Returned {
        job_id: String,
        code: &'static str,
    },
    Fatal {
        job_id: String,
        code: &'static str,
        reason: String,
    },
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ: {reason}; check AMQP_URL and that the broker is running")]
    Connect { reason: String },
    #[error(
        "declaring the {what} failed: {reason}; every declarer must use the same queue arguments (docs/operations.md)"
    )]
    Topology { what: &'static str, reason: String },
    #[error("RabbitMQ channel error: {0}")]
    Channel(String),
    #[error("lost the RabbitMQ consumer: {reason}")]
    Lost { reason: String },
    #[error("stopped after a fatal error (see the error log above)")]
    Fatal,
}

impl BrokerError {
    pub(crate) fn topology(what: &'static str, e: lapin::Error) -> Self {
        BrokerError::Topology {
            what,
            reason: e.to_string(),
        }
    }

    pub(crate) fn channel(e: lapin::Error) -> Self {
        BrokerError::Channel(e.to_string())
    }
}

/// A courtesy call to the broker (cancel, close) that must not hang the
/// worker when the connection is half dead: at most 5 s, result ignored.
pub(crate) async fn bounded<T>(call: impl Future<Output = T>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
}

/// 1 s, 2 s, 4 s … capped at 60 s, with ±25 % jitter.
pub fn backoff_delay(attempt: u32) -> Duration {
    let base = 1000u64
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(6))
        .min(60_000);
    let jitter = fastrand::u64(0..=base / 2);
    Duration::from_millis(base - base / 4 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_never_carry_the_password() {
        let url = "amqp://archiver:s3cr%2Ft-pw@rabbit:notaport/%2f";
        for msg in [
            format!("invalid uri {url}: bad port"),
            "auth failed for archiver:s3cr%2Ft-pw".to_owned(),
            "auth failed: password s3cr/t-pw refused".to_owned(),
        ] {
            let out = scrub_credentials(&msg, url);
            assert!(!out.contains("s3cr"), "{out}");
        }
        assert_eq!(
            scrub_credentials("connection refused", "amqp://guest:guest@h/%2f"),
            "connection refused"
        );
    }

    #[tokio::test]
    async fn a_malformed_url_with_a_password_fails_without_showing_it() {
        let url = secrecy::SecretString::from("amqp://u:hunter2-pw@127.0.0.1:notaport/%2f");
        let err = connect(&url, "test").await.unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("AMQP_URL"), "{err}");
    }

    #[test]
    fn backoff_delay_grows_and_is_capped() {
        for attempt in 1..20 {
            let d = backoff_delay(attempt).as_millis() as u64;
            let base = (1000u64 << (attempt - 1).min(6)).min(60_000);
            assert!(
                d >= base * 3 / 4 && d <= base * 5 / 4,
                "attempt {attempt}: {d} ms"
            );
        }
    }
}
