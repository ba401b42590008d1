//! Settling a delivery: **the ack** of an archived job
//! ([`Settler::settle`]), dead letters with their reason, retry copies for
//! transient failures, and uncharged returns while the worker is paused.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::publish::{PublishError, headers_for_copy, publish_confirmed};
use super::{
    HEADER_FAILED_AT, HEADER_JOB_ID, HEADER_PRIOR_DELIVERIES, HEADER_REASON, HEADER_REASON_CODE,
    JobEvent, Topology,
};
use crate::error::{Classify, Disposition};
use crate::job::Job;
use crate::pipeline::{Outcome, Pipeline, PipelineError};

/// Whether a handled delivery stops the worker.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handled {
    Settled,
    Fatal,
}

/// Handle one delivery: parse, run, settle.
pub(crate) async fn handle(
    delivery: Delivery,
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
    let span = tracing::info_span!(
        "job",
        job.id = %job.id,
        job.attempt = attempt,
        job.source = job.source.kind(),
        kling.request_id = tracing::field::Empty
    );
    let job_id = job.id.to_string();
    async move {
        // A returned copy carries its earlier charges; the broker's own
        // limit only sees the current copy's, so enforce the sum here.
        if charged > delivery_limit {
            let reason =
                format!("delivered {attempt} times, over the delivery limit {delivery_limit}");
            return settler
                .dead_letter(&delivery, Some(job_id), "delivery_limit", reason)
                .await;
        }
        let result = run_and_announce(job, pipeline, &settler).await;
        settler.settle(&delivery, job_id, charged, result).await
    }
    .instrument(span)
    .await
}

/// Run the job as its own task (a panic in one job must not take the
/// worker down; it is aborted if this one is), then publish its result
/// event: downstream hears of the job before it is acked, so a crash in
/// between repeats the event, never loses it.
async fn run_and_announce(
    job: Job,
    pipeline: Arc<Pipeline>,
    settler: &Settler,
) -> Result<Outcome, PipelineError> {
    let stop = settler.lost.clone();
    let run = AbortOnDropHandle::new(tokio::spawn(
        async move { pipeline.run_until(&job, stop).await }.instrument(tracing::Span::current()),
    ));
    let outcome = match run.await {
        Ok(r) => r?,
        Err(e) => return Err(PipelineError::internal(format!("job task failed: {e}"))),
    };
    let event = outcome.event();
    settler
        .publish_result(event, &event.job_id)
        .await
        .map_err(|e| {
            PipelineError::internal(format!(
                "the results exchange did not confirm the event: {e}"
            ))
        })?;
    Ok(outcome)
}

/// Settles deliveries: acks, dead letters, retry copies, returns.
pub(crate) struct Settler {
    /// Whether the session's consumer is live.
    pub(crate) consuming: watch::Receiver<bool>,
    pub(crate) publish: Channel,
    pub(crate) topology: Topology,
    pub(crate) events: Option<mpsc::UnboundedSender<JobEvent>>,
    /// Cancelled at the end of the shutdown timeout: held messages are
    /// released at once.
    pub(crate) stop: CancellationToken,
    /// Cancelled on a fatal error: the worker takes no more jobs.
    pub(crate) fatal: CancellationToken,
    /// Cancelled when this session's connection is lost: its jobs stop
    /// (their redelivery is someone else's); a Kling call in flight still
    /// stores its answer.
    pub(crate) lost: CancellationToken,
}

impl Settler {
    fn emit(&self, event: JobEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }

    /// Decide the message's fate from the job's result. **The ack of an
    /// archived job is here**, after its manifest is durable and its result
    /// event confirmed; every failure goes where its disposition says.
    async fn settle(
        &self,
        delivery: &Delivery,
        job_id: String,
        charged: u32,
        result: Result<Outcome, PipelineError>,
    ) -> Handled {
        let e = match result {
            Ok(outcome) => {
                if ack(delivery).await {
                    record_archived(&outcome);
                    self.emit(JobEvent::Archived { job_id, outcome });
                }
                return Handled::Settled;
            }
            Err(e) => e,
        };
        let (code, reason) = (e.code(), e.to_string());
        match e.disposition() {
            Disposition::Permanent => self.dead_letter(delivery, Some(job_id), code, reason).await,
            Disposition::Transient => {
                self.retry_later(delivery, job_id, charged, code, &reason)
                    .await
            }
            Disposition::Suspend => self.return_uncharged(delivery, job_id, charged, code).await,
            Disposition::Fatal => {
                tracing::error!(
                    error.code = code,
                    error = %reason,
                    "fatal: the worker stops consuming; the message goes back to the queue"
                );
                // Stop taking deliveries before this one goes back, or
                // the broker may hand it straight back to us.
                self.fatal.cancel();
                nack_requeue(delivery).await;
                crate::ops::metrics::job("fatal", code);
                self.emit(JobEvent::Fatal {
                    job_id,
                    code,
                    reason,
                });
                Handled::Fatal
            }
        }
    }

    /// Publish the message to the dead-letter queue with the reason, wait for
    /// the broker's confirm, then ack the original. If the publish is not
    /// confirmed the original is requeued: never dropped.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
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
            AMQPValue::LongString(now_rfc3339().into()),
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
        .await;
        if let Err(e) = confirmed {
            tracing::error!(
                error.code = code,
                error = %e,
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
    async fn publish_result(
        &self,
        event: &impl serde::Serialize,
        job_id: &str,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event).unwrap_or_default();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(job_id.into())
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
        delivery: &Delivery,
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
        let settled = if let Err(e) = self.republish(delivery, &queue, failures).await {
            tracing::warn!(error = %e, "retry queue did not confirm; holding the message, then requeueing it");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => {}
            }
            nack_requeue(delivery).await
        } else {
            ack(delivery).await
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
        delivery: &Delivery,
        queue: &str,
        charged: u32,
    ) -> Result<(), PublishError> {
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
        publish_confirmed(&self.publish, "", queue, true, &delivery.data, props).await
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
        delivery: &Delivery,
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
        let returned = match confirmed {
            Ok(()) => ack(delivery).await,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "could not put back a copy; nacking the message instead (costs one delivery)"
                );
                nack_requeue(delivery).await
            }
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
fn prior_deliveries(delivery: &Delivery) -> u32 {
    header_u32(delivery, HEADER_PRIOR_DELIVERIES)
}

async fn ack(delivery: &Delivery) -> bool {
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

pub(crate) async fn nack_requeue(delivery: &Delivery) -> bool {
    delivery
        .nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "nack failed; the broker will redeliver on channel close"))
        .unwrap_or(false)
}

/// Quorum queues count redeliveries in `x-delivery-count`.
fn delivery_count(delivery: &Delivery) -> u32 {
    header_u32(delivery, "x-delivery-count")
}

fn header_u32(delivery: &Delivery, name: &str) -> u32 {
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

/// Count and log an acked job.
fn record_archived(outcome: &Outcome) {
    match outcome {
        Outcome::Archived {
            manifest_key,
            segments,
            cost,
            reused_recognition,
            ..
        } => {
            crate::ops::metrics::job("archived", "none");
            tracing::info!(
                manifest = manifest_key,
                segments,
                cost,
                reused = reused_recognition,
                "archived"
            )
        }
        Outcome::AlreadyArchived { manifest_key, .. } => {
            crate::ops::metrics::job("already_archived", "none");
            tracing::info!(manifest = manifest_key, "already archived")
        }
    }
}

/// Now, as RFC 3339 UTC (the dead letter's failed-at header).
fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
