//! The simulator over real HTTP, as the worker sees it.

use std::io::Cursor;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use image::{ImageFormat, Rgb, RgbImage};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const AK: &str = "test-access-key";
const SK: &str = "test-secret-key";

struct Env {
    sim: SimHandle,
    http: reqwest::Client,
}

impl Env {
    async fn new() -> Self {
        let sim = Simulator::start(SimConfig::new(AK, SK))
            .await
            .expect("start simulator");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        Env { sim, http }
    }

    fn endpoint(&self) -> String {
        format!("{}{RECOGNIZE_PATH}", self.sim.base_url())
    }

    /// POST with a valid token; `Err` if the connection fails.
    async fn call(&self, image: &str) -> reqwest::Result<reqwest::Response> {
        let req = self.http.post(self.endpoint());
        let req = req.bearer_auth(token(claims(AK), SK));
        req.json(&json!({ "image": image })).send().await
    }

    /// POST with a valid token: status and JSON body.
    async fn recognize(&self, image: &str) -> (u16, Value) {
        let resp = self.call(image).await.expect("response");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }

    async fn post(&self, authorization: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(self.endpoint()).json(&body);
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("response");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }

    /// `POST /__sim/faults`: the status.
    async fn admin(&self, update: Value) -> u16 {
        let url = format!("{}/__sim/faults", self.sim.base_url());
        let resp = self.http.post(url).json(&update).send().await;
        resp.expect("admin").status().as_u16()
    }

