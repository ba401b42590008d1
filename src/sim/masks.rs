//! Deterministic, plausible segmentation PNGs.
//!
//! The subject is every pixel that differs from the background colour (the
//! per-channel median of the border). Head, face and clothing are fixed
//! sub-regions of the subject's bounding box. Each segment is an RGBA PNG the
//! size of the input: the input's pixels inside the segment, transparent
//! outside. The same input bytes always give byte-identical PNGs: no
//! randomness, no timestamps, a fixed encoder configuration.
//!
//! Speed: the mask is computed on a nearest-neighbour sample of at most
//! [`MASK_MAX_PIXELS`] and kept as column runs per row, so cutting a 12 MP
//! photo is row copies rather than per-pixel work (this code runs
//! unoptimised in debug test builds; the image crate does not).

use bytes::Bytes;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::imageops::FilterType;
use image::{DynamicImage, ExtendedColorType, ImageEncoder, ImageError, RgbaImage};

/// A pixel is subject when |r-bg|+|g-bg|+|b-bg| exceeds this.
const FOREGROUND_THRESHOLD: u32 = 60;
/// Images up to this size get an exact per-pixel mask (800x600 does).
const MASK_MAX_PIXELS: u64 = 1 << 19;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SegmentKind {
    Object,
    Head,
    Face,
    Cloth,
}

impl SegmentKind {
    /// In the order the API lists them.
    pub const ALL: [SegmentKind; 4] = [
        SegmentKind::Object,
        SegmentKind::Head,
        SegmentKind::Face,
        SegmentKind::Cloth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SegmentKind::Object => "object_seg",
            SegmentKind::Head => "head_seg",
            SegmentKind::Face => "face_seg",
            SegmentKind::Cloth => "cloth_seg",
        }
    }

    /// Whether the image's hash says this segment is "not found", so that
    /// callers meet `is_contain: false` on ordinary inputs.
    fn absent_by_hash(self, sha: &[u8; 32]) -> bool {
        match self {
            SegmentKind::Face => sha[0].is_multiple_of(3),
            SegmentKind::Cloth => sha[1].is_multiple_of(4),
            SegmentKind::Object | SegmentKind::Head => false,
        }
    }
}

/// One entry of a result: the PNG, or `None` when not found.
pub(super) struct Segment {
    pub kind: SegmentKind,
    pub png: Option<Bytes>,
}

/// Cut the four segments out of `image`. CPU-heavy: call off the runtime.
pub(super) fn segment(image: &DynamicImage, sha: &[u8; 32]) -> Result<Vec<Segment>, ImageError> {
    let full = image.to_rgba8();
    let mask = Mask::of(image, &full);
    SegmentKind::ALL
        .into_iter()
        .map(|kind| {
            let region = mask
                .bbox
                .filter(|_| !kind.absent_by_hash(sha))
                .map(|b| b.region(kind));
            let png = match region.and_then(|r| cut(&full, &mask, &r)) {
                Some(rgba) => Some(encode(&rgba, full.width(), full.height())?),
                None => None,
            };
            Ok(Segment { kind, png })
        })
        .collect()
}

/// A half-open pixel rectangle `[x0, x1) × [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

/// The subject, as half-open column runs (full-resolution columns) for each
/// row of the sample; full-resolution row `y` uses sample row `y * sh / h`.
struct Mask {
    h: usize,
    runs: Vec<Vec<(usize, usize)>>,
    bbox: Option<Rect>,
}

