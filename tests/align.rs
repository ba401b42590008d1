//! Masks on the source's own pixels (issue 19), end to end: real RabbitMQ,
//! the real worker, the Kling simulator cutting the subject out of the
//! *prepared* image. Each source is a known shape drawn on the source's
//! stored grid; the aligned mask the worker archives must be that shape in
//! the source's pixels, whatever was done to the image for Kling.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Backend, TestEnv, b64};
use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use kling_archiver::admin::verify;
use kling_archiver::archive::{ObjectKey, Sha256, Store};
use kling_archiver::demo::with_exif_orientation;
use kling_archiver::manifest::{Manifest, SourceMaskStatus};
use kling_archiver::pipeline::Hooks;

const SETTLE: Duration = Duration::from_secs(300);
/// Light enough that the simulator's subject threshold (a summed
/// difference of 60 from the background) falls at about half the edge's
/// contrast: its masks then neither grow nor shrink the shape where
/// resampling blurs the edge, and what is measured is the alignment.
const SUBJECT: [u8; 3] = [195, 205, 235];
const WHITE: [u8; 3] = [255, 255, 255];

/// A shape in stored-grid source coordinates.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Disc { cx: f64, cy: f64, r: f64 },
    Rect { x0: f64, y0: f64, x1: f64, y1: f64 },
}

impl Shape {
    fn contains(self, x: f64, y: f64) -> bool {
        match self {
            Shape::Disc { cx, cy, r } => (x - cx).powi(2) + (y - cy).powi(2) < r * r,
            Shape::Rect { x0, y0, x1, y1 } => x >= x0 && x < x1 && y >= y0 && y < y1,
        }
    }