    /// Recognize a 400×400 image: the URL of its `object_seg` PNG.
    async fn object_url(&self) -> String {
        let (_, body) = self.recognize(&png_b64(400, 400)).await;
        images(&body)[0]["url"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn get(&self, url: &str) -> (u16, Vec<u8>) {
        let resp = self.http.get(url).send().await.expect("response");
        (
            resp.status().as_u16(),
            resp.bytes().await.expect("body").to_vec(),
        )
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn claims(iss: &str) -> Value {
    json!({ "iss": iss, "exp": now() + 1800, "nbf": now() - 5 })
}

fn token(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("mint")
}

/// A light background with a head-like ellipse and a body-like block.
fn portrait(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let head = ((fx - 0.5) / 0.12).powi(2) + ((fy - 0.25) / 0.15).powi(2) <= 1.0;
        let body = (0.3..0.7).contains(&fx) && (0.38..0.95).contains(&fy);
        if head {
            Rgb([200, 150, 120])
        } else if body {
            Rgb([30, 60, (120.0 + 100.0 * fy) as u8])
        } else {
            Rgb([235, 235, 235])
        }
    })
}

fn encoded(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn png_b64(w: u32, h: u32) -> String {
    b64(&encoded(&portrait(w, h), ImageFormat::Png))
}

fn images(body: &Value) -> &Vec<Value> {
    body["data"]["task_result"]["images"]
        .as_array()
        .expect("images array")
}

#[tokio::test]
async fn success_returns_four_segments_of_the_input_size_and_identical_bytes_for_identical_input() {
    let env = Env::new().await;
    let image = png_b64(800, 600);
    let (status, first) = env.recognize(&image).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["code"], 0);
    assert_eq!(first["data"]["final_unit_deduction"], "1");
    let types: Vec<&str> = images(&first)
        .iter()
        .map(|i| i["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["object_seg", "head_seg", "face_seg", "cloth_seg"]);
    assert_eq!(
        images(&first)[0]["is_contain"],
        true,
        "the subject is found"
    );

    let (_, second) = env.recognize(&image).await;
    assert_ne!(first["request_id"], second["request_id"]);
    let mut downloads = 0;
    for (a, b) in images(&first).iter().zip(images(&second)) {
        assert_eq!(a["is_contain"], b["is_contain"]);
        if a["is_contain"] == false {
            assert_eq!(a["url"], "");
            continue;
        }
        let (sa, pa) = env.get(a["url"].as_str().unwrap_or_default()).await;
        let (sb, pb) = env.get(b["url"].as_str().unwrap_or_default()).await;
        assert_eq!((sa, sb), (200, 200));
        assert_ne!(a["url"], b["url"], "each call has its own URLs");
        assert_eq!(pa, pb, "{} differs between identical inputs", a["type"]);
        let png = image::load_from_memory_with_format(&pa, ImageFormat::Png).expect("a PNG");
        assert_eq!((png.width(), png.height()), (800, 600));
        downloads += 2;
    }
    let stats = env.sim.stats();
    assert_eq!(
        (
            stats.recognize_calls,
            stats.billed_calls,
            stats.cdn_downloads
        ),
        (2, 2, downloads)
    );
    assert_eq!(stats.in_flight, 0);
}

#[tokio::test]
async fn a_jpeg_input_succeeds() {
    let env = Env::new().await;
    let (status, body) = env
        .recognize(&b64(&encoded(&portrait(640, 480), ImageFormat::Jpeg)))
        .await;
    assert_eq!((status, body["code"].as_u64()), (200, Some(0)), "{body}");
}

#[tokio::test]
async fn each_auth_failure_has_its_code() {
    let env = Env::new().await;
    let bearer = |t: String| Some(format!("Bearer {t}"));
    let mut hs384 = Header::new(Algorithm::HS384);
    hs384.typ = Some("JWT".into());
    let cases: Vec<(Option<String>, u64)> = vec![
        (None, 1001),
        (Some(String::new()), 1001),
        (Some(format!("Token {}", token(claims(AK), SK))), 1002),
        (Some(format!("Bearer  {}", token(claims(AK), SK))), 1002),
        (bearer("not.a.jwt".into()), 1002),
        (bearer(token(claims(AK), "wrong-secret")), 1002),
        (
            bearer(
                jsonwebtoken::encode(
                    &hs384,
                    &claims(AK),
                    &EncodingKey::from_secret(SK.as_bytes()),
                )
                .expect("mint"),
            ),
            1002,
        ),
        (bearer(token(claims("someone-else"), SK)), 1000),
        (
            bearer(token(
                json!({"iss": AK, "exp": now() + 1800, "nbf": now() + 600}),
                SK,
            )),
            1003,
        ),
        (
            bearer(token(
                json!({"iss": AK, "exp": now() - 10, "nbf": now() - 1800}),
                SK,
            )),
            1004,
        ),
    ];
    for (authorization, code) in cases {
        let (status, body) = env
            .post(
                authorization.as_deref(),
                json!({ "image": png_b64(400, 400) }),
            )
            .await;
        assert_eq!(
            (status, body["code"].as_u64()),
            (401, Some(code)),
            "{authorization:?}: {body}"
        );
        assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    }
    assert_eq!(env.sim.stats().billed_calls, 0);
}

#[tokio::test]
async fn out_of_spec_images_are_rejected_with_1201() {
    let env = Env::new().await;
    let mut too_big = vec![0u8; spec::MAX_FILE_BYTES + 1];
    fastrand::Rng::with_seed(7).fill(&mut too_big);
    too_big[..8].copy_from_slice(b"\x89PNG\r\n\x1a\n");
    let png = encoded(&portrait(400, 400), ImageFormat::Png);
    let cases = [
        (png_b64(200, 200), "at least 300"),
        (png_b64(900, 300), "aspect ratio"),
        (png_b64(300, 900), "aspect ratio"),
        (b64(&encoded(&portrait(400, 400), ImageFormat::Gif)), "gif"),
        (b64(&encoded(&portrait(400, 400), ImageFormat::Bmp)), "bmp"),
        (
            format!("data:image/png;base64,{}", png_b64(400, 400)),
            "data:",
        ),
        (b64(&too_big), "10 MB"),
        ("https://example.com/cat.png".into(), "not reachable"),
        ("%%% not base64 %%%".into(), "base64"),
        (b64(&png[..png.len() / 2]), "decoded"),
    ];
    for (image, needle) in &cases {
        let (status, body) = env.recognize(image).await;
        assert_eq!(
            (status, body["code"].as_u64()),
            (400, Some(1201)),
            "{needle}: {body}"
        );
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }
    let stats = env.sim.stats();
    assert_eq!(stats.calls_by_code.get(&1201), Some(&(cases.len() as u64)));
    assert_eq!(stats.billed_calls, 0);
}

#[tokio::test]
async fn malformed_bodies_are_rejected_with_1200_and_other_methods_with_1202() {
    let env = Env::new().await;
    let auth = format!("Bearer {}", token(claims(AK), SK));
    for body in [
        json!("just a string"),
        json!({"img": "x"}),
        json!({"image": 42}),
    ] {
        let (status, answer) = env.post(Some(&auth), body).await;
        assert_eq!(
            (status, answer["code"].as_u64()),
            (400, Some(1200)),
            "{answer}"
        );
    }
    let resp = env.http.get(env.endpoint()).send().await.expect("response");
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.json::<Value>().await.expect("JSON")["code"], 1202);
}

#[tokio::test]
async fn a_pushed_fault_answers_once_then_calls_succeed() {
    let env = Env::new().await;
    env.sim.faults().push(Fault::Code(1302));
    env.sim.faults().push(Fault::Code(1103));
    env.sim.faults().push(Fault::Code(4242));
    env.sim
        .faults()
        .push(Fault::Hang(Duration::from_millis(20)));
    let image = png_b64(400, 400);
    for (status, code) in [(429, 1302), (403, 1103), (500, 4242), (504, 5002), (200, 0)] {
        let (s, body) = env.recognize(&image).await;
        assert_eq!((s, body["code"].as_u64()), (status, Some(code)), "{body}");
    }
}

#[tokio::test]
async fn the_account_switch_answers_until_cleared() {
    let env = Env::new().await;
    let image = png_b64(400, 400);
    env.sim.faults().set_account_error(Some(1101));
    for _ in 0..2 {
        let (status, body) = env.recognize(&image).await;
        assert_eq!((status, body["code"].as_u64()), (429, Some(1101)));
    }
    // Auth still comes first.
    let (status, body) = env.post(None, json!({ "image": image })).await;
    assert_eq!((status, body["code"].as_u64()), (401, Some(1001)));
    env.sim.faults().set_account_error(None);
    assert_eq!(env.recognize(&image).await.0, 200);
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_get_1303() {
    let env = Env::new().await;
    env.sim.set_latency(Duration::from_millis(300));
    env.sim.faults().set_max_concurrency(Some(1));
    let image = png_b64(400, 400);
    let (a, b) = tokio::join!(env.recognize(&image), env.recognize(&image));
    let mut codes = [a.1["code"].as_u64(), b.1["code"].as_u64()];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(1303)]);
    assert_eq!([a.0.min(b.0), a.0.max(b.0)], [200, 429]);
    assert_eq!(env.sim.stats().peak_in_flight, 2);
    // The slot is released: the next call is admitted.
    env.sim.set_latency(Duration::ZERO);
    assert_eq!(env.recognize(&image).await.0, 200);
}

#[tokio::test]
async fn calls_beyond_the_rate_limit_get_1302() {
    let env = Env::new().await;
    env.sim.faults().set_max_rate(Some(2));
    let image = png_b64(400, 400);
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(env.recognize(&image).await.1["code"].as_u64());
    }
    assert_eq!(codes, [Some(0), Some(0), Some(1302)]);
    env.sim.faults().set_max_rate(None);
    assert_eq!(env.recognize(&image).await.0, 200);
}

#[tokio::test]
async fn the_workers_probe_is_refused_by_parameter_and_never_billed() {
    let env = Env::new().await;
    // Auth and account are checked before parameters, as the worker's
    // suspension probe assumes.
    env.sim.faults().set_account_error(Some(1102));
    let (status, body) = env.recognize("").await;
    assert_eq!((status, body["code"].as_u64()), (429, Some(1102)));
    env.sim.faults().set_account_error(None);
    let (status, body) = env.recognize("").await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(1201)));
    assert_eq!(env.sim.stats().billed_calls, 0);
}

