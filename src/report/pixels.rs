//! The pixel side of the report: a small upright thumbnail of the source,
//! and for each segment a one-bit overlay of the same size, placed on the
//! source with the manifest's transform record.
//!
//! The mask Kling returns is in *prepared* coordinates (the image that was
//! sent: maybe rotated, scaled and padded). The overlay is built by inverse
//! sampling: for each thumbnail pixel, take its centre on the upright
//! source, undo the EXIF orientation to reach the stored grid, run the
//! record forward (`to_prepared`) and read the mask there. Padding is never
//! reached, and nothing is cropped or stretched: the overlay lines up with
//! the source by construction.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageReader, Luma};

use crate::prepare::{TransformRecord, displayed_dims, displayed_to_stored};

/// Longest thumbnail side, in pixels. At JPEG quality 70 a thumbnail is
/// 5-12 KB, and a one-bit overlay well under 1 KB, so a 1,000-job report
/// stays around 10 MB.
pub const THUMB_MAX_SIDE: u32 = 240;
const THUMB_QUALITY: u8 = 70;
/// A mask pixel counts as "in the segment" from this alpha (for RGBA
/// cut-outs) or this grey level (for plain black/white masks).
const MASK_THRESHOLD: u8 = 128;
/// Decoding limits for images read back from the archive (they passed the
/// worker's own limits once; this is defence in depth).
const MAX_DECODE_ALLOC: u64 = 1 << 30;

/// A source thumbnail, upright.
#[derive(Debug, Clone)]
pub struct Thumb {
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Where a thumbnail sits on its source: what the overlay needs.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// Source width and height as stored in the file.
    pub stored: [u32; 2],
    /// EXIF orientation of the source (1 = none).
    pub orientation: u8,
    /// Thumbnail width and height.
    pub thumb: [u32; 2],
}

#[derive(Debug, thiserror::Error)]
pub enum PixelError {
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

fn decode(bytes: &[u8], what: &'static str) -> Result<DynamicImage, PixelError> {
    let err = |e: image::ImageError| PixelError::Decode {
        what,
        reason: e.to_string(),
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PixelError::Decode {
            what,
            reason: e.to_string(),
        })?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    reader.decode().map_err(err)
}

/// Thumbnail size for an upright image of `[w, h]`.
pub fn thumb_dims([w, h]: [u32; 2]) -> [u32; 2] {
    let long = w.max(h).max(1);
    if long <= THUMB_MAX_SIDE {
        return [w.max(1), h.max(1)];
    }
    let scale = f64::from(THUMB_MAX_SIDE) / f64::from(long);
    [
        ((f64::from(w) * scale).round() as u32).max(1),
        ((f64::from(h) * scale).round() as u32).max(1),
    ]
}

/// Decode the source, turn it upright with its EXIF `orientation` (the
/// manifest's, so the report agrees with what the worker did), shrink it
/// and encode it as JPEG (transparency over white).
pub fn thumbnail(source: &[u8], orientation: u8) -> Result<(Thumb, Frame), PixelError> {
    let image = decode(source, "the source image")?;
    let stored = [image.width(), image.height()];
    let [tw, th] = thumb_dims(displayed_dims(orientation, stored));
    let mut small = image.resize_exact(
        if matches!(orientation, 5..=8) { th } else { tw },
        if matches!(orientation, 5..=8) { tw } else { th },
        FilterType::Triangle,
    );
    drop(image);
    if let Some(o) = Orientation::from_exif(orientation) {
        small.apply_orientation(o);
    }
    let rgb = flatten_on_white(small);
    let mut jpeg = Vec::new();
    rgb.write_with_encoder(JpegEncoder::new_with_quality(&mut jpeg, THUMB_QUALITY))
        .map_err(|e| PixelError::Encode {
            what: "the thumbnail",
            reason: e.to_string(),
        })?;
    Ok((
        Thumb {
            jpeg,
            width: tw,
            height: th,
        },
        Frame {
            stored,
            orientation,
            thumb: [tw, th],
        },
    ))
}

fn flatten_on_white(image: DynamicImage) -> image::RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    image::RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = u16::from(p[3]);
        let mix = |c: u8| ((u16::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}

/// The segment's mask as a yes/no image in prepared coordinates.
pub fn read_mask(png: &[u8]) -> Result<GrayImage, PixelError> {
    let image = decode(png, "a segment PNG")?;
    Ok(if image.color().has_alpha() {
        let rgba = image.into_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            Luma([u8::from(rgba.get_pixel(x, y)[3] >= MASK_THRESHOLD)])
        })
    } else {
        let grey = image.into_luma8();
        GrayImage::from_fn(grey.width(), grey.height(), |x, y| {
            Luma([u8::from(grey.get_pixel(x, y)[0] >= MASK_THRESHOLD)])
        })
    })
}

