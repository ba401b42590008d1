//! Preparation: make any image Kling's image-recognize accepts, without
//! destroying it, and say exactly what was done.
//!
//! - [`probe`] reads only the header: format, dimensions, EXIF orientation.
//! - [`check`] compares a probe with the [`Spec`] (JPEG/PNG, ≤ 10 MB, sides
//!   ≥ 300 px, aspect 1:2.5..2.5:1, upright).
//! - [`prepare`] passes in-spec bytes through untouched, and otherwise
//!   decodes (within [`Limits`]), orients, pads (never crops), upscales,
//!   re-encodes and — only if needed — shrinks until the result fits,
//!   recording every step in a [`TransformRecord`].
//!
//! Synchronous and CPU-bound: callers run it on a blocking pool. Knows
//! nothing about RabbitMQ, S3 or HTTP.

mod geometry;

use std::io::Cursor;

use bytes::Bytes;
use image::{DynamicImage, ImageDecoder, ImageReader};
use serde::{Deserialize, Serialize};

use crate::error::{Classify, Disposition};

pub use geometry::{Plan, Transform, TransformRecord, plan};

/// What Kling accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    pub max_bytes: u64,
    pub min_side: u32,
    pub max_aspect: f64,
}

impl Spec {
    pub const KLING: Spec = Spec {
        max_bytes: 10 * 1024 * 1024,
        min_side: 300,
        max_aspect: 2.5,
    };
}

/// What the worker is willing to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Larger images are refused before decoding (decompression bombs).
    pub max_pixels: u64,
    pub max_side: u32,
    pub max_input_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pixels: 100_000_000,
            max_side: 30_000,
            max_input_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Jpeg,
    Png,
    Webp,
    Gif,
    Bmp,
    Tiff,
    Other,
}

impl SourceFormat {
    fn from_image(f: image::ImageFormat) -> Self {
        match f {
            image::ImageFormat::Jpeg => Self::Jpeg,
            image::ImageFormat::Png => Self::Png,
            image::ImageFormat::WebP => Self::Webp,
            image::ImageFormat::Gif => Self::Gif,
            image::ImageFormat::Bmp => Self::Bmp,
            image::ImageFormat::Tiff => Self::Tiff,
            _ => Self::Other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Jpeg,
    Png,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            Self::Jpeg => "jpg",
            Self::Png => "png",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
        }
    }
}

/// Header facts about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub format: SourceFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// EXIF orientation 1..=8; 1 when absent.
    pub orientation: u8,
    /// JPEG ends with EOI / PNG ends with IEND. A file cut short passes a
    /// header probe, so this O(1) tail check keeps it from going out as-is.
    #[serde(default = "yes")]
    pub complete: bool,
}

fn yes() -> bool {
    true
}

fn has_end_marker(format: image::ImageFormat, data: &[u8]) -> bool {
    match format {
        // EOI is normally at the end; files with trailers (motion photos)
        // have it earlier, so look further only when the tail lacks it.
        image::ImageFormat::Jpeg => {
            let eoi = |d: &[u8]| d.windows(2).any(|w| w == [0xFF, 0xD9]);
            eoi(&data[data.len().saturating_sub(64)..]) || eoi(data)
        }
        image::ImageFormat::Png => {
            data.len() >= 12 && &data[data.len() - 8..data.len() - 4] == b"IEND"
        }
        _ => true,
    }
}

/// One way an image is out of spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Violation {
    Format {
        format: SourceFormat,
    },
    TooLarge {
        bytes: u64,
        max: u64,
    },
    TooSmall {
        width: u32,
        height: u32,
        min: u32,
    },
    Aspect {
        width: u32,
        height: u32,
        ratio: f64,
    },
    Orientation {
        exif: u8,
    },
    /// No end marker: possibly truncated; decoded to find out.
    Incomplete,
}

