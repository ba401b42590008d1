//! Test helpers for `prepare`: images generated in code (no binary
//! fixtures), an EXIF orientation injector for JPEGs and a PNG header
//! forger for decompression-bomb tests.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, RgbImage};

/// A smooth RGB gradient, compresses well in every format.
pub fn gradient(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 255 / width.max(1)) as u8,
            (y * 255 / height.max(1)) as u8,
            128,
        ])
    }))
}

/// Deterministic pseudo-random bytes (xorshift64), incompressible.
pub fn noise_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

/// Encode `image` in `format` with `image`'s default encoder settings.
pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// A JPEG with 4:2:0 chroma, as phones and most cameras write
/// (`image`'s encoder writes 4:4:4).
pub fn jpeg_420(image: &image::RgbImage, quality: u8) -> Vec<u8> {
    super::jpeg::encode_rgb(image, quality).unwrap()
}

pub use super::probe::with_exif_orientation;

/// A PNG that declares `width x height` RGB pixels but holds only the
/// signature, a valid IHDR, a tiny IDAT (an empty zlib stream) and IEND:
/// a few dozen bytes that a naive decoder would turn into a huge buffer.
pub fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    push_chunk(&mut out, b"IHDR", &ihdr);
    push_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    push_chunk(&mut out, b"IEND", &[]);
    out
}

fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (IEEE), as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Offset of the first IDAT chunk (its length field) in a PNG.
pub fn png_idat_offset(png: &[u8]) -> usize {
    png.windows(4).position(|w| w == b"IDAT").unwrap() - 4
}

#[test]
fn crc32_matches_the_png_reference() {
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
}
