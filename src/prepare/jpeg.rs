//! JPEG through libjpeg-turbo (the `turbojpeg` crate, built from its
//! bundled source with SIMD and linked statically): decoding 8-bit
//! YCbCr / greyscale sources, to RGB or to their own YCbCr planes, and
//! encoding every JPEG we send. Part of `prepare`.
//!
//! Not used: libjpeg-turbo's lossless (DCT-domain) turn for EXIF
//! orientation. Measured on a 12 MP 4:2:0 phone photo it took 102 ms and
//! 75 MB (it holds the coefficients twice), where decoding to planes,
//! turning them and re-encoding at q90 took 93 ms and 30 MB; at 4:4:4 the
//! turn needs 140 MB.
//!
//! libjpeg-turbo is what libvips itself uses for JPEG; zune-jpeg and
//! `jpeg-encoder` took 2-3x as long on a 12 MP frame (docs/benchmarks.md).
//! CMYK and 12-bit JPEGs stay with `image` (libjpeg-turbo cannot turn CMYK
//! into RGB). One handle of each kind lives per blocking-pool thread, so
//! its internal buffers are reused by every job that thread runs.

use std::cell::RefCell;

use image::{GrayImage, RgbImage};
use turbojpeg::{Colorspace, Compressor, Decompressor, PixelFormat, Subsamp, YuvPlanesImage};

use super::PrepareError;

/// Progressive scans allowed before a decode is refused: a hostile
/// progressive JPEG with thousands of tiny scans costs CPU far beyond its
/// size.
/// Encoders write about 10; libjpeg-turbo's own tools suggest 500.
const MAX_SCANS: u32 = 500;

thread_local! {
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
    static COMPRESSOR: RefCell<Option<Compressor>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's handle in `slot`, creating it on first use.
fn with_handle<H, T>(
    slot: &'static std::thread::LocalKey<RefCell<Option<H>>>,
    new: fn() -> turbojpeg::Result<H>,
    f: impl FnOnce(&mut H) -> turbojpeg::Result<T>,
) -> turbojpeg::Result<T> {
    slot.with(|cell| {
        let mut cell = cell.borrow_mut();
        let handle = match cell.as_mut() {
            Some(h) => h,
            None => cell.insert(new()?),
        };
        f(handle)
    })
}

/// The stream's header, refused when its size differs from `dims`, what
/// the header check saw (and the pixel budget reserved).
fn read_header(
    d: &mut Decompressor,
    data: &[u8],
    dims: [u32; 2],
) -> turbojpeg::Result<turbojpeg::DecompressHeader> {
    let header = d.read_header(data)?;
    let [w, h] = dims.map(|v| v as usize);
    if (header.width, header.height) != (w, h) {
        return Err(turbojpeg::Error::TurboJpegError(format!(
            "frame is {}x{}, the header check saw {w}x{h}",
            header.width, header.height
        )));
    }
    Ok(header)
}

/// Decode an 8-bit YCbCr, RGB or greyscale JPEG to RGB. `dims` is what the
/// header check saw; a stream that says otherwise is refused. Any
/// libjpeg-turbo complaint, warnings included (it reports "premature end
/// of data" or "extraneous bytes" that way), comes back as an error: the
/// caller then tries the more forgiving `image` decoder.
pub(super) fn decode_rgb(data: &[u8], dims: [u32; 2]) -> turbojpeg::Result<RgbImage> {
    with_handle(&DECOMPRESSOR, Decompressor::new, |d| {
        read_header(d, data, dims)?;
        let [w, h] = dims.map(|v| v as usize);
        d.set_scan_limit(MAX_SCANS)?;
        let mut pixels = vec![0u8; w * h * 3];
        d.decompress(
            data,
            turbojpeg::Image {
                pixels: pixels.as_mut_slice(),
                width: w,
                pitch: w * 3,
                height: h,
                format: PixelFormat::RGB,
            },
        )?;
        Ok(RgbImage::from_raw(dims[0], dims[1], pixels)
            .unwrap_or_else(|| unreachable!("buffer sized from the dimensions")))
    })
}

/// A JPEG's own YCbCr planes at 4:2:0: luma at full size, each chroma
/// plane at half the width and height (rounded up), as the encoder takes
/// them. Working on these skips the colour conversion and chroma
/// resampling on the way in and out, and holds half the bytes of RGB.
pub(super) struct Planes {
    pub y: GrayImage,
    pub cb: GrayImage,
    pub cr: GrayImage,
}

impl Planes {
    pub fn map(self, f: impl Fn(GrayImage, Chan) -> GrayImage) -> Planes {
        Planes {
            y: f(self.y, Chan::Luma),
            cb: f(self.cb, Chan::Chroma),
            cr: f(self.cr, Chan::Chroma),
        }
    }
}

/// Which kind of plane a [`Planes::map`] step is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chan {
    Luma,
    Chroma,
}

