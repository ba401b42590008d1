//! The Kling API simulator: a real HTTP server on loopback that follows the
//! Kling image-recognize contract (JWT auth, input spec, response shape,
//! every error code with its HTTP status), for integration tests and
//! `worker demo`. Nothing in the project calls the real Kling API.
//!
//! Owns: the recognize endpoint (`auth`, `spec`, `masks`; the response
//! envelope and the code table in `answer`), the result CDN with signed,
//! expiring URLs (`cdn`), fault injection ([`Faults`]), call statistics
//! ([`SimStats`]) and the admin endpoints `/__sim/*` for tests that run
//! the worker as a subprocess.
//!
//! Must know nothing about the worker: it stands in for Kling and speaks
//! only HTTP. It never logs the secret key or a JWT.

mod answer;
mod auth;
mod cdn;
mod conn;
mod faults;
mod hostile;
mod masks;
mod spec;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use std::{fmt, io};

use axum::Router;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header::CONTENT_TYPE};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::answer::{Answer, DataField, ImageEntry, SuccessData, TaskResult, envelope};
use self::cdn::{Lookup, ResultStore};
use self::conn::{Peer, SimListener};
pub use self::faults::{Fault, Faults, FaultsUpdate, RandomFaults};
use self::masks::Segment;

/// The recognize endpoint, as on the real API.
pub const RECOGNIZE_PATH: &str = "/v1/videos/image-recognize";
/// Room for a 10 MB image in base64 plus slack; larger bodies get 1200.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where to listen; `127.0.0.1:0` in tests.
    pub bind: SocketAddr,
    /// The expected JWT `iss`.
    pub access_key: String,
    /// The HS256 key.
    pub secret_key: SecretString,
    /// Added to every recognize call.
    pub latency: Duration,
    /// How long CDN URLs stay valid (real Kling: 30 days). Whole seconds.
    pub result_ttl: Duration,
    /// Seed for random fault injection.
    pub seed: u64,
}

impl SimConfig {
    /// Loopback on a free port, no latency, 30-day URLs, seed 0.
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>) -> Self {
        Self {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            access_key: access_key.into(),
            secret_key: SecretString::from(secret_key.into()),
            latency: Duration::ZERO,
            result_ttl: Duration::from_secs(30 * 24 * 3600),
            seed: 0,
        }
    }
}

/// Call statistics, as a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Every POST to the recognize endpoint.
    pub recognize_calls: u64,
    /// Calls answered with code 0 (these cost money), `MissingData` included.
    pub billed_calls: u64,
    /// Service code → count, 0 included (a `Hang` counts as 5002; non-JSON
    /// answers and dropped connections have no code).
    pub calls_by_code: BTreeMap<u32, u64>,
    pub in_flight: u64,
    pub peak_in_flight: u64,
    /// Successful segment GETs.
    pub cdn_downloads: u64,
    /// GETs refused because the URL expired.
    pub cdn_expired: u64,
}

/// Starts simulators.
pub struct Simulator;

impl Simulator {
    /// Bind and serve in a background task until [`SimHandle::shutdown`].
    pub async fn start(config: SimConfig) -> io::Result<SimHandle> {
        let (handle, _server) = spawn(config).await?;
        Ok(handle)
    }
}

/// Serve until `shutdown` completes (the `worker sim` subcommand).
pub async fn run(
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (handle, mut server) = spawn(config).await?;
    tracing::info!(addr = %handle.addr(), base_url = %handle.base_url(), "kling simulator listening");
    tokio::select! {
        ended = &mut server => return ended.map_err(io::Error::other).and_then(|r| r),
        () = shutdown => {}
    }
    handle.shutdown();
    server.await.map_err(io::Error::other).and_then(|r| r)
}

/// Control of a running simulator; clones share it.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the API base and the CDN base.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.shared.host)
    }

    /// `127.0.0.1:PORT`: the host result URLs point at.
    pub fn result_host(&self) -> String {
        self.shared.host.clone()
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats().clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    pub fn set_latency(&self, latency: Duration) {
        self.shared.set_latency(latency);
    }

    /// Latency added to every CDN download of a segment PNG (a CDN on
    /// another continent), per object.
    pub fn set_cdn_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.shared
            .cdn_latency_nanos
            .store(nanos, Ordering::Relaxed);
    }

    /// Take the CDN down (every result download, and any other path but
    /// the API's, answers 503) or bring it back. The API keeps answering.
    pub fn set_cdn_down(&self, down: bool) {
        self.shared.cdn_down.store(down, Ordering::Relaxed);
    }

    /// Stop accepting; the server task ends once open calls finish.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// State shared by the handlers and every handle.
