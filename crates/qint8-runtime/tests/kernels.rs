//! Fast kernels against their straightforward references.

use proptest::prelude::*;
use qint8_runtime::kernels::conv::{Conv2d, ConvGeom};
use qint8_runtime::kernels::gemm::{sgemm, sgemm_reference, Mat};
use qint8_runtime::kernels::winograd::Kernels;
use qint8_runtime::kernels::Activation;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn close(a: &[f32], b: &[f32], k: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len());
    // Accumulation order differs: allow f32 rounding growing with the reduction length.
    let tol = 1e-5 * (k as f32).sqrt().max(1.0) * 4.0;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        prop_assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "index {}: {} vs {}",
            i,
            x,
            y
        );
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct ConvCase {
    n: usize,
    cin_g: usize,
    cout_g: usize,
    group: usize,
    hw: (usize, usize),
    k: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    pad: (usize, usize, usize, usize),
    act: u8,
    seed: u64,
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        1usize..4,
        1usize..5,
        1usize..5,
        prop_oneof![Just(1usize), Just(2), Just(3)],
        (1usize..20, 1usize..20),
        (1usize..4, 1usize..4),
        (1usize..3, 1usize..3),
        (1usize..3, 1usize..3),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        0u8..3,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(n, cin_g, cout_g, group, hw, k, stride, dilation, pad, act, seed, depthwise)| {
                let (cin_g, cout_g) = if depthwise { (1, 1) } else { (cin_g, cout_g) };
                let group = if depthwise { group + 2 } else { group };
                ConvCase {
                    n,
                    cin_g,
                    cout_g,
                    group,
                    hw,
                    k,
                    stride,
                    dilation,
                    pad,
                    act,
                    seed,
                }
            },
        )
        .prop_filter("kernel fits", |c| {
            c.hw.0 + c.pad.0 + c.pad.2 > c.dilation.0 * (c.k.0 - 1)
                && c.hw.1 + c.pad.1 + c.pad.3 > c.dilation.1 * (c.k.1 - 1)
        })
}

fn build(c: &ConvCase) -> Conv2d {
    unpacked(c).pack()
}

fn unpacked(c: &ConvCase) -> Conv2d {
    let (cin, cout) = (c.cin_g * c.group, c.cout_g * c.group);
    let oh = (c.hw.0 + c.pad.0 + c.pad.2 - c.dilation.0 * (c.k.0 - 1) - 1) / c.stride.0 + 1;
    let ow = (c.hw.1 + c.pad.1 + c.pad.3 - c.dilation.1 * (c.k.1 - 1) - 1) / c.stride.1 + 1;
    Conv2d {
        geom: ConvGeom {
            n: c.n,
            cin,
            ih: c.hw.0,
            iw: c.hw.1,
            cout,
            group: c.group,
            kh: c.k.0,
            kw: c.k.1,
            stride: c.stride,
            dilation: c.dilation,
            pad: (c.pad.0, c.pad.1),
            oh,
            ow,
        },
        weight: std::sync::Arc::new(values(cout * c.cin_g * c.k.0 * c.k.1, c.seed)),
        bias: values(cout, c.seed ^ 77),
        act: [
            Activation::None,
            Activation::Relu,
            Activation::Clip(-0.1, 0.3),
            Activation::Silu,
        ][c.act as usize],
        packed: Vec::new(),
        int8: None,
        winograd: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    /// im2col + GEMM, 1x1, batched and depthwise paths all equal the direct convolution.
    #[test]
    fn conv_matches_reference(c in conv_case()) {
        let conv = build(&c);
        let x = values(conv.n * conv.cin * conv.ih * conv.iw, c.seed ^ 5);
        let len = conv.n * conv.cout * conv.oh * conv.ow;
        let (mut fast, mut slow) = (vec![0.0; len], vec![0.0; len]);
        let mut scratch = vec![0.0; conv.scratch_len()];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| conv.run(&x, &mut fast, &mut scratch, 2));
        conv.reference(&x, &mut slow);
        close(&fast, &slow, conv.cin / conv.group * conv.kh * conv.kw)?;
        // Without the taps that only ever read padding: the same output.
        let trimmed = unpacked(&c).without_dead_taps().pack();
        let mut scratch = vec![0.0; trimmed.scratch_len()];
        pool.install(|| trimmed.run(&x, &mut fast, &mut scratch, 2));
        close(&fast, &slow, conv.cin / conv.group * conv.kh * conv.kw)?;
    }

    /// Stride-1 convolutions whose 16-pixel vectors the kernel reads in
    /// place from the (padded) input and, for several images, writes
    /// straight into the output's planes with the residual and activation:
    /// 2-, 4- and 8-wide maps, 3x3 windows (dilated too) and pointwise
    /// ones, groups, past a 256-row reduction block and with both thread
    /// counts (shared packing).
    #[test]
    fn small_map_windows_match_reference(n in 1usize..6, cin in prop_oneof![1usize..12, 28usize..36], cout in 1usize..20, group in 1usize..3,
                                         map in prop_oneof![Just((4usize, 4usize)), Just((8, 8)), Just((2, 8)), Just((8, 4)), Just((8, 2)), Just((12, 4)), Just((6, 8))],
                                         window in 0u8..4, act in 0u8..4, residual in any::<bool>(), threads in 1usize..3, seed in any::<u64>()) {
        // (kernel, dilation, padding): output maps as `map` where the input is `map`.
        let (k, dilation, pad) = [((3, 3), (1, 1), 1), ((1, 1), (1, 1), 0), ((3, 3), (2, 2), 2), ((3, 1), (1, 1), 1)][window as usize];
        let c = ConvCase {
            n,
            cin_g: cin,
            cout_g: cout,
            group,
            hw: map,
            k,
            stride: (1, 1),
            dilation,
            pad: (pad, if k.1 == 1 { 0 } else { pad }, pad, if k.1 == 1 { 0 } else { pad }),
            act,
            seed,
        };
        let conv = build(&c);
        prop_assert_eq!((conv.oh, conv.ow), map);
        let x = values(conv.n * conv.cin * conv.ih * conv.iw, seed ^ 5);
        let len = conv.n * conv.cout * conv.oh * conv.ow;
        // (A depthwise convolution, one channel per group, fuses none.)
        let res = (residual && conv.can_fuse_residual()).then(|| values(len, seed ^ 11));
        let (mut fast, mut slow) = (vec![0.0; len], vec![0.0; len]);
        let mut scratch = vec![0.0; conv.scratch_len()];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| conv.run_with_residual(&x, res.as_deref(), &mut fast, &mut scratch, threads));
        let mut plain = conv.clone();
        plain.act = Activation::None;
        plain.reference(&x, &mut slow);
        let zeros = vec![0.0; len];
        for (s, r) in slow.iter_mut().zip(res.as_deref().unwrap_or(&zeros)) {
            *s = conv.act.apply(*s + r);
        }
        close(&fast, &slow, cin * conv.kh * conv.kw)?;
    }

    /// The GEMM wrapper (with transposed operands and accumulation) equals the triple loop.
    #[test]
    fn gemm_matches_reference(m in 1usize..40, n in 1usize..40, k in 0usize..70, ta in any::<bool>(), tb in any::<bool>(), acc in any::<bool>(), seed in any::<u64>()) {
        let a = values(m * k, seed);
        let b = values(k * n, seed ^ 3);
        let c0 = values(m * n, seed ^ 9);
        let am = if ta { Mat::transposed(&a, m) } else { Mat::row_major(&a, k) };
        let bm = if tb { Mat::transposed(&b, k) } else { Mat::row_major(&b, n) };
        let (mut fast, mut slow) = (c0.clone(), c0.clone());
        prop_assert!(sgemm(m, n, k, am, bm, &mut fast, n, acc, 2));
        sgemm_reference(m, n, k, am, bm, &mut slow, n, acc);
        close(&fast, &slow, k)?;
    }
}

