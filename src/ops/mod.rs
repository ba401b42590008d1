//! What ops look at: the metric catalogue ([`metrics`]) and the HTTP
//! listener that serves `/metrics`, `/healthz` and `/readyz`.
//!
//! - `/healthz`: 200 while the process serves HTTP (liveness).
//! - `/readyz`: 200 only while the worker consumes, is not draining and is
//!   not suspended; otherwise 503 with the reason as JSON.
//! - `/metrics`: Prometheus text format.

pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// The worker's state as readiness sees it. Shared by the broker and the
/// worker's assembly (which set it) and the HTTP listener (which reads it).
#[derive(Debug)]
pub struct Status {
    consuming: AtomicBool,
    draining: AtomicBool,
    suspended: Mutex<Option<NotReady>>,
}

/// Why the worker is not ready.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NotReady {
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
}

impl Status {
    pub fn new() -> Self {
        Self {
            consuming: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            suspended: Mutex::new(None),
        }
    }

    /// Why the worker is suspended (a dependency refuses work), or `None`.
    pub fn set_suspended(&self, why: Option<NotReady>) {
        *self.suspended.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready to take jobs.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(NotReady {
                reason: "draining",
                code: None,
                action: None,
            });
        }
        if let Some(why) = self
            .suspended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(why);
        }
        if !self.consuming.load(Ordering::SeqCst) {
            return Err(NotReady {
                reason: "not consuming",
                code: None,
                action: None,
            });
        }
        Ok(())
    }
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
struct Ops {
    status: Arc<Status>,
    metrics: Option<PrometheusHandle>,
}

/// Bind `addr` and serve until `stop`. Returns the bound address (useful
/// with port 0).
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Status>,
    metrics: Option<PrometheusHandle>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(Ops { status, metrics });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "ops HTTP listener failed");
        }
    });
    Ok((bound, task))
}

async fn readyz(State(ops): State<Ops>) -> Response {
    match ops.status.readiness() {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"ready": true})),
        )
            .into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"ready": false, "why": why})),
        )
            .into_response(),
    }
}

async fn metrics_page(State(ops): State<Ops>) -> Response {
    match &ops.metrics {
        Some(h) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}
