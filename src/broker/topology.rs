//! The queues and exchanges of one job queue, and their declaration.

use std::time::Duration;

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::BrokerError;
use crate::config::{Config, DEFAULT_RETRY_DELAYS_SECS, WorkerArgs};

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

impl Topology {
    /// The queues a worker's configuration consumes and declares.
    pub fn of(config: &Config) -> Self {
        Self::new(config.queue.clone(), config.delivery_limit)
            .with_retry_delays(config.retry_delays.clone())
    }

    /// The queues the flags name (for `enqueue` and `dlq`, which need no
    /// Kling keys).
    pub fn from_args(args: &WorkerArgs) -> Self {
        Self::new(args.queue.clone(), args.delivery_limit).with_retry_delays(
            args.retry_delays_secs
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
        )
    }

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
        let mut args = quorum();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        );
        // Back to the job queue through the default exchange.
        self.dead_letter_to(&mut args, String::new());
        args
    }

    /// Dead-letter `args`' queue to `exchange` with the job queue as the
    /// routing key, at-least-once.
    fn dead_letter_to(&self, args: &mut FieldTable, exchange: String) {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.into()),
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
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Durable fanout exchange with one [`crate::manifest::ResultEvent`]
    /// per archived job; downstream binds its own queues to it.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.queue)
    }

    pub fn job_queue_arguments(&self) -> FieldTable {
        let mut args = quorum();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        self.dead_letter_to(&mut args, self.dead_letter_exchange());
        args
    }

    pub fn dead_queue_arguments(&self) -> FieldTable {
        quorum()
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

/// The arguments every queue of the topology starts from: a quorum queue.
fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
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
}
