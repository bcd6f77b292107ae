//! Ranges of tensors: global and per-channel min/max and `|x|` max, with
//! non-finite values reported instead of silently propagated.

use crate::error::{MathError, Result};
use crate::kernels::SimdLevel;

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
    let mut lanes = Lanes::new();
    lane_fold::run(SimdLevel::active(), x, &mut lanes);
    let lo = lanes.lo.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let hi = lanes.hi.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if lanes.bits.iter().any(|&b| b >= 0x7f80_0000) {
        return Err(first_non_finite(what, x));
    }
    Ok((lo, hi))
}

/// Largest `|x|` of `x` (0 when empty), or an error naming the first NaN
/// or infinity as part of `what`.
///
/// ```
/// use qint8_math::stats::abs_max;
///
/// assert_eq!(abs_max("x", &[0.5, -3.0, 2.0]).unwrap(), 3.0);
/// assert!(abs_max("x", &[1.0, f32::NAN]).is_err());
/// ```
pub fn abs_max(what: &'static str, x: &[f32]) -> Result<f32> {
    let mut bits = [0u32; LANES];
    abs_bits::run(SimdLevel::active(), x, &mut bits);
    let m = bits.iter().fold(0u32, |m, &b| m.max(b));
    if m >= 0x7f80_0000 {
        return Err(first_non_finite(what, x));
    }
    Ok(f32::from_bits(m))
}

/// Lanes of [`lane_fold`] and [`abs_bits`].
const LANES: usize = 16;

/// Per-lane running minimum, maximum and largest `|x|` bit pattern.
struct Lanes {
    lo: [f32; LANES],
    hi: [f32; LANES],
    bits: [u32; LANES],
}

impl Lanes {
    fn new() -> Self {
        Self {
            lo: [f32::INFINITY; LANES],
            hi: [f32::NEG_INFINITY; LANES],
            bits: [0; LANES],
        }
    }
}

// `lane_fold::run(level, x, lanes)`: value `k` of `x` folds into lane `k %
// LANES`. Independent lanes with compare-and-select (not f32::min, whose
// NaN rule keeps the loop scalar) vectorize; NaN compares false and is
// left out of the minimum and maximum, and caught by the bit test: |v|'s
// bits reach the infinity pattern only for infinities and NaN. Compiled
// for AVX2 and AVX-512 as well (a baseline build gets 128-bit vectors):
// minima, maxima and bit maxima are exact, so every level agrees.
crate::kernels::kernel!(lane_fold(x: &[f32], l: &mut Lanes)
    reference body(x, l);
{
    let mut fold = |k: usize, v: f32| {
        l.lo[k] = if v < l.lo[k] { v } else { l.lo[k] };
        l.hi[k] = if v > l.hi[k] { v } else { l.hi[k] };
        l.bits[k] = l.bits[k].max(v.to_bits() & 0x7fff_ffff);
    };
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for (k, &v) in c.iter().enumerate() {
            fold(k, v);
        }
    }
    for (k, &v) in tail.iter().enumerate() {
        fold(k, v);
    }
});

// `abs_bits::run(level, x, bits)`: the largest `|v|` bit pattern per lane.
// The bits of |v| order like |v| for finite values, and NaN and the
// infinities sort above every finite value: one integer max finds both
// the maximum and whether anything is bad.
crate::kernels::kernel!(abs_bits(x: &[f32], bits: &mut [u32; LANES])
    reference body(x, bits);
{
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for (b, &v) in bits.iter_mut().zip(c) {
            *b = (*b).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    for (b, &v) in bits.iter_mut().zip(tail) {
        *b = (*b).max(v.to_bits() & 0x7fff_ffff);
    }
});

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

    #[test]
    fn range_kernels_agree_at_every_simd_level() {
        // Lengths around the lane count and the vector widths, extremes and
        // bad values in every position, signed zeros and subnormals.
        for len in [0usize, 1, 7, 16, 31, 33, 100] {
            let base: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25 + if i % 9 == 4 { -0.0 } else { 0.0 })
                .collect();
            let mut cases = vec![base.clone()];
            for at in 0..len {
                for v in [1e30f32, -3e31, 1e-40, f32::NAN, f32::NEG_INFINITY] {
                    let mut x = base.clone();
                    x[at] = v;
                    cases.push(x);
                }
            }
            for x in &cases {
                let mut want = Lanes::new();
                lane_fold::run(SimdLevel::Reference, x, &mut want);
                let mut want_bits = [0u32; LANES];
                abs_bits::run(SimdLevel::Reference, x, &mut want_bits);
                for level in SimdLevel::available() {
                    let mut got = Lanes::new();
                    lane_fold::run(level, x, &mut got);
                    let b = |v: &[f32; LANES]| v.map(f32::to_bits);
                    assert_eq!(b(&got.lo), b(&want.lo), "{len} {level:?}");
                    assert_eq!(b(&got.hi), b(&want.hi), "{len} {level:?}");
                    assert_eq!(got.bits, want.bits, "{len} {level:?}");
                    let mut bits = [0u32; LANES];
                    abs_bits::run(level, x, &mut bits);
                    assert_eq!(bits, want_bits, "{len} {level:?}");
                }
                // Against the plain definitions.
                match x.iter().position(|v| !v.is_finite()) {
                    Some(i) => {
                        let e = abs_max("x", x).unwrap_err();
                        assert!(matches!(e, MathError::NonFiniteData { index, .. } if index == i));
                    }
                    None => {
                        let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        assert_eq!(abs_max("x", x).unwrap(), m);
                    }
                }
            }
        }
    }
}
