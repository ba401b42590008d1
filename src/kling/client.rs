//! `POST /v1/videos/image-recognize`, with the retries it needs.
//!
//! Transient failures (1302/1303, 5xx, timeouts, unreadable answers) are
//! retried with exponential backoff and full jitter, at least 1 s first as
//! Kling asks, honouring `Retry-After`, within a bounded number of attempts
//! and a per-job deadline. 1003/1004 re-mint the token and retry at once.
//! Permanent and fatal answers return immediately.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::SegmentType;
use super::auth::TokenCache;
use super::codes::{KlingError, Reading};
use super::limiter::{AimdLimiter, Signal};
use crate::config::KlingConfig;
use crate::fetch::error_chain;

/// Largest answer we read; real answers are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A successful recognition: what Kling billed and where the masks are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recognition {
    pub request_id: String,
    pub final_unit_deduction: String,
    pub segments: Vec<SegmentResult>,
}

/// One entry of `task_result.images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentResult {
    #[serde(rename = "type")]
    pub kind: SegmentType,
    pub is_contain: bool,
    /// Present when `is_contain` is true.
    pub url: Option<url::Url>,
}

/// The Kling API client. Cheap to share; one per process.
pub struct KlingClient {
    http: reqwest::Client,
    endpoint: url::Url,
    tokens: TokenCache,
    limiter: AimdLimiter,
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
        let http = reqwest::Client::builder()
            .user_agent(concat!("kling-archiver/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(cfg.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| KlingError::Transport {
                reason: e.to_string(),
            })?;
        let tokens = TokenCache::new(cfg.access_key.clone(), &cfg.secret_key);
        let limiter = AimdLimiter::new(cfg.max_in_flight);
        Ok(Self {
            http,
            endpoint,
            tokens,
            limiter,
            cfg,
        })
    }

    /// Recognize an image given as bare base64. Retries transient failures;
    /// returns the first permanent or fatal one, or [`KlingError::DeadlineExceeded`].
    pub async fn recognize(&self, image_base64: &str) -> Result<Recognition, KlingError> {
        let body = Bytes::from(
            serde_json::to_vec(&serde_json::json!({ "image": image_base64 })).unwrap_or_default(),
        );
        let max_backoff = self.cfg.max_backoff;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.cfg.min_backoff)
            .with_max_delay(max_backoff)
            .with_max_times(self.cfg.max_attempts.saturating_sub(1) as usize)
            .with_jitter();
        let attempt = std::sync::atomic::AtomicU32::new(0);
        let call = (|| {
            attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.call_once(body.clone())
        })
        .retry(backoff)
        .when(|e: &KlingError| matches!(e.reading(), Reading::Transient | Reading::RefreshToken))
        .adjust(move |e: &KlingError, next: Option<Duration>| {
            // `None` means the attempts are used up: keep it that way.
            let next = next?;
            Some(match (e.reading(), e.retry_after()) {
                (Reading::RefreshToken, _) => Duration::ZERO,
                (_, Some(after)) => after.min(max_backoff.max(next)),
                _ => next,
            })
        })
        .notify(|e: &KlingError, after: Duration| {
            if e.reading() == Reading::RefreshToken {
                self.tokens.invalidate();
            }
            tracing::warn!(
                error.code = crate::error::Classify::code(e),
                error = %e,
                retry_in_ms = after.as_millis() as u64,
                attempt = attempt.load(std::sync::atomic::Ordering::Relaxed),
                "kling call failed; retrying"
            );
        });
        match tokio::time::timeout(self.cfg.job_deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(KlingError::DeadlineExceeded(self.cfg.job_deadline)),
        }
    }

    /// The adaptive limit on calls in flight right now.
    pub fn current_limit(&self) -> usize {
        self.limiter.limit()
    }

    /// One call, inside the adaptive in-flight limit.
    async fn call_once(&self, body: Bytes) -> Result<Recognition, KlingError> {
        let permit = self.limiter.acquire().await;
        let result = self.send(body).await;
        permit.finish(match &result {
            Ok(_) => Signal::Ok,
            Err(KlingError::Api {
                code: 1302 | 1303, ..
            }) => Signal::Overloaded,
            Err(KlingError::Api { .. }) => Signal::Ok,
            Err(_) => Signal::Neutral,
        });
        result
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
            .map_err(|e| KlingError::Transport {
                reason: error_chain(&e.without_url()),
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

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, KlingError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| KlingError::Transport {
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

#[derive(Deserialize)]
struct Envelope {
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(default)]
    final_unit_deduction: Option<serde_json::Value>,
    task_result: Option<TaskResult>,
}

#[derive(Deserialize)]
struct TaskResult {
    #[serde(default)]
    images: Vec<WireImage>,
}

#[derive(Deserialize)]
struct WireImage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    is_contain: bool,
    #[serde(default)]
    url: Option<String>,
}

/// Turn an HTTP answer into a recognition or a classified error.
pub(crate) fn parse_answer(
    http: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<Recognition, KlingError> {
    let bad = |reason: String| KlingError::BadResponse { http, reason };
    let env: Envelope = match serde_json::from_slice(body) {
        Ok(env) => env,
        Err(e) if (200..300).contains(&http) => return Err(bad(format!("not JSON: {e}"))),
        // A non-JSON error page: classify by status alone.
        Err(_) => {
            return Err(KlingError::Api {
                http,
                code: 0,
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                request_id: None,
                retry_after,
            });
        }
    };
    let code = env.code.unwrap_or(-1);
    if http != 200 || code != 0 {
        return Err(KlingError::Api {
            http,
            code: u32::try_from(code).unwrap_or(u32::MAX),
            message: env.message.unwrap_or_default(),
            request_id: env.request_id,
            retry_after,
        });
    }
    let request_id = env
        .request_id
        .filter(|r| !r.is_empty())
        .ok_or_else(|| bad("no request_id".into()))?;
    let data = env.data.ok_or_else(|| bad("code 0 without data".into()))?;
    let task = data
        .task_result
        .ok_or_else(|| bad("no data.task_result".into()))?;
    let final_unit_deduction = match data.final_unit_deduction {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let mut segments = Vec::with_capacity(task.images.len());
    for img in task.images {
        let kind = SegmentType::parse(&img.kind)
            .ok_or_else(|| bad(format!("segment type {:?} is not a name", img.kind)))?;
        let url = match img.url.as_deref().map(str::trim) {
            Some(u) if !u.is_empty() => {
                Some(url::Url::parse(u).map_err(|e| bad(format!("{kind} url: {e}")))?)
            }
            _ => None,
        };
        if img.is_contain && url.is_none() {
            return Err(bad(format!("{kind} is_contain without url")));
        }
        segments.push(SegmentResult {
            kind,
            is_contain: img.is_contain,
            url,
        });
    }
    Ok(Recognition {
        request_id,
        final_unit_deduction,
        segments,
    })
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs(
        delta.whole_seconds().clamp(0, 3600) as u64
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;

    #[test]
    fn parses_the_documented_success_answer() {
        let body = br#"{"code":0,"message":"SUCCEED","request_id":"r-1","data":{"final_unit_deduction":"1.5",
            "task_result":{"images":[{"type":"object_seg","is_contain":true,"url":"https://cdn.klingai.com/a.png"},
            {"type":"face_seg","is_contain":false,"url":""},{"type":"hair_seg","is_contain":true,"url":"https://cdn.klingai.com/h.png"}]}}}"#;
        let r = parse_answer(200, body, None).unwrap();
        assert_eq!(r.request_id, "r-1");
        assert_eq!(r.final_unit_deduction, "1.5");
        assert_eq!(r.segments.len(), 3);
        assert!(r.segments[1].url.is_none() && !r.segments[1].is_contain);
        assert_eq!(
            r.segments[2].kind.as_str(),
            "hair_seg",
            "unknown types are kept"
        );
    }

    #[test]
    fn error_answers_are_classified() {
        let e = parse_answer(
            429,
            br#"{"code":1101,"message":"arrears","request_id":"r"}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(e.code(), "kling_1101");
        assert_eq!(e.disposition(), crate::error::Disposition::Fatal);
        let e = parse_answer(
            502,
            b"<html>bad gateway</html>",
            Some(Duration::from_secs(3)),
        )
        .unwrap_err();
        assert_eq!(e.disposition(), crate::error::Disposition::Transient);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        let e = parse_answer(200, b"<html>", None).unwrap_err();
        assert_eq!(e.code(), "kling_bad_response");
        let e = parse_answer(200, br#"{"code":0,"request_id":"r"}"#, None).unwrap_err();
        assert_eq!(e.code(), "kling_bad_response");
        let e = parse_answer(200, br#"{"code":0,"request_id":"r","data":{"task_result":{"images":[{"type":"../x","is_contain":true,"url":"https://a/b"}]}}}"#, None).unwrap_err();
        assert_eq!(e.code(), "kling_bad_response");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
