//! Geometry of a fix: the pure [`plan`] (orientation, scale, padding) and
//! the [`TransformRecord`] that maps prepared-image coordinates back onto
//! the source pixel grid. Part of `prepare`; no pixels, no I/O, and nothing
//! about RabbitMQ, S3 or HTTP.
//!
//! # Coordinates
//!
//! Coordinates are continuous: pixel `(i, j)` covers `[i, i+1) x [j, j+1)`,
//! its centre is `(i + 0.5, j + 0.5)`, and a `w x h` image spans
//! `[0, w] x [0, h]`. In this convention every step is an exact map
//! (`W x H` are the dimensions entering the step):
//!
//! | step | forward `(x, y) ->` | output size |
//! | --- | --- | --- |
//! | `Orient 1` identity | `(x, y)` | `W x H` |
//! | `Orient 2` flip horizontal | `(W - x, y)` | `W x H` |
//! | `Orient 3` rotate 180 | `(W - x, H - y)` | `W x H` |
//! | `Orient 4` flip vertical | `(x, H - y)` | `W x H` |
//! | `Orient 5` transpose | `(y, x)` | `H x W` |
//! | `Orient 6` rotate 90 CW | `(H - y, x)` | `H x W` |
//! | `Orient 7` transverse | `(H - y, W - x)` | `H x W` |
//! | `Orient 8` rotate 270 CW | `(y, W - x)` | `H x W` |
//! | `Resize` `from -> to` | `(x * to.w / from.w, y * to.h / from.h)` | `to` |
//! | `Pad` | `(x + left, y + top)` | `W + left + right x H + top + bottom` |
//! | `Encode` | `(x, y)` | `W x H` |
//!
//! `Orient` maps the stored (un-rotated) grid to the displayed one, so its
//! inverse lands on the source exactly as stored in the file. The resampler
//! samples output pixel centres at `(i + 0.5) * from / to`, the same map.
//!
//! # Plan
//!
//! A fix is executed as orient -> resize -> pad -> encode. The content is
//! resized *before* padding: the padded canvas is never materialised at the
//! source scale (a 30000x1 strip would otherwise become 30000x12000), the
//! pad colour is not smeared into the content by the resampler, and the
//! padding borders are whole output pixels.

use super::check::aspect_ok;
use super::{OutputFormat, Spec};

/// One recorded step, applied in order to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Transform {
    /// The EXIF orientation was applied (pixels rotated / flipped).
    Orient { exif: u8 },
    /// Uniform resample (up to reach the minimum side, down to fit the size
    /// limit or the pixel budget); per-axis ratios differ only by rounding.
    Resize { from: [u32; 2], to: [u32; 2] },
    /// Borders added (never cropped) to reach the aspect range and minimum
    /// side: white `[255,255,255,255]` for opaque images, transparent
    /// `[0,0,0,0]` for images with alpha (which are encoded as PNG).
    Pad {
        left: u32,
        top: u32,
        right: u32,
        bottom: u32,
        color: [u8; 4],
    },
    /// Re-encoded; always the last step when anything changed. `quality`
    /// is the JPEG quality, `None` for PNG.
    Encode {
        format: OutputFormat,
        quality: Option<u8>,
    },
}

impl Transform {
    /// The step's name, as the manifest's `op` tag spells it.
    pub fn op(&self) -> &'static str {
        match self {
            Transform::Orient { .. } => "orient",
            Transform::Resize { .. } => "resize",
            Transform::Pad { .. } => "pad",
            Transform::Encode { .. } => "encode",
        }
    }

    fn output_dims(&self, [w, h]: [u32; 2]) -> [u32; 2] {
        match *self {
            Transform::Orient { exif } if swaps_axes(exif) => [h, w],
            Transform::Resize { to, .. } => to,
            Transform::Pad {
                left,
                top,
                right,
                bottom,
                ..
            } => [
                w.saturating_add(left).saturating_add(right),
                h.saturating_add(top).saturating_add(bottom),
            ],
            _ => [w, h],
        }
    }
}

/// Everything done to the source, enough to map coordinates both ways.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransformRecord {
    /// Source width and height as stored in the file (before orientation).
    pub source: [u32; 2],
    /// Prepared image width and height.
    pub output: [u32; 2],
    /// Empty for passthrough.
    pub steps: Vec<Transform>,
}