#[tokio::test]
async fn broken_responses_non_json_missing_data_and_dropped_connections() {
    let env = Env::new().await;
    let image = png_b64(400, 400);
    env.sim.faults().push(Fault::NonJson200);
    let resp = env.call(&image).await.expect("response");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.text().await.expect("body").starts_with("<html>"));

    env.sim.faults().push(Fault::MissingData);
    let (status, body) = env.recognize(&image).await;
    assert_eq!((status, body["code"].as_u64()), (200, Some(0)));
    assert!(body.get("data").is_none(), "{body}");

    env.sim.faults().push(Fault::DropConnection);
    let err = env
        .call(&image)
        .await
        .expect_err("the connection is dropped");
    assert!(!err.is_status(), "{err:?}");

    assert_eq!(
        env.call(&image).await.expect("response").status().as_u16(),
        200,
        "the server lives on"
    );
    let stats = env.sim.stats();
    assert_eq!((stats.recognize_calls, stats.billed_calls), (4, 2));
}

#[tokio::test]
async fn random_faults_follow_the_rate() {
    let env = Env::new().await;
    let image = png_b64(400, 400);
    env.sim.faults().set_random(1.0, vec![Fault::Code(5001)]);
    let (status, body) = env.recognize(&image).await;
    assert_eq!((status, body["code"].as_u64()), (503, Some(5001)));
    env.sim.faults().set_random(0.0, vec![Fault::Code(5001)]);
    assert_eq!(env.recognize(&image).await.0, 200);
}

#[tokio::test]
async fn cdn_downloads_take_the_cdn_latency_per_object() {
    let env = Env::new().await;
    let url = env.object_url().await;
    let latency = Duration::from_millis(300);
    env.sim.set_cdn_latency(latency);
    let started = tokio::time::Instant::now();
    assert_eq!(env.get(&url).await.0, 200);
    assert_eq!(env.get(&url).await.0, 200);
    // A floor, not a timing target: the answer waits the latency first.
    assert!(started.elapsed() >= latency * 2, "{:?}", started.elapsed());
    assert_eq!(env.sim.stats().cdn_downloads, 2);
}

