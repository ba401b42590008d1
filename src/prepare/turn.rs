//! Applying an EXIF orientation to decoded pixels: RGB(A) images and single
//! YCbCr planes. Part of `prepare`; pure pixel shuffling.
//!
//! Flips and the half turn are row-friendly and left to `image`. The
//! quarter turns (5-8, every portrait phone photo) are copies in which
//! source columns become destination rows, which a pixel-by-pixel loop over
//! the whole frame does at cache-miss speed. Here they go tile by tile
//! (`TILE`), and a one-byte plane (the Y, Cb and Cr of a JPEG worked on as
//! planes) goes 8x8 bytes at a time, transposed in eight `u64` words.

use image::ImageBuffer;

/// Side of the square tiles a quarter turn copies at a time: a tile of
/// source rows and one of destination rows both stay in cache.
const TILE: u32 = 64;

/// Apply EXIF orientation `exif` (1-8; anything else is left as 1) to
/// `img`. A quarter turn (5-8) swaps width and height.
pub(super) fn orient<P: image::Pixel<Subpixel = u8>>(
    img: ImageBuffer<P, Vec<u8>>,
    exif: u8,
) -> ImageBuffer<P, Vec<u8>> {
    let (w, h) = img.dimensions();
    let turn = match exif {
        5 => Turn::Transpose,
        6 => Turn::Clockwise,
        7 => Turn::Transverse,
        8 => Turn::Anticlockwise,
        _ => {
            let mut img = img;
            match exif {
                2 => image::imageops::flip_horizontal_in_place(&mut img),
                3 => image::imageops::rotate180_in_place(&mut img),
                4 => image::imageops::flip_vertical_in_place(&mut img),
                _ => {}
            }
            return img;
        }
    };
    let src = img.as_raw();
    let out = match P::CHANNEL_COUNT {
        1 => turn_bytes(src, w, h, turn),
        3 => turn_pixels::<3>(src, w, h, turn),
        4 => turn_pixels::<4>(src, w, h, turn),
        c => unreachable!("{c}-channel pixels are normalised before orienting"),
    };
    ImageBuffer::from_raw(h, w, out).unwrap_or_else(|| unreachable!("same pixel count"))
}

/// The four quarter turns, each a transpose with or without mirroring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    /// EXIF 5: the main diagonal is the mirror.
    Transpose,
    /// EXIF 6: the stored image is turned 90° clockwise for display.
    Clockwise,
    /// EXIF 7: the anti-diagonal is the mirror.
    Transverse,
    /// EXIF 8: turned 90° anticlockwise for display.
    Anticlockwise,
}

impl Turn {
    /// Whether the source column falls as the displayed row grows
    /// (destination row v reads source column `w - 1 - v`).
    fn columns_fall(self) -> bool {
        matches!(self, Turn::Transverse | Turn::Anticlockwise)
    }

    /// Whether the source row falls as the displayed column grows
    /// (destination column u reads source row `h - 1 - u`).
    fn rows_fall(self) -> bool {
        matches!(self, Turn::Clockwise | Turn::Transverse)
    }

    /// Stored (x, y) of displayed pixel (u, v) of a `w` x `h` source.
    fn source(self, u: u32, v: u32, w: u32, h: u32) -> (u32, u32) {
        let x = if self.columns_fall() { w - 1 - v } else { v };
        let y = if self.rows_fall() { h - 1 - u } else { u };
        (x, y)
    }
}

/// Quarter turn of a `w` x `h` buffer of `C`-byte pixels into an `h` x `w`
/// one. Each arm of the match hands the copy loop a mapping of its own, so
/// the mirroring is decided once per image, not per pixel.
fn turn_pixels<const C: usize>(src: &[u8], w: u32, h: u32, turn: Turn) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    let (dims, all) = ([w, h], [0, h, 0, w]);
    match turn {
        Turn::Transpose => copy_region::<C>(src, &mut out, dims, all, |u, v| (v, u)),
        Turn::Clockwise => copy_region::<C>(src, &mut out, dims, all, |u, v| (v, h - 1 - u)),
        Turn::Transverse => {
            copy_region::<C>(src, &mut out, dims, all, |u, v| (w - 1 - v, h - 1 - u));
        }
        Turn::Anticlockwise => {
            copy_region::<C>(src, &mut out, dims, all, |u, v| (w - 1 - v, u));
        }
    }
    out
}

