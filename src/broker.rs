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
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Classify, Disposition};
use crate::job::Job;
use crate::ops::Status;
use crate::pipeline::{Outcome, Pipeline};

/// Headers the worker adds to a dead letter.
pub const HEADER_REASON_CODE: &str = "x-kling-reason-code";
pub const HEADER_REASON: &str = "x-kling-reason";
pub const HEADER_JOB_ID: &str = "x-kling-job-id";
pub const HEADER_FAILED_AT: &str = "x-kling-failed-at";
/// Deliveries charged to earlier copies of a message the worker put back
/// uncharged while suspended (see [`Settler::return_uncharged`]).
pub const HEADER_PRIOR_DELIVERIES: &str = "x-kling-prior-deliveries";

/// The queues and exchange of one job queue. Every declarer (worker, tests,
/// `deploy/rabbitmq/definitions.json`) must use identical arguments, or
/// RabbitMQ closes the channel with `PRECONDITION_FAILED`.
#[derive(Debug, Clone)]
pub struct Topology {
    pub queue: String,
    pub delivery_limit: u32,
    /// Delays of the retry queues, shortest first (see [`Topology::retry_tier`]).
    pub retry_delays: Vec<Duration>,
}

/// How often readiness checks that the archive answers.
const STORE_CHECK_EVERY: Duration = Duration::from_secs(15);

/// Default retry delays: transient failures that outlast a job's own
/// retries wait 5 s, then 30 s, then 5 min per further attempt.
pub const DEFAULT_RETRY_DELAYS_SECS: [u64; 3] = [5, 30, 300];

impl Topology {
    pub fn new(queue: impl Into<String>, delivery_limit: u32) -> Self {
        Self {
            queue: queue.into(),
            delivery_limit,
            retry_delays: DEFAULT_RETRY_DELAYS_SECS
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
        }
    }

    /// Other retry delays (all declarers must agree, like the delivery limit).
    pub fn with_retry_delays(mut self, delays: Vec<Duration>) -> Self {
        if !delays.is_empty() {
            self.retry_delays = delays;
        }
        self
    }

    /// `<queue>.retry.<secs>s`: messages wait there for the queue's TTL,
    /// then RabbitMQ dead-letters them back to the job queue.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}s", self.queue, delay.as_secs())
    }

    /// The retry queue for a message that has failed `failures` times.
    pub fn retry_tier(&self, failures: u32) -> (String, Duration) {
        let i = (failures.max(1) as usize - 1).min(self.retry_delays.len() - 1);
        let delay = self.retry_delays[i];
        (self.retry_queue(delay), delay)
    }

    pub fn retry_queue_arguments(&self, delay: Duration) -> FieldTable {
        let mut args = self.dead_queue_arguments();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.queue.clone().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Durable fanout exchange with one [`crate::archive::manifest::ResultEvent`]
    /// per archived job; downstream binds its own queues to it.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.queue)
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
        ch.exchange_declare(
            self.results_exchange().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::topology("results exchange", e))?;
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
        for delay in &self.retry_delays {
            ch.queue_declare(
                self.retry_queue(*delay).into(),
                durable,
                self.retry_queue_arguments(*delay),
            )
            .await
            .map_err(|e| BrokerError::topology("retry queue", e))?;
        }
        Ok(())
    }
}

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

/// The consuming worker.
pub struct Worker {
    config: Arc<Config>,
    pipeline: Arc<Pipeline>,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
    status: Arc<Status>,
}

impl Worker {
    pub fn new(config: Arc<Config>, pipeline: Arc<Pipeline>) -> Self {
        let status = Arc::new(Status::new(pipeline.kling().gate().subscribe()));
        Self {
            config,
            pipeline,
            events: None,
            status,
        }
    }

