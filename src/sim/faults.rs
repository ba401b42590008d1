//! Fault injection: what the next recognize calls do instead of succeeding.
//!
//! [`Faults`] is shared by the server and every [`super::SimHandle`]; tests
//! change it at run time, in process or through `POST /__sim/faults`
//! ([`FaultsUpdate`]).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// What one faulty call does instead of succeeding.
///
/// JSON form (externally tagged): `{"code":1302}`, `"non_json_200"`,
/// `{"hang_ms":500}`, `"drop_connection"`, `"missing_data"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this service code and the HTTP status the contract gives
    /// it (unknown codes: 500).
    Code(u32),
    /// HTTP 200 with an HTML body.
    #[serde(rename = "non_json_200")]
    NonJson200,
    /// Sleep this long, then answer 5002 with HTTP 504.
    #[serde(rename = "hang_ms")]
    Hang(#[serde(with = "millis")] Duration),
    /// Close the TCP connection without writing a response.
    DropConnection,
    /// HTTP 200, code 0, but no `data` object.
    MissingData,
    /// A real, billed recognition (HTTP 200, code 0, a `request_id`) whose
    /// first contained segment has a URL that does not parse.
    BadSegmentUrl,
    /// A real, billed recognition listing this many segments in all
    /// (`{"many_segments":10000}`): the real ones, then contained copies of
    /// the first contained one (downloadable, up to 200), then contained
    /// entries whose URL does not parse, short enough that 10,000 stay
    /// under Kling's 1 MiB answer.
    ManySegments(usize),
    /// A real, billed recognition whose masks are half the size (each
    /// side) of the image that was sent.
    WrongSizeMasks,
}

/// The random part of a [`FaultsUpdate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandomFaults {
    /// Probability in `[0, 1]` that a call fails; 0 disables.
    pub rate: f64,
    /// Faults to draw from, uniformly.
    pub pool: Vec<Fault>,
}

/// Body of `POST /__sim/faults`: any subset of the fields.
///
/// `{"push":[{"code":1302}], "random":{"rate":0.2,"pool":["drop_connection"]},
///   "account_error":1101, "max_concurrency":4, "max_rate":50, "latency_ms":100,
///   "expire_all":true}`;
/// `"account_error":null`, `"max_concurrency":null` and `"max_rate":null`
/// clear those switches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsUpdate {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<RandomFaults>,
    /// Outer `None`: leave as is; `Some(None)`: clear.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub account_error: Option<Option<u32>>,
    /// Outer `None`: leave as is; `Some(None)`: clear.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub max_concurrency: Option<Option<usize>>,
    /// Calls admitted per second before 1302; outer `None`: leave as is;
    /// `Some(None)`: clear.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub max_rate: Option<Option<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expire_all: bool,
}

/// Runtime fault control, shared with the server.
pub struct Faults {
    state: Mutex<State>,
}

struct State {
    queue: VecDeque<Fault>,
    random_rate: f64,
    random_pool: Vec<Fault>,
    rng: fastrand::Rng,
    account_error: Option<u32>,
    max_concurrency: Option<usize>,
    max_rate: Option<u32>,
    /// The current one-second window of the rate limit: start, calls.
    rate_window: (std::time::Instant, u32),
    /// Results issued before the current generation are expired.
    generation: u64,
}

impl Faults {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                random_rate: 0.0,
                random_pool: Vec::new(),
                rng: fastrand::Rng::with_seed(seed),
                account_error: None,
                max_concurrency: None,
                max_rate: None,
                rate_window: (std::time::Instant::now(), 0),
                generation: 0,
            }),
        }
    }

    /// Queue a one-shot fault; queued faults are consumed first, in order.
    pub fn push(&self, fault: Fault) {
        self.lock().queue.push_back(fault);
    }

    /// Fail each call with probability `rate` (clamped to `[0, 1]`) with a
    /// fault drawn from `pool`, using the seeded generator. A rate of 0 or
    /// an empty pool disables random faults.
    pub fn set_random(&self, rate: f64, pool: Vec<Fault>) {
        let mut s = self.lock();
        s.random_rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        s.random_pool = pool;
    }

    /// Answer every authenticated call with this account code (e.g. 1101,
    /// arrears) until cleared with `None`.
    pub fn set_account_error(&self, code: Option<u32>) {
        self.lock().account_error = code;
    }

    /// Calls beyond `n` in flight answer 1303; `None` lifts the limit.
    pub fn set_max_concurrency(&self, n: Option<usize>) {
        self.lock().max_concurrency = n;
    }

    /// Calls beyond `n` per second (a fixed one-second window) answer 1302;
    /// `None` lifts the limit.
    pub fn set_max_rate(&self, n: Option<u32>) {
        self.lock().max_rate = n;
    }

    /// Count a call against the rate limit; false means "answer 1302".
    pub(super) fn admit_rate(&self) -> bool {
        let mut s = self.lock();
        let Some(max) = s.max_rate else {
            return true;
        };
        let now = std::time::Instant::now();
        if now.duration_since(s.rate_window.0) >= Duration::from_secs(1) {
            s.rate_window = (now, 0);
        }
        s.rate_window.1 += 1;
        s.rate_window.1 <= max
    }

    /// Make every result URL issued so far expired.
    pub fn expire_all_results(&self) {
        self.lock().generation += 1;
    }

    pub(super) fn account_error(&self) -> Option<u32> {
        self.lock().account_error
    }

    pub(super) fn next_queued(&self) -> Option<Fault> {
        self.lock().queue.pop_front()
    }

    pub(super) fn max_concurrency(&self) -> Option<usize> {
        self.lock().max_concurrency
    }

    pub(super) fn draw_random(&self) -> Option<Fault> {
        let mut s = self.lock();
        if s.random_rate <= 0.0 || s.random_pool.is_empty() {
            return None;
        }
        let rate = s.random_rate;
        if s.rng.f64() >= rate {
            return None;
        }
        let len = s.random_pool.len();
        let i = s.rng.usize(..len);
        s.random_pool.get(i).cloned()
    }

    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Apply the fault parts of an admin update (latency is the server's).
    pub(super) fn apply(&self, update: FaultsUpdate) {
        for fault in update.push {
            self.push(fault);
        }
        if let Some(random) = update.random {
            self.set_random(random.rate, random.pool);
        }
        if let Some(code) = update.account_error {
            self.set_account_error(code);
        }
        if let Some(n) = update.max_concurrency {
            self.set_max_concurrency(n);
        }
        if let Some(n) = update.max_rate {
            self.set_max_rate(n);
        }
        if update.expire_all {
            self.expire_all_results();
        }
    }

    /// Nothing panics while holding the lock, but never let poisoning turn
    /// one failed test into a cascade.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tells a present `null` (clear) from an absent field (leave as is).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
