//! Streaming histograms of activations, for histogram-based calibration.
//!
//! Two kinds: of `|x|` over `[0, hi]` (symmetric calibration, what TensorRT's
//! entropy calibrator uses) and of signed `x` over `[lo, hi]` (affine ranges).
//!
//! Two range modes:
//! - **Fixed** ([`Histogram::fixed_abs`], [`Histogram::fixed_signed`]): the
//!   range is set up front, typically from a first pass that found the global
//!   max. The result then depends on neither batch size nor batch order.
//!   Values outside the range are counted in the edge bins (they are clipped
//!   there by any threshold anyway) and in [`Histogram::clipped`].
//! - **Dynamic** ([`Histogram::dynamic_abs`], [`Histogram::dynamic_signed`]).
//!   Growth policy: the range is always a power of two (`[0, 2^k]` or
//!   `[-2^k, 2^k]`), the smallest that holds every value seen. When a batch
//!   exceeds it, the range doubles as often as needed and each doubling merges
//!   adjacent bin pairs. Because bin edges of a power-of-two range are exact
//!   binary fractions, the counts after growth equal those of a histogram
//!   built at the final range directly, and merging two dynamic histograms
//!   gives exactly the histogram of the concatenated data. The price is
//!   resolution: between half and all of the bins are in use.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{MathError, Result};
use crate::kernels::SimdLevel;

/// Default number of bins (TensorRT and modelopt use 2048).
pub const DEFAULT_BINS: usize = 2048;

/// The largest power of two an f32 holds; dynamic ranges cannot grow past it.
const MAX_DYNAMIC: f32 = 1.7014118e38;

/// Batches at least this long are binned in parallel.
const PARALLEL_MIN_LEN: usize = 1 << 16;

/// Of `|x|` or of signed `x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistogramKind {
    /// Histogram of `|x|` over `[0, hi]`.
    Abs,
    /// Histogram of `x` over `[lo, hi]`.
    Signed,
}

/// A histogram with a fixed number of bins. See the module docs for the modes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    kind: HistogramKind,
    fixed: bool,
    lo: f32,
    hi: f32,
    counts: Vec<u64>,
    total: u64,
    clipped: u64,
    min: f32,
    max: f32,
}

impl Histogram {
    fn new(kind: HistogramKind, fixed: bool, bins: usize, lo: f32, hi: f32) -> Result<Self> {
        let multiple = match kind {
            HistogramKind::Abs => 2,
            HistogramKind::Signed => 4,
        };
        if bins < multiple || !bins.is_multiple_of(multiple) || bins > (1 << 24) {
            return Err(MathError::BadHistogram(format!(
                "{bins} bins: need a multiple of {multiple} between {multiple} and 2^24"
            )));
        }
        for v in [lo, hi] {
            if !v.is_finite() {
                return Err(MathError::NonFinite {
                    what: "histogram range",
                    value: v,
                });
            }
        }
        if lo > hi {
            return Err(MathError::InvertedRange { min: lo, max: hi });
        }
        Ok(Self {
            kind,
            fixed,
            lo,
            hi,
            counts: vec![0; bins],
            total: 0,
            clipped: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        })
    }

    /// Histogram of `|x|` whose range grows in powers of two.
    pub fn dynamic_abs(bins: usize) -> Result<Self> {
        Self::new(HistogramKind::Abs, false, bins, 0.0, 0.0)
    }

    /// Histogram of `x` over a symmetric range that grows in powers of two.
    /// `bins` must be a multiple of 4.
    pub fn dynamic_signed(bins: usize) -> Result<Self> {
        Self::new(HistogramKind::Signed, false, bins, 0.0, 0.0)
    }

    /// Histogram of `|x|` over the fixed range `[0, amax]`.
    pub fn fixed_abs(bins: usize, amax: f32) -> Result<Self> {
        if amax < 0.0 {
            return Err(MathError::NegativeAmax(amax));
        }
        Self::new(HistogramKind::Abs, true, bins, 0.0, amax)
    }