impl TransformRecord {
    /// The record of an image sent as it is.
    pub fn identity(width: u32, height: u32) -> Self {
        TransformRecord {
            source: [width, height],
            output: [width, height],
            steps: Vec::new(),
        }
    }

    /// Dimensions entering each step; the last entry is the output size.
    pub(super) fn stages(&self) -> Vec<[u32; 2]> {
        let mut dims = self.source;
        let mut stages = Vec::with_capacity(self.steps.len() + 1);
        for step in &self.steps {
            stages.push(dims);
            dims = step.output_dims(dims);
        }
        stages.push(dims);
        stages
    }

    /// Prepared-image coordinates -> source coordinates on the stored
    /// (un-rotated) grid. `None` if the point lies in padding or outside the
    /// prepared image. Content edges are inclusive.
    pub fn to_source(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        let stages = self.stages();
        let mut p = (x, y);
        if !within(p, *stages.last()?) {
            return None;
        }
        for (step, &before) in self.steps.iter().zip(&stages).rev() {
            p = match *step {
                Transform::Orient { exif } => orient_inverse(exif, before, p),
                Transform::Resize { from, to } => (
                    p.0 * f64::from(from[0]) / f64::from(to[0]),
                    p.1 * f64::from(from[1]) / f64::from(to[1]),
                ),
                Transform::Pad { left, top, .. } => {
                    let q = (p.0 - f64::from(left), p.1 - f64::from(top));
                    if !within(q, before) {
                        return None;
                    }
                    q
                }
                Transform::Encode { .. } => p,
            };
        }
        Some(p)
    }

    /// Source coordinates (stored grid) -> prepared-image coordinates.
    pub fn to_prepared(&self, x: f64, y: f64) -> (f64, f64) {
        let mut p = (x, y);
        for (step, before) in self.steps.iter().zip(self.stages()) {
            p = match *step {
                Transform::Orient { exif } => orient_forward(exif, before, p),
                Transform::Resize { from, to } => (
                    p.0 * f64::from(to[0]) / f64::from(from[0]),
                    p.1 * f64::from(to[1]) / f64::from(from[1]),
                ),
                Transform::Pad { left, top, .. } => (p.0 + f64::from(left), p.1 + f64::from(top)),
                Transform::Encode { .. } => p,
            };
        }
        p
    }
}

/// Slack for float noise when testing whether a point is inside an image.
const EDGE_EPSILON: f64 = 1e-9;

fn within((x, y): (f64, f64), [w, h]: [u32; 2]) -> bool {
    (-EDGE_EPSILON..=f64::from(w) + EDGE_EPSILON).contains(&x)
        && (-EDGE_EPSILON..=f64::from(h) + EDGE_EPSILON).contains(&y)
}

/// EXIF orientations 5..=8 turn the image a quarter, swapping its sides.
pub(super) fn swaps_axes(exif: u8) -> bool {
    matches!(exif, 5..=8)
}

