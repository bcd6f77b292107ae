//! Property tests: round-trip error bounds, per-channel consistency, every
//! kernel tier against the scalar reference, histogram merge, and the fast
//! entropy search against a naive O(bins^2) search written here.

use proptest::prelude::*;
use qint8_math::histogram::{reference_abs_counts, Histogram};
use qint8_math::kernels::SimdLevel;
use qint8_math::prelude::*;
use qint8_math::quant::{dequantize_into_with, fake_quant_into_with, quantize_into_with};
use qint8_math::reference;
use qint8_math::search::{
    entropy_search, flatten_point_masses, flatten_point_masses_reference, EntropyVariant,
};

fn dtype() -> impl Strategy<Value = QuantDtype> {
    prop_oneof![Just(QuantDtype::Int8), Just(QuantDtype::Uint8)]
}

/// Values including the awkward ones: exact halves, huge, tiny, non-finite.
fn awkward_value(scale: f32) -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -300.0f32..300.0,
        2 => (-300i32..300).prop_map(move |k| (k as f32 + 0.5) * scale),
        1 => prop::num::f32::ANY,
    ]
}

fn channel(d: QuantDtype, narrow: bool) -> impl Strategy<Value = ChannelParams> {
    let (qmin, qmax) = d.range(narrow);
    (1e-3f32..10.0, qmin..=qmax)
        .prop_map(move |(s, z)| ChannelParams::new(s, z, d, narrow).unwrap())
}

/// A tensor shape of rank 1..=4, a per-channel axis in it, and channel params.
fn per_channel_case() -> impl Strategy<Value = (Vec<usize>, usize, QuantDtype, Vec<ChannelParams>)>
{
    (
        prop::collection::vec(1usize..7, 1..=4),
        dtype(),
        any::<bool>(),
    )
        .prop_flat_map(|(mut shape, d, narrow)| {
            // Sometimes make the inner block long enough for the block kernels.
            let r = shape.len();
            if r > 1 && shape[0] % 2 == 0 {
                shape[r - 1] *= 11;
            }
            let rank = shape.len();
            (Just(shape), 0..rank, Just(d), Just(narrow))
        })
        .prop_flat_map(|(shape, axis, d, narrow)| {
            let c = shape[axis];
            (
                Just(shape),
                Just(axis),
                Just(d),
                prop::collection::vec(channel(d, narrow), c),
            )
        })
}

fn quantize_with(
    level: SimdLevel,
    x: &[f32],
    shape: &[usize],
    p: &QuantParams,
    d: QuantDtype,
) -> Vec<i32> {
    match d {
        QuantDtype::Int8 => {
            let mut q = vec![0i8; x.len()];
            quantize_into_with(level, x, shape, p, &mut q).unwrap();
            q.into_iter().map(i32::from).collect()
        }
        QuantDtype::Uint8 => {
            let mut q = vec![0u8; x.len()];
            quantize_into_with(level, x, shape, p, &mut q).unwrap();
            q.into_iter().map(i32::from).collect()
        }
    }
}

