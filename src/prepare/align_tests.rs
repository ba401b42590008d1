use super::*;
use crate::prepare::{OutputFormat, Spec, plan};
use image::{DynamicImage, ImageFormat, Luma, LumaA, Rgb, Rgba};
use proptest::prelude::*;

const ENCODE: Transform = Transform::Encode {
    format: OutputFormat::Jpeg,
    quality: Some(90),
};

fn png_of(img: DynamicImage) -> Vec<u8> {
    crate::prepare::testkit::encode(&img, ImageFormat::Png)
}

/// A binary plane of `[w, h]`, 255 where `inside(x, y)` holds for the
/// pixel's centre.
fn shape(w: u32, h: u32, inside: impl Fn(f64, f64) -> bool) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        Luma([if inside(f64::from(x) + 0.5, f64::from(y) + 0.5) {
            255
        } else {
            0
        }])
    })
}

/// What Kling would return for the prepared image of `record`: the shape
/// `inside` (in *source* coordinates) sampled at every prepared pixel's
/// centre; padding is set when `pad_value` says so.
fn prepared_mask(
    record: &TransformRecord,
    inside: impl Fn(f64, f64) -> bool,
    pad_value: u8,
) -> GrayImage {
    let [w, h] = record.output;
    GrayImage::from_fn(w, h, |u, v| {
        Luma([
            match record.to_source(f64::from(u) + 0.5, f64::from(v) + 0.5) {
                Some((x, y)) if inside(x, y) => 255,
                Some(_) => 0,
                None => pad_value,
            },
        ])
    })
}

fn binary(plane: GrayImage) -> Coverage {
    Coverage {
        plane,
        binary: true,
    }
}

fn iou(a: &GrayImage, b: &GrayImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut both, mut any) = (0u64, 0u64);
    for (p, q) in a.pixels().zip(b.pixels()) {
        let (p, q) = (p[0] >= 128, q[0] >= 128);
        both += u64::from(p && q);
        any += u64::from(p || q);
    }
    both as f64 / any.max(1) as f64
}

#[test]
fn only_geometry_needs_alignment() {
    assert!(!needs_alignment(&TransformRecord::identity(640, 480)));
    let reencoded = TransformRecord {
        steps: vec![ENCODE],
        ..TransformRecord::identity(640, 480)
    };
    assert!(!needs_alignment(&reencoded));
    for (w, h, o) in [(640, 480, 3), (200, 150, 1), (2000, 400, 1), (480, 640, 6)] {
        let rec = plan(w, h, o, &Spec::KLING).record([255; 4], ENCODE);
        assert!(needs_alignment(&rec), "{w}x{h} exif {o}");
    }
}

#[test]
fn every_orientation_is_undone_exactly() {
    // An asymmetric mark on the stored grid, turned as `prepare` turns it.
    let stored = shape(7, 4, |x, y| (x < 3.0 && y < 2.0) || (x > 6.0 && y > 3.0));
    for exif in 1..=8u8 {
        let displayed = turn::orient(stored.clone(), exif);
        let rec = TransformRecord {
            source: [7, 4],
            output: [displayed.width(), displayed.height()],
            steps: vec![Transform::Orient { exif }, ENCODE],
        };
        let back = align(binary(displayed), &rec).unwrap();
        assert_eq!(back, stored, "orientation {exif}");
    }
}

#[test]
fn padding_never_reaches_the_source() {
    // 4:1 panorama padded top and bottom; the mask marks all the padding
    // and none of the content.
    let rec = plan(1600, 400, 1, &Spec::KLING).record([255; 4], ENCODE);
    assert!(rec.steps.iter().any(|s| s.op() == "pad"));
    let mask = prepared_mask(&rec, |_, _| false, 255);
    let out = align(binary(mask), &rec).unwrap();
    assert_eq!(out.dimensions(), (1600, 400));
    assert!(out.pixels().all(|p| p[0] == 0), "a padding pixel leaked");
    // And all of the content maps to all of the source.
    let mask = prepared_mask(&rec, |_, _| true, 0);
    let out = align(binary(mask), &rec).unwrap();
    assert!(out.pixels().all(|p| p[0] == 255));
}

#[test]
fn an_upscale_is_undone_and_a_binary_mask_stays_binary() {
    let rec = plan(200, 150, 1, &Spec::KLING).record([255; 4], ENCODE);
    let disc = |x: f64, y: f64| (x - 90.0).powi(2) + (y - 70.0).powi(2) < 45.0f64.powi(2);
    let out = align(binary(prepared_mask(&rec, disc, 0)), &rec).unwrap();
    assert_eq!(out.dimensions(), (200, 150));
    assert!(out.pixels().all(|p| p[0] == 0 || p[0] == 255));
    let want = shape(200, 150, disc);
    assert!(iou(&out, &want) >= 0.98, "{}", iou(&out, &want));
}

#[test]
fn soft_masks_keep_their_levels_without_ringing() {
    // A hard edge from 0 to 200 through a 2x downscale (the source was
    // upscaled) and a 2x upscale (shrunk): no value above 200, none below 0,
    // flat regions keep their level.
    for (from, to) in [([150, 300], [300, 600]), ([600, 400], [300, 200])] {
        let rec = TransformRecord {
            source: from,
            output: to,
            steps: vec![Transform::Resize { from, to }, ENCODE],
        };
        let plane = GrayImage::from_fn(to[0], to[1], |x, _| {
            Luma([if x < to[0] / 3 { 0 } else { 200 }])
        });
        let out = align(
            Coverage {
                plane,
                binary: false,
            },
            &rec,
        )
        .unwrap();
        assert_eq!(out.dimensions(), (from[0], from[1]));
        assert!(out.pixels().all(|p| p[0] <= 200), "overshoot");
        assert_eq!(out.get_pixel(from[0] - 1, 0)[0], 200);
        assert_eq!(out.get_pixel(0, from[1] - 1)[0], 0);
        assert!(
            out.pixels().any(|p| p[0] > 0 && p[0] < 200),
            "edge kept soft"
        );
    }
}

