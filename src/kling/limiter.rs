//! Adaptive limit on in-flight Kling calls (AIMD).
//!
//! Kling's limit is account-wide concurrency that no worker can see; over
//! it, calls answer 1302/1303. Each worker therefore probes for its share:
//! the limit grows by about one per limit's worth of successes (additive
//! increase) and halves on a rate-limit answer (multiplicative decrease), at
//! most once per cool-down so a burst of 1303s from calls already in flight
//! counts as one signal. It never exceeds `--concurrency` nor falls below 1.
//!
//! It starts low ([`initial_limit`]: a quarter of `--concurrency`, at
//! least [`INITIAL_LIMIT`]) in *slow start*, growing by one per success
//! (doubling per round trip) until the first rate-limit answer or the
//! maximum, so a fleet starting at once does not open with
//! `workers × concurrency` calls against the account's limit. A quarter
//! keeps the ramp to two round trips at any concurrency: from 4 it took
//! log2(C/4) (5 s at C = 128 with 1 s calls, 6.7 % of a minute's calls
//! lost; from C/4, 1.25 s of calls, 2.1 %).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The least limit a fresh worker starts with.
pub const INITIAL_LIMIT: usize = 4;

/// The limit a fresh worker with ceiling `max` starts with: `max / 4`,
/// at least [`INITIAL_LIMIT`], at most `max`.
pub fn initial_limit(max: usize) -> usize {
    (max / 4).max(INITIAL_LIMIT).min(max)
}

/// A decrease is taken at most this often.
pub const DECREASE_COOLDOWN: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct AimdLimiter {
    max: usize,
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    last_decrease: Option<Instant>,
    /// Until the first overload: +1 per success instead of +1/limit.
    slow_start: bool,
}

/// What a call's answer says about the account's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered (success or a non-capacity error): capacity was fine.
    Ok,
    /// 1302/1303: over the account's limit.
    Overloaded,
    /// Transport failure or the like: says nothing about capacity.
    Neutral,
}

impl AimdLimiter {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            max,
            state: Mutex::new(State {
                limit: initial_limit(max) as f64,
                in_flight: 0,
                last_decrease: None,
                slow_start: true,
            }),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current limit (whole calls).
    pub fn limit(&self) -> usize {
        (self.lock().limit.floor() as usize).max(1)
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Wait for room under the current limit.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let freed = self.freed.notified();
            {
                let mut s = self.lock();
                if s.in_flight < (s.limit.floor() as usize).max(1) {
                    s.in_flight += 1;
                    return Permit {
                        limiter: self,
                        done: false,
                    };
                }
            }
            freed.await;
        }
    }

    fn record(&self, signal: Signal) {
        let mut s = self.lock();
        match signal {
            Signal::Ok => {
                let step = if s.slow_start {
                    1.0
                } else {
                    1.0 / s.limit.max(1.0)
                };
                s.limit = (s.limit + step).min(self.max as f64);
            }
            Signal::Overloaded => {
                s.slow_start = false;
                let now = Instant::now();
                if s.last_decrease
                    .is_none_or(|t| now.duration_since(t) >= DECREASE_COOLDOWN)
                {
                    s.limit = (s.limit / 2.0).max(1.0);
                    s.last_decrease = Some(now);
                }
            }
            Signal::Neutral => {}
        }
    }
}

/// A place under the limit; give it back with [`Permit::finish`] (or drop).
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a AimdLimiter,
    done: bool,
}

impl Permit<'_> {
    /// Release the place and report what the call said about capacity.
    pub fn finish(mut self, signal: Signal) {
        self.limiter.record(signal);
        self.release();
    }

    fn release(&mut self) {
        if !self.done {
            self.done = true;
            self.limiter.lock().in_flight -= 1;
            self.limiter.freed.notify_waiters();
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn starts_low_and_doubles_until_the_first_overload() {
        let l = AimdLimiter::new(16);
        assert_eq!(l.limit(), INITIAL_LIMIT);
        for _ in 0..4 {
            l.acquire().await.finish(Signal::Ok);
        }
        assert_eq!(l.limit(), 8, "one round of 4 successes doubles 4");
        l.acquire().await.finish(Signal::Overloaded);
        assert_eq!(l.limit(), 4);
        for _ in 0..5 {
            l.acquire().await.finish(Signal::Ok);
        }
        assert_eq!(
            l.limit(),
            5,
            "after an overload, about one per limit's worth"
        );
        assert_eq!(AimdLimiter::new(2).limit(), 2, "never above --concurrency");
        assert_eq!(AimdLimiter::new(32).limit(), 8, "a quarter of the ceiling");
        assert_eq!(AimdLimiter::new(128).limit(), 32);
    }

    #[tokio::test(start_paused = true)]
    async fn halves_on_overload_once_per_cooldown_and_grows_back_slowly() {
        let l = AimdLimiter::new(32);
        for _ in 0..28 {
            l.acquire().await.finish(Signal::Ok);
        }
        assert_eq!(l.limit(), 32);
        // A burst of 1303s from calls already in flight: one decrease.
        for _ in 0..5 {
            l.acquire().await.finish(Signal::Overloaded);
        }
        assert_eq!(l.limit(), 16);
        tokio::time::advance(DECREASE_COOLDOWN).await;
        l.acquire().await.finish(Signal::Overloaded);
        assert_eq!(l.limit(), 8);
        // About one more per limit's worth of successes.
        for _ in 0..8 {
            l.acquire().await.finish(Signal::Ok);
        }
        assert_eq!(l.limit(), 8, "8.9x is still 8");
        for _ in 0..2 {
            l.acquire().await.finish(Signal::Ok);
        }
        assert_eq!(l.limit(), 9);
        for _ in 0..10_000 {
            l.acquire().await.finish(Signal::Ok);
        }
        assert_eq!(l.limit(), 32, "capped at --concurrency");
    }

    #[tokio::test(start_paused = true)]
    async fn never_below_one() {
        let l = AimdLimiter::new(4);
        for _ in 0..10 {
            l.acquire().await.finish(Signal::Overloaded);
            tokio::time::advance(DECREASE_COOLDOWN).await;
        }
        assert_eq!(l.limit(), 1);
        l.acquire().await.finish(Signal::Neutral);
        assert_eq!(l.limit(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_room_under_the_limit() {
        let l = std::sync::Arc::new(AimdLimiter::new(2));
        let a = l.acquire().await;
        let b = l.acquire().await;
        assert_eq!(l.in_flight(), 2);
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let p = l2.acquire().await;
            p.finish(Signal::Ok);
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "third call waits");
        drop(a);
        waiter.await.unwrap();
        b.finish(Signal::Ok);
        assert_eq!(l.in_flight(), 0);
    }
}
