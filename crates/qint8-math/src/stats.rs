//! Ranges of tensors: global and per-channel min/max and `|x|` max, with
//! non-finite values reported instead of silently propagated.

use crate::error::{MathError, Result};

fn first_non_finite(what: &'static str, x: &[f32]) -> MathError {
    let (index, &value) = x
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .unwrap_or((0, &f32::NAN));
    MathError::NonFiniteData { what, index, value }
}

/// `(min, max)` of `x`; `None` for an empty slice; an error naming the first
/// NaN or infinity.
pub fn min_max(x: &[f32]) -> Result<Option<(f32, f32)>> {
    if x.is_empty() {
        return Ok(None);
    }
    lane_min_max("tensor", x).map(Some)
}

/// `(min, max)` of `x` (`(inf, -inf)` when empty), or an error naming the
/// first NaN or infinity as part of `what`.
pub(crate) fn lane_min_max(what: &'static str, x: &[f32]) -> Result<(f32, f32)> {
    // Independent lanes with compare-and-select (not f32::min, whose NaN
    // rule keeps the loop scalar) vectorize; NaN compares false and is
    // left out here, and caught by the bit test: |v|'s bits reach the
    // infinity pattern only for infinities and NaN.
    const LANES: usize = 16;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut bits = [0u32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut fold = |k: usize, v: f32| {
        lo[k] = if v < lo[k] { v } else { lo[k] };
        hi[k] = if v > hi[k] { v } else { hi[k] };
        bits[k] = bits[k].max(v.to_bits() & 0x7fff_ffff);
    };
    for c in chunks {
        for (k, &v) in c.iter().enumerate() {
            fold(k, v);
        }
    }
    for (k, &v) in tail.iter().enumerate() {
        fold(k, v);
    }
    let lo = lo.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let hi = hi.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let finite = bits.iter().all(|&b| b < 0x7f80_0000);
    if !finite {
        return Err(first_non_finite(what, x));
    }
    Ok((lo, hi))
}

/// Per-channel `(mins, maxs)` of a tensor of `shape` along `axis`.
pub fn min_max_per_channel(
    x: &[f32],
    shape: &[usize],
    axis: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if axis >= shape.len() {
        return Err(MathError::BadAxis {
            axis,
            rank: shape.len(),
        });
    }
    let len: usize = shape.iter().product();
    if len != x.len() {
        return Err(MathError::LengthMismatch {
            what: "per-channel range",
            expected: len,
            got: x.len(),
        });
    }
    let c = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut mins = vec![f32::INFINITY; c];
    let mut maxs = vec![f32::NEG_INFINITY; c];
    if inner > 0 {
        for (b, block) in x.chunks(inner).enumerate() {
            let ch = b % c;
            if let Some((lo, hi)) = min_max(block)? {
                mins[ch] = mins[ch].min(lo);
                maxs[ch] = maxs[ch].max(hi);
            }
        }
    }
    // Channels with no elements get an empty range at 0.
    for (lo, hi) in mins.iter_mut().zip(maxs.iter_mut()) {
        if *lo > *hi {
            *lo = 0.0;
            *hi = 0.0;
        }
    }
    Ok((mins, maxs))
}

/// Per-channel `max |x|` along `axis` (TensorRT's per-channel weight amax).
pub fn amax_per_channel(x: &[f32], shape: &[usize], axis: usize) -> Result<Vec<f32>> {
    let (mins, maxs) = min_max_per_channel(x, shape, axis)?;
    Ok(mins
        .iter()
        .zip(&maxs)
        .map(|(a, b)| a.abs().max(b.abs()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_ranges() {
        // shape [2, 3]: axis 0 rows, axis 1 columns.
        let x = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0];
        assert_eq!(amax_per_channel(&x, &[2, 3], 0).unwrap(), vec![3.0, 6.0]);
        assert_eq!(
            amax_per_channel(&x, &[2, 3], 1).unwrap(),
            vec![4.0, 5.0, 6.0]
        );
        let (lo, hi) = min_max_per_channel(&x, &[2, 3], 1).unwrap();
        assert_eq!((lo, hi), (vec![-4.0, -2.0, -6.0], vec![1.0, 5.0, 3.0]));
        assert!(amax_per_channel(&x, &[2, 3], 2).is_err());
        assert!(amax_per_channel(&x, &[2, 2], 0).is_err());
        let err = min_max(&[0.0, f32::INFINITY]).unwrap_err();
        assert!(matches!(err, MathError::NonFiniteData { index: 1, .. }));
        assert_eq!(min_max(&[]).unwrap(), None);
    }
}