#[test]
fn a_mask_smaller_than_the_prepared_image_is_scaled_first() {
    let rec = plan(200, 150, 1, &Spec::KLING).record([255; 4], ENCODE);
    let [w, h] = rec.output;
    let half = shape(w / 2, h / 2, |x, _| x < f64::from(w) / 4.0);
    let out = align(binary(half), &rec).unwrap();
    assert_eq!(out.dimensions(), (200, 150));
    assert_eq!(out.get_pixel(95, 70)[0], 255);
    assert_eq!(out.get_pixel(105, 70)[0], 0);
}

#[test]
fn coverage_is_the_alpha_or_the_grey_level() {
    let rgba = png_of(DynamicImage::ImageRgba8(image::RgbaImage::from_fn(
        4,
        2,
        |x, _| Rgba([9, 9, 9, [0, 255, 77, 255][x as usize]]),
    )));
    let c = read_coverage(&rgba, 1000).unwrap();
    assert_eq!(c.plane.as_raw(), &[0, 255, 77, 255, 0, 255, 77, 255]);
    assert!(!c.binary);

    let grey = png_of(DynamicImage::ImageLuma8(shape(3, 1, |x, _| x < 1.0)));
    let c = read_coverage(&grey, 1000).unwrap();
    assert_eq!(c.plane.as_raw(), &[255, 0, 0]);
    assert!(c.binary);

    let ga = png_of(DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(
        2,
        1,
        |x, _| LumaA([200, if x == 0 { 255 } else { 0 }]),
    )));
    assert_eq!(read_coverage(&ga, 1000).unwrap().plane.as_raw(), &[255, 0]);

    let rgb = png_of(DynamicImage::ImageRgb8(image::RgbImage::from_fn(
        2,
        1,
        |x, _| Rgb([255 * (x as u8 % 2); 3]),
    )));
    assert_eq!(read_coverage(&rgb, 1000).unwrap().plane.as_raw(), &[0, 255]);
}

#[test]
fn bad_masks_are_errors_with_codes() {
    let e = read_coverage(b"\x89PNG\r\n\x1a\nnot really", 1000).unwrap_err();
    assert_eq!(e.code(), "mask_undecodable");
    let big = png_of(DynamicImage::ImageLuma8(GrayImage::new(40, 30)));
    let e = read_coverage(&big, 1000).unwrap_err();
    assert_eq!(e.code(), "mask_too_large");
    assert_eq!(e.disposition(), Disposition::Permanent);
    let mut cut = big.clone();
    cut.truncate(cut.len() - 20);
    assert!(read_coverage(&cut, 10_000).is_err());
}

#[test]
fn the_png_is_grey_deterministic_and_source_sized() {
    let stored = shape(300, 200, |x, y| x > 50.0 && y < 120.0);
    let rec = TransformRecord {
        source: [300, 200],
        output: [200, 300],
        steps: vec![Transform::Orient { exif: 6 }, ENCODE],
    };
    let kling = png_of(DynamicImage::ImageLuma8(turn::orient(stored.clone(), 6)));
    assert_eq!(png_dimensions(&kling), Some([200, 300]));
    assert_eq!(png_dimensions(b"GIF89a"), None);
    let a = align_png(&kling, &rec, 1 << 20).unwrap();
    assert_eq!(a, align_png(&kling, &rec, 1 << 20).unwrap());
    assert_eq!((a.width, a.height), (300, 200));
    let back = image::load_from_memory(&a.png).unwrap();
    assert_eq!(back.color(), image::ColorType::L8);
    assert_eq!(back.into_luma8(), stored);
}

#[test]
fn working_pixels_counts_the_two_largest_neighbouring_planes() {
    let rec = plan(200, 150, 1, &Spec::KLING).record([255; 4], ENCODE);
    // 400x300 mask + 400x300 after the (no-op) pad/encode, or + 200x150.
    assert_eq!(working_pixels(&rec, [400, 300]), 2 * 120_000);
    let rec = TransformRecord::identity(10, 10);
    assert_eq!(working_pixels(&rec, [10, 10]), 200);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_shape_comes_back_where_it_was(
        w in 20u32..=700, h in 20u32..=700, o in 1u8..=8,
        fx in 0.2f64..0.4, fy in 0.2f64..0.4, fr in 0.15f64..0.3,
    ) {
        let rec = plan(w, h, o, &Spec::KLING).record([255; 4], ENCODE);
        let (cx, cy) = (fx * f64::from(w) + 0.3 * f64::from(w), fy * f64::from(h) + 0.3 * f64::from(h));
        let r = fr * f64::from(w.min(h));
        let inside = |x: f64, y: f64| (x - cx).powi(2) + (y - cy).powi(2) < r * r;
        let out = align(binary(prepared_mask(&rec, inside, 255)), &rec).unwrap();
        prop_assert_eq!(out.dimensions(), (w, h));
        prop_assert!(out.pixels().all(|p| p[0] == 0 || p[0] == 255));
        // Away from the edge (a source pixel and a half), every pixel is right.
        for (x, y, p) in out.enumerate_pixels() {
            let d = ((f64::from(x) + 0.5 - cx).powi(2) + (f64::from(y) + 0.5 - cy).powi(2)).sqrt() - r;
            if d.abs() > 1.5 {
                prop_assert_eq!(p[0] == 255, d < 0.0, "pixel ({}, {}) at {:.2} from the edge", x, y, d);
            }
        }
    }
}
