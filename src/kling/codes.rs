//! What every Kling answer means for the job: the table of
//! `../shared/kling-api.md` ("Error codes"), in one place.

use std::time::Duration;

use crate::error::{Classify, Disposition};

/// How the worker reads a (HTTP status, service code) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Retry after backoff.
    Transient,
    /// Mint a new token and retry (1003 `nbf`, 1004 expired).
    RefreshToken,
    /// Dead-letter this job.
    Permanent,
    /// No call of this account or key can succeed until an operator acts
    /// (bad keys, account exception, arrears, depleted pack, no
    /// permission, IP whitelist): suspend the worker and probe.
    Blocked,
    /// A bug in how the worker calls Kling (no Authorization header, wrong
    /// method): stop the worker; retrying cannot help.
    Fatal,
}

/// The reading of a service code, falling back on the HTTP status for codes
/// the table does not know (5xx and 429 transient, other 4xx permanent).
pub fn read(http: u16, code: u32) -> Reading {
    match code {
        1000 | 1002 | 1100..=1103 | 1304 => Reading::Blocked,
        1001 | 1202 => Reading::Fatal,
        1003 | 1004 => Reading::RefreshToken,
        1200 | 1201 | 1203 | 1300 | 1301 => Reading::Permanent,
        1302 | 1303 | 5000..=5002 => Reading::Transient,
        _ if http == 429 || http >= 500 => Reading::Transient,
        _ if (400..500).contains(&http) => Reading::Permanent,
        // A non-zero code with a 2xx/3xx status: the API is confused; retry.
        _ => Reading::Transient,
    }
}

/// A stable metric label per known code.
pub fn code_label(http: u16, code: u32) -> &'static str {
    match code {
        1000 => "kling_1000",
        1001 => "kling_1001",
        1002 => "kling_1002",
        1003 => "kling_1003",
        1004 => "kling_1004",
        1100 => "kling_1100",
        1101 => "kling_1101",
        1102 => "kling_1102",
        1103 => "kling_1103",
        1200 => "kling_1200",
        1201 => "kling_1201",
        1202 => "kling_1202",
        1203 => "kling_1203",
        1300 => "kling_1300",
        1301 => "kling_1301",
        1302 => "kling_1302",
        1303 => "kling_1303",
        1304 => "kling_1304",
        5000 => "kling_5000",
        5001 => "kling_5001",
        5002 => "kling_5002",
        _ if http >= 500 => "kling_unknown_5xx",
        _ if http == 429 => "kling_unknown_429",
        _ if http >= 400 => "kling_unknown_4xx",
        _ => "kling_unknown",
    }
}

/// What an operator should do about a blocking or fatal code.
pub fn advice(code: u32) -> &'static str {
    match code {
        1000 | 1002 => "check KLING_ACCESS_KEY and KLING_SECRET_KEY",
        1001 => "the worker sent no Authorization header: this is a bug, report it",
        1100 => "the Kling account has an exception: check it in the Kling console",
        1101 => "the Kling account is in arrears: top it up; the worker resumes by itself",
        1102 => "the Kling resource pack is depleted or expired: buy or renew one",
        1103 => "the Kling account has no permission for image-recognize",
        1202 => "the API rejected the HTTP method: this is a bug, report it",
        1304 => "the Kling account's IP whitelist refuses this worker's address",
        _ => "see docs/operations.md",
    }
}

/// Why a Kling call failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KlingError {
    /// The API answered with a non-zero service code.
    #[error("Kling answered HTTP {http} code {code}: {message}{}", request_id.as_ref().map(|r| format!(" (request_id {r})")).unwrap_or_default())]
    Api {
        http: u16,
        code: u32,
        message: String,
        request_id: Option<String>,
        retry_after: Option<Duration>,
    },
    /// No usable answer, and the request never left: connection refused,
    /// DNS, TLS handshake.
    #[error("Kling call failed in transport: {reason}")]
    Transport { reason: String },
    /// The request was sent but no answer came back whole (timeout, the
    /// connection dropped): Kling may have billed it. Retried only after
    /// the recognition record is checked again (`docs/reliability.md`).
    #[error("Kling call ambiguous (sent, no answer; may have been billed): {reason}")]
    Ambiguous { reason: String },
    /// A retry after an ambiguous call found the recognition stored
    /// meanwhile: use it, do not call.
    #[error("the recognition was stored meanwhile; not calling Kling again")]
    RecordedMeanwhile,
    /// An answer we cannot read (non-JSON, no `data`, bad URL).
    #[error("Kling answer unreadable (HTTP {http}): {reason}")]
    BadResponse { http: u16, reason: String },
    /// The job's time budget for Kling ran out while retrying.
    #[error(
        "Kling call still failing after the job's {0:?} budget; the message goes back to the queue"
    )]
    DeadlineExceeded(Duration),
    #[error("could not sign the Kling token: {0}")]
    Token(String),
    /// The worker is suspended (see [`super::gate`]); the call was not made.
    #[error(
        "not calling Kling: the worker is suspended ({cause} {code}); the message goes back to the queue"
    )]
    Suspended {
        cause: &'static str,
        code: &'static str,
    },
}

