//! Billed answers that fail a careful reader's checks: real recognitions
//! (HTTP 200, code 0, a `request_id`, results on the CDN) bent one way
//! ([`Fault::BadSegmentUrl`], [`Fault::ManySegments`],
//! [`Fault::WrongSizeMasks`]).

use axum::extract::rejection::BytesRejection;
use bytes::Bytes;
use image::DynamicImage;

use super::{Answer, DataField, Fault, ImageEntry, Shared};

/// Padding entries of a [`Fault::ManySegments`] answer that copy a real
/// (downloadable) URL; the rest carry a URL that does not parse, so the
/// whole answer stays under 1 MiB.
const DOWNLOADABLE_PADDING: usize = 200;

/// A real recognition, bent as `fault` says.
pub(super) async fn billed(
    sim: &Shared,
    fault: Fault,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let shrink = if fault == Fault::WrongSizeMasks { 2 } else { 1 };
    let mut answer = sim.recognize_scaled(body, shrink).await;
    let Answer::Json {
        data: DataField::Success(d),
        ..
    } = &mut answer
    else {
        return answer;
    };
    let images = &mut d.task_result.images;
    match fault {
        Fault::BadSegmentUrl => {
            if let Some(img) = images.iter_mut().find(|i| i.is_contain) {
                img.url = "http://exa mple.invalid/%%broken".into();
            }
        }
        Fault::ManySegments(n) => pad(images, n),
        _ => {}
    }
    answer
}

/// Grow `images` to `n` entries (see [`Fault::ManySegments`]).
fn pad(images: &mut Vec<ImageEntry>, n: usize) {
    let Some((kind, url)) = images
        .iter()
        .find(|i| i.is_contain)
        .map(|i| (i.kind, i.url.clone()))
    else {
        return;
    };
    let mut copies = 0;
    while images.len() < n {
        let url = if copies < DOWNLOADABLE_PADDING {
            copies += 1;
            url.clone()
        } else {
            "x".to_owned()
        };
        images.push(ImageEntry {
            kind,
            is_contain: true,
            url,
        });
    }
}

/// `image` shrunk `times` times each side (at least 1 px); `times` ≤ 1
/// leaves it alone.
pub(super) fn shrunk(image: DynamicImage, times: u32) -> DynamicImage {
    if times <= 1 {
        return image;
    }
    let w = (image.width() / times).max(1);
    let h = (image.height() / times).max(1);
    image.resize_exact(w, h, image::imageops::FilterType::Triangle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_copies_a_real_url_then_short_broken_ones() {
        let mut images = vec![
            ImageEntry {
                kind: "face_seg",
                is_contain: false,
                url: String::new(),
            },
            ImageEntry {
                kind: "object_seg",
                is_contain: true,
                url: "http://127.0.0.1:1/cdn/r/object_seg.png?expires=1&sig=00".into(),
            },
        ];
        pad(&mut images, 10_000);
        assert_eq!(images.len(), 10_000);
        let real = images.iter().filter(|i| i.url.contains("/cdn/")).count();
        assert_eq!(real, 1 + DOWNLOADABLE_PADDING);
        assert!(images.iter().skip(2).all(|i| i.is_contain));
        let body = serde_json::to_vec(&images).unwrap();
        assert!(body.len() < 1024 * 1024, "{} bytes", body.len());
        let img = DynamicImage::new_rgb8(600, 401);
        let small = shrunk(img, 2);
        assert_eq!((small.width(), small.height()), (300, 200));
    }
}
