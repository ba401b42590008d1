//! Executing a fix: decode an out-of-spec image, normalise it to 8-bit
//! RGB(A), carry out the geometric [`Plan`], and encode (re-compressing and
//! downscaling) until the result fits the spec. Part of `prepare`; knows
//! nothing about RabbitMQ, S3 or HTTP.
//!
//! Speed: `image` decodes every format, but its resampler and JPEG codec
//! are slow next to libvips. 8-bit JPEGs are decoded, and every JPEG is
//! encoded, by libjpeg-turbo (`jpeg.rs`); when nothing is resized, a JPEG
//! is worked on as its own YCbCr planes (no colour conversion, half the
//! memory of RGB).
//! Resizing uses `fast_image_resize` (SIMD convolution, alpha premultiplied
//! on the fly) with one `Resizer` per thread, so its scratch buffers live
//! across jobs. `tests/bench/prepare.sh` measures the result against
//! libvips.

use std::borrow::Cow;
use std::io::Cursor;

use std::cell::RefCell;

use fast_image_resize as fir;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::{DynamicImage, ImageBuffer, ImageReader, Luma, Rgb, RgbImage, Rgba, RgbaImage};

use super::jpeg::Chan;
use super::turn::orient;

use super::probe::{from_image_error, guard_panic};
use super::{
    ColourModel, Limits, Margins, OutputFormat, Plan, PrepareError, Prepared, Probe, SourceFormat,
    Spec, Transform, TransformRecord, Violation, check, estimate_decode_pixels, jpeg, plan, probe,
};

/// Resampling filter for every resize, up or down.
const RESAMPLE: fir::FilterType = fir::FilterType::Lanczos3;
/// JPEG qualities tried in turn at full size; the last is the floor and the
/// only one tried after downscaling.
const JPEG_EFFORTS: [Effort; 4] = [
    Effort::Jpeg(90),
    Effort::Jpeg(80),
    Effort::Jpeg(70),
    Effort::Jpeg(60),
];
/// PNG compression levels tried in turn at full size, likewise.
const PNG_EFFORTS: [Effort; 2] = [
    Effort::Png(CompressionType::Default),
    Effort::Png(CompressionType::Best),
];
/// Largest scale factor of one downscale step when the floor effort is
/// still too big; a bigger overshoot jumps further (by the square root of
/// the size ratio, with 5% headroom).
const DOWNSCALE_STEP: f64 = 0.8;
/// Decoder allocations beyond the pixel buffers (metadata, row buffers).
const DECODE_SLACK: u64 = 64 * 1024 * 1024;
/// Bytes per pixel allowed to a decoder: a 16-bit RGBA output buffer plus as
/// much again for intermediate buffers (the TIFF decoder needs both).
const DECODE_BYTES_PER_PIXEL: u64 = 16;

/// Padding may at most double the pixel count of the source (or of the
/// smallest in-spec canvas, for tiny sources); beyond that the content is
/// scaled down, so an absurd strip (30000x2) does not become a 100-megapixel
/// canvas of white. Panoramas up to 5:1 keep their full resolution.
const MAX_PAD_GROWTH: u64 = 2;

/// Opaque padding colour (JPEG output).
const WHITE: [u8; 4] = [255, 255, 255, 255];
/// Padding colour for images with transparency (PNG output).
const TRANSPARENT: [u8; 4] = [0, 0, 0, 0];

