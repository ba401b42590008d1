//! `prepare` against libvips, in one run, on the same inputs, single
//! threaded on both sides. Run it with `bash tests/bench/prepare.sh` (which
//! installs libvips and pyvips when missing); it prints a table of ratios
//! (libvips time / our time: above 1 means we are faster) and writes it to
//! `target/bench-prepare.md`.
//!
//! For each case our side runs the real `prepare` (probe, checks, decode,
//! orient, resize, pad, encode, and the final header check). The libvips
//! side is handed the transform record our side produced and performs the
//! same steps with the same settings (Lanczos3, white padding, JPEG quality
//! and 4:2:0 chroma subsampling, PNG deflate level 6), in process through
//! pyvips with `VIPS_CONCURRENCY=1` and its operation cache off. The two
//! sides' runs interleave, so that noise from neighbours on a shared
//! machine falls on both: times are medians of several runs after a
//! warm-up, and the ratio is the median of the neighbouring pairs' ratios.
//! Peak memory is measured per job in a fresh process on each side (VmHWM
//! after the job minus before).
//!
//! Modes: no argument runs everything; `rss <file>` prepares one file in
//! this process and prints `rss_kb <delta>` (used by the RSS comparison);
//! `codec` times the JPEG codec alone on the 12 MP 4:2:0 phone frame
//! (decode to planes, encode planes, decode to RGB, encode RGB) and says
//! whether this build has SIMD: how docs/dependencies.md compares builds;
//! `machine` is the whole-machine figure: 12 MP phone photos that need
//! turning, prepared on every core at once (one job per core at a time),
//! in jobs/s, against libvips doing the same on as many processes (run
//! unpinned, after the single-threaded table).

#[path = "../common/rss.rs"]
mod memory;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, RgbImage};
use kling_archiver::prepare::{self, Limits, Spec, Transform};

const RUNS: usize = 9;
/// The 12 MP cases whose peak memory per job is compared.
const RSS_CASES: [&str; 4] = ["jpeg_12mp_phone", "jpeg_12mp", "jpeg_12mp_big", "png_12mp"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, and then it only says how to run it.
    let benching = args.iter().any(|a| a == "--bench");
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.as_slice() {
        ["rss", file] => rss_job(Path::new(file)),
        ["codec"] => codec_only(),
        ["machine"] => machine(),
        _ if benching => run_all(),
        _ => println!("the prepare benchmark runs with `bash tests/bench/prepare.sh`"),
    }
}

fn rss_job(file: &Path) {
    let data = Bytes::from(std::fs::read(file).expect("read input"));
    let before = memory::vm_hwm_kb();
    let out = prepare::prepare(data, &Spec::KLING, &Limits::default()).expect("prepare");
    let after = memory::vm_hwm_kb();
    std::hint::black_box(&out);
    println!("rss_kb {}", after.saturating_sub(before));
}

/// A photo-like picture: smooth gradients, edges and fine texture, so
/// encoders and resamplers do real work (flat test cards flatter both).
fn photo(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let grain = (state % 24) as i32 - 12;
        let fx = x as f32 / w as f32;
        let fy = y as f32 / h as f32;
        let ring = (((fx - 0.5).powi(2) + (fy - 0.4).powi(2)).sqrt() * 40.0).sin();
        let base = [
            (200.0 * fx + 30.0 * ring) as i32,
            (180.0 * fy + 40.0 * ring) as i32,
            (120.0 + 60.0 * (fx * 9.0).sin() * (fy * 7.0).cos()) as i32,
        ];
        image::Rgb(base.map(|c| (c + grain).clamp(0, 255) as u8))
    })
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn jpeg_q(img: &RgbImage, q: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, q)
        .encode_image(img)
        .expect("jpeg");
    out
}

/// 4:2:0 chroma, as phones write (`image`'s encoder writes 4:4:4).
fn jpeg_420(img: &RgbImage, q: u8) -> Vec<u8> {
    kling_archiver::prepare::jpeg::encode_rgb(img, q).expect("jpeg")
}

