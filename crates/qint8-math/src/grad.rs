//! Backward passes of fake quantization, for quantization-aware training.
//!
//! Forward: `y = clamp(round(x / s), lo, hi) * s` with `lo = qmin - z`,
//! `hi = qmax - z` (the zero point folded into the bounds).

use crate::error::{MathError, Result};
use crate::params::ChannelParams;

/// Straight-through estimator with the clipping mask: `dx = dy` where
/// `x / s` lies inside `[lo, hi]`, else 0 (values clipped by the forward pass
/// get no gradient). NaN inputs get no gradient.
pub fn ste_backward(
    x: &[f32],
    grad_out: &[f32],
    p: &ChannelParams,
    grad_in: &mut [f32],
) -> Result<()> {
    check(x.len(), grad_out.len(), "ste_backward grad_out")?;
    check(x.len(), grad_in.len(), "ste_backward grad_in")?;
    let (lo, hi) = p.rel_bounds();
    for ((g, &v), &dy) in grad_in.iter_mut().zip(x).zip(grad_out) {
        let t = v / p.scale;
        *g = if t >= lo && t <= hi { dy } else { 0.0 };
    }
    Ok(())
}

/// The gradient scale LSQ multiplies the step-size gradient by:
/// `1 / sqrt(n * qp)`, where `n` is the number of elements sharing the scale
/// (weights in the layer, or features per sample for activations) and `qp`
/// the largest positive quantized value (127 for int8).
/// Esser et al., "Learned Step Size Quantization", ICLR 2020 (arXiv 1902.08153), section 2.2.
pub fn lsq_grad_scale(n: usize, qp: i32) -> f32 {
    if n == 0 || qp <= 0 {
        return 1.0;
    }
    1.0 / ((n as f64) * qp as f64).sqrt() as f32
}

/// Learned step size backward for one scale.
///
/// Returns the input gradient (STE with clipping mask, as [`ste_backward`])
/// in `grad_in` and the scale gradient, already multiplied by `grad_scale`:
/// `ds = grad_scale * sum(dy * d)` where, with `t = x / s`,
/// `d = lo` if `t <= lo`, `hi` if `t >= hi`, else `round(t) - t`.
pub fn lsq_backward(
    x: &[f32],
    grad_out: &[f32],
    p: &ChannelParams,
    grad_scale: f32,
    grad_in: &mut [f32],
) -> Result<f32> {
    check(x.len(), grad_out.len(), "lsq_backward grad_out")?;
    check(x.len(), grad_in.len(), "lsq_backward grad_in")?;
    let (lo, hi) = p.rel_bounds();
    // f64 accumulation: the sum runs over whole weight tensors.
    let mut ds = 0.0f64;
    for ((g, &v), &dy) in grad_in.iter_mut().zip(x).zip(grad_out) {
        let t = v / p.scale;
        let (dx, d) = if t <= lo {
            (0.0, lo)
        } else if t >= hi {
            (0.0, hi)
        } else if t.is_nan() {
            (0.0, 0.0)
        } else {
            (dy, t.round_ties_even() - t)
        };
        *g = dx;
        ds += (dy * d) as f64;
    }
    Ok((ds * grad_scale as f64) as f32)
}

fn check(expected: usize, got: usize, what: &'static str) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(MathError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::QuantDtype;
    use crate::reference::fake_quant_value;

    fn p() -> ChannelParams {
        ChannelParams::new(0.5, 0, QuantDtype::Int8, false).unwrap()
    }

    #[test]
    fn ste_masks_clipped_values() {
        let x = [0.0, 63.5, 63.6, -64.0, -64.1, f32::NAN];
        let mut g = [0.0; 6];
        ste_backward(&x, &[1.0; 6], &p(), &mut g).unwrap();
        assert_eq!(g, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn lsq_gradient_by_hand() {
        // t = 1.2: round(t) - t = -0.2; t = 200 clips at 127 (dy = 2);
        // t = -300 clips at -128.
        let x = [0.6, 100.0, -150.0];
        let mut g = [0.0; 3];
        let ds = lsq_backward(&x, &[1.0, 2.0, 1.0], &p(), 1.0, &mut g).unwrap();
        assert_eq!(g, [1.0, 0.0, 0.0]);
        assert!((ds - (-0.2 + 254.0 - 128.0)).abs() < 1e-4, "{ds}");
        assert_eq!(lsq_grad_scale(100, 127), 1.0 / (12700f32).sqrt());
    }

    #[test]
    fn lsq_is_the_true_derivative_with_round_passed_straight_through() {
        // Away from rounding boundaries, d/ds sum(fake_quant(x; s)) = sum(round(t))
        // (round is piecewise constant); LSQ replaces d round(t)/dt by 1, which
        // subtracts sum(t). So lsq = finite difference - sum(x / s).
        let x = [0.33, -0.71, 1.12, 2.2];
        let s = 0.1f32;
        let pp = ChannelParams::new(s, 0, QuantDtype::Int8, false).unwrap();
        let mut g = [0.0; 4];
        let ds = lsq_backward(&x, &[1.0; 4], &pp, 1.0, &mut g).unwrap();
        let h = 1e-4f32;
        let f = |s: f32| -> f64 {
            let q = ChannelParams::new(s, 0, QuantDtype::Int8, false).unwrap();
            x.iter().map(|&v| fake_quant_value(v, &q) as f64).sum()
        };
        let fd = (f(s + h) - f(s - h)) / (2.0 * h as f64);
        let sum_t: f64 = x.iter().map(|&v| (v / s) as f64).sum();
        assert!(
            (ds as f64 - (fd - sum_t)).abs() < 2e-2,
            "lsq {ds} vs {}",
            fd - sum_t
        );
    }
}
