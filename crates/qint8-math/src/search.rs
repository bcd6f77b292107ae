//! Range search: choosing a clipping threshold from a histogram.
//!
//! | method | threshold |
//! |---|---|
//! | [`RangeMethod::Max`] | the largest `|x|` seen |
//! | [`RangeMethod::Percentile`] | the upper edge of the bin where the cumulative count reaches `p`% |
//! | [`RangeMethod::Entropy`] | TensorRT's KL-divergence search (two conventions, see [`EntropyVariant`]) |
//! | [`RangeMethod::Mse`] | the bin centre minimizing the expected squared quantization error |

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{MathError, Result};
use crate::histogram::{Histogram, HistogramKind};
use crate::kernels::SimdLevel;

/// Which form of the entropy calibration to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EntropyVariant {
    /// The modelopt convention (below) with isolated point masses taken out
    /// of the comparison inside the kept range: a bin holding more than
    /// [`SPIKE_FACTOR`] times the median of its 9-bin neighbourhood counts
    /// as that median when it lies below the candidate threshold, and in
    /// full when it is clipped. A point mass (the constant background of an
    /// image mapped through a layer) quantizes with an error of at most half
    /// a step, but the KL comparison spreads each merged group evenly over
    /// its non-empty bins and charges the spike as if it were smeared, which
    /// drives the search to the smallest candidates, where groups are single
    /// bins. On the Fashion-MNIST fixtures the modelopt form clipped the
    /// first ReLU of VGG-16-BN at 0.13 of its range (top-1 0.932 -> 0.840)
    /// and EfficientNet-B0's stem at 0.07 (0.912 -> 0.569); this form keeps
    /// 0.932 and reaches 0.902. Without spikes it equals the modelopt form.
    /// The default.
    #[default]
    SpikeAware,
    /// The convention of NVIDIA's pytorch-quantization and TensorRT Model
    /// Optimizer (modelopt): before the search the first bin takes the
    /// second bin's count (removing the zero spike that ReLU outputs put in
    /// bin 0), the threshold is `i * bin_width`, and among tied minima the
    /// last (largest) threshold wins. What TensorRT users compare against.
    Modelopt,
    /// The algorithm exactly as on the slides of "8-bit Inference with
    /// TensorRT" (Szymon Migacz, GTC 2017, S7310): no zero-spike fix,
    /// threshold `(i + 0.5) * bin_width`, first of tied minima.
    Gtc2017,
}

/// A bin is a point mass for [`EntropyVariant::SpikeAware`] when it holds
/// more than this many times the median of the 9 bins centred on it.
pub const SPIKE_FACTOR: f64 = 8.0;

/// Half-width of the neighbourhood a point mass is compared with.
const SPIKE_RADIUS: usize = 4;

/// How to choose a range from a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum RangeMethod {
    /// Largest absolute value observed.
    Max,
    /// The `percentile`-th percentile of `|x|` (0 < p <= 100).
    Percentile {
        /// Percent of values that must lie inside the range, e.g. 99.99.
        percentile: f64,
    },
    /// KL-divergence minimization as TensorRT's entropy calibrator does it.
    Entropy {
        /// Which convention.
        variant: EntropyVariant,
        /// First candidate end bin (128).
        start_bin: usize,
        /// Quantized levels the candidate range is merged into (128 for int8).
        levels: usize,
    },
    /// Mean squared error minimization over bin centres from `start_bin` up.
    Mse {
        /// First candidate bin (128).
        start_bin: usize,
    },
}

impl Default for RangeMethod {
    fn default() -> Self {
        Self::entropy()
    }
}

impl RangeMethod {
    /// Entropy search with the default convention, start bin 128 and 128 levels.
    pub const fn entropy() -> Self {
        Self::Entropy {
            variant: EntropyVariant::SpikeAware,
            start_bin: 128,
            levels: 128,
        }
    }

    /// Percentile search (pytorch-quantization's default is 99.99).
    pub const fn percentile(p: f64) -> Self {
        Self::Percentile { percentile: p }
    }

    /// MSE search from bin 128.
    pub const fn mse() -> Self {
        Self::Mse { start_bin: 128 }
    }
}

/// Chooses a symmetric clipping threshold `amax` from a histogram.
///
/// Signed histograms with a symmetric range are folded to `|x|` first.
/// The result never exceeds the largest `|x|` observed.
pub fn search_amax(h: &Histogram, method: &RangeMethod) -> Result<f32> {
    if h.total() == 0 {
        return Err(MathError::EmptyHistogram);
    }
    let max_abs = h.max_abs();
    if let RangeMethod::Max = method {
        return Ok(max_abs);
    }
    let abs;
    let h = if h.kind() == HistogramKind::Signed {
        abs = h.to_abs()?;
        &abs
    } else {
        h
    };
    let w = h.bin_width() as f64;
    let amax = match *method {
        RangeMethod::Max => max_abs as f64,
        RangeMethod::Percentile { percentile } => {
            let k = percentile_bin(h.counts(), percentile, h.total())?;
            (k + 1) as f64 * w
        }
        RangeMethod::Entropy {
            variant,
            start_bin,
            levels,
        } => {
            let Some(best) = entropy_search(h.counts(), variant, start_bin, levels)? else {
                return Ok(max_abs);
            };
            match variant {
                EntropyVariant::SpikeAware | EntropyVariant::Modelopt => best as f64 * w,
                EntropyVariant::Gtc2017 => (best as f64 + 0.5) * w,
            }
        }
        RangeMethod::Mse { start_bin } => {
            let i = mse_search(h.counts(), start_bin)?;
            (i as f64 + 0.5) * w
        }
    };
    Ok((amax as f32).min(max_abs))
}