fn dequantize_with(
    level: SimdLevel,
    q: &[i32],
    shape: &[usize],
    p: &QuantParams,
    d: QuantDtype,
) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    match d {
        QuantDtype::Int8 => {
            let q: Vec<i8> = q.iter().map(|&v| v as i8).collect();
            dequantize_into_with(level, &q, shape, p, &mut out).unwrap();
        }
        QuantDtype::Uint8 => {
            let q: Vec<u8> = q.iter().map(|&v| v as u8).collect();
            dequantize_into_with(level, &q, shape, p, &mut out).unwrap();
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Inside the representable range, dequantize(quantize(x)) is within s/2 of x.
    #[test]
    fn roundtrip_within_half_scale(d in dtype(), narrow in any::<bool>(), lo in -100f32..0.0, hi in 0f32..100.0,
                                   xs in prop::collection::vec(0f32..1.0, 1..300)) {
        let p = QuantParams::affine(lo, hi, d, narrow).unwrap();
        let c = p.channels()[0];
        let (rlo, rhi) = c.real_range();
        let x: Vec<f32> = xs.iter().map(|t| rlo + t * (rhi - rlo)).collect();
        let q = quantize_with(SimdLevel::active(), &x, &[x.len()], &p, d);
        let back = dequantize_with(SimdLevel::active(), &q, &[x.len()], &p, d);
        for (a, b) in x.iter().zip(&back) {
            // Half a step, plus f32 rounding of the division and the product.
            prop_assert!((a - b).abs() <= c.scale * 0.5 * (1.0 + 1e-5) + a.abs() * 1e-6, "{a} -> {b}, s = {}", c.scale);
        }
    }

    /// Per-channel quantization equals per-tensor quantization of each slice.
    #[test]
    fn per_channel_equals_per_tensor_per_slice((shape, axis, d, ch) in per_channel_case(), seed in any::<u64>()) {
        let len: usize = shape.iter().product();
        let mut s = seed | 1;
        let x: Vec<f32> = (0..len).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / 65536.0) - 128.0 }).collect();
        let pc = QuantParams::per_channel(ch.clone(), axis).unwrap();
        let q = quantize_with(SimdLevel::active(), &x, &shape, &pc, d);
        let inner: usize = shape[axis + 1..].iter().product();
        for (i, (&v, &qv)) in x.iter().zip(&q).enumerate() {
            let c = (i / inner) % shape[axis];
            let pt = QuantParams::per_tensor(ch[c]);
            let single = quantize_with(SimdLevel::Reference, &[v], &[1], &pt, d);
            prop_assert_eq!(qv, single[0], "element {} channel {}", i, c);
        }
    }

    /// Every kernel tier is bit-identical to the scalar reference, for
    /// quantize, dequantize and fake-quant, per-tensor and per-channel.
    #[test]
    fn every_tier_matches_reference((shape, axis, d, ch) in per_channel_case(), per_tensor in any::<bool>(),
                                    raw in prop::collection::vec(awkward_value(0.37), 1..2000)) {
        let len: usize = shape.iter().product();
        let x: Vec<f32> = (0..len).map(|i| raw[i % raw.len()]).collect();
        let p = if per_tensor { QuantParams::per_tensor(ch[0]) } else { QuantParams::per_channel(ch, axis).unwrap() };
        let q_ref = quantize_with(SimdLevel::Reference, &x, &shape, &p, d);
        let d_ref = dequantize_with(SimdLevel::Reference, &q_ref, &shape, &p, d);
        let mut f_ref = vec![0f32; len];
        fake_quant_into_with(SimdLevel::Reference, &x, &shape, &p, &mut f_ref).unwrap();
        // The fused fake-quant equals the two-step reference bit for bit.
        prop_assert_eq!(f_ref.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d_ref.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        for level in SimdLevel::available() {
            prop_assert_eq!(&quantize_with(level, &x, &shape, &p, d), &q_ref, "quantize {:?}", level);
            let dq = dequantize_with(level, &q_ref, &shape, &p, d);
            prop_assert_eq!(dq.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d_ref.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "dequantize {:?}", level);
            let mut f = vec![0f32; len];
            fake_quant_into_with(level, &x, &shape, &p, &mut f).unwrap();
            prop_assert_eq!(f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), f_ref.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "fake_quant {:?}", level);
        }
    }

    /// Histogram binning matches the straightforward reference.
    #[test]
    fn histogram_bins_match_reference(x in prop::collection::vec(-50f32..50.0, 1..3000), bins in 1usize..300, amax in 0.5f32..60.0) {
        let bins = bins * 2;
        let mut h = Histogram::fixed_abs(bins, amax).unwrap();
        h.add(&x).unwrap();
        let r = reference_abs_counts(&x, bins, amax);
        // Products and quotients may differ by one ulp exactly on an edge;
        // compare with a one-bin tolerance on counts moved.
        let moved: u64 = h.counts().iter().zip(&r).map(|(a, b)| a.abs_diff(*b)).sum();
        let on_edges = x.iter().filter(|v| { let t = v.abs() / (amax / bins as f32); (t - t.round()).abs() < 1e-4 }).count() as u64;
        prop_assert!(moved <= 2 * on_edges, "moved {} on_edges {}", moved, on_edges);
        prop_assert_eq!(h.total(), x.len() as u64);
    }

    /// Post-ReLU-like data (runs of zeros between values at bin centres, so
    /// no value lies near an edge) bins exactly as the reference, on both
    /// sides of the sub-histograms' threshold (4 x 2048 values).
    #[test]
    fn histogram_of_mostly_zeros_matches_reference(bins in prop::collection::vec(prop::option::weighted(0.4, 0usize..2048), 1..20000), negative in any::<bool>()) {
        let amax = 3.0f32;
        let w = amax / 2048.0;
        let sign = if negative { -1.0 } else { 1.0 };
        let x: Vec<f32> = bins.iter().map(|b| b.map_or(0.0, |k| sign * (k as f32 + 0.5) * w)).collect();
        let mut h = Histogram::fixed_abs(2048, amax).unwrap();
        h.add(&x).unwrap();
        prop_assert_eq!(h.counts(), &reference_abs_counts(&x, 2048, amax)[..]);
    }

    /// Point masses are found and flattened exactly as by sorting every
    /// window: sparse, spiky counts of every kind.
    #[test]
    fn flattened_point_masses_match_reference(b in prop::collection::vec(prop_oneof![Just(0u32), 0u32..4, 0u32..40, 0u32..2000], 0..300)) {
        let b: Vec<f64> = b.iter().map(|&c| c as f64).collect();
        prop_assert_eq!(flatten_point_masses(&b), flatten_point_masses_reference(&b));
    }

    /// Merging histograms equals the histogram of the concatenated data
    /// (dynamic abs and signed, and fixed ranges).
    #[test]
    fn histogram_merge_equals_concatenation(a in prop::collection::vec(-1e3f32..1e3, 0..500),
                                            b in prop::collection::vec(-10f32..10.0, 0..500),
                                            scale_b in 1e-3f32..1e3, signed in any::<bool>()) {
        let b: Vec<f32> = b.iter().map(|v| v * scale_b).collect();
        let make = || if signed { Histogram::dynamic_signed(64).unwrap() } else { Histogram::dynamic_abs(64).unwrap() };
        let (mut ha, mut hb, mut hab) = (make(), make(), make());
        ha.add(&a).unwrap();
        hb.add(&b).unwrap();
        let ab: Vec<f32> = a.iter().chain(&b).copied().collect();
        hab.add(&ab).unwrap();
        let mut m = ha.clone();
        m.merge(&hb).unwrap();
        prop_assert_eq!(m.counts(), hab.counts());
        prop_assert_eq!(m.range(), hab.range());
        prop_assert_eq!(m.total(), hab.total());
        // Adding in two batches equals adding at once.
        let mut two = make();
        two.add(&a).unwrap();
        two.add(&b).unwrap();
        prop_assert_eq!(two.counts(), hab.counts());
        // Fixed ranges.
        let mut fa = Histogram::fixed_abs(64, 500.0).unwrap();
        let mut fb = fa.clone();
        let mut fab = fa.clone();
        fa.add(&a).unwrap();
        fb.add(&b).unwrap();
        fab.add(&ab).unwrap();
        fa.merge(&fb).unwrap();
        prop_assert_eq!(fa.counts(), fab.counts());
        prop_assert_eq!(fa.clipped(), fab.clipped());
    }

    /// The fast entropy search picks exactly what a naive O(bins^2) search picks.
    #[test]
    fn entropy_search_equals_naive(counts in histogram_counts(), which in 0u8..3, start in prop_oneof![Just(128usize), 8usize..64], fewer_bins in any::<bool>()) {
        let variant = [EntropyVariant::Gtc2017, EntropyVariant::Modelopt, EntropyVariant::SpikeAware][which as usize];
        // Candidates from `start` bins, some of them (with `fewer_bins`)
        // below 128 levels: groups of 0 or 1 bins.
        let levels = if start < 128 && !fewer_bins { start } else { 128 };
        let fast = entropy_search(&counts, variant, start, levels).unwrap();
        let naive = naive_entropy(&counts, variant, start, levels);
        prop_assert_eq!(fast, naive);
    }
}