/// Decode a YCbCr JPEG to [`Planes`] without converting colour. `Ok(None)`
/// when the stream is not YCbCr with 4:4:4, 4:2:2, 4:4:0 or 4:2:0 chroma
/// (greyscale, RGB, 4:1:1): the caller decodes to RGB instead. Errors as
/// [`decode_rgb`].
pub(super) fn decode_planes(data: &[u8], dims: [u32; 2]) -> turbojpeg::Result<Option<Planes>> {
    with_handle(&DECOMPRESSOR, Decompressor::new, |d| {
        let header = read_header(d, data, dims)?;
        let [w, h] = dims.map(|v| v as usize);
        let sub = header.subsamp;
        if header.colorspace != Colorspace::YCbCr
            || !matches!(
                sub,
                Subsamp::None | Subsamp::Sub2x1 | Subsamp::Sub1x2 | Subsamp::Sub2x2
            )
        {
            return Ok(None);
        }
        d.set_scan_limit(MAX_SCANS)?;
        let (sx, sy) = (sub.width(), sub.height());
        let (cw, ch) = (w.div_ceil(sx), h.div_ceil(sy));
        let mut pixels = vec![0u8; w * h + 2 * cw * ch];
        d.decompress_to_yuv(
            data,
            turbojpeg::YuvImage {
                pixels: pixels.as_mut_slice(),
                width: w,
                align: 1,
                height: h,
                subsamp: sub,
            },
        )?;
        // Halve the chroma out of the decode buffer, then give back its
        // tail (a shrinking realloc of a block this size is an mremap, no
        // copy): splitting the buffer first would copy both chroma planes
        // while it is still whole, a third more peak memory.
        let (hx, hy) = (2 / sx, 2 / sy);
        let (luma, chroma) = pixels.split_at(w * h);
        let (cb, cr) = chroma.split_at(cw * ch);
        let cb = halve(cb, cw, ch, hx, hy);
        let cr = halve(cr, cw, ch, hx, hy);
        debug_assert_eq!(luma.len(), w * h);
        pixels.truncate(w * h);
        pixels.shrink_to_fit();
        let y = GrayImage::from_raw(dims[0], dims[1], pixels)
            .unwrap_or_else(|| unreachable!("plane sized from its dimensions"));
        Ok(Some(Planes { y, cb, cr }))
    })
}

/// Average `fx` x `fy` blocks (each 1 or 2) of a `w` x `h` plane,
/// rounding, repeating the last row and column at an odd edge: libjpeg's
/// own 2:1 chroma downsampling.
fn halve(src: &[u8], w: usize, h: usize, fx: usize, fy: usize) -> GrayImage {
    let (ow, oh) = (w.div_ceil(fx), h.div_ceil(fy));
    let out = if fx == 1 && fy == 1 {
        src.to_vec()
    } else {
        let mut out = vec![0u8; ow * oh];
        let avg4 = |a: u8, b: u8, c: u8, d: u8| {
            ((u16::from(a) + u16::from(b) + u16::from(c) + u16::from(d) + 2) >> 2) as u8
        };
        for (oy, dst) in out.chunks_exact_mut(ow).enumerate() {
            let r0 = &src[oy * fy * w..][..w];
            let r1 = &src[(oy * fy + fy - 1).min(h - 1) * w..][..w];
            // Straight zips over pairs, so the compiler vectorises them.
            if fx == 2 {
                let pairs = dst
                    .iter_mut()
                    .zip(r0.chunks_exact(2).zip(r1.chunks_exact(2)));
                for (d, (a, b)) in pairs {
                    *d = avg4(a[0], a[1], b[0], b[1]);
                }
                if w % 2 == 1 {
                    dst[ow - 1] = avg4(r0[w - 1], r0[w - 1], r1[w - 1], r1[w - 1]);
                }
            } else {
                for (d, (&a, &b)) in dst.iter_mut().zip(r0.iter().zip(r1)) {
                    *d = avg4(a, a, b, b);
                }
            }
        }
        out
    };
    GrayImage::from_raw(ow as u32, oh as u32, out)
        .unwrap_or_else(|| unreachable!("sized from its dimensions"))
}

