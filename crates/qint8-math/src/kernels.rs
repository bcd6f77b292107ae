//! Fast elementwise kernels, selected once at run time.
//!
//! Each kernel body is a plain loop written so that LLVM vectorizes it
//! (no `round` libcall: rounding uses the 1.5 * 2^23 trick on values already
//! clamped to the integer range, which is exact and rounds half to even under
//! the default rounding mode). The body is compiled several times: for the
//! baseline target and inside `#[target_feature]` functions for AVX2 and
//! AVX-512, and [`SimdLevel::active`] picks one with
//! `is_x86_feature_detected!`. No build flag such as `target-cpu=native` is
//! needed or used.
//!
//! The environment variable `QINT8_SIMD` (`reference`, `portable`, `avx2`,
//! `avx512`) caps the level, so every tier can be tested on one machine.

use std::sync::OnceLock;

use crate::params::{ChannelParams, QuantInt};
use crate::reference;

/// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude < 2^22 to an
/// integer, half to even.
const MAGIC: f32 = 12_582_912.0;

/// A kernel implementation tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// The scalar reference in [`crate::reference`].
    Reference,
    /// The vectorizable loops compiled for the baseline target (SSE2 on x86-64).
    Portable,
    /// The same loops compiled with AVX2 and FMA.
    Avx2,
    /// The same loops compiled with AVX-512 F/BW/VL/DQ.
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports.
    pub fn detected() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
            {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    }

    /// The level kernels use: [`SimdLevel::detected`], capped by `QINT8_SIMD`
    /// when it is set. Computed once per process.
    pub fn active() -> SimdLevel {
        static ACTIVE: OnceLock<SimdLevel> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Self::detected();
            match std::env::var("QINT8_SIMD")
                .ok()
                .as_deref()
                .and_then(Self::parse)
            {
                Some(cap) => cap.min(best),
                None => best,
            }
        })
    }

    /// Parses a level name (`reference`, `portable`, `avx2`, `avx512`).
    pub fn parse(name: &str) -> Option<SimdLevel> {
        match name.trim().to_ascii_lowercase().as_str() {
            "reference" | "scalar" => Some(SimdLevel::Reference),
            "portable" | "sse2" => Some(SimdLevel::Portable),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// Every level this CPU can run, lowest first (for tests and benches).
    pub fn available() -> Vec<SimdLevel> {
        let best = Self::detected();
        [
            SimdLevel::Reference,
            SimdLevel::Portable,
            SimdLevel::Avx2,
            SimdLevel::Avx512,
        ]
        .into_iter()
        .filter(|l| *l <= best)
        .collect()
    }
}

/// Clamps `v` to `[lo, hi]` (NaN goes to `lo`) and rounds half to even.
/// `lo` and `hi` are integers of magnitude <= 255, so the rounding trick is exact.
#[inline(always)]
fn clamp_round(v: f32, lo: f32, hi: f32) -> f32 {
    // Written as selects so LLVM emits maxps/minps; the operand order sends NaN to lo.
    let v = if v > lo { v } else { lo };
    let v = if v < hi { v } else { hi };
    (v + MAGIC) - MAGIC
}

#[inline(always)]
fn to_i32(r: f32) -> i32 {
    // SAFETY: `r` comes from `clamp_round`, so it is an integer in [-255, 255].
    unsafe { r.to_int_unchecked::<i32>() }
}

/// Generates one kernel: an `#[inline(always)]` body plus AVX2/AVX-512
/// instantiations and a dispatcher taking a [`SimdLevel`].
macro_rules! kernel {
    ($name:ident $(<$T:ident>)? ($($arg:ident : $ty:ty),*) reference $reference:expr; $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[inline(always)]
            pub(super) fn body$(<$T: QuantInt>)?($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn avx2$(<$T: QuantInt>)?($($arg: $ty),*) {
                body$(::<$T>)?($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
            pub(super) unsafe fn avx512$(<$T: QuantInt>)?($($arg: $ty),*) {
                body$(::<$T>)?($($arg),*)
            }

            pub(super) fn run$(<$T: QuantInt>)?(level: SimdLevel, $($arg: $ty),*) {
                match level {
                    SimdLevel::Reference => $reference,
                    SimdLevel::Portable => body$(::<$T>)?($($arg),*),
                    // SAFETY: callers only pass levels <= SimdLevel::detected().
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx2 => unsafe { avx2$(::<$T>)?($($arg),*) },
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx512 => unsafe { avx512$(::<$T>)?($($arg),*) },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => body$(::<$T>)?($($arg),*),
                }
            }
        }
    };
}

/// For kernels outside this module (the entropy search's log terms).
pub(crate) use kernel;

kernel!(quant_block<T>(x: &[f32], out: &mut [T], p: &ChannelParams)
    reference reference::quantize(x, out, p);
{
    let (s, z) = (p.scale, p.zero_point);
    let (lo, hi) = p.rel_bounds();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = T::from_i32(to_i32(clamp_round(v / s, lo, hi)) + z);
    }
});

kernel!(quant_rows<T>(x: &[f32], out: &mut [T], e: &ElementParams)
    reference e.reference_rows(x, |xs, os, p| reference::quantize(xs, os, p), out);
{
    let n = e.scale.len();
    if let Some((lo, hi, z)) = e.shared_bounds {
        // Common case (symmetric per-channel): only the scale varies.
        for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            for ((o, &v), &s) in os.iter_mut().zip(xs).zip(&e.scale) {
                *o = T::from_i32(to_i32(clamp_round(v / s, lo, hi)) + z);
            }
        }
        return;
    }
    for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let it = os.iter_mut().zip(xs).zip(&e.scale).zip(&e.lo).zip(&e.hi).zip(&e.zero_point);
        for (((((o, &v), &s), &lo), &hi), &z) in it {
            *o = T::from_i32(to_i32(clamp_round(v / s, lo, hi)) + z);
        }
    }
});

