//! JPEG through mozjpeg's libjpeg (`libjpeg.rs`, the `mozjpeg-sys` crate
//! built from its bundled source and linked statically, with SIMD when
//! `nasm` was there at build time): decoding 8-bit YCbCr / greyscale
//! sources, to RGB or to their own YCbCr planes, and encoding every JPEG we
//! send, configured as libjpeg-turbo encodes (baseline, no trellis). Part
//! of `prepare`.
//!
//! Not used: a lossless (DCT-domain) turn for EXIF orientation. Measured
//! with libjpeg-turbo on a 12 MP 4:2:0 phone photo it took 102 ms and
//! 75 MB (it holds the coefficients twice), where decoding to planes,
//! turning them and re-encoding at q90 took 93 ms and 30 MB; at 4:4:4 the
//! turn needs 140 MB.
//!
//! libjpeg-turbo's code (which mozjpeg is) is what libvips itself uses for
//! JPEG; zune-jpeg and `jpeg-encoder` took 2-3x as long on a 12 MP frame
//! (docs/benchmarks.md). CMYK and 12-bit JPEGs stay with `image` (libjpeg
//! cannot turn CMYK into RGB). One handle of each kind lives per
//! blocking-pool thread, so its internal buffers are reused by every job
//! that thread runs.

use std::cell::RefCell;

use image::{GrayImage, RgbImage};

use super::PrepareError;
use super::libjpeg::{Decoder, Encoder, Error, Input};

