//! End-to-end tests of `prepare` on images generated in code.

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use proptest::prelude::*;

use super::testkit::*;
use super::*;

fn run(data: Vec<u8>) -> Result<Prepared, PrepareError> {
    prepare(Bytes::from(data), &Spec::KLING, &Limits::default())
}

/// The promise of `prepare`: the output is in spec, its record matches it,
/// and it decodes to the advertised size.
fn assert_in_spec(out: &Prepared) -> DynamicImage {
    let p = probe(&out.bytes).unwrap();
    assert_eq!(check(&p, &Spec::KLING), vec![], "{out:?}");
    assert_eq!([p.width, p.height], [out.width, out.height]);
    assert_eq!(out.transforms.output, [out.width, out.height]);
    assert_eq!(out.transforms.source, [out.source.width, out.source.height]);
    if !out.is_passthrough() {
        assert!(!out.violations.is_empty());
        let last = out.transforms.steps.last().unwrap();
        assert!(matches!(last, Transform::Encode { format, .. } if *format == out.format));
    }
    let img = image::load_from_memory(&out.bytes).unwrap();
    assert_eq!((img.width(), img.height()), (out.width, out.height));
    img
}

#[test]
fn in_spec_jpeg_and_png_pass_through_untouched() {
    for (format, expect) in [
        (ImageFormat::Jpeg, OutputFormat::Jpeg),
        (ImageFormat::Png, OutputFormat::Png),
    ] {
        let data = Bytes::from(encode(&gradient(640, 480), format));
        let out = prepare(data.clone(), &Spec::KLING, &Limits::default()).unwrap();
        assert!(out.is_passthrough());
        assert_eq!(out.bytes.as_ptr(), data.as_ptr(), "same buffer, no copy");
        assert_eq!(out.bytes, data);
        assert_eq!((out.format, out.width, out.height), (expect, 640, 480));
        assert!(out.violations.is_empty());
        assert_eq!(out.transforms, TransformRecord::identity(640, 480));
    }
}

#[test]
fn small_image_is_upscaled_into_spec() {
    let out = run(encode(&gradient(200, 150), ImageFormat::Jpeg)).unwrap();
    assert_in_spec(&out);
    assert_eq!(
        (out.format, out.width, out.height),
        (OutputFormat::Jpeg, 400, 300)
    );
    assert_eq!(
        out.violations,
        vec![Violation::TooSmall {
            width: 200,
            height: 150,
            min: 300
        }]
    );
    assert_eq!(
        out.transforms.steps,
        vec![
            Transform::Resize {
                from: [200, 150],
                to: [400, 300]
            },
            Transform::Encode {
                format: OutputFormat::Jpeg,
                quality: Some(90)
            },
        ]
    );
}

#[test]
fn panorama_is_padded_not_cropped() {
    let src = RgbImage::from_fn(2000, 400, |x, _| {
        if x < 1000 {
            Rgb([200, 20, 20])
        } else {
            Rgb([20, 20, 200])
        }
    });
    let out = run(encode(&DynamicImage::ImageRgb8(src), ImageFormat::Png)).unwrap();
    let img = assert_in_spec(&out).into_rgb8();
    assert_eq!(
        (out.format, out.width, out.height),
        (OutputFormat::Jpeg, 2000, 800)
    );
    let rec = &out.transforms;
    // Every source pixel is in the output: the source corners map inside it.
    for (x, y) in [(0.0, 0.0), (2000.0, 0.0), (0.0, 400.0), (2000.0, 400.0)] {
        let (u, v) = rec.to_prepared(x, y);
        assert!(
            (0.0..=2000.0).contains(&u) && (200.0..=600.0).contains(&v),
            "({x},{y}) -> ({u},{v})"
        );
        assert_eq!(rec.to_source(u, v), Some((x, y)));
    }
    // Padding above and below maps to nothing and is white.
    for (u, v) in [(10.5, 10.5), (1990.5, 790.5), (1000.5, 199.5)] {
        assert_eq!(rec.to_source(u, v), None);
        let px = img.get_pixel(u as u32, v as u32);
        assert!(px.0.iter().all(|&c| c > 245), "padding {px:?}");
    }
    let px = img.get_pixel(100, 400);
    assert!(px[0] > 180 && px[2] < 60, "content {px:?}");
}

#[test]
fn absurd_strip_is_scaled_down_not_padded_into_a_huge_canvas() {
    let out = run(encode(&gradient(30_000, 2), ImageFormat::Png)).unwrap();
    assert_in_spec(&out);
    let pixels = u64::from(out.width) * u64::from(out.height);
    assert!(pixels <= 2 * 300 * 750, "{out:?}");
    let (x, y) = out
        .transforms
        .to_source(f64::from(out.width), f64::from(out.height) / 2.0)
        .unwrap();
    assert!(
        (x - 30_000.0).abs() < 1e-6 && (0.0..=2.0).contains(&y),
        "right edge maps to the source's"
    );
}

