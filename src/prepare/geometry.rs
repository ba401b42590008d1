//! The geometry of a fix, pure and exact: EXIF orientation, padding and
//! resizing, planned from dimensions alone, and the record that maps mask
//! (prepared-image) coordinates back to the source pixel grid.
//!
//! Coordinates are continuous: pixel `(i, j)` covers `[i, i+1) × [j, j+1)`,
//! so its centre is `(i + 0.5, j + 0.5)`.

use serde::{Deserialize, Serialize};

use super::{OutputFormat, Spec};

/// Tolerance for float rounding at the image edges, in pixels.
const EPS: f64 = 1e-6;

/// One step applied to the source, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Transform {
    /// EXIF orientation applied: pixels rotated/flipped to display upright.
    Orient { exif: u8 },
    /// Borders added (never cropped) to bring the aspect ratio into range.
    Pad {
        left: u32,
        top: u32,
        right: u32,
        bottom: u32,
        color: [u8; 4],
    },
    /// Resampled from `from` to `to` (width, height).
    Resize { from: [u32; 2], to: [u32; 2] },
    /// Re-encoded (the last step whenever anything changed).
    Encode {
        format: OutputFormat,
        quality: Option<u8>,
    },
}

/// Everything needed to map between source and prepared coordinates.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TransformRecord {
    /// Source dimensions as stored (before orientation).
    pub source: [u32; 2],
    /// Prepared (sent) dimensions.
    pub output: [u32; 2],
    pub steps: Vec<Transform>,
}

/// Oriented `(u, v)` on the displayed grid → stored `(x, y)`, for a stored
/// image of `w × h`.
pub fn unorient(exif: u8, w: f64, h: f64, u: f64, v: f64) -> (f64, f64) {
    match exif {
        2 => (w - u, v),
        3 => (w - u, h - v),
        4 => (u, h - v),
        5 => (v, u),
        6 => (v, h - u),
        7 => (w - v, h - u),
        8 => (w - v, u),
        _ => (u, v),
    }
}

/// Stored `(x, y)` → oriented `(u, v)`; the inverse of [`unorient`].
pub fn orient(exif: u8, w: f64, h: f64, x: f64, y: f64) -> (f64, f64) {
    match exif {
        2 => (w - x, y),
        3 => (w - x, h - y),
        4 => (x, h - y),
        5 => (y, x),
        6 => (h - y, x),
        7 => (h - y, w - x),
        8 => (y, w - x),
        _ => (x, y),
    }
}

/// Dimensions after orientation.
pub fn oriented_dims(exif: u8, w: u32, h: u32) -> (u32, u32) {
    if (5..=8).contains(&exif) {
        (h, w)
    } else {
        (w, h)
    }
}

impl TransformRecord {
    /// Dimensions before each step, walking forward.
    fn dims_before(&self) -> Vec<(u32, u32)> {
        let mut d = (self.source[0], self.source[1]);
        let mut out = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            out.push(d);
            d = match s {
                Transform::Orient { exif } => oriented_dims(*exif, d.0, d.1),
                Transform::Pad {
                    left,
                    top,
                    right,
                    bottom,
                    ..
                } => (d.0 + left + right, d.1 + top + bottom),
                Transform::Resize { to, .. } => (to[0], to[1]),
                Transform::Encode { .. } => d,
            };
        }
        out
    }

    /// Prepared-image coordinates → source pixel coordinates (stored grid).
    /// `None` when the point lies in padding or outside the image.
    pub fn to_source(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        let (mut x, mut y) = (x, y);
        for (step, (w, h)) in self.steps.iter().zip(self.dims_before()).rev() {
            match step {
                Transform::Resize { from, to } => {
                    x *= f64::from(from[0]) / f64::from(to[0]);
                    y *= f64::from(from[1]) / f64::from(to[1]);
                }
                Transform::Pad { left, top, .. } => {
                    x -= f64::from(*left);
                    y -= f64::from(*top);
                    if x < -EPS || y < -EPS || x > f64::from(w) + EPS || y > f64::from(h) + EPS {
                        return None;
                    }
                    (x, y) = (x.clamp(0.0, f64::from(w)), y.clamp(0.0, f64::from(h)));
                }
                Transform::Orient { exif } => {
                    (x, y) = unorient(*exif, f64::from(w), f64::from(h), x, y)
                }
                Transform::Encode { .. } => {}
            }
        }
        let (sw, sh) = (f64::from(self.source[0]), f64::from(self.source[1]));
        let inside = (-EPS..=sw + EPS).contains(&x) && (-EPS..=sh + EPS).contains(&y);
        inside.then_some((x.clamp(0.0, sw), y.clamp(0.0, sh)))
    }

    /// Source coordinates (stored grid) → prepared-image coordinates.
    pub fn to_prepared(&self, x: f64, y: f64) -> (f64, f64) {
        let (mut x, mut y) = (x, y);
        for (step, (w, h)) in self.steps.iter().zip(self.dims_before()) {
            match step {
                Transform::Orient { exif } => {
                    (x, y) = orient(*exif, f64::from(w), f64::from(h), x, y)
                }
                Transform::Pad { left, top, .. } => {
                    x += f64::from(*left);
                    y += f64::from(*top);
                }
                Transform::Resize { from, to } => {
                    x *= f64::from(to[0]) / f64::from(from[0]);
                    y *= f64::from(to[1]) / f64::from(from[1]);
                }
                Transform::Encode { .. } => {}
            }
        }
        (x, y)
    }
}

