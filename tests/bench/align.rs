//! What aligned masks cost a job, beside the job's own preparation, for a
//! 12 MP phone photo stored sideways (4032x3024 JPEG 4:2:0, EXIF 6: Kling
//! sees it turned upright, so each of its four masks must be turned back).
//! Run it with `bash tests/bench/align.sh`; figures in `docs/benchmarks.md`.
//!
//! The masks are what Kling returns: RGBA cut-outs of the prepared image
//! (object, head, face, cloth), PNG. "Aligned masks" is what the pipeline
//! does per job: for each mask in turn, `prepare::align::align_png`
//! (coverage read row by row, turned back, greyscale PNG) and its SHA-256.
//! Times are medians of several runs, the two steps interleaved so that
//! neighbours' noise falls on both. Peak memory is measured per step in a
//! fresh process (VmHWM after minus before), as `tests/bench/prepare.rs`
//! does for preparation.
//!
//! Modes: no argument runs everything; `rss prepare|align <dir>` runs one
//! step on the inputs in `<dir>` and prints `rss_kb <delta>`.

#[path = "../common/rss.rs"]
mod memory;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageEncoder, RgbImage};
use kling_archiver::archive::Sha256;
use kling_archiver::prepare::{self, Limits, Spec, TransformRecord, align};

const RUNS: usize = 7;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.as_slice() {
        ["rss", step, dir] => rss(step, Path::new(dir)),
        _ if benching => run_all(),
        _ => println!("the aligned-mask benchmark runs with `bash tests/bench/align.sh`"),
    }
}

/// The inputs of one job: the source, and Kling's masks with the record.
struct Inputs {
    source: Bytes,
    record: TransformRecord,
    masks: Vec<Vec<u8>>,
}

fn load(dir: &Path) -> Inputs {
    let read = |name: &str| std::fs::read(dir.join(name)).expect("read input");
    let record = serde_json::from_slice(&read("record.json")).expect("record");
    Inputs {
        source: Bytes::from(read("source.jpg")),
        record,
        masks: (0..4).map(|i| read(&format!("mask{i}.png"))).collect(),
    }
}

fn prepare_job(source: &Bytes) -> prepare::Prepared {
    prepare::prepare(source.clone(), &Spec::KLING, &Limits::default()).expect("prepare")
}

/// What the pipeline does per job: one mask at a time.
fn align_job(record: &TransformRecord, masks: &[Vec<u8>]) -> u64 {
    masks
        .iter()
        .map(|png| {
            let a = align::align_png(png, record, Limits::default().max_pixels).expect("align");
            std::hint::black_box(Sha256::of(&a.png));
            a.png.len() as u64
        })
        .sum()
}

fn rss(step: &str, dir: &Path) {
    let inputs = load(dir);
    let before = memory::vm_hwm_kb();
    match step {
        "prepare" => {
            std::hint::black_box(prepare_job(&inputs.source));
        }
        _ => {
            std::hint::black_box(align_job(&inputs.record, &inputs.masks));
        }
    }
    println!("rss_kb {}", memory::vm_hwm_kb().saturating_sub(before));
}

/// A phone-photo-like picture: the demo scene with fine texture.
fn photo(w: u32, h: u32) -> RgbImage {
    let mut img = kling_archiver::demo::scene(w, h, 3);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let n = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 27;
        for c in p.0.iter_mut() {
            *c = c.saturating_add(n as u8);
        }
    }
    img
}

