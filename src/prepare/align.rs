//! Segment masks moved from the prepared image's grid back onto the
//! source's own pixel grid, so that a downstream job can lay a mask over the
//! image it sent without knowing any of the transform math. Part of
//! `prepare`; pure pixels, no I/O.
//!
//! # The convention
//!
//! The aligned mask is an 8-bit greyscale PNG exactly the size of the
//! source **as stored in its file** (`source.width` x `source.height` in the
//! manifest): EXIF orientation is *not* applied. That is the grid Pillow's
//! `Image.open`, the `image` crate's `open`/`load_from_memory`, OpenCV with
//! `IMREAD_IGNORE_ORIENTATION` and libvips without `autorotate` hand you, so
//! `original.putalpha(mask)` lines up with no further step; a viewer that
//! turns the original upright must turn the mask the same way. Value 0 is
//! outside the segment, 255 inside; in between is partial coverage (the
//! alpha of Kling's cut-out, or a pixel on the segment's edge).
//!
//! # How
//!
//! The record's steps are undone in reverse order on a one-byte plane:
//! padding is cropped away (a mask pixel in padding can never reach the
//! source), a resize is undone with a tent (bilinear) kernel, whose weights
//! are all non-negative, so nothing rings and every value stays within the
//! range of its neighbours, and an EXIF orientation is turned back. A mask
//! whose values are only 0 and 255 is thresholded at the end, so a binary
//! mask stays binary. Only the coverage plane is held (one byte per pixel,
//! read row by row from the PNG), never Kling's RGBA.

use std::io::Cursor;

use fast_image_resize as fir;
use image::GrayImage;

use super::{Transform, TransformRecord, turn};
use crate::error::{Classify, Disposition};

/// The grid the aligned masks are in, as the manifest names it.
pub const GRID: &str = "stored";

/// A mask on the source's stored pixel grid, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlignedMask {
    /// 8-bit greyscale PNG.
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// What a segment PNG covers: one byte per pixel, and whether every value
/// is 0 or 255.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    pub plane: GrayImage,
    pub binary: bool,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AlignError {
    #[error(
        "the segment PNG cannot be decoded ({reason}); the original is archived as Kling sent it"
    )]
    Undecodable { reason: String },
    #[error("the segment PNG is {width}x{height}, over the {max} pixel limit")]
    TooLarge { width: u32, height: u32, max: u64 },
    #[error("the aligned mask cannot be built: {reason}")]
    Build { reason: String },
}

impl Classify for AlignError {
    /// The same PNG always fails the same way.
    fn disposition(&self) -> Disposition {
        Disposition::Permanent
    }

    fn code(&self) -> &'static str {
        match self {
            AlignError::Undecodable { .. } => "mask_undecodable",
            AlignError::TooLarge { .. } => "mask_too_large",
            AlignError::Build { .. } => "mask_build",
        }
    }
}

/// True when Kling's masks are not already on the source's stored grid:
/// the image was turned, resized or padded (a re-encode alone moves no
/// pixel).
pub fn needs_alignment(record: &TransformRecord) -> bool {
    record.source != record.output
        || record
            .steps
            .iter()
            .any(|s| !matches!(s, Transform::Encode { .. }))
}

/// Pixels an alignment of a `mask` (width, height) holds at its peak, at
/// one byte each: the largest two consecutive planes of the walk back.
pub fn working_pixels(record: &TransformRecord, mask: [u32; 2]) -> u64 {
    let area = |[w, h]: [u32; 2]| u64::from(w) * u64::from(h);
    let mut planes = record.stages();
    planes.push(mask);
    planes
        .windows(2)
        .map(|p| area(p[0]) + area(p[1]))
        .max()
        .unwrap_or_else(|| area(mask))
}

/// Width and height from a PNG's header, without decoding it.
pub fn png_dimensions(png: &[u8]) -> Option<[u32; 2]> {
    let be = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
    (png.starts_with(b"\x89PNG\r\n\x1a\n") && png.get(12..16) == Some(b"IHDR"))
        .then(|| Some([be(16)?, be(20)?]))
        .flatten()
}

/// The whole job: Kling's PNG in, the aligned greyscale PNG out.
pub fn align_png(
    png: &[u8],
    record: &TransformRecord,
    max_pixels: u64,
) -> Result<AlignedMask, AlignError> {
    let coverage = read_coverage(png, max_pixels)?;
    let plane = align(coverage, record)?;
    let (width, height) = plane.dimensions();
    Ok(AlignedMask {
        png: encode_png(&plane)?,
        width,
        height,
    })
}

/// Read a segment PNG's coverage: its alpha when it has one (Kling's
/// cut-outs), else its grey level (a black-and-white mask), row by row.
pub fn read_coverage(png: &[u8], max_pixels: u64) -> Result<Coverage, AlignError> {
    let bad = |e: png::DecodingError| AlignError::Undecodable {
        reason: e.to_string(),
    };
    let mut decoder = png::Decoder::new(Cursor::new(png));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    // The row scratch only; the plane is ours and capped by `max_pixels`.
    decoder.set_limits(png::Limits { bytes: 64 << 20 });
    let mut reader = decoder.read_info().map_err(bad)?;
    let (width, height) = reader.info().size();
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(AlignError::TooLarge {
            width,
            height,
            max: max_pixels,
        });
    }
    let (colour, _) = reader.output_color_type();
    let (channels, take) = match colour {
        png::ColorType::Grayscale => (1, 0),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, usize::MAX),
        png::ColorType::Rgba => (4, 3),
        // EXPAND turns palettes into RGB(A).
        png::ColorType::Indexed => {
            return Err(AlignError::Undecodable {
                reason: "an indexed PNG was not expanded".into(),
            });
        }
    };
    if reader.info().interlaced {
        return read_interlaced(reader, channels, take);
    }
    let mut plane = Vec::with_capacity(width as usize * height as usize);
    while let Some(row) = reader.next_row().map_err(bad)? {
        push_coverage(&mut plane, row.data(), channels, take);
    }
    finish(width, height, plane)
}