/// Decode, transform and encode `data`, which `violations` says is out of spec.
pub(super) fn fix(
    data: &[u8],
    source: Probe,
    violations: Vec<Violation>,
    spec: &Spec,
    limits: &Limits,
) -> Result<Prepared, PrepareError> {
    let planned = plan(source.width, source.height, source.orientation, spec);
    let mut plan = fit_pixel_budget(planned, spec, output_pixel_budget(&source, spec, limits))?;
    let try_turbo = match fix_in_planes(data, &source, &violations, &plan, spec)? {
        Planar::Done(prepared) => return Ok(prepared),
        Planar::Elsewhere => true,
        // Asking libjpeg-turbo again for RGB would fail the same way.
        Planar::Declined => false,
    };
    let rgb = if try_turbo {
        decode_turbo(data, &source)
    } else {
        None
    };
    let pixels = match rgb {
        Some(rgb) => Pixels::Rgb(orient(rgb, source.orientation)),
        None => normalise(decode(data, &source, limits)?, source.orientation),
    };
    if pixels.dims() != plan.oriented {
        return Err(PrepareError::Undecodable {
            reason: "the decoded size differs from the header".to_owned(),
        });
    }
    let (bytes, effort) = encode_to_fit(&pixels, &mut plan, spec)?;
    let record = plan.record(pixels.pad_color(), effort.transform());
    finish(bytes, effort.format(), source, violations, record, spec)
}

/// Wrap up a prepared image after a cheap (header only) proof that the
/// promise holds: in spec, and the size the record says. A failure is a bug.
fn finish(
    bytes: Vec<u8>,
    format: OutputFormat,
    source: Probe,
    violations: Vec<Violation>,
    transforms: TransformRecord,
    spec: &Spec,
) -> Result<Prepared, PrepareError> {
    let out = probe(&bytes)?;
    let left = check(&out, spec);
    if !left.is_empty() || [out.width, out.height] != transforms.output {
        return Err(PrepareError::Encode {
            reason: format!(
                "the prepared image is still out of spec: {left:?}, {}x{}",
                out.width, out.height
            ),
        });
    }
    Ok(Prepared {
        bytes: bytes.into(),
        format,
        width: out.width,
        height: out.height,
        source,
        violations,
        transforms,
    })
}

/// What [`fix_in_planes`] did.
enum Planar {
    Done(Prepared),
    /// Not a case for planes; the RGB path takes it.
    Elsewhere,
    /// libjpeg-turbo found fault with the stream.
    Declined,
}

/// JPEG in, JPEG out, nothing resized (a phone photo stored sideways, a
/// re-encode to fit the size limit, padding a panorama): done on the
/// stream's own YCbCr planes, with no colour conversion either way and
/// half the memory of RGB. Anything else goes down the RGB path: a
/// resize, margins or a turned frame of odd size (4:2:0 chroma would land
/// half a pixel off), a stream libjpeg-turbo cannot give as planes or
/// finds fault with, or one that does not fit the size limit even at the
/// quality floor (the RGB path downscales).
fn fix_in_planes(
    data: &[u8],
    source: &Probe,
    violations: &[Violation],
    plan: &Plan,
    spec: &Spec,
) -> Result<Planar, PrepareError> {
    let odd = |v: u32| v % 2 == 1;
    let Margins { left, top, .. } = plan.margins;
    if source.format != SourceFormat::Jpeg
        || source.colour != ColourModel::Standard
        || plan.resizes()
        || odd(left)
        || odd(top)
        || (plan.orientation != 1 && (odd(source.width) || odd(source.height)))
    {
        return Ok(Planar::Elsewhere);
    }
    let planes = match jpeg::decode_planes(data, [source.width, source.height]) {
        Ok(Some(planes)) => planes,
        Ok(None) => return Ok(Planar::Elsewhere),
        Err(e) => {
            tracing::debug!(error = %e, "libjpeg-turbo declined; trying image");
            return Ok(Planar::Declined);
        }
    };
    let [w, h] = plan.canvas;
    let planes = planes
        .map(|p, _| orient(p, plan.orientation))
        .map(|p, chan| {
            let (canvas, at, fill) = match chan {
                Chan::Luma => ([w, h], [left, top], 255),
                Chan::Chroma => ([w.div_ceil(2), h.div_ceil(2)], [left / 2, top / 2], 128),
            };
            pad(Cow::Owned(p), canvas, at, Luma([fill])).into_owned()
        });
    for &effort in &JPEG_EFFORTS {
        let Effort::Jpeg(quality) = effort else {
            continue;
        };
        let bytes = jpeg::encode_planes(&planes, quality)?;
        tracing::debug!(
            width = w,
            height = h,
            quality,
            bytes = bytes.len(),
            "encoded planes"
        );
        if bytes.len() as u64 <= spec.max_bytes {
            let record = plan.record(WHITE, effort.transform());
            return finish(
                bytes,
                OutputFormat::Jpeg,
                *source,
                violations.to_vec(),
                record,
                spec,
            )
            .map(Planar::Done);
        }
    }
    Ok(Planar::Elsewhere)
}