/// Chooses an affine range `[min, max]` from a histogram.
///
/// For signed histograms `Max` gives the observed extremes and `Percentile`
/// clips both tails at `p`; entropy and MSE are symmetric searches, so they
/// give `[-amax, amax]` intersected with the observed range. For histograms
/// of `|x|` every method gives `[-amax, amax]` intersected with the observed range.
pub fn search_min_max(h: &Histogram, method: &RangeMethod) -> Result<(f32, f32)> {
    let (min, max) = h.min_max().ok_or(MathError::EmptyHistogram)?;
    match (h.kind(), method) {
        (HistogramKind::Signed, RangeMethod::Max) => Ok((min, max)),
        (HistogramKind::Signed, RangeMethod::Percentile { percentile }) => {
            let c = h.counts();
            let w = h.bin_width();
            let (lo, _) = h.range();
            let hi_bin = percentile_bin(c, *percentile, h.total())?;
            let rev: Vec<u64> = c.iter().rev().copied().collect();
            let lo_bin = c.len() - 1 - percentile_bin(&rev, *percentile, h.total())?;
            let a = (lo + lo_bin as f32 * w).max(min);
            let b = (lo + (hi_bin + 1) as f32 * w).min(max);
            Ok((a.min(b), b.max(a)))
        }
        _ => {
            let a = search_amax(h, method)?;
            Ok(((-a).max(min), a.min(max)))
        }
    }
}

/// First bin at which the cumulative count reaches `p`% of `total`.
fn percentile_bin(counts: &[u64], p: f64, total: u64) -> Result<usize> {
    if !(p > 0.0 && p <= 100.0) {
        return Err(MathError::BadParameter {
            name: "percentile",
            value: p,
            expected: "0 < p <= 100",
        });
    }
    let target = p / 100.0 * total as f64;
    let mut cum = 0u64;
    for (k, &c) in counts.iter().enumerate() {
        cum += c;
        if cum as f64 >= target {
            return Ok(k);
        }
    }
    Ok(counts.len() - 1)
}

fn check_search_params(start_bin: usize, levels: usize, bins: usize) -> Result<()> {
    if levels == 0 {
        return Err(MathError::BadParameter {
            name: "levels",
            value: 0.0,
            expected: ">= 1",
        });
    }
    if start_bin == 0 {
        return Err(MathError::BadParameter {
            name: "start_bin",
            value: 0.0,
            expected: ">= 1",
        });
    }
    if bins == 0 {
        return Err(MathError::BadHistogram("no bins".into()));
    }
    Ok(())
}

/// The counts an entropy search works on, as f64: those compared inside
/// the kept range, and those whose mass is clipped (the same except for
/// [`EntropyVariant::SpikeAware`]), with the zero-spike fix of the modelopt
/// convention applied to both.
fn entropy_counts(counts: &[u64], variant: EntropyVariant) -> (Vec<f64>, Vec<f64>) {
    let mut b: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    if variant != EntropyVariant::Gtc2017 && b.len() > 1 {
        b[0] = b[1];
    }
    let kept = if variant == EntropyVariant::SpikeAware {
        flatten_point_masses(&b)
    } else {
        b.clone()
    };
    (kept, b)
}

/// `b` with every point mass after bin 0 (a bin over [`SPIKE_FACTOR`] times
/// the median of the 9 bins centred on it, windows cut at the ends, and
/// over one count) replaced by that median.
pub fn flatten_point_masses(b: &[f64]) -> Vec<f64> {
    let mut out = b.to_vec();
    let mut window = Vec::with_capacity(2 * SPIKE_RADIUS + 1);
    for j in 1..b.len() {
        let v = b[j];
        // Never a spike: the bound is at least SPIKE_FACTOR.
        if v <= SPIKE_FACTOR {
            continue;
        }
        let lo = j.saturating_sub(SPIKE_RADIUS);
        let hi = (j + SPIKE_RADIUS + 1).min(b.len());
        let near = &b[lo..hi];
        // The median (the middle of the sorted window) is under v / factor
        // exactly when more than half the window is: counted, not sorted,
        // since almost no bin is a spike (sorting every window was 2% of a
        // ResNet-50 `qint8 quantize`).
        let under = near.iter().filter(|&&w| SPIKE_FACTOR * w < v).count();
        if under <= near.len() / 2 {
            continue;
        }
        window.clear();
        window.extend_from_slice(near);
        window.sort_by(f64::total_cmp);
        out[j] = window[window.len() / 2];
    }
    out
}

/// [`flatten_point_masses`] as its definition reads: every window sorted
/// for its median. The reference the counting version is tested against.
pub fn flatten_point_masses_reference(b: &[f64]) -> Vec<f64> {
    let mut out = b.to_vec();
    for j in 1..b.len() {
        let lo = j.saturating_sub(SPIKE_RADIUS);
        let hi = (j + SPIKE_RADIUS + 1).min(b.len());
        let mut window = b[lo..hi].to_vec();
        window.sort_by(f64::total_cmp);
        let median = window[window.len() / 2];
        if b[j] > SPIKE_FACTOR * median.max(1.0) {
            out[j] = median;
        }
    }
    out
}

/// Candidate end bins of an entropy search: `start_bin..=bins` (or just
/// `bins` when the histogram is shorter than `start_bin`).
fn entropy_candidates(start_bin: usize, bins: usize) -> std::ops::RangeInclusive<usize> {
    start_bin.min(bins)..=bins
}

/// KL divergence `KL(P || Q)` of one entropy-search candidate, computed
/// directly from the definition (the O(i) reference the fast search
/// re-checks near-minimal candidates with).
///
/// `b` are the counts (after any zero-spike fix), `i` the number of bins kept:
/// `P = b[..i]` with the mass of `b[i..]` added to `P[i-1]`; `Q` merges
/// `b[..i]` into `levels` groups (bin `j` goes to group `j * levels / i`) and
/// spreads each group's sum evenly over its non-empty bins. Returns infinity
/// when `P` has mass where `Q` has none.
pub fn entropy_divergence(b: &[f64], i: usize, levels: usize) -> f64 {
    entropy_divergence_clipped(b, b[i..].iter().sum(), i, levels)
}

/// [`entropy_divergence`] with the clipped mass given separately: `P =
/// kept[..i]` with `outliers` added to `P[i-1]`, `Q` from `kept[..i]`.
pub fn entropy_divergence_clipped(kept: &[f64], outliers: f64, i: usize, levels: usize) -> f64 {
    let b = kept;
    let mut p = b[..i].to_vec();
    p[i - 1] += outliers;
    let mut sums = vec![0.0f64; levels];
    let mut nonempty = vec![0usize; levels];
    for j in 0..i {
        if b[j] != 0.0 {
            sums[j * levels / i] += b[j];
            nonempty[j * levels / i] += 1;
        }
    }
    let mut q = vec![0.0f64; i];
    for j in 0..i {
        if b[j] != 0.0 {
            let g = j * levels / i;
            q[j] = sums[g] / nonempty[g] as f64;
        }
    }
    let ps: f64 = p.iter().sum();
    let qs: f64 = q.iter().sum();
    if qs == 0.0 {
        // Every kept bin is empty: all of P's mass (the outliers) sits where
        // Q has none.
        return f64::INFINITY;
    }
    let mut kl = 0.0;
    for j in 0..i {
        let pj = p[j] / ps;
        if pj > 0.0 {
            let qj = q[j] / qs;
            if qj == 0.0 {
                return f64::INFINITY;
            }
            kl += pj * (pj / qj).ln();
        }
    }
    kl
}

