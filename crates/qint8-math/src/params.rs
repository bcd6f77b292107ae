//! Quantization schemes and parameters.
//!
//! Convention (ONNX `QuantizeLinear`, TensorRT, PyTorch):
//! `q = clamp(round_half_even(x / s) + z, qmin, qmax)` and `x' = (q - z) * s`.
//! (The seed document writes `round(scale * (x - z))`; we follow the form the
//! deployment targets use, so exported files mean exactly what we simulate.)

use serde::{Deserialize, Serialize};

use crate::error::{MathError, Result};

/// Ranges below this are treated as empty: their scale would underflow, so the
/// scale becomes 1 and every value quantizes to the zero point (as ONNX
/// Runtime does for scales below `f32::MIN_POSITIVE`).
const TINY_RANGE: f32 = f32::MIN_POSITIVE * 256.0;

/// The integer type a tensor is quantized to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuantDtype {
    /// Signed 8 bit, [-128, 127] (narrow: [-127, 127]).
    #[default]
    Int8,
    /// Unsigned 8 bit, [0, 255] (narrow: [1, 255]).
    Uint8,
}

impl QuantDtype {
    /// `(qmin, qmax)` of this type; narrow range drops the lowest value so the
    /// range is symmetric around the zero point (TensorRT weights).
    pub fn range(self, narrow: bool) -> (i32, i32) {
        match (self, narrow) {
            (QuantDtype::Int8, false) => (-128, 127),
            (QuantDtype::Int8, true) => (-127, 127),
            (QuantDtype::Uint8, false) => (0, 255),
            (QuantDtype::Uint8, true) => (1, 255),
        }
    }

    /// The zero point of a symmetric scheme: 0 for int8, 128 for uint8.
    pub fn symmetric_zero_point(self) -> i32 {
        match self {
            QuantDtype::Int8 => 0,
            QuantDtype::Uint8 => 128,
        }
    }

    /// Name as used in error messages and ONNX (`int8`, `uint8`).
    pub fn name(self) -> &'static str {
        match self {
            QuantDtype::Int8 => "int8",
            QuantDtype::Uint8 => "uint8",
        }
    }
}

/// One scale for the whole tensor, or one per slice along an axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// A single scale and zero point.
    #[default]
    PerTensor,
    /// One scale and zero point per index along `axis` (Conv weights: axis 0).
    PerChannel {
        /// The channel axis.
        axis: usize,
    },
}

/// How a tensor is to be quantized: type, symmetry, range and granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantScheme {
    /// Integer type.
    pub dtype: QuantDtype,
    /// Symmetric (zero point fixed at 0 for int8, 128 for uint8) or affine.
    pub symmetric: bool,
    /// Drop the lowest integer value (TensorRT weights use [-127, 127]).
    pub narrow_range: bool,
    /// Per-tensor or per-channel.
    pub granularity: Granularity,
}

impl Default for QuantScheme {
    fn default() -> Self {
        Self::trt_activation()
    }
}

impl QuantScheme {
    /// TensorRT activations: int8, symmetric, [-128, 127], per-tensor.
    pub const fn trt_activation() -> Self {
        Self {
            dtype: QuantDtype::Int8,
            symmetric: true,
            narrow_range: false,
            granularity: Granularity::PerTensor,
        }
    }

    /// TensorRT weights: int8, symmetric, [-127, 127], per output channel along `axis`.
    pub const fn trt_weight(axis: usize) -> Self {
        Self {
            dtype: QuantDtype::Int8,
            symmetric: true,
            narrow_range: true,
            granularity: Granularity::PerChannel { axis },
        }
    }

    /// ONNX Runtime's default activations: uint8, affine, per-tensor.
    pub const fn ort_activation() -> Self {
        Self {
            dtype: QuantDtype::Uint8,
            symmetric: false,
            narrow_range: false,
            granularity: Granularity::PerTensor,
        }
    }