/// libjpeg-turbo decode of an 8-bit JPEG; `None` for other formats and
/// colour models, and when libjpeg-turbo finds fault with the stream (the
/// `image` decoder then gets its chance, and gives the error if it fails
/// too).
fn decode_turbo(data: &[u8], source: &Probe) -> Option<RgbImage> {
    if source.format != SourceFormat::Jpeg || source.colour != ColourModel::Standard {
        return None;
    }
    jpeg::decode_rgb(data, [source.width, source.height])
        .inspect_err(|e| tracing::debug!(error = %e, "libjpeg-turbo declined; trying image"))
        .ok()
}

/// Encode with falling effort, then at falling scale, until the output fits
/// `spec.max_bytes`; `plan` is left at the scale that fitted.
fn encode_to_fit(
    pixels: &Pixels,
    plan: &mut Plan,
    spec: &Spec,
) -> Result<(Vec<u8>, Effort), PrepareError> {
    let mut efforts = pixels.efforts();
    loop {
        let canvas = pixels.render(plan)?;
        let mut smallest = u64::MAX;
        for &effort in efforts {
            let bytes = canvas.encode(effort)?;
            let len = bytes.len() as u64;
            let [width, height] = plan.canvas;
            tracing::debug!(width, height, ?effort, bytes = len, "encoded");
            if len <= spec.max_bytes {
                return Ok((bytes, effort));
            }
            smallest = smallest.min(len);
        }
        // Even the floor effort is too big: downscale, keeping only the floor.
        efforts = efforts
            .split_last()
            .map_or(efforts, |(floor, _)| std::slice::from_ref(floor));
        let ratio = spec.max_bytes as f64 / smallest as f64;
        let next = plan.with_scale(plan.scale * (ratio.sqrt() * 0.95).min(DOWNSCALE_STEP), spec);
        if next.pixels() >= plan.pixels() {
            return Err(PrepareError::CannotFit {
                width: plan.canvas[0],
                height: plan.canvas[1],
                bytes: smallest,
                max_bytes: spec.max_bytes,
            });
        }
        *plan = next;
    }
}

/// Most pixels the output canvas may have; see [`MAX_PAD_GROWTH`].
fn output_pixel_budget(source: &Probe, spec: &Spec, limits: &Limits) -> u64 {
    let smallest_canvas = f64::from(spec.min_side).powi(2) * spec.max_aspect.max(1.0);
    estimate_decode_pixels(source)
        .max(smallest_canvas as u64)
        .saturating_mul(MAX_PAD_GROWTH)
        .min(limits.max_pixels)
}

/// Shrink the plan until the output canvas fits the pixel budget.
fn fit_pixel_budget(mut plan: Plan, spec: &Spec, max_pixels: u64) -> Result<Plan, PrepareError> {
    while plan.pixels() > max_pixels {
        let factor = (max_pixels as f64 / plan.pixels() as f64).sqrt() * 0.99;
        let next = plan.with_scale(plan.scale * factor, spec);
        if next.pixels() >= plan.pixels() {
            return Err(PrepareError::TooManyPixels {
                width: plan.canvas[0],
                height: plan.canvas[1],
                max_pixels,
            });
        }
        plan = next;
    }
    Ok(plan)
}

