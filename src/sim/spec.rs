//! The contract's input spec, enforced the way the real API does: on the
//! decoded bytes, by magic bytes, never by what the caller claims.
//!
//! Every rejection here is answered with code 1201 and its message.

use std::io::Cursor;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use image::{DynamicImage, ImageFormat, ImageReader};
use sha2::{Digest, Sha256};

pub(super) const MAX_FILE_BYTES: usize = 10 * 1024 * 1024;
const MIN_SIDE: u32 = 300;
/// Aspect ratio bound, as the fraction 5/2 = 2.5.
const MAX_ASPECT_NUM: u64 = 5;
const MAX_ASPECT_DEN: u64 = 2;
/// The simulator's own guard against decompression bombs: a 10 MB file can
/// claim any size in its header.
const MAX_PIXELS: u64 = 64_000_000;

/// Standard alphabet; padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why an `image` value is outside the input spec.
#[derive(Debug, thiserror::Error)]
pub(super) enum Rejection {
    #[error("image must be bare base64: the data: URI prefix is not allowed")]
    DataUri,
    #[error("image URL not reachable from simulator")]
    Url,
    #[error("image is not valid base64")]
    Base64,
    #[error("image file is {0} bytes; the limit is 10 MB (10485760 bytes)")]
    TooLarge(usize),
    #[error("image format must be JPEG or PNG, got {0}")]
    Format(String),
    #[error("image is {0}x{1}; width and height must each be at least 300 px")]
    TooSmall(u32, u32),
    #[error("image is {0}x{1}; aspect ratio must be between 1:2.5 and 2.5:1")]
    Aspect(u32, u32),
    #[error("image has {0} pixels; the simulator decodes at most 64 megapixels")]
    TooManyPixels(u64),
    #[error("image could not be decoded: {0}")]
    Undecodable(String),
}

/// An in-spec image, decoded.
pub(super) struct Accepted {
    pub image: DynamicImage,
    /// SHA-256 of the decoded file bytes.
    pub sha256: [u8; 32],
}

/// Validate the `image` field and decode it. CPU-heavy: call off the runtime.
pub(super) fn accept(image: &str) -> Result<Accepted, Rejection> {
    if image.starts_with("data:") {
        return Err(Rejection::DataUri);
    }
    if image.starts_with("http://") || image.starts_with("https://") {
        return Err(Rejection::Url);
    }
    let bytes = BASE64.decode(image).map_err(|_| Rejection::Base64)?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(Rejection::TooLarge(bytes.len()));
    }
    let format = match image::guess_format(&bytes) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png)) => f,
        Ok(other) => return Err(Rejection::Format(format!("{other:?}").to_lowercase())),
        Err(_) => return Err(Rejection::Format("an unrecognised format".into())),
    };

    let (w, h) = reader(&bytes, format)
        .into_dimensions()
        .map_err(|e| Rejection::Undecodable(e.to_string()))?;
    check_dimensions(w, h)?;

    let image = reader(&bytes, format)
        .decode()
        .map_err(|e| Rejection::Undecodable(e.to_string()))?;
    Ok(Accepted {
        image,
        sha256: Sha256::digest(&bytes).into(),
    })
}

/// Width, height and aspect rules of the contract (plus the pixel guard).
fn check_dimensions(w: u32, h: u32) -> Result<(), Rejection> {
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(Rejection::TooSmall(w, h));
    }
    let (w64, h64) = (u64::from(w), u64::from(h));
    // w/h <= 5/2 and h/w <= 5/2, in integers.
    if w64 * MAX_ASPECT_DEN > h64 * MAX_ASPECT_NUM || h64 * MAX_ASPECT_DEN > w64 * MAX_ASPECT_NUM {
        return Err(Rejection::Aspect(w, h));
    }
    if w64 * h64 > MAX_PIXELS {
        return Err(Rejection::TooManyPixels(w64 * h64));
    }
    Ok(())
}

/// A reader with the image crate's default limits (512 MiB of allocations).
fn reader(bytes: &[u8], format: ImageFormat) -> ImageReader<Cursor<&[u8]>> {
    ImageReader::with_format(Cursor::new(bytes), format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimension_rules_have_inclusive_bounds() {
        for (w, h) in [(300, 300), (750, 300), (300, 750), (4000, 3000)] {
            assert!(check_dimensions(w, h).is_ok(), "{w}x{h}");
        }
        for (w, h) in [
            (299, 400),
            (400, 299),
            (751, 300),
            (300, 751),
            (10_000, 8_000),
        ] {
            assert!(check_dimensions(w, h).is_err(), "{w}x{h}");
        }
    }
}