#[test]
fn gemm_rejects_short_buffers() {
    let a = vec![0.0; 5];
    let mut c = vec![0.0; 4];
    assert!(!sgemm(
        2,
        2,
        3,
        Mat::row_major(&a, 3),
        Mat::row_major(&a, 2),
        &mut c,
        2,
        false,
        1
    ));
}

/// The 1x1-plane pointwise path (squeeze-excitation and classifier convs).
#[test]
fn pointwise_on_single_pixels_matches_reference() {
    // Past 48 images a second, partial column panel; past 256 channels a
    // second block of the reduction.
    let cases = [
        (1, 3, 5, 0u8),
        (7, 16, 4, 1),
        (32, 40, 10, 2),
        (60, 300, 20, 1),
        (50, 257, 9, 0),
    ];
    for (n, cin, cout, act) in cases {
        let c = ConvCase {
            n,
            cin_g: cin,
            cout_g: cout,
            group: 1,
            hw: (1, 1),
            k: (1, 1),
            stride: (1, 1),
            dilation: (1, 1),
            pad: (0, 0, 0, 0),
            act,
            seed: 42 + n as u64,
        };
        let conv = build(&c);
        let x = values(n * cin, 9);
        let (mut fast, mut slow) = (vec![0.0; n * cout], vec![0.0; n * cout]);
        let mut scratch = vec![0.0; conv.scratch_len()];
        conv.run(&x, &mut fast, &mut scratch, 1);
        conv.reference(&x, &mut slow);
        close(&fast, &slow, cin).unwrap();
    }
}

/// Runs `fast` on a deterministic input (seed `seed`, `threads` threads)
/// and checks it against the reference convolution of `full` (the same
/// convolution, or the one `fast` was derived from).
fn matches_reference(fast: &Conv2d, full: &Conv2d, seed: u64, threads: usize) {
    let x = values(full.n * full.cin * full.ih * full.iw, seed);
    let len = full.n * full.cout * full.oh * full.ow;
    let (mut out, mut expect) = (vec![0.0; len], vec![0.0; len]);
    let mut scratch = vec![0.0; fast.scratch_len()];
    fast.run(&x, &mut out, &mut scratch, threads);
    full.reference(&x, &mut expect);
    close(&out, &expect, full.cin / full.group * full.kh * full.kw).unwrap();
}

/// Windows mostly in the padding lose their dead rows and columns: a 3x3
/// on a 1x1 plane becomes its centre tap, a 5x5 with padding 2 on a 2x2
/// plane its middle 3x3; both compute what the whole window computes.
#[test]
fn dead_taps_are_dropped_and_the_output_is_unchanged() {
    for (hw, k, pad, kept, pad_after) in [
        ((1, 1), (3, 3), (1, 1, 1, 1), (1, 1), (0, 0)),
        ((2, 2), (5, 5), (2, 2, 2, 2), (3, 3), (1, 1)),
        ((1, 6), (3, 3), (1, 1, 1, 1), (1, 3), (0, 1)),
        ((6, 6), (3, 3), (1, 1, 1, 1), (3, 3), (1, 1)),
    ] {
        let c = ConvCase {
            n: 3,
            cin_g: 5,
            cout_g: 7,
            group: 1,
            hw,
            k,
            stride: (1, 1),
            dilation: (1, 1),
            pad,
            act: 1,
            seed: 11,
        };
        let full = build(&c);
        let trimmed = unpacked(&c).without_dead_taps().pack();
        assert_eq!((trimmed.kh, trimmed.kw), kept, "{hw:?} {k:?}");
        assert_eq!(trimmed.pad, pad_after, "{hw:?} {k:?}");
        assert_eq!((trimmed.oh, trimmed.ow), (full.oh, full.ow));
        matches_reference(&trimmed, &full, 4, 1);
    }
}