/// Full decode (first frame of an animation) with `image`'s own limits as a
/// second line of defence behind the header checks.
fn decode(data: &[u8], source: &Probe, limits: &Limits) -> Result<DynamicImage, PrepareError> {
    let format = source
        .format
        .image_format()
        .ok_or_else(|| PrepareError::UnsupportedFormat {
            format: format!("{:?}", source.format),
        })?;
    let mut budget = image::Limits::default();
    budget.max_image_width = Some(limits.max_side);
    budget.max_image_height = Some(limits.max_side);
    budget.max_alloc = Some(
        estimate_decode_pixels(source)
            .saturating_mul(DECODE_BYTES_PER_PIXEL)
            .saturating_add(DECODE_SLACK),
    );
    guard_panic(|| {
        let mut reader = ImageReader::with_format(Cursor::new(data), format);
        reader.limits(budget);
        reader.decode().map_err(from_image_error)
    })
}

/// Decoded pixels, 8 bits per channel. `Rgba` only when some pixel is not
/// fully opaque; such images are padded transparent and encoded as PNG,
/// the rest padded white and encoded as JPEG.
enum Pixels {
    Rgb(RgbImage),
    Rgba(RgbaImage),
}

/// Convert any colour type (16-bit, grey, CMYK already converted by the
/// decoder, float) to 8-bit RGB(A) and apply the EXIF orientation.
fn normalise(image: DynamicImage, orientation: u8) -> Pixels {
    if image.color().has_alpha() {
        let rgba = image.into_rgba8();
        if rgba.pixels().any(|p| p[3] != u8::MAX) {
            return Pixels::Rgba(orient(rgba, orientation));
        }
        let rgb = DynamicImage::ImageRgba8(rgba).into_rgb8();
        return Pixels::Rgb(orient(rgb, orientation));
    }
    Pixels::Rgb(orient(image.into_rgb8(), orientation))
}

impl Pixels {
    fn dims(&self) -> [u32; 2] {
        match self {
            Pixels::Rgb(i) => [i.width(), i.height()],
            Pixels::Rgba(i) => [i.width(), i.height()],
        }
    }

    fn efforts(&self) -> &'static [Effort] {
        match self {
            Pixels::Rgb(_) => &JPEG_EFFORTS,
            Pixels::Rgba(_) => &PNG_EFFORTS,
        }
    }

    fn pad_color(&self) -> [u8; 4] {
        match self {
            Pixels::Rgb(_) => WHITE,
            Pixels::Rgba(_) => TRANSPARENT,
        }
    }

    /// Resize the content and pad it onto the canvas, as planned. Borrows
    /// when the plan changes nothing (orientation or format only).
    fn render(&self, plan: &Plan) -> Result<Canvas<'_>, PrepareError> {
        let [w, h] = plan.content;
        Ok(match self {
            Pixels::Rgb(img) => {
                let content = if plan.resizes() {
                    Cow::Owned(resize(img, w, h, fir::PixelType::U8x3)?)
                } else {
                    Cow::Borrowed(img)
                };
                let [r, g, b, _] = WHITE;
                Canvas::Rgb(pad(content, plan.canvas, plan.margins.at(), Rgb([r, g, b])))
            }
            Pixels::Rgba(img) => {
                // Premultiplied by `fast_image_resize` (use_alpha), so the
                // colour of invisible pixels does not bleed into edges.
                let content = if plan.resizes() {
                    Cow::Owned(resize(img, w, h, fir::PixelType::U8x4)?)
                } else {
                    Cow::Borrowed(img)
                };
                Canvas::Rgba(pad(
                    content,
                    plan.canvas,
                    plan.margins.at(),
                    Rgba(TRANSPARENT),
                ))
            }
        })
    }
}

