//! Header-only probing (format, dimensions, size, EXIF orientation) and the
//! cheap end-of-file completeness check. Part of `prepare`: no pixel is
//! decoded here, and nothing here knows about RabbitMQ, S3 or HTTP.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

use image::{ImageDecoder, ImageError, ImageFormat, ImageReader};

use super::PrepareError;

/// Metadata allowed to the header parsers (ICC profiles, EXIF, text chunks).
const PROBE_METADATA_ALLOC: u64 = 64 * 1024 * 1024;

/// The container format of a source image, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Jpeg,
    Png,
    Webp,
    Gif,
    Bmp,
    Tiff,
    /// Recognised but not decodable by this build; never produced by a
    /// successful [`probe`], kept so recorded manifests stay readable.
    Other,
}

impl SourceFormat {
    fn from_image(format: ImageFormat) -> Self {
        match format {
            ImageFormat::Jpeg => SourceFormat::Jpeg,
            ImageFormat::Png => SourceFormat::Png,
            ImageFormat::WebP => SourceFormat::Webp,
            ImageFormat::Gif => SourceFormat::Gif,
            ImageFormat::Bmp => SourceFormat::Bmp,
            ImageFormat::Tiff => SourceFormat::Tiff,
            _ => SourceFormat::Other,
        }
    }

    /// File extension for an archived copy of the source.
    pub fn extension(self) -> &'static str {
        match self {
            SourceFormat::Jpeg => "jpg",
            SourceFormat::Png => "png",
            SourceFormat::Webp => "webp",
            SourceFormat::Gif => "gif",
            SourceFormat::Bmp => "bmp",
            SourceFormat::Tiff => "tiff",
            SourceFormat::Other => "bin",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            SourceFormat::Jpeg => "image/jpeg",
            SourceFormat::Png => "image/png",
            SourceFormat::Webp => "image/webp",
            SourceFormat::Gif => "image/gif",
            SourceFormat::Bmp => "image/bmp",
            SourceFormat::Tiff => "image/tiff",
            SourceFormat::Other => "application/octet-stream",
        }
    }

    pub(super) fn image_format(self) -> Option<ImageFormat> {
        match self {
            SourceFormat::Jpeg => Some(ImageFormat::Jpeg),
            SourceFormat::Png => Some(ImageFormat::Png),
            SourceFormat::Webp => Some(ImageFormat::WebP),
            SourceFormat::Gif => Some(ImageFormat::Gif),
            SourceFormat::Bmp => Some(ImageFormat::Bmp),
            SourceFormat::Tiff => Some(ImageFormat::Tiff),
            SourceFormat::Other => None,
        }
    }
}

/// How the file stores its pixels, from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColourModel {
    /// 8 bits per channel or fewer: grey, palette, RGB, RGBA.
    #[default]
    Standard,
    /// CMYK (print workflows): many decoders get its colours wrong.
    Cmyk,
    /// More than 8 bits per channel (16-bit PNG, float TIFF).
    HighBitDepth,
}

impl ColourModel {
    fn of(colour: image::ExtendedColorType) -> Self {
        use image::ExtendedColorType as E;
        match colour {
            E::Cmyk8 | E::Cmyk16 => ColourModel::Cmyk,
            c if c.channel_count() > 0 && c.bits_per_pixel() > 8 * u16::from(c.channel_count()) => {
                ColourModel::HighBitDepth
            }
            _ => ColourModel::Standard,
        }
    }
}

/// What the header says about an image. `width` and `height` are the
/// stored (un-rotated) dimensions; `orientation` is the EXIF value, 1..=8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    pub format: SourceFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    pub orientation: u8,
    #[serde(default)]
    pub colour: ColourModel,
}

