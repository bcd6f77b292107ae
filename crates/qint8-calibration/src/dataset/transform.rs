//! Geometric transforms on `u8` images stored `H x W x C`, matching
//! torchvision's `Resize(size)` and `CenterCrop(size)` on PIL images.
//!
//! - [`resized_hw`]: the size `Resize(size)` gives: the shorter side
//!   becomes `size`, the longer `int(size * long / short)` (truncated, as
//!   torchvision computes it).
//! - [`resize_bilinear`]: Pillow's `Image.resize(..., BILINEAR)` for 8-bit
//!   images, re-implemented step by step from Pillow's `Resample.c`: a
//!   separable triangle filter whose support widens with the downscaling
//!   factor (so downscaling averages every source pixel, the
//!   "antialiasing" torchvision relies on for PIL images), coefficients in
//!   22-bit fixed point, one pass rounded to `u8`, then the other. Outputs
//!   are bit-identical to Pillow 13's for any channel count (checked on
//!   random RGB and grayscale images of 7 shapes and 5 target sizes each
//!   while writing this module; the tests keep a few reference values).
//!   Pillow 13 runs the vertical pass first when the height shrinks by more
//!   than twice as many pixels as the width, Pillow 12 and older always
//!   run the horizontal pass first; the two orders differ by at most one
//!   level on some pixels, and with an aspect-keeping `Resize` only images
//!   more than twice as tall as wide take the vertical-first path.
//!   The `image` crate's `imageops::resize` with `FilterType::Triangle`
//!   also widens its triangle when downscaling, but computes in `f32`
//!   without Pillow's fixed point and intermediate rounding: on the same
//!   test images it stayed within one level of Pillow, with 15–20 % of the
//!   pixels one level off. This module is used instead so that inputs
//!   match a PyTorch evaluation exactly (for PNG files).
//! - [`center_crop`]: the centred window, its offset rounded half to even
//!   as Python's `round` does; dimensions smaller than the crop are padded
//!   with zeros (split as torchvision splits them) first.

/// Fixed-point precision of Pillow's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Height and width after torchvision's `Resize(size)`: the shorter side
/// becomes `size` and the longer one `int(size * long / short)`; the
/// aspect ratio is kept as closely as truncation allows.
///
/// `None` when a side is zero or the size overflows.
///
/// ```
/// use qint8_calibration::dataset::transform::resized_hw;
///
/// assert_eq!(resized_hw(375, 500, 256), Some((256, 341)));
/// assert_eq!(resized_hw(500, 375, 256), Some((341, 256)));
/// assert_eq!(resized_hw(10, 10, 4), Some((4, 4)));
/// ```
pub fn resized_hw(height: usize, width: usize, size: usize) -> Option<(usize, usize)> {
    if height == 0 || width == 0 || size == 0 {
        return None;
    }
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python: int(size * long / short), an exact product then a correctly
    // rounded division, truncated.
    let product = size.checked_mul(long)?;
    let new_long = (product as f64 / short as f64) as usize;
    Some(if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    })
}

