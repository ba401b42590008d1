//! RabbitMQ: the topology, the consumer, and the one place a message's fate
//! is decided (see [`settle`]).
//!
//! - The job queue is a durable quorum queue with an explicit
//!   `x-delivery-limit`, dead-lettering at-least-once to `<queue>.dlx`,
//!   routed to the quorum queue `<queue>.dead`.
//! - Prefetch = `--concurrency`; every delivery runs as its own task.
//! - A message is acked only after the pipeline says the manifest is
//!   durable, or after its dead letter is confirmed by the broker.
//! - Transient failures are held for a backoff delay, then nacked with
//!   requeue; the delivery limit ends poison loops.
//! - A fatal failure stops consumption; in-flight messages go back.
//!
//! Knows nothing about images, Kling or S3: it runs [`Pipeline::run`] and
//! reads the error's [`Classify`] answer.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Classify, Disposition};
use crate::job::Job;
use crate::pipeline::{Outcome, Pipeline};

/// Headers the worker adds to a dead letter.
pub const HEADER_REASON_CODE: &str = "x-kling-reason-code";
pub const HEADER_REASON: &str = "x-kling-reason";
pub const HEADER_JOB_ID: &str = "x-kling-job-id";
pub const HEADER_FAILED_AT: &str = "x-kling-failed-at";

/// The queues and exchange of one job queue. Every declarer (worker, tests,
/// `deploy/rabbitmq/definitions.json`) must use identical arguments, or
/// RabbitMQ closes the channel with `PRECONDITION_FAILED`.
#[derive(Debug, Clone)]
pub struct Topology {
    pub queue: String,
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(queue: impl Into<String>, delivery_limit: u32) -> Self {
        Self {
            queue: queue.into(),
            delivery_limit,
        }
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    pub fn job_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange().into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.queue.clone().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        // at-least-once dead-lettering silently degrades without this.
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }

    pub fn dead_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args
    }

    /// Declare everything, idempotently.
    pub async fn declare(&self, ch: &Channel) -> Result<(), BrokerError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.exchange_declare(
            self.dead_letter_exchange().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::topology("dead-letter exchange", e))?;
        ch.queue_declare(
            self.dead_letter_queue().into(),
            durable,
            self.dead_queue_arguments(),
        )
        .await
        .map_err(|e| BrokerError::topology("dead-letter queue", e))?;
        ch.queue_bind(
            self.dead_letter_queue().into(),
            self.dead_letter_exchange().into(),
            self.queue.clone().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::topology("dead-letter binding", e))?;
        ch.queue_declare(
            self.queue.clone().into(),
            durable,
            self.job_queue_arguments(),
        )
        .await
        .map_err(|e| BrokerError::topology("job queue", e))?;
        Ok(())
    }
}

/// Connect with a name that shows in `rabbitmqctl list_connections`.
pub async fn connect(url: &secrecy::SecretString, role: &str) -> Result<Connection, BrokerError> {
    let name = format!("kling-archiver {role} pid {}", std::process::id());
    Connection::connect(
        url.expose_secret(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .map_err(|e| BrokerError::Connect {
        reason: e.to_string(),
    })
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
    Fatal {
        job_id: String,
        code: &'static str,
        reason: String,
    },
}

/// The consuming worker.
pub struct Worker {
    config: Arc<Config>,
    pipeline: Arc<Pipeline>,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
}

impl Worker {
    pub fn new(config: Arc<Config>, pipeline: Arc<Pipeline>) -> Self {
        Self {
            config,
            pipeline,
            events: None,
        }
    }

    /// Receive a [`JobEvent`] for every settled message.
    pub fn with_events(mut self, tx: mpsc::UnboundedSender<JobEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    /// Consume until `shutdown` is cancelled (then drain within the shutdown
    /// timeout) or a fatal error stops the worker.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let cfg = &self.config;
        let topology = Topology::new(cfg.queue.clone(), cfg.delivery_limit);
        let conn = connect(&cfg.amqp_url, "worker").await?;
        let consume_ch = conn.create_channel().await.map_err(BrokerError::channel)?;
        let publish_ch = conn.create_channel().await.map_err(BrokerError::channel)?;
        topology.declare(&consume_ch).await?;
        publish_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::channel)?;
        let prefetch = u16::try_from(cfg.concurrency).unwrap_or(u16::MAX);
        consume_ch
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(BrokerError::channel)?;
        let tag = format!(
            "kling-archiver-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let mut consumer = consume_ch
            .basic_consume(
                topology.queue.clone().into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::channel)?;
        tracing::info!(
            queue = topology.queue,
            concurrency = cfg.concurrency,
            archive = self.pipeline.store().describe(),
            "consuming"
        );

        let settler = Arc::new(Settler {
            publish: publish_ch.clone(),
            topology: topology.clone(),
            events: self.events.clone(),
            stop: shutdown.child_token(),
        });
        let fatal = CancellationToken::new();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut result = Ok(());
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    tracing::info!(in_flight = tasks.len(), "shutdown requested; taking no new jobs");
                    break;
                }
                () = fatal.cancelled() => {
                    result = Err(BrokerError::Fatal);
                    break;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let pipeline = self.pipeline.clone();
                        let settler = settler.clone();
                        let fatal = fatal.clone();
                        tasks.spawn(async move {
                            if handle(delivery, pipeline, settler).await == Handled::Fatal {
                                fatal.cancel();
                            }
                        });
                    }
                    Some(Err(e)) => {
                        result = Err(BrokerError::Lost { reason: e.to_string() });
                        break;
                    }
                    None => {
                        result = Err(BrokerError::Lost { reason: "the broker cancelled the consumer".into() });
                        break;
                    }
                },
            }
        }

        // Stop deliveries, then give in-flight jobs the shutdown timeout.
        let _ = consume_ch
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await;
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(cfg.shutdown_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                left = tasks.len(),
                "shutdown timeout: leaving in-flight jobs unacked for redelivery"
            );
            // Cancel the held-back requeue delays too, then abort the rest.
            settler.stop.cancel();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let _ = conn.close(200, "worker stopping".into()).await;
        tracing::info!("stopped");
        result
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Handled {
    Settled,
    Fatal,
}