    /// Receive a [`JobEvent`] for every settled message.
    pub fn with_events(mut self, tx: mpsc::UnboundedSender<JobEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    /// What `/readyz` reports.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Consume until `shutdown` is cancelled (then drain within the shutdown
    /// timeout) or a fatal error stops the worker.
    ///
    /// - While the Kling gate is closed (account refused, outage) the
    ///   consumer is cancelled and messages go back to the queue uncharged;
    ///   it consumes again when the gate reopens.
    /// - When the connection or a channel is lost, in-flight jobs stop
    ///   (`Settler::lost`: their acks would die with the channel, and the
    ///   broker redelivers their messages); a Kling call in flight still
    ///   stores its answer, which the redelivered copy finds through the
    ///   image's claim. The worker reconnects with backoff once they ended.
    /// - The first connection failing is an error (a wrong `AMQP_URL` should
    ///   fail loudly); later ones are retried until shutdown.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let cfg = self.config.clone();
        let topology = cfg.topology();
        // Probes Kling while the gate is closed; reopens it.
        let supervisor_stop = CancellationToken::new();
        let _supervisor = AbortOnDropHandle::new(tokio::spawn({
            let pipeline = self.pipeline.clone();
            let stop = supervisor_stop.clone();
            async move { pipeline.kling().supervise(stop).await }
                .instrument(tracing::Span::current())
        }));
        // Readiness includes the archive answering.
        let _store_check = AbortOnDropHandle::new(tokio::spawn({
            let pipeline = self.pipeline.clone();
            let status = self.status.clone();
            async move {
                let Ok(probe) = crate::archive::ObjectKey::parse(".kling-archiver-health") else {
                    return;
                };
                loop {
                    let ok = match pipeline.store().head(&probe).await {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, "the archive does not answer");
                            false
                        }
                    };
                    status.set_store_reachable(ok);
                    crate::ops::metrics::store_reachable(ok);
                    tokio::time::sleep(STORE_CHECK_EVERY).await;
                }
            }
        }));
        let fatal = CancellationToken::new();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut held = Held::default();
        let mut hold = shutdown.child_token();
        let mut reconnects: u32 = 0;
        let result = loop {
            let ended = self
                .session(&topology, &shutdown, &fatal, &hold, &mut tasks, &mut held)
                .await;
            self.status.set_consuming(false);
            match ended {
                SessionEnd::Shutdown => break Ok(()),
                SessionEnd::Fatal => break Err(BrokerError::Fatal),
                SessionEnd::Failed(e @ BrokerError::Topology { .. }) => break Err(e),
                SessionEnd::Failed(e) if reconnects == 0 && held.conn.is_none() => break Err(e),
                SessionEnd::Failed(e) => {
                    // The dead session's held requeues can nack nothing now:
                    // release them, and let its jobs finish.
                    hold.cancel();
                    hold = shutdown.child_token();
                    held.close("reconnecting").await;
                    reconnects += 1;
                    let delay = backoff_delay(reconnects.min(6));
                    tracing::warn!(
                        error = %e,
                        in_flight = tasks.len(),
                        reconnect_in_ms = delay.as_millis() as u64,
                        reconnects,
                        "lost RabbitMQ; finishing in-flight jobs, then reconnecting"
                    );
                    let wait_jobs = async { while tasks.join_next().await.is_some() {} };
                    let waited = tokio::select! {
                        () = shutdown.cancelled() => false,
                        () = fatal.cancelled() => false,
                        _ = tokio::time::timeout(cfg.shutdown_timeout, wait_jobs) => true,
                    };
                    if waited {
                        tokio::select! {
                            () = shutdown.cancelled() => {}
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                    if fatal.is_cancelled() {
                        break Err(BrokerError::Fatal);
                    }
                    if shutdown.is_cancelled() {
                        break Ok(());
                    }
                }
            }
        };

        // Give in-flight jobs the shutdown timeout.
        self.status.set_draining();
        supervisor_stop.cancel();
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
            hold.cancel();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        held.close("worker stopping").await;
        tracing::info!("stopped");
        result
    }

    /// One connection's life: declare, consume, dispatch, follow the gate.
    /// Leaves the connection and consuming channel in `held` so the caller
    /// can drain, then close.
    async fn session(
        &self,
        topology: &Topology,
        shutdown: &CancellationToken,
        fatal: &CancellationToken,
        hold: &CancellationToken,
        tasks: &mut JoinSet<()>,
        held: &mut Held,
    ) -> SessionEnd {
        let cfg = &self.config;
        let conn = match connect_named(&cfg.amqp_url, "worker", &topology.queue).await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e),
        };
        let setup = async {
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
            Ok::<_, BrokerError>((consume_ch, publish_ch))
        };
        let setup = setup.await;
        held.conn = Some(conn);
        let (consume_ch, publish_ch) = match setup {
            Ok(chs) => chs,
            Err(e) => return SessionEnd::Failed(e),
        };
        held.channels = vec![consume_ch.clone(), publish_ch.clone()];
        // Whether this session's consumer is live (see `return_uncharged`).
        let (consuming, consuming_rx) = watch::channel(false);
        let set_consuming = |on: bool| {
            self.status.set_consuming(on);
            consuming.send_replace(on);
        };
        let settler = Arc::new(Settler {
            consuming: consuming_rx,
            publish: publish_ch,
            topology: topology.clone(),
            events: self.events.clone(),
            stop: hold.clone(),
            fatal: fatal.clone(),
            lost: CancellationToken::new(),
        });
        let mut gate = self.pipeline.kling().gate().subscribe();
        let mut consumer: Option<Consumer> = None;
        // A cancelled consumer still hands over what the broker sent before
        // the cancel; those run (and are returned) like any other delivery.
        let mut cancelled: Vec<Consumer> = Vec::new();
        if gate.borrow_and_update().is_none() {
            match consume(&consume_ch, topology).await {
                Ok(c) => consumer = Some(c),
                Err(e) => return SessionEnd::Failed(e),
            }
        }
        set_consuming(consumer.is_some());
        tracing::info!(
            queue = topology.queue,
            concurrency = cfg.concurrency,
            archive = self.pipeline.store().describe(),
            consuming = consumer.is_some(),
            "worker started"
        );

        let ended = loop {
            tokio::select! {
                // Stopping outranks new deliveries.
                biased;
                () = shutdown.cancelled() => {
                    tracing::info!(in_flight = tasks.len(), "shutdown requested; taking no new jobs");
                    break SessionEnd::Shutdown;
                }
                () = fatal.cancelled() => break SessionEnd::Fatal,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                Ok(()) = gate.changed() => {
                    let suspended = gate.borrow_and_update().is_some();
                    if suspended {
                        if let Some(c) = consumer.take() {
                            bounded(consume_ch.basic_cancel(c.tag(), BasicCancelOptions::default())).await;
                            cancelled.push(c);
                            set_consuming(false);
                            tracing::warn!(in_flight = tasks.len(), "suspended: stopped consuming; in-flight jobs go back to the queue");
                        }
                    } else if consumer.is_none() {
                        match consume(&consume_ch, topology).await {
                            Ok(c) => {
                                consumer = Some(c);
                                set_consuming(true);
                                tracing::info!("resumed: consuming again");
                            }
                            Err(e) => break SessionEnd::Failed(e),
                        }
                    }
                }
                delivery = next_delivery(&mut consumer) => match delivery {
                    Some(Ok(delivery)) => self.spawn(tasks, delivery, &settler, fatal),
                    Some(Err(e)) => break SessionEnd::Failed(BrokerError::Lost { reason: e.to_string() }),
                    None => break SessionEnd::Failed(BrokerError::Lost { reason: "the broker cancelled the consumer".into() }),
                },
                (i, delivery) = next_cancelled(&mut cancelled), if !cancelled.is_empty() => match delivery {
                    Some(Ok(delivery)) => self.spawn(tasks, delivery, &settler, fatal),
                    _ => {
                        cancelled.swap_remove(i);
                    }
                },
            }
        };
        if matches!(ended, SessionEnd::Failed(_)) {
            settler.lost.cancel();
        }
        if matches!(ended, SessionEnd::Shutdown | SessionEnd::Fatal)
            && let Some(c) = consumer.take()
        {
            bounded(consume_ch.basic_cancel(c.tag(), BasicCancelOptions::default())).await;
        }
        ended
    }

    fn spawn(
        &self,
        tasks: &mut JoinSet<()>,
        delivery: lapin::message::Delivery,
        settler: &Arc<Settler>,
        fatal: &CancellationToken,
    ) {
        let pipeline = self.pipeline.clone();
        let settler = settler.clone();
        let fatal = fatal.clone();
        let limit = self.config.delivery_limit;
        if fatal.is_cancelled() {
            // Sent before the consumer was cancelled: not ours to run.
            tasks.spawn(async move {
                nack_requeue(&delivery).await;
            });
            return;
        }
        tasks.spawn(async move {
            crate::ops::metrics::jobs_in_flight(1.0);
            if handle(delivery, pipeline, settler, limit).await == Handled::Fatal {
                fatal.cancel();
            }
            crate::ops::metrics::jobs_in_flight(-1.0);
        });
    }
}