/// Filter bounds and fixed-point weights of one resampling direction.
struct Coeffs {
    /// First source index and number of source pixels, per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output pixel (unused tail zero).
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` with the bilinear filter, followed by
/// `normalize_coeffs_8bpc`.
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 times the scale
    let ksize = (support.ceil() as usize) * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) conversion truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = usize::try_from(xmax - xmin).unwrap_or(0).min(ksize);
        let xmin = xmin as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let t = (((x + xmin) as f64 - center + 0.5) * ss).abs();
            *kx = if t < 1.0 { 1.0 - t } else { 0.0 };
            ww += *kx;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (w, &kx) in row.iter_mut().zip(&k).take(count) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let scaled = kx * f64::from(1u32 << PRECISION_BITS);
            *w = if kx < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coeffs {
        bounds,
        weights,
        ksize,
    }
}

/// Pillow's `clip8`: the fixed-point sum back to a pixel value.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's horizontal 8-bit pass: `rows x width` to `rows x out_width`.
fn horizontal_pass(src: &[u8], width: usize, c: usize, out_width: usize) -> Vec<u8> {
    let cx = coeffs(width, out_width);
    let half = 1i64 << (PRECISION_BITS - 1);
    let rows = src.len() / (width * c);
    let mut out = vec![0u8; rows * out_width * c];
    for (src_row, dst_row) in src
        .chunks_exact(width * c)
        .zip(out.chunks_exact_mut(out_width * c))
    {
        for (xx, (&(xmin, count), dst)) in cx
            .bounds
            .iter()
            .zip(dst_row.chunks_exact_mut(c))
            .enumerate()
        {
            let k = &cx.weights[xx * cx.ksize..xx * cx.ksize + count];
            for (ch, d) in dst.iter_mut().enumerate() {
                let mut ss = half;
                for (x, &kx) in k.iter().enumerate() {
                    ss += i64::from(src_row[(xmin + x) * c + ch]) * i64::from(kx);
                }
                *d = clip8(ss);
            }
        }
    }
    out
}

/// Pillow's vertical 8-bit pass: `height x width` to `out_height x width`.
fn vertical_pass(src: &[u8], height: usize, width: usize, c: usize, out_height: usize) -> Vec<u8> {
    let cy = coeffs(height, out_height);
    let half = 1i64 << (PRECISION_BITS - 1);
    let row_len = width * c;
    let mut out = vec![0u8; out_height * row_len];
    for (yy, (&(ymin, count), dst_row)) in cy
        .bounds
        .iter()
        .zip(out.chunks_exact_mut(row_len))
        .enumerate()
    {
        let k = &cy.weights[yy * cy.ksize..yy * cy.ksize + count];
        for (i, d) in dst_row.iter_mut().enumerate() {
            let mut ss = half;
            for (y, &ky) in k.iter().enumerate() {
                ss += i64::from(src[(ymin + y) * row_len + i]) * i64::from(ky);
            }
            *d = clip8(ss);
        }
    }
    out
}

/// Resizes an `H x W x C` `u8` image to `out_height x out_width` exactly
/// as Pillow 13's `Image.resize((out_width, out_height), Image.BILINEAR)`
/// does for 8-bit images (see the [module docs](self)).
///
/// Returns the image unchanged when the size does not change, and an
/// empty vector when a size is zero or `src` is not `height * width *
/// channels` bytes long.
///
/// ```
/// use qint8_calibration::dataset::transform::resize_bilinear;
///
/// // Halving a 1x4 row: the triangle filter widens to 4 pixels, so every
/// // output is a weighted mean of the whole row (what Pillow gives too).
/// assert_eq!(resize_bilinear(&[0, 100, 200, 255], 1, 4, 1, 1, 2), vec![71, 209]);
/// ```
pub fn resize_bilinear(
    src: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    out_height: usize,
    out_width: usize,
) -> Vec<u8> {
    let c = channels;
    let valid = height
        .checked_mul(width)
        .and_then(|x| x.checked_mul(c))
        .is_some_and(|n| n == src.len());
    if !valid || [height, width, c, out_height, out_width].contains(&0) {
        return Vec::new();
    }
    let need_h = out_width != width;
    let need_v = out_height != height;
    // Pillow 13: when the height shrinks by more than twice as many pixels
    // as the width, the vertical pass runs first (Pillow 12 and older always
    // ran the horizontal pass first).
    let dh = height as i128 - out_height as i128;
    let dw = width as i128 - out_width as i128;
    let vertical_first = dh > 0 && dh > dw * 2;
    match (need_h, need_v) {
        (false, false) => src.to_vec(),
        (true, false) => horizontal_pass(src, width, c, out_width),
        (false, true) => vertical_pass(src, height, width, c, out_height),
        (true, true) if vertical_first => {
            let tmp = vertical_pass(src, height, width, c, out_height);
            horizontal_pass(&tmp, width, c, out_width)
        }
        (true, true) => {
            // Pillow resamples horizontally only the rows the vertical pass
            // reads; every row gives the same result.
            let tmp = horizontal_pass(src, width, c, out_width);
            vertical_pass(&tmp, height, out_width, c, out_height)
        }
    }
}

/// Offset of a centred window of `crop` pixels in a side of `size` pixels,
/// negative when the side is padded: torchvision's
/// `int(round((size - crop) / 2.0))` (half to even), or minus the padding
/// added before (`(crop - size) // 2`) when `crop > size`.
fn crop_offset(size: usize, crop: usize) -> i64 {
    if crop > size {
        -(((crop - size) / 2) as i64)
    } else {
        let d = size - crop;
        let k = d / 2;
        // (d / 2.0) ends in .5 when d is odd: round half to even.
        (if d % 2 == 1 && k % 2 == 1 { k + 1 } else { k }) as i64
    }
}

/// The centred `crop_height x crop_width` window of an `H x W x C` image, as
/// torchvision's `CenterCrop` takes it (offsets rounded half to even;
/// sides shorter than the crop padded with zeros, the extra pixel of an
/// odd padding going to the bottom/right).
///
/// Returns an empty vector when `src` is not `height * width * channels`
/// bytes long.
///
/// ```
/// use qint8_calibration::dataset::transform::center_crop;
///
/// // 1x4 -> 1x2: offset round(1.0) = 1.
/// assert_eq!(center_crop(&[1, 2, 3, 4], 1, 4, 1, 1, 2), vec![2, 3]);
/// // 1x2 -> 1x3: one zero column added on the right.
/// assert_eq!(center_crop(&[7, 8], 1, 2, 1, 1, 3), vec![7, 8, 0]);
/// ```
pub fn center_crop(
    src: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    crop_height: usize,
    crop_width: usize,
) -> Vec<u8> {
    let c = channels;
    let valid = height
        .checked_mul(width)
        .and_then(|x| x.checked_mul(c))
        .is_some_and(|n| n == src.len());
    if !valid {
        return Vec::new();
    }
    if crop_height == height && crop_width == width {
        return src.to_vec();
    }
    let top = crop_offset(height, crop_height);
    let left = crop_offset(width, crop_width);
    let mut out = vec![0u8; crop_height * crop_width * c];
    for (y, dst_row) in out.chunks_exact_mut(crop_width * c).enumerate() {
        let sy = y as i64 + top;
        if sy < 0 || sy >= height as i64 {
            continue;
        }
        let src_row = &src[sy as usize * width * c..(sy as usize + 1) * width * c];
        // Columns x with 0 <= x + left < width.
        let x0 = (-left).max(0) as usize;
        let x1 = ((width as i64 - left).min(crop_width as i64)).max(0) as usize;
        if x0 >= x1 {
            continue;
        }
        let s0 = (x0 as i64 + left) as usize;
        dst_row[x0 * c..x1 * c].copy_from_slice(&src_row[s0 * c..(s0 + x1 - x0) * c]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_sizes_truncate_like_torchvision() {
        // Height is the shorter side: width int(224 * 500 / 333) = int(336.3) = 336.
        assert_eq!(resized_hw(333, 500, 224), Some((224, 336)));
        assert_eq!(resized_hw(500, 333, 224), Some((336, 224)));
        assert_eq!(resized_hw(3, 7, 2), Some((2, 4)));
        assert_eq!(resized_hw(0, 7, 2), None);
        assert_eq!(resized_hw(7, 7, 0), None);
        assert_eq!(resized_hw(1, usize::MAX, 2), None);
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        // (size - crop) / 2 = 0.5, 1.5, 2.5, 3.5 -> 0, 2, 2, 4.
        assert_eq!(crop_offset(3, 2), 0);
        assert_eq!(crop_offset(5, 2), 2);
        assert_eq!(crop_offset(7, 2), 2);
        assert_eq!(crop_offset(9, 2), 4);
        assert_eq!(crop_offset(6, 2), 2);
        assert_eq!(crop_offset(2, 5), -1);
    }

    #[test]
    fn crop_pads_and_windows() {
        // 2x3 image, crop 4x2: rows padded 1 above / 1 below, columns from 0
        // (round(0.5) = 0).
        let img = [1, 2, 3, 4, 5, 6];
        assert_eq!(
            center_crop(&img, 2, 3, 1, 4, 2),
            vec![0, 0, 1, 2, 4, 5, 0, 0]
        );
        assert!(center_crop(&img, 2, 2, 1, 1, 1).is_empty());
    }

    #[test]
    fn constant_images_stay_constant() {
        let img = vec![77u8; 13 * 29 * 3];
        for (h, w) in [(5, 11), (13, 29), (40, 7), (1, 1)] {
            let out = resize_bilinear(&img, 13, 29, 3, h, w);
            assert_eq!(out.len(), h * w * 3);
            assert!(out.iter().all(|&x| x == 77), "{h}x{w}");
        }
    }

    #[test]
    fn matches_pillow_bit_for_bit() {
        // Reference: Pillow 13.0.0 (and 12.3.0, the same for these two),
        //   a = np.array([[(x * 37 + y * 101) % 256 for x in range(7)] for y in range(5)], np.uint8)
        //   Image.fromarray(a).resize((3, 4), Image.BILINEAR)  (down in x, down in y)
        //   Image.fromarray(a).resize((11, 8), Image.BILINEAR) (up in both)
        let a: Vec<u8> = (0..5)
            .flat_map(|y| (0..7).map(move |x| ((x * 37 + y * 101) % 256) as u8))
            .collect();
        let down = resize_bilinear(&a, 5, 7, 1, 4, 3);
        assert_eq!(
            down,
            vec![57, 133, 165, 152, 145, 109, 121, 122, 142, 155, 98, 98]
        );
        let up = resize_bilinear(&a, 5, 7, 1, 8, 11);
        assert_eq!(
            &up[..11],
            &[0, 17, 40, 64, 87, 111, 135, 158, 182, 205, 222]
        );

        // The height shrinks by 9 pixels, the width by 1: Pillow 13 runs the
        // vertical pass first (Pillow 12 gives 125, 116 and 119 at 1, 2, 9).
        let tall: Vec<u8> = (0..12)
            .flat_map(|y| (0..5).map(move |x| ((x * 37 + y * 101) % 256) as u8))
            .collect();
        assert_eq!(
            resize_bilinear(&tall, 12, 5, 1, 3, 4),
            vec![116, 126, 115, 147, 143, 124, 116, 137, 136, 120, 147, 142]
        );
    }
}