struct Shared {
    access_key: String,
    secret_key: SecretString,
    result_ttl: Duration,
    /// `host:port` that URLs use (loopback if bound to an unspecified address).
    host: String,
    latency_nanos: AtomicU64,
    cdn_latency_nanos: AtomicU64,
    /// See [`SimHandle::set_cdn_down`].
    cdn_down: AtomicBool,
    faults: Faults,
    stats: Mutex<SimStats>,
    results: ResultStore,
    /// Calls holding a concurrency slot (admitted past the 1303 check).
    admitted: AtomicUsize,
    counter: AtomicU64,
    shutdown: watch::Sender<bool>,
}

async fn spawn(config: SimConfig) -> io::Result<(SimHandle, JoinHandle<io::Result<()>>)> {
    let listener = TcpListener::bind(config.bind).await?;
    let addr = listener.local_addr()?;
    let url_ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let shared = Arc::new(Shared {
        results: ResultStore::new(&config.secret_key),
        access_key: config.access_key,
        secret_key: config.secret_key,
        result_ttl: config.result_ttl,
        host: SocketAddr::new(url_ip, addr.port()).to_string(),
        latency_nanos: AtomicU64::new(0),
        cdn_latency_nanos: AtomicU64::new(0),
        cdn_down: AtomicBool::new(false),
        faults: Faults::new(config.seed),
        stats: Mutex::new(SimStats::default()),
        admitted: AtomicUsize::new(0),
        counter: AtomicU64::new(0),
        shutdown: watch::channel(false).0,
    });
    shared.set_latency(config.latency);

    let mut stop = shared.shutdown.subscribe();
    let app = router(Arc::clone(&shared)).into_make_service_with_connect_info::<Peer>();
    let server = axum::serve(SimListener::new(listener), app).with_graceful_shutdown(async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    });
    let task = tokio::spawn(async move {
        let ended = server.await;
        if let Err(e) = &ended {
            tracing::error!(error = %e, "kling simulator stopped");
        }
        ended
    });
    Ok((SimHandle { shared, addr }, task))
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(RECOGNIZE_PATH, post(recognize).fallback(invalid_method))
        .route("/cdn/{id}/{file}", get(cdn_get))
        .route("/__sim/stats", get(admin_stats))
        .route("/__sim/faults", post(admin_faults))
        .fallback(no_such_resource)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

// ---------------------------------------------------------------------------
// Recognize

#[derive(Deserialize)]
struct RecognizeBody {
    image: Option<String>,
}

async fn recognize(
    State(sim): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let _in_flight = InFlight::enter(&sim);
    let request_id = sim.next_id("sim-");
    // The slot is held until the answer is written, latency included.
    let (answer, _slot) = sim.decide(&headers, body).await;
    let code = answer.service_code();
    if let Some(code) = code {
        let mut stats = sim.stats();
        *stats.calls_by_code.entry(code).or_default() += 1;
        stats.billed_calls += u64::from(code == 0);
    }
    tracing::debug!(request_id, peer = %peer.addr, code, "recognize call");
    let latency = sim.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    answer.respond(&request_id, &peer).await
}

/// Other methods on the recognize path: 1202, as the contract lists it.
async fn invalid_method(State(sim): State<Arc<Shared>>) -> Response {
    envelope(1202, None, &sim.next_id("sim-"), &DataField::Null)
}

/// Paths the API does not have: 1203.
async fn no_such_resource(State(sim): State<Arc<Shared>>) -> Response {
    if sim.cdn_down.load(Ordering::Relaxed) {
        return cdn_unavailable();
    }
    envelope(1203, None, &sim.next_id("sim-"), &DataField::Null)
}