/// Read format, dimensions and EXIF orientation from the header only.
///
/// Cost does not grow with the file: the format comes from the magic bytes
/// and the decoder reads headers only. The JPEG decoder of `image` copies
/// whatever it is given, so it is handed just the marker segments up to the
/// first scan. Image dimensions are not judged here (see `Limits`).
pub fn probe(data: &[u8]) -> Result<Probe, PrepareError> {
    if data.is_empty() {
        return Err(PrepareError::Empty);
    }
    let image_format = image::guess_format(data).map_err(|_| PrepareError::UnknownFormat)?;
    let format = SourceFormat::from_image(image_format);
    if format == SourceFormat::Other {
        return Err(PrepareError::UnsupportedFormat {
            format: format!("{image_format:?}"),
        });
    }
    // JPEG: the frame header and the Exif segment say everything, read in
    // one walk over the marker segments (no decoder, no copy).
    let fast = match format {
        SourceFormat::Jpeg => match jpeg_frame(data) {
            Err(NoScan::CutShort) => return Err(truncated(JPEG_HEADERS_CUT)),
            found => found.ok().flatten(),
        },
        _ => None,
    };
    let (width, height, orientation, colour) = match fast {
        Some(f) => f,
        None => guard_panic(|| {
            let header = match format {
                SourceFormat::Jpeg => jpeg_header_len(data).map_or(data, |end| &data[..end]),
                _ => data,
            };
            let mut reader = ImageReader::with_format(Cursor::new(header), image_format);
            let mut limits = image::Limits::no_limits();
            limits.max_alloc = Some(PROBE_METADATA_ALLOC);
            reader.limits(limits);
            let mut decoder = reader.into_decoder().map_err(from_image_error)?;
            let (width, height) = decoder.dimensions();
            // A damaged EXIF block must not sink an otherwise good image.
            let orientation = decoder.orientation().map_or(1, |o| o.to_exif());
            let colour = ColourModel::of(decoder.original_color_type());
            Ok((width, height, orientation, colour))
        })?,
    };
    if width == 0 || height == 0 {
        return Err(PrepareError::Undecodable {
            reason: format!("the header declares {width}x{height} pixels"),
        });
    }
    Ok(Probe {
        format,
        width,
        height,
        bytes: data.len() as u64,
        orientation,
        colour,
    })
}

/// Reject JPEG and PNG files whose end marker is missing.
///
/// Passthrough never decodes, and the JPEG decoder fills a truncated scan
/// with grey instead of failing, so truncation is detected structurally: a
/// JPEG must contain an EOI marker after its first scan header, a PNG an
/// `IEND` chunk. Trailing bytes after the marker are tolerated. The search
/// runs from the end, so a complete file costs a few bytes.
pub(super) fn verify_complete(format: SourceFormat, data: &[u8]) -> Result<(), PrepareError> {
    let (body, marker, what): (&[u8], &[u8], &str) = match format {
        SourceFormat::Jpeg => match jpeg_header_len(data) {
            Some(end) => (&data[end..], &[0xFF, 0xD9], "no JPEG end-of-image marker"),
            None => return Err(truncated(JPEG_HEADERS_CUT)),
        },
        SourceFormat::Png => (
            data.get(8..).unwrap_or_default(),
            b"IEND",
            "no PNG IEND chunk",
        ),
        _ => return Ok(()),
    };
    if body.windows(marker.len()).rev().any(|w| w == marker) {
        Ok(())
    } else {
        Err(truncated(what))
    }
}

/// Largest inflated size of one compressed PNG metadata chunk (iCCP, zTXt,
/// iTXt). Real ICC profiles are well under 1 MiB.
const PNG_METADATA_MAX_INFLATED: usize = 16 * 1024 * 1024;