/// Runs the entropy search and returns the chosen number of bins `i`, or
/// `None` when the histogram holds no mass to search (all zero after the
/// zero-spike fix).
///
/// Cost: prefix sums make every candidate O(levels) instead of O(i), so the
/// 1921 candidates of a 2048-bin histogram take about 250k group terms.
/// Candidates whose fast divergence is within a tight tolerance of the
/// minimum are re-evaluated with [`entropy_divergence`], so the result is
/// exactly that of the direct O(bins^2) search, ties included.
pub fn entropy_search(
    counts: &[u64],
    variant: EntropyVariant,
    start_bin: usize,
    levels: usize,
) -> Result<Option<usize>> {
    check_search_params(start_bin, levels, counts.len())?;
    let (b, full) = entropy_counts(counts, variant);
    let n = b.len();
    if b.iter().sum::<f64>() == 0.0 {
        return Ok(None);
    }
    // clipped[k] = mass of full[k..], what a candidate of k bins clips.
    let mut clipped = vec![0.0f64; n + 1];
    for j in (0..n).rev() {
        clipped[j] = clipped[j + 1] + full[j];
    }
    // prefix[k] = sum b[..k], blogb[k] = sum b ln b over b[..k], nz[k] = non-empty bins in b[..k].
    let mut prefix = vec![0.0f64; n + 1];
    let mut blogb = vec![0.0f64; n + 1];
    let mut nz = vec![0usize; n + 1];
    for j in 0..n {
        prefix[j + 1] = prefix[j] + b[j];
        blogb[j + 1] = blogb[j] + if b[j] > 0.0 { b[j] * b[j].ln() } else { 0.0 };
        nz[j + 1] = nz[j] + (b[j] > 0.0) as usize;
    }
    let ln_int = ln_ints(n);
    let ln_int: &[f64] = &ln_int;
    let candidates: Vec<usize> = entropy_candidates(start_bin, n).collect();
    let simd = SimdLevel::active();
    // Candidate i's groups have i / levels bins or one more, so each group
    // term `G ln(max(G, 1) / n_G)` (G its count, n_G its non-empty bins)
    // depends only on the group's first bin and length: one row per
    // length, computed once ([`group_row`]), serves every candidate. Taking
    // a log per group and candidate instead (levels x candidates logs, 246k
    // for 2048 bins) was most of the search.
    let (mut rows, mut rows_q) = (Vec::new(), usize::MAX);
    // Per candidate, what the divergence needs besides its bins' prefix
    // sums: the group terms' sum, and the count and non-empty bins of the
    // group holding bin i-1. The divergences then come from them a chunk
    // of candidates at a time ([`candidate_kl`]).
    let count = candidates.len();
    let (mut cross, mut g_last, mut n_last) =
        (vec![0.0f64; count], vec![0.0; count], vec![1.0; count]);
    let mut ln_n_last = vec![0.0f64; count];
    let shift = levels.is_power_of_two().then(|| levels.trailing_zeros());
    for (k, &i) in candidates.iter().enumerate() {
        if skipped(prefix[i], b[i - 1], clipped[i]) {
            continue;
        }
        let (q, r) = (i / levels, i % levels);
        if q != rows_q {
            // Rows of lengths q and q + 1; ascending candidates reuse the
            // longer one as the next quotient's shorter.
            let short = match rows_q.checked_add(1) == Some(q) {
                true => rows.split_off(n + 1),
                false => group_row(&prefix, &nz, ln_int, q, levels, simd),
            };
            rows = short;
            rows.extend(group_row(&prefix, &nz, ln_int, q + 1, levels, simd));
            rows_q = q;
        }
        // Group m (from 1) ends at ceil(m * i / levels). Bin i-1 lies in
        // the first group that ends at i, group levels * (i - 1) / i + 1
        // (the last one, unless i < levels leaves groups empty).
        let a_last = (levels * (i - 1) / i * i).div_ceil(levels);
        g_last[k] = prefix[i] - prefix[a_last];
        let nl = (nz[i] - nz[a_last]).max(1);
        n_last[k] = nl as f64;
        ln_n_last[k] = ln_int[nl];
        cross[k] = match shift {
            // Power-of-two levels (TensorRT's 128): every group's end from
            // its index alone.
            Some(sh) => cross_pow2(simd, &rows, n + 1, i, q, levels, sh),
            // Otherwise stepped as a quotient and remainder (no integer
            // division per group).
            None => {
                let (mut end_q, mut end_r, mut a) = (0usize, 0usize, 0usize);
                let mut acc = [0.0f64; 4];
                for m in 0..levels {
                    end_q += q;
                    end_r += r;
                    if end_r >= levels {
                        end_q += 1;
                        end_r -= levels;
                    }
                    let e = end_q + usize::from(end_r > 0);
                    acc[m % 4] += rows[a + if e - a > q { n + 1 } else { 0 }];
                    a = e;
                }
                acc.iter().sum::<f64>()
            }
        };
    }
    // Candidates are consecutive bins, so their prefix sums, last bins and
    // clipped masses are slices.
    let first = *candidates.first().unwrap_or(&n);
    let (t_all, last_all) = (&prefix[first..=n], &b[first - 1..n]);
    let (out_all, bln_all) = (&clipped[first..=n], &blogb[first..=n]);
    let mut kls = vec![0.0f64; count];
    for c in (0..count).step_by(KL_CHUNK) {
        let len = KL_CHUNK.min(count - c);
        // Past a histogram's last values with far outliers beyond, whole
        // chunks end on empty bins: nothing to compute.
        if (c..c + len).all(|k| skipped(t_all[k], last_all[k], out_all[k])) {
            kls[c..c + len].fill(f64::INFINITY);
            continue;
        }
        let chunk = |v: &[f64], pad: f64| -> [f64; KL_CHUNK] {
            std::array::from_fn(|k| if k < len { v[c + k] } else { pad })
        };
        let mut kl = [0.0f64; KL_CHUNK];
        candidate_kl::run(
            simd,
            &CandidateTerms {
                t: chunk(t_all, 1.0),
                last: chunk(last_all, 1.0),
                out: chunk(out_all, 0.0),
                bln: chunk(bln_all, 0.0),
                cross: chunk(&cross, 0.0),
                g_last: chunk(&g_last, 1.0),
                n_last: chunk(&n_last, 1.0),
                ln_n_last: chunk(&ln_n_last, 0.0),
            },
            &mut kl,
        );
        kls[c..c + len].copy_from_slice(&kl[..len]);
    }
    let best = kls.iter().copied().fold(f64::INFINITY, f64::min);
    let tol = 1e-9 * best.abs().max(1e-3);
    let pick_last = variant != EntropyVariant::Gtc2017;
    // Re-check near-minimal candidates exactly and apply the tie rule.
    let mut chosen: Option<(usize, f64)> = None;
    for (&i, &f) in candidates.iter().zip(&kls) {
        if f.is_nan() || f > best + tol {
            continue;
        }
        let exact = entropy_divergence_clipped(&b, clipped[i], i, levels);
        chosen = match chosen {
            None => Some((i, exact)),
            Some((ci, ce)) => {
                if exact < ce || (exact == ce && pick_last) {
                    Some((i, exact))
                } else {
                    Some((ci, ce))
                }
            }
        };
    }
    Ok(chosen.map(|(i, _)| i))
}

