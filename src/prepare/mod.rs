//! Image preparation: probe a source image cheaply, check it against the
//! Kling image-recognize input spec, and fix an out-of-spec image while
//! recording every geometric transform, so that masks returned for the
//! prepared image can be mapped back onto the source pixel grid.
//!
//! This module owns pixels and nothing else: it must know nothing about
//! RabbitMQ, S3 or HTTP. It is synchronous and CPU-bound; callers run
//! [`prepare`] on a blocking pool and reserve [`estimate_decode_pixels`]
//! from their pixel budget first.
//!
//! The flow is [`probe()`] (header only) -> limits -> [`check()`] -> either
//! passthrough (the caller's `Bytes`, untouched) or the fix pipeline:
//! decode -> 8-bit RGB(A) -> EXIF orientation -> resize -> pad -> encode
//! (a JPEG that is not resized goes through the same steps as YCbCr planes).
//! The geometry is planned by the pure [`plan()`] function and recorded in a
//! [`TransformRecord`]; see `geometry.rs` for the coordinate conventions.

pub mod align;
mod check;
mod fix;
mod geometry;
/// The JPEG codec; public for the benchmark and the build-info metric.
#[doc(hidden)]
pub mod jpeg;
mod libjpeg;
mod probe;
#[cfg(test)]
pub(crate) mod testkit;
mod turn;

pub use check::{Violation, check};
pub use geometry::{
    Margins, Plan, Transform, TransformRecord, displayed_dims, displayed_to_stored, plan,
};
pub use probe::{ColourModel, Probe, SourceFormat, probe, with_exif_orientation};

use crate::error::{Classify, Disposition};

/// The input contract of the API the prepared image is sent to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// Largest accepted file, in bytes.
    pub max_bytes: u64,
    /// Smallest accepted width and height, in pixels.
    pub min_side: u32,
    /// Largest accepted long-side / short-side ratio (must be >= 1).
    pub max_aspect: f64,
}

impl Spec {
    /// Kling image-recognize: JPEG or PNG, at most 10 MB, sides >= 300 px,
    /// aspect ratio between 1:2.5 and 2.5:1 inclusive.
    pub const KLING: Spec = Spec {
        max_bytes: 10 * 1024 * 1024,
        min_side: 300,
        max_aspect: 2.5,
    };
}

impl Default for Spec {
    fn default() -> Self {
        Spec::KLING
    }
}

/// Resource limits enforced from the header, before any pixel is decoded.
/// (Deliberately not `Copy`: callers hold it in shared config and clone it.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest `width * height` accepted (decoded, and for the output canvas).
    pub max_pixels: u64,
    /// Largest width or height accepted.
    pub max_side: u32,
    /// Largest encoded input accepted, in bytes.
    pub max_input_bytes: u64,
}

impl Default for Limits {
    /// 100 megapixels, 30 000 px a side, 64 MiB of input (a 100 MP JPEG at
    /// high quality is ~30-40 MB).
    fn default() -> Self {
        Limits {
            max_pixels: 100_000_000,
            max_side: 30_000,
            max_input_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The encoding of a prepared image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Jpeg,
    Png,
}

impl OutputFormat {
    /// File extension without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "jpg",
            OutputFormat::Png => "png",
        }
    }

    /// MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Png => "image/png",
        }
    }

    fn from_source(format: SourceFormat) -> Option<Self> {
        match format {
            SourceFormat::Jpeg => Some(OutputFormat::Jpeg),
            SourceFormat::Png => Some(OutputFormat::Png),
            _ => None,
        }
    }
}

/// An image ready to send, with what was done to get there.
#[derive(Clone)]
pub struct Prepared {
    /// Exactly what goes to Kling.
    pub bytes: bytes::Bytes,
    pub format: OutputFormat,
    pub width: u32,
    pub height: u32,
    /// The source as probed.
    pub source: Probe,
    /// What was out of spec (empty for passthrough).
    pub violations: Vec<Violation>,
    /// How to map prepared coordinates back to the source.
    pub transforms: TransformRecord,
}

impl Prepared {
    /// True when `bytes` are the source bytes, untouched.
    pub fn is_passthrough(&self) -> bool {
        self.transforms.steps.is_empty()
    }
}

// Hand-written so a stray `?prepared` never dumps megabytes into a log.
impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .field("format", &self.format)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("source", &self.source)
            .field("violations", &self.violations)
            .field("transforms", &self.transforms)
            .finish()
    }
}

