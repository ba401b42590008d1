//! The Kling API simulator: a real HTTP server that follows the
//! image-recognize contract of `../shared/kling-api.md` — JWT checks with
//! the exact 100x codes, the input spec (1201), realistic deterministic
//! segmentation PNGs served from its own CDN path with expiring signed URLs,
//! latency, and every fault the worker must survive, switchable at run time.
//!
//! Used by the tests, `worker demo` and `worker sim`. It knows nothing about
//! the worker: it is written against the API contract only.

mod masks;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;

/// How the simulator is started.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub bind: SocketAddr,
    /// The expected `iss`.
    pub access_key: String,
    pub secret_key: SecretString,
    /// Added to every recognize call.
    pub latency: Duration,
    /// How long CDN URLs stay valid (Kling: 30 days).
    pub result_ttl: Duration,
    /// Seed of the random fault injection.
    pub seed: u64,
}

impl SimConfig {
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            access_key: access_key.into(),
            secret_key: SecretString::from(secret_key.into()),
            latency: Duration::ZERO,
            result_ttl: Duration::from_secs(30 * 24 * 3600),
            seed: 0,
        }
    }
}

/// Counters, as a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Every POST to the endpoint.
    pub recognize_calls: u64,
    /// Calls answered with code 0: these cost money.
    pub billed_calls: u64,
    /// Service code → count (0 included).
    pub calls_by_code: BTreeMap<u32, u64>,
    pub in_flight: u64,
    pub peak_in_flight: u64,
    pub cdn_downloads: u64,
    pub cdn_expired: u64,
}

/// What one faulty call does instead of succeeding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this service code and the contract's HTTP status for it.
    Code(u32),
    /// 200 with an HTML body.
    NonJson200,
    /// Sleep, then answer 5002 / 504.
    Hang(#[serde(with = "millis")] Duration),
    /// Close the connection without an answer.
    DropConnection,
    /// 200, code 0, but no `data`.
    MissingData,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// The HTTP status the contract table gives a service code.
pub fn status_for(code: u32) -> u16 {
    match code {
        0 => 200,
        1000..=1004 => 401,
        1100..=1102 | 1302..=1304 => 429,
        1103 => 403,
        1200 | 1201 | 1300 | 1301 => 400,
        1202 | 1203 => 404,
        5001 => 503,
        5002 => 504,
        _ => 500,
    }
}

#[derive(Default)]
struct FaultState {
    queue: VecDeque<Fault>,
    random_rate: f64,
    random_pool: Vec<Fault>,
    account_error: Option<u32>,
    max_concurrency: Option<usize>,
}

/// Run-time fault control, shared with the server.
pub struct Faults {
    state: Mutex<FaultState>,
    rng: Mutex<fastrand::Rng>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One-shot faults, consumed first, in order.
    pub fn push(&self, fault: Fault) {
        self.lock().queue.push_back(fault);
    }

    /// Each call fails with probability `rate`, with a fault drawn from `pool`.
    pub fn set_random(&self, rate: f64, pool: Vec<Fault>) {
        let mut s = self.lock();
        s.random_rate = rate;
        s.random_pool = pool;
    }

    /// Every call answers this account code (e.g. 1101 arrears) until cleared.
    pub fn set_account_error(&self, code: Option<u32>) {
        self.lock().account_error = code;
    }

    /// Calls beyond `n` in flight answer 1303.
    pub fn set_max_concurrency(&self, n: Option<usize>) {
        self.lock().max_concurrency = n;
    }
}

struct Inner {
    cfg: SimConfig,
    base_url: String,
    faults: Faults,
    stats: Mutex<SimStats>,
    results: Mutex<HashMap<String, Bytes>>,
    counter: AtomicU64,
    /// URLs issued with a serial at or below this are expired.
    expired_through: AtomicU64,
    latency_ms: AtomicU64,
    stop: CancellationToken,
}

impl Inner {
    fn stats(&self) -> std::sync::MutexGuard<'_, SimStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sign(&self, path: &str, expires: u64) -> String {
        let mut h = Sha256::new();
        h.update(self.cfg.secret_key.expose_secret().as_bytes());
        h.update(path.as_bytes());
        h.update(expires.to_be_bytes());
        hex::encode(&h.finalize()[..16])
    }
}

