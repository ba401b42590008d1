//! Publishing with publisher confirms, and copies of a delivery.

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

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
) -> Result<(), PublishError> {
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
        .map_err(PublishError::Channel)?
        .await
        .map_err(PublishError::Channel)?;
    if !confirm.is_ack() {
        return Err(PublishError::Nacked);
    }
    if confirm.take_message().is_some() {
        return Err(PublishError::Returned);
    }
    Ok(())
}

/// Why a confirmed publish did not land.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing failed: {0}")]
    Channel(#[source] lapin::Error),
    #[error("the broker nacked the message")]
    Nacked,
    #[error("no queue took the message (returned)")]
    Returned,
}