/// Why an image could not be prepared. Every variant is permanent: the same
/// bytes will fail the same way on every attempt.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("the image is empty (0 bytes); the job must carry an image")]
    Empty,
    #[error(
        "the image format is not recognised from its first bytes; send JPEG, PNG, WebP, GIF, BMP or TIFF"
    )]
    UnknownFormat,
    #[error("{format} images are not supported; send JPEG, PNG, WebP, GIF, BMP or TIFF")]
    UnsupportedFormat { format: String },
    #[error("the image cannot be decoded: {reason}")]
    Undecodable { reason: String },
    #[error("the image is truncated ({reason}); re-upload the complete file")]
    Truncated { reason: String },
    #[error("the image is {bytes} bytes, over the {max} byte input limit")]
    InputTooLarge { bytes: u64, max: u64 },
    #[error(
        "the image declares {width}x{height} pixels, over the {max_pixels} pixel limit (possible decompression bomb)"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("the image declares {width}x{height} pixels; no side may exceed {max_side}")]
    DimensionTooLarge {
        width: u32,
        height: u32,
        max_side: u32,
    },
    #[error("decoding the image exceeded a resource limit: {reason}")]
    ResourceLimit { reason: String },
    #[error(
        "could not fit the image under {max_bytes} bytes: still {bytes} bytes at {width}x{height}, the smallest allowed size, and the lowest quality"
    )]
    CannotFit {
        width: u32,
        height: u32,
        bytes: u64,
        max_bytes: u64,
    },
    #[error("encoding the prepared image failed: {reason}")]
    Encode { reason: String },
}

impl Classify for PrepareError {
    /// A bad image never gets better: everything is permanent.
    fn disposition(&self) -> Disposition {
        Disposition::Permanent
    }

    fn code(&self) -> &'static str {
        match self {
            PrepareError::Empty => "image_empty",
            PrepareError::UnknownFormat => "image_format_unknown",
            PrepareError::UnsupportedFormat { .. } => "image_format_unsupported",
            PrepareError::Undecodable { .. } => "image_undecodable",
            PrepareError::Truncated { .. } => "image_truncated",
            PrepareError::InputTooLarge { .. } => "image_input_too_large",
            PrepareError::TooManyPixels { .. } => "image_too_many_pixels",
            PrepareError::DimensionTooLarge { .. } => "image_dimension_too_large",
            PrepareError::ResourceLimit { .. } => "image_resource_limit",
            PrepareError::CannotFit { .. } => "image_cannot_fit",
            PrepareError::Encode { .. } => "image_encode_failed",
        }
    }
}

/// Pixels a decode of this image needs: what a pixel budget should reserve.
/// A fix holds a few buffers of about this size at once (decoded, oriented,
/// output canvas); the canvas is capped at twice this count, or, for
/// sources smaller than the smallest in-spec canvas, at twice that canvas
/// (2 x 300 x 750 = 450 000 pixels for Kling).
pub fn estimate_decode_pixels(probe: &Probe) -> u64 {
    u64::from(probe.width) * u64::from(probe.height)
}

/// Probe, check and (only if needed) fix `data` for `spec`.
///
/// In-spec input comes back as a passthrough holding the same `Bytes`
/// (no copy, no decode, no re-encode) and an empty transform record.
/// Anything else is decoded and rebuilt; the result always satisfies
/// `check(&probe(&out.bytes)?, spec).is_empty()`.
pub fn prepare(data: bytes::Bytes, spec: &Spec, limits: &Limits) -> Result<Prepared, PrepareError> {
    let len = data.len() as u64;
    if len > limits.max_input_bytes {
        return Err(PrepareError::InputTooLarge {
            bytes: len,
            max: limits.max_input_bytes,
        });
    }
    let source = probe(&data)?;
    check_limits(&source, limits)?;
    probe::verify_complete(source.format, &data)?;
    if source.format == SourceFormat::Png {
        probe::check_png_metadata(&data)?;
    }

    let violations = check(&source, spec);
    if violations.is_empty()
        && let Some(format) = OutputFormat::from_source(source.format)
    {
        return Ok(Prepared {
            bytes: data,
            format,
            width: source.width,
            height: source.height,
            source,
            violations,
            transforms: TransformRecord::identity(source.width, source.height),
        });
    }
    fix::fix(&data, source, violations, spec, limits)
}

/// Refuse decompression bombs from the header alone. Callers that reserve
/// a pixel budget run it first, so a bomb never waits for budget.
pub fn check_limits(probe: &Probe, limits: &Limits) -> Result<(), PrepareError> {
    let (width, height) = (probe.width, probe.height);
    if estimate_decode_pixels(probe) > limits.max_pixels {
        return Err(PrepareError::TooManyPixels {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(PrepareError::DimensionTooLarge {
            width,
            height,
            max_side: limits.max_side,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
