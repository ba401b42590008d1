//! `worker dlq list | replay | purge`: look at the dead-letter queue grouped
//! by reason, put selected dead letters back on the job queue (confirmed),
//! or drop them.
//!
//! Messages are read with `basic.get` and settled one by one: a replayed
//! message is acked on the dead-letter queue only after its copy on the job
//! queue is confirmed, so a crash mid-replay duplicates at worst (harmless:
//! job ids are idempotent), never loses. Messages that do not match stay
//! where they are.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

use crate::broker::{
    BrokerError, HEADER_FAILED_AT, HEADER_JOB_ID, HEADER_PRIOR_DELIVERIES, HEADER_REASON,
    HEADER_REASON_CODE, Topology, headers_for_copy, publish_confirmed,
};

/// How long `dlq` waits for the dead letters it looked at to be ready again.
const RETURN_WAIT: Duration = Duration::from_secs(10);

/// One reason's share of the dead-letter queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasonGroup {
    pub count: usize,
    /// Up to five job ids.
    pub examples: Vec<String>,
    /// The reason text of the first one.
    pub sample_reason: String,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("RabbitMQ error: {0}")]
    Amqp(String),
    #[error(
        "the job queue did not confirm a replayed message; it stays in the dead-letter queue: {0}"
    )]
    Replay(#[source] crate::broker::PublishError),
    #[error("purging every dead letter needs --yes (or pick one with --reason)")]
    NotConfirmed,
}

fn amqp(e: lapin::Error) -> DlqError {
    DlqError::Amqp(e.to_string())
}

fn headers_of(msg: &lapin::message::BasicGetMessage) -> FieldTable {
    msg.delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default()
}

/// The reason code a dead letter carries: the worker's own, or RabbitMQ's
/// (`delivery_limit`, `rejected`, …) for messages the broker dead-lettered.
pub fn reason_code(headers: &FieldTable) -> String {
    let get = |k: &str| match headers.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        _ => None,
    };
    get(HEADER_REASON_CODE)
        .or_else(|| get("x-first-death-reason"))
        .unwrap_or_else(|| "unknown".into())
}

struct Session {
    conn: Connection,
    ch: Channel,
    topology: Topology,
}