/// The image that goes to Kling.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Exactly what is sent.
    pub bytes: Bytes,
    pub format: OutputFormat,
    pub width: u32,
    pub height: u32,
    pub source: Probe,
    /// What was out of spec (empty: passed through).
    pub violations: Vec<Violation>,
    pub transforms: TransformRecord,
}

impl Prepared {
    pub fn is_passthrough(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Header-only probe; never decodes pixels.
pub fn probe(data: &[u8]) -> Result<Probe, PrepareError> {
    if data.is_empty() {
        return Err(PrepareError::Empty);
    }
    let format = image::guess_format(data).map_err(|_| PrepareError::UnknownFormat)?;
    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    // The probe allocates no pixels; size limits are judged by `prepare`
    // with a clear reason, not by the decoder's allocation guard.
    reader.no_limits();
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| PrepareError::Undecodable {
            reason: e.to_string(),
        })?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(PrepareError::Undecodable {
            reason: format!("header declares {width}x{height}"),
        });
    }
    let orientation = decoder.orientation().map(|o| o.to_exif()).unwrap_or(1);
    Ok(Probe {
        format: SourceFormat::from_image(format),
        width,
        height,
        bytes: data.len() as u64,
        orientation,
        complete: has_end_marker(format, data),
    })
}

/// Where a probe is out of spec; empty means send it byte for byte.
pub fn check(p: &Probe, spec: &Spec) -> Vec<Violation> {
    let mut v = Vec::new();
    if !matches!(p.format, SourceFormat::Jpeg | SourceFormat::Png) {
        v.push(Violation::Format { format: p.format });
    }
    if p.bytes > spec.max_bytes {
        v.push(Violation::TooLarge {
            bytes: p.bytes,
            max: spec.max_bytes,
        });
    }
    if p.width < spec.min_side || p.height < spec.min_side {
        v.push(Violation::TooSmall {
            width: p.width,
            height: p.height,
            min: spec.min_side,
        });
    }
    let ratio = f64::from(p.width) / f64::from(p.height);
    if ratio > spec.max_aspect || ratio < 1.0 / spec.max_aspect {
        v.push(Violation::Aspect {
            width: p.width,
            height: p.height,
            ratio,
        });
    }
    if p.orientation != 1 {
        v.push(Violation::Orientation {
            exif: p.orientation,
        });
    }
    if !p.complete {
        v.push(Violation::Incomplete);
    }
    v
}

/// Pixels a decode of this image holds; what a pixel budget reserves.
pub fn estimate_decode_pixels(p: &Probe) -> u64 {
    u64::from(p.width) * u64::from(p.height)
}

/// JPEG qualities tried, best first, before shrinking.
const JPEG_QUALITIES: [u8; 4] = [90, 80, 70, 60];
/// Each shrink step keeps this fraction of each side.
const SHRINK_STEP: f64 = 0.8;
/// Opaque images are padded white, images with transparency transparent.
pub const PAD_OPAQUE: [u8; 4] = [255, 255, 255, 255];
pub const PAD_TRANSPARENT: [u8; 4] = [0, 0, 0, 0];

/// Make `data` acceptable to Kling. In-spec input comes back as the same
/// `Bytes`, untouched.
pub fn prepare(data: Bytes, spec: &Spec, limits: &Limits) -> Result<Prepared, PrepareError> {
    if data.len() as u64 > limits.max_input_bytes {
        return Err(PrepareError::InputTooLarge {
            bytes: data.len() as u64,
            max: limits.max_input_bytes,
        });
    }
    let source = probe(&data)?;
    // Decoders fill a cut-short JPEG with grey instead of failing.
    if source.format == SourceFormat::Jpeg && !source.complete {
        return Err(PrepareError::Truncated);
    }
    // Bombs are refused even when in spec: they would reach Kling otherwise.
    if source.width > limits.max_side || source.height > limits.max_side {
        return Err(PrepareError::DimensionTooLarge {
            width: source.width,
            height: source.height,
            max_side: limits.max_side,
        });
    }
    if estimate_decode_pixels(&source) > limits.max_pixels {
        return Err(PrepareError::TooManyPixels {
            width: source.width,
            height: source.height,
            max_pixels: limits.max_pixels,
        });
    }
    let violations = check(&source, spec);
    if violations.is_empty() {
        let format = if source.format == SourceFormat::Png {
            OutputFormat::Png
        } else {
            OutputFormat::Jpeg
        };
        let transforms = TransformRecord {
            source: [source.width, source.height],
            output: [source.width, source.height],
            steps: vec![],
        };
        return Ok(Prepared {
            bytes: data,
            format,
            width: source.width,
            height: source.height,
            source,
            violations,
            transforms,
        });
    }
    let img = decode(&data, limits)?;
    drop(data);
    fix(img, source, violations, spec)
}