    /// A histogram of `|x|` over `[0, amax]` binned elsewhere (on a GPU),
    /// with the statistics [`add`](Self::add) would have kept: `clipped`
    /// values above `amax` (counted in the last bin) and the smallest and
    /// largest value. Binning must follow [`add`](Self::add)'s rule: bin
    /// `min(|x| * (bins / amax), bins - 1)` truncated.
    pub fn from_abs_counts(
        amax: f32,
        counts: Vec<u64>,
        clipped: u64,
        min: f32,
        max: f32,
    ) -> Result<Self> {
        let mut h = Self::fixed_abs(counts.len(), amax)?;
        let total: u64 = counts.iter().sum();
        if clipped > total {
            return Err(MathError::BadHistogram(format!(
                "{clipped} clipped values of {total}"
            )));
        }
        if total > 0 {
            for v in [min, max] {
                if !v.is_finite() {
                    return Err(MathError::NonFinite {
                        what: "histogram data",
                        value: v,
                    });
                }
            }
            if min > max {
                return Err(MathError::InvertedRange { min, max });
            }
            h.min = min;
            h.max = max;
        }
        h.counts = counts;
        h.total = total;
        h.clipped = clipped;
        Ok(h)
    }

    /// Histogram of `x` over the fixed range `[lo, hi]`.
    pub fn fixed_signed(bins: usize, lo: f32, hi: f32) -> Result<Self> {
        Self::new(HistogramKind::Signed, true, bins, lo, hi)
    }

    /// Of `|x|` or of `x`.
    pub fn kind(&self) -> HistogramKind {
        self.kind
    }