/// Plane size, kernel, stride, padding and activation of a test convolution.
type Geometry = (
    (usize, usize),
    (usize, usize),
    (usize, usize),
    (usize, usize, usize, usize),
    u8,
);

/// A depthwise convolution of `n` images with `group` channels against
/// the reference; returns its output plane size (which path ran).
fn depthwise_matches_reference(
    n: usize,
    group: usize,
    threads: usize,
    geometry: Geometry,
) -> usize {
    let (hw, k, stride, pad, act) = geometry;
    let c = ConvCase {
        n,
        cin_g: 1,
        cout_g: 1,
        group,
        hw,
        k,
        stride,
        dilation: (1, 1),
        pad,
        act,
        seed: 7,
    };
    let conv = build(&c);
    let x = values(conv.n * conv.cin * conv.ih * conv.iw, 3);
    let len = conv.n * conv.cout * conv.oh * conv.ow;
    let (mut fast, mut slow) = (vec![0.0; len], vec![0.0; len]);
    conv.run(&x, &mut fast, &mut [], threads);
    conv.reference(&x, &mut slow);
    close(&fast, &slow, 25).unwrap();
    conv.oh * conv.ow
}

/// Depthwise convolutions on planes large enough for the channels-first path.
#[test]
fn depthwise_large_planes_match_reference() {
    for (hw, k, stride, pad, act) in [
        ((40, 36), (3, 3), (1, 1), (1, 1, 1, 1), 1u8),
        ((70, 66), (5, 5), (2, 2), (2, 2, 2, 2), 2),
        ((66, 40), (3, 3), (2, 1), (0, 1, 1, 0), 0),
    ] {
        assert!(depthwise_matches_reference(2, 6, 1, (hw, k, stride, pad, act)) > 1024);
    }
}

/// Depthwise convolutions on small planes (the channels-last path, whose
/// innermost loop runs over channels) with channel counts that are and are
/// not multiples of a vector's lanes, several images on two workers.
#[test]
fn depthwise_small_planes_with_many_channels_match_reference() {
    for (group, hw, k, stride, pad, act) in [
        (37, (7, 7), (3, 3), (1, 1), (1, 1, 1, 1), 2u8),
        (32, (8, 6), (5, 5), (2, 2), (2, 2, 2, 2), 1),
        (5, (4, 4), (3, 3), (1, 1), (1, 1, 1, 1), 0),
        (48, (2, 2), (3, 3), (1, 1), (1, 1, 1, 1), 2),
        // EfficientNet's late stages at 32x32: 5x5 windows mostly in the
        // padding of 2x2 and 1x1 planes, strided too.
        (33, (2, 2), (5, 5), (1, 1), (2, 2, 2, 2), 1),
        (40, (1, 1), (5, 5), (1, 1), (2, 2, 2, 2), 0),
        (24, (2, 2), (5, 5), (2, 2), (2, 2, 2, 2), 2),
        (17, (3, 2), (5, 3), (2, 1), (2, 1, 0, 1), 0),
    ] {
        assert!(depthwise_matches_reference(3, group, 2, (hw, k, stride, pad, act)) <= 1024);
    }
}

/// Depthwise convolutions on small planes with enough work per image to
/// be cut into runs of channels (one image spread over the threads), rows
/// wide enough for the grouped channels-last kernel, run counts that do
/// and do not divide the channels.
#[test]
fn depthwise_small_planes_in_runs_of_channels_match_reference() {
    for (n, group, hw, k, stride, pad, act) in [
        (1, 72, (24, 24), (5, 5), (1, 1), (2, 2, 2, 2), 3u8),
        (2, 64, (28, 26), (3, 3), (1, 1), (1, 1, 1, 1), 1),
        (1, 50, (30, 30), (5, 5), (2, 2), (2, 2, 2, 2), 2),
        (1, 160, (14, 14), (5, 3), (1, 2), (2, 1, 2, 1), 0),
    ] {
        assert!(depthwise_matches_reference(n, group, 2, (hw, k, stride, pad, act)) <= 1024);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, .. ProptestConfig::default() })]

    /// The packed convolution GEMM (any tier) equals the triple loop plus
    /// bias and activation, across panel and reduction-block edges.
    #[test]
    fn packed_gemm_matches_reference(m in 1usize..40, n in 1usize..80, k in prop_oneof![0usize..40, 250usize..600], tb in any::<bool>(), act in 0u8..4, threads in 1usize..3, seed in any::<u64>()) {
        use qint8_runtime::kernels::packed::{gemm_packed, Epilogue, PackedA};
        let a = std::sync::Arc::new(values(m * k, seed));
        let b = values(k * n, seed ^ 3);
        let bias = values(m, seed ^ 5);
        let act = [Activation::None, Activation::Relu, Activation::Clip(-0.2, 0.4), Activation::Silu][act as usize];
        let bm = if tb { Mat::transposed(&b, k) } else { Mat::row_major(&b, n) };
        let packed = PackedA::new(a.clone(), m, k);
        let mut fast = vec![0.0; m * n];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let epi = Epilogue { bias: &bias, res: None, act };
        let ok = pool.install(|| gemm_packed(&packed, bm, n, &mut fast, n, epi, threads));
        prop_assert!(ok);
        let mut slow = vec![0.0; m * n];
        sgemm_reference(m, n, k, Mat::row_major(&a, k), bm, &mut slow, n, false);
        for (i, v) in slow.iter_mut().enumerate() {
            *v = act.apply(*v + bias[i / n]);
        }
        close(&fast, &slow, k)?;
    }
}