struct Case {
    name: &'static str,
    what: &'static str,
    bytes: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let twelve = photo(4000, 3000, 1);
    let rotated = kling_archiver::demo::with_exif_orientation(&jpeg_q(&twelve, 92), 6);
    // The 12 MP frame of most phones: 4032x3024, 4:2:0 chroma.
    let phone =
        kling_archiver::demo::with_exif_orientation(&jpeg_420(&photo(4032, 3024, 2), 92), 6);
    // A 12 MP PNG over 20 MB: photo-like content with more grain.
    let noisy = RgbImage::from_fn(4000, 3000, {
        let mut s = 7u32;
        move |x, y| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let p = twelve.get_pixel(x, y).0;
            image::Rgb(p.map(|c| c.wrapping_add((s % 61) as u8)))
        }
    });
    vec![
        Case {
            name: "jpeg_12mp_phone",
            what: "4032x3024 JPEG 4:2:0, EXIF 6 (phone photo): decode, rotate, encode",
            bytes: phone,
        },
        Case {
            name: "jpeg_12mp",
            what: "4000x3000 JPEG 4:4:4, EXIF 6: decode, rotate, encode",
            bytes: rotated,
        },
        Case {
            name: "jpeg_12mp_big",
            what: "12 MP JPEG 4:4:4 over 10 MB: decode, re-encode, downscale if needed",
            bytes: jpeg_q(&noisy, 100),
        },
        Case {
            name: "png_12mp",
            what: "12 MP PNG over 20 MB: decode, encode JPEG",
            bytes: encode(&DynamicImage::ImageRgb8(noisy), ImageFormat::Png),
        },
        Case {
            name: "panorama",
            what: "6000x1500 JPEG 4:4:4 (4:1): decode, pad to 2.5:1, encode",
            bytes: jpeg_q(&photo(6000, 1500, 3), 90),
        },
        Case {
            name: "thumbnail",
            what: "200x150 JPEG: decode, upscale to 400x300, encode",
            bytes: jpeg_q(&photo(200, 150, 4), 90),
        },
    ]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One run of our `prepare` on `data`, timed.
fn ours(data: &Bytes) -> (Duration, prepare::Prepared) {
    let t = Instant::now();
    let out = prepare::prepare(data.clone(), &Spec::KLING, &Limits::default()).expect("prepare");
    (t.elapsed(), out)
}

/// The steps for the libvips side, from our transform record.
fn vips_plan(p: &prepare::Prepared) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = p
        .transforms
        .steps
        .iter()
        .map(|s| match *s {
            Transform::Orient { exif } => serde_json::json!({"op": "orient", "exif": exif}),
            Transform::Resize { from, to } => {
                serde_json::json!({"op": "resize", "from": from, "to": to})
            }
            Transform::Pad {
                left,
                top,
                right,
                bottom,
                color,
            } => serde_json::json!({"op": "pad", "left": left, "top": top,
                "width": p.width, "height": p.height, "right": right, "bottom": bottom, "color": color}),
            Transform::Encode { format, quality } => {
                serde_json::json!({"op": "encode", "format": format.extension(), "quality": quality})
            }
        })
        .collect();
    serde_json::json!(steps)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn vips_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bench/vips_side.py")
}

/// The libvips side, a child process that runs one timed job of a named
/// case per request, so that its runs interleave with ours.
struct Vips {
    child: Child,
    requests: ChildStdin,
    answers: BufReader<ChildStdout>,
}