impl Session {
    async fn open(topology: &Topology, url: &secrecy::SecretString) -> Result<Self, DlqError> {
        let conn = crate::broker::connect(url, "dlq").await?;
        let ch = conn.create_channel().await.map_err(amqp)?;
        topology.declare(&ch).await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp)?;
        Ok(Self {
            conn,
            ch,
            topology: topology.clone(),
        })
    }

    /// Apply `action` to every dead letter with reason code `reason` (all
    /// of them for `None`); keep the rest. Returns how many matched.
    async fn settle_matching(
        &self,
        reason: Option<&str>,
        action: Action,
    ) -> Result<usize, DlqError> {
        let mut n = 0;
        self.each(|msg| {
            if reason.is_none_or(|r| reason_code(&headers_of(msg)) == r) {
                n += 1;
                action
            } else {
                Action::Keep
            }
        })
        .await?;
        Ok(n)
    }

    /// Visit every dead letter once. `visit` returns what to do with it.
    async fn each(
        &self,
        mut visit: impl FnMut(&lapin::message::BasicGetMessage) -> Action,
    ) -> Result<(), DlqError> {
        let queue = self.topology.dead_letter_queue();
        // Messages left unacked stay invisible to later gets on this
        // channel, so one pass sees each message once. They are handed back
        // explicitly at the end (see `return_kept`).
        let mut last_kept = None;
        let mut kept = 0u32;
        while let Some(msg) = self
            .ch
            .basic_get(queue.clone().into(), BasicGetOptions::default())
            .await
            .map_err(amqp)?
        {
            match visit(&msg) {
                Action::Keep => {
                    last_kept = Some(msg.delivery.delivery_tag);
                    kept += 1;
                }
                Action::Drop => {
                    msg.delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(amqp)?;
                }
                Action::Replay => self.replay_one(&msg).await?,
            }
        }
        if let Some(tag) = last_kept {
            self.return_kept(&queue, tag, kept).await?;
        }
        Ok(())
    }

    /// Requeue the `kept` messages this channel still holds, and return only
    /// once the queue shows them ready again. Closing the channel would
    /// also return them, but asynchronously: the dead-letter queue is a
    /// quorum queue, which applies a return through its Raft log, so a
    /// `dlq replay` run straight after `dlq list` could find it empty. The
    /// ready count is polled (briefly; nothing else consumes dead letters)
    /// until it covers what was kept.
    async fn return_kept(&self, queue: &str, last_tag: u64, kept: u32) -> Result<(), DlqError> {
        self.ch
            .basic_nack(
                last_tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .map_err(amqp)?;
        let deadline = tokio::time::Instant::now() + RETURN_WAIT;
        loop {
            let ready = self
                .ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(amqp)?
                .message_count();
            if ready >= kept {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    ready,
                    kept,
                    "dead letters are still being returned to the queue"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn replay_one(&self, msg: &lapin::message::BasicGetMessage) -> Result<(), DlqError> {
        let headers = headers_for_copy(
            &msg.delivery.properties,
            &[
                HEADER_REASON_CODE,
                HEADER_REASON,
                HEADER_JOB_ID,
                HEADER_FAILED_AT,
                HEADER_PRIOR_DELIVERIES,
            ],
        );
        let props = msg
            .delivery
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Err(why) = publish_confirmed(
            &self.ch,
            "",
            &self.topology.queue,
            true,
            &msg.delivery.data,
            props,
        )
        .await
        {
            let _ = msg
                .delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            return Err(DlqError::Replay(why));
        }
        msg.delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp)?;
        Ok(())
    }

    async fn close(self) {
        let _ = self.ch.close(200, "dlq done".into()).await;
        let _ = self.conn.close(200, "dlq done".into()).await;
    }
}

#[derive(Clone, Copy)]
enum Action {
    Keep,
    Drop,
    Replay,
}

/// Dead letters grouped by reason code.
pub async fn list(
    topology: &Topology,
    url: &secrecy::SecretString,
) -> Result<BTreeMap<String, ReasonGroup>, DlqError> {
    let s = Session::open(topology, url).await?;
    let mut groups: BTreeMap<String, ReasonGroup> = BTreeMap::new();
    s.each(|msg| {
        let headers = headers_of(msg);
        let g = groups.entry(reason_code(&headers)).or_default();
        g.count += 1;
        let id = match headers.inner().get(HEADER_JOB_ID) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => crate::job::Job::salvage_id(&msg.delivery.data),
        };
        if let Some(id) = id
            && g.examples.len() < 5
        {
            g.examples.push(id);
        }
        if g.sample_reason.is_empty()
            && let Some(AMQPValue::LongString(r)) = headers.inner().get(HEADER_REASON)
        {
            g.sample_reason = r.to_string();
        }
        Action::Keep
    })
    .await?;
    s.close().await;
    Ok(groups)
}

/// Put dead letters (all, or those with `reason`) back on the job queue.
/// Returns how many.
pub async fn replay(
    topology: &Topology,
    url: &secrecy::SecretString,
    reason: Option<&str>,
) -> Result<usize, DlqError> {
    let s = Session::open(topology, url).await?;
    let n = s.settle_matching(reason, Action::Replay).await?;
    s.close().await;
    Ok(n)
}

/// Drop dead letters: those with `reason`, or all of them with `yes`.
pub async fn purge(
    topology: &Topology,
    url: &secrecy::SecretString,
    reason: Option<&str>,
    yes: bool,
) -> Result<usize, DlqError> {
    let s = Session::open(topology, url).await?;
    let n = match reason {
        None if !yes => {
            s.close().await;
            return Err(DlqError::NotConfirmed);
        }
        None => {
            s.ch.queue_purge(
                topology.dead_letter_queue().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .map_err(amqp)? as usize
        }
        Some(r) => s.settle_matching(Some(r), Action::Drop).await?,
    };
    s.close().await;
    Ok(n)
}

/// `worker dlq list` output.
pub fn render(groups: &BTreeMap<String, ReasonGroup>, queue: &str) -> String {
    let total: usize = groups.values().map(|g| g.count).sum();
    let mut out = format!("{total} dead letters in {queue}\n");
    let mut rows: Vec<_> = groups.iter().collect();
    rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    for (code, g) in rows {
        out.push_str(&format!(
            "{:>7}  {code}  e.g. {}\n",
            g.count,
            g.examples.join(", ")
        ));
        if !g.sample_reason.is_empty() {
            let reason: String = g.sample_reason.chars().take(160).collect();
            out.push_str(&format!("         {reason}\n"));
        }
    }
    out
}