/// Whether a candidate's divergence is infinite without computing it: P
/// has mass where Q has none (clipped mass `out` on an empty last bin, or
/// only clipped mass, `t` the kept one).
#[inline(always)]
fn skipped(t: f64, last: f64, out: f64) -> bool {
    (last == 0.0 && out > 0.0) || t == 0.0
}

/// `ln k` for `k` in `0..=n` (0 for `k = 0`), from a table built once for
/// the usual bin counts.
fn ln_ints(n: usize) -> std::borrow::Cow<'static, [f64]> {
    const CACHED: usize = 1 << 13;
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let ln = |k: usize| if k > 0 { (k as f64).ln() } else { 0.0 };
    if n < CACHED {
        let t = TABLE.get_or_init(|| (0..CACHED).map(ln).collect());
        std::borrow::Cow::Borrowed(&t[..=n])
    } else {
        std::borrow::Cow::Owned((0..=n).map(ln).collect())
    }
}

/// Candidates whose divergences [`candidate_kl`] computes at once.
const KL_CHUNK: usize = 32;

/// What [`candidate_kl`] reads for a chunk of consecutive candidates `i`:
/// the kept mass `prefix[i]`, bin `i - 1`, the clipped mass, `sum b ln b`
/// over the kept bins, the sum of the group terms, and the count,
/// non-empty bins and `ln` of those of the group holding bin `i - 1`.
struct CandidateTerms {
    t: [f64; KL_CHUNK],
    last: [f64; KL_CHUNK],
    out: [f64; KL_CHUNK],
    bln: [f64; KL_CHUNK],
    cross: [f64; KL_CHUNK],
    g_last: [f64; KL_CHUNK],
    n_last: [f64; KL_CHUNK],
    ln_n_last: [f64; KL_CHUNK],
}

// `candidate_kl::run(level, terms, kl)`: the divergence of each candidate
// of a chunk from its prefix sums ([`entropy_search`]), infinity for those
// [`skipped`] names. Counts are whole numbers, so `max(x, 1)` keeps every
// log finite where its factor is 0. Like `group_terms`, one body at every
// level without FMA contraction: the same bits on every CPU.
crate::kernels::kernel!(candidate_kl(c: &CandidateTerms, kl: &mut [f64; KL_CHUNK])
    reference body(c, kl);
{
    for (k, kl) in kl.iter_mut().enumerate() {
        let (t, last, out) = (c.t[k], c.last[k], c.out[k]);
        // P's total: the kept mass and the clipped one.
        let s = t + out;
        // The group terms of sum b ln b telescope; bin i-1, whose share of
        // its group's term is taken out here, is handled separately.
        let acc_bln = c.bln[k] - last * fast_ln(last.max(1.0));
        let acc_cross = c.cross[k] - last * (fast_ln(c.g_last[k].max(1.0)) - c.ln_n_last[k]);
        // Bins j < i-1: (1/S) * [sum b ln b - sum_g B_g (ln S + ln(G_g/n_g) - ln T)].
        let mass_rest = t - last;
        let (ts, ss) = (t.max(1.0), s.max(1.0));
        let rest = (acc_bln - acc_cross - mass_rest * (fast_ln(ss) - fast_ln(ts))) / ss;
        let p_last = last + out;
        let q_last = c.g_last[k] / c.n_last[k];
        // Bin i-1 with the clipped mass: 0 when it holds none.
        let (pp, qq) = if p_last > 0.0 { (p_last / ss, q_last / ts) } else { (1.0, 1.0) };
        let tail = p_last / ss * (fast_ln(pp) - fast_ln(qq.max(f64::MIN_POSITIVE)));
        *kl = if skipped(t, last, out) { f64::INFINITY } else { rest + tail };
    }
});

/// The sum of candidate `i`'s group terms for power-of-two `levels` (`1 <<
/// sh`): group `m` spans bins `end(m)..end(m + 1)`, `end(m) = ceil(m * i /
/// levels)`, and its term is read at its first bin from `rows`, two rows of
/// `stride` entries for groups of `q` bins and of `q + 1`. Group `m` adds
/// to partial sum `m % 8` and the eight are added in order, so the
/// AVX-512 path (eight groups per gather) gives the scalar path's bits.
fn cross_pow2(
    simd: SimdLevel,
    rows: &[f64],
    stride: usize,
    i: usize,
    q: usize,
    levels: usize,
    sh: u32,
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if simd == SimdLevel::Avx512
        && levels >= 8
        && 1usize.checked_shl(sh) == Some(levels)
        && i < stride
        && rows.len() >= 2 * stride
        && i.checked_mul(levels + 8)
            .is_some_and(|v| v < i64::MAX as usize)
    {
        // SAFETY: the level guarantees AVX-512F; the bounds just checked
        // keep every gathered index below `rows.len()` (see the function).
        return unsafe { cross_pow2_avx512(rows, stride, i, q, levels, sh) };
    }
    cross_pow2_reference(rows, stride, i, q, levels, sh)
}