    /// `(qmin, qmax)` of this scheme.
    pub fn qrange(&self) -> (i32, i32) {
        self.dtype.range(self.narrow_range)
    }

    /// Parameters for one channel from an observed `[min, max]`.
    ///
    /// Symmetric schemes use `amax = max(|min|, |max|)`; affine schemes widen
    /// the range to contain 0 exactly.
    pub fn channel_params(&self, min: f32, max: f32) -> Result<ChannelParams> {
        if self.symmetric {
            check_finite("min", min)?;
            check_finite("max", max)?;
            if min > max {
                return Err(MathError::InvertedRange { min, max });
            }
            ChannelParams::symmetric(min.abs().max(max.abs()), self.dtype, self.narrow_range)
        } else {
            ChannelParams::affine(min, max, self.dtype, self.narrow_range)
        }
    }

    /// Parameters from per-channel `[min, max]` pairs (one pair for per-tensor).
    pub fn params(&self, mins: &[f32], maxs: &[f32]) -> Result<QuantParams> {
        if mins.len() != maxs.len() {
            return Err(MathError::LengthMismatch {
                what: "per-channel min/max",
                expected: mins.len(),
                got: maxs.len(),
            });
        }
        let channels = mins
            .iter()
            .zip(maxs)
            .map(|(&lo, &hi)| self.channel_params(lo, hi))
            .collect::<Result<Vec<_>>>()?;
        match self.granularity {
            Granularity::PerTensor => {
                if channels.len() != 1 {
                    return Err(MathError::LengthMismatch {
                        what: "per-tensor range",
                        expected: 1,
                        got: channels.len(),
                    });
                }
                Ok(QuantParams::per_tensor(channels[0]))
            }
            Granularity::PerChannel { axis } => QuantParams::per_channel(channels, axis),
        }
    }
}

fn check_finite(what: &'static str, v: f32) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(MathError::NonFinite { what, value: v })
    }
}

/// Scale, zero point and integer range of one channel (or a whole tensor).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelParams {
    /// Positive, finite scale.
    pub scale: f32,
    /// Zero point, inside `[qmin, qmax]`.
    pub zero_point: i32,
    /// Lowest integer value.
    pub qmin: i32,
    /// Highest integer value.
    pub qmax: i32,
}