/// Handle one delivery: parse, run, settle.
async fn handle(
    delivery: lapin::message::Delivery,
    pipeline: Arc<Pipeline>,
    settler: Arc<Settler>,
) -> Handled {
    let attempt = delivery_count(&delivery) + 1;
    let job = match Job::parse(&delivery.data) {
        Ok(job) => job,
        Err(e) => {
            let job_id = Job::salvage_id(&delivery.data);
            let span = tracing::info_span!(
                "job",
                job.id = job_id.as_deref().unwrap_or("?"),
                job.attempt = attempt
            );
            return settler
                .dead_letter(&delivery, job_id, e.code(), e.to_string())
                .instrument(span)
                .await;
        }
    };
    let span = tracing::info_span!("job", job.id = %job.id, job.attempt = attempt, job.source = job.source.kind(), kling.request_id = tracing::field::Empty);
    let job_id = job.id.to_string();
    async move {
        // A panic in one job must not take the worker down: run it as its
        // own task, aborted if this one is.
        let run = AbortOnDropHandle::new(tokio::spawn({
            let pipeline = pipeline.clone();
            async move { pipeline.run(&job).await }.instrument(tracing::Span::current())
        }));
        let result = match run.await {
            Ok(r) => r,
            Err(e) => Err(crate::pipeline::PipelineError::internal(format!("job task failed: {e}"))),
        };
        match result {
            Ok(outcome) => {
                if ack(&delivery).await {
                    match &outcome {
                        Outcome::Archived { manifest_key, segments, cost, reused_recognition, .. } => {
                            tracing::info!(manifest = manifest_key, segments, cost, reused = reused_recognition, "archived")
                        }
                        Outcome::AlreadyArchived { manifest_key } => tracing::info!(manifest = manifest_key, "already archived"),
                    }
                    settler.emit(JobEvent::Archived { job_id, outcome });
                }
                Handled::Settled
            }
            Err(e) => match e.disposition() {
                Disposition::Permanent => settler.dead_letter(&delivery, Some(job_id), e.code(), e.to_string()).await,
                Disposition::Transient => settler.requeue(&delivery, job_id, attempt, e.code(), &e.to_string()).await,
                Disposition::Fatal => {
                    tracing::error!(error.code = e.code(), error = %e, "fatal: the worker stops consuming; the message goes back to the queue");
                    nack_requeue(&delivery).await;
                    settler.emit(JobEvent::Fatal { job_id, code: e.code(), reason: e.to_string() });
                    Handled::Fatal
                }
            },
        }
    }
    .instrument(span)
    .await
}

/// Publishes dead letters and holds transient failures.
struct Settler {
    publish: Channel,
    topology: Topology,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
    /// Cancelled at the end of the shutdown timeout: held messages are
    /// released at once.
    stop: CancellationToken,
}

impl Settler {
    fn emit(&self, event: JobEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }

    /// Publish the message to the dead-letter queue with the reason, wait for
    /// the broker's confirm, then ack the original. If the publish is not
    /// confirmed the original is requeued: never dropped.
    async fn dead_letter(
        &self,
        delivery: &lapin::message::Delivery,
        job_id: Option<String>,
        code: &'static str,
        reason: String,
    ) -> Handled {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            HEADER_REASON_CODE.into(),
            AMQPValue::LongString(code.into()),
        );
        headers.insert(
            HEADER_REASON.into(),
            AMQPValue::LongString(LongString::from(truncate(&reason, 2000))),
        );
        if let Some(id) = &job_id {
            headers.insert(
                HEADER_JOB_ID.into(),
                AMQPValue::LongString(id.as_str().into()),
            );
        }
        headers.insert(
            HEADER_FAILED_AT.into(),
            AMQPValue::LongString(crate::archive::manifest::now_rfc3339().into()),
        );
        let content_type = delivery
            .properties
            .content_type()
            .clone()
            .unwrap_or_else(|| ShortString::from("application/json"));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(content_type)
            .with_headers(headers);
        let confirmed = match self
            .publish
            .basic_publish(
                self.topology.dead_letter_exchange().into(),
                self.topology.queue.clone().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                props,
            )
            .await
        {
            Ok(confirm) => match confirm.await {
                Ok(c) => c.is_ack() && c.take_message().is_none(),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if !confirmed {
            tracing::error!(
                error.code = code,
                "dead letter not confirmed by the broker; requeueing the message instead"
            );
            nack_requeue(delivery).await;
            return Handled::Settled;
        }
        if ack(delivery).await {
            tracing::warn!(error.code = code, error = %reason, "dead-lettered");
            self.emit(JobEvent::DeadLettered {
                job_id,
                code,
                reason,
            });
        }
        Handled::Settled
    }

    /// Hold the message for a backoff delay (so a failing dependency is not
    /// hammered and the delivery limit is not burnt in seconds), then
    /// return it to the queue.
    async fn requeue(
        &self,
        delivery: &lapin::message::Delivery,
        job_id: String,
        attempt: u32,
        code: &'static str,
        reason: &str,
    ) -> Handled {
        let delay = requeue_delay(attempt);
        tracing::warn!(
            error.code = code,
            error = reason,
            requeue_in_ms = delay.as_millis() as u64,
            "transient failure; returning the message to the queue"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.stop.cancelled() => {}
        }
        if nack_requeue(delivery).await {
            self.emit(JobEvent::Requeued { job_id, code });
        }
        Handled::Settled
    }
}

/// 1 s, 2 s, 4 s … capped at 60 s, with ±25 % jitter.
pub fn requeue_delay(attempt: u32) -> Duration {
    let base = 1000u64
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(6))
        .min(60_000);
    let jitter = fastrand::u64(0..=base / 2);
    Duration::from_millis(base - base / 4 + jitter)
}

async fn ack(delivery: &lapin::message::Delivery) -> bool {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(done) => done,
        Err(e) => {
            // The channel is gone; the broker will redeliver. Redelivery is
            // cheap: the manifest exists.
            tracing::warn!(error = %e, "ack failed; the message will be redelivered");
            false
        }
    }
}

async fn nack_requeue(delivery: &lapin::message::Delivery) -> bool {
    delivery
        .nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "nack failed; the broker will redeliver on channel close"))
        .unwrap_or(false)
}

/// Quorum queues count redeliveries in `x-delivery-count`.
fn delivery_count(delivery: &lapin::message::Delivery) -> u32 {
    let Some(headers) = delivery.properties.headers() else {
        return 0;
    };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongUInt(n)) => *n,
        _ => 0,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
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
    fn topology(what: &'static str, e: lapin::Error) -> Self {
        BrokerError::Topology {
            what,
            reason: e.to_string(),
        }
    }

    fn channel(e: lapin::Error) -> Self {
        BrokerError::Channel(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_queue_arguments_are_the_documented_ones() {
        let t = Topology::new("kling.jobs", 10);
        let args = t.job_queue_arguments();
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongInt(10)));
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("kling.jobs.dlx".into()))
        );
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("kling.jobs".into()))
        );
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        assert_eq!(
            get("x-overflow"),
            Some(AMQPValue::LongString("reject-publish".into()))
        );
        assert_eq!(t.dead_letter_queue(), "kling.jobs.dead");
    }

    #[test]
    fn requeue_delay_grows_and_is_capped() {
        for attempt in 1..20 {
            let d = requeue_delay(attempt).as_millis() as u64;
            let base = (1000u64 << (attempt - 1).min(6)).min(60_000);
            assert!(
                d >= base * 3 / 4 && d <= base * 5 / 4,
                "attempt {attempt}: {d} ms"
            );
        }
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