/// Histograms with the shapes calibration sees: smooth, spiky, sparse, with
/// a zero spike and with far outliers.
fn histogram_counts() -> impl Strategy<Value = Vec<u64>> {
    (
        prop_oneof![Just(256usize), Just(512), Just(2048)],
        0u32..4,
        any::<u64>(),
        0u64..100_000,
    )
        .prop_map(|(n, shape, seed, spike)| {
            let mut s = seed | 1;
            let mut rnd = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let decay = 1.0 + (rnd() % 64) as f64;
            let mut c: Vec<u64> = (0..n)
                .map(|j| {
                    let base = 10_000.0 * (-(j as f64) / (n as f64 / decay)).exp();
                    match shape {
                        0 => base as u64,
                        1 => (base * (rnd() % 100) as f64 / 50.0) as u64,
                        2 => {
                            if rnd() % 4 == 0 {
                                (base as u64).max(1)
                            } else {
                                0
                            }
                        }
                        _ => rnd() % 3,
                    }
                })
                .collect();
            c[0] += spike;
            let k = (rnd() as usize) % n;
            c[k] += 1 + rnd() % 5;
            c
        })
}

/// The entropy search straight from its description (facts file, section 2):
/// for every candidate i, build P and Q over i bins, normalize, KL(P||Q).
fn naive_entropy(
    counts: &[u64],
    variant: EntropyVariant,
    start: usize,
    levels: usize,
) -> Option<usize> {
    let mut full: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    if variant != EntropyVariant::Gtc2017 {
        full[0] = full[1];
    }
    // Spike-aware: inside the kept range a bin over 8x the median of its
    // 9-bin window (and over 1) counts as that median; clipped, in full.
    let b: Vec<f64> = if variant == EntropyVariant::SpikeAware {
        (0..full.len())
            .map(|j| {
                let mut w: Vec<f64> = full[j.saturating_sub(4)..(j + 5).min(full.len())].to_vec();
                w.sort_by(|x, y| x.partial_cmp(y).unwrap());
                let med = w[w.len() / 2];
                if j > 0 && full[j] > 8.0 * med.max(1.0) {
                    med
                } else {
                    full[j]
                }
            })
            .collect()
    } else {
        full.clone()
    };
    if b.iter().sum::<f64>() == 0.0 {
        return None;
    }
    let n = b.len();
    let mut best: Option<(usize, f64)> = None;
    for i in start.min(n)..=n {
        let mut p: Vec<f64> = b[..i].to_vec();
        p[i - 1] += full[i..].iter().sum::<f64>();
        let mut sums = vec![0.0; levels];
        let mut counts = vec![0usize; levels];
        for j in 0..i {
            if b[j] != 0.0 {
                sums[j * levels / i] += b[j];
                counts[j * levels / i] += 1;
            }
        }
        let q: Vec<f64> = (0..i)
            .map(|j| {
                if b[j] != 0.0 {
                    sums[j * levels / i] / counts[j * levels / i] as f64
                } else {
                    0.0
                }
            })
            .collect();
        let ps: f64 = p.iter().sum();
        let qs: f64 = q.iter().sum();
        // No mass kept at all: P's outliers sit where Q is empty.
        let mut kl = if qs == 0.0 { f64::INFINITY } else { 0.0 };
        for j in 0..i {
            if qs == 0.0 {
                break;
            }
            let pj = p[j] / ps;
            if pj > 0.0 {
                let qj = q[j] / qs;
                if qj == 0.0 {
                    kl = f64::INFINITY;
                    break;
                }
                kl += pj * (pj / qj).ln();
            }
        }
        let better = match best {
            None => true,
            Some((_, e)) => kl < e || (kl == e && variant != EntropyVariant::Gtc2017),
        };
        if better {
            best = Some((i, kl));
        }
    }
    best.map(|(i, _)| i)
}