/// A running simulator.
#[derive(Clone)]
pub struct SimHandle {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// `host:port` the worker must allow for downloads.
    pub fn result_host(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> SimStats {
        self.inner.stats().clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    pub fn set_latency(&self, d: Duration) {
        self.inner
            .latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Make every URL issued so far expired.
    pub fn expire_all_results(&self) {
        let n = self.inner.counter.load(Ordering::SeqCst);
        self.inner.expired_through.store(n, Ordering::SeqCst);
    }

    /// Stop accepting connections.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }
}

pub struct Simulator;

impl Simulator {
    pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(config.bind).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            base_url: format!("http://{addr}"),
            faults: Faults {
                state: Mutex::default(),
                rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            },
            stats: Mutex::default(),
            results: Mutex::default(),
            counter: AtomicU64::new(0),
            expired_through: AtomicU64::new(0),
            latency_ms: AtomicU64::new(config.latency.as_millis() as u64),
            stop: CancellationToken::new(),
            cfg: config,
        });
        let router = Router::new()
            .route("/v1/videos/image-recognize", post(recognize))
            .route("/cdn/{id}/{file}", get(cdn))
            .route("/__sim/stats", get(admin_stats))
            .route("/__sim/faults", post(admin_faults))
            // Base64 of a 10 MB image is ~13.4 MB; leave room to answer an
            // oversize image with 1201 rather than a bare 413.
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(inner.clone());
        tokio::spawn(serve(listener, router, inner.stop.clone()));
        Ok(SimHandle { inner, addr })
    }
}

/// Serve until `shutdown` resolves (the `worker sim` subcommand).
pub async fn run(
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = Simulator::start(config).await?;
    tracing::info!(addr = %handle.addr(), "Kling simulator listening");
    shutdown.await;
    handle.shutdown();
    Ok(())
}

/// A per-connection token: cancelling it drops the connection unanswered.
#[derive(Clone)]
struct ConnKill(CancellationToken);

async fn serve(listener: tokio::net::TcpListener, router: Router, stop: CancellationToken) {
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            () = stop.cancelled() => return,
        };
        let kill = CancellationToken::new();
        let svc = router.clone().layer(Extension(ConnKill(kill.clone())));
        let stop = stop.clone();
        tokio::spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(
                hyper_util::rt::TokioIo::new(sock),
                hyper_util::service::TowerToHyperService::new(svc),
            );
            tokio::select! {
                _ = conn => {}
                () = kill.cancelled() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

#[derive(Serialize)]
struct Answer {
    code: u32,
    message: String,
    request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
}

fn answer(
    inner: &Inner,
    code: u32,
    message: impl Into<String>,
    data: Option<serde_json::Value>,
) -> Response {
    {
        let mut s = inner.stats();
        *s.calls_by_code.entry(code).or_default() += 1;
        if code == 0 {
            s.billed_calls += 1;
        }
    }
    let n = inner.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let body = Answer {
        code,
        message: message.into(),
        request_id: format!("sim-{n}-{:08x}", fastrand::u32(..)),
        data,
    };
    let status =
        StatusCode::from_u16(status_for(code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The contract's auth checks, with the precise code for each failure.
fn check_auth(inner: &Inner, headers: &HeaderMap) -> Result<(), (u32, &'static str)> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if value.trim().is_empty() {
        return Err((1001, "Authorization header is empty"));
    }
    let token = value
        .strip_prefix("Bearer ")
        .filter(|t| !t.starts_with(' ') && !t.is_empty())
        .ok_or((1002, "Authorization is invalid"))?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.required_spec_claims.clear();
    let key =
        jsonwebtoken::DecodingKey::from_secret(inner.cfg.secret_key.expose_secret().as_bytes());
    let claims = jsonwebtoken::decode::<Claims>(token, &key, &v)
        .map_err(|_| (1002, "Authorization is invalid"))?
        .claims;
    if claims.iss.as_deref() != Some(inner.cfg.access_key.as_str()) {
        return Err((1000, "authentication failed"));
    }
    let now = now();
    if claims.nbf.is_some_and(|nbf| nbf > now) {
        return Err((1003, "token not yet valid"));
    }
    if claims.exp.is_none_or(|exp| exp < now) {
        return Err((1004, "token expired"));
    }
    Ok(())
}

struct InFlight<'a>(&'a Inner);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.stats().in_flight -= 1;
    }
}