/// [`cross_pow2`] one group at a time: the reference.
fn cross_pow2_reference(
    rows: &[f64],
    stride: usize,
    i: usize,
    q: usize,
    levels: usize,
    sh: u32,
) -> f64 {
    let end = |m: usize| (m * i + levels - 1) >> sh;
    let mut acc = [0.0f64; 8];
    for m in 0..levels {
        let (a, e) = (end(m), end(m + 1));
        // Row 1 (length q + 1) or row 0, at the group's first bin.
        acc[m % 8] += rows[a + if e - a > q { stride } else { 0 }];
    }
    acc.iter().sum()
}

/// [`cross_pow2`] eight groups at a time. Every index is a group's first
/// bin `a <= i - 1 < stride`, plus `stride` at most, so below `2 * stride
/// <= rows.len()`; `m * i` fits an i64 for `m <= levels + 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn cross_pow2_avx512(
    rows: &[f64],
    stride: usize,
    i: usize,
    q: usize,
    levels: usize,
    sh: u32,
) -> f64 {
    use std::arch::x86_64::*;
    let f = |k: usize| (k * i + levels - 1) as i64;
    // end(m) numerators for m = m0..m0+8 and m0+1..m0+9.
    let mut lo = _mm512_set_epi64(f(7), f(6), f(5), f(4), f(3), f(2), f(1), f(0));
    let mut hi = _mm512_add_epi64(lo, _mm512_set1_epi64(i as i64));
    let step = _mm512_set1_epi64((8 * i) as i64);
    let shift = _mm512_set1_epi64(sh as i64);
    let qv = _mm512_set1_epi64(q as i64);
    let sv = _mm512_set1_epi64(stride as i64);
    let mut acc = _mm512_setzero_pd();
    for _ in (0..levels).step_by(8) {
        let a = _mm512_srlv_epi64(lo, shift);
        let e = _mm512_srlv_epi64(hi, shift);
        let long = _mm512_cmpgt_epi64_mask(_mm512_sub_epi64(e, a), qv);
        let at = _mm512_mask_add_epi64(a, long, a, sv);
        // SAFETY: every index is below rows.len() (the function's doc).
        let terms = unsafe { _mm512_i64gather_pd::<8>(at, rows.as_ptr()) };
        acc = _mm512_add_pd(acc, terms);
        lo = _mm512_add_epi64(lo, step);
        hi = _mm512_add_epi64(hi, step);
    }
    let mut out = [0.0f64; 8];
    // SAFETY: `out` holds the eight lanes.
    unsafe { _mm512_storeu_pd(out.as_mut_ptr(), acc) };
    out.iter().sum()
}

/// The group terms `G ln(max(G, 1)) - G ln n_G` of every group of `len`
/// bins, by first bin `a` (`G = prefix[a + len] - prefix[a]`, `n_G` its
/// non-empty bins), for `a` in `0..=bins`: the entropy search's table for
/// one group length (terms of groups no candidate has are 0, and never
/// read). Computed [`GROUP_CHUNK`] groups at a time by
/// [`group_terms`], so every CPU gets the same bits.
fn group_row(
    prefix: &[f64],
    nz: &[usize],
    ln_int: &[f64],
    len: usize,
    levels: usize,
    simd: SimdLevel,
) -> Vec<f64> {
    let size = prefix.len();
    let mut row = vec![0.0f64; size];
    // Groups of `len` bins belong to candidates of fewer than
    // `(len + 1) * levels` bins, so they start before that.
    let fits = size.saturating_sub(len).min((len + 1) * levels);
    let mut sum = [1.0f64; GROUP_CHUNK];
    let mut mass = [0.0f64; GROUP_CHUNK];
    let mut ln_n = [0.0f64; GROUP_CHUNK];
    for (c, out) in row[..fits].chunks_mut(GROUP_CHUNK).enumerate() {
        let first = c * GROUP_CHUNK;
        for (k, a) in (first..first + out.len()).enumerate() {
            let g = prefix[a + len] - prefix[a];
            // Counts are integers: a non-empty group sums to at least 1.
            sum[k] = g.max(1.0);
            mass[k] = g;
            ln_n[k] = ln_int[nz[a + len] - nz[a]];
        }
        // A short last chunk: its unused entries give terms of 0.
        for k in out.len()..GROUP_CHUNK {
            (sum[k], mass[k], ln_n[k]) = (1.0, 0.0, 0.0);
        }
        let mut terms = [0.0f64; GROUP_CHUNK];
        group_terms::run(simd, &sum, &mass, &ln_n, &mut terms);
        out.copy_from_slice(&terms[..out.len()]);
    }
    row
}

/// Groups whose log terms `group_terms` computes at once.
const GROUP_CHUNK: usize = 64;

// `group_terms::run(level, sum, mass, ln_n, out)`: `out[k] = mass[k] *
// (ln(sum[k]) - ln_n[k])`, the entropy search's per-group term, for one
// chunk of groups: the search's hottest loop. The terms are independent,
// so the loop vectorizes; `kernel!` compiles it for AVX2 and AVX-512 as well
// and picks one at run time. Every level, the reference included, runs the
// same body without FMA contraction, so the search does not depend on the
// CPU (the test compares the body with libm's ln).
crate::kernels::kernel!(group_terms(
    sum: &[f64; GROUP_CHUNK],
    mass: &[f64; GROUP_CHUNK],
    ln_n: &[f64; GROUP_CHUNK],
    out: &mut [f64; GROUP_CHUNK]
)
    reference body(sum, mass, ln_n, out);
{
    for k in 0..GROUP_CHUNK {
        out[k] = mass[k] * (fast_ln(sum[k]) - ln_n[k]);
    }
});