/// Stored grid (`W x H`) -> displayed grid; see the table in the module docs.
fn orient_forward(exif: u8, [w, h]: [u32; 2], (x, y): (f64, f64)) -> (f64, f64) {
    let (w, h) = (f64::from(w), f64::from(h));
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

/// Width and height of a source stored as `stored` once its EXIF
/// orientation is applied (as a browser or viewer shows it).
pub fn displayed_dims(exif: u8, [w, h]: [u32; 2]) -> [u32; 2] {
    if swaps_axes(exif) { [h, w] } else { [w, h] }
}

/// Displayed (EXIF-oriented) coordinates -> stored coordinates of a source
/// stored as `stored`: compose with [`TransformRecord::to_prepared`] to
/// find where a point of the upright source landed in the prepared image.
pub fn displayed_to_stored(exif: u8, stored: [u32; 2], p: (f64, f64)) -> (f64, f64) {
    orient_inverse(exif, stored, p)
}

/// Displayed grid -> stored grid (`W x H` are the stored dimensions).
fn orient_inverse(exif: u8, [w, h]: [u32; 2], (u, v): (f64, f64)) -> (f64, f64) {
    let (w, h) = (f64::from(w), f64::from(h));
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

/// Borders around the content, in output pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Margins {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

impl Margins {
    /// Where the content's top-left corner sits on the canvas.
    pub fn at(&self) -> [u32; 2] {
        [self.left, self.top]
    }
}

/// The geometric part of a fix, decided from dimensions alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Stored source dimensions.
    pub source: [u32; 2],
    /// EXIF orientation to apply, 1..=8 (anything else is treated as 1).
    pub orientation: u8,
    /// Source dimensions after orientation.
    pub oriented: [u32; 2],
    /// Scale applied to the oriented content.
    pub scale: f64,
    /// Smallest scale at which the canvas still reaches `min_side` without
    /// extra padding: the floor for downscaling to fit the size limit.
    pub min_scale: f64,
    /// Content dimensions after resizing.
    pub content: [u32; 2],
    /// Padding around the content.
    pub margins: Margins,
    /// Output dimensions: content plus margins.
    pub canvas: [u32; 2],
}

/// Plan the geometry for a `width x height` stored image with EXIF
/// `orientation`: orient, upscale uniformly only as far as needed for the
/// minimum side, then pad (centred) into the aspect range. The canvas always
/// satisfies `spec` and is never smaller than the oriented source.
pub fn plan(width: u32, height: u32, orientation: u8, spec: &Spec) -> Plan {
    let orientation = if (1..=8).contains(&orientation) {
        orientation
    } else {
        1
    };
    let source = [width.max(1), height.max(1)];
    let oriented = if swaps_axes(orientation) {
        [source[1], source[0]]
    } else {
        source
    };
    // The short side of the aspect-padded canvas at scale 1 decides the upscale.
    let [aw, ah] = aspect_canvas(oriented, spec.max_aspect);
    let min_scale = f64::from(spec.min_side) / f64::from(aw.min(ah));
    let base = Plan {
        source,
        orientation,
        oriented,
        scale: 1.0,
        min_scale,
        content: oriented,
        margins: Margins::default(),
        canvas: oriented,
    };
    base.with_scale(min_scale.max(1.0), spec)
}

impl Plan {
    /// The same plan with the content at `scale` (never below `min_scale`).
    pub fn with_scale(&self, scale: f64, spec: &Spec) -> Plan {
        let scale = scale.max(self.min_scale);
        let content = [
            scaled(self.oriented[0], scale),
            scaled(self.oriented[1], scale),
        ];
        let [aw, ah] = aspect_canvas(content, spec.max_aspect);
        let canvas = [aw.max(spec.min_side), ah.max(spec.min_side)];
        let (dx, dy) = (canvas[0] - content[0], canvas[1] - content[1]);
        let margins = Margins {
            left: dx / 2,
            top: dy / 2,
            right: dx - dx / 2,
            bottom: dy - dy / 2,
        };
        Plan {
            scale,
            content,
            margins,
            canvas,
            ..*self
        }
    }

    /// Output pixel count.
    pub fn pixels(&self) -> u64 {
        u64::from(self.canvas[0]) * u64::from(self.canvas[1])
    }

    /// True when the content is resampled.
    pub fn resizes(&self) -> bool {
        self.content != self.oriented
    }

    /// The record of this plan followed by `encode`.
    pub fn record(&self, pad_color: [u8; 4], encode: Transform) -> TransformRecord {
        let mut steps = Vec::with_capacity(4);
        if self.orientation != 1 {
            steps.push(Transform::Orient {
                exif: self.orientation,
            });
        }
        if self.resizes() {
            steps.push(Transform::Resize {
                from: self.oriented,
                to: self.content,
            });
        }
        if self.margins != Margins::default() {
            let Margins {
                left,
                top,
                right,
                bottom,
            } = self.margins;
            steps.push(Transform::Pad {
                left,
                top,
                right,
                bottom,
                color: pad_color,
            });
        }
        steps.push(encode);
        TransformRecord {
            source: self.source,
            output: self.canvas,
            steps,
        }
    }
}

/// `side * scale`, rounded up (minus a hair of float noise, so 300.0000001
/// stays 300) so an upscale never falls a pixel short; at least 1.
fn scaled(side: u32, scale: f64) -> u32 {
    let v = (f64::from(side) * scale - 1e-6).ceil();
    // Saturating float-to-int cast; scales are bounded by the caller.
    v.clamp(1.0, f64::from(u32::MAX)) as u32
}

/// Grow the short side of `[w, h]` until the aspect ratio is in range.
fn aspect_canvas([w, h]: [u32; 2], max_aspect: f64) -> [u32; 2] {
    [w.max(partner(h, max_aspect)), h.max(partner(w, max_aspect))]
}

/// Smallest side `s` such that `long / s` is within `max_aspect` (as judged
/// by `aspect_ok`, so the planner and the check can never disagree).
fn partner(long: u32, max_aspect: f64) -> u32 {
    let max_aspect = max_aspect.max(1.0);
    let mut s = ((f64::from(long) / max_aspect).ceil() as u32).clamp(1, long.max(1));
    while s < long && !aspect_ok(long, s, max_aspect) {
        s += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPEC: Spec = Spec::KLING;

    fn encode() -> Transform {
        Transform::Encode {
            format: OutputFormat::Jpeg,
            quality: Some(90),
        }
    }

    fn record(w: u32, h: u32, o: u8) -> (Plan, TransformRecord) {
        let p = plan(w, h, o, &SPEC);
        (p, p.record([255; 4], encode()))
    }

    fn assert_in_spec(p: &Plan) {
        let [w, h] = p.canvas;
        assert!(w >= SPEC.min_side && h >= SPEC.min_side, "{p:?}");
        assert!(aspect_ok(w, h, SPEC.max_aspect), "{p:?}");
        assert_eq!(
            [
                p.content[0] + p.margins.left + p.margins.right,
                p.content[1] + p.margins.top + p.margins.bottom
            ],
            p.canvas
        );
    }

    #[test]
    fn examples() {
        let p = plan(200, 150, 1, &SPEC);
        assert_eq!(
            (p.content, p.canvas, p.margins),
            ([400, 300], [400, 300], Margins::default())
        );
        let p = plan(2000, 400, 1, &SPEC);
        assert_eq!((p.content, p.canvas), ([2000, 400], [2000, 800]));
        assert_eq!(
            p.margins,
            Margins {
                left: 0,
                top: 200,
                right: 0,
                bottom: 200
            }
        );
        let p = plan(100, 10, 6, &SPEC);
        assert_eq!(
            (p.oriented, p.content, p.canvas),
            ([10, 100], [75, 750], [300, 750])
        );
        let p = plan(1, 1, 1, &SPEC);
        assert_eq!(p.canvas, [300, 300]);
    }

    #[test]
    fn passthrough_record_maps_identity() {
        let r = TransformRecord::identity(640, 480);
        assert_eq!(r.to_source(10.5, 20.25), Some((10.5, 20.25)));
        assert_eq!(r.to_prepared(10.5, 20.25), (10.5, 20.25));
        assert_eq!(r.to_source(641.0, 0.0), None);
    }

    #[test]
    fn orientation_math_matches_the_pixels() {
        // Every stored pixel, oriented by `image`, must land where the
        // record says, for all eight orientations.
        let (w, h) = (5u32, 3u32);
        let src = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 0]));
        for o in 1..=8u8 {
            let mut img = image::DynamicImage::ImageRgb8(src.clone());
            img.apply_orientation(image::metadata::Orientation::from_exif(o).unwrap());
            let out = img.into_rgb8();
            let rec = TransformRecord {
                source: [w, h],
                output: [out.width(), out.height()],
                steps: vec![Transform::Orient { exif: o }],
            };
            assert_eq!(*rec.stages().last().unwrap(), rec.output, "orientation {o}");
            for (x, y, px) in src.enumerate_pixels() {
                let (u, v) = rec.to_prepared(f64::from(x) + 0.5, f64::from(y) + 0.5);
                assert_eq!(
                    out.get_pixel(u.floor() as u32, v.floor() as u32),
                    px,
                    "orientation {o}"
                );
                let back = rec.to_source(u, v).unwrap();
                assert_eq!(back, (f64::from(x) + 0.5, f64::from(y) + 0.5));
            }
        }
    }

    #[test]
    fn record_serialises_with_op_tags() {
        let (_, rec) = record(2000, 400, 6);
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            json["steps"][0],
            serde_json::json!({"op": "orient", "exif": 6})
        );
        assert_eq!(
            json["steps"].as_array().unwrap().last().unwrap()["op"],
            "encode"
        );
        for (step, json) in rec.steps.iter().zip(json["steps"].as_array().unwrap()) {
            assert_eq!(json["op"], step.op(), "op() agrees with the serde tag");
        }
        let back: TransformRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, rec);
    }

    proptest! {
        #[test]
        fn planned_output_is_in_spec_and_round_trips(
            w in 1u32..=4000, h in 1u32..=4000, o in 1u8..=8,
            fx in 0.0f64..=1.0, fy in 0.0f64..=1.0,
        ) {
            let (p, rec) = record(w, h, o);
            assert_in_spec(&p);
            prop_assert!(p.canvas[0] >= p.oriented[0] && p.canvas[1] >= p.oriented[1]);
            prop_assert!(p.content[0] >= p.oriented[0] && p.content[1] >= p.oriented[1]);
            prop_assert_eq!(*rec.stages().last().unwrap(), rec.output);

            // Source corners land inside the output.
            let [ow, oh] = rec.output.map(f64::from);
            for (x, y) in [(0.0, 0.0), (w as f64, 0.0), (0.0, h as f64), (w as f64, h as f64)] {
                let (u, v) = rec.to_prepared(x, y);
                prop_assert!((-1e-9..=ow + 1e-9).contains(&u) && (-1e-9..=oh + 1e-9).contains(&v));
                prop_assert!(rec.to_source(u, v).is_some());
            }

            // A point inside the content round trips both ways.
            let m = p.margins;
            let u = f64::from(m.left) + fx * f64::from(p.content[0]);
            let v = f64::from(m.top) + fy * f64::from(p.content[1]);
            let (x, y) = rec.to_source(u, v).expect("content maps to the source");
            prop_assert!((0.0..=w as f64 + 1e-6).contains(&x) && (0.0..=h as f64 + 1e-6).contains(&y));
            let (u2, v2) = rec.to_prepared(x, y);
            prop_assert!((u2 - u).abs() < 1e-6 && (v2 - v).abs() < 1e-6);
        }

        #[test]
        fn padding_maps_to_none(w in 1u32..=4000, h in 1u32..=4000, o in 1u8..=8, f in 0.0f64..1.0) {
            let (p, rec) = record(w, h, o);
            let m = p.margins;
            let [cw, ch] = p.canvas.map(f64::from);
            if m.left > 0 {
                prop_assert_eq!(rec.to_source(f * (f64::from(m.left) - 0.01), f * ch), None);
            }
            if m.right > 0 {
                prop_assert_eq!(rec.to_source(cw - f * (f64::from(m.right) - 0.01), f * ch), None);
            }
            if m.top > 0 {
                prop_assert_eq!(rec.to_source(f * cw, f * (f64::from(m.top) - 0.01)), None);
            }
            if m.bottom > 0 {
                prop_assert_eq!(rec.to_source(f * cw, ch - f * (f64::from(m.bottom) - 0.01)), None);
            }
            prop_assert_eq!(rec.to_source(cw + 1.0, 0.0), None);
        }

        #[test]
        fn downscaled_plans_stay_in_spec(w in 1u32..=4000, h in 1u32..=4000, o in 1u8..=8, f in 0.0f64..=1.0) {
            let base = plan(w, h, o, &SPEC);
            let p = base.with_scale(base.scale * f, &SPEC);
            assert_in_spec(&p);
            prop_assert!(p.scale >= p.min_scale && p.pixels() <= base.pixels());
            let rec = p.record([0; 4], encode());
            let (x, y) = rec.to_source(f64::from(p.margins.left), f64::from(p.margins.top)).unwrap();
            let (u, v) = rec.to_prepared(x, y);
            prop_assert!((u - f64::from(p.margins.left)).abs() < 1e-6 && (v - f64::from(p.margins.top)).abs() < 1e-6);
        }
    }
}