impl KlingError {
    pub fn reading(&self) -> Reading {
        match self {
            KlingError::Api { http, code, .. } => read(*http, *code),
            KlingError::Transport { .. }
            | KlingError::Ambiguous { .. }
            | KlingError::RecordedMeanwhile
            | KlingError::BadResponse { .. }
            | KlingError::DeadlineExceeded(_) => Reading::Transient,
            KlingError::Token(_) => Reading::Fatal,
            KlingError::Suspended { .. } => Reading::Blocked,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            KlingError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The operator-facing advice for a fatal error.
    pub fn advice(&self) -> &'static str {
        match self {
            KlingError::Api { code, .. } => advice(*code),
            KlingError::Token(_) => "check KLING_SECRET_KEY",
            KlingError::Suspended { .. } => "see the error that suspended the worker",
            _ => "",
        }
    }
}

impl Classify for KlingError {
    fn disposition(&self) -> Disposition {
        match self.reading() {
            Reading::Transient | Reading::RefreshToken => Disposition::Transient,
            Reading::Permanent => Disposition::Permanent,
            Reading::Blocked => Disposition::Suspend,
            Reading::Fatal => Disposition::Fatal,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            KlingError::Api { http, code, .. } => code_label(*http, *code),
            KlingError::Transport { .. } => "kling_transport",
            KlingError::Ambiguous { .. } => "kling_ambiguous",
            KlingError::RecordedMeanwhile => "kling_recorded_meanwhile",
            KlingError::BadResponse { .. } => "kling_bad_response",
            KlingError::DeadlineExceeded(_) => "kling_deadline",
            KlingError::Token(_) => "kling_token",
            KlingError::Suspended { .. } => "kling_suspended",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract table, row by row: (http, code, reading).
    const TABLE: &[(u16, u32, Reading)] = &[
        (401, 1000, Reading::Blocked),
        (401, 1001, Reading::Fatal),
        (401, 1002, Reading::Blocked),
        (401, 1003, Reading::RefreshToken),
        (401, 1004, Reading::RefreshToken),
        (429, 1100, Reading::Blocked),
        (429, 1101, Reading::Blocked),
        (429, 1102, Reading::Blocked),
        (403, 1103, Reading::Blocked),
        (400, 1200, Reading::Permanent),
        (400, 1201, Reading::Permanent),
        (404, 1202, Reading::Fatal),
        (404, 1203, Reading::Permanent),
        (400, 1300, Reading::Permanent),
        (400, 1301, Reading::Permanent),
        (429, 1302, Reading::Transient),
        (429, 1303, Reading::Transient),
        (429, 1304, Reading::Blocked),
        (500, 5000, Reading::Transient),
        (503, 5001, Reading::Transient),
        (504, 5002, Reading::Transient),
    ];

    #[test]
    fn every_documented_code_has_its_reading_and_label() {
        for &(http, code, reading) in TABLE {
            assert_eq!(read(http, code), reading, "code {code}");
            assert_eq!(code_label(http, code), format!("kling_{code}"));
        }
    }

    #[test]
    fn unknown_codes_fall_back_on_http_status() {
        assert_eq!(read(502, 7777), Reading::Transient);
        assert_eq!(read(429, 7777), Reading::Transient);
        assert_eq!(read(400, 7777), Reading::Permanent);
        assert_eq!(read(418, 7777), Reading::Permanent);
        assert_eq!(code_label(503, 7777), "kling_unknown_5xx");
        assert_eq!(code_label(400, 7777), "kling_unknown_4xx");
    }

    #[test]
    fn dispositions_follow_readings() {
        let api = |http, code| KlingError::Api {
            http,
            code,
            message: String::new(),
            request_id: None,
            retry_after: None,
        };
        assert_eq!(api(429, 1101).disposition(), Disposition::Suspend);
        assert_eq!(api(429, 1304).disposition(), Disposition::Suspend);
        assert_eq!(api(401, 1000).disposition(), Disposition::Suspend);
        assert_eq!(api(401, 1001).disposition(), Disposition::Fatal);
        assert_eq!(api(400, 1301).disposition(), Disposition::Permanent);
        assert_eq!(api(401, 1004).disposition(), Disposition::Transient);
        assert_eq!(
            KlingError::Transport {
                reason: "reset".into()
            }
            .disposition(),
            Disposition::Transient
        );
        assert_eq!(
            KlingError::BadResponse {
                http: 200,
                reason: "html".into()
            }
            .code(),
            "kling_bad_response"
        );
        assert!(api(429, 1101).advice().contains("arrears"));
    }
}
