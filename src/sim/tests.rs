use super::*;

const AK: &str = "ak-test";
const SK: &str = "sk-test";

fn token(iss: &str, key: &str, exp_delta: i64, nbf_delta: i64) -> String {
    let now = now() as i64;
    let claims = serde_json::json!({ "iss": iss, "exp": now + exp_delta, "nbf": now + nbf_delta });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

fn good() -> String {
    token(AK, SK, 1800, -5)
}

fn img(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let im = image::RgbImage::from_fn(w, h, |x, y| {
        let inside = (x as i64 - w as i64 / 2).pow(2) + (y as i64 - h as i64 / 2).pow(2)
            < (w.min(h) as i64 / 3).pow(2);
        if inside {
            image::Rgb([20, 40, 200])
        } else {
            image::Rgb([240, 240, 240])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    im.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

async fn call(
    sim: &SimHandle,
    auth: Option<String>,
    image: String,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/videos/image-recognize", sim.base_url()))
        .json(&serde_json::json!({ "image": image }));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    ))
}

async fn start() -> SimHandle {
    Simulator::start(SimConfig::new(AK, SK)).await.unwrap()
}

#[tokio::test]
async fn success_returns_deterministic_masks_of_the_input_size() {
    let sim = start().await;
    let image = b64(&img(640, 480, image::ImageFormat::Png));
    let (status, a) = call(&sim, Some(format!("Bearer {}", good())), image.clone())
        .await
        .unwrap();
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["code"], 0);
    let images = a["data"]["task_result"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 4);
    let url = images[0]["url"].as_str().unwrap();
    let png1 = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    let decoded = image::load_from_memory(&png1).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (640, 480));
    let (_, b) = call(&sim, Some(format!("Bearer {}", good())), image)
        .await
        .unwrap();
    assert_ne!(a["request_id"], b["request_id"]);
    let png2 = reqwest::get(
        b["data"]["task_result"]["images"][0]["url"]
            .as_str()
            .unwrap(),
    )
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    assert_eq!(png1, png2, "identical input, identical mask");
    let stats = sim.stats();
    assert_eq!((stats.billed_calls, stats.cdn_downloads), (2, 2));
}

#[tokio::test]
async fn auth_failures_have_their_exact_codes() {
    let sim = start().await;
    let image = b64(&img(400, 400, image::ImageFormat::Jpeg));
    let cases = [
        (None, 1001),
        (Some(format!("Bearer  {}", good())), 1002),
        (Some(format!("Token {}", good())), 1002),
        (
            Some(format!("Bearer {}", token(AK, "wrong", 1800, -5))),
            1002,
        ),
        (
            Some(format!("Bearer {}", token("other", SK, 1800, -5))),
            1000,
        ),
        (Some(format!("Bearer {}", token(AK, SK, 1800, 600))), 1003),
        (Some(format!("Bearer {}", token(AK, SK, -10, -1000))), 1004),
    ];
    for (auth, code) in cases {
        let (status, a) = call(&sim, auth.clone(), image.clone()).await.unwrap();
        assert_eq!((status, a["code"].as_u64()), (401, Some(code)), "{auth:?}");
    }
    assert_eq!(sim.stats().billed_calls, 0);
}

#[tokio::test]
async fn out_of_spec_input_is_refused_with_1201() {
    let sim = start().await;
    let auth = || Some(format!("Bearer {}", good()));
    for (image, why) in [
        (b64(&img(200, 200, image::ImageFormat::Png)), "small"),
        (b64(&img(900, 300, image::ImageFormat::Png)), "aspect"),
        (b64(&img(400, 400, image::ImageFormat::Gif)), "gif"),
        (b64(&img(400, 400, image::ImageFormat::Bmp)), "bmp"),
        (
            format!(
                "data:image/png;base64,{}",
                b64(&img(400, 400, image::ImageFormat::Png))
            ),
            "data prefix",
        ),
        (b64(&vec![0u8; 11 * 1024 * 1024]), "over 10 MB"),
        ("@@@".into(), "not base64"),
    ] {
        let (status, a) = call(&sim, auth(), image).await.unwrap();
        assert_eq!(
            (status, a["code"].as_u64()),
            (400, Some(1201)),
            "{why}: {a}"
        );
    }
    let (status, a) = call(&sim, auth(), String::new()).await.unwrap();
    assert_eq!((status, a["code"].as_u64()), (400, Some(1200)));
}

#[tokio::test]
async fn faults_are_injected_on_demand() {
    let sim = start().await;
    let image = b64(&img(400, 400, image::ImageFormat::Jpeg));
    let auth = || Some(format!("Bearer {}", good()));
    sim.faults().push(Fault::Code(1302));
    assert_eq!(call(&sim, auth(), image.clone()).await.unwrap().0, 429);
    assert_eq!(call(&sim, auth(), image.clone()).await.unwrap().0, 200);
    sim.faults().set_account_error(Some(1101));
    let (s, a) = call(&sim, auth(), image.clone()).await.unwrap();
    assert_eq!((s, a["code"].as_u64()), (429, Some(1101)));
    sim.faults().set_account_error(None);
    sim.faults().push(Fault::NonJson200);
    let (s, a) = call(&sim, auth(), image.clone()).await.unwrap();
    assert!(s == 200 && a.is_string());
    sim.faults().push(Fault::DropConnection);
    assert!(
        call(&sim, auth(), image.clone()).await.is_err(),
        "connection dropped"
    );
    // Concurrency limit.
    sim.faults().set_max_concurrency(Some(1));
    sim.set_latency(Duration::from_millis(300));
    let (a, b) = tokio::join!(
        call(&sim, auth(), image.clone()),
        call(&sim, auth(), image.clone())
    );
    let codes = [a.unwrap().1["code"].as_u64(), b.unwrap().1["code"].as_u64()];
    assert!(
        codes.contains(&Some(1303)) && codes.contains(&Some(0)),
        "{codes:?}"
    );
    assert_eq!(sim.stats().peak_in_flight, 2);
}

#[tokio::test]
async fn urls_expire_and_admin_endpoints_work() {
    let sim = start().await;
    let (_, a) = call(
        &sim,
        Some(format!("Bearer {}", good())),
        b64(&img(400, 400, image::ImageFormat::Jpeg)),
    )
    .await
    .unwrap();
    let url = a["data"]["task_result"]["images"][0]["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = reqwest::Client::new()
        .post(format!("{}/__sim/faults", sim.base_url()))
        .json(&serde_json::json!({ "expire_all": true, "push": [{"kind": "code", "value": 5001}] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 403);
    let tampered = url.replace("sig=", "sig=0");
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);
    let stats: SimStats = reqwest::get(format!("{}/__sim/stats", sim.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.cdn_expired, 1);
    let (s, _) = call(
        &sim,
        Some(format!("Bearer {}", good())),
        b64(&img(400, 400, image::ImageFormat::Jpeg)),
    )
    .await
    .unwrap();
    assert_eq!(s, 503, "pushed through the admin endpoint");
}