/// Natural log of a positive, finite, normal f64, accurate to a few ulp and
/// branch-free so loops over it vectorize (the libm call does not).
#[inline(always)]
fn fast_ln(x: f64) -> f64 {
    // ln 2 split so that e * LN2_HI is exact (fdlibm's constants).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    let bits = x.to_bits();
    // Normalize the mantissa into [sqrt(1/2), sqrt(2)).
    let shifted = bits.wrapping_sub(0x3fe6_a09e_667f_3bcd);
    let e = (shifted as i64 >> 52) as f64;
    let m = f64::from_bits((shifted & 0x000f_ffff_ffff_ffff).wrapping_add(0x3fe6_a09e_667f_3bcd));
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    // ln(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), |s| < 0.172.
    let poly = 1.0 / 3.0
        + z * (1.0 / 5.0
            + z * (1.0 / 7.0
                + z * (1.0 / 9.0
                    + z * (1.0 / 11.0
                        + z * (1.0 / 13.0
                            + z * (1.0 / 15.0
                                + z * (1.0 / 17.0 + z * (1.0 / 19.0 + z / 21.0))))))));
    let ln_m = 2.0 * s + 2.0 * s * z * poly;
    e * LN2_HI + (ln_m + e * LN2_LO)
}

/// MSE search over bin centres: for each candidate bin `i >= start_bin`,
/// `amax = centre(i)` and the error is `sum_j counts[j] * (fq(centre(j)) - centre(j))^2`
/// with int8 symmetric fake quantization at that `amax`. Returns the best `i`
/// (first of ties). Bin width is factored out: centres are `j + 0.5`.
pub fn mse_search(counts: &[u64], start_bin: usize) -> Result<usize> {
    check_search_params(start_bin, 1, counts.len())?;
    let n = counts.len();
    let c: Vec<f64> = counts.iter().map(|&k| k as f64).collect();
    // Prefix sums of c, c*x and c*x^2 over bin centres x = j + 0.5: the
    // error of every clipped bin is (x - qmax_value)^2, summed in O(1).
    let mut s0 = vec![0.0f64; n + 1];
    let mut s1 = vec![0.0f64; n + 1];
    let mut s2 = vec![0.0f64; n + 1];
    for j in 0..n {
        let x = j as f64 + 0.5;
        s0[j + 1] = s0[j] + c[j];
        s1[j + 1] = s1[j] + c[j] * x;
        s2[j + 1] = s2[j] + c[j] * x * x;
    }
    let tails = Tails { s0, s1, s2 };
    let first = start_bin.min(n - 1);
    let errs: Vec<f64> = (first..n)
        .into_par_iter()
        .map(|i| mse_candidate(&c, &tails, i))
        .collect();
    let mut best = (first, f64::INFINITY);
    for (k, &e) in errs.iter().enumerate() {
        if e < best.1 {
            best = (first + k, e);
        }
    }
    Ok(best.0)
}

struct Tails {
    s0: Vec<f64>,
    s1: Vec<f64>,
    s2: Vec<f64>,
}

/// Expected squared error (in units of bin width squared) of quantizing the
/// histogram with `amax` at the centre of bin `i`.
fn mse_candidate(c: &[f64], t: &Tails, i: usize) -> f64 {
    let n = c.len();
    let amax = i as f64 + 0.5;
    let scale = amax / 127.0;
    // Bins whose centre rounds to 127 or beyond saturate at amax.
    let clip_from = ((127.5 * scale - 0.5).ceil().max(0.0) as usize).min(n);
    let mut err = 0.0;
    mse_rounding::run(SimdLevel::active(), &c[..clip_from], scale, &mut err);
    // sum c (x - amax)^2 = S2 - 2 amax S1 + amax^2 S0 over the clipped bins.
    let (k0, k1, k2) = (
        t.s0[n] - t.s0[clip_from],
        t.s1[n] - t.s1[clip_from],
        t.s2[n] - t.s2[clip_from],
    );
    err + (k2 - 2.0 * amax * k1 + amax * amax * k0).max(0.0)
}

/// Lanes of [`mse_rounding`]'s partial sums.
const MSE_LANES: usize = 8;

// `mse_rounding::run(level, c, scale, err)`: `err = sum c[j] (q(x) - x)^2`
// over bin centres `x = j + 0.5`, `q` the int8 fake quantization with step
// `scale` (no bin here saturates): the part of an MSE candidate that grows
// with its bins. Eight partial sums, added in order at the end, so the
// loop vectorizes (one chain of dependent adds kept it scalar) and every
// level gives the same bits; the division stays a division.
crate::kernels::kernel!(mse_rounding(c: &[f64], scale: f64, err: &mut f64)
    reference body(c, scale, err);
{
    // 1.5 * 2^52: adding and subtracting it rounds half to even (|v| <= 128 here).
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let term = |cnt: f64, x: f64| {
        let v = (x / scale).min(127.0);
        let q = ((v + MAGIC) - MAGIC) * scale;
        cnt * (q - x) * (q - x)
    };
    let mut acc = [0.0f64; MSE_LANES];
    let (chunks, tail) = c.as_chunks::<MSE_LANES>();
    let mut base = 0.5f64;
    for ch in chunks {
        for (l, (a, &cnt)) in acc.iter_mut().zip(ch).enumerate() {
            *a += term(cnt, base + l as f64);
        }
        base += MSE_LANES as f64;
    }
    let mut rest = 0.0;
    for (l, &cnt) in tail.iter().enumerate() {
        rest += term(cnt, base + l as f64);
    }
    *err = acc.iter().sum::<f64>() + rest;
});