impl Vips {
    fn start(plan_file: &Path) -> Vips {
        let mut child = Command::new(python())
            .arg(vips_script())
            .arg("serve")
            .arg(plan_file)
            .env("VIPS_CONCURRENCY", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect(
                "run python3 tests/bench/vips_side.py (bash tests/bench/prepare.sh installs pyvips)",
            );
        let requests = child.stdin.take().expect("piped stdin");
        let mut vips = Vips {
            answers: BufReader::new(child.stdout.take().expect("piped stdout")),
            requests,
            child,
        };
        assert_eq!(vips.answer(), "ready", "libvips side failed to start");
        vips
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        self.answers
            .read_line(&mut line)
            .expect("read the libvips side");
        line.trim().to_owned()
    }

    /// One libvips run of case `name`, as timed inside its process.
    fn time(&mut self, name: &str) -> Duration {
        writeln!(self.requests, "{name}").expect("ask the libvips side");
        let answer = self.answer();
        let ms: f64 = answer.parse().unwrap_or_else(|_| {
            panic!("libvips side answered {answer:?} for {name} (see its stderr)")
        });
        Duration::from_secs_f64(ms / 1e3)
    }
}

impl Drop for Vips {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// libvips's per-job peak RSS for each of [`RSS_CASES`] (each in a fresh
/// process), and its version.
fn vips_rss(plan_file: &Path) -> serde_json::Value {
    let out = Command::new(python())
        .arg(vips_script())
        .arg("rss")
        .arg(plan_file)
        .env("VIPS_CONCURRENCY", "1")
        .output()
        .expect("run python3 tests/bench/vips_side.py rss");
    assert!(
        out.status.success(),
        "libvips side failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("libvips side prints JSON")
}

fn our_rss_kb(file: &Path) -> u64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["rss", file.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("rss_kb ")
        .and_then(|v| v.parse().ok())
        .expect("rss mode prints rss_kb")
}

/// The median of [`RUNS`] timed runs of `f`.
fn median_time(f: &dyn Fn()) -> Duration {
    median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

/// `codec` mode (module docs).
fn codec_only() {
    use kling_archiver::prepare::jpeg;
    let (w, h) = (4032, 3024);
    let bytes = jpeg_420(&photo(w, h, 2), 92);
    let planes = jpeg::decode_planes(&bytes, [w, h])
        .expect("decode")
        .expect("planes");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let dp = median_time(&|| drop(jpeg::decode_planes(&bytes, [w, h])));
    let ep = median_time(&|| drop(jpeg::encode_planes(&planes, 90)));
    let (dr, er) = codec_split(&bytes);
    println!(
        "codec, 12 MP 4:2:0, one thread, jpeg_simd={}: decode planes {:.1} ms, encode planes (q90) {:.1} ms, decode RGB {:.1} ms, encode RGB (q90 4:2:0) {:.1} ms",
        kling_archiver::build_info::JPEG_SIMD,
        ms(dp),
        ms(ep),
        ms(dr),
        ms(er)
    );
}

/// Median times to decode `bytes` to RGB (libjpeg for JPEG, `image`
/// for the rest) and to encode that frame as JPEG q90 4:2:0.
fn codec_split(bytes: &[u8]) -> (Duration, Duration) {
    let decode = || {
        if bytes.starts_with(&[0xFF, 0xD8]) {
            kling_archiver::prepare::jpeg::decode_rgb_any(bytes).expect("decode")
        } else {
            image::load_from_memory(bytes).expect("decode").into_rgb8()
        }
    };
    let frame = decode();
    let encode = || jpeg_420(&frame, 90);
    (
        median_time(&|| {
            std::hint::black_box(decode());
        }),
        median_time(&|| {
            std::hint::black_box(encode());
        }),
    )
}

/// Jobs per core in the whole-machine figure.
const MACHINE_JOBS_PER_CORE: usize = 6;

/// Jobs/s on the whole machine for the phone photo (EXIF 6: decode,
/// rotate, encode): ours on one thread per core, libvips on one process per
/// core; the two sides run one after the other, twice, in alternating
/// order, and each side's better run counts.
fn machine() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let phone = cases()
        .into_iter()
        .find(|c| c.name == "jpeg_12mp_phone")
        .expect("the phone case");
    let input = dir.path().join("phone.in");
    std::fs::write(&input, &phone.bytes).unwrap();
    let data = Bytes::from(phone.bytes);
    let (_, out) = ours(&data);
    let plan_file = dir.path().join("plans.json");
    let plans = serde_json::json!({"cases": [{"name": phone.name, "input": input, "steps": vips_plan(&out)}], "rss_cases": []});
    std::fs::write(&plan_file, plans.to_string()).unwrap();
    let jobs = cores * MACHINE_JOBS_PER_CORE;
    let run_ours = || {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..cores {
                s.spawn(|| {
                    for _ in 0..MACHINE_JOBS_PER_CORE {
                        std::hint::black_box(ours(&data));
                    }
                });
            }
        });
        jobs as f64 / t.elapsed().as_secs_f64()
    };
    let mut peers: Vec<Vips> = (0..cores).map(|_| Vips::start(&plan_file)).collect();
    for v in &mut peers {
        v.time(phone.name); // warm-up
    }
    let mut run_theirs = || {
        let t = Instant::now();
        std::thread::scope(|s| {
            for v in peers.iter_mut() {
                s.spawn(move || {
                    for _ in 0..MACHINE_JOBS_PER_CORE {
                        v.time(phone.name);
                    }
                });
            }
        });
        jobs as f64 / t.elapsed().as_secs_f64()
    };
    let (a, b) = (run_ours(), run_theirs());
    let (d, c) = (run_theirs(), run_ours());
    let (mine, theirs) = (a.max(c), b.max(d));
    let line = format!(
        "whole machine, {cores} cores, {jobs} 4032x3024 phone photos (EXIF 6: decode, rotate, encode), one job per core at a time: ours {mine:.2} jobs/s, libvips {theirs:.2} jobs/s, ratio ours / libvips **{:.2}×** (jpeg_simd={})",
        mine / theirs,
        kling_archiver::build_info::JPEG_SIMD
    );
    println!("{line}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-prepare.md");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .unwrap();
    writeln!(f, "\n{line}").unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    line(format!(
        "prepare vs libvips, single-threaded, median of {RUNS} interleaved runs after a warm-up"
    ));
    line(String::new());