/// The geometric part of a fix, decided from dimensions only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub exif: u8,
    /// After orientation.
    pub oriented: (u32, u32),
    /// (left, top, right, bottom).
    pub pad: (u32, u32, u32, u32),
    /// After padding and resizing.
    pub output: (u32, u32),
}

impl Plan {
    pub fn padded(&self) -> (u32, u32) {
        (
            self.oriented.0 + self.pad.0 + self.pad.2,
            self.oriented.1 + self.pad.1 + self.pad.3,
        )
    }
}

/// Orient, pad to the aspect range, upscale so both sides reach the
/// minimum. Padding comes first: it adds no resampling, and often makes an
/// upscale unnecessary.
pub fn plan(width: u32, height: u32, exif: u8, spec: &Spec) -> Plan {
    let (w, h) = oriented_dims(exif, width.max(1), height.max(1));
    let (mut pw, mut ph) = (w, h);
    // w/h ≤ max  ⇔  h ≥ w/max;   w/h ≥ 1/max  ⇔  w ≥ h/max.
    if f64::from(w) > f64::from(h) * spec.max_aspect {
        ph = (f64::from(w) / spec.max_aspect).ceil() as u32;
    } else if f64::from(h) > f64::from(w) * spec.max_aspect {
        pw = (f64::from(h) / spec.max_aspect).ceil() as u32;
    }
    let (left, top) = ((pw - w) / 2, (ph - h) / 2);
    let pad = (left, top, pw - w - left, ph - h - top);
    let output = if pw.min(ph) < spec.min_side {
        let s = f64::from(spec.min_side) / f64::from(pw.min(ph));
        fit_aspect(
            (f64::from(pw) * s).ceil() as u32,
            (f64::from(ph) * s).ceil() as u32,
            spec,
        )
    } else {
        (pw, ph)
    };
    Plan {
        exif,
        oriented: (w, h),
        pad,
        output,
    }
}

/// Scale `(w, h)` by `f` (≤ 1) keeping the spec's minimum side and aspect.
pub fn shrink(w: u32, h: u32, f: f64, spec: &Spec) -> (u32, u32) {
    let nw = ((f64::from(w) * f).round() as u32).max(spec.min_side);
    let nh = ((f64::from(h) * f).round() as u32).max(spec.min_side);
    fit_aspect(nw, nh, spec)
}