impl ChannelParams {
    /// Validated parameters from an explicit scale and zero point.
    pub fn new(scale: f32, zero_point: i32, dtype: QuantDtype, narrow: bool) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(MathError::BadScale(scale));
        }
        let (qmin, qmax) = dtype.range(narrow);
        if zero_point < qmin || zero_point > qmax {
            return Err(MathError::BadZeroPoint {
                zero_point,
                qmin,
                qmax,
            });
        }
        Ok(Self {
            scale,
            zero_point,
            qmin,
            qmax,
        })
    }

    /// Symmetric parameters: `s = amax / 127` (int8 and uint8 alike, as
    /// TensorRT and ONNX Runtime compute it), zero point 0 (int8) or 128 (uint8).
    ///
    /// `amax == 0` (or a range so small its scale would underflow) gives scale 1:
    /// every value then quantizes to the zero point.
    pub fn symmetric(amax: f32, dtype: QuantDtype, narrow: bool) -> Result<Self> {
        check_finite("amax", amax)?;
        if amax < 0.0 {
            return Err(MathError::NegativeAmax(amax));
        }
        let scale = if amax < TINY_RANGE { 1.0 } else { amax / 127.0 };
        Self::new(scale, dtype.symmetric_zero_point(), dtype, narrow)
    }

    /// Affine parameters covering `[min(min, 0), max(max, 0)]`, so that 0 is
    /// represented exactly by the zero point:
    /// `s = (rmax - rmin) / (qmax - qmin)`, `z = round_half_even(qmin - rmin / s)`.
    pub fn affine(min: f32, max: f32, dtype: QuantDtype, narrow: bool) -> Result<Self> {
        check_finite("min", min)?;
        check_finite("max", max)?;
        if min > max {
            return Err(MathError::InvertedRange { min, max });
        }
        let (qmin, qmax) = dtype.range(narrow);
        let rmin = min.min(0.0);
        let rmax = max.max(0.0);
        // Computed in f64: rmax - rmin may overflow f32 for extreme ranges.
        let span = rmax as f64 - rmin as f64;
        if span < TINY_RANGE as f64 {
            return Self::new(1.0, qmin, dtype, narrow);
        }
        let scale = (span / (qmax - qmin) as f64) as f32;
        if !scale.is_finite() {
            return Err(MathError::BadScale(scale));
        }
        let z = (qmin as f64 - rmin as f64 / scale as f64).round_ties_even();
        let zero_point = (z as i32).clamp(qmin, qmax);
        Self::new(scale, zero_point, dtype, narrow)
    }

    /// The representable real range `[(qmin - z) * s, (qmax - z) * s]`.
    pub fn real_range(&self) -> (f32, f32) {
        (
            (self.qmin - self.zero_point) as f32 * self.scale,
            (self.qmax - self.zero_point) as f32 * self.scale,
        )
    }

    /// Clamp bounds in units of the scale, relative to the zero point:
    /// `(qmin - z, qmax - z)`. Kernels clamp `x / s` to these before rounding.
    #[inline]
    pub(crate) fn rel_bounds(&self) -> (f32, f32) {
        (
            (self.qmin - self.zero_point) as f32,
            (self.qmax - self.zero_point) as f32,
        )
    }
}

/// Quantization parameters of a tensor: one [`ChannelParams`] (per-tensor) or
/// one per index along `axis` (per-channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantParams {
    channels: Vec<ChannelParams>,
    axis: Option<usize>,
}

impl QuantParams {
    /// Per-tensor parameters.
    pub fn per_tensor(p: ChannelParams) -> Self {
        Self {
            channels: vec![p],
            axis: None,
        }
    }

    /// Per-channel parameters along `axis`. All channels must share one integer range.
    pub fn per_channel(channels: Vec<ChannelParams>, axis: usize) -> Result<Self> {
        let first = channels.first().ok_or(MathError::NoChannels)?;
        if let Some(bad) = channels
            .iter()
            .find(|c| c.qmin != first.qmin || c.qmax != first.qmax)
        {
            return Err(MathError::BadParameter {
                name: "per-channel qmin/qmax",
                value: bad.qmin as f64,
                expected: "the same integer range for every channel",
            });
        }
        Ok(Self {
            channels,
            axis: Some(axis),
        })
    }

    /// Symmetric per-tensor parameters from `amax`.
    pub fn symmetric(amax: f32, dtype: QuantDtype, narrow: bool) -> Result<Self> {
        Ok(Self::per_tensor(ChannelParams::symmetric(
            amax, dtype, narrow,
        )?))
    }

    /// Symmetric per-channel parameters from one `amax` per channel.
    pub fn symmetric_per_channel(
        amax: &[f32],
        axis: usize,
        dtype: QuantDtype,
        narrow: bool,
    ) -> Result<Self> {
        let ch = amax
            .iter()
            .map(|&a| ChannelParams::symmetric(a, dtype, narrow))
            .collect::<Result<Vec<_>>>()?;
        Self::per_channel(ch, axis)
    }

    /// Affine per-tensor parameters from `[min, max]`.
    pub fn affine(min: f32, max: f32, dtype: QuantDtype, narrow: bool) -> Result<Self> {
        Ok(Self::per_tensor(ChannelParams::affine(
            min, max, dtype, narrow,
        )?))
    }

    /// The per-channel axis, or `None` for per-tensor parameters.
    pub fn axis(&self) -> Option<usize> {
        self.axis
    }

