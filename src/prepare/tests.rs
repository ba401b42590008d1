use super::*;

fn rgb(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    })
}

fn enc(img: &DynamicImage, f: image::ImageFormat) -> Bytes {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, f).unwrap();
    Bytes::from(out.into_inner())
}

fn run(data: Bytes) -> Prepared {
    prepare(data, &Spec::KLING, &Limits::default()).unwrap()
}

fn assert_in_spec(p: &Prepared) {
    let probe = probe(&p.bytes).unwrap();
    assert_eq!(
        check(&probe, &Spec::KLING),
        vec![],
        "output must be in spec: {probe:?}"
    );
    assert_eq!((probe.width, probe.height), (p.width, p.height));
    assert_eq!(p.transforms.output, [p.width, p.height]);
}

/// Insert a minimal Exif APP1 with the given orientation after SOI.
fn with_exif_orientation(jpeg: &[u8], o: u16) -> Vec<u8> {
    let mut app1 = vec![0xFF, 0xE1, 0, 34];
    app1.extend_from_slice(b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01");
    app1.extend_from_slice(&o.to_be_bytes());
    app1.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&w.to_be_bytes());
    chunk.extend_from_slice(&h.to_be_bytes());
    chunk.extend_from_slice(&[8, 2, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    // An empty IDAT: the header is complete, the pixels are missing.
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(b"IDAT");
    out.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(b"IEND");
    out.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    out
}

#[test]
fn in_spec_jpeg_and_png_pass_through_untouched() {
    for f in [image::ImageFormat::Jpeg, image::ImageFormat::Png] {
        let data = enc(&DynamicImage::ImageRgb8(rgb(640, 480)), f);
        let p = run(data.clone());
        assert!(p.is_passthrough());
        assert_eq!(p.bytes.as_ptr(), data.as_ptr(), "the same buffer, no copy");
        assert!(p.transforms.steps.is_empty());
    }
}

#[test]
fn thumbnails_are_upscaled() {
    let p = run(enc(
        &DynamicImage::ImageRgb8(rgb(200, 150)),
        image::ImageFormat::Png,
    ));
    assert_in_spec(&p);
    assert_eq!((p.width, p.height), (400, 300));
    assert_eq!(p.format, OutputFormat::Jpeg, "opaque PNG becomes JPEG");
}

#[test]
fn panoramas_are_padded_and_keep_every_source_pixel() {
    let p = run(enc(
        &DynamicImage::ImageRgb8(rgb(2000, 400)),
        image::ImageFormat::Jpeg,
    ));
    assert_in_spec(&p);
    assert_eq!((p.width, p.height), (2000, 800));
    for (x, y) in [(0.0, 0.0), (2000.0, 400.0), (1000.0, 200.0)] {
        let (u, v) = p.transforms.to_prepared(x, y);
        assert!(u <= 2000.0 && v <= 800.0);
        assert_eq!(p.transforms.to_source(u, v), Some((x, y)));
    }
    assert_eq!(
        p.transforms.to_source(10.0, 10.0),
        None,
        "padding maps to nothing"
    );
    // The padding is white.
    let out = image::load_from_memory(&p.bytes).unwrap().to_rgb8();
    assert!(out.get_pixel(1000, 50).0.iter().all(|&c| c > 240));
}

#[test]
fn other_formats_are_converted() {
    let img = DynamicImage::ImageRgb8(rgb(500, 400));
    for f in [
        image::ImageFormat::WebP,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
    ] {
        let p = run(enc(&img, f));
        assert_in_spec(&p);
        assert_eq!((p.width, p.height), (500, 400), "{f:?}");
        assert!(matches!(p.violations[0], Violation::Format { .. }));
    }
}

#[test]
fn transparency_stays_png_and_is_padded_transparent() {
    let img = image::RgbaImage::from_fn(1000, 200, |x, _| {
        image::Rgba([200, 10, 10, if x < 500 { 255 } else { 0 }])
    });
    let p = run(enc(&DynamicImage::ImageRgba8(img), image::ImageFormat::Png));
    assert_in_spec(&p);
    assert_eq!(p.format, OutputFormat::Png);
    let out = image::load_from_memory(&p.bytes).unwrap().to_rgba8();
    assert_eq!(out.get_pixel(10, 5)[3], 0, "transparent padding");
}

#[test]
fn sixteen_bit_png_keeps_its_colours() {
    let img = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
        200,
        200,
        image::Rgb([65535, 32768, 0]),
    );
    let p = run(enc(&DynamicImage::ImageRgb16(img), image::ImageFormat::Png));
    assert_in_spec(&p);
    let px = image::load_from_memory(&p.bytes)
        .unwrap()
        .to_rgb8()
        .get_pixel(150, 150)
        .0;
    assert!(
        px[0] > 245 && (120..=136).contains(&px[1]) && px[2] < 10,
        "{px:?}"
    );
}

#[test]
fn exif_rotated_jpegs_are_turned_upright_and_map_back() {
    // A 600x400 stored image, red in the stored top-left corner.
    let img = image::RgbImage::from_fn(600, 400, |x, y| {
        if x < 60 && y < 60 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    });
    let jpeg = enc(&DynamicImage::ImageRgb8(img), image::ImageFormat::Jpeg);
    let data = Bytes::from(with_exif_orientation(&jpeg, 6));
    assert_eq!(probe(&data).unwrap().orientation, 6);
    let p = run(data);
    assert_in_spec(&p);
    assert_eq!((p.width, p.height), (400, 600), "dimensions swapped");
    let (u, v) = p.transforms.to_prepared(30.0, 30.0);
    let out = image::load_from_memory(&p.bytes).unwrap().to_rgb8();
    let px = out.get_pixel(u as u32, v as u32).0;
    assert!(
        px[0] > 200 && px[2] < 60,
        "the red corner is where the record says: {px:?} at {u},{v}"
    );
    let (x, y) = p.transforms.to_source(u, v).unwrap();
    assert!((x - 30.0).abs() < 1e-9 && (y - 30.0).abs() < 1e-9);
}

#[test]
fn oversize_noise_png_is_brought_under_10_mb() {
    let mut rng = 0x1234_5678u32;
    let img = image::RgbImage::from_fn(2400, 1800, |_, _| {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        image::Rgb([rng as u8, (rng >> 8) as u8, (rng >> 16) as u8])
    });
    let data = enc(&DynamicImage::ImageRgb8(img), image::ImageFormat::Png);
    assert!(
        data.len() > 10 * 1024 * 1024,
        "fixture is over 10 MB: {}",
        data.len()
    );
    let p = run(data);
    assert_in_spec(&p);
    assert_eq!(p.format, OutputFormat::Jpeg);
}

#[test]
fn bad_input_gets_a_specific_error_never_a_panic() {
    let jpeg = enc(
        &DynamicImage::ImageRgb8(rgb(640, 480)),
        image::ImageFormat::Jpeg,
    );
    let code = |d: &[u8]| match prepare(Bytes::copy_from_slice(d), &Spec::KLING, &Limits::default())
    {
        Ok(p) => panic!("accepted {} bytes as {p:?}", d.len()),
        Err(e) => e.code(),
    };
    assert_eq!(code(b""), "image_empty");
    assert_eq!(code(b"%PDF-1.7 hello"), "image_format_unknown");
    assert_eq!(code(&jpeg[..jpeg.len() / 2]), "image_truncated");
    assert_eq!(code(&jpeg[..300]), "image_undecodable");
    assert_eq!(
        code(&png_header_only(20_000, 20_000)),
        "image_too_many_pixels"
    );
    assert_eq!(
        code(&png_header_only(100_000, 10)),
        "image_dimension_too_large"
    );
    // A header that claims a small in-range image but has no data.
    assert_eq!(code(&png_header_only(500, 100)), "image_undecodable");
}

#[test]
fn probe_reads_only_the_header() {
    // Signature + IHDR, then a 20 MB IDAT that the probe must not read.
    let mut data = png_header_only(4000, 3000)[..33].to_vec();
    data.extend_from_slice(&(20u32 * 1024 * 1024).to_be_bytes());
    data.extend_from_slice(b"IDAT");
    data.extend(std::iter::repeat_n(0xAB, 20 * 1024 * 1024));
    let p = probe(&data).unwrap();
    assert_eq!(
        (p.width, p.height, p.format),
        (4000, 3000, SourceFormat::Png)
    );
}
