//! The demo's sample images, generated rather than shipped: in spec, out
//! of spec in each way `prepare` fixes, and one broken. Tests and benches
//! use the same scenes.

pub use crate::prepare::with_exif_orientation;

/// A generated sample and what the demo expects of it.
pub struct Sample {
    pub job_id: &'static str,
    pub what: &'static str,
    pub bytes: Vec<u8>,
}

/// Sample images: in spec, out of spec in each fixable way, and one broken.
pub fn samples() -> Vec<Sample> {
    vec![
        Sample {
            job_id: "demo-in-spec-jpeg",
            what: "800x1000 JPEG, in spec: sent untouched",
            bytes: encode(&scene(800, 1000, 1), image::ImageFormat::Jpeg),
        },
        Sample {
            job_id: "demo-in-spec-png",
            what: "640x480 PNG, in spec: sent untouched",
            bytes: encode(&scene(640, 480, 2), image::ImageFormat::Png),
        },
        Sample {
            job_id: "demo-thumbnail",
            what: "200x150 PNG: upscaled to 300 px",
            bytes: encode(&scene(200, 150, 3), image::ImageFormat::Png),
        },
        Sample {
            job_id: "demo-panorama",
            what: "2000x500 JPEG (4:1): padded to 2.5:1",
            bytes: encode(&scene(2000, 500, 4), image::ImageFormat::Jpeg),
        },
        Sample {
            job_id: "demo-webp",
            what: "600x600 WebP: re-encoded to JPEG",
            bytes: encode(&scene(600, 600, 5), image::ImageFormat::WebP),
        },
        Sample {
            job_id: "demo-rotated",
            what: "phone photo stored sideways (EXIF orientation 6): turned upright",
            bytes: with_exif_orientation(
                &encode(
                    &image::DynamicImage::ImageRgb8(scene(480, 640, 6))
                        .rotate270()
                        .into_rgb8(),
                    image::ImageFormat::Jpeg,
                ),
                6,
            ),
        },
        Sample {
            job_id: "demo-broken",
            what: "a truncated JPEG: dead-lettered",
            bytes: broken_jpeg(),
        },
    ]
}

/// A simple scene: a gradient background and a coloured "subject" with a
/// "head", so the simulator's masks have something to find.
pub fn scene(w: u32, h: u32, seed: u8) -> image::RgbImage {
    let (cx, cy) = (w as f32 / 2.0, h as f32 * 0.6);
    let (rx, ry) = (w as f32 * 0.22, h as f32 * 0.3);
    let (hx, hy, hr) = (cx, h as f32 * 0.22, (w.min(h) as f32) * 0.12);
    image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let body = ((fx - cx) / rx).powi(2) + ((fy - cy) / ry).powi(2) <= 1.0;
        let head = (fx - hx).powi(2) + (fy - hy).powi(2) <= hr * hr;
        if head {
            image::Rgb([230, 180, 150])
        } else if body {
            image::Rgb([40u8.wrapping_add(seed * 30), 60, 170])
        } else {
            let g = (200.0 + 40.0 * fy / h as f32) as u8;
            image::Rgb([g, g, g.saturating_sub(seed)])
        }
    })
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    // Encoding a generated in-memory image cannot fail for these formats.
    if let Err(e) = img.write_to(&mut out, format) {
        unreachable!("encoding a generated sample failed: {e}");
    }
    out.into_inner()
}

fn broken_jpeg() -> Vec<u8> {
    let mut b = encode(&scene(640, 480, 6), image::ImageFormat::Jpeg);
    b.truncate(400);
    b
}