/// The mask resampled onto the thumbnail grid of the upright source: 1
/// where the segment covers the centre of a thumbnail pixel, else 0.
/// `record.output` is the prepared size; a mask of another size (a
/// provider that returns smaller masks) is scaled to it.
pub fn overlay(mask: &GrayImage, record: &TransformRecord, frame: &Frame) -> GrayImage {
    let [tw, th] = frame.thumb;
    let [dw, dh] = displayed_dims(frame.orientation, frame.stored);
    let [pw, ph] = record.output;
    let sx = f64::from(mask.width()) / f64::from(pw.max(1));
    let sy = f64::from(mask.height()) / f64::from(ph.max(1));
    // Sources archived before the record knew the stored size differ only
    // by rounding; map through the record's own source size.
    let [rw, rh] = record.source;
    let kx = f64::from(rw) / f64::from(frame.stored[0].max(1));
    let ky = f64::from(rh) / f64::from(frame.stored[1].max(1));
    GrayImage::from_fn(tw, th, |i, j| {
        let d = (
            (f64::from(i) + 0.5) * f64::from(dw) / f64::from(tw),
            (f64::from(j) + 0.5) * f64::from(dh) / f64::from(th),
        );
        let (x, y) = displayed_to_stored(frame.orientation, frame.stored, d);
        let (px, py) = record.to_prepared(x * kx, y * ky);
        let (mx, my) = ((px * sx).floor(), (py * sy).floor());
        let inside = mx >= 0.0
            && my >= 0.0
            && mx < f64::from(mask.width())
            && my < f64::from(mask.height())
            && mask.get_pixel(mx as u32, my as u32)[0] != 0;
        Luma([u8::from(inside)])
    })
}

/// Fraction of the overlay that is set (for the card's caption).
pub fn coverage(overlay: &GrayImage) -> f64 {
    let set = overlay.pixels().filter(|p| p[0] != 0).count();
    set as f64 / (overlay.width() as f64 * overlay.height() as f64).max(1.0)
}