async fn recognize(
    State(inner): State<Arc<Inner>>,
    Extension(kill): Extension<ConnKill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let in_flight = {
        let mut s = inner.stats();
        s.recognize_calls += 1;
        s.in_flight += 1;
        s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
        s.in_flight
    };
    let _guard = InFlight(&inner);
    let latency = inner.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if let Err((code, msg)) = check_auth(&inner, &headers) {
        return answer(&inner, code, msg, None);
    }
    let fault = {
        let mut s = inner.faults.lock();
        if let Some(code) = s.account_error {
            drop(s);
            return answer(&inner, code, "account error", None);
        }
        if let Some(f) = s.queue.pop_front() {
            Some(f)
        } else if s.max_concurrency.is_some_and(|n| in_flight as usize > n) {
            Some(Fault::Code(1303))
        } else if s.random_rate > 0.0 && !s.random_pool.is_empty() {
            let mut rng = inner.faults.rng.lock().unwrap_or_else(|p| p.into_inner());
            (rng.f64() < s.random_rate)
                .then(|| s.random_pool[rng.usize(..s.random_pool.len())].clone())
        } else {
            None
        }
    };
    match fault {
        Some(Fault::Code(code)) => {
            return answer(&inner, code, format!("simulated fault {code}"), None);
        }
        Some(Fault::NonJson200) => {
            *inner.stats().calls_by_code.entry(200_000).or_default() += 1;
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body>maintenance</body></html>",
            )
                .into_response();
        }
        Some(Fault::Hang(d)) => {
            tokio::time::sleep(d).await;
            return answer(&inner, 5002, "server internal timeout", None);
        }
        Some(Fault::DropConnection) => {
            kill.0.cancel();
            std::future::pending::<()>().await;
        }
        Some(Fault::MissingData) => {
            // Not billed: nothing usable came back.
            *inner.stats().calls_by_code.entry(200_001).or_default() += 1;
            let body = serde_json::json!({ "code": 0, "message": "SUCCEED", "request_id": "sim-missing-data" });
            return (StatusCode::OK, Json(body)).into_response();
        }
        None => {}
    }
    let image = match parse_body(&body) {
        Ok(b) => b,
        Err((code, msg)) => return answer(&inner, code, msg, None),
    };
    let inner2 = inner.clone();
    let result = tokio::task::spawn_blocking(move || validate_and_segment(&inner2, &image)).await;
    match result {
        Ok(Ok(images)) => answer(
            &inner,
            0,
            "SUCCEED",
            Some(
                serde_json::json!({ "final_unit_deduction": "1", "task_result": { "images": images } }),
            ),
        ),
        Ok(Err(msg)) => answer(&inner, 1201, msg, None),
        Err(_) => answer(&inner, 5000, "server internal error", None),
    }
}

fn parse_body(body: &[u8]) -> Result<Vec<u8>, (u32, String)> {
    #[derive(Deserialize)]
    struct Req {
        image: Option<String>,
    }
    let req: Req =
        serde_json::from_slice(body).map_err(|e| (1200, format!("invalid request body: {e}")))?;
    let image = req
        .image
        .filter(|s| !s.is_empty())
        .ok_or((1200, "image is required".to_owned()))?;
    if image.starts_with("data:") {
        return Err((
            1201,
            "image must be bare base64; the data: prefix is not allowed".into(),
        ));
    }
    if image.starts_with("http://") || image.starts_with("https://") {
        return Err((1201, "image URL not reachable from the simulator".into()));
    }
    base64::engine::general_purpose::STANDARD
        .decode(image.as_bytes())
        .map_err(|e| (1201, format!("image is not valid base64: {e}")))
}

