//! The input-spec check: which rules of a [`Spec`] a probed image breaks.
//! Part of `prepare`; pure, and knows nothing about RabbitMQ, S3 or HTTP.

use super::{ColourModel, Probe, SourceFormat, Spec};

/// One broken rule of the input spec.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Violation {
    /// Not JPEG or PNG.
    Format { format: SourceFormat },
    /// File larger than the spec allows.
    TooLarge { bytes: u64, max: u64 },
    /// A side shorter than the spec allows.
    TooSmall { width: u32, height: u32, min: u32 },
    /// Width / height outside `[1 / max_aspect, max_aspect]`.
    Aspect { width: u32, height: u32, ratio: f64 },
    /// EXIF orientation other than 1: the API would see the stored pixels,
    /// not the image as displayed.
    Orientation { exif: u8 },
    /// CMYK or more than 8 bits per channel: valid JPEG / PNG, but not
    /// what the API (or most decoders) expect; converted to 8-bit sRGB.
    Colour { model: ColourModel },
}

/// Every rule `probe` breaks; empty means the bytes can be sent as they are.
pub fn check(probe: &Probe, spec: &Spec) -> Vec<Violation> {
    let mut out = Vec::new();
    if !matches!(probe.format, SourceFormat::Jpeg | SourceFormat::Png) {
        out.push(Violation::Format {
            format: probe.format,
        });
    }
    if probe.bytes > spec.max_bytes {
        out.push(Violation::TooLarge {
            bytes: probe.bytes,
            max: spec.max_bytes,
        });
    }
    let (width, height) = (probe.width, probe.height);
    if width < spec.min_side || height < spec.min_side {
        out.push(Violation::TooSmall {
            width,
            height,
            min: spec.min_side,
        });
    }
    if !aspect_ok(width, height, spec.max_aspect) {
        out.push(Violation::Aspect {
            width,
            height,
            ratio: f64::from(width) / f64::from(height),
        });
    }
    if probe.orientation != 1 {
        out.push(Violation::Orientation {
            exif: probe.orientation,
        });
    }
    if probe.colour != ColourModel::Standard {
        out.push(Violation::Colour {
            model: probe.colour,
        });
    }
    out
}

/// `long / short <= max_aspect`, the single definition used by the check
/// and by the planner (so rounding can never disagree between them).
/// Comparing the long side over the short one avoids the inexact `1/2.5`.
pub(super) fn aspect_ok(width: u32, height: u32, max_aspect: f64) -> bool {
    let (long, short) = (width.max(height), width.min(height));
    short > 0 && f64::from(long) / f64::from(short) <= max_aspect
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(format: SourceFormat, width: u32, height: u32, bytes: u64, orientation: u8) -> Probe {
        Probe {
            format,
            width,
            height,
            bytes,
            orientation,
            colour: ColourModel::Standard,
        }
    }

    #[test]
    fn in_spec_has_no_violations() {
        let spec = Spec::KLING;
        for (w, h) in [(300, 300), (750, 300), (300, 750), (4000, 3000)] {
            assert_eq!(
                check(&probe(SourceFormat::Jpeg, w, h, spec.max_bytes, 1), &spec),
                vec![]
            );
        }
    }

    #[test]
    fn each_rule_is_reported() {
        let spec = Spec::KLING;
        let v = check(
            &probe(SourceFormat::Webp, 299, 751, spec.max_bytes + 1, 6),
            &spec,
        );
        assert_eq!(
            v,
            vec![
                Violation::Format {
                    format: SourceFormat::Webp
                },
                Violation::TooLarge {
                    bytes: spec.max_bytes + 1,
                    max: spec.max_bytes
                },
                Violation::TooSmall {
                    width: 299,
                    height: 751,
                    min: 300
                },
                Violation::Aspect {
                    width: 299,
                    height: 751,
                    ratio: 299.0 / 751.0
                },
                Violation::Orientation { exif: 6 },
            ]
        );
        assert!(!aspect_ok(751, 300, 2.5));
        assert!(aspect_ok(750, 300, 2.5) && aspect_ok(300, 750, 2.5));
    }

    #[test]
    fn violations_serialise_with_a_rule_tag() {
        let json = serde_json::to_string(&Violation::TooSmall {
            width: 1,
            height: 2,
            min: 300,
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"rule":"too_small","width":1,"height":2,"min":300}"#
        );
    }
}