#[test]
fn reference_quantize_value_by_hand() {
    let p = ChannelParams::new(0.1, 3, QuantDtype::Uint8, false).unwrap();
    assert_eq!(reference::quantize_value(0.25, &p), 5); // 2.5 -> 2, + 3
    assert_eq!(reference::quantize_value(-1.0, &p), 0);
    assert_eq!(reference::dequantize_value(5, &p), 0.2);
}

/// Squared error of int8 fake quantization of the bin centres at the centre of bin `i`.
fn naive_mse(counts: &[u64], i: usize) -> f64 {
    let scale = (i as f64 + 0.5) / 127.0;
    counts
        .iter()
        .enumerate()
        .map(|(j, &c)| {
            let x = j as f64 + 0.5;
            let q = (x / scale).round_ties_even().min(127.0) * scale;
            c as f64 * (q - x) * (q - x)
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// The prefix-sum MSE search finds a candidate as good as the direct search.
    #[test]
    fn mse_search_equals_direct(counts in histogram_counts()) {
        let fast = qint8_math::search::mse_search(&counts, 128).unwrap();
        let direct = qint8_math::search::mse_search_reference(&counts, 128).unwrap();
        let (ef, ed) = (naive_mse(&counts, fast), naive_mse(&counts, direct));
        prop_assert!(ef <= ed * (1.0 + 1e-9) + 1e-12, "fast {} ({}) vs direct {} ({})", fast, ef, direct, ed);
    }
}