/// Adam7 rows arrive by pass: decode the frame whole (rare for masks).
fn read_interlaced(
    mut reader: png::Reader<Cursor<&[u8]>>,
    channels: usize,
    take: usize,
) -> Result<Coverage, AlignError> {
    let (width, height) = reader.info().size();
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| AlignError::Build {
            reason: "the PNG frame does not fit in memory".into(),
        })?;
    let mut buf = vec![0u8; size];
    reader
        .next_frame(&mut buf)
        .map_err(|e| AlignError::Undecodable {
            reason: e.to_string(),
        })?;
    let mut plane = Vec::with_capacity(width as usize * height as usize);
    push_coverage(&mut plane, &buf, channels, take);
    finish(width, height, plane)
}

/// Append one byte per pixel of `data`: channel `take`, or the luma of RGB
/// when `take` is `usize::MAX`.
fn push_coverage(plane: &mut Vec<u8>, data: &[u8], channels: usize, take: usize) {
    if channels == 1 {
        plane.extend_from_slice(data);
    } else if take == usize::MAX {
        plane.extend(data.chunks_exact(3).map(|p| {
            let y = 299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]);
            ((y + 500) / 1000) as u8
        }));
    } else {
        plane.extend(data.chunks_exact(channels).map(|p| p[take]));
    }
}

fn finish(width: u32, height: u32, plane: Vec<u8>) -> Result<Coverage, AlignError> {
    let binary = plane.iter().all(|&v| v == 0 || v == 255);
    let plane =
        GrayImage::from_raw(width, height, plane).ok_or_else(|| AlignError::Undecodable {
            reason: "the PNG ended before its last row".into(),
        })?;
    Ok(Coverage { plane, binary })
}

/// The coverage moved onto the source's stored grid (`record.source`).
/// A mask of another size than the prepared image is first scaled to it.
pub fn align(coverage: Coverage, record: &TransformRecord) -> Result<GrayImage, AlignError> {
    let Coverage { mut plane, binary } = coverage;
    let stages = record.stages();
    let prepared = stages.last().copied().unwrap_or(record.output);
    if plane.dimensions() != (prepared[0], prepared[1]) {
        plane = resample(&plane, prepared)?;
    }
    for (step, &before) in record.steps.iter().zip(&stages).rev() {
        plane = match *step {
            Transform::Pad { left, top, .. } => {
                image::imageops::crop_imm(&plane, left, top, before[0], before[1]).to_image()
            }
            Transform::Resize { .. } => resample(&plane, before)?,
            Transform::Orient { exif } => turn::orient(plane, inverse_orientation(exif)),
            Transform::Encode { .. } => plane,
        };
    }
    // A record that does not add up (never written by this worker) still
    // yields the promised size.
    if plane.dimensions() != (record.source[0], record.source[1]) {
        plane = resample(&plane, record.source)?;
    }
    if binary {
        for v in plane.iter_mut() {
            *v = if *v >= 128 { 255 } else { 0 };
        }
    }
    Ok(plane)
}

/// The orientation that undoes `exif`: the quarter turns 6 and 8 undo each
/// other, every other one is its own inverse.
pub fn inverse_orientation(exif: u8) -> u8 {
    match exif {
        6 => 8,
        8 => 6,
        o => o,
    }
}

thread_local! {
    /// One resizer per blocking-pool thread, as in `fix`.
    static RESIZER: std::cell::RefCell<fir::Resizer> = std::cell::RefCell::new(fir::Resizer::new());
}

/// Tent-kernel resample of a plane to `[width, height]`.
fn resample(plane: &GrayImage, [width, height]: [u32; 2]) -> Result<GrayImage, AlignError> {
    let fail = |reason: String| AlignError::Build {
        reason: format!("resampling failed: {reason}"),
    };
    let (width, height) = (width.max(1), height.max(1));
    let src = fir::images::ImageRef::new(
        plane.width(),
        plane.height(),
        plane.as_raw(),
        fir::PixelType::U8,
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut dst = fir::images::Image::new(width, height, fir::PixelType::U8);
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
        .map_err(|e| fail(e.to_string()))?;
    GrayImage::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| fail("unexpected buffer size".into()))
}

/// 8-bit greyscale PNG, fast deflate, a fixed configuration: the same
/// plane always gives the same bytes (the key is their SHA-256).
pub fn encode_png(plane: &GrayImage) -> Result<Vec<u8>, AlignError> {
    let err = |e: png::EncodingError| AlignError::Build {
        reason: format!("PNG encoding failed: {e}"),
    };
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, plane.width(), plane.height());
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    enc.set_filter(png::Filter::Up);
    let mut writer = enc.write_header().map_err(err)?;
    writer.write_image_data(plane.as_raw()).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(out)
}

#[cfg(test)]
#[path = "align_tests.rs"]
mod tests;