/// Copy destination columns `u0..u1` of rows `v0..v1` (`[u0, u1, v0, v1]`)
/// of a quarter turn of a `w` x `h` source, tile by tile; `source` gives
/// the stored (x, y) of displayed pixel (u, v).
fn copy_region<const C: usize>(
    src: &[u8],
    out: &mut [u8],
    [w, h]: [u32; 2],
    [u0, u1, v0, v1]: [u32; 4],
    source: impl Fn(u32, u32) -> (u32, u32),
) {
    for tv in (v0..v1).step_by(TILE as usize) {
        for tu in (u0..u1).step_by(TILE as usize) {
            for v in tv..(tv + TILE).min(v1) {
                let row = v as usize * h as usize; // the destination is h wide
                for u in tu..(tu + TILE).min(u1) {
                    let (x, y) = source(u, v);
                    let from = (y as usize * w as usize + x as usize) * C;
                    let to = (row + u as usize) * C;
                    let px: [u8; C] = src[from..from + C].try_into().unwrap_or([0; C]);
                    out[to..to + C].copy_from_slice(&px);
                }
            }
        }
    }
}

/// Quarter turn of a `w` x `h` plane of bytes: whole 8x8 blocks through
/// [`transpose8`], the ragged right and bottom edges pixel by pixel.
fn turn_bytes(src: &[u8], w: u32, h: u32, turn: Turn) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    let (dw, dh) = (h, w);
    // Destination columns and rows that whole blocks cover.
    let (bw, bh) = (dw / 8 * 8, dh / 8 * 8);
    let (sw, dwu) = (w as usize, dw as usize);
    for tv in (0..bh).step_by(TILE as usize) {
        for tu in (0..bw).step_by(TILE as usize) {
            for v0 in (tv..(tv + TILE).min(bh)).step_by(8) {
                for u0 in (tu..(tu + TILE).min(bw)).step_by(8) {
                    // Destination column u0 + j reads source row y(u0 + j);
                    // destination row v0 + i reads source column x(v0 + i).
                    // Load the eight source rows in destination-column
                    // order, so that the block is their transpose; falling
                    // source columns are the bytes of each row reversed.
                    let x0 = if turn.columns_fall() { w - 8 - v0 } else { v0 } as usize;
                    let mut rows = [0u64; 8];
                    for (j, row) in rows.iter_mut().enumerate() {
                        let u = u0 + j as u32;
                        let y = if turn.rows_fall() { h - 1 - u } else { u } as usize;
                        let at = y * sw + x0;
                        let word = u64::from_le_bytes(src[at..at + 8].try_into().unwrap_or([0; 8]));
                        *row = if turn.columns_fall() {
                            word.swap_bytes()
                        } else {
                            word
                        };
                    }
                    transpose8(&mut rows);
                    for (i, row) in rows.iter().enumerate() {
                        let at = (v0 as usize + i) * dwu + u0 as usize;
                        out[at..at + 8].copy_from_slice(&row.to_le_bytes());
                    }
                }
            }
        }
    }
    let source = |u, v| turn.source(u, v, w, h);
    // The strip right of the blocks, then the one below them.
    copy_region::<1>(src, &mut out, [w, h], [bw, dw, 0, bh], source);
    copy_region::<1>(src, &mut out, [w, h], [0, dw, bh, dh], source);
    out
}

