//! Scalar reference implementations.
//!
//! Written for clarity, not speed: every fast kernel in [`crate::kernels`] is
//! property-tested to produce bit-identical results to these.

use crate::params::{ChannelParams, QuantInt};

/// Quantizes one value: `clamp(round_half_even(x / s) + z, qmin, qmax)`.
///
/// NaN maps to `qmin` (what ONNX Runtime's x86 kernels produce); infinities
/// saturate. Callers that must reject non-finite data check it beforehand.
pub fn quantize_value(x: f32, p: &ChannelParams) -> i32 {
    if x.is_nan() {
        return p.qmin;
    }
    let r = (x / p.scale).round_ties_even();
    // Clamp in f64: r may be far outside i32.
    (r as f64 + p.zero_point as f64).clamp(p.qmin as f64, p.qmax as f64) as i32
}

/// Dequantizes one value: `(q - z) * s`.
pub fn dequantize_value(q: i32, p: &ChannelParams) -> f32 {
    (q - p.zero_point) as f32 * p.scale
}

/// Fake-quantizes one value: `dequantize(quantize(x))`.
pub fn fake_quant_value(x: f32, p: &ChannelParams) -> f32 {
    dequantize_value(quantize_value(x, p), p)
}

/// Quantizes a slice with one set of parameters.
pub fn quantize<T: QuantInt>(x: &[f32], out: &mut [T], p: &ChannelParams) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = T::from_i32(quantize_value(v, p));
    }
}

/// Dequantizes a slice with one set of parameters.
pub fn dequantize<T: QuantInt>(q: &[T], out: &mut [f32], p: &ChannelParams) {
    for (o, &v) in out.iter_mut().zip(q) {
        *o = dequantize_value(v.to_i32(), p);
    }
}

/// Fake-quantizes a slice with one set of parameters.
pub fn fake_quant(x: &[f32], out: &mut [f32], p: &ChannelParams) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = fake_quant_value(v, p);
    }
}

/// Per-channel quantization of a tensor laid out as `[outer, channels, inner]`.
pub fn quantize_per_channel<T: QuantInt>(
    x: &[f32],
    out: &mut [T],
    params: &[ChannelParams],
    inner: usize,
) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let c = (i / inner.max(1)) % params.len();
        *o = T::from_i32(quantize_value(v, &params[c]));
    }
}

/// Requantizes one i32 accumulator:
/// `clamp(round_half_even(acc * multiplier) + z, lo, qmax)` with `lo = z` when
/// ReLU is fused, else `qmin`. The product is taken in f32, as the int8
/// kernels do it.
pub fn requantize_value(
    acc: i32,
    multiplier: f32,
    zero_point: i32,
    relu: bool,
    qmin: i32,
    qmax: i32,
) -> i32 {
    let lo = if relu { zero_point.max(qmin) } else { qmin };
    let r = (acc as f32 * multiplier).round_ties_even() as f64 + zero_point as f64;
    r.clamp(lo as f64, qmax as f64) as i32
}