#[test]
fn other_formats_are_converted_into_spec() {
    for format in [
        ImageFormat::WebP,
        ImageFormat::Gif,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
    ] {
        let out = run(encode(&gradient(640, 480), format)).unwrap();
        assert_in_spec(&out);
        assert_eq!((out.width, out.height), (640, 480), "{format:?}");
        assert!(
            matches!(out.violations[..], [Violation::Format { .. }]),
            "{format:?}"
        );
    }
}

#[test]
fn transparency_stays_png_with_transparent_padding() {
    let src = RgbaImage::from_fn(1000, 200, |x, _| {
        Rgba([10, 200, 10, if x < 500 { 255 } else { 0 }])
    });
    let out = run(encode(&DynamicImage::ImageRgba8(src), ImageFormat::Png)).unwrap();
    let img = assert_in_spec(&out).into_rgba8();
    assert_eq!(
        (out.format, out.width, out.height),
        (OutputFormat::Png, 1000, 400)
    );
    assert!(out.transforms.steps.contains(&Transform::Pad {
        left: 0,
        top: 100,
        right: 0,
        bottom: 100,
        color: [0, 0, 0, 0]
    }));
    assert_eq!(img.get_pixel(5, 5).0, [0, 0, 0, 0]);
    assert_eq!(img.get_pixel(5, 150).0, [10, 200, 10, 255]);
    assert_eq!(img.get_pixel(900, 150)[3], 0);
}

#[test]
fn sixteen_bit_png_comes_out_with_correct_8_bit_colours() {
    let colours: [[u16; 3]; 4] = [
        [0xFFFF, 0, 0],
        [0x8080, 0x4040, 0x1234],
        [0, 0xFFFF, 0x0101],
        [0xC0C0, 0xC0C0, 0xC0C0],
    ];
    let src = image::ImageBuffer::<Rgb<u16>, _>::from_fn(100, 100, |x, y| {
        Rgb(colours[(x / 50 + 2 * (y / 50)) as usize])
    });
    let out = run(encode(&DynamicImage::ImageRgb16(src), ImageFormat::Png)).unwrap();
    let img = assert_in_spec(&out).into_rgb8();
    assert_eq!((out.width, out.height), (300, 300));
    for (i, c) in colours.iter().enumerate() {
        let (x, y) = (75 + 150 * (i as u32 % 2), 75 + 150 * (i as u32 / 2));
        let got = img.get_pixel(x, y).0;
        for (g, want) in got
            .iter()
            .zip(c.map(|v| (u32::from(v) * 255 + 32_767) / 65_535))
        {
            assert!(
                g.abs_diff(want as u8) <= 4,
                "quadrant {i}: {got:?} vs {c:?}"
            );
        }
    }
}

#[test]
fn exif_orientation_6_is_applied_and_mapped_back() {
    // Phone-style 4:2:0 and `image`'s 4:4:4, both turned as YCbCr planes;
    // an odd size is turned as RGB (4:2:0 chroma would land half a pixel
    // off in planes).
    for ([w, h], chroma_420) in [([400, 320], true), ([400, 320], false), ([401, 331], true)] {
        // Grey, with a red 40x40 block in the stored top-left corner.
        let src = RgbImage::from_fn(w, h, |x, y| {
            if x < 40 && y < 40 {
                Rgb([230, 0, 0])
            } else {
                Rgb([128, 128, 128])
            }
        });
        let jpeg = if chroma_420 {
            jpeg_420(&src, 90)
        } else {
            encode(&DynamicImage::ImageRgb8(src), ImageFormat::Jpeg)
        };
        let jpeg = with_exif_orientation(&jpeg, 6);
        let out = run(jpeg).unwrap();
        let img = assert_in_spec(&out).into_rgb8();
        assert_eq!((out.width, out.height), (h, w), "rotated: sides swapped");
        assert_eq!(out.violations, vec![Violation::Orientation { exif: 6 }]);
        assert_eq!(
            out.transforms.steps,
            vec![
                Transform::Orient { exif: 6 },
                Transform::Encode {
                    format: OutputFormat::Jpeg,
                    quality: Some(90)
                }
            ],
            "{w}x{h}"
        );
        assert_eq!(probe(&out.bytes).unwrap().orientation, 1, "EXIF tag gone");

        // Rotating 90 degrees clockwise takes the top-left corner to the top-right.
        let (u, v) = out.transforms.to_prepared(20.0, 20.0);
        assert_eq!((u, v), (f64::from(h) - 20.0, 20.0));
        let px = img.get_pixel(u as u32, v as u32);
        assert!(px[0] > 200 && px[1] < 50, "marked corner {px:?}");
        assert_eq!(out.transforms.to_source(u, v), Some((20.0, 20.0)));
        let grey = img.get_pixel(20, 20);
        assert!(grey[0] < 160 && grey[1] > 100, "unmarked corner {grey:?}");
    }
}