kernel!(dequant_block<T>(q: &[T], out: &mut [f32], p: &ChannelParams)
    reference reference::dequantize(q, out, p);
{
    let (s, z) = (p.scale, p.zero_point);
    for (o, &v) in out.iter_mut().zip(q) {
        *o = (v.to_i32() - z) as f32 * s;
    }
});

kernel!(dequant_rows<T>(q: &[T], out: &mut [f32], e: &ElementParams)
    reference e.reference_rows(q, |qs, os, p| reference::dequantize(qs, os, p), out);
{
    let n = e.scale.len();
    for (qs, os) in q.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        for (((o, &v), &s), &z) in os.iter_mut().zip(qs).zip(&e.scale).zip(&e.zero_point) {
            *o = (v.to_i32() - z) as f32 * s;
        }
    }
});

kernel!(fake_block(x: &[f32], out: &mut [f32], p: &ChannelParams)
    reference reference::fake_quant(x, out, p);
{
    let s = p.scale;
    let (lo, hi) = p.rel_bounds();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = clamp_round(v / s, lo, hi) * s;
    }
});

kernel!(fake_rows(x: &[f32], out: &mut [f32], e: &ElementParams)
    reference e.reference_rows(x, reference::fake_quant, out);
{
    let n = e.scale.len();
    if let Some((lo, hi, _)) = e.shared_bounds {
        for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            for ((o, &v), &s) in os.iter_mut().zip(xs).zip(&e.scale) {
                *o = clamp_round(v / s, lo, hi) * s;
            }
        }
        return;
    }
    for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        for ((((o, &v), &s), &lo), &hi) in os.iter_mut().zip(xs).zip(&e.scale).zip(&e.lo).zip(&e.hi) {
            *o = clamp_round(v / s, lo, hi) * s;
        }
    }
});

