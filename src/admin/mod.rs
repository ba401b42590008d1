//! Operator tools that are not the worker: [`enqueue`] publishes jobs,
//! [`dlq`] inspects, replays and purges dead letters, [`verify`] checks an
//! archive against its manifests.

pub mod dlq;
pub mod enqueue;
pub mod verify;