/// Encode 4:2:0 [`Planes`] of a `width` x `height` image at `quality`.
pub(super) fn encode_planes(planes: &Planes, quality: u8) -> Result<Vec<u8>, PrepareError> {
    let (w, h) = planes.y.dimensions();
    with_handle(&COMPRESSOR, Compressor::new, |c| {
        c.set_quality(i32::from(quality))?;
        c.compress_yuv_planes_to_vec(&YuvPlanesImage {
            y_plane: planes.y.as_raw().as_slice(),
            u_plane: planes.cb.as_raw().as_slice(),
            v_plane: planes.cr.as_raw().as_slice(),
            width: w as usize,
            height: h as usize,
            y_stride: w as usize,
            u_stride: planes.cb.width() as usize,
            v_stride: planes.cr.width() as usize,
            subsamp: Subsamp::Sub2x2,
        })
    })
    .map_err(|e| PrepareError::Encode {
        reason: format!("JPEG encoding failed: {e}"),
    })
}

/// `img` as libjpeg-turbo reads packed RGB.
pub(super) fn rgb_view(img: &RgbImage) -> turbojpeg::Image<&[u8]> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    turbojpeg::Image {
        pixels: img.as_raw().as_slice(),
        width: w,
        pitch: w * 3,
        height: h,
        format: PixelFormat::RGB,
    }
}

/// Encode packed RGB at `quality` with 4:2:0 chroma, as libvips and cjpeg
/// do by default; baseline Huffman tables, no metadata.
pub(super) fn encode_rgb(img: &RgbImage, quality: u8) -> Result<Vec<u8>, PrepareError> {
    with_handle(&COMPRESSOR, Compressor::new, |c| {
        c.set_quality(i32::from(quality))?;
        c.set_subsamp(Subsamp::Sub2x2)?;
        c.compress_to_vec(rgb_view(img))
    })
    .map_err(|e| PrepareError::Encode {
        reason: format!("JPEG encoding failed: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
        })
    }

    #[test]
    fn round_trip_keeps_size_and_colour() {
        let img = gradient(640, 480);
        let jpeg = encode_rgb(&img, 90).unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        let back = decode_rgb(&jpeg, [640, 480]).unwrap();
        assert_eq!(back.dimensions(), (640, 480));
        let err: u64 = img
            .as_raw()
            .iter()
            .zip(back.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = err as f64 / img.as_raw().len() as f64;
        assert!(mean < 2.0, "mean abs error {mean}");
    }

    #[test]
    fn a_lying_size_is_refused() {
        let jpeg = encode_rgb(&gradient(64, 48), 90).unwrap();
        assert!(decode_rgb(&jpeg, [48, 64]).is_err());
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let jpeg = encode_rgb(&gradient(320, 320), 90).unwrap();
        assert!(decode_rgb(&jpeg[..jpeg.len() / 2], [320, 320]).is_err());
        assert!(decode_rgb(b"\xFF\xD8\xFF\xE0 not a jpeg", [320, 320]).is_err());
    }

    #[test]
    fn planes_round_trip_from_every_chroma_layout() {
        let img = gradient(64, 48);
        for sub in [
            Subsamp::None,
            Subsamp::Sub2x1,
            Subsamp::Sub1x2,
            Subsamp::Sub2x2,
        ] {
            let jpeg = turbojpeg::compress(rgb_view(&img), 95, sub).unwrap();
            let planes = decode_planes(&jpeg, [64, 48]).unwrap().expect("YCbCr");
            assert_eq!(planes.y.dimensions(), (64, 48), "{sub:?}");
            assert_eq!(planes.cb.dimensions(), (32, 24), "{sub:?}");
            assert_eq!(planes.cr.dimensions(), (32, 24), "{sub:?}");
            let back = decode_rgb(&encode_planes(&planes, 95).unwrap(), [64, 48]).unwrap();
            let worst = img
                .as_raw()
                .iter()
                .zip(back.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(worst <= 12, "{sub:?}: worst channel difference {worst}");
        }
    }

    #[test]
    fn greyscale_is_left_to_the_rgb_path() {
        let grey = image::GrayImage::from_fn(32, 32, |x, _| image::Luma([x as u8 * 8]));
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageLuma8(grey)
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        assert!(decode_planes(&jpeg, [32, 32]).unwrap().is_none());
        assert_eq!(decode_rgb(&jpeg, [32, 32]).unwrap().dimensions(), (32, 32));
    }

    #[test]
    fn halving_averages_and_repeats_the_odd_edge() {
        let p = [0, 4, 100, 8, 12, 200];
        let h = halve(&p, 3, 2, 2, 2);
        assert_eq!(h.dimensions(), (2, 1));
        assert_eq!(h.as_raw(), &vec![6, 150]);
        assert_eq!(halve(&p, 3, 2, 1, 2).as_raw(), &vec![4, 8, 150]);
        assert_eq!(halve(&p, 3, 2, 2, 1).as_raw(), &vec![2, 100, 10, 200]);
        assert_eq!(halve(&p, 3, 2, 1, 1).as_raw(), &p.to_vec());
    }
}
