//! Whether this worker may call Kling at all right now.
//!
//! Two things close the gate (suspend the worker):
//!
//! - **Account**: an answer that says no call of this account or key can
//!   succeed (1000/1002 bad keys, 1100–1103 account exception, arrears,
//!   depleted pack, no permission, 1304 IP whitelist). One such answer is
//!   enough.
//! - **Outage** (circuit breaker): most of the recent calls failed with
//!   server-side transient errors (5000–5002, unknown 5xx, transport
//!   errors, unreadable answers). Rate limits (1302/1303) do not count:
//!   they are the adaptive limiter's business, not an outage.
//!
//! While the gate is closed no job calls Kling: the broker stops consuming
//! and returns messages to the queue without charging them a delivery
//! attempt, and [`super::KlingClient::supervise`] probes at a slow interval
//! with a call Kling can never bill, reopening the gate when the answer
//! proves the account works again.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio::time::Instant;

/// Why the gate is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Kling refuses the account or its keys.
    Account,
    /// Kling is failing most calls (maintenance, 5xx, unreachable).
    Outage,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Account => "account",
            Cause::Outage => "outage",
        }
    }
}

/// A closed gate: why, since when, and what the operator should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspension {
    pub cause: Cause,
    /// The stable code of the answer that closed it (`kling_1101`, …).
    pub code: &'static str,
    pub advice: &'static str,
    pub since: Instant,
}

pub use crate::config::BreakerConfig;

/// What a finished call tells the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// An answer that shows the service works (success, or a permanent error
    /// about this job, or a rate limit).
    Working,
    /// A server-side or transport failure.
    Failing(&'static str),
}

#[derive(Debug)]
pub struct Gate {
    state: watch::Sender<Option<Suspension>>,
    recent: Mutex<VecDeque<bool>>,
    breaker: BreakerConfig,
}

impl Gate {
    pub fn new(breaker: BreakerConfig) -> Self {
        let breaker = BreakerConfig {
            window: breaker.window.max(1),
            threshold: breaker.threshold.clamp(1, breaker.window.max(1)),
        };
        Self {
            state: watch::Sender::new(None),
            recent: Mutex::new(VecDeque::with_capacity(breaker.window)),
            breaker,
        }
    }

    /// `None` while calls may go out.
    pub fn suspension(&self) -> Option<Suspension> {
        self.state.borrow().clone()
    }

    pub fn is_open(&self) -> bool {
        self.state.borrow().is_none()
    }

    /// Watch the gate open and close.
    pub fn subscribe(&self) -> watch::Receiver<Option<Suspension>> {
        self.state.subscribe()
    }

    /// Close the gate. Returns true if this call closed it (so the caller
    /// logs the alert once); a second account answer only updates the code.
    pub fn suspend(&self, cause: Cause, code: &'static str, advice: &'static str) -> bool {
        let mut closed_now = false;
        self.state.send_if_modified(|s| match s {
            None => {
                *s = Some(Suspension {
                    cause,
                    code,
                    advice,
                    since: Instant::now(),
                });
                closed_now = true;
                true
            }
            // An account answer outranks an outage: it needs an operator.
            Some(cur) if cur.code != code && (cause == Cause::Account || cur.cause == cause) => {
                cur.cause = cause;
                cur.code = code;
                cur.advice = advice;
                true
            }
            Some(_) => false,
        });
        closed_now
    }

    /// Open the gate and forget the breaker's history.
    pub fn resume(&self) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.state.send_if_modified(|s| s.take().is_some());
    }

    /// Feed the breaker one call's health. Returns true if this call opened
    /// the breaker (closed the gate).
    pub fn record(&self, health: Health) -> bool {
        let tripped = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == self.breaker.window {
                recent.pop_front();
            }
            recent.push_back(matches!(health, Health::Failing(_)));
            recent.len() == self.breaker.window
                && recent.iter().filter(|f| **f).count() >= self.breaker.threshold
        };
        match health {
            Health::Failing(code) if tripped => self.suspend(
                Cause::Outage,
                code,
                "Kling is failing most calls (outage or maintenance); the worker resumes by itself when it answers again",
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(BreakerConfig {
            window: 5,
            threshold: 4,
        })
    }

    #[tokio::test]
    async fn breaker_opens_only_when_most_recent_calls_fail() {
        let g = gate();
        for _ in 0..3 {
            assert!(!g.record(Health::Failing("kling_5001")));
        }
        assert!(!g.record(Health::Working), "window not full yet");
        assert!(g.is_open());
        // Window now [F, F, F, W, F] = 4 failures of 5.
        assert!(g.record(Health::Failing("kling_5001")));
        let s = g.suspension().unwrap();
        assert_eq!((s.cause, s.code), (Cause::Outage, "kling_5001"));
        // Further failures do not "close it again".
        assert!(!g.record(Health::Failing("kling_5000")));
    }

    #[tokio::test]
    async fn scattered_failures_never_open_it() {
        let g = gate();
        for i in 0..100 {
            let h = if i % 3 == 0 {
                Health::Failing("kling_transport")
            } else {
                Health::Working
            };
            assert!(!g.record(h));
        }
        assert!(g.is_open());
    }

    #[tokio::test]
    async fn account_answers_outrank_outages_and_resume_clears_history() {
        let g = gate();
        let mut rx = g.subscribe();
        assert!(g.suspend(Cause::Outage, "kling_5001", "wait"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!g.suspend(Cause::Account, "kling_1101", "top up"));
        assert_eq!(g.suspension().unwrap().code, "kling_1101");
        assert_eq!(g.suspension().unwrap().cause, Cause::Account);
        // An outage answer does not downgrade an account suspension.
        assert!(!g.suspend(Cause::Outage, "kling_5000", "wait"));
        assert_eq!(g.suspension().unwrap().code, "kling_1101");
        g.resume();
        assert!(g.is_open());
        assert!(rx.has_changed().unwrap());
        for _ in 0..4 {
            g.record(Health::Failing("kling_5001"));
        }
        assert!(g.is_open(), "history was cleared on resume");
    }
}