/// The input spec, then the masks. Returns the `images` array.
fn validate_and_segment(inner: &Inner, bytes: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(format!("image is {} bytes, over 10 MB", bytes.len()));
    }
    let format =
        image::guess_format(bytes).map_err(|_| "image format not recognized".to_owned())?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        return Err(format!(
            "image format {format:?} not supported: use jpg, jpeg or png"
        ));
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("image cannot be decoded: {e}"))?;
    let (w, h) = (img.width(), img.height());
    if w < 300 || h < 300 {
        return Err(format!(
            "image is {w}x{h}: width and height must each be at least 300 px"
        ));
    }
    let ratio = f64::from(w) / f64::from(h);
    if !(1.0 / 2.5..=2.5).contains(&ratio) {
        return Err(format!(
            "image aspect ratio {ratio:.3} is outside 1:2.5..2.5:1"
        ));
    }
    let sha: [u8; 32] = Sha256::digest(bytes).into();
    let masks = masks::segment(&img.to_rgba8(), &sha);
    let id = hex::encode(&sha[..8]) + &format!("{:x}", inner.counter.load(Ordering::SeqCst));
    let serial = inner.counter.load(Ordering::SeqCst) + 1;
    let expires = now() + inner.cfg.result_ttl.as_secs();
    let mut results = inner.results.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    for (kind, png) in masks::TYPES.iter().zip(masks) {
        match png {
            Some(png) => {
                let path = format!("/cdn/{id}/{kind}.png");
                let sig = inner.sign(&path, expires);
                results.insert(format!("{id}/{kind}.png"), Bytes::from(png));
                out.push(serde_json::json!({
                    "type": kind, "is_contain": true,
                    "url": format!("{}{path}?expires={expires}&serial={serial}&sig={sig}", inner.base_url),
                }));
            }
            None => out.push(serde_json::json!({ "type": kind, "is_contain": false, "url": "" })),
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct CdnQuery {
    expires: Option<u64>,
    serial: Option<u64>,
    sig: Option<String>,
}

async fn cdn(
    State(inner): State<Arc<Inner>>,
    Path((id, file)): Path<(String, String)>,
    Query(q): Query<CdnQuery>,
) -> Response {
    let path = format!("/cdn/{id}/{file}");
    let (Some(expires), Some(sig)) = (q.expires, q.sig) else {
        return (StatusCode::FORBIDDEN, "missing signature").into_response();
    };
    if inner.sign(&path, expires) != sig {
        return (StatusCode::FORBIDDEN, "bad signature").into_response();
    }
    if now() > expires || q.serial.unwrap_or(0) <= inner.expired_through.load(Ordering::SeqCst) {
        inner.stats().cdn_expired += 1;
        return (
            StatusCode::FORBIDDEN,
            "<Error><Code>AccessDenied</Code><Message>expired</Message></Error>",
        )
            .into_response();
    }
    let body = inner
        .results
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&format!("{id}/{file}"))
        .cloned();
    match body {
        Some(b) => {
            inner.stats().cdn_downloads += 1;
            ([(header::CONTENT_TYPE, "image/png")], b).into_response()
        }
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

async fn admin_stats(State(inner): State<Arc<Inner>>) -> Json<SimStats> {
    Json(inner.stats().clone())
}

/// Any subset of these fields.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct FaultsRequest {
    #[serde(default)]
    pub push: Vec<Fault>,
    #[serde(default)]
    pub random: Option<RandomFaults>,
    /// `{"account_error": 1101}` sets, `{"account_error": null}` clears.
    #[serde(default, with = "double_option")]
    pub account_error: Option<Option<u32>>,
    #[serde(default, with = "double_option")]
    pub max_concurrency: Option<Option<usize>>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    #[serde(default)]
    pub expire_all: bool,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct RandomFaults {
    pub rate: f64,
    pub pool: Vec<Fault>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Ok(Some(Option::deserialize(d)?))
    }
}

async fn admin_faults(
    State(inner): State<Arc<Inner>>,
    Json(req): Json<FaultsRequest>,
) -> StatusCode {
    let handle = SimHandle {
        inner: inner.clone(),
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    for f in req.push {
        inner.faults.push(f);
    }
    if let Some(r) = req.random {
        inner.faults.set_random(r.rate, r.pool);
    }
    if let Some(a) = req.account_error {
        inner.faults.set_account_error(a);
    }
    if let Some(m) = req.max_concurrency {
        inner.faults.set_max_concurrency(m);
    }
    if let Some(l) = req.latency_ms {
        handle.set_latency(Duration::from_millis(l));
    }
    if req.expire_all {
        handle.expire_all_results();
    }
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests;
