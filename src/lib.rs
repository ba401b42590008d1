//! kling-archiver: a RabbitMQ worker that sends images to Kling's
//! image-recognize API and archives every returned segmentation PNG, with a
//! manifest, before Kling deletes them.
//!
//! Data flows one way: [`broker`] → [`pipeline`] → stages ([`fetch`],
//! [`prepare`], [`kling`], [`download`]) → [`archive`]. [`worker`]
//! assembles them. The allowed module edges are a table in
//! `docs/ARCHITECTURE.md`, checked by `tests/architecture.rs`.

pub mod admin;
pub mod archive;
pub mod broker;
pub mod budget;
pub mod build_info;
pub mod config;
pub mod demo;
pub mod download;
pub mod error;
pub mod fetch;
pub mod health;
pub mod job;
pub mod kling;
pub mod manifest;
pub mod net;
pub mod ops;
pub mod pipeline;
pub mod prepare;
pub mod report;
pub mod sim;
pub mod telemetry;
pub mod worker;

pub use worker::{
    BuildError, RunError, build_pipeline, build_pipeline_with, run_worker, s3_client,
};
