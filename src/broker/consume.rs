//! The consumer: one connection's session after another until shutdown or
//! a fatal error. Every delivery runs as its own task (see
//! [`super::settle`]); while told to pause, the consumer is cancelled and
//! messages go back uncharged; after a lost connection in-flight jobs
//! finish before it consumes again.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::settle::{Handled, Settler, handle, nack_requeue};
use super::{BrokerError, JobEvent, Topology, backoff_delay, bounded, connect_named};
use crate::config::Config;
use crate::ops::Status;
use crate::pipeline::Pipeline;

/// What the assembler of the worker tells the consumer, and what the
/// consumer reports back for readiness.
pub struct Controls {
    /// `/readyz`: the consumer sets consuming and draining.
    pub status: Arc<Status>,
    /// `true` while the worker must take no jobs (a dependency is down):
    /// the consumer stops consuming and resumes when it turns `false`.
    pub pause: watch::Receiver<bool>,
}

/// The consuming side of a worker.
pub struct JobConsumer {
    config: Arc<Config>,
    pipeline: Arc<Pipeline>,
    controls: Controls,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
}

/// The jobs in flight across sessions, and the signals that end them.
struct Flight {
    shutdown: CancellationToken,
    /// Cancelled on a fatal error: the worker takes no more jobs.
    fatal: CancellationToken,
    /// Cancelled when a session's held-back requeues must let go (its
    /// channel died, or the shutdown timeout ran out).
    hold: CancellationToken,
    tasks: JoinSet<()>,
    held: Held,
}