/// Place the (resized) content on a `canvas`-sized field of `color`, its
/// top-left corner at `at`.
fn pad<'a, P: image::Pixel>(
    content: Cow<'a, ImageBuffer<P, Vec<P::Subpixel>>>,
    canvas: [u32; 2],
    at: [u32; 2],
    color: P,
) -> Cow<'a, ImageBuffer<P, Vec<P::Subpixel>>> {
    if canvas == [content.width(), content.height()] {
        return content;
    }
    let [left, top] = at.map(|v| v as usize);
    debug_assert!(
        left + content.width() as usize <= canvas[0] as usize
            && top + content.height() as usize <= canvas[1] as usize
    );
    let mut canvas = ImageBuffer::from_pixel(canvas[0], canvas[1], color);
    // Row copies: the content always fits inside the canvas (the plan's
    // margins are what is left around it).
    let channels = usize::from(P::CHANNEL_COUNT);
    let row = content.width() as usize * channels;
    let stride = canvas.width() as usize * channels;
    let src = content.as_raw();
    let dst: &mut [P::Subpixel] = &mut canvas;
    for (y, line) in src.chunks_exact(row.max(1)).enumerate() {
        let at = (top + y) * stride + left * channels;
        dst[at..at + row].copy_from_slice(line);
    }
    Cow::Owned(canvas)
}

thread_local! {
    /// One resizer per blocking-pool thread: its scratch buffers are reused
    /// by every job that thread runs.
    static RESIZER: RefCell<fir::Resizer> = RefCell::new(fir::Resizer::new());
}

/// Lanczos3 resample of an 8-bit RGB or RGBA buffer (`pixel_type` says
/// which) to `width` x `height`.
fn resize<P: image::Pixel<Subpixel = u8>>(
    img: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    pixel_type: fir::PixelType,
) -> Result<ImageBuffer<P, Vec<u8>>, PrepareError> {
    let fail = |reason: String| PrepareError::Encode {
        reason: format!("resizing failed: {reason}"),
    };
    let src = fir::images::ImageRef::new(img.width(), img.height(), img.as_raw(), pixel_type)
        .map_err(|e| fail(e.to_string()))?;
    let mut dst = fir::images::Image::new(width, height, pixel_type);
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(RESAMPLE))
        .use_alpha(pixel_type == fir::PixelType::U8x4);
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
        .map_err(|e| fail(e.to_string()))?;
    ImageBuffer::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| fail("unexpected buffer size".into()))
}

enum Canvas<'a> {
    Rgb(Cow<'a, RgbImage>),
    Rgba(Cow<'a, RgbaImage>),
}

impl Canvas<'_> {
    fn encode(&self, effort: Effort) -> Result<Vec<u8>, PrepareError> {
        let mut out = Vec::new();
        let result = match (self, effort) {
            (Canvas::Rgb(img), Effort::Jpeg(q)) => return jpeg::encode_rgb(img, q),
            (Canvas::Rgba(img), Effort::Png(level)) => img.write_with_encoder(
                PngEncoder::new_with_quality(&mut out, level, PngFilter::Adaptive),
            ),
            _ => {
                return Err(PrepareError::Encode {
                    reason: format!("{effort:?} does not fit this colour type"),
                });
            }
        };
        result.map_err(|e| PrepareError::Encode {
            reason: e.to_string(),
        })?;
        Ok(out)
    }
}

/// One encoder setting.
#[derive(Debug, Clone, Copy)]
enum Effort {
    Jpeg(u8),
    Png(CompressionType),
}

impl Effort {
    fn format(self) -> OutputFormat {
        match self {
            Effort::Jpeg(_) => OutputFormat::Jpeg,
            Effort::Png(_) => OutputFormat::Png,
        }
    }

    fn transform(self) -> Transform {
        Transform::Encode {
            format: self.format(),
            quality: match self {
                Effort::Jpeg(q) => Some(q),
                Effort::Png(_) => None,
            },
        }
    }
}
