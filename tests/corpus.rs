//! A corpus of what media pipelines really send, through the real worker
//! (RabbitMQ, the simulator, a local archive): every good image is archived
//! (the simulator, which enforces Kling's input spec, accepted it) and
//! every bad one is dead-lettered with its own reason. Generated in code:
//! no binary fixtures.

mod common;

use std::io::Cursor;
use std::time::Duration;

use common::{Backend, TestEnv, b64};
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use kling_archiver::broker::JobEvent;
use kling_archiver::demo::{scene, with_exif_orientation};
use kling_archiver::manifest::Manifest;
use kling_archiver::pipeline::Hooks;

fn enc(img: &DynamicImage, f: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, f).unwrap();
    out.into_inner()
}

fn rgb(w: u32, h: u32, seed: u8) -> DynamicImage {
    DynamicImage::ImageRgb8(scene(w, h, seed))
}

/// A two-frame GIF: the worker must take the first frame.
fn animated_gif() -> Vec<u8> {
    use image::codecs::gif::GifEncoder;
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut out);
        for seed in [3, 4] {
            let frame = image::Frame::new(rgb(420, 360, seed).into_rgba8());
            enc.encode_frame(frame).unwrap();
        }
    }
    out
}

/// A CMYK JPEG (as print workflows export): pure red is C=0 M=1 Y=1 K=0.
fn cmyk_red_jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(usize::from(w) * usize::from(h) * 4);
    for _ in 0..u32::from(w) * u32::from(h) {
        data.extend_from_slice(&[0, 255, 255, 0]);
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 92)
        .encode(&data, w, h, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    out
}

/// 16 bits per channel, a known colour.
fn png16(w: u32, h: u32) -> Vec<u8> {
    let img: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(w, h, Rgb([65535, 32768, 0]));
    enc(&DynamicImage::ImageRgb16(img), ImageFormat::Png)
}