/// Headers RabbitMQ adds to one copy of a message (delivery count,
/// dead-lettering history). A copy the worker republishes starts without
/// them, or they would pile up and mislead.
pub const BROKER_COPY_HEADERS: &[&str] = &[
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// A message's headers without [`BROKER_COPY_HEADERS`] and without `also`.
pub fn headers_for_copy(props: &BasicProperties, also: &[&str]) -> FieldTable {
    let mut inner = props.headers().clone().unwrap_or_default().inner().clone();
    for k in BROKER_COPY_HEADERS.iter().chain(also) {
        inner.remove(*k);
    }
    FieldTable::from(inner)
}

/// Publish on a confirm-mode channel and wait for the broker's answer.
/// `mandatory` also fails a message no queue took (returned).
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), String> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if !confirm.is_ack() {
        return Err("the broker nacked the message".into());
    }
    if confirm.take_message().is_some() {
        return Err("no queue took the message (returned)".into());
    }
    Ok(())
}

/// A courtesy call to the broker (cancel, close) that must not hang the
/// worker when the connection is half dead: at most 5 s, result ignored.
async fn bounded<T>(call: impl Future<Output = T>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
}

/// Start a consumer with a tag that names this process.
async fn consume(ch: &Channel, topology: &Topology) -> Result<Consumer, BrokerError> {
    let tag = format!(
        "kling-archiver-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    );
    ch.basic_consume(
        topology.queue.clone().into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(BrokerError::channel)
}

/// The next delivery of the active consumer; pending forever without one.
async fn next_delivery(
    consumer: &mut Option<Consumer>,
) -> Option<Result<lapin::message::Delivery, lapin::Error>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// The next leftover delivery of any cancelled consumer, with its index;
/// `None` means that consumer is finished.
async fn next_cancelled(
    cancelled: &mut [Consumer],
) -> (
    usize,
    Option<Result<lapin::message::Delivery, lapin::Error>>,
) {
    let nexts = cancelled
        .iter_mut()
        .enumerate()
        .map(|(i, c)| Box::pin(async move { (i, c.next().await) }));
    futures::future::select_all(nexts).await.0
}

/// What a session leaves for the drain: the connection to close, and its
/// consuming and publishing channels, which must stay open until the drain
/// is over (dropping a channel's last handle closes it, and in-flight jobs'
/// acks and publishes would die with it).
#[derive(Default)]
struct Held {
    conn: Option<Connection>,
    channels: Vec<Channel>,
}

impl Held {
    /// Close the channels, then the connection, each bounded. Merely
    /// dropping a channel queues its close inside lapin, and a connection
    /// close right behind it makes that queued close fail and lapin log a
    /// spurious "Connection error" at ERROR.
    async fn close(&mut self, why: &str) {
        for ch in std::mem::take(&mut self.channels) {
            bounded(ch.close(200, why.into())).await;
        }
        if let Some(conn) = self.conn.take() {
            bounded(conn.close(200, why.into())).await;
        }
    }
}

/// Why a connection's session ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    Fatal,
    Failed(BrokerError),
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
    delivery_limit: u32,
) -> Handled {
    // Deliveries this message was charged: the broker's count since it was
    // last published, plus what earlier copies were charged.
    let charged = delivery_count(&delivery).saturating_add(prior_deliveries(&delivery));
    let attempt = charged + 1;
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
        // A returned copy carries its earlier charges; the broker's own
        // limit only sees the current copy's, so enforce the sum here.
        if charged > delivery_limit {
            return settler.dead_letter(&delivery, Some(job_id), "delivery_limit", format!("delivered {attempt} times, over the delivery limit {delivery_limit}")).await;
        }
        // A panic in one job must not take the worker down: run it as its
        // own task, aborted if this one is.
        let run = AbortOnDropHandle::new(tokio::spawn({
            let pipeline = pipeline.clone();
            // Cancelled when this session's connection is lost: the job
            // stops (its redelivery is someone else's); a Kling call in
            // flight still stores its answer.
            let stop = settler.lost.clone();
            async move { pipeline.run_until(&job, stop).await }.instrument(tracing::Span::current())
        }));
        let result = match run.await {
            Ok(r) => r,
            Err(e) => Err(crate::pipeline::PipelineError::internal(format!("job task failed: {e}"))),
        };
        // Downstream hears of the job before it is acked: a crash in
        // between repeats the event, never loses it.
        let result = match result {
            Ok(outcome) => match settler.publish_result(outcome.event()).await {
                true => Ok(outcome),
                false => Err(crate::pipeline::PipelineError::internal("the results exchange did not confirm the event")),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                if ack(&delivery).await {
                    match &outcome {
                        Outcome::Archived { manifest_key, segments, cost, reused_recognition, .. } => {
                            crate::ops::metrics::job("archived", "none");
                            tracing::info!(manifest = manifest_key, segments, cost, reused = reused_recognition, "archived")
                        }
                        Outcome::AlreadyArchived { manifest_key, .. } => {
                            crate::ops::metrics::job("already_archived", "none");
                            tracing::info!(manifest = manifest_key, "already archived")
                        }
                    }
                    settler.emit(JobEvent::Archived { job_id, outcome });
                }
                Handled::Settled
            }
            Err(e) => match e.disposition() {
                Disposition::Permanent => settler.dead_letter(&delivery, Some(job_id), e.code(), e.to_string()).await,
                Disposition::Transient => settler.retry_later(&delivery, job_id, charged, e.code(), &e.to_string()).await,
                Disposition::Suspend => settler.return_uncharged(&delivery, job_id, charged, e.code()).await,
                Disposition::Fatal => {
                    tracing::error!(error.code = e.code(), error = %e, "fatal: the worker stops consuming; the message goes back to the queue");
                    // Stop taking deliveries before this one goes back, or
                    // the broker may hand it straight back to us.
                    settler.fatal.cancel();
                    nack_requeue(&delivery).await;
                    crate::ops::metrics::job("fatal", e.code());
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
    /// Whether the session's consumer is live.
    consuming: watch::Receiver<bool>,
    publish: Channel,
    topology: Topology,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
    /// Cancelled at the end of the shutdown timeout: held messages are
    /// released at once.
    stop: CancellationToken,
    /// Cancelled on a fatal error: the worker takes no more jobs.
    fatal: CancellationToken,
    /// Cancelled when this session's connection is lost.
    lost: CancellationToken,
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
        let confirmed = publish_confirmed(
            &self.publish,
            &self.topology.dead_letter_exchange(),
            &self.topology.queue,
            true,
            &delivery.data,
            props,
        )
        .await
        .is_ok();
        if !confirmed {
            tracing::error!(
                error.code = code,
                "dead letter not confirmed by the broker; requeueing the message instead"
            );
            nack_requeue(delivery).await;
            return Handled::Settled;
        }
        if ack(delivery).await {
            crate::ops::metrics::job("dead_lettered", code);
            tracing::warn!(error.code = code, error = %reason, "dead-lettered");
            self.emit(JobEvent::DeadLettered {
                job_id,
                code,
                reason,
            });
        }
        Handled::Settled
    }

    /// Publish a job's result event to the results exchange and wait for the
    /// broker's confirm. Not mandatory: no bound queue is not an error.
    async fn publish_result(&self, event: &crate::archive::manifest::ResultEvent) -> bool {
        let Ok(body) = serde_json::to_vec(event) else {
            return false;
        };
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(event.job_id.clone().into())
            .with_type("kling.archived".into());
        // Not mandatory: a results exchange nobody listens to is fine.
        publish_confirmed(
            &self.publish,
            &self.topology.results_exchange(),
            "",
            false,
            &body,
            props,
        )
        .await
        .is_ok()
    }

    /// A transient failure that outlasted the job's own retries: park a
    /// copy in the retry queue for its tier (5 s, 30 s, 5 min by default;
    /// RabbitMQ moves it back to the job queue when the TTL runs out), with
    /// this failure charged, then ack the original. The worker's slot is
    /// free at once, and the delay survives a worker restart. If the copy is
    /// not confirmed, fall back to holding the message here for the delay
    /// and nacking it.
    async fn retry_later(
        &self,
        delivery: &lapin::message::Delivery,
        job_id: String,
        charged: u32,
        code: &'static str,
        reason: &str,
    ) -> Handled {
        let failures = charged.saturating_add(1);
        let (queue, delay) = self.topology.retry_tier(failures);
        tracing::warn!(
            error.code = code,
            error = reason,
            retry_in_ms = delay.as_millis() as u64,
            failures,
            "transient failure; the message waits in the retry queue"
        );
        let settled = if self.republish(delivery, &queue, failures).await {
            ack(delivery).await
        } else {
            tracing::warn!("retry queue did not confirm; holding the message, then requeueing it");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => {}
            }
            nack_requeue(delivery).await
        };
        if settled {
            crate::ops::metrics::job("requeued", code);
            self.emit(JobEvent::Requeued { job_id, code });
        }
        Handled::Settled
    }

    /// Publish a copy of `delivery` to `queue` (default exchange) carrying
    /// `charged` in [`HEADER_PRIOR_DELIVERIES`], without the broker's
    /// per-copy headers. True once the broker confirmed it.
    async fn republish(
        &self,
        delivery: &lapin::message::Delivery,
        queue: &str,
        charged: u32,
    ) -> bool {
        let mut headers = headers_for_copy(&delivery.properties, &[]);
        headers.insert(
            HEADER_PRIOR_DELIVERIES.into(),
            AMQPValue::LongLongInt(i64::from(charged)),
        );
        let props = delivery
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(headers);
        publish_confirmed(&self.publish, "", queue, true, &delivery.data, props)
            .await
            .is_ok()
    }

    /// Put the message back without charging it a delivery: the failure is
    /// the account's or the service's, not the message's. A nack would
    /// count towards `x-delivery-limit` (RabbitMQ 3.x quorum queues count
    /// every return), so a long arrears could burn messages into the
    /// dead-letter queue. Instead publish a copy carrying the charges so far
    /// (confirmed), then ack the original; if the copy is not confirmed,
    /// nack the original. A crash in between leaves a duplicate, which the
    /// manifest check makes harmless.
    async fn return_uncharged(
        &self,
        delivery: &lapin::message::Delivery,
        job_id: String,
        charged: u32,
        code: &'static str,
    ) -> Handled {
        // The gate just closed and the session is cancelling its consumer.
        // A copy put back before the cancel lands would come straight back
        // to this worker, be returned again, and churn until it does.
        let mut consuming = self.consuming.clone();
        let _ = tokio::time::timeout(CONSUMER_CANCEL_WAIT, consuming.wait_for(|on| !on)).await;
        let confirmed = self
            .republish(delivery, &self.topology.queue, charged)
            .await;
        let returned = if confirmed {
            ack(delivery).await
        } else {
            tracing::warn!(
                "could not put back a copy; nacking the message instead (costs one delivery)"
            );
            nack_requeue(delivery).await
        };
        if returned {
            crate::ops::metrics::job("returned", code);
            tracing::info!(
                error.code = code,
                "worker suspended: message returned to the queue uncharged"
            );
            self.emit(JobEvent::Returned { job_id, code });
        }
        Handled::Settled
    }
}

/// How long a returned job waits for the session to stop consuming.
const CONSUMER_CANCEL_WAIT: Duration = Duration::from_secs(5);

/// What earlier copies of this message were charged (see
/// [`HEADER_PRIOR_DELIVERIES`]).
fn prior_deliveries(delivery: &lapin::message::Delivery) -> u32 {
    header_u32(delivery, HEADER_PRIOR_DELIVERIES)
}

/// 1 s, 2 s, 4 s … capped at 60 s, with ±25 % jitter.
pub fn backoff_delay(attempt: u32) -> Duration {
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
    header_u32(delivery, "x-delivery-count")
}

fn header_u32(delivery: &lapin::message::Delivery, name: &str) -> u32 {
    let Some(headers) = delivery.properties.headers() else {
        return 0;
    };
    match headers.inner().get(name) {
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

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
