//! Quantize, dequantize and fake-quantize whole tensors, per-tensor or
//! per-channel along any axis, on slices and ndarray views.
//!
//! Inputs above [`PARALLEL_MIN_LEN`] elements are split across the current
//! rayon thread pool; run inside a one-thread pool for single-threaded work.

use ndarray::{Array, ArrayView, Dimension};
use rayon::prelude::*;

use crate::error::{MathError, Result};
use crate::kernels::{self, ElementParams, SimdLevel};
use crate::params::{check_dtype, ChannelParams, QuantInt, QuantParams};

/// Tensors with at least this many elements are processed in parallel.
pub const PARALLEL_MIN_LEN: usize = 1 << 16;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;
/// Per-channel slices shorter than this use the per-element row kernels.
const MIN_BLOCK: usize = 32;

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(MathError::LengthMismatch {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

/// Runs a block kernel (one parameter set per contiguous block) or a row
/// kernel (per-element parameters) over a tensor of `shape`, in parallel for
/// large tensors.
#[allow(clippy::too_many_arguments)]
fn drive<A: Sync, B: Send>(
    what: &'static str,
    level: SimdLevel,
    x: &[A],
    out: &mut [B],
    shape: &[usize],
    params: &QuantParams,
    block: impl Fn(SimdLevel, &[A], &mut [B], &ChannelParams) + Sync,
    rows: impl Fn(SimdLevel, &[A], &mut [B], &ElementParams) + Sync,
) -> Result<()> {
    let len: usize = shape.iter().product();
    check_len(what, len, x.len())?;
    check_len(what, len, out.len())?;
    let (_, channels, inner) = params.layout(shape)?;
    let ch = params.channels();
    let parallel = len >= PARALLEL_MIN_LEN;
    if len == 0 {
        return Ok(());
    }
    if params.axis().is_none() || channels == 1 {
        let p = &ch[0];
        if parallel {
            x.par_chunks(CHUNK)
                .zip(out.par_chunks_mut(CHUNK))
                .for_each(|(a, b)| block(level, a, b, p));
        } else {
            block(level, x, out, p);
        }
    } else if inner >= MIN_BLOCK {
        let run = |(i, (a, b)): (usize, (&[A], &mut [B]))| block(level, a, b, &ch[i % channels]);
        if parallel {
            x.par_chunks(inner)
                .zip(out.par_chunks_mut(inner))
                .enumerate()
                .for_each(run);
        } else {
            x.chunks(inner)
                .zip(out.chunks_mut(inner))
                .enumerate()
                .for_each(run);
        }
    } else {
        let e = ElementParams::new(ch, inner);
        let row = e.row_len();
        let chunk = row * (CHUNK / row).max(1);
        if parallel {
            x.par_chunks(chunk)
                .zip(out.par_chunks_mut(chunk))
                .for_each(|(a, b)| rows(level, a, b, &e));
        } else {
            rows(level, x, out, &e);
        }
    }
    Ok(())
}

/// Quantizes `x` (of `shape`) into `out` with the given kernel level.
///
/// Use [`quantize_into`] unless you are testing or benchmarking a tier.
pub fn quantize_into_with<T: QuantInt>(
    level: SimdLevel,
    x: &[f32],
    shape: &[usize],
    params: &QuantParams,
    out: &mut [T],
) -> Result<()> {
    let (qmin, qmax) = params.qrange();
    check_dtype::<T>(qmin, qmax)?;
    drive(
        "quantize",
        level,
        x,
        out,
        shape,
        params,
        kernels::quantize_block,
        kernels::quantize_rows,
    )
}

/// Quantizes `x` (of `shape`) into `out`:
/// `q = clamp(round_half_even(x / s) + z, qmin, qmax)`, NaN to `qmin`.
pub fn quantize_into<T: QuantInt>(
    x: &[f32],
    shape: &[usize],
    params: &QuantParams,
    out: &mut [T],
) -> Result<()> {
    quantize_into_with(SimdLevel::active(), x, shape, params, out)
}

/// Quantizes `x` (of `shape`) into a new vector.
pub fn quantize<T: QuantInt>(x: &[f32], shape: &[usize], params: &QuantParams) -> Result<Vec<T>> {
    let mut out = vec![T::default(); x.len()];
    quantize_into(x, shape, params, &mut out)?;
    Ok(out)
}

/// Dequantizes `q` (of `shape`) into `out` with the given kernel level.
pub fn dequantize_into_with<T: QuantInt>(
    level: SimdLevel,
    q: &[T],
    shape: &[usize],
    params: &QuantParams,
    out: &mut [f32],
) -> Result<()> {
    let (qmin, qmax) = params.qrange();
    check_dtype::<T>(qmin, qmax)?;
    drive(
        "dequantize",
        level,
        q,
        out,
        shape,
        params,
        kernels::dequantize_block,
        kernels::dequantize_rows,
    )
}

/// Dequantizes `q` (of `shape`) into `out`: `x = (q - z) * s`.
pub fn dequantize_into<T: QuantInt>(
    q: &[T],
    shape: &[usize],
    params: &QuantParams,
    out: &mut [f32],
) -> Result<()> {
    dequantize_into_with(SimdLevel::active(), q, shape, params, out)
}

/// Dequantizes `q` (of `shape`) into a new vector.
pub fn dequantize<T: QuantInt>(q: &[T], shape: &[usize], params: &QuantParams) -> Result<Vec<f32>> {
    let mut out = vec![0.0; q.len()];
    dequantize_into(q, shape, params, &mut out)?;
    Ok(out)
}

/// Fake-quantizes `x` (of `shape`) into `out` with the given kernel level.
pub fn fake_quant_into_with(
    level: SimdLevel,
    x: &[f32],
    shape: &[usize],
    params: &QuantParams,
    out: &mut [f32],
) -> Result<()> {
    drive(
        "fake_quant",
        level,
        x,
        out,
        shape,
        params,
        kernels::fake_quant_block,
        kernels::fake_quant_rows,
    )
}

/// Fake-quantizes `x` (of `shape`) into `out`: `dequantize(quantize(x))`,
/// bit-identical to the two steps but without the integer buffer.
pub fn fake_quant_into(
    x: &[f32],
    shape: &[usize],
    params: &QuantParams,
    out: &mut [f32],
) -> Result<()> {
    fake_quant_into_with(SimdLevel::active(), x, shape, params, out)
}

/// Fake-quantizes `x` (of `shape`) into a new vector.
pub fn fake_quant(x: &[f32], shape: &[usize], params: &QuantParams) -> Result<Vec<f32>> {
    let mut out = vec![0.0; x.len()];
    fake_quant_into(x, shape, params, &mut out)?;
    Ok(out)
}

/// Applies `f` to a contiguous copy of `x` (no copy when `x` is already in
/// standard layout) and wraps the result in an array of `x`'s shape.
fn map_array<A: Copy, B, D: Dimension>(
    what: &'static str,
    x: ArrayView<'_, A, D>,
    f: impl FnOnce(&[A], &[usize]) -> Result<Vec<B>>,
) -> Result<Array<B, D>> {
    let std = x.as_standard_layout();
    let owned;
    let slice = match std.as_slice() {
        Some(s) => s,
        None => {
            owned = std.iter().copied().collect::<Vec<_>>();
            &owned
        }
    };
    let out = f(slice, x.shape())?;
    Array::from_shape_vec(x.raw_dim(), out).map_err(|e| MathError::ShapeMismatch {
        what,
        detail: e.to_string(),
    })
}

/// Quantizes an ndarray view of any layout; the result has the same shape in
/// standard layout. Per-channel parameters apply along their axis.
pub fn quantize_array<T: QuantInt, D: Dimension>(
    x: ArrayView<'_, f32, D>,
    params: &QuantParams,
) -> Result<Array<T, D>> {
    map_array("quantize", x, |s, shape| quantize(s, shape, params))
}

/// Dequantizes an ndarray view of any layout.
pub fn dequantize_array<T: QuantInt, D: Dimension>(
    q: ArrayView<'_, T, D>,
    params: &QuantParams,
) -> Result<Array<f32, D>> {
    map_array("dequantize", q, |s, shape| dequantize(s, shape, params))
}

/// Fake-quantizes an ndarray view of any layout.
pub fn fake_quant_array<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    params: &QuantParams,
) -> Result<Array<f32, D>> {
    map_array("fake_quant", x, |s, shape| fake_quant(s, shape, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::QuantDtype;
    use ndarray::{arr2, Array3};

    fn int8(scale: f32) -> QuantParams {
        QuantParams::per_tensor(ChannelParams::new(scale, 0, QuantDtype::Int8, false).unwrap())
    }

    #[test]
    fn rounds_half_to_even() {
        let p = int8(1.0);
        let x = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 2.5000002];
        for level in SimdLevel::available() {
            let mut q = [0i8; 8];
            quantize_into_with(level, &x, &[8], &p, &mut q).unwrap();
            assert_eq!(q, [0, 2, 2, 0, -2, -2, 0, 3], "{level:?}");
        }
    }

    #[test]
    fn saturates_and_maps_nan_to_qmin() {
        let p = int8(0.5);
        let x = [
            100.0,
            -100.0,
            63.5,
            63.75,
            -64.0,
            -64.25,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for level in SimdLevel::available() {
            let mut q = [0i8; 9];
            quantize_into_with(level, &x, &[9], &p, &mut q).unwrap();
            assert_eq!(
                q,
                [127, -128, 127, 127, -128, -128, 127, -128, -128],
                "{level:?}"
            );
        }
    }

    #[test]
    fn narrow_range_never_produces_minus_128() {
        let p = QuantParams::symmetric(1.27, QuantDtype::Int8, true).unwrap();
        let q: Vec<i8> = quantize(&[-5.0, -1.27, 1.27, 5.0], &[4], &p).unwrap();
        assert_eq!(q, vec![-127, -127, 127, 127]);
    }

    #[test]
    fn uint8_affine_roundtrip() {
        let p = QuantParams::affine(-1.0, 3.0, QuantDtype::Uint8, false).unwrap();
        let x = [-1.0, 0.0, 3.0, 1.0];
        let q: Vec<u8> = quantize(&x, &[4], &p).unwrap();
        assert_eq!(q[1], 64, "zero is exact");
        let d = dequantize(&q, &[4], &p).unwrap();
        assert_eq!(d[1], 0.0);
        let s = p.channels()[0].scale;
        for (a, b) in x.iter().zip(&d) {
            assert!((a - b).abs() <= s / 2.0 + 1e-6);
        }
        assert!(matches!(
            quantize::<i8>(&x, &[4], &p),
            Err(MathError::DtypeMismatch { .. })
        ));
    }

    #[test]
    fn per_channel_axis_0_1_and_last() {
        // 2x3 matrix, values chosen so each channel's scale matters.
        let x = [1.0, 2.0, 3.0, -1.0, -2.0, -3.0];
        let p0 =
            QuantParams::symmetric_per_channel(&[127.0, 254.0], 0, QuantDtype::Int8, true).unwrap();
        let q: Vec<i8> = quantize(&x, &[2, 3], &p0).unwrap();
        assert_eq!(q, vec![1, 2, 3, 0, -1, -2]); // -0.5 -> 0, -1.5 -> -2
        let p1 =
            QuantParams::symmetric_per_channel(&[127.0, 254.0, 381.0], 1, QuantDtype::Int8, true)
                .unwrap();
        let q: Vec<i8> = quantize(&x, &[2, 3], &p1).unwrap();
        assert_eq!(q, vec![1, 1, 1, -1, -1, -1]);
        // Last axis of a rank-3 tensor via ndarray, non-contiguous input.
        let a = Array3::from_shape_fn((2, 2, 3), |(i, j, k)| (i * 6 + j * 3 + k) as f32);
        let t = a.view().permuted_axes([1, 0, 2]);
        let p2 =
            QuantParams::symmetric_per_channel(&[127.0, 254.0, 508.0], 2, QuantDtype::Int8, false)
                .unwrap();
        let q = quantize_array::<i8, _>(t, &p2).unwrap();
        for ((i, j, k), v) in q.indexed_iter() {
            let s = [1.0, 2.0, 4.0][k];
            let expect = (t[[i, j, k]] / s).round_ties_even() as i8;
            assert_eq!(*v, expect);
        }
        let d = dequantize_array(q.view(), &p2).unwrap();
        assert_eq!(d.shape(), t.shape());
    }

    #[test]
    fn fake_quant_matches_two_steps() {
        let p = QuantParams::symmetric(2.0, QuantDtype::Int8, false).unwrap();
        let x = arr2(&[[0.1f32, -0.7], [3.0, -2.1]]);
        let f = fake_quant_array(x.view(), &p).unwrap();
        let q = quantize_array::<i8, _>(x.view(), &p).unwrap();
        let d = dequantize_array(q.view(), &p).unwrap();
        assert_eq!(f, d);
    }

    #[test]
    fn shape_errors() {
        let p = int8(1.0);
        let mut out = [0i8; 3];
        assert!(matches!(
            quantize_into(&[1.0, 2.0], &[2], &p, &mut out),
            Err(MathError::LengthMismatch { .. })
        ));
        let pc = QuantParams::symmetric_per_channel(&[1.0; 4], 0, QuantDtype::Int8, true).unwrap();
        assert!(matches!(
            quantize::<i8>(&[1.0; 6], &[3, 2], &pc),
            Err(MathError::ShapeMismatch { .. })
        ));
        assert!(quantize::<i8>(&[], &[0], &p).unwrap().is_empty());
    }
}