/// Transpose an 8x8 matrix of bytes held as eight little-endian rows
/// (byte k of `m[r]` is column k of row r): three rounds of swapping
/// 1-, 2- and 4-byte blocks across the diagonal, each a mask and shifts.
fn transpose8(m: &mut [u64; 8]) {
    let mut swap = |a: usize, b: usize, shift: u32, mask: u64| {
        let t = ((m[a] >> shift) ^ m[b]) & mask;
        m[b] ^= t;
        m[a] ^= t << shift;
    };
    for a in [0, 2, 4, 6] {
        swap(a, a + 1, 8, 0x00FF_00FF_00FF_00FF);
    }
    for a in [0, 1, 4, 5] {
        swap(a, a + 2, 16, 0x0000_FFFF_0000_FFFF);
    }
    for a in 0..4 {
        swap(a, a + 4, 32, 0x0000_0000_FFFF_FFFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};
    use proptest::prelude::*;

    /// The displayed image of orientation `exif`, pixel by pixel from the
    /// EXIF definition: the reference every fast path must equal.
    fn reference(img: &GrayImage, exif: u8) -> GrayImage {
        let (w, h) = img.dimensions();
        let turned = (5..=8).contains(&exif);
        let (dw, dh) = if turned { (h, w) } else { (w, h) };
        GrayImage::from_fn(dw, dh, |u, v| {
            let (x, y) = match exif {
                2 => (w - 1 - u, v),
                3 => (w - 1 - u, h - 1 - v),
                4 => (u, h - 1 - v),
                5 => (v, u),
                6 => (v, h - 1 - u),
                7 => (w - 1 - v, h - 1 - u),
                8 => (w - 1 - v, u),
                _ => (u, v),
            };
            *img.get_pixel(x, y)
        })
    }

    fn numbered(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| Luma([(x * 7 + y * 13) as u8]))
    }

    #[test]
    fn transpose8_transposes() {
        let mut m = [0u64; 8];
        for (r, row) in m.iter_mut().enumerate() {
            *row = u64::from_le_bytes(std::array::from_fn(|c| (r * 8 + c) as u8));
        }
        transpose8(&mut m);
        for (r, row) in m.iter().enumerate() {
            let bytes = row.to_le_bytes();
            for (c, &b) in bytes.iter().enumerate() {
                assert_eq!(b as usize, c * 8 + r, "({r},{c})");
            }
        }
    }

    #[test]
    fn a_phone_photo_turned_clockwise_stands_up() {
        // Landscape as stored, with its top-left pixel marked: after EXIF 6
        // the mark is top-right of a portrait image.
        let mut img = GrayImage::new(40, 24);
        img.put_pixel(0, 0, Luma([255]));
        let out = orient(img, 6);
        assert_eq!(out.dimensions(), (24, 40));
        assert_eq!(out.get_pixel(23, 0), &Luma([255]));
        assert_eq!(out.pixels().filter(|p| p[0] == 255).count(), 1);
    }

    #[test]
    fn rgb_pixels_turn_whole() {
        let img = RgbImage::from_fn(5, 3, |x, y| Rgb([x as u8, y as u8, 200]));
        let out = orient(img, 8);
        assert_eq!(out.dimensions(), (3, 5));
        // EXIF 8: displayed (u, v) is stored (w - 1 - v, u).
        for (u, v, p) in out.enumerate_pixels() {
            assert_eq!(p, &Rgb([(4 - v) as u8, u as u8, 200]), "({u},{v})");
        }
    }

    proptest! {
        /// Blocks, ragged edges and tiny images alike equal the definition,
        /// for planes and for RGB.
        #[test]
        fn every_orientation_matches_the_definition(
            w in 1u32..90, h in 1u32..90, exif in 1u8..=8,
        ) {
            let img = numbered(w, h);
            prop_assert_eq!(orient(img.clone(), exif), reference(&img, exif));
            let rgb = RgbImage::from_fn(w, h, |x, y| {
                let v = img.get_pixel(x, y)[0];
                Rgb([v, v ^ 0x55, v.wrapping_add(1)])
            });
            let want = reference(&img, exif);
            let got = orient(rgb, exif);
            prop_assert_eq!(got.dimensions(), want.dimensions());
            for (u, v, p) in got.enumerate_pixels() {
                let g = want.get_pixel(u, v)[0];
                prop_assert_eq!(p, &Rgb([g, g ^ 0x55, g.wrapping_add(1)]));
            }
        }
    }

    #[test]
    fn a_plane_larger_than_a_tile_turns_every_way() {
        // 8-aligned in one direction, ragged in the other, over two tiles.
        for (w, h) in [(136, 72), (131, 77)] {
            let img = numbered(w, h);
            for exif in 5..=8 {
                assert_eq!(
                    orient(img.clone(), exif),
                    reference(&img, exif),
                    "{w}x{h} {exif}"
                );
            }
        }
    }
}