    /// Whether the range is fixed.
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// Bin counts.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.counts.len()
    }

    /// Current range `(lo, hi)`.
    pub fn range(&self) -> (f32, f32) {
        (self.lo, self.hi)
    }

    /// Width of one bin (0 while the range is empty).
    pub fn bin_width(&self) -> f32 {
        (self.hi - self.lo) / self.counts.len() as f32
    }

    /// Number of values added.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Values that fell outside a fixed range (counted in the edge bins).
    pub fn clipped(&self) -> u64 {
        self.clipped
    }

    /// Smallest and largest value added (`None` before any value).
    pub fn min_max(&self) -> Option<(f32, f32)> {
        (self.total > 0).then_some((self.min, self.max))
    }

    /// Largest `|x|` added (0 before any value).
    pub fn max_abs(&self) -> f32 {
        match self.min_max() {
            Some((lo, hi)) => lo.abs().max(hi.abs()),
            None => 0.0,
        }
    }

    /// Adds a batch. Fails without changing the histogram if the batch holds
    /// a NaN or infinity (the error gives its index).
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (bmin, bmax) = batch_min_max(x)?;
        if !self.fixed {
            self.grow_to(bmin.abs().max(bmax.abs()))?;
        }
        let binner = self.binner();
        let bins = self.counts.len();
        let clipped = if x.len() >= PARALLEL_MIN_LEN {
            let (counts, clipped) = x
                .par_chunks(PARALLEL_MIN_LEN / 4)
                .fold(
                    || (vec![0u64; bins], 0u64),
                    |(mut c, k), chunk| {
                        let k2 = binner.bin_into(chunk, &mut c);
                        (c, k + k2)
                    },
                )
                .reduce(
                    || (vec![0u64; bins], 0u64),
                    |(mut a, ka), (b, kb)| {
                        a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                        (a, ka + kb)
                    },
                );
            self.counts
                .iter_mut()
                .zip(&counts)
                .for_each(|(a, b)| *a += b);
            clipped
        } else {
            binner.bin_into(x, &mut self.counts)
        };
        self.clipped += clipped;
        self.total += x.len() as u64;
        self.min = self.min.min(bmin);
        self.max = self.max.max(bmax);
        Ok(())
    }

    /// Doubles a dynamic range until it holds `need`.
    fn grow_to(&mut self, need: f32) -> Result<()> {
        if need == 0.0 || need <= self.hi {
            return Ok(());
        }
        if need > MAX_DYNAMIC {
            return Err(MathError::BadHistogram(format!(
                "value {need} exceeds the largest power-of-two range of f32 (2^127); use a fixed range"
            )));
        }
        if self.hi == 0.0 {
            // First non-zero data: zeros counted so far sit in the bin of 0,
            // which is the same bin at every power-of-two range.
            let r = pow2_ceil(need);
            self.hi = r;
            if self.kind == HistogramKind::Signed {
                self.lo = -r;
            }
            return Ok(());
        }
        while self.hi < need {
            let n = self.counts.len();
            let old = std::mem::replace(&mut self.counts, vec![0; n]);
            let offset = match self.kind {
                HistogramKind::Abs => 0,
                HistogramKind::Signed => n / 4,
            };
            for (i, c) in old.into_iter().enumerate() {
                self.counts[offset + i / 2] += c;
            }
            self.hi *= 2.0;
            if self.kind == HistogramKind::Signed {
                self.lo = -self.hi;
            }
        }
        Ok(())
    }

    fn binner(&self) -> Binner {
        let n = self.counts.len();
        let width = self.hi - self.lo;
        let inv = if width > 0.0 { n as f32 / width } else { 0.0 };
        match (self.kind, self.fixed) {
            (HistogramKind::Abs, _) => Binner::Abs {
                inv,
                last: n - 1,
                hi: self.hi,
            },
            // Dynamic signed ranges are symmetric: index floor(x * inv) + n/2,
            // which keeps the pair-merge of `grow_to` exact.
            (HistogramKind::Signed, false) => Binner::Centered {
                inv,
                half: n as i64 / 2,
                last: n - 1,
            },
            (HistogramKind::Signed, true) => Binner::Offset {
                lo: self.lo,
                hi: self.hi,
                inv,
                last: n - 1,
            },
        }
    }

    /// Adds another histogram's counts.
    ///
    /// Dynamic histograms of the same kind and bin count always merge (the
    /// smaller range grows first). Fixed histograms merge only with an
    /// identical range.
    pub fn merge(&mut self, other: &Histogram) -> Result<()> {
        if self.kind != other.kind
            || self.counts.len() != other.counts.len()
            || self.fixed != other.fixed
        {
            return Err(MathError::HistogramMismatch(format!(
                "{:?}/{} bins/{} vs {:?}/{} bins/{}",
                self.kind,
                self.counts.len(),
                if self.fixed { "fixed" } else { "dynamic" },
                other.kind,
                other.counts.len(),
                if other.fixed { "fixed" } else { "dynamic" },
            )));
        }
        if self.fixed {
            if (self.lo, self.hi) != (other.lo, other.hi) {
                return Err(MathError::HistogramMismatch(format!(
                    "fixed ranges differ: [{}, {}] vs [{}, {}]",
                    self.lo, self.hi, other.lo, other.hi
                )));
            }
            self.add_counts(&other.counts);
        } else {
            let mut o = other.clone();
            self.grow_to(o.hi)?;
            o.grow_to(self.hi)?;
            self.add_counts(&o.counts);
        }
        self.total += other.total;
        self.clipped += other.clipped;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        Ok(())
    }

    fn add_counts(&mut self, c: &[u64]) {
        self.counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
    }

    /// Folds a signed histogram with a symmetric range into a histogram of
    /// `|x|` with half as many bins and the same bin width. Abs histograms are
    /// returned unchanged.
    pub fn to_abs(&self) -> Result<Histogram> {
        if self.kind == HistogramKind::Abs {
            return Ok(self.clone());
        }
        if self.lo != -self.hi {
            return Err(MathError::BadHistogram(format!(
                "cannot fold the asymmetric range [{}, {}] into |x|",
                self.lo, self.hi
            )));
        }
        let n = self.counts.len();
        let half = n / 2;
        let counts = (0..half)
            .map(|k| self.counts[half + k] + self.counts[half - 1 - k])
            .collect();
        Ok(Histogram {
            kind: HistogramKind::Abs,
            lo: 0.0,
            counts,
            ..self.clone()
        })
    }
}

/// Smallest power of two `>= v` (for positive finite `v`).
fn pow2_ceil(v: f32) -> f32 {
    let mut r = 2f32.powi(v.log2().ceil() as i32);
    // log2 rounding can land one power low or high.
    while r < v {
        r *= 2.0;
    }
    while r / 2.0 >= v && r / 2.0 > 0.0 {
        r /= 2.0;
    }
    r
}