fn decode(data: &[u8], limits: &Limits) -> Result<DynamicImage, PrepareError> {
    let mut reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| PrepareError::Undecodable {
            reason: e.to_string(),
        })?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    // Room for a 16-bit RGBA decode of the largest allowed image.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    reader.limits(l);
    reader.decode().map_err(|e| PrepareError::Undecodable {
        reason: e.to_string(),
    })
}

fn fix(
    img: DynamicImage,
    source: Probe,
    violations: Vec<Violation>,
    spec: &Spec,
) -> Result<Prepared, PrepareError> {
    let alpha = img.color().has_alpha() && has_transparency(&img);
    // 8 bits per channel: 16-bit and float inputs are converted, CMYK JPEGs
    // were already converted to RGB by the decoder.
    let mut img = if alpha {
        DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(img.to_rgb8())
    };
    let mut steps = Vec::new();
    if source.orientation != 1
        && let Some(o) = image::metadata::Orientation::from_exif(source.orientation)
    {
        img.apply_orientation(o);
        steps.push(Transform::Orient {
            exif: source.orientation,
        });
    }
    let p = plan(source.width, source.height, source.orientation, spec);
    let (l, t, r, b) = p.pad;
    if l + t + r + b > 0 {
        let color = if alpha { PAD_TRANSPARENT } else { PAD_OPAQUE };
        img = pad(&img, p, color);
        steps.push(Transform::Pad {
            left: l,
            top: t,
            right: r,
            bottom: b,
            color,
        });
    }
    let padded = p.padded();
    if p.output != padded {
        img = img.resize_exact(
            p.output.0,
            p.output.1,
            image::imageops::FilterType::CatmullRom,
        );
        steps.push(Transform::Resize {
            from: [padded.0, padded.1],
            to: [p.output.0, p.output.1],
        });
    }
    let format = if alpha {
        OutputFormat::Png
    } else {
        OutputFormat::Jpeg
    };
    let base = img;
    let mut current: Option<DynamicImage> = None;
    let mut size = p.output;
    loop {
        let work = current.as_ref().unwrap_or(&base);
        let qualities: &[u8] = if format == OutputFormat::Jpeg {
            &JPEG_QUALITIES
        } else {
            &[0]
        };
        for &q in qualities {
            let bytes = encode(work, format, q)?;
            if bytes.len() as u64 <= spec.max_bytes {
                let mut steps = steps.clone();
                if size != p.output {
                    steps.push(Transform::Resize {
                        from: [p.output.0, p.output.1],
                        to: [size.0, size.1],
                    });
                }
                let quality = (format == OutputFormat::Jpeg).then_some(q);
                steps.push(Transform::Encode { format, quality });
                let transforms = TransformRecord {
                    source: [source.width, source.height],
                    output: [size.0, size.1],
                    steps,
                };
                return Ok(Prepared {
                    bytes: Bytes::from(bytes),
                    format,
                    width: size.0,
                    height: size.1,
                    source,
                    violations,
                    transforms,
                });
            }
        }
        let next = geometry::shrink(size.0, size.1, SHRINK_STEP, spec);
        if next == size {
            return Err(PrepareError::CannotFit {
                width: size.0,
                height: size.1,
            });
        }
        size = next;
        current = Some(base.resize_exact(size.0, size.1, image::imageops::FilterType::CatmullRom));
    }
}