#[test]
fn every_orientation_with_resize_and_pad_maps_marked_pixels() {
    // 120x24 stored: red block at the stored top-left, blue at bottom-right.
    let src = RgbImage::from_fn(120, 24, |x, y| match (x, y) {
        (0..12, 0..12) => Rgb([230, 0, 0]),
        (108.., 12..) => Rgb([0, 0, 230]),
        _ => Rgb([128, 128, 128]),
    });
    let jpeg = encode(&DynamicImage::ImageRgb8(src), ImageFormat::Jpeg);
    for o in 1..=8u8 {
        let out = run(with_exif_orientation(&jpeg, o)).unwrap();
        let img = assert_in_spec(&out).into_rgb8();
        let rec = &out.transforms;
        for ((x, y), red) in [((6.0, 6.0), true), ((114.0, 18.0), false)] {
            let (u, v) = rec.to_prepared(x, y);
            let px = img.get_pixel(u as u32, v as u32);
            let (hit, other) = if red { (px[0], px[2]) } else { (px[2], px[0]) };
            assert!(
                hit > 180 && other < 60,
                "orientation {o}: ({x},{y}) -> ({u},{v}) is {px:?}"
            );
            let (sx, sy) = rec.to_source(u, v).unwrap();
            assert!((sx - x).abs() < 1e-9 && (sy - y).abs() < 1e-9);
        }
        // The padding strips (orientations 5..=8 turn the strip upright) map to nothing.
        assert_eq!(rec.to_source(0.5, 0.5), None, "orientation {o}");
    }
}

#[test]
fn oversized_noise_png_becomes_a_jpeg_under_the_limit() {
    let noise = RgbImage::from_raw(2000, 1800, noise_bytes(2000 * 1800 * 3, 1)).unwrap();
    let png = encode(&DynamicImage::ImageRgb8(noise), ImageFormat::Png);
    assert!(png.len() as u64 > Spec::KLING.max_bytes);
    let out = run(png).unwrap();
    assert_in_spec(&out);
    assert_eq!(out.format, OutputFormat::Jpeg);
    assert!(out.bytes.len() as u64 <= Spec::KLING.max_bytes);
    assert!(
        out.violations
            .iter()
            .any(|v| matches!(v, Violation::TooLarge { .. }))
    );
}

#[test]
fn oversized_transparent_noise_is_downscaled_as_png() {
    let mut raw = noise_bytes(2000 * 1500 * 4, 2);
    raw.chunks_exact_mut(4).for_each(|p| p[3] = p[3].max(1));
    let png = encode(
        &DynamicImage::ImageRgba8(RgbaImage::from_raw(2000, 1500, raw).unwrap()),
        ImageFormat::Png,
    );
    assert!(png.len() as u64 > Spec::KLING.max_bytes);
    let out = run(png).unwrap();
    assert_in_spec(&out);
    assert_eq!(out.format, OutputFormat::Png);
    assert!(out.width < 2000 && out.width >= 300);
    assert!(matches!(
        out.transforms.steps[0],
        Transform::Resize {
            from: [2000, 1500],
            ..
        }
    ));
    let (x, y) = out
        .transforms
        .to_source(f64::from(out.width), f64::from(out.height))
        .unwrap();
    assert!((x - 2000.0).abs() < 1e-6 && (y - 1500.0).abs() < 1e-6);
}

#[test]
fn bad_input_gives_specific_errors() {
    let code = |r: Result<Prepared, PrepareError>| r.unwrap_err().code();
    assert_eq!(code(run(Vec::new())), "image_empty");
    assert_eq!(code(run(noise_bytes(10_000, 3))), "image_format_unknown");
    let jpeg = encode(&gradient(640, 480), ImageFormat::Jpeg);
    assert_eq!(
        code(run(jpeg[..jpeg.len() / 2].to_vec())),
        "image_truncated"
    );
    let small = encode(&gradient(200, 150), ImageFormat::Png);
    assert_eq!(
        code(run(small[..small.len() / 2].to_vec())),
        "image_truncated"
    );
    let err = run(png_header_only(100_000, 100_000)).unwrap_err();
    assert!(
        matches!(
            err,
            PrepareError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                ..
            }
        ),
        "{err}"
    );

    let limits = Limits {
        max_side: 500,
        ..Limits::default()
    };
    let err = prepare(Bytes::from(jpeg.clone()), &Spec::KLING, &limits).unwrap_err();
    assert_eq!(err.code(), "image_dimension_too_large");
    let limits = Limits {
        max_input_bytes: 100,
        ..Limits::default()
    };
    let err = prepare(Bytes::from(jpeg), &Spec::KLING, &limits).unwrap_err();
    assert_eq!(err.code(), "image_input_too_large");
}