/// Refuse a PNG whose compressed metadata chunks (before the pixels)
/// inflate past [`PNG_METADATA_MAX_INFLATED`]: a chunk bomb. `image` skips
/// such chunks, but an in-spec PNG goes to Kling byte for byte, and its
/// decoder may not. Inflating stops at the limit, so the cost is bounded;
/// PNGs without compressed metadata cost one walk over the chunk headers.
pub(super) fn check_png_metadata(data: &[u8]) -> Result<(), PrepareError> {
    let mut at = 8;
    while let Some(header) = data.get(at..at + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        if kind == b"IDAT" || kind == b"IEND" {
            break;
        }
        let Some(body) = data.get(at + 8..(at + 8).saturating_add(len)) else {
            break; // the decoder reports the truncation
        };
        let compressed = match kind {
            // keyword \0 method, then the zlib stream
            b"iCCP" | b"zTXt" => body
                .iter()
                .position(|&b| b == 0)
                .and_then(|nul| body.get(nul + 2..)),
            // keyword \0 flag method language \0 translated \0 text
            b"iTXt" => body.iter().position(|&b| b == 0).and_then(|nul| {
                let flag = *body.get(nul + 1)?;
                let rest = body.get(nul + 3..)?;
                let lang = rest.iter().position(|&b| b == 0)?;
                let rest = rest.get(lang + 1..)?;
                let translated = rest.iter().position(|&b| b == 0)?;
                (flag == 1).then(|| rest.get(translated + 1..)).flatten()
            }),
            _ => None,
        };
        if let Some(stream) = compressed {
            let inflated = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(
                stream,
                PNG_METADATA_MAX_INFLATED,
            );
            if let Err(e) = inflated
                && e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput
            {
                return Err(PrepareError::ResourceLimit {
                    reason: format!(
                        "the PNG {} chunk inflates past {} MiB (possible decompression bomb)",
                        String::from_utf8_lossy(kind),
                        PNG_METADATA_MAX_INFLATED >> 20
                    ),
                });
            }
        }
        at = at.saturating_add(12).saturating_add(len);
    }
    Ok(())
}

/// Why a JPEG's file ends before its first scan does.
const JPEG_HEADERS_CUT: &str = "the JPEG headers end before the first scan";

fn truncated(reason: &str) -> PrepareError {
    PrepareError::Truncated {
        reason: reason.to_owned(),
    }
}

/// Length of a JPEG's header: every marker segment up to and including the
/// first start-of-scan (SOS) segment, or `None` if no scan starts. Stray
/// bytes between segments are skipped, as libjpeg does.
fn jpeg_header_len(data: &[u8]) -> Option<usize> {
    walk_jpeg_header(data, |_, _| {}).ok()
}

/// Why a walk over a JPEG's marker segments found no scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoScan {
    /// The data ends first: a file cut short in its headers.
    CutShort,
    /// No SOI, a segment length under 2, or EOI before any scan.
    Malformed,
}

/// Width, height, EXIF orientation and colour model of a JPEG, from its
/// frame header (SOFn) and its Exif segment (APP1), in one walk over the
/// marker segments up to the first scan; `Ok(None)` when the header has no
/// frame header, an error when the walk does not reach a scan (for a
/// malformed header the decoder then says why).
/// Four components are CMYK (or YCCK); a 12- or 16-bit precision is deep:
/// `image` converts both silently, so the probe reads the marker itself.
fn jpeg_frame(data: &[u8]) -> Result<Option<(u32, u32, u8, ColourModel)>, NoScan> {
    let mut frame = None;
    let mut orientation = 1;
    let mut seen_exif = false;
    walk_jpeg_header(data, |marker, payload| {
        let sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if sof && frame.is_none() && payload.len() >= 6 {
            let height = u32::from(u16::from_be_bytes([payload[1], payload[2]]));
            let width = u32::from(u16::from_be_bytes([payload[3], payload[4]]));
            let colour = if payload[5] == 4 {
                ColourModel::Cmyk
            } else if payload[0] > 8 {
                ColourModel::HighBitDepth
            } else {
                ColourModel::Standard
            };
            frame = Some((width, height, colour));
        }
        if marker == 0xE1 && !seen_exif && payload.starts_with(b"Exif\0\0") {
            seen_exif = true;
            // A damaged Exif block must not sink an otherwise good image.
            orientation = image::metadata::Orientation::from_exif_chunk(&payload[6..])
                .map_or(1, |o| o.to_exif());
        }
    })?;
    Ok(frame.map(|(width, height, colour)| (width, height, orientation, colour)))
}