/// Convolutions on large planes (the direct path), with padding,
/// dilation, strides and every activation.
#[test]
fn direct_convolution_matches_reference() {
    // (hw, kernel, stride, dilation, pad, act, cin, cout, group): strided
    // cases run on phase-split input; groups > 1 take the GEMM paths.
    let cases = [
        (
            (30, 29),
            (3, 3),
            (1, 1),
            (1, 1),
            (1, 1, 1, 1),
            1u8,
            3,
            10,
            1,
        ),
        ((33, 40), (5, 5), (1, 1), (1, 1), (2, 2, 2, 2), 2, 5, 17, 1),
        ((24, 50), (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), 0, 4, 8, 1),
        ((20, 70), (1, 3), (1, 1), (1, 1), (0, 1, 0, 1), 1, 2, 24, 1),
        ((64, 71), (7, 7), (2, 2), (1, 1), (3, 3, 3, 3), 1, 3, 9, 1),
        ((61, 57), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 0, 4, 16, 1),
        ((40, 101), (3, 3), (1, 3), (1, 2), (0, 2, 1, 0), 2, 3, 8, 1),
        ((70, 45), (3, 2), (3, 1), (2, 1), (2, 0, 0, 1), 1, 2, 5, 1),
        ((64, 64), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1, 2, 3, 2),
        // Rows of 16, 32 and 64 pixels: tiles of 16-pixel vectors across
        // rows (the last tile short), strided too.
        ((16, 16), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, 8, 16, 1),
        ((33, 32), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 3, 1, 12, 1),
        ((32, 32), (7, 7), (2, 2), (1, 1), (3, 3, 3, 3), 1, 1, 12, 1),
        ((5, 64), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, 4, 9, 1),
    ];
    for (hw, k, stride, dilation, pad, act, cin, cout, group) in cases {
        let c = ConvCase {
            n: 2,
            cin_g: cin,
            cout_g: cout,
            group,
            hw,
            k,
            stride,
            dilation,
            pad,
            act,
            seed: 11,
        };
        let conv = build(&c);
        matches_reference(&conv, &conv, 5, 2);
    }
}