    /// The shape as a mask of `w` x `h`, judged at pixel centres.
    fn mask(self, w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            let inside = self.contains(f64::from(x) + 0.5, f64::from(y) + 0.5);
            Luma([if inside { 255 } else { 0 }])
        })
    }

    fn rgb(self, w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb(if self.contains(f64::from(x) + 0.5, f64::from(y) + 0.5) {
                SUBJECT
            } else {
                WHITE
            })
        })
    }
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// A PNG over 10 MB: the shape on faint noise, with noisy alpha so it
/// stays a PNG (and must be shrunk to fit). The simulator still sees a
/// white background: the noise is far below its subject threshold.
fn oversized_png(w: u32, h: u32, shape: Shape) -> Vec<u8> {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let img = RgbaImage::from_fn(w, h, |x, y| {
        let n = next();
        if shape.contains(f64::from(x) + 0.5, f64::from(y) + 0.5) {
            Rgba([SUBJECT[0], SUBJECT[1], SUBJECT[2], 255])
        } else {
            let g = |k: u32| 243 + ((n >> k) % 13) as u8;
            Rgba([g(0), g(8), g(16), 200 + ((n >> 24) % 56) as u8])
        }
    });
    encode(DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

struct Case {
    job_id: &'static str,
    bytes: Vec<u8>,
    /// Stored width and height.
    size: [u32; 2],
    shape: Shape,
    /// Transform steps the preparation must have taken.
    steps: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    // EXIF 6 and 8: stored sideways, turned upright for Kling.
    let s6 = Shape::Disc {
        cx: 250.0,
        cy: 200.0,
        r: 130.0,
    };
    let s8 = Shape::Rect {
        x0: 420.0,
        y0: 100.0,
        x1: 700.0,
        y1: 380.0,
    };
    let tiny = Shape::Disc {
        cx: 90.0,
        cy: 70.0,
        r: 50.0,
    };
    let pano = Shape::Disc {
        cx: 1150.0,
        cy: 200.0,
        r: 170.0,
    };
    let big = Shape::Disc {
        cx: 1900.0,
        cy: 1000.0,
        r: 650.0,
    };
    let jpeg =
        |shape: Shape, w, h| encode(DynamicImage::ImageRgb8(shape.rgb(w, h)), ImageFormat::Jpeg);
    vec![
        Case {
            job_id: "exif6",
            bytes: with_exif_orientation(&jpeg(s6, 640, 480), 6),
            size: [640, 480],
            shape: s6,
            steps: &["orient"],
        },
        Case {
            job_id: "exif8",
            bytes: with_exif_orientation(&jpeg(s8, 800, 600), 8),
            size: [800, 600],
            shape: s8,
            steps: &["orient"],
        },
        Case {
            job_id: "tiny",
            bytes: encode(
                DynamicImage::ImageRgb8(tiny.rgb(200, 150)),
                ImageFormat::Png,
            ),
            size: [200, 150],
            shape: tiny,
            steps: &["resize"],
        },
        Case {
            job_id: "pano",
            bytes: jpeg(pano, 1600, 400),
            size: [1600, 400],
            shape: pano,
            steps: &["pad"],
        },
        Case {
            job_id: "big",
            bytes: oversized_png(3000, 2000, big),
            size: [3000, 2000],
            shape: big,
            steps: &["resize"],
        },
    ]
}

async fn get(store: &Store, full: &str) -> Vec<u8> {
    let key = store
        .relative_key(full)
        .unwrap_or_else(|| panic!("{full} is outside the archive"));
    store
        .get(&key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{full} missing"))
        .to_vec()
}

async fn manifest(store: &Store, job_id: &str) -> Manifest {
    let key = ObjectKey::parse(&format!("jobs/{job_id}/manifest.json")).unwrap();
    let bytes = store.get(&key).await.unwrap().expect("manifest");
    common::assert_manifest_schema(&bytes);
    serde_json::from_slice(&bytes).unwrap()
}

fn iou(a: &GrayImage, b: &GrayImage) -> f64 {
    let (mut both, mut any) = (0u64, 0u64);
    for (p, q) in a.pixels().zip(b.pixels()) {
        let (p, q) = (p[0] >= 128, q[0] >= 128);
        both += u64::from(p && q);
        any += u64::from(p || q);
    }
    both as f64 / any.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aligned_masks_match_the_shape_in_the_source_pixels() {
    let env = TestEnv::new(Backend::Local).await;
    let cases = cases();
    assert!(
        cases[4].bytes.len() > 10 * 1024 * 1024,
        "the PNG must be over 10 MB, is {}",
        cases[4].bytes.len()
    );
    let mut w = env.start_worker(env.config(), Hooks::default());
    for c in &cases {
        env.publish_json(serde_json::json!({"job_id": c.job_id, "image_base64": b64(&c.bytes)}))
            .await;
    }
    w.settled(cases.len(), SETTLE).await;
    let store = env.store();
    for c in &cases {
        let m = manifest(&store, c.job_id).await;
        let ops: Vec<&str> = m.prepared.transforms.steps.iter().map(|s| s.op()).collect();
        for op in c.steps {
            assert!(ops.contains(op), "{}: {op} missing from {ops:?}", c.job_id);
        }
        let sm = m.source_masks.as_ref().expect("source_masks");
        assert_eq!(sm.status, SourceMaskStatus::Aligned, "{}", c.job_id);
        assert_eq!(
            (sm.grid.as_str(), sm.exif_orientation_applied),
            ("stored", false)
        );
        assert_eq!([sm.width, sm.height], c.size);
        let object = m
            .segments
            .iter()
            .find(|s| s.kind.as_str() == "object_seg")
            .expect("object_seg");
        let kling =
            image::load_from_memory(&get(&store, object.key.as_deref().unwrap()).await).unwrap();
        assert_eq!(
            [kling.width(), kling.height()],
            [m.prepared.width, m.prepared.height],
            "Kling's mask is in the prepared grid"
        );
        for seg in m.segments.iter().filter(|s| s.is_contain) {
            let a = seg
                .aligned
                .as_ref()
                .expect("every found segment is aligned");
            let png = get(&store, &a.key).await;
            assert_eq!(Sha256::of(&png), a.sha256);
            assert_eq!(png.len() as u64, a.bytes);
            assert!(a.key.contains(&format!("masks/{}.png", a.sha256)));
            let mask = image::load_from_memory(&png).unwrap();
            assert_eq!(mask.color(), image::ColorType::L8, "greyscale");
            assert_eq!(
                [mask.width(), mask.height(), a.width, a.height],
                [c.size[0], c.size[1], c.size[0], c.size[1]]
            );
            let mask = mask.into_luma8();
            // A cut-out of a noisy-alpha PNG has soft alpha; any other
            // simulator mask is 0/255 and must stay so.
            let kling = image::load_from_memory(&get(&store, seg.key.as_deref().unwrap()).await)
                .unwrap()
                .into_rgba8();
            if kling.pixels().all(|p| p[3] == 0 || p[3] == 255) {
                assert!(
                    mask.pixels().all(|p| p[0] == 0 || p[0] == 255),
                    "{}: Kling's binary mask stays binary",
                    c.job_id
                );
            }
            if seg.kind.as_str() == "object_seg" {
                let want = c.shape.mask(c.size[0], c.size[1]);
                let got = iou(&mask, &want);
                eprintln!("{}: IoU {got:.4}", c.job_id);
                assert!(got >= 0.98, "{}: IoU {got:.4} < 0.98", c.job_id);
            }
        }
    }
    // `worker verify` checks the aligned masks like every other object.
    let report = verify::run(&store, &verify::Options::default())
        .await
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    let m = manifest(&store, "pano").await;
    let a = m.segments[0].aligned.as_ref().unwrap();
    let path = env.local_dir.path().join(&a.key);
    std::fs::write(&path, b"not the mask").unwrap();
    let report = verify::run(&store, &verify::Options::default())
        .await
        .unwrap();
    assert_eq!(
        report
            .findings
            .iter()
            .map(|f| (f.key.as_str(), f.problem))
            .collect::<Vec<_>>(),
        [(a.key.as_str(), "sha256_mismatch")]
    );
    // A manifest whose aligned mask is not the source's size is caught.
    let path = env.local_dir.path().join("jobs/tiny/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["segments"][0]["aligned"]["width"] = 199.into();
    std::fs::write(&path, m.to_string()).unwrap();
    let report = verify::run(&store, &verify::Options::default())
        .await
        .unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.problem == "aligned_size_mismatch"
                && f.detail == "199x150, the source is 200x150"),
        "{:?}",
        report.findings
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passthrough_jobs_say_their_masks_already_align_and_the_switch_turns_it_off() {
    let env = TestEnv::new(Backend::S3).await;
    let mut cfg = env.config();
    cfg.source_masks = false;
    let mut w = env.start_worker(cfg, Hooks::default());
    let tiny = encode(
        DynamicImage::ImageRgb8(
            Shape::Disc {
                cx: 90.0,
                cy: 70.0,
                r: 50.0,
            }
            .rgb(200, 150),
        ),
        ImageFormat::Png,
    );
    env.publish_json(serde_json::json!({"job_id": "off", "image_base64": b64(&tiny)}))
        .await;
    env.publish_json(
        serde_json::json!({"job_id": "in-spec", "image_base64": b64(&common::jpeg(600, 500))}),
    )
    .await;
    w.settled(2, SETTLE).await;
    let store = env.store();
    let off = manifest(&store, "off").await;
    assert_eq!(
        off.source_masks.as_ref().unwrap().status,
        SourceMaskStatus::Disabled
    );
    let in_spec = manifest(&store, "in-spec").await;
    assert!(in_spec.prepared.passthrough);
    assert_eq!(
        in_spec.source_masks.as_ref().unwrap().status,
        SourceMaskStatus::AlreadyAligned
    );
    for m in [&off, &in_spec] {
        assert!(m.segments.iter().all(|s| s.aligned.is_none()), "{m:?}");
    }
    assert!(store.list("masks/").await.unwrap().is_empty());

    // An archive written before aligned masks: no `source_masks`, no
    // `aligned`. The report still places Kling's masks through the
    // transforms.
    let key = ObjectKey::parse("jobs/off/manifest.json").unwrap();
    let mut old: serde_json::Value =
        serde_json::from_slice(&store.get(&key).await.unwrap().unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("source_masks");
    let body = bytes::Bytes::from(serde_json::to_vec(&old).unwrap());
    let meta = kling_archiver::archive::PutMeta {
        content_type: "application/json",
        sha256: Sha256::of(&body),
        metadata: Default::default(),
    };
    store.put(&key, body, &meta).await.unwrap();
    let (html, _) = kling_archiver::report::render(&store, &Default::default())
        .await
        .unwrap();
    let cards = report_cards(&html);
    let found = off.segments.iter().filter(|s| s.is_contain).count();
    assert!(found > 0);
    assert_eq!(cards["off"].matches("<img class=\"ov\"").count(), found);
    assert!(
        !cards["off"].contains("class=\"problem\""),
        "{}",
        cards["off"]
    );
    w.stop().await;
    env.cleanup().await;
}

/// Pillow, installed quietly when missing; a failure to install fails.
fn python_with_pillow() -> &'static str {
    let has = || {
        std::process::Command::new("python3")
            .args(["-c", "import PIL"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has() {
        let out = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "-q", "pillow"])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success() && has(),
            "cannot install Pillow: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    "python3"
}

/// The Python block of `docs/s3-layout.md` marked `<!-- recipe:python -->`.
fn python_recipe() -> String {
    let doc = include_str!("../docs/s3-layout.md");
    let after = doc
        .split("<!-- recipe:python -->")
        .nth(1)
        .expect("the recipe marker");
    let body = after
        .split("```python\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a python block after the marker");
    body.to_owned()
}

/// The Rust recipe of `docs/s3-layout.md`, as written there.
fn cut_out(original: &[u8], aligned_mask: &[u8]) -> image::ImageResult<image::RgbaImage> {
    let mut cut = image::load_from_memory(original)?.into_rgba8();
    let mask = image::load_from_memory(aligned_mask)?.into_luma8();
    assert_eq!(
        cut.dimensions(),
        mask.dimensions(),
        "an aligned mask is the source's size"
    );
    for (px, m) in cut.pixels_mut().zip(mask.pixels()) {
        px[3] = m[0];
    }
    Ok(cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_documented_recipes_cut_the_object_out_of_the_original() {
    let python = python_with_pillow();
    let env = TestEnv::new(Backend::Local).await;
    let mut w = env.start_worker(env.config(), Hooks::default());
    let c = cases().swap_remove(0); // EXIF 6: the trap a recipe falls in
    env.publish_json(serde_json::json!({"job_id": c.job_id, "image_base64": b64(&c.bytes)}))
        .await;
    w.settled(1, SETTLE).await;
    w.stop().await;
    let store = env.store();
    let m = manifest(&store, c.job_id).await;
    let out = tempfile::tempdir().unwrap();
    let script = out.path().join("cutout.py");
    std::fs::write(&script, python_recipe()).unwrap();
    let run = std::process::Command::new(python)
        .arg(&script)
        .arg(env.local_dir.path())
        .arg(c.job_id)
        .arg(out.path())
        .output()
        .expect("python3 runs");
    assert!(
        run.status.success(),
        "the recipe failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let original = get(&store, &m.source.key).await;
    let mut checked = 0;
    for seg in m.segments.iter().filter(|s| s.is_contain) {
        let file = out.path().join(format!("{}.png", seg.kind.as_str()));
        let py = image::open(Path::new(&file))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .into_rgba8();
        let mask = get(&store, &seg.aligned.as_ref().unwrap().key).await;
        let rust = cut_out(&original, &mask).unwrap();
        assert_eq!(py.dimensions(), (c.size[0], c.size[1]), "stored grid");
        assert_eq!(py.dimensions(), rust.dimensions());
        // Same alpha; colours within JPEG decoder rounding (libjpeg vs zune).
        for (p, r) in py.pixels().zip(rust.pixels()) {
            assert_eq!(p[3], r[3]);
            assert!((0..3).all(|i| p[i].abs_diff(r[i]) <= 8), "{p:?} vs {r:?}");
        }
        checked += 1;
    }
    assert!(checked >= 2, "{checked} segments");
    // The object is the disc, opaque, in the original's colours.
    let obj = image::open(out.path().join("object_seg.png"))
        .unwrap()
        .into_rgba8();
    let Shape::Disc { cx, cy, .. } = c.shape else {
        unreachable!()
    };
    let centre = obj.get_pixel(cx as u32, cy as u32);
    assert_eq!(centre[3], 255);
    assert!(centre[2] > centre[0] + 20, "{centre:?}");
    assert_eq!(obj.get_pixel(5, 5)[3], 0, "the background is cut away");
    env.cleanup().await;
}

/// The cards of a report page: job id -> the card's HTML.
fn report_cards(html: &str) -> std::collections::BTreeMap<String, String> {
    html.split("<article class=\"card")
        .skip(1)
        .filter_map(|card| {
            let id = card.split("data-job-id=\"").nth(1)?.split('"').next()?;
            Some((id.to_owned(), card.split("</article>").next()?.to_owned()))
        })
        .collect()
}

#[test]
fn the_demo_archives_aligned_masks_and_the_report_draws_them() {
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("demo-archive");
    let worker = |args: &[&str]| {
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(args)
            .env("AMQP_URL", common::amqp_url())
            .env("HTTP_ADDR", "off")
            .env_remove("SOURCE_MASKS")
            .output()
            .expect("run worker");
        assert!(
            run.status.success(),
            "worker {args:?}: {}\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    };
    let dir = archive.to_str().unwrap();
    worker(&["demo", "--out", dir, "--latency-ms", "0"]);

    let mut aligned_jobs = Vec::new();
    for sample in kling_archiver::demo::samples() {
        let path = archive.join(format!("jobs/{}/manifest.json", sample.job_id));
        let Ok(body) = std::fs::read(&path) else {
            assert_eq!(
                sample.job_id, "demo-broken",
                "only the broken one has no manifest"
            );
            continue;
        };
        common::assert_manifest_schema(&body);
        let m: Manifest = serde_json::from_slice(&body).unwrap();
        let status = m.source_masks.as_ref().expect("source_masks").status;
        let turned = m
            .prepared
            .transforms
            .steps
            .iter()
            .any(|s| s.op() != "encode");
        assert_eq!(
            status,
            if turned {
                SourceMaskStatus::Aligned
            } else {
                SourceMaskStatus::AlreadyAligned
            },
            "{}",
            sample.job_id
        );
        for seg in m.segments.iter().filter(|s| s.is_contain) {
            assert_eq!(seg.aligned.is_some(), turned, "{}", sample.job_id);
            if let Some(a) = &seg.aligned {
                let mask = image::open(archive.join(&a.key)).unwrap();
                assert_eq!(
                    [mask.width(), mask.height()],
                    [m.source.width, m.source.height]
                );
            }
        }
        if turned {
            aligned_jobs.push(m);
        }
    }
    let ids: Vec<&str> = aligned_jobs.iter().map(|m| m.job_id.as_str()).collect();
    assert_eq!(ids, ["demo-thumbnail", "demo-panorama", "demo-rotated"]);

    // The report draws the aligned masks: with Kling's own PNGs of those
    // jobs gone, every found segment still has its overlay and no card
    // reports a problem.
    for m in &aligned_jobs {
        for seg in m.segments.iter().filter(|s| s.is_contain) {
            std::fs::remove_file(archive.join(seg.key.as_deref().unwrap())).unwrap();
        }
    }
    let page = out.path().join("again.html");
    worker(&["report", "--archive", dir, "--out", page.to_str().unwrap()]);
    let cards = report_cards(&std::fs::read_to_string(&page).unwrap());
    for m in &aligned_jobs {
        let card = &cards[&m.job_id];
        let found = m.segments.iter().filter(|s| s.is_contain).count();
        assert_eq!(
            card.matches("<img class=\"ov\"").count(),
            found,
            "{}",
            m.job_id
        );
        assert!(!card.contains("class=\"problem\""), "{card}");
    }
}