#[test]
fn every_error_is_permanent_with_a_stable_code() {
    let errors = [
        PrepareError::Empty,
        PrepareError::UnknownFormat,
        PrepareError::Undecodable { reason: "x".into() },
        PrepareError::TooManyPixels {
            width: 1,
            height: 1,
            max_pixels: 0,
        },
        PrepareError::CannotFit {
            width: 300,
            height: 300,
            bytes: 11,
            max_bytes: 10,
        },
    ];
    let codes: Vec<_> = errors.iter().map(|e| e.code()).collect();
    assert_eq!(
        codes,
        [
            "image_empty",
            "image_format_unknown",
            "image_undecodable",
            "image_too_many_pixels",
            "image_cannot_fit"
        ]
    );
    assert!(
        errors
            .iter()
            .all(|e| e.disposition() == Disposition::Permanent)
    );
}

#[test]
fn estimate_reserves_the_full_frame() {
    let p = probe(&png_header_only(100_000, 100_000)).unwrap();
    assert_eq!(estimate_decode_pixels(&p), 10_000_000_000);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Damaged files must fail with an error, never a panic, and anything
    /// that does come out must be in spec.
    #[test]
    fn damaged_input_never_panics(
        format in prop::sample::select(vec![ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Gif, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Tiff]),
        cut in 0.0f64..=1.0,
        flips in prop::collection::vec((0.0f64..1.0, any::<u8>()), 0..8),
    ) {
        let mut data = encode(&gradient(64, 48), format);
        for (at, byte) in flips {
            let i = (at * data.len() as f64) as usize;
            data[i] = byte;
        }
        data.truncate((cut * data.len() as f64) as usize);
        if let Ok(out) = run(data) {
            let p = probe(&out.bytes).unwrap();
            prop_assert_eq!(check(&p, &Spec::KLING), vec![]);
        }
    }
}

#[test]
fn probe_reads_the_colour_model_and_check_flags_cmyk_and_deep_images() {
    let mut cmyk = Vec::new();
    jpeg_encoder::Encoder::new(&mut cmyk, 90)
        .encode(
            &[0, 255, 255, 0].repeat(320 * 320),
            320,
            320,
            jpeg_encoder::ColorType::Cmyk,
        )
        .unwrap();
    let deep = encode(
        &DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            320,
            320,
            Rgb([65535u16, 0, 0]),
        )),
        ImageFormat::Png,
    );
    let plain = encode(&gradient(320, 320), ImageFormat::Jpeg);
    for (bytes, model) in [
        (&cmyk, ColourModel::Cmyk),
        (&deep, ColourModel::HighBitDepth),
        (&plain, ColourModel::Standard),
    ] {
        let p = probe(bytes).unwrap();
        assert_eq!(p.colour, model);
        let flagged = check(&p, &Spec::KLING).contains(&Violation::Colour { model });
        assert_eq!(flagged, model != ColourModel::Standard, "{model:?}");
    }
    // Converted to 8-bit sRGB with the right colour.
    let out = run(cmyk).unwrap();
    let img = assert_in_spec(&out).into_rgb8();
    let p = img.get_pixel(160, 160).0;
    assert!(p[0] > 240 && p[1] < 15 && p[2] < 15, "{p:?}");
}

#[test]
fn a_jpeg_libjpeg_turbo_finds_fault_with_is_decoded_by_image() {
    // Stray bytes before the scan: libjpeg-turbo reports "extraneous
    // bytes before marker" (an error through the TurboJPEG API), while
    // zune-jpeg reads on. Real cameras and editors write such files.
    let src = RgbImage::from_fn(400, 320, |x, _| Rgb([(x % 256) as u8, 90, 160]));
    let clean = with_exif_orientation(&jpeg_420(&src, 90), 6);
    let sos = clean
        .windows(2)
        .position(|w| w == [0xFF, 0xDA])
        .expect("a scan");
    let mut stray = clean[..sos].to_vec();
    stray.extend_from_slice(&[0x00, 0x17]);
    stray.extend_from_slice(&clean[sos..]);
    assert!(
        super::jpeg::decode_rgb(&stray, [400, 320]).is_err(),
        "the fixture must upset libjpeg-turbo"
    );
    let out = run(stray).unwrap();
    assert_in_spec(&out);
    assert_eq!((out.width, out.height), (320, 400));
}