/// Min and max of a batch, or the first non-finite value's index.
fn batch_min_max(x: &[f32]) -> Result<(f32, f32)> {
    crate::stats::lane_min_max("histogram input", x)
}

/// Values binned into the u16 sub-histograms between flushes: each gets a
/// quarter of them (the first also the up to 3 of the tail).
const FLUSH: usize = 1 << 17;
const _: () = assert!(FLUSH / 4 + 3 < u16::MAX as usize);
// abs_bin_into's first sub-histogram also takes a tail of up to a block.
const _: () = assert!(FLUSH / 4 + BLOCK < u16::MAX as usize);

/// Truncates a bin position already clamped to `[0, last]`.
#[inline(always)]
fn to_index(t: f32) -> usize {
    // A plain truncating conversion: the saturating `as` costs extra
    // instructions per value in this hot loop.
    if t >= 0.0 && t < (1u32 << 24) as f32 {
        // SAFETY: checked just above that `t` is in [0, 2^24), which fits i32.
        unsafe { t.to_int_unchecked::<i32>() as usize }
    } else {
        0
    }
}

#[derive(Debug, Clone, Copy)]
enum Binner {
    Abs {
        inv: f32,
        last: usize,
        hi: f32,
    },
    Centered {
        inv: f32,
        half: i64,
        last: usize,
    },
    Offset {
        lo: f32,
        hi: f32,
        inv: f32,
        last: usize,
    },
}

impl Binner {
    /// Bin of `v` and whether it lies outside the range. `v` must be finite
    /// (`Histogram::add` checks the batch first).
    #[inline(always)]
    fn index(&self, v: f32) -> (usize, bool) {
        match *self {
            Binner::Abs { inv, last, hi } => {
                let a = v.abs();
                (to_index((a * inv).min(last as f32)), a > hi)
            }
            Binner::Centered { inv, half, last } => {
                let t = (v * inv).floor() + half as f32;
                (to_index(t.clamp(0.0, last as f32)), false)
            }
            Binner::Offset { lo, hi, inv, last } => (
                to_index(((v - lo) * inv).clamp(0.0, last as f32)),
                v < lo || v > hi,
            ),
        }
    }

    /// Adds `x` to `counts` and returns how many values fell outside the range.
    fn bin_into(&self, x: &[f32], counts: &mut [u64]) -> u64 {
        let n = counts.len();
        let mut clipped = 0u64;
        if let Binner::Abs { inv, last, hi } = *self {
            let level = SimdLevel::active();
            return match x.len() >= 4 * n {
                true => abs_bin_into(x, inv, last, hi, counts, level),
                false => abs_bin_short(x, inv, last, hi, counts, level),
            };
        }
        if x.len() < 4 * n {
            for &v in x {
                let (i, c) = self.index(v);
                counts[i] += 1;
                clipped += c as u64;
            }
            return clipped;
        }
        sub_counted(x, counts, |piece, [s0, s1, s2, s3]| {
            let mut clipped = 0u64;
            let quads = piece.chunks_exact(4);
            let tail = quads.remainder();
            for q in quads {
                let (i0, c0) = self.index(q[0]);
                let (i1, c1) = self.index(q[1]);
                let (i2, c2) = self.index(q[2]);
                let (i3, c3) = self.index(q[3]);
                s0[i0] += 1;
                s1[i1] += 1;
                s2[i2] += 1;
                s3[i3] += 1;
                clipped += c0 as u64 + c1 as u64 + c2 as u64 + c3 as u64;
            }
            for &v in tail {
                let (i, c) = self.index(v);
                s0[i] += 1;
                clipped += c as u64;
            }
            clipped
        })
    }
}