/// Encode an overlay as a two-colour palette PNG (bit depth 1): index 0
/// transparent, index 1 `rgb` at `alpha`. Blobby masks compress to a few
/// hundred bytes.
pub fn overlay_png(overlay: &GrayImage, rgb: [u8; 3], alpha: u8) -> Result<Vec<u8>, PixelError> {
    let (w, h) = overlay.dimensions();
    let row_bytes = w.div_ceil(8) as usize;
    let mut packed = vec![0u8; row_bytes * h as usize];
    for (x, y, p) in overlay.enumerate_pixels() {
        if p[0] != 0 {
            packed[y as usize * row_bytes + (x / 8) as usize] |= 0x80 >> (x % 8);
        }
    }
    let err = |e: png::EncodingError| PixelError::Encode {
        what: "an overlay",
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::One);
        enc.set_palette(vec![0, 0, 0, rgb[0], rgb[1], rgb[2]]);
        enc.set_trns(vec![0, alpha]);
        enc.set_compression(png::Compression::High);
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(&packed).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::testkit::{encode, with_exif_orientation};
    use crate::prepare::{Limits, Spec, prepare};
    use image::{ImageFormat, Rgb, RgbImage, RgbaImage};

    /// A grey picture (upright, as a viewer shows it) with a red block at
    /// `block` = (x0, y0, x1, y1), in upright pixels.
    fn scene(w: u32, h: u32, block: (u32, u32, u32, u32)) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let inside = (block.0..block.2).contains(&x) && (block.1..block.3).contains(&y);
            if inside {
                Rgb([230, 20, 20])
            } else {
                Rgb([120, 120, 120])
            }
        })
    }

    fn is_red(p: &Rgb<u8>) -> bool {
        p[0] > 170 && p[1] < 90 && p[2] < 90
    }

    /// What a segmentation service would return for the prepared image:
    /// an RGBA cut-out of its red pixels.
    fn red_cutout(prepared: &[u8]) -> Vec<u8> {
        let img = image::load_from_memory(prepared).unwrap().into_rgb8();
        let cut = RgbaImage::from_fn(img.width(), img.height(), |x, y| {
            let p = img.get_pixel(x, y);
            if is_red(p) {
                image::Rgba([p[0], p[1], p[2], 255])
            } else {
                image::Rgba([0, 0, 0, 0])
            }
        });
        encode(&DynamicImage::ImageRgba8(cut), ImageFormat::Png)
    }

    /// Run the real `prepare` on `source`, cut out the red block from what
    /// was prepared, overlay it on the source thumbnail, and compare with
    /// where the block is on the upright source (`block`, in upright
    /// pixels): every thumbnail pixel whose centre lies inside the block
    /// must be covered, every one outside must not, and the thumbnail must
    /// show red exactly there. Centres within `EDGE` upright pixels plus one
    /// thumbnail pixel of the block's border (mixed by the resamplers and
    /// JPEG) are not judged.
    fn assert_overlay_lines_up(
        source: Vec<u8>,
        orientation: u8,
        block: (u32, u32, u32, u32),
        expect_steps: &[&str],
    ) {
        const EDGE: f64 = 3.0;
        let prepared = prepare(source.clone().into(), &Spec::KLING, &Limits::default()).unwrap();
        let ops: Vec<&str> = prepared.transforms.steps.iter().map(|s| s.op()).collect();
        for op in expect_steps {
            assert!(ops.iter().any(|o| o == op), "{op} missing from {ops:?}");
        }
        let mask = read_mask(&red_cutout(&prepared.bytes)).unwrap();
        let (thumb, frame) = thumbnail(&source, orientation).unwrap();
        let ov = overlay(&mask, &prepared.transforms, &frame);
        let pic = image::load_from_memory(&thumb.jpeg).unwrap().into_rgb8();
        assert_eq!(pic.dimensions(), ov.dimensions());
        let [dw, dh] = displayed_dims(orientation, frame.stored);
        let (x0, y0, x1, y1) = (
            f64::from(block.0),
            f64::from(block.1),
            f64::from(block.2),
            f64::from(block.3),
        );
        // A thumbnail pixel averages about one thumbnail pixel's footprint
        // of the source: widen the unjudged band by that much.
        let m = EDGE + f64::from(dw) / f64::from(frame.thumb[0]);
        let (mut inside, mut outside, mut bad) = (0, 0, Vec::new());
        for (x, y, p) in pic.enumerate_pixels() {
            let covered = ov.get_pixel(x, y)[0] != 0;
            let u = (f64::from(x) + 0.5) * f64::from(dw) / f64::from(frame.thumb[0]);
            let v = (f64::from(y) + 0.5) * f64::from(dh) / f64::from(frame.thumb[1]);
            let deep_inside = u > x0 + m && u < x1 - m && v > y0 + m && v < y1 - m;
            let far_outside = u < x0 - m || u > x1 + m || v < y0 - m || v > y1 + m;
            if deep_inside {
                inside += 1;
                if !covered || !is_red(p) {
                    bad.push((x, y, "inside the block but not covered (or not red)"));
                }
            } else if far_outside {
                outside += 1;
                if covered || is_red(p) {
                    bad.push((x, y, "outside the block but covered (or red)"));
                }
            }
        }
        assert!(
            inside > 200 && outside > 2000,
            "inside {inside}, outside {outside}"
        );
        assert!(
            bad.is_empty(),
            "{} misplaced, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }

    #[test]
    fn overlay_lines_up_on_a_padded_panorama() {
        // 1600x400 (4:1) is padded top and bottom to 2.5:1; the block sits
        // near the right edge so a wrong offset or scale shows.
        let block = (1300, 100, 1500, 300);
        let src = scene(1600, 400, block);
        let bytes = encode(&DynamicImage::ImageRgb8(src), ImageFormat::Jpeg);
        assert_overlay_lines_up(bytes, 1, block, &["pad", "encode"]);
    }

    #[test]
    fn overlay_lines_up_on_an_exif_rotated_small_photo() {
        // Upright 300x240 with the block top-left; stored rotated (EXIF 6
        // = the stored pixels must turn 90° clockwise to stand up), so the
        // worker orients, upscales (240 < 300) and re-encodes.
        let block = (20, 30, 120, 110);
        let upright = scene(300, 240, block);
        let stored = DynamicImage::ImageRgb8(upright).rotate270();
        let jpeg = encode(&stored, ImageFormat::Jpeg);
        let bytes = with_exif_orientation(&jpeg, 6);
        assert_overlay_lines_up(bytes, 6, block, &["orient", "resize", "encode"]);
    }

    #[test]
    fn overlay_png_is_one_bit_and_round_trips() {
        let mut ov = GrayImage::new(37, 11);
        ov.put_pixel(0, 0, Luma([1]));
        ov.put_pixel(36, 10, Luma([1]));
        let png = overlay_png(&ov, [10, 20, 30], 140).unwrap();
        let back = image::load_from_memory(&png).unwrap().into_rgba8();
        assert_eq!(back.get_pixel(0, 0).0, [10, 20, 30, 140]);
        assert_eq!(back.get_pixel(36, 10).0, [10, 20, 30, 140]);
        assert_eq!(back.get_pixel(1, 0).0[3], 0);
        assert!(png.len() < 200, "{} bytes", png.len());
    }

    #[test]
    fn grey_masks_and_small_masks_are_read() {
        let grey = GrayImage::from_fn(10, 10, |x, _| Luma([if x < 5 { 255 } else { 0 }]));
        let png = encode(&DynamicImage::ImageLuma8(grey), ImageFormat::Png);
        let mask = read_mask(&png).unwrap();
        let record = TransformRecord::identity(20, 20);
        let frame = Frame {
            stored: [20, 20],
            orientation: 1,
            thumb: [20, 20],
        };
        let ov = overlay(&mask, &record, &frame);
        assert_eq!(
            ov.get_pixel(9, 3)[0],
            1,
            "half a 10 px mask covers half of 20 px"
        );
        assert_eq!(ov.get_pixel(10, 3)[0], 0);
        assert!((coverage(&ov) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn corrupt_inputs_are_errors_not_panics() {
        assert!(thumbnail(b"\xff\xd8 not a jpeg", 1).is_err());
        assert!(read_mask(b"").is_err());
    }
}
