//! `POST /v1/videos/image-recognize`, with the retries it needs.
//!
//! Transient failures (1302/1303, 5xx, timeouts, unreadable answers) are
//! retried with exponential backoff and full jitter, at least 1 s first as
//! Kling asks, honouring `Retry-After`, within a bounded number of attempts
//! and a per-job deadline. 1003/1004 re-mint the token and retry at once.
//! Permanent and fatal answers return immediately.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

pub use super::answer::{Recognition, SegmentResult};
use super::answer::{parse_answer, parse_retry_after};
use super::auth::TokenCache;
use super::codes::{KlingError, Reading};
use super::gate::{Cause, Gate, Health};
use super::limiter::{AimdLimiter, Signal};
use crate::config::KlingConfig;
use crate::error::Classify;
use crate::net::{self, error_chain};
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret;

/// The longest `Retry-After` obeyed; the job deadline bounds it anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A uniform delay in `[min, 2·base]`, capped at `max`; `u` in `[0, 1)`.
/// `base` is the exponential step (`min·2ⁿ⁻¹`), so the range doubles each
/// attempt while never going under the floor.
fn full_jitter(min: Duration, base: Duration, max: Duration, u: f64) -> Duration {
    let hi = base.saturating_mul(2).min(max).max(min);
    min + (hi - min).mul_f64(u.clamp(0.0, 1.0))
}

/// Largest answer we read; real answers are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// The Kling API client. Cheap to share; one per process.
pub struct KlingClient {
    http: reqwest::Client,
    endpoint: url::Url,
    tokens: TokenCache,
    limiter: AimdLimiter,
    gate: Gate,
    cfg: KlingConfig,
}

