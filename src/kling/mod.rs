//! The Kling image-recognize API: authentication, the call, and what every
//! answer means.
//!
//! - [`auth`]: the HS256 JWT, cached and re-minted before expiry.
//! - [`answer`]: reading an answer; a billed one is never an error.
//! - [`codes`]: the one table that maps HTTP status + service code to a
//!   [`crate::error::Disposition`].
//! - [`limiter`]: the adaptive (AIMD) limit on calls in flight.
//! - [`gate`]: suspends all calls on account errors and sustained outages
//!   (circuit breaker), reopened by probes.
//! - [`client`]: `POST /v1/videos/image-recognize` with retries (backon),
//!   the single owner of retries for Kling calls.
//!
//! Knows nothing about RabbitMQ, S3 or how images are prepared.

pub mod answer;
pub mod auth;
pub mod client;
pub mod codes;
pub mod gate;
pub mod limiter;

pub use client::{KlingClient, Recognition, SegmentResult};
pub use codes::KlingError;

use std::fmt;

/// A segment type as Kling names it (`object_seg`, `head_seg`, `face_seg`,
/// `cloth_seg`, or any other that comes back: the list is open).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SegmentType(String);

impl SegmentType {
    /// Types are kept as Kling sends them, but must be short and made of
    /// `[A-Za-z0-9_-]` because they become part of object keys.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        ok.then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SegmentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