    // Our warm-up run of each case gives the plan the libvips side follows.
    let cases = cases();
    let mut plans = Vec::new();
    for c in &cases {
        let input = dir.path().join(format!("{}.in", c.name));
        std::fs::write(&input, &c.bytes).unwrap();
        let (_, out) = ours(&Bytes::copy_from_slice(&c.bytes));
        plans.push(serde_json::json!({
            "name": c.name, "input": input, "steps": vips_plan(&out),
        }));
        eprintln!(
            "{}: {} -> {}x{} {} B, {}",
            c.name,
            c.bytes.len(),
            out.width,
            out.height,
            out.bytes.len(),
            kling_archiver::report::describe_transforms(&out.transforms.steps)
        );
    }
    let plan_file = dir.path().join("plans.json");
    let plans = serde_json::json!({"cases": plans, "rss_cases": RSS_CASES});
    std::fs::write(&plan_file, plans.to_string()).unwrap();

    // Runs alternate between the sides (and which goes first), so that a
    // burst of noise from a neighbour on this shared machine falls on both.
    let mut vips = Vips::start(&plan_file);
    let mut times = Vec::new();
    for c in &cases {
        let data = Bytes::copy_from_slice(&c.bytes);
        vips.time(c.name); // its warm-up
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            if run % 2 == 0 {
                mine.push(ours(&data).0);
                theirs.push(vips.time(c.name));
            } else {
                theirs.push(vips.time(c.name));
                mine.push(ours(&data).0);
            }
        }
        // The ratio is the median of the ratios of neighbouring runs, which
        // a slow drift in the machine's speed leaves alone.
        let mut ratios: Vec<f64> = mine
            .iter()
            .zip(&theirs)
            .map(|(m, t)| t.as_secs_f64() / m.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        times.push((ms(median(mine)), ms(median(theirs)), ratio));
    }
    drop(vips);
    let v = vips_rss(&plan_file);

    line(
        "| case | input | ours ms | libvips ms | ratio (libvips / ours, median of the run pairs) |"
            .into(),
    );
    line("| --- | --- | ---: | ---: | ---: |".into());
    for (c, (ours, theirs, ratio)) in cases.iter().zip(&times) {
        line(format!(
            "| {} | {} ({:.1} MB) | {ours:.1} | {theirs:.1} | **{ratio:.2}×** |",
            c.name,
            c.what,
            c.bytes.len() as f64 / 1e6,
        ));
    }

    // Where our time goes in the two cases furthest from their goals: the
    // codec calls alone, outside `prepare`.
    line(String::new());
    for c in cases
        .iter()
        .filter(|c| ["png_12mp", "jpeg_12mp_big"].contains(&c.name))
    {
        let (decode, encode) = codec_split(&c.bytes);
        line(format!(
            "{}: decode alone {:.1} ms, JPEG q90 4:2:0 encode of the frame alone {:.1} ms",
            c.name,
            ms(decode),
            ms(encode)
        ));
    }

    // Probe: header only, whatever the file size.
    line(String::new());
    for c in cases
        .iter()
        .filter(|c| ["png_12mp", "jpeg_12mp_big", "thumbnail"].contains(&c.name))
    {
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(prepare::probe(std::hint::black_box(&c.bytes)).unwrap());
        }
        line(format!(
            "probe {}: {:.1} µs for a {:.1} MB file",
            c.name,
            t.elapsed().as_secs_f64() * 1e6 / f64::from(n),
            c.bytes.len() as f64 / 1e6
        ));
    }

    // Passthrough: an in-spec 12 MP JPEG; prepare plus the SHA-256 the
    // pipeline takes of every source.
    let in_spec = jpeg_q(&photo(4000, 3000, 9), 85);
    let data = Bytes::from(in_spec);
    let mb = data.len() as f64 / 1e6;
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let out = prepare::prepare(data.clone(), &Spec::KLING, &Limits::default()).unwrap();
        assert!(out.is_passthrough());
        std::hint::black_box(kling_archiver::archive::Sha256::of(&out.bytes));
        times.push(t.elapsed());
    }
    let t = median(times);
    line(format!(
        "passthrough (in-spec {mb:.1} MB JPEG, prepare + sha256): {:.3} ms, {:.3} ms per MB",
        ms(t),
        ms(t) / mb
    ));

    // Peak memory of one 12 MP job, each side in a fresh process.
    for name in RSS_CASES {
        let ours_kb = our_rss_kb(&dir.path().join(format!("{name}.in")));
        let theirs_kb = v["rss_kb"][name].as_f64().unwrap_or(f64::NAN);
        line(format!(
            "peak RSS of one {name} job: ours {:.1} MB, libvips {:.1} MB, ratio ours / libvips {:.2}",
            ours_kb as f64 / 1024.0,
            theirs_kb / 1024.0,
            ours_kb as f64 / theirs_kb
        ));
    }
    line(format!("libvips {}", v["version"].as_str().unwrap_or("?")));

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-prepare.md");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(report.as_bytes()).unwrap();
    eprintln!("written to {}", path.display());
}