impl Shared {
    /// Auth, account switch, faults (queued, concurrency, random), then the
    /// request itself.
    async fn decide(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> (Answer, Option<Slot<'_>>) {
        if let Err(e) = auth::check(headers, &self.access_key, &self.secret_key, now_secs()) {
            return (Answer::code(e.code()), None);
        }
        if let Some(code) = self.faults.account_error() {
            return (Answer::code(code), None);
        }
        if let Some(fault) = self.faults.next_queued() {
            return (self.faulty(fault, body).await, None);
        }
        if !self.faults.admit_rate() {
            return (Answer::code(1302), None);
        }
        let Some(slot) = self.admit() else {
            return (Answer::code(1303), None);
        };
        if let Some(fault) = self.faults.draw_random() {
            return (self.faulty(fault, body).await, Some(slot));
        }
        (self.recognize(body).await, Some(slot))
    }

    async fn faulty(&self, fault: Fault, body: Result<Bytes, BytesRejection>) -> Answer {
        match fault {
            Fault::BadSegmentUrl | Fault::ManySegments(_) | Fault::WrongSizeMasks => {
                hostile::billed(self, fault, body).await
            }
            other => Answer::fault(other),
        }
    }

    async fn recognize(&self, body: Result<Bytes, BytesRejection>) -> Answer {
        self.recognize_scaled(body, 1).await
    }

    /// Recognize, with masks cut from the image shrunk `shrink` times each side.
    async fn recognize_scaled(&self, body: Result<Bytes, BytesRejection>, shrink: u32) -> Answer {
        let image = match parse_body(body) {
            Ok(image) => image,
            Err(answer) => return answer,
        };
        let work = tokio::task::spawn_blocking(move || {
            spec::accept(&image)
                .map(|a| masks::segment(&hostile::shrunk(a.image, shrink), &a.sha256))
        });
        match work.await {
            Ok(Ok(Ok(segments))) => Answer::Json {
                code: 0,
                message: None,
                data: DataField::Success(self.issue(segments)),
            },
            Ok(Err(rejection)) => Answer::rejected(1201, rejection.to_string()),
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "simulator could not encode a segment");
                Answer::code(5000)
            }
            Err(e) => {
                tracing::error!(error = %e, "simulator recognize task failed");
                Answer::code(5000)
            }
        }
    }

    /// Store the PNGs and build the success `data`.
    fn issue(&self, segments: Vec<Segment>) -> SuccessData {
        let id = self.next_id("r");
        let now = now_secs();
        let expires = now.saturating_add(self.result_ttl.as_secs());
        let images = segments
            .iter()
            .map(|s| ImageEntry {
                kind: s.kind.as_str(),
                is_contain: s.png.is_some(),
                url: match s.png {
                    Some(_) => {
                        self.results
                            .url(&format!("http://{}", self.host), &id, s.kind, expires)
                    }
                    None => String::new(),
                },
            })
            .collect();
        let pngs = segments
            .into_iter()
            .filter_map(|s| s.png.map(|png| (s.kind, png)))
            .collect();
        self.results
            .insert(id, expires, pngs, now, self.faults.generation());
        SuccessData {
            final_unit_deduction: "1",
            task_result: TaskResult { images },
        }
    }

    /// Take a concurrency slot, or `None` when over the limit (→ 1303).
    fn admit(&self) -> Option<Slot<'_>> {
        let held = self.admitted.fetch_add(1, Ordering::SeqCst) + 1;
        let slot = Slot(self);
        match self.faults.max_concurrency() {
            Some(max) if held > max => None,
            _ => Some(slot),
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{prefix}{n:06}-{:08x}", fastrand::u32(..))
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    fn stats(&self) -> MutexGuard<'_, SimStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<String, Answer> {
    let body = body.map_err(|e| {
        Answer::rejected(1200, format!("cannot read request body: {}", e.body_text()))
    })?;
    let parsed: RecognizeBody = serde_json::from_slice(&body).map_err(|_| {
        Answer::rejected(
            1200,
            "request body must be a JSON object with a string field `image`",
        )
    })?;
    parsed
        .image
        .ok_or_else(|| Answer::rejected(1200, "missing required field `image`"))
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(sim: &'a Shared) -> Self {
        let mut stats = sim.stats();
        stats.recognize_calls += 1;
        stats.in_flight += 1;
        stats.peak_in_flight = stats.peak_in_flight.max(stats.in_flight);
        InFlight(sim)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut stats = self.0.stats();
        stats.in_flight = stats.in_flight.saturating_sub(1);
    }
}

/// One unit of the simulated account's concurrency.
struct Slot<'a>(&'a Shared);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// CDN and admin

#[derive(Deserialize)]
struct CdnQuery {
    expires: u64,
    sig: String,
}

async fn cdn_get(
    State(sim): State<Arc<Shared>>,
    Path((id, file)): Path<(String, String)>,
    query: Result<Query<CdnQuery>, QueryRejection>,
) -> Response {
    if sim.cdn_down.load(Ordering::Relaxed) {
        return cdn_unavailable();
    }
    let Ok(Query(q)) = query else {
        return (StatusCode::FORBIDDEN, "missing or malformed signature").into_response();
    };
    let latency = sim.cdn_latency_nanos.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_nanos(latency)).await;
    }
    match sim.results.get(
        &id,
        &file,
        q.expires,
        &q.sig,
        now_secs(),
        sim.faults.generation(),
    ) {
        Lookup::Found(png) => {
            sim.stats().cdn_downloads += 1;
            ([(CONTENT_TYPE, "image/png")], png).into_response()
        }
        Lookup::BadSignature => (StatusCode::FORBIDDEN, "signature does not match").into_response(),
        Lookup::Expired => {
            sim.stats().cdn_expired += 1;
            (StatusCode::FORBIDDEN, "URL expired").into_response()
        }
        Lookup::NotFound => (StatusCode::NOT_FOUND, "no such object").into_response(),
    }
}

fn cdn_unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "CDN unavailable (simulated)",
    )
        .into_response()
}

async fn admin_stats(State(sim): State<Arc<Shared>>) -> Json<SimStats> {
    Json(sim.stats().clone())
}

async fn admin_faults(State(sim): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultsUpdate>(&body) {
        Ok(update) => {
            tracing::info!(?update, "simulator faults updated");
            if let Some(ms) = update.latency_ms {
                sim.set_latency(Duration::from_millis(ms));
            }
            sim.faults.apply(update);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("invalid faults update: {e}"),
        )
            .into_response(),
    }
}
