//! What one recognize call answers, and how: the response envelope
//! (`code`, `message`, `request_id`, `data`), the contract's code table
//! (each service code's HTTP status and default message), and the wire
//! faults (an HTML page, a hang, a dropped connection).

use std::time::Duration;

use axum::http::{StatusCode, header::CONTENT_TYPE};
use axum::response::{IntoResponse, Json, Response};
use serde::Serialize;

use super::Fault;
use super::conn::Peer;

const NON_JSON_BODY: &str =
    "<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>";

/// What one recognize call answers.
pub(super) enum Answer {
    Json {
        code: u32,
        message: Option<String>,
        data: DataField,
    },
    Html,
    Hang(Duration),
    Drop,
}

impl Answer {
    pub(super) fn code(code: u32) -> Self {
        Answer::Json {
            code,
            message: None,
            data: DataField::Null,
        }
    }

    pub(super) fn rejected(code: u32, message: impl Into<String>) -> Self {
        Answer::Json {
            code,
            message: Some(message.into()),
            data: DataField::Null,
        }
    }

    pub(super) fn fault(fault: Fault) -> Self {
        match fault {
            Fault::Code(code) => Answer::code(code),
            Fault::NonJson200 => Answer::Html,
            Fault::Hang(d) => Answer::Hang(d),
            Fault::DropConnection => Answer::Drop,
            Fault::MissingData => Answer::Json {
                code: 0,
                message: None,
                data: DataField::Omitted,
            },
            // Built from a real recognition in `sim::hostile`.
            Fault::BadSegmentUrl | Fault::ManySegments(_) | Fault::WrongSizeMasks => {
                Answer::code(5000)
            }
        }
    }

    /// The service code for the statistics.
    pub(super) fn service_code(&self) -> Option<u32> {
        match self {
            Answer::Json { code, .. } => Some(*code),
            Answer::Hang(_) => Some(5002),
            Answer::Html | Answer::Drop => None,
        }
    }

    pub(super) async fn respond(self, request_id: &str, peer: &Peer) -> Response {
        match self {
            Answer::Json {
                code,
                message,
                data,
            } => envelope(code, message.as_deref(), request_id, &data),
            Answer::Html => (
                StatusCode::OK,
                [(CONTENT_TYPE, "text/html; charset=utf-8")],
                NON_JSON_BODY,
            )
                .into_response(),
            Answer::Hang(d) => {
                tokio::time::sleep(d).await;
                envelope(5002, None, request_id, &DataField::Null)
            }
            Answer::Drop => {
                // The writes of this response fail, so hyper closes the socket.
                peer.drop_connection();
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    code: u32,
    message: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "DataField::is_omitted")]
    data: &'a DataField,
}

#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum DataField {
    Null,
    Omitted,
    Success(SuccessData),
}

impl DataField {
    fn is_omitted(data: &&DataField) -> bool {
        matches!(data, DataField::Omitted)
    }
}

#[derive(Serialize)]
pub(super) struct SuccessData {
    pub(super) final_unit_deduction: &'static str,
    pub(super) task_result: TaskResult,
}

#[derive(Serialize)]
pub(super) struct TaskResult {
    pub(super) images: Vec<ImageEntry>,
}

#[derive(Serialize)]
pub(super) struct ImageEntry {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) is_contain: bool,
    pub(super) url: String,
}

/// The contract's code table: HTTP status and default message of a service
/// code; unknown codes get 500.
fn code_info(code: u32) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match code {
        0 => (S::OK, "SUCCEED"),
        1000 => (S::UNAUTHORIZED, "authentication failed"),
        1001 => (S::UNAUTHORIZED, "Authorization header is empty"),
        1002 => (S::UNAUTHORIZED, "Authorization is invalid"),
        1003 => (S::UNAUTHORIZED, "token is not yet valid"),
        1004 => (S::UNAUTHORIZED, "token has expired"),
        1100 => (S::TOO_MANY_REQUESTS, "account exception"),
        1101 => (S::TOO_MANY_REQUESTS, "account in arrears"),
        1102 => (S::TOO_MANY_REQUESTS, "resource pack depleted or expired"),
        1103 => (S::FORBIDDEN, "no permission for this resource or model"),
        1200 => (S::BAD_REQUEST, "invalid request parameters"),
        1201 => (S::BAD_REQUEST, "invalid parameter"),
        1202 => (S::NOT_FOUND, "invalid method"),
        1203 => (S::NOT_FOUND, "requested resource does not exist"),
        1300 => (S::BAD_REQUEST, "platform policy triggered"),
        1301 => (S::BAD_REQUEST, "content security policy triggered"),
        1302 => (S::TOO_MANY_REQUESTS, "request rate limit exceeded"),
        1303 => (
            S::TOO_MANY_REQUESTS,
            "parallel task over resource pack limit",
        ),
        1304 => (S::TOO_MANY_REQUESTS, "IP whitelist policy triggered"),
        5000 => (S::INTERNAL_SERVER_ERROR, "server internal error"),
        5001 => (S::SERVICE_UNAVAILABLE, "server temporarily unavailable"),
        5002 => (S::GATEWAY_TIMEOUT, "server internal timeout"),
        _ => (S::INTERNAL_SERVER_ERROR, "unknown error"),
    }
}

pub(super) fn envelope(
    code: u32,
    message: Option<&str>,
    request_id: &str,
    data: &DataField,
) -> Response {
    let (status, default_message) = code_info(code);
    let body = Envelope {
        code,
        message: message.unwrap_or(default_message),
        request_id,
        data,
    };
    (status, Json(body)).into_response()
}