/// Counts `x` into `counts` through four interleaved sub-histograms:
/// consecutive equal bins (common in activations) would otherwise
/// serialize on one counter's store. u16 counters keep the four at 16 KB
/// for 2048 bins, in L1 with room for the data (u32 ones fill it: 7.4
/// against 6.0 ms on 4M spread-out values, `cargo bench --bench math --
/// histogram_add`). `fill` bins one piece of at most [`FLUSH`] values into
/// the four and returns how many it clipped; the pieces are added to
/// `counts` before a counter could overflow.
fn sub_counted(
    x: &[f32],
    counts: &mut [u64],
    mut fill: impl FnMut(&[f32], [&mut [u16]; 4]) -> u64,
) -> u64 {
    thread_local! {
        // All zero between calls: reused, so a call allocates and clears
        // nothing up front (calibration adds thousands of pieces of
        // 10-20k values, where that was about a fifth of the binning).
        static SCRATCH: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let n = counts.len();
    let stride = n + SUB_PAD;
    let mut sub = SCRATCH.take();
    if sub.len() < 4 * stride {
        sub = vec![0u16; 4 * stride];
    }
    let mut clipped = 0u64;
    for piece in x.chunks(FLUSH) {
        let (s0, rest) = sub.split_at_mut(stride);
        let (s1, rest) = rest.split_at_mut(stride);
        let (s2, rest) = rest.split_at_mut(stride);
        let s3 = &mut rest[..stride];
        clipped += fill(
            piece,
            [&mut s0[..n], &mut s1[..n], &mut s2[..n], &mut s3[..n]],
        );
        // Added to `counts` and cleared in one pass.
        for (k, c) in counts.iter_mut().enumerate() {
            *c += s0[k] as u64 + s1[k] as u64 + s2[k] as u64 + s3[k] as u64;
            (s0[k], s1[k], s2[k], s3[k]) = (0, 0, 0, 0);
        }
    }
    SCRATCH.set(sub);
    clipped
}

/// Counters left between two of [`sub_counted`]'s sub-histograms (64
/// bytes). Without them the four are exactly 4 KB apart (2048 bins), so
/// equal bins share their low 12 address bits, and the CPU holds each load
/// from one until the store to the other before it is done (4K aliasing):
/// 25% slower on spread values (`cargo bench --bench math -- histogram_add`).
const SUB_PAD: usize = 32;

/// Values [`abs_bins`] bins at once.
const BLOCK: usize = 64;

// `abs_bins::run(level, x, inv, last, hi, idx, clipped)`: the bins of a
// block of values for [`Binner::Abs`] (`idx[k]` = `|x[k]| * inv`, at most
// `last`, truncated: the arithmetic of `Binner::index`), adding to
// `clipped` how many lie above `hi`. Computed for the whole block at once,
// so the loop vectorizes and only the counter increments stay scalar.
crate::kernels::kernel!(abs_bins(
    x: &[f32; BLOCK],
    inv: f32,
    last: f32,
    hi: f32,
    idx: &mut [u32; BLOCK],
    clipped: &mut u32
)
    reference body(x, inv, last, hi, idx, clipped);
{
    let mut c = 0u32;
    for k in 0..BLOCK {
        let a = x[k].abs();
        let t = a * inv;
        // A select, not f32::min: the same result here (a NaN product
        // also goes to `last`) and it vectorizes.
        let t = if t < last { t } else { last };
        // SAFETY: `t` is in [0, last] (`a >= 0`, `inv > 0`, a NaN product
        // replaced by `last`) and `last`, a bin index, fits i32. The
        // saturating `as` kept this loop scalar.
        idx[k] = unsafe { t.to_int_unchecked::<i32>() } as u32;
        c += u32::from(a > hi);
    }
    *clipped += c;
});

/// The bins of `x` for [`Binner::Abs`], a block of [`BLOCK`] values at a
/// time ([`abs_bins`]), handed to `count` block by block (the last one
/// shorter); returns how many values were clipped.
fn abs_blocks(
    x: &[f32],
    inv: f32,
    last: usize,
    hi: f32,
    level: SimdLevel,
    mut count: impl FnMut(&[u32]),
) -> u64 {
    let binner = Binner::Abs { inv, last, hi };
    let mut idx = [0u32; BLOCK];
    let mut clipped = 0u64;
    let (blocks, tail) = x.as_chunks::<BLOCK>();
    for block in blocks {
        let mut c = 0u32;
        abs_bins::run(level, block, inv, last as f32, hi, &mut idx, &mut c);
        clipped += c as u64;
        count(&idx);
    }
    for (slot, &v) in idx.iter_mut().zip(tail) {
        let (i, c) = binner.index(v);
        // A bin index, below `last + 1` (a u32 bin count).
        *slot = i as u32;
        clipped += c as u64;
    }
    count(&idx[..tail.len()]);
    clipped
}

/// [`Binner::bin_into`] for [`Binner::Abs`] on at least four values per
/// bin: bins from [`abs_blocks`], counted through [`sub_counted`].
fn abs_bin_into(
    x: &[f32],
    inv: f32,
    last: usize,
    hi: f32,
    counts: &mut [u64],
    level: SimdLevel,
) -> u64 {
    sub_counted(x, counts, |piece, [s0, s1, s2, s3]| {
        abs_blocks(piece, inv, last, hi, level, |idx| {
            let (quads, rest) = idx.as_chunks::<4>();
            for q in quads {
                s0[q[0] as usize] += 1;
                s1[q[1] as usize] += 1;
                s2[q[2] as usize] += 1;
                s3[q[3] as usize] += 1;
            }
            for &i in rest {
                s0[i as usize] += 1;
            }
        })
    })
}

/// [`Binner::bin_into`] for [`Binner::Abs`] on too few values to pay for
/// [`sub_counted`]'s sub-histograms: bins from [`abs_blocks`], bin 0
/// counted apart. Post-ReLU values are mostly zeros, whose increments of
/// one counter would each wait for the last one's store.
fn abs_bin_short(
    x: &[f32],
    inv: f32,
    last: usize,
    hi: f32,
    counts: &mut [u64],
    level: SimdLevel,
) -> u64 {
    let mut rest = [0u32; BLOCK];
    let mut zeros = 0u64;
    let clipped = abs_blocks(x, inv, last, hi, level, |idx| {
        // Branch-free compaction of the other bins: which values are zero
        // follows no pattern a branch could predict.
        let mut m = 0;
        for &q in idx {
            rest[m] = q;
            m += usize::from(q != 0);
        }
        zeros += (idx.len() - m) as u64;
        for &q in &rest[..m] {
            counts[q as usize] += 1;
        }
    });
    counts[0] += zeros;
    clipped
}

/// Straightforward histogram of `|x|` over `[0, hi]`, the reference the fast
/// binning is tested against. Out-of-range values go to the last bin.
pub fn reference_abs_counts(x: &[f32], bins: usize, hi: f32) -> Vec<u64> {
    let mut c = vec![0u64; bins];
    if bins == 0 {
        return c;
    }
    let w = hi / bins as f32;
    for &v in x {
        let a = v.abs();
        let i = if w > 0.0 { (a / w).floor() as usize } else { 0 };
        c[i.min(bins - 1)] += 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_abs_grows_by_doubling() {
        let mut h = Histogram::dynamic_abs(8).unwrap();
        h.add(&[0.0, 0.0]).unwrap();
        assert_eq!(h.range(), (0.0, 0.0));
        h.add(&[0.3, 0.9]).unwrap();
        assert_eq!(h.range(), (0.0, 1.0));
        // width 1/8: 0 -> 0, 0.3 -> 2, 0.9 -> 7
        assert_eq!(h.counts(), &[2, 0, 1, 0, 0, 0, 0, 1]);
        h.add(&[-3.0]).unwrap();
        assert_eq!(h.range(), (0.0, 4.0));
        // width 1/2: 0,0,0.3 -> 0, 0.9 -> 1, 3 -> 6
        assert_eq!(h.counts(), &[3, 1, 0, 0, 0, 0, 1, 0]);
        assert_eq!(h.total(), 5);
        assert_eq!(h.min_max(), Some((-3.0, 0.9)));
        assert_eq!(h.max_abs(), 3.0);
    }

    #[test]
    fn dynamic_signed_grows_around_center() {
        let mut h = Histogram::dynamic_signed(8).unwrap();
        h.add(&[-0.9, 0.0, 0.6]).unwrap();
        assert_eq!(h.range(), (-1.0, 1.0));
        assert_eq!(h.counts(), &[1, 0, 0, 0, 1, 0, 1, 0]);
        h.add(&[1.5]).unwrap();
        assert_eq!(h.range(), (-2.0, 2.0));
        assert_eq!(h.counts(), &[0, 0, 1, 0, 1, 1, 0, 1]);
        let a = h.to_abs().unwrap();
        assert_eq!(a.counts(), &[1, 2, 0, 1]);
    }

    #[test]
    fn fixed_range_clips_into_edges() {
        let mut h = Histogram::fixed_abs(4, 1.0).unwrap();
        h.add(&[0.1, -0.6, 1.0, 2.0]).unwrap();
        assert_eq!(h.counts(), &[1, 0, 1, 2]);
        assert_eq!(h.clipped(), 1);
        let mut s = Histogram::fixed_signed(4, -1.0, 3.0).unwrap();
        s.add(&[-2.0, -0.5, 0.5, 2.9, 7.0]).unwrap();
        assert_eq!(s.counts(), &[2, 1, 0, 2]);
        assert_eq!(s.clipped(), 2);
        // All-zero tensors get a zero-width range: everything in bin 0.
        let mut z = Histogram::fixed_abs(4, 0.0).unwrap();
        z.add(&[0.0, 0.0]).unwrap();
        assert_eq!(z.counts(), &[2, 0, 0, 0]);
    }

    #[test]
    fn rejects_non_finite_and_bad_configs() {
        let mut h = Histogram::dynamic_abs(8).unwrap();
        let err = h.add(&[1.0, f32::NAN, 2.0]).unwrap_err();
        assert!(
            matches!(err, MathError::NonFiniteData { index: 1, .. }),
            "{err:?}"
        );
        assert_eq!(h.total(), 0);
        assert!(h.add(&[f32::INFINITY]).is_err());
        assert!(Histogram::dynamic_abs(7).is_err());
        assert!(Histogram::dynamic_signed(6).is_err());
        assert!(Histogram::fixed_abs(8, -1.0).is_err());
        assert!(Histogram::fixed_signed(8, 1.0, -1.0).is_err());
        assert!(Histogram::fixed_abs(8, f32::NAN).is_err());
    }

    #[test]
    fn block_binning_equals_value_by_value_binning_on_every_tier() {
        // Values on and beside bin edges, zeros of both signs, values past
        // the range; lengths around the block and past one flush.
        let (bins, hi) = (2048usize, 3.0f32);
        let inv = bins as f32 / hi;
        let last = bins - 1;
        let binner = Binner::Abs { inv, last, hi };
        let value = |i: usize| -> f32 {
            let edge = (i % 4100) as f32 / inv;
            match i % 8 {
                0 => edge,
                1 => -edge,
                2 => f32::from_bits(edge.to_bits() + 1),
                3 => -f32::from_bits(edge.to_bits().saturating_sub(1)),
                4 => -0.0,
                5 => hi * 1.5,
                6 => (i % 97) as f32 * 0.031 - 1.5,
                _ => 0.0,
            }
        };
        for len in [4 * bins, 4 * bins + 1, 4 * bins + 63, FLUSH + 4 * BLOCK + 5] {
            let x: Vec<f32> = (0..len).map(value).collect();
            let mut want = vec![0u64; bins];
            let mut want_clipped = 0u64;
            for &v in &x {
                let (i, c) = binner.index(v);
                want[i] += 1;
                want_clipped += c as u64;
            }
            for level in SimdLevel::available() {
                let mut got = vec![0u64; bins];
                let clipped = abs_bin_into(&x, inv, last, hi, &mut got, level);
                assert_eq!(got, want, "{len} {level:?}");
                assert_eq!(clipped, want_clipped, "{len} {level:?}");
            }
        }
        // A product that overflows or is NaN (a range near zero) goes to
        // the last bin, as value by value.
        let tiny = Binner::Abs {
            inv: f32::INFINITY,
            last,
            hi: 1e-30,
        };
        let x = vec![0.0f32; 4 * bins];
        let mut got = vec![0u64; bins];
        abs_bin_into(
            &x,
            f32::INFINITY,
            last,
            1e-30,
            &mut got,
            SimdLevel::active(),
        );
        assert_eq!(got[tiny.index(0.0).0], x.len() as u64);
    }

    #[test]
    fn counts_binned_elsewhere_make_the_same_histogram() {
        let x: Vec<f32> = (0..5000)
            .map(|i| ((i * 37 % 1001) as f32 - 500.0) * 0.013)
            .collect();
        let amax = 5.0;
        let mut want = Histogram::fixed_abs(64, amax).unwrap();
        want.add(&x).unwrap();
        // The documented rule, applied here as a GPU would.
        let inv = 64.0 / amax;
        let mut counts = vec![0u64; 64];
        for &v in &x {
            counts[to_index((v.abs() * inv).min(63.0))] += 1;
        }
        let clipped = x.iter().filter(|v| v.abs() > amax).count() as u64;
        let (lo, hi) = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        let got = Histogram::from_abs_counts(amax, counts.clone(), clipped, lo, hi).unwrap();
        assert_eq!(got.counts(), want.counts());
        assert_eq!(got.total(), want.total());
        assert_eq!(got.clipped(), want.clipped());
        assert_eq!(got.min_max(), want.min_max());
        assert!(Histogram::from_abs_counts(amax, counts.clone(), 6000, lo, hi).is_err());
        assert!(Histogram::from_abs_counts(amax, counts.clone(), 0, f32::NAN, hi).is_err());
        assert!(Histogram::from_abs_counts(amax, counts, 0, hi, lo).is_err());
        assert!(Histogram::from_abs_counts(amax, vec![0; 3], 0, 0.0, 0.0).is_err());
    }

    #[test]
    fn batch_min_max_sees_every_lane_and_the_tail() {
        // 16-lane main loop plus a tail: put the extremes and the bad
        // values in each position in turn.
        for len in [1usize, 15, 16, 17, 40] {
            for at in 0..len {
                let mut x: Vec<f32> = (0..len).map(|i| (i % 5) as f32 - 2.0).collect();
                let naive = |x: &[f32]| {
                    x.iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                            (l.min(v), h.max(v))
                        })
                };
                for extreme in [-7.5, 9.0] {
                    x[at] = extreme;
                    assert_eq!(batch_min_max(&x).unwrap(), naive(&x), "{len} {at}");
                }
                for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    x[at] = bad;
                    let err = batch_min_max(&x).unwrap_err();
                    assert!(
                        matches!(err, MathError::NonFiniteData { index, .. } if index == at),
                        "{len} {at} {bad}: {err:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn long_runs_in_one_bin_do_not_overflow_the_sub_histograms() {
        // More values than one flush interval, all in one bin: each u16
        // sub-histogram must be flushed in time.
        let n = 3 * FLUSH + 5;
        let mut x = vec![0.0f32; n];
        x[n - 1] = 1.0;
        let mut h = Histogram::fixed_abs(2048, 1.0).unwrap();
        h.add(&x).unwrap();
        assert_eq!(h.counts()[0], n as u64 - 1);
        assert_eq!(h.counts()[2047], 1);
        assert_eq!(reference_abs_counts(&x, 2048, 1.0), h.counts());
    }

    #[test]
    fn merge_rules() {
        let mut a = Histogram::fixed_abs(8, 1.0).unwrap();
        let b = Histogram::fixed_abs(8, 2.0).unwrap();
        assert!(a.merge(&b).is_err());
        let d = Histogram::dynamic_abs(8).unwrap();
        assert!(a.merge(&d).is_err());
        let s = Histogram::dynamic_signed(8).unwrap();
        assert!(Histogram::dynamic_abs(8).unwrap().merge(&s).is_err());
    }

    #[test]
    fn pow2_ceil_is_tight() {
        assert_eq!(pow2_ceil(1.0), 1.0);
        assert_eq!(pow2_ceil(1.0001), 2.0);
        assert_eq!(pow2_ceil(0.3), 0.5);
        assert_eq!(pow2_ceil(1.0e38), MAX_DYNAMIC);
        let mut h = Histogram::dynamic_abs(8).unwrap();
        assert!(matches!(h.add(&[3.0e38]), Err(MathError::BadHistogram(_))));
    }
}