/// A fused residual: `act(conv(x) + bias + res)` on every convolution path
/// (and the same convolutions without it).
#[test]
fn residual_fusion_matches_reference() {
    let cases = [
        ((30, 29), (3, 3), (1, 1), (1, 1, 1, 1), 3, 10), // direct
        ((17, 32), (3, 3), (1, 1), (1, 1, 1, 1), 3, 10), // direct, vector tiles
        ((9, 7), (3, 3), (1, 1), (1, 1, 1, 1), 4, 9),    // batched (small planes)
        ((40, 33), (3, 3), (2, 2), (1, 1, 1, 1), 2, 8),  // direct, strided
        ((9, 8), (3, 3), (2, 2), (1, 1, 1, 1), 3, 5),    // batched, strided
        ((20, 20), (1, 1), (1, 1), (0, 0, 0, 0), 5, 12), // pointwise
        ((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 6, 7),    // single pixel
        // Batched planes of 1, 2, 4, 8 and 16 pixels (each its own scatter).
        ((1, 1), (3, 3), (1, 1), (1, 1, 1, 1), 5, 6),
        ((1, 2), (1, 1), (1, 1), (0, 0, 0, 0), 5, 6),
        ((2, 2), (1, 1), (1, 1), (0, 0, 0, 0), 5, 6),
        // Unrolled: planes no larger than the window.
        ((1, 2), (3, 3), (1, 1), (1, 1, 1, 1), 5, 6),
        ((2, 2), (3, 3), (1, 1), (1, 1, 1, 1), 5, 6),
        ((2, 4), (3, 3), (1, 1), (1, 1, 1, 1), 5, 6),
        ((4, 4), (3, 3), (1, 1), (1, 1, 1, 1), 5, 6),
    ];
    for (hw, k, stride, pad, cin, cout) in cases {
        for (act, n) in [(1u8, 3), (2, 3), (3, 3), (1, 1), (2, 1), (3, 1)] {
            let c = ConvCase {
                n,
                cin_g: cin,
                cout_g: cout,
                group: 1,
                hw,
                k,
                stride,
                dilation: (1, 1),
                pad,
                act,
                seed: 21,
            };
            let conv = build(&c);
            let x = values(conv.n * conv.cin * conv.ih * conv.iw, 8);
            let len = conv.n * conv.cout * conv.oh * conv.ow;
            let res = values(len, 99);
            let mut fast = vec![0.0; len];
            let mut scratch = vec![0.0; conv.scratch_len()];
            conv.run_with_residual(&x, Some(&res), &mut fast, &mut scratch, 2);
            let mut plain = conv.clone();
            plain.act = Activation::None;
            let mut slow = vec![0.0; len];
            plain.reference(&x, &mut slow);
            for (s, r) in slow.iter_mut().zip(&res) {
                *s = conv.act.apply(*s + r);
            }
            close(&fast, &slow, cin * 9).unwrap();
            // And without the residual, the activation in the epilogue.
            let mut fast = vec![0.0; len];
            conv.run(&x, &mut fast, &mut scratch, 2);
            let mut slow = vec![0.0; len];
            conv.reference(&x, &mut slow);
            close(&fast, &slow, cin * 9).unwrap();
        }
    }
}

/// Planes no larger than the window run as one product with the unrolled
/// weight matrix: 3x3 windows on 2x2 planes (ResNet-50's third stage and
/// VGG-16's last at 32x32) and on 3x3 planes, strided, dilated, asymmetric
/// and 5x5 windows;
/// one image and several, past one 48-image panel and past one 256-long
/// block of the reduction.
#[test]
fn unrolled_small_planes_match_reference() {
    let cases = [
        // (n, hw, k, stride, dilation, pad, cin, cout)
        (1, (2, 2), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 5, 6),
        (7, (2, 2), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 16, 9),
        (50, (2, 2), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 70, 12),
        (3, (1, 2), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 4, 5),
        (4, (3, 2), (3, 3), (2, 1), (1, 1), (1, 1, 1, 1), 3, 7),
        (2, (2, 2), (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), 6, 4),
        (3, (2, 3), (5, 5), (1, 1), (1, 1), (2, 2, 2, 2), 8, 5),
        (5, (2, 2), (3, 3), (1, 1), (1, 1), (0, 1, 2, 1), 6, 3),
        (3, (3, 3), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 6, 5),
    ];
    for (n, hw, k, stride, dilation, pad, cin, cout) in cases {
        let c = ConvCase {
            n,
            cin_g: cin,
            cout_g: cout,
            group: 1,
            hw,
            k,
            stride,
            dilation,
            pad,
            act: (n % 4) as u8,
            seed: 5 + n as u64,
        };
        let conv = build(&c);
        let p = conv.oh * conv.ow;
        assert_eq!(conv.packed[0].m, cout * p, "{hw:?} {k:?}: not unrolled");
        for threads in [1, 2] {
            matches_reference(&conv, &conv, 3, threads);
            let trimmed = unpacked(&c).without_dead_taps().pack();
            matches_reference(&trimmed, &conv, 3, threads);
        }
    }
}

/// Large B (packed panel by panel) and small B (packed whole) orders agree
/// with the reference, with and without threads.
#[test]
fn packed_gemm_both_loop_orders() {
    use qint8_runtime::kernels::packed::{gemm_packed, Epilogue, PackedA};
    for (m, k, n) in [
        (20, 600, 300),
        (37, 1030, 150),
        (9, 5, 2000),
        (300, 700, 40),
        (64, 300, 49),
    ] {
        let a = std::sync::Arc::new(values(m * k, 1));
        let b = values(k * n, 2);
        let bias = values(m, 3);
        let packed = PackedA::new(a.clone(), m, k);
        let mut slow = vec![0.0; m * n];
        sgemm_reference(
            m,
            n,
            k,
            Mat::row_major(&a, k),
            Mat::row_major(&b, n),
            &mut slow,
            n,
            false,
        );
        for (i, v) in slow.iter_mut().enumerate() {
            *v = Activation::Relu.apply(*v + bias[i / n]);
        }
        for threads in [1, 2] {
            let mut fast = vec![0.0; m * n];
            let epi = Epilogue {
                bias: &bias,
                res: None,
                act: Activation::Relu,
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            assert!(pool.install(|| gemm_packed(
                &packed,
                Mat::row_major(&b, n),
                n,
                &mut fast,
                n,
                epi,
                threads
            )));
            close(&fast, &slow, k).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, .. ProptestConfig::default() })]

    /// Max pooling (edge-split loops) equals the definition, with padding,
    /// strides and dilations; planes with NaN keep it.
    #[test]
    fn max_pool_matches_reference(h in 1usize..20, w in 1usize..20, k in (1usize..4, 1usize..4), s in (1usize..3, 1usize..3),
                                  d in (1usize..3, 1usize..3), pad in (0usize..2, 0usize..2), nan in any::<bool>(), seed in any::<u64>()) {
        use qint8_runtime::kernels::pool::Pool2d;
        let (pt, pl) = (pad.0.min(k.0 - 1), pad.1.min(k.1 - 1));
        let ext = (d.0 * (k.0 - 1) + 1, d.1 * (k.1 - 1) + 1);
        prop_assume!(h + 2 * pt >= ext.0 && w + 2 * pl >= ext.1);
        let oh = (h + 2 * pt - ext.0) / s.0 + 1;
        let ow = (w + 2 * pl - ext.1) / s.1 + 1;
        let pool = Pool2d { ih: h, iw: w, oh, ow, k, stride: s, dilation: d, pad: (pt, pl), pad_end: (pt, pl), count_include_pad: false };
        let mut x = values(3 * h * w, seed);
        if nan {
            let at = (seed as usize) % x.len();
            x[at] = f32::NAN;
        }
        let (mut fast, mut slow) = (vec![0.0; 3 * oh * ow], vec![0.0; 3 * oh * ow]);
        pool.max(&x, &mut fast);
        pool.max_reference(&x, &mut slow);
        prop_assert_eq!(fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
}

/// The 2x2 stride-2 window (its own fast paths), on odd and even sizes, with
/// and without NaN.
#[test]
fn max_pool_2x2_stride_2_matches_reference() {
    use qint8_runtime::kernels::pool::Pool2d;
    // Exact tilings (one loop over all planes' rows, fixed widths 1, 2, 4
    // and 8, and the general width), and planes with a row or column left.
    let sizes = [
        (8, 8),
        (7, 9),
        (2, 2),
        (4, 4),
        (16, 16),
        (32, 32),
        (6, 12),
        (33, 64),
    ];
    for (h, w) in sizes {
        for nan_at in [None, Some(5usize)] {
            let pool = Pool2d {
                ih: h,
                iw: w,
                oh: h / 2,
                ow: w / 2,
                k: (2, 2),
                stride: (2, 2),
                dilation: (1, 1),
                pad: (0, 0),
                pad_end: (0, 0),
                count_include_pad: false,
            };
            let mut x = values(4 * h * w, (h * w) as u64);
            if let Some(at) = nan_at {
                x[at] = f32::NAN;
            }
            let len = 4 * (h / 2) * (w / 2);
            let (mut fast, mut slow) = (vec![0.0; len], vec![0.0; len]);
            pool.max(&x, &mut fast);
            pool.max_reference(&x, &mut slow);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "{h}x{w}, NaN at {nan_at:?}");
        }
    }
}

/// The 3x3 stride-2 window with padding 1 (ResNet's stem pool, its own
/// path), on odd and even sizes, with and without end padding and NaN.
#[test]
fn max_pool_3x3_stride_2_matches_reference() {
    use qint8_runtime::kernels::pool::Pool2d;
    for (h, w) in [
        (16usize, 16usize),
        (1, 1),
        (2, 3),
        (5, 8),
        (9, 7),
        (112, 112),
    ] {
        for end in [0, 1] {
            for nan_at in [None, Some(3usize)] {
                // Output size as ONNX defines it; no window without a row.
                let (Some(dh), Some(dw)) =
                    ((h + 1 + end).checked_sub(3), (w + 1 + end).checked_sub(3))
                else {
                    continue;
                };
                let (oh, ow) = (dh / 2 + 1, dw / 2 + 1);
                let pool = Pool2d {
                    ih: h,
                    iw: w,
                    oh,
                    ow,
                    k: (3, 3),
                    stride: (2, 2),
                    dilation: (1, 1),
                    pad: (1, 1),
                    pad_end: (end, end),
                    count_include_pad: false,
                };
                let mut x = values(3 * h * w, (h * w + end) as u64);
                if let Some(at) = nan_at {
                    let n = x.len();
                    x[at % n] = f32::NAN;
                }
                let len = 3 * oh * ow;
                let (mut fast, mut slow) = (vec![0.0; len], vec![0.0; len]);
                pool.max(&x, &mut fast);
                pool.max_reference(&x, &mut slow);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&fast),
                    bits(&slow),
                    "{h}x{w}, end {end}, NaN at {nan_at:?}"
                );
            }
        }
    }
}