/// The MSE search computed directly: every bin of every candidate through
/// fake quantization. Reference for [`mse_search`].
pub fn mse_search_reference(counts: &[u64], start_bin: usize) -> Result<usize> {
    check_search_params(start_bin, 1, counts.len())?;
    let n = counts.len();
    let first = start_bin.min(n - 1);
    let mut best = (first, f64::INFINITY);
    for i in first..n {
        let scale = (i as f64 + 0.5) / 127.0;
        let mut err = 0.0;
        for (j, &cnt) in counts.iter().enumerate() {
            let x = j as f64 + 0.5;
            let q = (x / scale).round_ties_even().min(127.0) * scale;
            err += cnt as f64 * (q - x) * (q - x);
        }
        if err < best.1 {
            best = (i, err);
        }
    }
    Ok(best.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_ln_is_accurate() {
        for &x in &[
            1.0,
            2.0,
            3.0,
            0.5,
            1e-300,
            1e300,
            12345.678,
            std::f64::consts::SQRT_2,
            std::f64::consts::FRAC_1_SQRT_2 - 1e-9,
        ] {
            let a = fast_ln(x);
            let b = x.ln();
            assert!(
                (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1.0),
                "{x}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn group_terms_are_the_same_bits_at_every_simd_level() {
        // Group sums are integers >= 1 (counts), masses up to the sum,
        // ln_n the log of the group's non-empty bins.
        let mut sum = [1.0f64; GROUP_CHUNK];
        let mut mass = [0.0f64; GROUP_CHUNK];
        let mut ln_n = [0.0f64; GROUP_CHUNK];
        for k in 0..GROUP_CHUNK {
            sum[k] = (1 + k * k * 7919 % 1_000_003) as f64;
            mass[k] = sum[k] * ((k % 5) as f64 / 4.0);
            ln_n[k] = ((1 + k % 16) as f64).ln();
        }
        let mut want = [0.0f64; GROUP_CHUNK];
        group_terms::run(SimdLevel::Portable, &sum, &mass, &ln_n, &mut want);
        for k in 0..GROUP_CHUNK {
            let libm = mass[k] * (sum[k].ln() - ln_n[k]);
            assert!((want[k] - libm).abs() <= 1e-13 * libm.abs().max(1.0), "{k}");
        }
        for level in [SimdLevel::Reference, SimdLevel::Avx2, SimdLevel::Avx512] {
            if level > SimdLevel::detected() {
                continue;
            }
            let mut got = [0.0f64; GROUP_CHUNK];
            group_terms::run(level, &sum, &mass, &ln_n, &mut got);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{level:?}");
        }
    }

    #[test]
    fn group_sums_are_the_same_bits_at_every_simd_level() {
        // Two rows of terms of mixed signs and sizes, for every candidate of
        // a 2048-bin search (and a shorter one) at several level counts.
        for (bins, levels) in [(2048usize, 128usize), (300, 8), (64, 16)] {
            let stride = bins + 1;
            let rows: Vec<f64> = (0..2 * stride)
                .map(|k| ((k * 7919 % 10007) as f64 - 5000.0) * 1.37e3 / (1 + k % 13) as f64)
                .collect();
            let sh = levels.trailing_zeros();
            for i in 1..=bins {
                let q = i / levels;
                let want = cross_pow2_reference(&rows, stride, i, q, levels, sh);
                for level in SimdLevel::available() {
                    let got = cross_pow2(level, &rows, stride, i, q, levels, sh);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{bins} {levels} {i} {level:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn candidate_divergences_are_the_same_bits_at_every_simd_level() {
        // Counts-like inputs: whole numbers, some bins empty, some candidates
        // skipped (an empty last bin with clipped mass).
        let f = |k: usize, m: usize, lo: usize| (lo + k * k * 7919 % m) as f64;
        let terms = CandidateTerms {
            t: std::array::from_fn(|k| f(k, 1_000_003, 1) * 50.0),
            last: std::array::from_fn(|k| if k % 7 == 3 { 0.0 } else { f(k, 997, 1) }),
            out: std::array::from_fn(|k| if k % 5 == 0 { 0.0 } else { f(k, 101, 0) }),
            bln: std::array::from_fn(|k| f(k, 1_000_003, 1) * 40.0),
            cross: std::array::from_fn(|k| f(k, 1_000_003, 1) * 39.0),
            g_last: std::array::from_fn(|k| f(k, 997, 1) + f(k, 31, 0)),
            n_last: std::array::from_fn(|k| (1 + k % 9) as f64),
            ln_n_last: std::array::from_fn(|k| ((1 + k % 9) as f64).ln()),
        };
        let mut want = [0.0f64; KL_CHUNK];
        candidate_kl::run(SimdLevel::Reference, &terms, &mut want);
        for (k, &w) in want.iter().enumerate() {
            let (t, last, out) = (terms.t[k], terms.last[k], terms.out[k]);
            if skipped(t, last, out) {
                assert_eq!(w, f64::INFINITY, "{k}");
                continue;
            }
            // The same formula through libm's logs.
            let s = t + out;
            let bln = terms.bln[k] - if last > 0.0 { last * last.ln() } else { 0.0 };
            let cross = terms.cross[k] - last * (terms.g_last[k].ln() - terms.ln_n_last[k]);
            let mut kl = (bln - cross - (t - last) * (s.ln() - t.ln())) / s;
            let p = last + out;
            if p > 0.0 {
                kl += p / s * ((p / s).ln() - (terms.g_last[k] / terms.n_last[k] / t).ln());
            }
            assert!(
                (w - kl).abs() <= 1e-12 * kl.abs().max(1.0),
                "{k}: {w} vs {kl}"
            );
        }
        for level in SimdLevel::available() {
            let mut got = [0.0f64; KL_CHUNK];
            candidate_kl::run(level, &terms, &mut got);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{level:?}");
        }
    }

    #[test]
    fn mse_rounding_is_the_same_bits_at_every_simd_level() {
        for len in [0usize, 1, 7, 8, 9, 300, 2047] {
            let c: Vec<f64> = (0..len).map(|j| ((j * 7919) % 1013) as f64).collect();
            for scale in [0.3f64, 1.0, 2.5, 16.1] {
                let mut want = 0.0;
                mse_rounding::run(SimdLevel::Reference, &c, scale, &mut want);
                // Against the definition, summed one bin at a time.
                let direct: f64 = c
                    .iter()
                    .enumerate()
                    .map(|(j, &n)| {
                        let x = j as f64 + 0.5;
                        let q = (x / scale).round_ties_even().min(127.0) * scale;
                        n * (q - x) * (q - x)
                    })
                    .sum();
                assert!(
                    (want - direct).abs() <= 1e-9 * direct.max(1.0),
                    "{len} {scale}"
                );
                for level in SimdLevel::available() {
                    let mut got = 0.0;
                    mse_rounding::run(level, &c, scale, &mut got);
                    assert_eq!(got.to_bits(), want.to_bits(), "{len} {scale} {level:?}");
                }
            }
        }
    }

    fn hist_of(values: &[f32], bins: usize, amax: f32) -> Histogram {
        let mut h = Histogram::fixed_abs(bins, amax).unwrap();
        h.add(values).unwrap();
        h
    }

    #[test]
    fn max_and_percentile() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32 / 100.0).collect(); // 0 .. 9.99
        let h = hist_of(&v, 100, 10.0);
        assert_eq!(search_amax(&h, &RangeMethod::Max).unwrap(), 9.99);
        // 90% of 1000 = 900 values: bins of width 0.1 hold 10 each -> bin 89, upper edge 9.0.
        let p = search_amax(&h, &RangeMethod::percentile(90.0)).unwrap();
        assert!((p - 9.0).abs() < 1e-5, "{p}");
        assert!(search_amax(&h, &RangeMethod::percentile(0.0)).is_err());
        assert!(search_amax(&h, &RangeMethod::percentile(100.5)).is_err());
        let empty = Histogram::fixed_abs(100, 1.0).unwrap();
        assert_eq!(
            search_amax(&empty, &RangeMethod::Max),
            Err(MathError::EmptyHistogram)
        );
    }

    #[test]
    fn signed_percentile_clips_both_tails() {
        // Values away from bin edges: exactly 10 in each bin of width 0.1.
        let v: Vec<f32> = (-500..500).map(|i| (i as f32 + 0.5) / 100.0).collect();
        let mut h = Histogram::fixed_signed(100, -5.0, 5.0).unwrap();
        h.add(&v).unwrap();
        let (lo, hi) = search_min_max(&h, &RangeMethod::percentile(99.0)).unwrap();
        assert!(
            (lo + 4.9).abs() < 1e-4 && (hi - 4.9).abs() < 1e-4,
            "{lo} {hi}"
        );
        assert_eq!(
            search_min_max(&h, &RangeMethod::Max).unwrap(),
            (-4.995, 4.995)
        );
    }

    /// Deterministic pseudo-normal samples (no rand dependency in the library).
    fn normals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (next().max(1e-300), next());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn entropy_on_relu_data_depends_on_the_zero_spike_fix() {
        // ReLU(N(0,1)) plus a few large outliers: max 20.
        let mut v: Vec<f32> = normals(200_000, 7)
            .into_iter()
            .map(|x| x.max(0.0))
            .collect();
        v.extend([20.0, 18.0, 15.0, 12.0]);
        let h = hist_of(&v, 2048, 20.0);
        let m = search_amax(&h, &RangeMethod::entropy()).unwrap();
        let g = search_amax(
            &h,
            &RangeMethod::Entropy {
                variant: EntropyVariant::Gtc2017,
                start_bin: 128,
                levels: 128,
            },
        )
        .unwrap();
        // The literal slide algorithm clips at the smallest candidates; the
        // modelopt convention keeps a useful range (facts file: ~1.3 vs ~11 of 20.6).
        assert!(g < 2.0, "gtc {g}");
        assert!(m > 3.0 && m <= 20.0, "modelopt {m}");
    }

    /// A constant background mapped through a layer puts a point mass far
    /// from zero. The modelopt form clips below it (the spike is cheaper as
    /// clipped mass in the last bin than smeared over a merged group); the
    /// spike-aware form keeps it and equals modelopt on data without one.
    #[test]
    fn spike_aware_entropy_keeps_point_masses() {
        // |N(0, 0.3)| with four backgrounds of 2% each; the maximum is 20.
        let mut v: Vec<f32> = normals(200_000, 11)
            .into_iter()
            .map(|x| (0.3 * x).abs())
            .collect();
        for spike in [1.0f32, 2.5, 4.0, 6.0] {
            v.extend(std::iter::repeat_n(spike, 4_000));
        }
        v.extend([20.0, 17.0, 14.0]);
        let h = hist_of(&v, 2048, 20.0);
        let modelopt = RangeMethod::Entropy {
            variant: EntropyVariant::Modelopt,
            start_bin: 128,
            levels: 128,
        };
        let m = search_amax(&h, &modelopt).unwrap();
        let a = search_amax(&h, &RangeMethod::entropy()).unwrap();
        assert!(m < 6.0, "modelopt {m}");
        assert!((6.0..=20.0).contains(&a), "spike-aware {a}");
        // No spike: both forms agree exactly.
        let smooth: Vec<f32> = normals(100_000, 5).into_iter().map(f32::abs).collect();
        let h = hist_of(&smooth, 2048, 6.0);
        assert_eq!(
            search_amax(&h, &modelopt).unwrap(),
            search_amax(&h, &RangeMethod::entropy()).unwrap()
        );
    }

    #[test]
    fn point_masses_are_flattened_to_their_neighbourhood() {
        let mut b = vec![10.0f64; 32];
        b[0] = 500.0; // bin 0 is left to the zero-spike fix
        b[7] = 81.0; // > 8 x median 10
        b[20] = 80.0; // not > 8 x 10
        let f = flatten_point_masses(&b);
        assert_eq!((f[0], f[7], f[20]), (500.0, 10.0, 80.0));
        // Sparse data: a median of 0 still needs more than 8 counts.
        let mut sparse = vec![0.0f64; 16];
        sparse[5] = 8.0;
        sparse[9] = 9.0;
        let f = flatten_point_masses(&sparse);
        assert_eq!((f[5], f[9]), (8.0, 0.0));
    }

    #[test]
    fn entropy_clips_gaussian_tails() {
        let v = normals(200_000, 3);
        let h = hist_of(&v, 2048, v.iter().fold(0f32, |a, b| a.max(b.abs())));
        let a = search_amax(&h, &RangeMethod::entropy()).unwrap();
        let mx = h.max_abs();
        assert!(a > 2.0 && a < mx, "entropy amax {a}, max {mx}");
        let m = search_amax(&h, &RangeMethod::mse()).unwrap();
        assert!(m > 2.0 && m < mx, "mse amax {m}, max {mx}");
    }

    #[test]
    fn all_zero_histogram_gives_zero() {
        let h = hist_of(&[0.0; 10], 2048, 0.0);
        assert_eq!(search_amax(&h, &RangeMethod::entropy()).unwrap(), 0.0);
        assert_eq!(search_amax(&h, &RangeMethod::mse()).unwrap(), 0.0);
    }

    #[test]
    fn serde_names() {
        let j = serde_json::to_string(&RangeMethod::entropy()).unwrap();
        assert_eq!(
            j,
            r#"{"method":"entropy","variant":"spike_aware","start_bin":128,"levels":128}"#
        );
        let m: RangeMethod =
            serde_json::from_str(r#"{"method":"percentile","percentile":99.99}"#).unwrap();
        assert_eq!(m, RangeMethod::percentile(99.99));
    }
}