/// Per-element parameters of one row, for per-channel layouts whose inner
/// stride is too short for per-block kernels (for example the last axis).
#[derive(Debug, Clone)]
pub(crate) struct ElementParams {
    params: Vec<ChannelParams>,
    scale: Vec<f32>,
    lo: Vec<f32>,
    hi: Vec<f32>,
    zero_point: Vec<i32>,
    /// `(lo, hi, z)` when every channel shares the zero point (and so the bounds).
    shared_bounds: Option<(f32, f32, i32)>,
}

impl ElementParams {
    /// Expands `channels` so that element `c * inner + k` of a row uses channel `c`.
    pub(crate) fn new(channels: &[ChannelParams], inner: usize) -> Self {
        let params: Vec<ChannelParams> = channels
            .iter()
            .flat_map(|c| std::iter::repeat_n(*c, inner))
            .collect();
        Self {
            scale: params.iter().map(|p| p.scale).collect(),
            lo: params.iter().map(|p| p.rel_bounds().0).collect(),
            hi: params.iter().map(|p| p.rel_bounds().1).collect(),
            zero_point: params.iter().map(|p| p.zero_point).collect(),
            shared_bounds: channels.first().and_then(|c0| {
                let (lo, hi) = c0.rel_bounds();
                channels
                    .iter()
                    .all(|c| c.zero_point == c0.zero_point)
                    .then_some((lo, hi, c0.zero_point))
            }),
            params,
        }
    }

    /// Row length.
    pub(crate) fn row_len(&self) -> usize {
        self.params.len()
    }

    fn reference_rows<A, B>(
        &self,
        x: &[A],
        f: impl Fn(&[A], &mut [B], &ChannelParams),
        out: &mut [B],
    ) {
        let n = self.params.len();
        for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            for i in 0..n {
                f(&xs[i..i + 1], &mut os[i..i + 1], &self.params[i]);
            }
        }
    }
}

/// Quantizes `x` into `out` with one set of parameters (lengths must match).
pub(crate) fn quantize_block<T: QuantInt>(
    level: SimdLevel,
    x: &[f32],
    out: &mut [T],
    p: &ChannelParams,
) {
    quant_block::run(level, x, out, p)
}

/// Quantizes whole rows of `e.row_len()` elements with per-element parameters.
pub(crate) fn quantize_rows<T: QuantInt>(
    level: SimdLevel,
    x: &[f32],
    out: &mut [T],
    e: &ElementParams,
) {
    quant_rows::run(level, x, out, e)
}

/// Dequantizes `q` into `out` with one set of parameters.
pub(crate) fn dequantize_block<T: QuantInt>(
    level: SimdLevel,
    q: &[T],
    out: &mut [f32],
    p: &ChannelParams,
) {
    dequant_block::run(level, q, out, p)
}

/// Dequantizes whole rows with per-element parameters.
pub(crate) fn dequantize_rows<T: QuantInt>(
    level: SimdLevel,
    q: &[T],
    out: &mut [f32],
    e: &ElementParams,
) {
    dequant_rows::run(level, q, out, e)
}

/// Fake-quantizes `x` into `out` with one set of parameters.
pub(crate) fn fake_quant_block(level: SimdLevel, x: &[f32], out: &mut [f32], p: &ChannelParams) {
    fake_block::run(level, x, out, p)
}

/// Fake-quantizes whole rows with per-element parameters.
pub(crate) fn fake_quant_rows(level: SimdLevel, x: &[f32], out: &mut [f32], e: &ElementParams) {
    fake_rows::run(level, x, out, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names_and_order() {
        assert_eq!(SimdLevel::parse("AVX2"), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse(" scalar "), Some(SimdLevel::Reference));
        assert_eq!(SimdLevel::parse("avx512"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("neon"), None);
        let a = SimdLevel::available();
        assert_eq!(&a[..2], &[SimdLevel::Reference, SimdLevel::Portable]);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(SimdLevel::active() <= SimdLevel::detected());
    }
}