/// A 3x3 stride-1 convolution with enough channels for Winograd:
/// (images, cin, cout, height, width, pads top/left/bottom/right, act, seed).
type WinoCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    (usize, usize, usize, usize),
    u8,
    u64,
);

fn winograd_case() -> impl Strategy<Value = WinoCase> {
    winograd_planes(4usize..18).prop_filter("at least 4 tiles of 4x4 outputs per image", |c| {
        wino_tiles(c) >= 4
    })
}

/// Cases whose planes hold 1-3 tiles: Winograd only in plans for batches
/// of many images.
fn winograd_small_case() -> impl Strategy<Value = WinoCase> {
    // Tiles down and across, then each side's output extent within them.
    let layouts = [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)];
    (winograd_planes(4usize..5), 0usize..5, 0usize..4, 0usize..4).prop_map(
        move |(mut c, layout, dy, dx)| {
            let (ty, tx) = layouts[layout];
            let (oh, ow) = ((4 * ty - dy.min(4 * ty - 4)), (4 * tx - dx.min(4 * tx - 4)));
            let (pt, pl, pb, pr) = c.5;
            // Input sides that give those outputs with the case's pads.
            c.3 = (oh + 2).saturating_sub(pt + pb).max(1);
            c.4 = (ow + 2).saturating_sub(pl + pr).max(1);
            c.5 = (pt, pl, oh + 2 - c.3 - pt, ow + 2 - c.4 - pl);
            c
        },
    )
}