    /// Parameters of every channel (one entry for per-tensor).
    pub fn channels(&self) -> &[ChannelParams] {
        &self.channels
    }

    /// Scales, one per channel.
    pub fn scales(&self) -> Vec<f32> {
        self.channels.iter().map(|c| c.scale).collect()
    }

    /// Zero points, one per channel.
    pub fn zero_points(&self) -> Vec<i32> {
        self.channels.iter().map(|c| c.zero_point).collect()
    }

    /// `(qmin, qmax)` shared by all channels.
    pub fn qrange(&self) -> (i32, i32) {
        // Invariant: constructors never produce an empty channel list.
        let c = &self.channels[0];
        (c.qmin, c.qmax)
    }

    /// Whether every zero point is the symmetric one for its type.
    pub fn is_symmetric(&self) -> bool {
        let z = match self.qrange().0 {
            q if q < 0 => 0,
            _ => 128,
        };
        self.channels.iter().all(|c| c.zero_point == z)
    }

    /// Splits `shape` into `(outer, channels, inner)` around the channel axis
    /// and checks the channel count. Per-tensor parameters give `(1, 1, len)`.
    pub fn layout(&self, shape: &[usize]) -> Result<(usize, usize, usize)> {
        let len: usize = shape.iter().product();
        match self.axis {
            None => Ok((1, 1, len)),
            Some(axis) => {
                if axis >= shape.len() {
                    return Err(MathError::BadAxis {
                        axis,
                        rank: shape.len(),
                    });
                }
                if shape[axis] != self.channels.len() {
                    return Err(MathError::ShapeMismatch {
                        what: "per-channel quantization",
                        detail: format!(
                            "shape {:?} has {} entries on axis {axis}, parameters have {} channels",
                            shape,
                            shape[axis],
                            self.channels.len()
                        ),
                    });
                }
                let outer = shape[..axis].iter().product();
                let inner = shape[axis + 1..].iter().product();
                Ok((outer, shape[axis], inner))
            }
        }
    }
}

/// Integer element types a tensor can be quantized to.
pub trait QuantInt: Copy + Send + Sync + Default + 'static + std::fmt::Debug {
    /// The dtype this type stores.
    const DTYPE: QuantDtype;
    /// Converts an in-range value. Callers guarantee `v` fits the type.
    fn from_i32(v: i32) -> Self;
    /// Widens to `i32`.
    fn to_i32(self) -> i32;
}

impl QuantInt for i8 {
    const DTYPE: QuantDtype = QuantDtype::Int8;
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as i8
    }
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}

impl QuantInt for u8 {
    const DTYPE: QuantDtype = QuantDtype::Uint8;
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as u8
    }
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}