/// Undo rounding that pushed the aspect a hair outside the range.
fn fit_aspect(mut w: u32, mut h: u32, spec: &Spec) -> (u32, u32) {
    if f64::from(w) > f64::from(h) * spec.max_aspect {
        w = (f64::from(h) * spec.max_aspect).floor() as u32;
    }
    if f64::from(h) > f64::from(w) * spec.max_aspect {
        h = (f64::from(w) * spec.max_aspect).floor() as u32;
    }
    (w.max(spec.min_side), h.max(spec.min_side))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn in_spec(w: u32, h: u32) -> bool {
        let r = f64::from(w) / f64::from(h);
        w >= 300 && h >= 300 && (1.0 / 2.5..=2.5).contains(&r)
    }

    fn record(p: &Plan, source: (u32, u32)) -> TransformRecord {
        let mut steps = vec![Transform::Orient { exif: p.exif }];
        let (l, t, r, b) = p.pad;
        steps.push(Transform::Pad {
            left: l,
            top: t,
            right: r,
            bottom: b,
            color: [255; 4],
        });
        let padded = p.padded();
        steps.push(Transform::Resize {
            from: [padded.0, padded.1],
            to: [p.output.0, p.output.1],
        });
        TransformRecord {
            source: [source.0, source.1],
            output: [p.output.0, p.output.1],
            steps,
        }
    }

    /// The formulas agree with the `image` crate's own orientation.
    #[test]
    fn orientation_formulas_match_the_image_crate() {
        let (w, h) = (3u32, 2u32);
        let src = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 0, 255]));
        for exif in 1..=8u8 {
            let mut img = image::DynamicImage::ImageRgba8(src.clone());
            img.apply_orientation(image::metadata::Orientation::from_exif(exif).unwrap());
            let out = img.to_rgba8();
            assert_eq!(out.dimensions(), oriented_dims(exif, w, h), "exif {exif}");
            for (u, v, p) in out.enumerate_pixels() {
                let (x, y) = unorient(
                    exif,
                    f64::from(w),
                    f64::from(h),
                    f64::from(u) + 0.5,
                    f64::from(v) + 0.5,
                );
                assert_eq!(
                    (p[0] as f64 + 0.5, p[1] as f64 + 0.5),
                    (x, y),
                    "exif {exif} at {u},{v}"
                );
                let back = orient(exif, f64::from(w), f64::from(h), x, y);
                assert_eq!(back, (f64::from(u) + 0.5, f64::from(v) + 0.5));
            }
        }
    }

    #[test]
    fn panorama_is_padded_not_cropped() {
        let p = plan(2000, 400, 1, &Spec::KLING);
        assert_eq!(p.padded(), (2000, 800));
        assert_eq!(p.pad, (0, 200, 0, 200));
        assert_eq!(p.output, (2000, 800));
        let r = record(&p, (2000, 400));
        assert_eq!(r.to_source(1000.0, 100.0), None, "top padding");
        assert_eq!(r.to_source(1000.0, 400.0), Some((1000.0, 200.0)));
    }

    #[test]
    fn thumbnail_is_upscaled() {
        let p = plan(200, 150, 1, &Spec::KLING);
        assert_eq!(p.output, (400, 300));
    }

    proptest! {
        #[test]
        fn every_plan_is_in_spec_and_maps_back(w in 1u32..=4000, h in 1u32..=4000, exif in 1u8..=8) {
            let p = plan(w, h, exif, &Spec::KLING);
            prop_assert!(in_spec(p.output.0, p.output.1), "{p:?}");
            // Padding only adds: the content is never cropped.
            let (pw, ph) = p.padded();
            prop_assert!(pw >= p.oriented.0 && ph >= p.oriented.1);
            prop_assert!(p.output.0 >= pw.min(p.output.0) && p.output.0 >= 300);
            let r = record(&p, (w, h));
            // Source corners land inside the output; round trips hold.
            for (x, y) in [(0.0, 0.0), (f64::from(w), 0.0), (0.0, f64::from(h)), (f64::from(w), f64::from(h)), (f64::from(w) / 2.0, f64::from(h) / 3.0)] {
                let (u, v) = r.to_prepared(x, y);
                prop_assert!(u >= -1e-6 && v >= -1e-6 && u <= f64::from(p.output.0) + 1e-6 && v <= f64::from(p.output.1) + 1e-6);
                let (bx, by) = r.to_source(u.clamp(0.0, f64::from(p.output.0)), v.clamp(0.0, f64::from(p.output.1))).expect("content maps back");
                prop_assert!((bx - x).abs() < 1e-6 && (by - y).abs() < 1e-6, "{x},{y} -> {u},{v} -> {bx},{by}");
            }
        }

        #[test]
        fn shrinking_stays_in_spec(w in 300u32..=20000, h in 300u32..=20000, f in 0.05f64..1.0) {
            let p = plan(w, h, 1, &Spec::KLING);
            let (sw, sh) = shrink(p.output.0, p.output.1, f, &Spec::KLING);
            prop_assert!(in_spec(sw, sh), "{sw}x{sh}");
        }
    }
}