/// Kling's four cut-outs of the prepared image.
fn kling_masks(prepared: &[u8]) -> Vec<Vec<u8>> {
    let img = image::load_from_memory(prepared)
        .expect("decode")
        .into_rgb8();
    let (w, h) = (f64::from(img.width()), f64::from(img.height()));
    let regions: [&dyn Fn(f64, f64) -> bool; 4] = [
        &|x, y| ((x - 0.5 * w) / (0.3 * w)).powi(2) + ((y - 0.6 * h) / (0.35 * h)).powi(2) < 1.0,
        &|x, y| x > 0.35 * w && x < 0.65 * w && y > 0.1 * h && y < 0.35 * h,
        &|x, y| ((x - 0.5 * w) / (0.1 * w)).powi(2) + ((y - 0.25 * h) / (0.08 * h)).powi(2) < 1.0,
        &|x, y| x > 0.2 * w && x < 0.8 * w && y > 0.45 * h && y < 0.9 * h,
    ];
    regions
        .iter()
        .map(|inside| {
            let mut rgba = Vec::with_capacity(img.len() / 3 * 4);
            for (x, y, p) in img.enumerate_pixels() {
                if inside(f64::from(x), f64::from(y)) {
                    rgba.extend_from_slice(&[p[0], p[1], p[2], 255]);
                } else {
                    rgba.extend_from_slice(&[0; 4]);
                }
            }
            let mut out = Vec::new();
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Up)
                .write_image(
                    &rgba,
                    img.width(),
                    img.height(),
                    image::ExtendedColorType::Rgba8,
                )
                .expect("encode mask");
            out
        })
        .collect()
}

fn write_inputs(dir: &Path) -> Inputs {
    let stored = DynamicImage::ImageRgb8(photo(4032, 3024));
    let mut jpeg = Vec::new();
    stored
        .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut jpeg, 90,
        ))
        .expect("encode");
    let source = Bytes::from(kling_archiver::demo::with_exif_orientation(&jpeg, 6));
    let prepared = prepare_job(&source);
    let masks = kling_masks(&prepared.bytes);
    std::fs::write(dir.join("source.jpg"), &source).expect("write");
    std::fs::write(
        dir.join("record.json"),
        serde_json::to_vec(&prepared.transforms).expect("json"),
    )
    .expect("write");
    for (i, m) in masks.iter().enumerate() {
        std::fs::write(dir.join(format!("mask{i}.png")), m).expect("write");
    }
    Inputs {
        source,
        record: prepared.transforms,
        masks,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_in_fresh_process(step: &str, dir: &Path) -> f64 {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args(["rss", step])
        .arg(dir)
        .output()
        .expect("run child");
    let text = String::from_utf8_lossy(&out.stdout);
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rss_kb ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("child said {text:?}"));
    kb / 1024.0
}

fn run_all() {
    let dir: PathBuf = tempfile::tempdir().expect("tmp").keep();
    let inputs = write_inputs(&dir);
    let bytes: Vec<usize> = inputs.masks.iter().map(Vec::len).collect();
    let (mut prep_ms, mut align_ms) = (Vec::new(), Vec::new());
    let mut aligned_bytes = 0;
    // One warm-up of each, then interleaved runs.
    for run in 0..=RUNS {
        let t = Instant::now();
        std::hint::black_box(prepare_job(&inputs.source));
        let p = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        aligned_bytes = align_job(&inputs.record, &inputs.masks);
        let a = t.elapsed().as_secs_f64() * 1e3;
        if run > 0 {
            prep_ms.push(p);
            align_ms.push(a);
        }
    }
    let (p, a) = (median(prep_ms), median(align_ms));
    let (prss, arss) = (
        rss_in_fresh_process("prepare", &dir),
        rss_in_fresh_process("align", &dir),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let steps: Vec<&str> = inputs.record.steps.iter().map(|s| s.op()).collect();
    println!(
        "12 MP phone photo: 4032x3024 JPEG, EXIF 6 ({}); Kling's 4 masks {:?} bytes; aligned PNGs {} bytes in all",
        steps.join(" -> "),
        bytes,
        aligned_bytes
    );
    println!("| per job | ms (median of {RUNS}) | peak RSS over start |");
    println!("| --- | ---: | ---: |");
    println!("| preparation | {p:.0} | {prss:.1} MB |");
    println!("| aligned masks (4, one at a time) | {a:.0} | {arss:.1} MB |");
    println!(
        "aligned masks / preparation: time {:.2}x, peak RSS {:.2}x",
        a / p,
        arss / prss
    );
}