impl Mask {
    /// `full` is `image` as RGBA.
    fn of(image: &DynamicImage, full: &RgbaImage) -> Mask {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let pixels = (w as u64) * (h as u64);
        let resized;
        let sample = if pixels <= MASK_MAX_PIXELS {
            full
        } else {
            let scale = (MASK_MAX_PIXELS as f64 / pixels as f64).sqrt();
            let sw = ((w as f64 * scale) as u32).max(1);
            let sh = ((h as f64 * scale) as u32).max(1);
            resized = image.resize_exact(sw, sh, FilterType::Nearest).into_rgba8();
            &resized
        };
        let (sw, sh) = (sample.width() as usize, sample.height() as usize);
        if sw == 0 || sh == 0 {
            return Mask {
                h,
                runs: Vec::new(),
                bbox: None,
            };
        }
        let px = sample.as_raw();
        let bg = background(px, sw, sh);
        // First full-resolution column whose sample column is `s`.
        let col = |s: usize| (s * w).div_ceil(sw);
        let row = |s: usize| (s * h).div_ceil(sh);

        let mut runs = Vec::with_capacity(sh);
        let mut bbox: Option<Rect> = None;
        for (sy, line) in px.chunks_exact(sw * 4).enumerate() {
            let mut row_runs = Vec::new();
            let mut start = None;
            for (sx, p) in line.chunks_exact(4).chain([&[0u8; 4][..]]).enumerate() {
                let subject = sx < sw && is_subject(p, bg);
                match (subject, start) {
                    (true, None) => start = Some(sx),
                    (false, Some(a)) => {
                        row_runs.push((col(a), col(sx)));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let (Some(&(first, _)), Some(&(_, last))) = (row_runs.first(), row_runs.last()) {
                let (y0, y1) = (row(sy), row(sy + 1));
                bbox = Some(match bbox {
                    None => Rect {
                        x0: first,
                        y0,
                        x1: last,
                        y1,
                    },
                    Some(b) => Rect {
                        x0: b.x0.min(first),
                        x1: b.x1.max(last),
                        y1,
                        ..b
                    },
                });
            }
            runs.push(row_runs);
        }
        Mask { h, runs, bbox }
    }

    fn row(&self, y: usize) -> &[(usize, usize)] {
        let sampled = y * self.runs.len() / self.h.max(1);
        self.runs.get(sampled).map_or(&[], Vec::as_slice)
    }
}

fn is_subject(p: &[u8], bg: [u8; 3]) -> bool {
    let diff = u32::from(p[0].abs_diff(bg[0]))
        + u32::from(p[1].abs_diff(bg[1]))
        + u32::from(p[2].abs_diff(bg[2]));
    p[3] >= 128 && diff > FOREGROUND_THRESHOLD
}

/// Per-channel median of the border pixels.
fn background(px: &[u8], w: usize, h: usize) -> [u8; 3] {
    let mut hist = [[0u32; 256]; 3];
    let mut add = |x: usize, y: usize| {
        let i = (y * w + x) * 4;
        for (c, hist) in hist.iter_mut().enumerate() {
            hist[usize::from(px[i + c])] += 1;
        }
    };
    for x in 0..w {
        add(x, 0);
        add(x, h - 1);
    }
    for y in 1..h.saturating_sub(1) {
        add(0, y);
        add(w - 1, y);
    }
    hist.map(|hist| {
        let half = hist.iter().sum::<u32>() / 2;
        let mut seen = 0;
        hist.iter()
            .position(|&n| {
                seen += n;
                seen > half
            })
            .map_or(0, |v| v as u8)
    })
}

/// Where a segment may lie: a rectangle, or the ellipse inscribed in it.
struct Region {
    rect: Rect,
    ellipse: bool,
}

impl Rect {
    /// The sub-region of this subject bounding box for `kind`.
    fn region(self, kind: SegmentKind) -> Region {
        let (bw, bh) = (self.x1 - self.x0, self.y1 - self.y0);
        let head = Rect {
            x0: self.x0 + bw / 5,
            x1: self.x1 - bw / 5,
            y0: self.y0,
            y1: self.y0 + (bh * 3 / 10).max(1),
        };
        match kind {
            SegmentKind::Object => Region {
                rect: self,
                ellipse: false,
            },
            SegmentKind::Head => Region {
                rect: head,
                ellipse: false,
            },
            SegmentKind::Face => {
                let (hw, hh) = (head.x1 - head.x0, head.y1 - head.y0);
                let face = Rect {
                    x0: head.x0 + hw * 15 / 100,
                    x1: head.x1 - hw * 15 / 100,
                    y0: head.y0 + hh / 4,
                    ..head
                };
                Region {
                    rect: face,
                    ellipse: true,
                }
            }
            SegmentKind::Cloth => Region {
                rect: Rect {
                    y0: self.y0 + bh * 4 / 10,
                    ..self
                },
                ellipse: false,
            },
        }
    }
}

impl Region {
    /// The half-open column range of row `y` inside the region.
    fn span(&self, y: usize) -> Option<(usize, usize)> {
        let r = self.rect;
        if !self.ellipse {
            return Some((r.x0, r.x1));
        }
        let (cx, cy) = ((r.x0 + r.x1) as f64 / 2.0, (r.y0 + r.y1) as f64 / 2.0);
        let (rx, ry) = ((r.x1 - r.x0) as f64 / 2.0, (r.y1 - r.y0) as f64 / 2.0);
        let dy = (y as f64 + 0.5 - cy) / ry;
        // NaN when the region has no height.
        if dy.is_nan() || dy.abs() >= 1.0 {
            return None;
        }
        let half = rx * (1.0 - dy * dy).sqrt();
        let x0 = ((cx - half).round() as usize).clamp(r.x0, r.x1);
        let x1 = ((cx + half).round() as usize).clamp(x0, r.x1);
        Some((x0, x1))
    }
}

/// RGBA buffer with the subject's pixels inside `region`, transparent
/// elsewhere; `None` if no subject pixel falls inside.
fn cut(full: &RgbaImage, mask: &Mask, region: &Region) -> Option<Vec<u8>> {
    let (w, px) = (full.width() as usize, full.as_raw());
    let mut out = vec![0u8; px.len()];
    let mut any = false;
    for y in region.rect.y0..region.rect.y1.min(full.height() as usize) {
        let Some((xa, xb)) = region.span(y) else {
            continue;
        };
        for &(a, b) in mask.row(y) {
            let (a, b) = (a.max(xa), b.min(xb).min(w));
            if a < b {
                let bytes = (y * w + a) * 4..(y * w + b) * 4;
                out[bytes.clone()].copy_from_slice(&px[bytes]);
                any = true;
            }
        }
    }
    any.then_some(out)
}

fn encode(rgba: &[u8], w: u32, h: u32) -> Result<Bytes, ImageError> {
    let mut out = Vec::with_capacity(rgba.len() / 8);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, PngFilter::Up).write_image(
        rgba,
        w,
        h,
        ExtendedColorType::Rgba8,
    )?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blue block on grey covering `[w/4, 3w/4) × [h/8, 7h/8)`.
    fn block_on_grey(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgba8(RgbaImage::from_fn(w, h, |x, y| {
            let inside = (w / 4..3 * w / 4).contains(&x) && (h / 8..7 * h / 8).contains(&y);
            if inside {
                image::Rgba([20, 60, 160, 255])
            } else {
                image::Rgba([230, 230, 230, 255])
            }
        }))
    }

    #[test]
    fn small_images_get_an_exact_mask() {
        let img = block_on_grey(400, 400);
        let mask = Mask::of(&img, &img.to_rgba8());
        assert_eq!(
            mask.bbox,
            Some(Rect {
                x0: 100,
                y0: 50,
                x1: 300,
                y1: 350
            })
        );
        assert_eq!(mask.row(50), [(100, 300)]);
        assert!(mask.row(49).is_empty());
    }

    #[test]
    fn large_images_get_a_sampled_mask_close_to_the_subject() {
        let img = block_on_grey(2400, 1800);
        let mask = Mask::of(&img, &img.to_rgba8());
        let b = mask.bbox.expect("subject");
        let near = |got: usize, want: usize| got.abs_diff(want) <= 4;
        assert!(
            near(b.x0, 600) && near(b.x1, 1800) && near(b.y0, 225) && near(b.y1, 1575),
            "{b:?}"
        );
    }

    #[test]
    fn a_uniform_image_contains_nothing() {
        let img =
            DynamicImage::ImageRgb8(image::RgbImage::from_pixel(320, 320, image::Rgb([9, 9, 9])));
        assert!(
            segment(&img, &[1; 32])
                .unwrap()
                .iter()
                .all(|s| s.png.is_none())
        );
    }

    #[test]
    fn the_hash_hides_face_and_cloth() {
        let img = block_on_grey(400, 400);
        let present = |sha: [u8; 32]| -> Vec<bool> {
            segment(&img, &sha)
                .unwrap()
                .iter()
                .map(|s| s.png.is_some())
                .collect()
        };
        assert_eq!(present([1; 32]), [true, true, true, true]);
        assert_eq!(present([0; 32]), [true, true, false, false]);
    }

    #[test]
    fn segments_keep_subject_pixels_and_clear_the_rest() {
        let img = block_on_grey(400, 400);
        let segs = segment(&img, &[1; 32]).unwrap();
        let object = image::load_from_memory(segs[0].png.as_ref().unwrap())
            .unwrap()
            .into_rgba8();
        assert_eq!(object.dimensions(), (400, 400));
        assert_eq!(object.get_pixel(200, 200).0, [20, 60, 160, 255]);
        assert_eq!(object.get_pixel(5, 5).0, [0, 0, 0, 0]);
    }
}
