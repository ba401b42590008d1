//! What a failure means for the message that caused it.
//!
//! Every stage has its own error enum; each answers [`Classify`] where the
//! error is born, so the broker can act on a failure without knowing which
//! stage produced it.

/// What to do with a job after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Worth retrying: the same job may succeed later (network, 5xx, rate limit).
    Transient,
    /// Will never succeed: dead-letter the message with the reason.
    Permanent,
    /// Nothing can succeed until the account, keys or service recover
    /// (arrears, bad keys, outage): stop consuming, return the message to
    /// the queue without charging it a delivery, probe, resume by itself.
    Suspend,
    /// The worker itself is broken (a bug, an unusable store): return the
    /// message to the queue and stop the process so the orchestrator alerts.
    Fatal,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Transient => "transient",
            Disposition::Permanent => "permanent",
            Disposition::Suspend => "suspend",
            Disposition::Fatal => "fatal",
        }
    }
}

impl std::fmt::Display for Disposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Implemented by every stage error.
pub trait Classify: std::error::Error {
    /// Retry, dead-letter, or stop.
    fn disposition(&self) -> Disposition;
    /// A stable, low-cardinality code such as `source_not_found` or
    /// `kling_1301`, used as a metrics label and as the dead-letter reason.
    fn code(&self) -> &'static str;
}
