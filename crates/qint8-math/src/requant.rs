//! Requantization: i32 accumulators of an int8 convolution or GEMM back to
//! int8 with per-output-channel multipliers, as the int8 kernels do it.
//!
//! `y = sat(round_half_even(acc * M[c]) + z_y)` with `M[c] = s_x * s_w[c] / s_y`
//! computed in f32; a fused ReLU clamps at `z_y` from below.

use crate::error::{MathError, Result};
use crate::params::{check_dtype, QuantInt};
use crate::reference::requantize_value;

/// Per-output-channel requantization parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Requant {
    /// One multiplier per output channel (`s_x * s_w[c] / s_y`).
    pub multipliers: Vec<f32>,
    /// Output zero point.
    pub zero_point: i32,
    /// Output integer range.
    pub qmin: i32,
    /// Output integer range.
    pub qmax: i32,
    /// Clamp at the zero point from below (fused ReLU).
    pub relu: bool,
}

impl Requant {
    /// Multipliers from input scale, per-channel weight scales and output scale.
    pub fn from_scales(
        input_scale: f32,
        weight_scales: &[f32],
        output_scale: f32,
        zero_point: i32,
        (qmin, qmax): (i32, i32),
        relu: bool,
    ) -> Result<Self> {
        for &s in std::iter::once(&input_scale)
            .chain(weight_scales)
            .chain(std::iter::once(&output_scale))
        {
            if !(s.is_finite() && s > 0.0) {
                return Err(MathError::BadScale(s));
            }
        }
        if weight_scales.is_empty() {
            return Err(MathError::NoChannels);
        }
        Ok(Self {
            multipliers: weight_scales
                .iter()
                .map(|&w| input_scale * w / output_scale)
                .collect(),
            zero_point,
            qmin,
            qmax,
            relu,
        })
    }

    /// Requantizes accumulators laid out `[outer, channels, inner]` (NCHW
    /// output: `inner = H * W`; GEMM output `[M, N]`: `inner = 1`).
    /// This is the scalar reference the int8 kernels are tested against.
    pub fn apply_reference<T: QuantInt>(
        &self,
        acc: &[i32],
        inner: usize,
        out: &mut [T],
    ) -> Result<()> {
        check_dtype::<T>(self.qmin, self.qmax)?;
        if acc.len() != out.len() {
            return Err(MathError::LengthMismatch {
                what: "requantize",
                expected: acc.len(),
                got: out.len(),
            });
        }
        let c = self.multipliers.len();
        if inner == 0 || !acc.len().is_multiple_of(c * inner) {
            return Err(MathError::ShapeMismatch {
                what: "requantize",
                detail: format!(
                    "{} accumulators do not split into rows of {c} channels x {inner}",
                    acc.len()
                ),
            });
        }
        for (i, (o, &a)) in out.iter_mut().zip(acc).enumerate() {
            let m = self.multipliers[(i / inner) % c];
            *o = T::from_i32(requantize_value(
                a,
                m,
                self.zero_point,
                self.relu,
                self.qmin,
                self.qmax,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requantize_by_hand() {
        let r = Requant::from_scales(0.5, &[0.25, 1.0], 0.125, 0, (-128, 127), false).unwrap();
        assert_eq!(r.multipliers, vec![1.0, 4.0]);
        // inner = 2: [c0, c0, c1, c1]
        let acc = [3, -5, 20, 40];
        let mut out = [0i8; 4];
        r.apply_reference(&acc, 2, &mut out).unwrap();
        assert_eq!(out, [3, -5, 80, 127]);
        let relu = Requant {
            relu: true,
            ..r.clone()
        };
        relu.apply_reference(&acc, 2, &mut out).unwrap();
        assert_eq!(out, [3, 0, 80, 127]);
        // Half to even: 2.5 -> 2, 3.5 -> 4.
        let h = Requant::from_scales(1.0, &[0.5], 1.0, 10, (-128, 127), false).unwrap();
        let mut o = [0i8; 3];
        h.apply_reference(&[5, 7, -1000], 1, &mut o).unwrap();
        assert_eq!(o, [12, 14, -128]);
        assert!(h.apply_reference(&[1, 2, 3], 2, &mut o).is_err());
        assert!(Requant::from_scales(0.0, &[1.0], 1.0, 0, (-128, 127), false).is_err());
    }
}