/// Visit a JPEG's marker segments (`seen(marker, payload)`) up to and
/// including the first SOS; returns the header's length as
/// [`jpeg_header_len`] does, or why no scan was reached.
fn walk_jpeg_header(data: &[u8], mut seen: impl FnMut(u8, &[u8])) -> Result<usize, NoScan> {
    use NoScan::{CutShort, Malformed};
    if data.get(..2).ok_or(CutShort)? != [0xFF, 0xD8] {
        return Err(Malformed);
    }
    let byte = |i: usize| data.get(i).copied().ok_or(CutShort);
    let mut at = 2;
    loop {
        at += data
            .get(at..)
            .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
            .ok_or(CutShort)?;
        while byte(at + 1)? == 0xFF {
            at += 1; // fill bytes
        }
        let marker = byte(at + 1)?;
        at += 2;
        match marker {
            0x00 | 0x01 | 0xD0..=0xD8 => continue, // not a marker, or no payload
            0xD9 => return Err(Malformed),         // EOI before any scan
            _ => {
                let len = usize::from(u16::from_be_bytes([byte(at)?, byte(at + 1)?]));
                if len < 2 {
                    return Err(Malformed);
                }
                let end = at + len;
                seen(
                    marker,
                    data.get(at + 2..end.min(data.len())).ok_or(CutShort)?,
                );
                if marker == 0xDA {
                    return if end <= data.len() {
                        Ok(end)
                    } else {
                        Err(CutShort)
                    };
                }
                at = end;
            }
        }
    }
}

/// Map an `image` error to ours, keeping the decoder's own words.
pub(super) fn from_image_error(err: ImageError) -> PrepareError {
    match err {
        ImageError::Limits(e) => PrepareError::ResourceLimit {
            reason: e.to_string(),
        },
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            PrepareError::Truncated {
                reason: e.to_string(),
            }
        }
        ImageError::Unsupported(e) => PrepareError::Undecodable {
            reason: format!("unsupported feature: {e}"),
        },
        other => PrepareError::Undecodable {
            reason: other.to_string(),
        },
    }
}

/// Run third-party parsing code so that a panic on hostile input becomes
/// an error for this job instead of taking the worker thread down.
pub(super) fn guard_panic<T>(
    f: impl FnOnce() -> Result<T, PrepareError>,
) -> Result<T, PrepareError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(PrepareError::Undecodable {
            reason: "the decoder panicked on this input".to_owned(),
        })
    })
}