/// Checks that the integer range of `p` fits `T`.
pub(crate) fn check_dtype<T: QuantInt>(qmin: i32, qmax: i32) -> Result<()> {
    let (tmin, tmax) = T::DTYPE.range(false);
    if qmin < tmin || qmax > tmax {
        let expected = if qmin < 0 { "int8" } else { "uint8" };
        return Err(MathError::DtypeMismatch {
            expected,
            got: T::DTYPE.name(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_scale_is_amax_over_127() {
        let p = ChannelParams::symmetric(12.7, QuantDtype::Int8, false).unwrap();
        assert_eq!(p.scale, 12.7 / 127.0);
        assert_eq!((p.zero_point, p.qmin, p.qmax), (0, -128, 127));
        let n = ChannelParams::symmetric(12.7, QuantDtype::Int8, true).unwrap();
        assert_eq!((n.qmin, n.qmax), (-127, 127));
        let u = ChannelParams::symmetric(1.0, QuantDtype::Uint8, false).unwrap();
        assert_eq!(u.zero_point, 128);
    }

    #[test]
    fn zero_and_tiny_ranges_get_unit_scale() {
        for amax in [0.0, 1e-40] {
            let p = ChannelParams::symmetric(amax, QuantDtype::Int8, false).unwrap();
            assert_eq!(p.scale, 1.0);
            assert_eq!(p.zero_point, 0);
        }
        let a = ChannelParams::affine(0.0, 0.0, QuantDtype::Uint8, false).unwrap();
        assert_eq!((a.scale, a.zero_point), (1.0, 0));
    }

    #[test]
    fn affine_contains_zero_exactly() {
        // Positive-only: zero point at qmin.
        let p = ChannelParams::affine(2.0, 5.1, QuantDtype::Uint8, false).unwrap();
        assert_eq!(p.zero_point, 0);
        assert_eq!(p.scale, 5.1 / 255.0);
        // Negative-only: zero point at qmax.
        let n = ChannelParams::affine(-5.1, -2.0, QuantDtype::Uint8, false).unwrap();
        assert_eq!(n.zero_point, 255);
        // Mixed: z = round(0 - (-1)/s) with s = 4/255 -> round(63.75) = 64.
        let m = ChannelParams::affine(-1.0, 3.0, QuantDtype::Uint8, false).unwrap();
        assert_eq!(m.zero_point, 64);
        let i = ChannelParams::affine(-1.0, 3.0, QuantDtype::Int8, false).unwrap();
        assert_eq!(i.zero_point, -64);
    }

    #[test]
    fn bad_ranges_are_errors() {
        assert!(matches!(
            ChannelParams::symmetric(f32::NAN, QuantDtype::Int8, false),
            Err(MathError::NonFinite { .. })
        ));
        assert!(matches!(
            ChannelParams::symmetric(f32::INFINITY, QuantDtype::Int8, false),
            Err(MathError::NonFinite { .. })
        ));
        assert_eq!(
            ChannelParams::symmetric(-1.0, QuantDtype::Int8, false),
            Err(MathError::NegativeAmax(-1.0))
        );
        assert!(matches!(
            ChannelParams::affine(2.0, 1.0, QuantDtype::Uint8, false),
            Err(MathError::InvertedRange { .. })
        ));
        assert!(matches!(
            ChannelParams::affine(-f32::MAX, f32::MAX, QuantDtype::Uint8, false),
            Ok(_) | Err(MathError::BadScale(_))
        ));
        assert!(ChannelParams::new(0.0, 0, QuantDtype::Int8, false).is_err());
        assert!(ChannelParams::new(1.0, 200, QuantDtype::Int8, false).is_err());
    }

    #[test]
    fn scheme_builds_per_channel_params() {
        let s = QuantScheme::trt_weight(0);
        let p = s.params(&[-1.0, -0.5], &[0.5, 2.0]).unwrap();
        assert_eq!(p.axis(), Some(0));
        assert_eq!(p.scales(), vec![1.0 / 127.0, 2.0 / 127.0]);
        assert_eq!(p.qrange(), (-127, 127));
        assert!(p.is_symmetric());
        assert!(s.params(&[0.0], &[1.0, 2.0]).is_err());
        assert!(QuantScheme::trt_activation()
            .params(&[0.0, 0.0], &[1.0, 1.0])
            .is_err());
    }

    #[test]
    fn layout_splits_around_axis() {
        let p = QuantParams::symmetric_per_channel(&[1.0; 3], 1, QuantDtype::Int8, true).unwrap();
        assert_eq!(p.layout(&[2, 3, 4, 5]).unwrap(), (2, 3, 20));
        assert!(p.layout(&[2, 4]).is_err());
        assert!(matches!(p.layout(&[3]), Err(MathError::BadAxis { .. })));
    }

    #[test]
    fn serde_roundtrip() {
        let p = QuantParams::affine(-1.0, 3.0, QuantDtype::Uint8, false).unwrap();
        let s = serde_json::to_string(&p).unwrap();
        let q: QuantParams = serde_json::from_str(&s).unwrap();
        assert_eq!(p, q);
    }
}