fn winograd_planes(side: std::ops::Range<usize>) -> impl Strategy<Value = WinoCase> {
    (
        1usize..4,
        24usize..41,
        24usize..41,
        side.clone(),
        side,
        (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        0u8..4,
        any::<u64>(),
    )
}

/// 4x4 output tiles per image of a case (0 when a side is under 4).
fn wino_tiles(c: &WinoCase) -> usize {
    let (oh, ow) = (c.3 + c.5 .0 + c.5 .2 - 2, c.4 + c.5 .1 + c.5 .3 - 2);
    if oh < 4 || ow < 4 {
        return 0;
    }
    oh.div_ceil(4) * ow.div_ceil(4)
}

fn winograd_conv(c: &WinoCase) -> Conv2d {
    winograd_conv_for(c, false)
}

fn winograd_conv_for(c: &WinoCase, many_images: bool) -> Conv2d {
    let &(n, cin, cout, h, w, pad, act, seed) = c;
    unpacked(&ConvCase {
        n,
        cin_g: cin,
        cout_g: cout,
        group: 1,
        hw: (h, w),
        k: (3, 3),
        stride: (1, 1),
        dilation: (1, 1),
        pad,
        act,
        seed,
    })
    .pack_for(many_images)
}

/// Winograd against the direct sum. Its transforms round each input
/// tile's values (up to 100 times an input's size after `B^T d B`) and
/// each product tile's, so the error scales with the sum of the
/// magnitudes of the terms, not with the result: bound it by that sum.
fn winograd_close(
    conv: &Conv2d,
    x: &[f32],
    y: &[f32],
    res: Option<&[f32]>,
) -> Result<(), TestCaseError> {
    let mut plain = conv.clone();
    plain.act = Activation::None;
    plain.bias = vec![0.0; conv.cout];
    let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut abs_conv = plain.clone();
    abs_conv.weight = std::sync::Arc::new(conv.weight.iter().map(|v| v.abs()).collect());
    let mut magnitude = vec![0f32; y.len()];
    abs_conv.reference(&abs_x, &mut magnitude);
    let mut sum = vec![0f32; y.len()];
    plain.reference(x, &mut sum);
    let plane = conv.oh * conv.ow;
    for (i, (&got, (&s, &mag))) in y.iter().zip(sum.iter().zip(&magnitude)).enumerate() {
        let co = i / plane % conv.cout;
        let pre = s + conv.bias[co] + res.map_or(0.0, |r| r[i]);
        let want = conv.act.apply(pre);
        // SiLU and Clip have slopes of at most 1.1 and 1.
        let tol = 1e-5 * (mag + 1.0) * 1.1;
        prop_assert!(
            (got - want).abs() <= tol,
            "index {}: {} vs {} (terms' magnitude {})",
            i,
            got,
            want,
            mag
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn winograd_matches_the_direct_sum(c in winograd_case(), residual in any::<bool>()) {
        let conv = winograd_conv(&c);
        prop_assert!(conv.winograd.is_some(), "the case should take the Winograd path");
        let x = values(conv.n * conv.cin * conv.ih * conv.iw, c.7 ^ 5);
        let res = residual.then(|| values(conv.n * conv.cout * conv.oh * conv.ow, c.7 ^ 9));
        let mut y = vec![f32::NAN; conv.n * conv.cout * conv.oh * conv.ow];
        let mut scratch = vec![0f32; conv.scratch_len()];
        conv.run_with_residual(&x, res.as_deref(), &mut y, &mut scratch, 1);
        winograd_close(&conv, &x, &y, res.as_deref())?;
    }

    #[test]
    fn winograd_vector_gather_and_scatter_match_the_lane_loops(c in winograd_case(), residual in any::<bool>()) {
        let conv = winograd_conv(&c);
        let w = conv.winograd.clone().expect("the case takes the Winograd path");
        let x = values(conv.n * conv.cin * conv.ih * conv.iw, c.7 ^ 5);
        let res = residual.then(|| values(conv.n * conv.cout * conv.oh * conv.ow, c.7 ^ 9));
        let len = conv.n * conv.cout * conv.oh * conv.ow;
        let (mut fast, mut lanes) = (vec![f32::NAN; len], vec![0f32; len]);
        w.run_on(Kernels::best(), &conv, &x, res.as_deref(), &mut fast, 1);
        w.run_on(Kernels::Lanes, &conv, &x, res.as_deref(), &mut lanes, 1);
        for (i, (a, b)) in fast.iter().zip(&lanes).enumerate() {
            prop_assert!(a.to_bits() == b.to_bits(), "index {}: {} vs {}", i, a, b);
        }
    }

    #[test]
    fn winograd_images_do_not_depend_on_batch_or_threads(c in winograd_case()) {
        images_alone_match_the_batch(&winograd_conv(&c), c.7)?;
    }

    #[test]
    fn winograd_on_planes_of_few_tiles_for_many_images(c in winograd_small_case(), residual in any::<bool>()) {
        prop_assert!(winograd_conv(&c).winograd.is_none(), "per image, planes of under 4 tiles stay direct");
        let conv = winograd_conv_for(&c, true);
        prop_assert!(conv.winograd.is_some(), "planned for many images, the case takes Winograd");
        let x = values(conv.n * conv.cin * conv.ih * conv.iw, c.7 ^ 5);
        let res = residual.then(|| values(conv.n * conv.cout * conv.oh * conv.ow, c.7 ^ 9));
        let mut y = vec![f32::NAN; conv.n * conv.cout * conv.oh * conv.ow];
        let mut scratch = vec![0f32; conv.scratch_len()];
        conv.run_with_residual(&x, res.as_deref(), &mut y, &mut scratch, 1);
        winograd_close(&conv, &x, &y, res.as_deref())?;
        images_alone_match_the_batch(&conv, c.7)?;
        let w = conv.winograd.clone().expect("checked above");
        let mut lanes = vec![0f32; y.len()];
        w.run_on(Kernels::Lanes, &conv, &x, res.as_deref(), &mut lanes, 1);
        prop_assert!(y.iter().zip(&lanes).all(|(a, b)| a.to_bits() == b.to_bits()), "vector gather and scatter differ from the lane loops");
    }
}

/// Each image of a batch run on two threads, run alone on one, gives the
/// same bits.
fn images_alone_match_the_batch(conv: &Conv2d, seed: u64) -> Result<(), TestCaseError> {
    let x = values(conv.n * conv.cin * conv.ih * conv.iw, seed ^ 5);
    let len = conv.n * conv.cout * conv.oh * conv.ow;
    let mut whole = vec![0f32; len];
    let mut scratch = vec![0f32; conv.scratch_len()];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| conv.run(&x, &mut whole, &mut scratch, 2));
    let one = Conv2d {
        geom: ConvGeom { n: 1, ..conv.geom },
        ..conv.clone()
    };
    let (xi, yi) = (x.len() / conv.n, len / conv.n);
    for img in 0..conv.n {
        let mut y = vec![0f32; yi];
        one.run(&x[img * xi..(img + 1) * xi], &mut y, &mut scratch, 1);
        prop_assert!(
            y.iter()
                .zip(&whole[img * yi..])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "image {} differs from its result in the batch",
            img
        );
    }
    Ok(())
}

/// The VGG-16-BN fixture's 64-channel 4x4 layers: one tile per image.
#[test]
fn a_4x4_plane_takes_winograd_only_for_many_images() {
    let c: WinoCase = (2, 64, 64, 4, 4, (1, 1, 1, 1), 1, 3);
    assert_eq!(wino_tiles(&c), 1);
    assert!(winograd_conv(&c).winograd.is_none());
    assert!(winograd_conv_for(&c, true).winograd.is_some());
}

/// Planes of one tile (4x4 maps padded by one) move whole planes through a
/// 16x16 transpose in the vector transforms: the same bits as the lane
/// loops, and within the bound of the direct sum, for batches that fill
/// one lane group, several, or part of one, with and without a residual
/// (which takes the lane-loop writer) and with each activation.
#[test]
fn winograd_one_tile_planes_match_the_lane_loops() {
    let cases = [
        (1, 24, 24, 0),
        (5, 32, 64, 1),
        (16, 64, 64, 1),
        (17, 24, 40, 2),
        (33, 40, 24, 3),
    ];
    for (n, cin, cout, act) in cases {
        let c: WinoCase = (n, cin, cout, 4, 4, (1, 1, 1, 1), act, n as u64);
        let conv = winograd_conv_for(&c, true);
        let w = conv
            .winograd
            .clone()
            .expect("one-tile planes take Winograd for many images");
        let x = values(conv.n * conv.cin * conv.ih * conv.iw, c.7 ^ 5);
        let len = conv.n * conv.cout * conv.oh * conv.ow;
        for res in [None, Some(values(len, c.7 ^ 9))] {
            let (mut fast, mut lanes) = (vec![f32::NAN; len], vec![0f32; len]);
            w.run_on(Kernels::best(), &conv, &x, res.as_deref(), &mut fast, 1);
            w.run_on(Kernels::Lanes, &conv, &x, res.as_deref(), &mut lanes, 1);
            assert!(
                fast.iter()
                    .zip(&lanes)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{n} images, {cin} -> {cout} channels: vector and lane transforms differ"
            );
            winograd_close(&conv, &x, &fast, res.as_deref()).unwrap();
        }
    }
}

/// Large planes: many blocks of tiles, split over two threads, against
/// the direct sum; and 49 tiles of 64 channels, just over one block's
/// budget (48), run as one block.
#[test]
fn winograd_runs_many_blocks() {
    let cases: [WinoCase; 2] = [
        (2, 64, 48, 40, 36, (1, 1, 1, 1), 1, 11),
        (1, 64, 64, 28, 28, (1, 1, 1, 1), 0, 12),
    ];
    for c in cases {
        let conv = winograd_conv(&c);
        assert!(conv.winograd.is_some());
        let x = values(conv.n * conv.cin * conv.ih * conv.iw, 3);
        let mut y = vec![f32::NAN; conv.n * conv.cout * conv.oh * conv.ow];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| conv.run(&x, &mut y, &mut [], 2));
        winograd_close(&conv, &x, &y, None).unwrap();
    }
}

/// An empty batch computes nothing (and does not divide by zero tiles).
#[test]
fn winograd_runs_an_empty_batch() {
    let conv = winograd_conv(&(0, 24, 24, 8, 8, (1, 1, 1, 1), 1, 5));
    assert!(conv.winograd.is_some());
    let mut y: Vec<f32> = Vec::new();
    conv.run(&[], &mut y, &mut [], 2);
    assert!(y.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// GlobalAveragePool's plane means against an f64 sum, on planes below,
    /// at and above the size where the partial sums take over, and on
    /// full-size ones.
    #[test]
    fn global_average_matches_reference(planes in 1usize..6, plane in prop_oneof![1usize..70, 120usize..300, 12_000usize..12_600, Just(1), Just(4), Just(16), Just(256)], seed in any::<u64>()) {
        let x = values(planes * plane, seed);
        let mut y = vec![0f32; planes];
        qint8_runtime::kernels::pool::global_average(&x, &mut y, plane);
        for (p, &got) in y.iter().enumerate() {
            let exact = x[p * plane..(p + 1) * plane].iter().map(|&v| v as f64).sum::<f64>() / plane as f64;
            let scale = x[p * plane..(p + 1) * plane].iter().map(|&v| v.abs() as f64).sum::<f64>() / plane as f64;
            // Rounding bound: one f32 rounding per add along the longest
            // chain (in order below 64 values; a lane's run, then six
            // halvings, above), and the division.
            if plane < 64 {
                // Summed in order: the plain sum's bits, divided or not.
                let plain = x[p * plane..(p + 1) * plane].iter().sum::<f32>() / plane as f32;
                prop_assert_eq!(got.to_bits(), plain.to_bits());
            }
            let chain = if plane < 64 { plane } else { plane / 64 + 7 };
            prop_assert!((got as f64 - exact).abs() <= 1.2e-7 * (chain + 1) as f64 * scale, "plane {}: {} vs {}", p, got, exact);
        }
    }
}