impl std::fmt::Debug for KlingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KlingClient")
            .field("endpoint", &self.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

impl KlingClient {
    pub fn new(cfg: KlingConfig) -> Result<Self, KlingError> {
        let endpoint = cfg
            .base_url
            .join("v1/videos/image-recognize")
            .map_err(|e| KlingError::Transport {
                reason: format!("bad KLING_BASE_URL: {e}"),
            })?;
        let mut http = net::client_builder(Duration::from_secs(10), cfg.request_timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(proxy) = &cfg.proxy {
            // Only the Kling API host goes through it: other requests of
            // this client do not exist.
            let p = reqwest::Proxy::all(proxy.as_str()).map_err(|e| KlingError::Transport {
                reason: format!("KLING_PROXY: {e}"),
            })?;
            http = http.proxy(p);
        }
        let http = http.build().map_err(|e| KlingError::Transport {
            reason: e.to_string(),
        })?;
        let tokens = TokenCache::new(cfg.access_key.clone(), &cfg.secret_key);
        let limiter = AimdLimiter::new(cfg.max_in_flight);
        let gate = Gate::new(cfg.breaker);
        Ok(Self {
            http,
            endpoint,
            tokens,
            limiter,
            gate,
            cfg,
        })
    }

    /// Recognize an image given as bare base64. Retries transient failures;
    /// returns the first permanent or fatal one, or [`KlingError::DeadlineExceeded`].
    pub async fn recognize(&self, image_base64: &str) -> Result<Recognition, KlingError> {
        self.recognize_checked(image_base64, || async { false })
            .await
    }

    /// As [`Self::recognize`], but before retrying an ambiguous call (sent,
    /// no answer: perhaps billed) ask `recorded` whether the answer was
    /// stored meanwhile; if so, stop with [`KlingError::RecordedMeanwhile`].
    pub async fn recognize_checked<C, CF>(
        &self,
        image_base64: &str,
        recorded: C,
    ) -> Result<Recognition, KlingError>
    where
        C: Fn() -> CF,
        CF: Future<Output = bool>,
    {
        let body = Bytes::from(
            serde_json::to_vec(&serde_json::json!({ "image": image_base64 })).unwrap_or_default(),
        );
        let ambiguous = AtomicBool::new(false);
        let (ambiguous, recorded, body) = (&ambiguous, &recorded, &body);
        self.with_retries(|| async move {
            if ambiguous.swap(false, Ordering::Relaxed) && recorded().await {
                return Err(KlingError::RecordedMeanwhile);
            }
            let result = self.call_once(body.clone()).await;
            if let Err(KlingError::Ambiguous { reason }) = &result {
                ambiguous.store(true, Ordering::Relaxed);
                crate::ops::metrics::kling_ambiguous();
                tracing::warn!(
                    reason,
                    "kling call ambiguous: sent, no answer; it may have been billed"
                );
            }
            result
        })
        .await
    }

    /// Run `call` with the retry policy: transient failures and token
    /// refreshes are retried, the rest returned at once.
    ///
    /// - Delays grow exponentially from `min_backoff` (Kling asks for at
    ///   least 1 s), with full jitter above that floor: attempt n waits a
    ///   uniform time in `[min, min·2ⁿ]`, capped at `max_backoff`.
    /// - `Retry-After` is a floor: never retry sooner than the API asked.
    /// - 1003/1004: the token is re-minted and the call retried at once, the
    ///   first time; later refreshes back off like any transient failure.
    /// - At most `max_attempts` calls, and all of it within `job_deadline`.
    async fn with_retries<F, Fut>(&self, mut call: F) -> Result<Recognition, KlingError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Recognition, KlingError>>,
    {
        let (min, max) = (
            self.cfg.min_backoff,
            self.cfg.max_backoff.max(self.cfg.min_backoff),
        );
        let backoff = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_max_times(self.cfg.max_attempts.saturating_sub(1) as usize);
        let attempt = AtomicU32::new(0);
        let refreshed = AtomicBool::new(false);
        let retrying = (|| {
            attempt.fetch_add(1, Ordering::Relaxed);
            call()
        })
        .retry(backoff)
        .when(|e: &KlingError| {
            !matches!(e, KlingError::RecordedMeanwhile)
                && matches!(e.reading(), Reading::Transient | Reading::RefreshToken)
        })
        .adjust(|e: &KlingError, base: Option<Duration>| {
            // `None` means the attempts are used up: keep it that way.
            let base = base?;
            if e.reading() == Reading::RefreshToken && !refreshed.swap(true, Ordering::Relaxed) {
                return Some(Duration::ZERO);
            }
            let delay = full_jitter(min, base, max, fastrand::f64());
            Some(match e.retry_after() {
                Some(after) => delay.max(after.min(MAX_RETRY_AFTER)),
                None => delay,
            })
        })
        .notify(|e: &KlingError, after: Duration| {
            if e.reading() == Reading::RefreshToken {
                self.tokens.invalidate();
            }
            tracing::warn!(
                error.code = e.code(),
                error = %e,
                retry_in_ms = after.as_millis() as u64,
                attempt = attempt.load(Ordering::Relaxed),
                "kling call failed; retrying"
            );
        });
        match tokio::time::timeout(self.cfg.job_deadline, retrying).await {
            Ok(result) => result,
            Err(_) => Err(KlingError::DeadlineExceeded(self.cfg.job_deadline)),
        }
    }

    /// The adaptive limit on calls in flight right now.
    pub fn current_limit(&self) -> usize {
        self.limiter.limit()
    }

    /// Calls in flight right now, under the adaptive limit.
    pub fn in_flight(&self) -> usize {
        self.limiter.in_flight()
    }

    /// Whether calls may go out (see [`super::gate`]).
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The error a job gets while the gate is closed.
    pub fn suspended_error(&self) -> Option<KlingError> {
        self.gate.suspension().map(|s| KlingError::Suspended {
            cause: s.cause.as_str(),
            code: s.code,
        })
    }

    /// One call, inside the adaptive in-flight limit, unless the gate is
    /// closed. Feeds the limiter and the gate with the answer.
    async fn call_once(&self, body: Bytes) -> Result<Recognition, KlingError> {
        if let Some(e) = self.suspended_error() {
            return Err(e);
        }
        let permit = self.limiter.acquire().await;
        // The gate may have closed while this call waited for room.
        if let Some(e) = self.suspended_error() {
            return Err(e);
        }
        let result = self.send(body).await;
        permit.finish(match &result {
            Ok(_) => Signal::Ok,
            Err(KlingError::Api {
                code: 1302 | 1303, ..
            }) => Signal::Overloaded,
            Err(KlingError::Api { .. }) => Signal::Ok,
            Err(_) => Signal::Neutral,
        });
        crate::ops::metrics::kling_call(call_label(&result));
        crate::ops::metrics::kling_limit(self.limiter.limit());
        match &result {
            Err(e) if e.reading() == Reading::Blocked => self.block(e),
            other => {
                self.gate.record(health(other));
            }
        }
        result
    }

    /// Close the gate on an answer that blocks the whole account.
    fn block(&self, e: &KlingError) {
        if self.gate.suspend(Cause::Account, e.code(), e.advice()) {
            tracing::error!(
                error.code = e.code(),
                error = %e,
                action = e.advice(),
                probe_every_s = self.cfg.probe_interval.as_secs(),
                "Kling refuses this account: the worker stops taking jobs and returns them to the queue; it probes and resumes by itself"
            );
        }
    }

    /// Until `stop`: whenever the gate closes, probe every
    /// `probe_interval` and reopen it when Kling answers the probe in a way
    /// that proves the account works.
    pub async fn supervise(&self, stop: tokio_util::sync::CancellationToken) {
        let mut rx = self.gate.subscribe();
        loop {
            let suspended = rx.borrow_and_update().clone();
            if let Some(s) = suspended {
                if s.cause == Cause::Outage {
                    tracing::error!(
                        error.code = s.code,
                        action = s.advice,
                        probe_every_s = self.cfg.probe_interval.as_secs(),
                        "circuit breaker open: most recent Kling calls failed; the worker stops taking jobs and probes"
                    );
                }
                crate::ops::metrics::suspended(s.cause.as_str(), true);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(self.cfg.probe_interval) => {}
                    }
                    if self.probe().await {
                        self.gate.resume();
                        for c in [Cause::Account, Cause::Outage] {
                            crate::ops::metrics::suspended(c.as_str(), false);
                        }
                        tracing::info!(
                            suspended_s = s.since.elapsed().as_secs(),
                            "Kling answers the probe again; the worker resumes taking jobs"
                        );
                        break;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    /// One unbillable call: an empty image. Kling checks the key and the
    /// account before the parameters, so a parameter error (1200/1201)
    /// proves both work, while the suspending codes, 5xx and transport
    /// errors say "not yet". Returns true when the gate may reopen.
    pub async fn probe(&self) -> bool {
        let body = Bytes::from_static(br#"{"image":""}"#);
        let result = self.send(body).await;
        crate::ops::metrics::kling_call(call_label(&result));
        match result {
            Ok(_) => true,
            Err(e) => match e.reading() {
                Reading::Permanent => true,
                Reading::RefreshToken => {
                    self.tokens.invalidate();
                    false
                }
                Reading::Blocked => {
                    // Keep the newest reason (e.g. arrears became a depleted pack).
                    self.gate.suspend(Cause::Account, e.code(), e.advice());
                    tracing::warn!(
                        error.code = e.code(),
                        "probe: Kling still refuses the account"
                    );
                    false
                }
                Reading::Transient | Reading::Fatal => {
                    tracing::warn!(error.code = e.code(), error = %e, "probe: Kling not answering normally yet");
                    false
                }
            },
        }
    }

    async fn send(&self, body: Bytes) -> Result<Recognition, KlingError> {
        let token = self
            .tokens
            .token()
            .map_err(|e| KlingError::Token(e.to_string()))?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
            .map_err(|e| KlingError::Token(e.to_string()))?;
        auth.set_sensitive(true);
        let resp = self
            .http
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, auth)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // Only a failed connect proves the request never left.
                let connect = e.is_connect();
                let reason = error_chain(&e.without_url());
                if connect {
                    KlingError::Transport { reason }
                } else {
                    KlingError::Ambiguous { reason }
                }
            })?;
        let http = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = read_limited(resp).await?;
        parse_answer(http, &bytes, retry_after)
    }
}

/// The metric label of a call's answer.
fn call_label(result: &Result<Recognition, KlingError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

/// What an answer says about the service, for the circuit breaker.
fn health(result: &Result<Recognition, KlingError>) -> Health {
    match result {
        Ok(_) => Health::Working,
        Err(KlingError::Api {
            code: 1302 | 1303, ..
        }) => Health::Working,
        Err(e) if e.reading() == Reading::Transient => Health::Failing(e.code()),
        Err(_) => Health::Working,
    }
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, KlingError> {
    let mut out = Vec::new();
    // The request was answered: a body cut short may be a billed answer.
    while let Some(chunk) = resp.chunk().await.map_err(|e| KlingError::Ambiguous {
        reason: error_chain(&e.without_url()),
    })? {
        if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(KlingError::BadResponse {
                http: 200,
                reason: "answer over 1 MiB".into(),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff timing, on tokio's paused clock: the script answers each
    /// call in turn; the test sees when each call was made.
    mod backoff {
        use super::*;
        use std::collections::VecDeque;
        use std::sync::Mutex;
        use tokio::time::Instant;

        fn client(max_attempts: u32, job_deadline: Duration) -> KlingClient {
            KlingClient::new(KlingConfig {
                base_url: "http://127.0.0.1:9/".parse().unwrap(),
                proxy: None,
                access_key: "ak".into(),
                secret_key: secrecy::SecretString::from("sk"),
                max_attempts,
                job_deadline,
                request_timeout: Duration::from_secs(10),
                min_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(30),
                max_in_flight: 4,
                probe_interval: Duration::from_secs(30),
                breaker: crate::kling::gate::BreakerConfig::default(),
            })
            .unwrap()
        }

        fn api(code: u32, retry_after: Option<u64>) -> KlingError {
            KlingError::Api {
                // Known codes are read by code alone.
                http: 429,
                code,
                message: String::new(),
                request_id: None,
                retry_after: retry_after.map(Duration::from_secs),
            }
        }

        fn ok() -> Recognition {
            Recognition {
                request_id: "r".into(),
                final_unit_deduction: "1".into(),
                segments: vec![],
                problem: None,
                raw: None,
            }
        }

        /// Run the script (the last answer repeats); return the result and
        /// the gaps between consecutive calls.
        async fn run(
            c: &KlingClient,
            script: Vec<Result<Recognition, KlingError>>,
        ) -> (Result<Recognition, KlingError>, Vec<Duration>) {
            let script = Mutex::new(VecDeque::from(script));
            let calls = Mutex::new(Vec::<Instant>::new());
            let result = c
                .with_retries(|| {
                    calls.lock().unwrap().push(Instant::now());
                    let mut s = script.lock().unwrap();
                    let next = if s.len() > 1 {
                        s.pop_front().unwrap()
                    } else {
                        match s.front().unwrap() {
                            Ok(r) => Ok(r.clone()),
                            Err(KlingError::Api {
                                code, retry_after, ..
                            }) => Err(api(*code, retry_after.map(|d| d.as_secs()))),
                            Err(_) => unreachable!(),
                        }
                    };
                    async move { next }
                })
                .await;
            let calls = calls.into_inner().unwrap();
            let gaps = calls.windows(2).map(|w| w[1] - w[0]).collect();
            (result, gaps)
        }

        #[tokio::test(start_paused = true)]
        async fn delays_start_at_one_second_and_grow_with_full_jitter() {
            let c = client(6, Duration::from_secs(3600));
            let mut sums = [Duration::ZERO; 5];
            for _ in 0..200 {
                let mut script: Vec<_> = (0..5).map(|_| Err(api(5001, None))).collect();
                script.push(Ok(ok()));
                let (r, gaps) = run(&c, script).await;
                assert!(r.is_ok());
                assert_eq!(gaps.len(), 5);
                for (i, g) in gaps.iter().enumerate() {
                    let hi = Duration::from_secs((2u64 << i).min(30));
                    assert!(
                        *g >= Duration::from_secs(1) && *g <= hi,
                        "retry {}: {g:?} not in [1s, {hi:?}]",
                        i + 1
                    );
                    sums[i] += *g;
                }
            }
            // Full jitter: the mean of retry n is near (1 + 2ⁿ)/2 seconds.
            let means: Vec<f64> = sums.iter().map(|s| s.as_secs_f64() / 200.0).collect();
            for (i, m) in means.iter().enumerate() {
                let expect = (1.0 + (2u64 << i).min(30) as f64) / 2.0;
                assert!(
                    (m - expect).abs() < expect * 0.2,
                    "retry {}: mean {m:.2}s, expected ~{expect:.1}s",
                    i + 1
                );
            }
        }

        #[tokio::test(start_paused = true)]
        async fn retry_after_is_a_floor() {
            let c = client(6, Duration::from_secs(3600));
            let (r, gaps) = run(&c, vec![Err(api(1303, Some(7))), Ok(ok())]).await;
            assert!(r.is_ok());
            assert_eq!(gaps, vec![Duration::from_secs(7)]);
        }

        #[tokio::test(start_paused = true)]
        async fn token_refresh_retries_at_once_only_the_first_time() {
            let c = client(6, Duration::from_secs(3600));
            let (r, gaps) = run(
                &c,
                vec![Err(api(1004, None)), Err(api(1003, None)), Ok(ok())],
            )
            .await;
            assert!(r.is_ok());
            assert_eq!(gaps[0], Duration::ZERO);
            assert!(gaps[1] >= Duration::from_secs(1), "{gaps:?}");
        }

        #[tokio::test(start_paused = true)]
        async fn attempts_are_bounded() {
            let c = client(3, Duration::from_secs(3600));
            let (r, gaps) = run(&c, vec![Err(api(5000, None))]).await;
            assert_eq!(r.unwrap_err().code(), "kling_5000");
            assert_eq!(gaps.len(), 2, "3 calls in all");
        }

        #[tokio::test(start_paused = true)]
        async fn the_job_deadline_cuts_retries_short() {
            let c = client(10, Duration::from_secs(150));
            let start = Instant::now();
            let (r, gaps) = run(&c, vec![Err(api(5001, Some(100)))]).await;
            assert_eq!(r.unwrap_err().code(), "kling_deadline");
            assert_eq!(start.elapsed(), Duration::from_secs(150));
            assert_eq!(gaps, vec![Duration::from_secs(100)]);
        }

        #[tokio::test(start_paused = true)]
        async fn permanent_and_blocking_answers_are_not_retried() {
            let c = client(6, Duration::from_secs(3600));
            for code in [
                1200, 1201, 1203, 1300, 1301, 1000, 1002, 1100, 1101, 1102, 1103, 1304, 1001, 1202,
            ] {
                let (r, gaps) = run(&c, vec![Err(api(code, None))]).await;
                assert_eq!(r.unwrap_err().code(), format!("kling_{code}"));
                assert!(gaps.is_empty(), "code {code} was retried");
            }
        }

        #[test]
        fn full_jitter_stays_in_its_range() {
            let s = Duration::from_secs;
            assert_eq!(full_jitter(s(1), s(1), s(30), 0.0), s(1));
            assert_eq!(full_jitter(s(1), s(1), s(30), 1.0), s(2));
            assert_eq!(full_jitter(s(1), s(16), s(30), 1.0), s(30));
            assert_eq!(
                full_jitter(s(1), s(4), s(30), 0.5),
                Duration::from_millis(4500)
            );
        }
    }
}