impl Flight {
    /// Wait for every in-flight job, at most `timeout`; false if
    /// shutdown or a fatal error came first, or the time ran out.
    async fn finish_jobs(&mut self, timeout: Duration) -> bool {
        let tasks = &mut self.tasks;
        let wait_jobs = async { while tasks.join_next().await.is_some() {} };
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = self.fatal.cancelled() => false,
            r = tokio::time::timeout(timeout, wait_jobs) => r.is_ok(),
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

impl JobConsumer {
    pub fn new(config: Arc<Config>, pipeline: Arc<Pipeline>, controls: Controls) -> Self {
        Self {
            config,
            pipeline,
            controls,
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
    ///
    /// - While paused, the consumer is cancelled and messages go back to
    ///   the queue uncharged; it consumes again on resume.
    /// - When the connection or a channel is lost, in-flight jobs stop
    ///   (`Settler::lost`: their acks would die with the channel, and the
    ///   broker redelivers their messages); a Kling call in flight still
    ///   stores its answer, which the redelivered copy finds through the
    ///   image's claim. The worker reconnects with backoff once they ended.
    /// - The first connection failing is an error (a wrong `AMQP_URL` should
    ///   fail loudly); later ones are retried until shutdown.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let topology = Topology::of(&self.config);
        let mut flight = Flight {
            hold: shutdown.child_token(),
            shutdown,
            fatal: CancellationToken::new(),
            tasks: JoinSet::new(),
            held: Held::default(),
        };
        let mut reconnects: u32 = 0;
        let result = loop {
            let ended = self.session(&topology, &mut flight).await;
            self.controls.status.set_consuming(false);
            match ended {
                SessionEnd::Shutdown => break Ok(()),
                SessionEnd::Fatal => break Err(BrokerError::Fatal),
                SessionEnd::Failed(e @ BrokerError::Topology { .. }) => break Err(e),
                SessionEnd::Failed(e) if reconnects == 0 && flight.held.conn.is_none() => {
                    break Err(e);
                }
                SessionEnd::Failed(e) => {
                    reconnects += 1;
                    if let Some(end) = self.after_lost(&mut flight, e, reconnects).await {
                        break end;
                    }
                }
            }
        };
        self.drain(&mut flight).await;
        result
    }

    /// A session failed: let its jobs finish, wait out the backoff, and say
    /// whether the worker stops instead of reconnecting.
    async fn after_lost(
        &self,
        flight: &mut Flight,
        e: BrokerError,
        reconnects: u32,
    ) -> Option<Result<(), BrokerError>> {
        // The dead session's held requeues can nack nothing now: release
        // them, and let its jobs finish.
        flight.hold.cancel();
        flight.hold = flight.shutdown.child_token();
        flight.held.close("reconnecting").await;
        let delay = backoff_delay(reconnects.min(6));
        tracing::warn!(
            error = %e,
            in_flight = flight.tasks.len(),
            reconnect_in_ms = delay.as_millis() as u64,
            reconnects,
            "lost RabbitMQ; finishing in-flight jobs, then reconnecting"
        );
        if flight.finish_jobs(self.config.shutdown_timeout).await {
            tokio::select! {
                () = flight.shutdown.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
        }
        if flight.fatal.is_cancelled() {
            return Some(Err(BrokerError::Fatal));
        }
        if flight.shutdown.is_cancelled() {
            return Some(Ok(()));
        }
        None
    }

    /// Give in-flight jobs the shutdown timeout, then close the connection.
    async fn drain(&self, flight: &mut Flight) {
        self.controls.status.set_draining();
        let tasks = &mut flight.tasks;
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.shutdown_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                left = flight.tasks.len(),
                "shutdown timeout: leaving in-flight jobs unacked for redelivery"
            );
            // Cancel the held-back requeue delays too, then abort the rest.
            flight.hold.cancel();
            flight.tasks.abort_all();
            while flight.tasks.join_next().await.is_some() {}
        }
        flight.held.close("worker stopping").await;
        tracing::info!("stopped");
    }

    /// Connect, declare, and open the consuming and the confirming
    /// publishing channel. The connection and channels go into `held` so
    /// the caller can drain, then close.
    async fn open(
        &self,
        topology: &Topology,
        held: &mut Held,
    ) -> Result<(Channel, Channel), BrokerError> {
        let cfg = &self.config;
        let conn = connect_named(&cfg.amqp_url, "worker", &topology.queue).await?;
        let setup = async {
            let consume_ch = conn.create_channel().await.map_err(BrokerError::channel)?;
            let publish_ch = conn.create_channel().await.map_err(BrokerError::channel)?;
            topology.declare(&consume_ch).await?;
            publish_ch
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(BrokerError::channel)?;
            // Jobs in flight; the Kling calls among them stay under
            // `--concurrency` (the Kling client's limiter).
            let prefetch = u16::try_from(cfg.prefetch).unwrap_or(u16::MAX);
            consume_ch
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(BrokerError::channel)?;
            Ok::<_, BrokerError>((consume_ch, publish_ch))
        };
        let setup = setup.await;
        held.conn = Some(conn);
        let (consume_ch, publish_ch) = setup?;
        held.channels = vec![consume_ch.clone(), publish_ch.clone()];
        Ok((consume_ch, publish_ch))
    }

    /// One connection's life: declare, consume, dispatch, follow pauses.
    async fn session(&self, topology: &Topology, flight: &mut Flight) -> SessionEnd {
        let (consume_ch, publish_ch) = match self.open(topology, &mut flight.held).await {
            Ok(chs) => chs,
            Err(e) => return SessionEnd::Failed(e),
        };
        // Whether this session's consumer is live (see `return_uncharged`).
        let (consuming, consuming_rx) = watch::channel(false);
        let settler = Arc::new(Settler {
            consuming: consuming_rx,
            publish: publish_ch,
            topology: topology.clone(),
            events: self.events.clone(),
            stop: flight.hold.clone(),
            fatal: flight.fatal.clone(),
            lost: CancellationToken::new(),
        });
        let mut live = Live {
            ch: consume_ch,
            topology,
            status: &self.controls.status,
            consuming,
            consumer: None,
            cancelled: Vec::new(),
        };
        let mut pause = self.controls.pause.clone();
        if !*pause.borrow_and_update()
            && let Err(e) = live.start().await
        {
            return SessionEnd::Failed(e);
        }
        tracing::info!(
            queue = topology.queue,
            concurrency = self.config.concurrency,
            prefetch = self.config.prefetch,
            archive = self.pipeline.store().describe(),
            consuming = live.consumer.is_some(),
            "worker started"
        );
        let ended = self.dispatch(flight, &mut live, &mut pause, &settler).await;
        if matches!(ended, SessionEnd::Failed(_)) {
            settler.lost.cancel();
        }
        if matches!(ended, SessionEnd::Shutdown | SessionEnd::Fatal) {
            live.stop().await;
        }
        ended
    }

    /// Take deliveries until the session ends.
    async fn dispatch(
        &self,
        flight: &mut Flight,
        live: &mut Live<'_>,
        pause: &mut watch::Receiver<bool>,
        settler: &Arc<Settler>,
    ) -> SessionEnd {
        loop {
            tokio::select! {
                // Stopping outranks new deliveries.
                biased;
                () = flight.shutdown.cancelled() => {
                    tracing::info!(in_flight = flight.tasks.len(), "shutdown requested; taking no new jobs");
                    return SessionEnd::Shutdown;
                }
                () = flight.fatal.cancelled() => return SessionEnd::Fatal,
                Some(_) = flight.tasks.join_next(), if !flight.tasks.is_empty() => {}
                Ok(()) = pause.changed() => {
                    let paused = *pause.borrow_and_update();
                    if paused {
                        live.pause(flight.tasks.len()).await;
                    } else if let Err(e) = live.resume().await {
                        return SessionEnd::Failed(e);
                    }
                }
                delivery = next_delivery(&mut live.consumer) => match delivery {
                    Some(Ok(delivery)) => self.spawn(flight, delivery, settler),
                    Some(Err(e)) => return SessionEnd::Failed(BrokerError::Lost { reason: e.to_string() }),
                    None => return SessionEnd::Failed(BrokerError::Lost { reason: "the broker cancelled the consumer".into() }),
                },
                (i, delivery) = next_cancelled(&mut live.cancelled), if !live.cancelled.is_empty() => match delivery {
                    Some(Ok(delivery)) => self.spawn(flight, delivery, settler),
                    _ => {
                        live.cancelled.swap_remove(i);
                    }
                },
            }
        }
    }

    fn spawn(&self, flight: &mut Flight, delivery: Delivery, settler: &Arc<Settler>) {
        let pipeline = self.pipeline.clone();
        let settler = settler.clone();
        let fatal = flight.fatal.clone();
        let limit = self.config.delivery_limit;
        if fatal.is_cancelled() {
            // Sent before the consumer was cancelled: not ours to run.
            flight.tasks.spawn(async move {
                nack_requeue(&delivery).await;
            });
            return;
        }
        flight.tasks.spawn(async move {
            crate::ops::metrics::jobs_in_flight(1.0);
            if handle(delivery, pipeline, settler, limit).await == Handled::Fatal {
                fatal.cancel();
            }
            crate::ops::metrics::jobs_in_flight(-1.0);
        });
    }
}

/// The consuming channel of a session and its consumer, if any.
struct Live<'a> {
    ch: Channel,
    topology: &'a Topology,
    status: &'a Status,
    consuming: watch::Sender<bool>,
    consumer: Option<Consumer>,
    /// A cancelled consumer still hands over what the broker sent before
    /// the cancel; those run (and are returned) like any other delivery.
    cancelled: Vec<Consumer>,
}

impl Live<'_> {
    fn set_consuming(&self, on: bool) {
        self.status.set_consuming(on);
        self.consuming.send_replace(on);
    }

    async fn start(&mut self) -> Result<(), BrokerError> {
        self.consumer = Some(consume(&self.ch, self.topology).await?);
        self.set_consuming(true);
        Ok(())
    }

    async fn pause(&mut self, in_flight: usize) {
        if let Some(c) = self.consumer.take() {
            bounded(self.ch.basic_cancel(c.tag(), BasicCancelOptions::default())).await;
            self.cancelled.push(c);
            self.set_consuming(false);
            tracing::warn!(
                in_flight,
                "paused: stopped consuming; in-flight jobs go back to the queue"
            );
        }
    }

    async fn resume(&mut self) -> Result<(), BrokerError> {
        if self.consumer.is_none() {
            self.start().await?;
            tracing::info!("resumed: consuming again");
        }
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(c) = self.consumer.take() {
            bounded(self.ch.basic_cancel(c.tag(), BasicCancelOptions::default())).await;
        }
    }
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
async fn next_delivery(consumer: &mut Option<Consumer>) -> Option<Result<Delivery, lapin::Error>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// The next leftover delivery of any cancelled consumer, with its index;
/// `None` means that consumer is finished.
async fn next_cancelled(
    cancelled: &mut [Consumer],
) -> (usize, Option<Result<Delivery, lapin::Error>>) {
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