/// Insert an APP1 Exif segment holding only `Orientation = orientation`
/// right after the SOI marker of `jpeg`.
pub fn with_exif_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\0\x2A"); // big-endian TIFF header
    tiff.extend_from_slice(&8u32.to_be_bytes()); // first IFD right after it
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&[0, orientation, 0, 0]); // value, padded
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let payload: Vec<u8> = b"Exif\0\0".iter().chain(&tiff).copied().collect();
    let len = u16::try_from(payload.len() + 2).unwrap_or(u16::MAX);

    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::testkit::*;

    #[test]
    fn probe_reads_format_dims_size_and_orientation() {
        let jpeg = encode(&gradient(320, 410), ImageFormat::Jpeg);
        let p = probe(&jpeg).unwrap();
        assert_eq!(
            (p.format, p.width, p.height, p.orientation),
            (SourceFormat::Jpeg, 320, 410, 1)
        );
        assert_eq!(p.bytes, jpeg.len() as u64);

        let rotated = with_exif_orientation(&jpeg, 6);
        assert_eq!(probe(&rotated).unwrap().orientation, 6);

        for (format, expect) in [
            (ImageFormat::Png, SourceFormat::Png),
            (ImageFormat::WebP, SourceFormat::Webp),
            (ImageFormat::Gif, SourceFormat::Gif),
            (ImageFormat::Bmp, SourceFormat::Bmp),
            (ImageFormat::Tiff, SourceFormat::Tiff),
        ] {
            let p = probe(&encode(&gradient(31, 17), format)).unwrap();
            assert_eq!(
                (p.format, p.width, p.height),
                (expect, 31, 17),
                "{format:?}"
            );
        }
    }

    #[test]
    fn probe_reads_only_the_header() {
        // A 20 MB buffer whose every byte after the header is garbage:
        // dims still come back, so nothing past the header was decoded.
        let jpeg = encode(&gradient(640, 480), ImageFormat::Jpeg);
        let end = jpeg_header_len(&jpeg).unwrap();
        let mut big = jpeg[..end].to_vec();
        big.resize(20 << 20, 0xA5);
        let p = probe(&big).unwrap();
        assert_eq!((p.width, p.height, p.bytes), (640, 480, 20 << 20));

        let png = encode(&gradient(640, 480), ImageFormat::Png);
        let mut big = png[..png_idat_offset(&png) + 8].to_vec();
        big.resize(20 << 20, 0x5A);
        assert_eq!(probe(&big).unwrap().width, 640);
    }

    #[test]
    fn probe_errors_are_specific() {
        assert!(matches!(probe(&[]), Err(PrepareError::Empty)));
        assert!(matches!(
            probe(&noise_bytes(4096, 7)),
            Err(PrepareError::UnknownFormat)
        ));
        // ICO is recognised by magic but not built in.
        let ico = [0u8, 0, 1, 0, 1, 0, 16, 16, 0, 0, 1, 0, 32, 0, 0, 0];
        assert!(matches!(
            probe(&ico),
            Err(PrepareError::UnsupportedFormat { .. })
        ));
        let png = encode(&gradient(64, 64), ImageFormat::Png);
        assert!(matches!(
            probe(&png[..20]),
            Err(PrepareError::Truncated { .. } | PrepareError::Undecodable { .. })
        ));
        let mut bad = png.clone();
        bad[16..24].fill(0); // zero width/height with a now-wrong CRC
        assert!(matches!(probe(&bad), Err(PrepareError::Undecodable { .. })));
    }

    #[test]
    fn probe_reports_bomb_dimensions_without_allocating() {
        let p = probe(&png_header_only(100_000, 100_000)).unwrap();
        assert_eq!((p.width, p.height), (100_000, 100_000));
    }

    #[test]
    fn jpeg_header_scan_skips_stray_bytes() {
        let jpeg = encode(&gradient(64, 64), ImageFormat::Jpeg);
        let end = jpeg_header_len(&jpeg).unwrap();
        let mut junk = jpeg[..2].to_vec();
        junk.extend_from_slice(&[0x00, 0x13, 0x37]);
        junk.extend_from_slice(&jpeg[2..]);
        assert_eq!(jpeg_header_len(&junk), Some(end + 3));
        assert_eq!(jpeg_header_len(&jpeg[..end - 1]), None);
    }

    #[test]
    fn a_jpeg_cut_in_its_headers_is_truncated_not_undecodable() {
        let jpeg = encode(&gradient(64, 64), ImageFormat::Jpeg);
        let end = jpeg_header_len(&jpeg).unwrap();
        // Every cut from just after SOI to just before the scan's end.
        for cut in 3..end {
            match probe(&jpeg[..cut]) {
                Err(PrepareError::Truncated { reason }) => assert_eq!(reason, JPEG_HEADERS_CUT),
                other => panic!("cut at {cut} of {end}: {other:?}"),
            }
        }
        // A malformed header is not a truncation: a segment length of 1.
        let mut bad = jpeg[..end].to_vec();
        bad[4..6].copy_from_slice(&[0, 1]);
        assert_eq!(walk_jpeg_header(&bad, |_, _| {}), Err(NoScan::Malformed));
        assert!(!matches!(probe(&bad), Err(PrepareError::Truncated { .. })));
    }

    #[test]
    fn completeness_needs_the_end_marker() {
        let jpeg = encode(&gradient(320, 320), ImageFormat::Jpeg);
        verify_complete(SourceFormat::Jpeg, &jpeg).unwrap();
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"camera trailer");
        verify_complete(SourceFormat::Jpeg, &trailing).unwrap();
        let half = &jpeg[..jpeg.len() / 2];
        assert!(matches!(
            verify_complete(SourceFormat::Jpeg, half),
            Err(PrepareError::Truncated { .. })
        ));

        let png = encode(&gradient(320, 320), ImageFormat::Png);
        verify_complete(SourceFormat::Png, &png).unwrap();
        let cut = &png[..png.len() - 6];
        assert!(matches!(
            verify_complete(SourceFormat::Png, cut),
            Err(PrepareError::Truncated { .. })
        ));
    }
}