fn has_transparency(img: &DynamicImage) -> bool {
    match img {
        DynamicImage::ImageRgba8(i) => i.pixels().any(|p| p[3] < 255),
        DynamicImage::ImageLumaA8(i) => i.pixels().any(|p| p[1] < 255),
        DynamicImage::ImageRgba16(i) => i.pixels().any(|p| p[3] < u16::MAX),
        DynamicImage::ImageLumaA16(i) => i.pixels().any(|p| p[1] < u16::MAX),
        other => other.to_rgba8().pixels().any(|p| p[3] < 255),
    }
}

fn pad(img: &DynamicImage, p: Plan, color: [u8; 4]) -> DynamicImage {
    let (w, h) = p.padded();
    let (x, y) = (i64::from(p.pad.0), i64::from(p.pad.1));
    match img {
        DynamicImage::ImageRgba8(src) => {
            let mut canvas = image::RgbaImage::from_pixel(w, h, image::Rgba(color));
            image::imageops::replace(&mut canvas, src, x, y);
            DynamicImage::ImageRgba8(canvas)
        }
        other => {
            let mut canvas =
                image::RgbImage::from_pixel(w, h, image::Rgb([color[0], color[1], color[2]]));
            image::imageops::replace(&mut canvas, &other.to_rgb8(), x, y);
            DynamicImage::ImageRgb8(canvas)
        }
    }
}

fn encode(img: &DynamicImage, format: OutputFormat, quality: u8) -> Result<Vec<u8>, PrepareError> {
    let mut out = Vec::new();
    let r = match format {
        OutputFormat::Jpeg => {
            let rgb = img.to_rgb8();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(&rgb)
        }
        OutputFormat::Png => {
            img.write_with_encoder(image::codecs::png::PngEncoder::new_with_quality(
                &mut out,
                image::codecs::png::CompressionType::Default,
                image::codecs::png::FilterType::Adaptive,
            ))
        }
    };
    r.map_err(|e| PrepareError::Encode {
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Why an image cannot be prepared. A bad image never gets better: all
/// permanent.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("image is empty (0 bytes)")]
    Empty,
    #[error("image format not recognized; send JPEG, PNG, WebP, GIF, BMP or TIFF")]
    UnknownFormat,
    #[error("image cannot be decoded: {reason}")]
    Undecodable { reason: String },
    #[error("image is truncated: the JPEG has no end-of-image marker")]
    Truncated,
    #[error("image is {bytes} bytes, over the {max}-byte limit")]
    InputTooLarge { bytes: u64, max: u64 },
    #[error(
        "image is {width}x{height}, over MAX_IMAGE_PIXELS {max_pixels}; refused as a possible decompression bomb"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("image is {width}x{height}; a side over {max_side} px is refused")]
    DimensionTooLarge {
        width: u32,
        height: u32,
        max_side: u32,
    },
    #[error("image cannot be made to fit 10 MB (stuck at {width}x{height})")]
    CannotFit { width: u32, height: u32 },
    #[error("re-encoding the image failed: {reason}")]
    Encode { reason: String },
}

impl Classify for PrepareError {
    fn disposition(&self) -> Disposition {
        Disposition::Permanent
    }

    fn code(&self) -> &'static str {
        match self {
            PrepareError::Empty => "image_empty",
            PrepareError::UnknownFormat => "image_format_unknown",
            PrepareError::Undecodable { .. } => "image_undecodable",
            PrepareError::Truncated => "image_truncated",
            PrepareError::InputTooLarge { .. } => "image_too_large",
            PrepareError::TooManyPixels { .. } => "image_too_many_pixels",
            PrepareError::DimensionTooLarge { .. } => "image_dimension_too_large",
            PrepareError::CannotFit { .. } => "image_cannot_fit",
            PrepareError::Encode { .. } => "image_encode_failed",
        }
    }
}

#[cfg(test)]
mod tests;