#[tokio::test]
async fn expired_and_tampered_urls_are_refused() {
    let env = Env::new().await;
    let url = env.object_url().await;
    assert_eq!(env.get(&url).await.0, 200);

    let tampered = url.replace("object_seg.png", "head_seg.png");
    assert_eq!(env.get(&tampered).await.0, 403);
    let unsigned = url.split('?').next().unwrap_or_default().to_owned();
    assert_eq!(env.get(&unsigned).await.0, 403);
    assert_eq!(
        env.get(&format!("{}/cdn/nope.png", env.sim.base_url()))
            .await
            .0,
        404
    );

    env.sim.faults().expire_all_results();
    assert_eq!(env.get(&url).await.0, 403);
    let stats = env.sim.stats();
    assert_eq!((stats.cdn_downloads, stats.cdn_expired), (1, 1));

    // URLs issued after the expiry work.
    let (_, body) = env.recognize(&png_b64(400, 400)).await;
    assert_eq!(
        env.get(images(&body)[0]["url"].as_str().unwrap_or_default())
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn stats_count_only_code_0_as_billed() {
    let env = Env::new().await;
    let image = png_b64(400, 400);
    env.recognize(&image).await;
    env.post(Some("Bearer x.y.z"), json!({ "image": image }))
        .await;
    env.sim.faults().push(Fault::Code(5001));
    env.recognize(&image).await;
    env.recognize(&png_b64(200, 200)).await;
    let stats = env.sim.stats();
    assert_eq!((stats.recognize_calls, stats.billed_calls), (4, 1));
    assert_eq!(
        stats.calls_by_code,
        BTreeMap::from([(0, 1), (1002, 1), (1201, 1), (5001, 1)])
    );
}

#[tokio::test]
async fn admin_endpoints_control_a_simulator_out_of_process() {
    let env = Env::new().await;
    let image = png_b64(400, 400);

    let update = json!({"push": [{"code": 5001}, "drop_connection"], "account_error": null,
                        "max_concurrency": 4, "latency_ms": 0, "random": {"rate": 0, "pool": [{"hang_ms": 5}]}});
    assert_eq!(env.admin(update).await, 204);
    assert_eq!(env.recognize(&image).await.1["code"], 5001);
    let dropped = env.call(&image).await;
    assert!(dropped.is_err(), "drop_connection was queued");

    assert_eq!(env.admin(json!({"account_error": 1102})).await, 204);
    for _ in 0..2 {
        let (status, body) = env.recognize(&image).await;
        assert_eq!((status, body["code"].as_u64()), (429, Some(1102)));
    }
    let clear = json!({"account_error": null, "expire_all": true});
    assert_eq!(env.admin(clear).await, 204);
    assert_eq!(env.recognize(&image).await.0, 200);
    assert_eq!(env.admin(json!({"bogus": 1})).await, 400);

    let stats: SimStats = env
        .http
        .get(format!("{}/__sim/stats", env.sim.base_url()))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON");
    assert_eq!(stats, env.sim.stats());
    assert_eq!(stats.calls_by_code.get(&1102), Some(&2));
}

#[test]
fn faults_update_json_keeps_null_apart_from_absent() {
    let clear = FaultsUpdate {
        account_error: Some(None),
        push: vec![Fault::Hang(Duration::from_millis(7))],
        ..Default::default()
    };
    let json = serde_json::to_value(&clear).expect("serialize");
    assert_eq!(
        json,
        json!({"push": [{"hang_ms": 7}], "account_error": null})
    );
    assert_eq!(
        serde_json::from_value::<FaultsUpdate>(json).expect("deserialize"),
        clear
    );
    assert_eq!(
        serde_json::from_value::<FaultsUpdate>(json!({})).expect("empty"),
        FaultsUpdate::default()
    );
    let all = json!(["non_json_200", "drop_connection", "missing_data", {"code": 1303}]);
    assert_eq!(
        serde_json::from_value::<Vec<Fault>>(all).expect("faults"),
        [
            Fault::NonJson200,
            Fault::DropConnection,
            Fault::MissingData,
            Fault::Code(1303)
        ]
    );
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let env = Env::new().await;
    assert_eq!(env.recognize(&png_b64(400, 400)).await.0, 200);
    env.sim.shutdown();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(env.sim.addr()).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn run_serves_until_its_shutdown_future_completes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut config = SimConfig::new(AK, SK);
    config.bind = SocketAddr::from(([127, 0, 0, 1], port));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(config, async move {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let stats_url = format!("http://127.0.0.1:{port}/__sim/stats");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while http.get(&stats_url).send().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "run never started serving"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    let ended = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("run returns");
    ended.expect("task").expect("served cleanly");
}