/// Half transparent: stays PNG, padded transparent.
fn rgba_png(w: u32, h: u32) -> Vec<u8> {
    let img = RgbaImage::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgba([20, 120, 220, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    });
    enc(&DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

/// Over 10 MB as a PNG: incompressible noise, 2000x1800 RGB.
fn big_png() -> Vec<u8> {
    let mut s = 0x9E37_79B9u32;
    let img = RgbImage::from_fn(2000, 1800, |_, _| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        Rgb(s.to_le_bytes()[..3].try_into().unwrap())
    });
    let out = enc(&DynamicImage::ImageRgb8(img), ImageFormat::Png);
    assert!(out.len() > 10 * 1024 * 1024, "{} bytes", out.len());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corpus_of_real_world_inputs_is_archived_or_dead_lettered_with_a_reason() {
    let env = TestEnv::new(Backend::Local).await;
    let rotated = with_exif_orientation(
        &enc(
            &DynamicImage::ImageRgb8(scene(360, 480, 6)).rotate270(),
            ImageFormat::Jpeg,
        ),
        6,
    );
    let mut truncated = enc(&rgb(640, 480, 1), ImageFormat::Jpeg);
    truncated.truncate(truncated.len() / 2);
    // Damage the header (the IHDR checksum): an in-spec image is sent
    // without a full decode, so damage inside the pixel data is Kling's to
    // judge, but a broken header is caught here.
    let mut corrupt = enc(&rgb(640, 480, 2), ImageFormat::Png);
    corrupt[30] ^= 0x5A;

    // job id -> (bytes, the fix expected in the manifest's transform steps)
    let good: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("c-jpeg", enc(&rgb(640, 480, 1), ImageFormat::Jpeg), &[]),
        ("c-png", enc(&rgb(640, 480, 2), ImageFormat::Png), &[]),
        (
            "c-webp",
            enc(&rgb(600, 500, 5), ImageFormat::WebP),
            &["encode"],
        ),
        ("c-gif", animated_gif(), &["encode"]),
        (
            "c-bmp",
            enc(&rgb(500, 400, 3), ImageFormat::Bmp),
            &["encode"],
        ),
        (
            "c-tiff",
            enc(&rgb(500, 400, 4), ImageFormat::Tiff),
            &["encode"],
        ),
        ("c-exif6", rotated, &["orient", "encode"]),
        ("c-cmyk", cmyk_red_jpeg(400, 320), &["encode"]),
        ("c-png16", png16(400, 320), &["encode"]),
        ("c-rgba", rgba_png(1000, 300), &["pad", "encode"]),
        (
            "c-tiny",
            enc(&rgb(120, 90, 2), ImageFormat::Jpeg),
            &["resize", "encode"],
        ),
        (
            "c-pano",
            enc(&rgb(2500, 500, 4), ImageFormat::Jpeg),
            &["pad", "encode"],
        ),
        ("c-big", big_png(), &["encode"]),
    ];
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("c-corrupt", corrupt, "image_undecodable"),
        ("c-trunc", truncated, "image_truncated"),
        ("c-empty", Vec::new(), "job_invalid_base64"),
        (
            "c-bomb",
            common::dimension_bomb_png(),
            "image_too_many_pixels",
        ),
        // A GIF header (16x16) and then text.
        (
            "c-text",
            b"GIF89a\x10\x00\x10\x00 and then just text".to_vec(),
            "image_undecodable",
        ),
    ];

    // An empty body over HTTP: the fetch succeeds, the image is empty.
    let http = common::serve_files(vec![("empty.jpg", Vec::new())]).await;
    let mut cfg = env.config();
    cfg.fetch.allow_private = true;
    let mut w = env.start_worker(cfg, Hooks::default());
    env.publish_json(
        serde_json::json!({"job_id": "c-empty-url", "image_url": format!("{http}/empty.jpg")}),
    )
    .await;
    for (id, bytes, _) in &good {
        env.publish_json(serde_json::json!({"job_id": id, "image_base64": b64(bytes)}))
            .await;
    }
    for (id, bytes, _) in &bad {
        env.publish_json(serde_json::json!({"job_id": id, "image_base64": b64(bytes)}))
            .await;
    }
    let events = w
        .settled(good.len() + bad.len() + 1, Duration::from_secs(240))
        .await;
    w.stop().await;

    let archived: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Archived { job_id, .. } => Some(job_id.as_str()),
            _ => None,
        })
        .collect();
    let dead = env.drain_dead_letters().await;
    let mut problems = Vec::new();
    let store = env.store();
    for (id, _, steps) in &good {
        if !archived.contains(id) {
            let why = dead.iter().find(|d| d.job_id.as_deref() == Some(*id));
            problems.push(format!("{id} was not archived: {why:?}"));
            continue;
        }
        let key =
            kling_archiver::archive::ObjectKey::parse(&format!("jobs/{id}/manifest.json")).unwrap();
        let m: Manifest = serde_json::from_slice(&store.get(&key).await.unwrap().unwrap()).unwrap();
        let ops: Vec<&str> = m.prepared.transforms.steps.iter().map(|s| s.op()).collect();
        for op in *steps {
            if !ops.iter().any(|o| o == op) {
                problems.push(format!("{id}: expected a {op} step, got {ops:?}"));
            }
        }
        if steps.is_empty() && !m.prepared.passthrough {
            problems.push(format!("{id}: in spec, yet not passed through: {ops:?}"));
        }
        let w = f64::from(m.prepared.width);
        let h = f64::from(m.prepared.height);
        let in_spec = m.prepared.width >= 300
            && m.prepared.height >= 300
            && w / h <= 2.5
            && h / w <= 2.5
            && m.prepared.bytes <= 10 * 1024 * 1024;
        if !in_spec {
            problems.push(format!(
                "{id}: prepared image out of spec: {:?}",
                m.prepared
            ));
        }
        // Colours survive the unusual encodings.
        let expect: Option<[u8; 3]> = match *id {
            "c-cmyk" => Some([255, 0, 0]),
            "c-png16" => Some([255, 128, 0]),
            _ => None,
        };
        if let Some(expect) = expect {
            let prepared_key = store.relative_key(&m.prepared.key).unwrap();
            let bytes = store.get(&prepared_key).await.unwrap().unwrap();
            let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
            let p = img.get_pixel(img.width() / 2, img.height() / 2).0;
            let close = p.iter().zip(expect).all(|(a, b)| a.abs_diff(b) <= 12);
            if !close {
                problems.push(format!(
                    "{id}: centre pixel {p:?}, expected about {expect:?}"
                ));
            }
        }
    }
    for (id, _, code) in &bad {
        match dead.iter().find(|d| d.job_id.as_deref() == Some(*id)) {
            Some(d) if d.code.as_deref() == Some(*code) => {
                assert!(
                    d.reason.as_deref().is_some_and(|r| r.len() > 20),
                    "{id}: a reason people can act on: {d:?}"
                );
            }
            other => problems.push(format!("{id}: expected {code}, got {other:?}")),
        }
    }
    match dead
        .iter()
        .find(|d| d.job_id.as_deref() == Some("c-empty-url"))
    {
        Some(d) if d.code.as_deref() == Some("source_empty") => {}
        other => problems.push(format!("c-empty-url: expected source_empty, got {other:?}")),
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(archived.len(), good.len());
    assert_eq!(dead.len(), bad.len() + 1);
    assert_eq!(
        env.sim.stats().calls_by_code.get(&1201),
        None,
        "the simulator never saw an out-of-spec image"
    );
    env.cleanup().await;
}