thread_local! {
    static DECODER: RefCell<Option<Decoder>> = const { RefCell::new(None) };
    static ENCODER: RefCell<Option<Encoder>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's handle in `slot`, creating it on first use.
fn with_handle<H, T>(
    slot: &'static std::thread::LocalKey<RefCell<Option<H>>>,
    new: fn() -> Result<H, Error>,
    f: impl FnOnce(&mut H) -> Result<T, Error>,
) -> Result<T, Error> {
    slot.with(|cell| {
        let mut cell = cell.borrow_mut();
        let handle = match cell.as_mut() {
            Some(h) => h,
            None => cell.insert(new()?),
        };
        f(handle)
    })
}

/// Decode an 8-bit YCbCr, RGB or greyscale JPEG to RGB. `dims` is what the
/// header check saw; a stream that says otherwise is refused. Any libjpeg
/// complaint, warnings included (it reports "premature end of data" or
/// "extraneous bytes" that way), comes back as an error: the caller then
/// tries the more forgiving `image` decoder.
pub(super) fn decode_rgb(data: &[u8], dims: [u32; 2]) -> Result<RgbImage, Error> {
    let pixels = with_handle(&DECODER, Decoder::new, |d| d.rgb(data, dims))?;
    Ok(RgbImage::from_raw(dims[0], dims[1], pixels)
        .unwrap_or_else(|| unreachable!("buffer sized from the dimensions")))
}

/// A JPEG's own YCbCr planes at 4:2:0: luma at full size, each chroma
/// plane at half the width and height (rounded up), as the encoder takes
/// them. Working on these skips the colour conversion and chroma
/// resampling on the way in and out, and holds half the bytes of RGB.
pub struct Planes {
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
pub enum Chan {
    Luma,
    Chroma,
}

/// Decode a YCbCr JPEG to [`Planes`] without converting colour. `Ok(None)`
/// when the stream is not YCbCr with 4:4:4, 4:2:2, 4:4:0 or 4:2:0 chroma
/// (greyscale, RGB, 4:1:1): the caller decodes to RGB instead. Errors as
/// [`decode_rgb`].
pub fn decode_planes(data: &[u8], dims: [u32; 2]) -> Result<Option<Planes>, Error> {
    let Some(raw) = with_handle(&DECODER, Decoder::new, |d| d.planes(data, dims))? else {
        return Ok(None);
    };
    let [w, h] = dims.map(|v| v as usize);
    let (sx, sy) = raw.sampling;
    let (cw, ch) = (w.div_ceil(sx), h.div_ceil(sy));
    // Halve the chroma to 4:2:0 out of the decode buffers, and close up
    // the luma rows in place (dropping the MCU padding), then give back the
    // tail (a shrinking realloc of a block this size is an mremap, no copy).
    let (hx, hy) = (2 / sx, 2 / sy);
    let cb = halve(&raw.cb.0, raw.cb.1, cw, ch, hx, hy);
    let cr = halve(&raw.cr.0, raw.cr.1, cw, ch, hx, hy);
    let (mut pixels, stride) = raw.luma;
    if stride != w {
        for row in 1..h {
            pixels.copy_within(row * stride..row * stride + w, row * w);
        }
    }
    pixels.truncate(w * h);
    pixels.shrink_to_fit();
    let y = GrayImage::from_raw(dims[0], dims[1], pixels)
        .unwrap_or_else(|| unreachable!("plane sized from its dimensions"));
    Ok(Some(Planes { y, cb, cr }))
}

/// Average `fx` x `fy` blocks (each 1 or 2) of a `w` x `h` plane whose
/// rows are `stride` bytes apart, rounding, repeating the last row and
/// column at an odd edge: libjpeg's own 2:1 chroma downsampling.
fn halve(src: &[u8], stride: usize, w: usize, h: usize, fx: usize, fy: usize) -> GrayImage {
    let (ow, oh) = (w.div_ceil(fx), h.div_ceil(fy));
    let mut out = vec![0u8; ow * oh];
    let avg4 = |a: u8, b: u8, c: u8, d: u8| {
        ((u16::from(a) + u16::from(b) + u16::from(c) + u16::from(d) + 2) >> 2) as u8
    };
    for (oy, dst) in out.chunks_exact_mut(ow).enumerate() {
        let r0 = &src[oy * fy * stride..][..w];
        let r1 = &src[(oy * fy + fy - 1).min(h - 1) * stride..][..w];
        // Straight zips over pairs, so the compiler vectorises them.
        if fx == 1 && fy == 1 {
            dst.copy_from_slice(r0);
        } else if fx == 2 {
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
    GrayImage::from_raw(ow as u32, oh as u32, out)
        .unwrap_or_else(|| unreachable!("sized from its dimensions"))
}

/// Encode 4:2:0 [`Planes`] of a `width` x `height` image at `quality`.
pub fn encode_planes(planes: &Planes, quality: u8) -> Result<Vec<u8>, PrepareError> {
    let (w, h) = planes.y.dimensions();
    let input = Input::Planes420 {
        y: planes.y.as_raw(),
        cb: planes.cb.as_raw(),
        cr: planes.cr.as_raw(),
    };
    with_handle(&ENCODER, Encoder::new, |e| {
        e.encode(input, w as usize, h as usize, quality)
    })
    .map_err(encode_error)
}

/// Encode packed RGB at `quality` with 4:2:0 chroma, as libvips and cjpeg
/// do by default; baseline Huffman tables, no metadata.
pub fn encode_rgb(img: &RgbImage, quality: u8) -> Result<Vec<u8>, PrepareError> {
    encode_rgb_sampled(img, quality, (2, 2))
}

/// Encode packed RGB with luma sampled `sampling` (horizontal, vertical)
/// times the chroma: (1, 1) is 4:4:4, (2, 1) 4:2:2, (1, 2) 4:4:0, (2, 2)
/// 4:2:0.
pub(crate) fn encode_rgb_sampled(
    img: &RgbImage,
    quality: u8,
    sampling: (u8, u8),
) -> Result<Vec<u8>, PrepareError> {
    let input = Input::Rgb {
        pixels: img.as_raw(),
        sampling,
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    with_handle(&ENCODER, Encoder::new, |e| e.encode(input, w, h, quality)).map_err(encode_error)
}

fn encode_error(e: Error) -> PrepareError {
    PrepareError::Encode {
        reason: format!("JPEG encoding failed: {e}"),
    }
}

/// Decode any 8-bit JPEG libjpeg reads to RGB (benchmarks, tests).
pub fn decode_rgb_any(data: &[u8]) -> Result<RgbImage, PrepareError> {
    let probe = super::probe(data)?;
    decode_rgb(data, [probe.width, probe.height]).map_err(|e| PrepareError::Encode {
        reason: format!("JPEG decoding failed: {e}"),
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
        for sub in [(1, 1), (2, 1), (1, 2), (2, 2)] {
            let jpeg = encode_rgb_sampled(&img, 95, sub).unwrap();
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
    fn output_is_baseline_with_standard_tables() {
        let img = gradient(64, 48);
        let planes = decode_planes(&encode_rgb(&img, 90).unwrap(), [64, 48])
            .unwrap()
            .expect("YCbCr");
        for jpeg in [
            encode_rgb(&img, 90).unwrap(),
            encode_planes(&planes, 90).unwrap(),
        ] {
            let has = |marker: u8| jpeg.windows(2).any(|w| w == [0xFF, marker]);
            assert!(has(0xC0), "a baseline frame (SOF0)");
            assert!(!has(0xC2), "no progressive frame (SOF2)");
            let scans = jpeg.windows(2).filter(|w| *w == [0xFF, 0xDA]).count();
            assert_eq!(scans, 1, "one scan");
        }
    }

    #[test]
    fn planes_of_odd_sizes_round_trip() {
        // Widths and heights that are not multiples of 8 (or of 16 for
        // luma): the encoder pads by repeating the edge.
        for (w, h) in [(37, 23), (17, 9), (9, 17), (100, 33)] {
            let img = gradient(w, h);
            let planes = decode_planes(&encode_rgb(&img, 95).unwrap(), [w, h])
                .unwrap()
                .expect("YCbCr");
            assert_eq!(planes.cb.dimensions(), (w.div_ceil(2), h.div_ceil(2)));
            let back = decode_rgb(&encode_planes(&planes, 95).unwrap(), [w, h]).unwrap();
            let mean = img
                .as_raw()
                .iter()
                .zip(back.as_raw())
                .map(|(a, b)| f64::from(a.abs_diff(*b)))
                .sum::<f64>()
                / img.as_raw().len() as f64;
            assert!(mean < 4.0, "{w}x{h}: mean abs error {mean}");
        }
    }

    #[test]
    fn a_failed_decode_leaves_the_handle_usable() {
        let jpeg = encode_rgb(&gradient(64, 48), 90).unwrap();
        assert!(decode_rgb(&jpeg[..jpeg.len() / 3], [64, 48]).is_err());
        assert!(decode_planes(&jpeg[..200], [64, 48]).is_err());
        assert!(decode_rgb(&jpeg, [64, 48]).is_ok());
        assert!(decode_planes(&jpeg, [64, 48]).unwrap().is_some());
    }

    #[test]
    fn a_thread_that_exits_destroys_its_handles() {
        for _ in 0..3 {
            std::thread::spawn(|| {
                let jpeg = encode_rgb(&gradient(32, 32), 90).unwrap();
                assert!(decode_rgb(&jpeg[..100], [32, 32]).is_err());
                decode_rgb(&jpeg, [32, 32]).unwrap();
            })
            .join()
            .expect("no crash in jpeg_destroy_*");
        }
    }

    #[test]
    fn too_many_scans_are_refused() {
        let jpeg = progressive_with_scans(&encode_rgb(&gradient(64, 48), 90).unwrap(), 600);
        let err = decode_rgb(&jpeg, [64, 48]).unwrap_err();
        assert!(err.0.contains("scans"), "{err}");
    }

    /// A 64x48 4:2:0 `jpeg` (baseline, standard tables) turned into a
    /// progressive one of `n` DC scans of the luma alone (each 48 blocks
    /// of DC difference 0, code `00`): valid, and what a hostile file does.
    fn progressive_with_scans(jpeg: &[u8], n: usize) -> Vec<u8> {
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let mut out = jpeg[..sos].to_vec();
        let sof = out.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        out[sof + 1] = 0xC2;
        for _ in 0..n {
            // SOS: 1 component (id 1, tables 0/0), Ss=0 Se=0 Ah=0 Al=0.
            out.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 0, 0]);
            out.extend_from_slice(&[0; 12]);
        }
        out.extend_from_slice(&[0xFF, 0xD9]);
        out
    }

    #[test]
    fn a_few_scans_are_fine() {
        let jpeg = progressive_with_scans(&encode_rgb(&gradient(64, 48), 90).unwrap(), 20);
        decode_rgb(&jpeg, [64, 48]).unwrap();
    }

    #[test]
    fn halving_averages_and_repeats_the_odd_edge() {
        let p = [0, 4, 100, 8, 12, 200];
        let h = halve(&p, 3, 3, 2, 2, 2);
        assert_eq!(h.dimensions(), (2, 1));
        assert_eq!(h.as_raw(), &vec![6, 150]);
        assert_eq!(halve(&p, 3, 3, 2, 1, 2).as_raw(), &vec![4, 8, 150]);
        assert_eq!(halve(&p, 3, 3, 2, 2, 1).as_raw(), &vec![2, 100, 10, 200]);
        assert_eq!(halve(&p, 3, 3, 2, 1, 1).as_raw(), &p.to_vec());
        // Rows `stride` apart: the padding right of `w` is never read.
        let padded = [0, 4, 100, 99, 8, 12, 200, 99];
        assert_eq!(halve(&padded, 4, 3, 2, 2, 2).as_raw(), &vec![6, 150]);
        assert_eq!(halve(&padded, 4, 3, 2, 1, 1).as_raw(), &p.to_vec());
    }
}
