//! Deterministic, plausible segmentation masks for the simulator.
//!
//! The subject is whatever differs from the border colour; head, face and
//! cloth are regions of the subject's bounding box. Output PNGs are the
//! input's size, RGBA, transparent outside the mask, and byte-identical for
//! identical input bytes (no randomness, no timestamps).

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, RgbaImage};

pub const TYPES: [&str; 4] = ["object_seg", "head_seg", "face_seg", "cloth_seg"];

/// One mask per entry of [`TYPES`]; `None` when not found.
pub fn segment(img: &RgbaImage, sha: &[u8; 32]) -> [Option<Vec<u8>>; 4] {
    let (w, h) = img.dimensions();
    let bg = border_mean(img);
    let is_obj = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        let d: i32 = (0..3).map(|i| (i32::from(p[i]) - bg[i]).abs()).sum();
        d > 60
    };
    // Bounding box of the subject.
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0u32, 0u32);
    for y in 0..h {
        for x in 0..w {
            if is_obj(x, y) {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
    }
    if x0 > x1 {
        return [None, None, None, None];
    }
    let bh = f64::from(y1 - y0 + 1);
    let bw = f64::from(x1 - x0 + 1);
    let head_end = f64::from(y0) + bh * 0.3;
    let cloth_start = f64::from(y0) + bh * 0.4;
    let (fcx, fcy) = (f64::from(x0) + bw / 2.0, f64::from(y0) + bh * 0.15);
    let (frx, fry) = (bw * 0.2, bh * 0.12);
    let regions: [&dyn Fn(u32, u32) -> bool; 4] = [
        &|_, _| true,
        &|_, y| f64::from(y) < head_end,
        &|x, y| ((f64::from(x) - fcx) / frx).powi(2) + ((f64::from(y) - fcy) / fry).powi(2) <= 1.0,
        &|_, y| f64::from(y) >= cloth_start,
    ];
    let absent = [false, false, sha[0] % 3 == 0, sha[1] % 4 == 0];
    let mut out: [Option<Vec<u8>>; 4] = [None, None, None, None];
    for (i, region) in regions.iter().enumerate() {
        if absent[i] {
            continue;
        }
        let mut any = false;
        let mask = RgbaImage::from_fn(w, h, |x, y| {
            if is_obj(x, y) && region(x, y) {
                any = true;
                *img.get_pixel(x, y)
            } else {
                image::Rgba([0, 0, 0, 0])
            }
        });
        if any {
            out[i] = encode_png(&mask);
        }
    }
    out
}

fn border_mean(img: &RgbaImage) -> [i32; 3] {
    let (w, h) = img.dimensions();
    let mut sum = [0u64; 3];
    let mut n = 0u64;
    let mut add = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        for i in 0..3 {
            sum[i] += u64::from(p[i]);
        }
        n += 1;
    };
    for x in 0..w {
        add(x, 0);
        add(x, h - 1);
    }
    for y in 0..h {
        add(0, y);
        add(w - 1, y);
    }
    let n = n.max(1);
    [
        (sum[0] / n) as i32,
        (sum[1] / n) as i32,
        (sum[2] / n) as i32,
    ]
}

fn encode_png(img: &RgbaImage) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgba8,
        )
        .ok()?;
    Some(out)
}
