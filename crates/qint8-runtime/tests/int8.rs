//! The integer convolution kernel against its scalar reference and against
//! float convolution on the dequantized values.

use proptest::prelude::*;
use qint8_runtime::kernels::conv::{Conv2d, ConvGeom, Int8Source};
use qint8_runtime::kernels::int8::{self, InputQuant, Kernels, MC, PT};
use qint8_runtime::kernels::Activation;

/// xorshift64 stream.
fn stream(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

fn uniform(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut next = stream(seed);
    (0..n)
        .map(|_| lo + (hi - lo) * ((next() >> 40) as f32 / (1u64 << 24) as f32))
        .collect()
}

fn ints(n: usize, seed: u64, lo: i32, hi: i32) -> Vec<i32> {
    let mut next = stream(seed);
    (0..n)
        .map(|_| lo + (next() % (hi - lo + 1) as u64) as i32)
        .collect()
}

fn note_if_emulated() {
    if !int8::available() {
        eprintln!("note: no AVX-512 VNNI here; the fast kernel is the reference");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// The VNNI tile equals the scalar one exactly (integer sums).
    #[test]
    fn tile_matches_reference(kq in 0usize..40, len in 64usize..600, seed in any::<u64>()) {
        let w: Vec<i8> = ints(kq * MC * 4, seed, -128, 127).iter().map(|&v| v as i8).collect();
        let xq: Vec<u8> = ints(len, seed ^ 1, 0, 255).iter().map(|&v| v as u8).collect();
        let tap: Vec<usize> = ints(kq, seed ^ 2, 0, 30).iter().map(|&v| v as usize).collect();
        let hi = (len - 35) as i32;
        let b = ints(PT, seed ^ 3, 0, hi);
        let base: [usize; PT] = std::array::from_fn(|j| b[j] as usize);
        let (mut fast, mut slow) = ([0i32; PT * MC], [1i32; PT * MC]);
        int8::tile(kq, &w, &xq, &base, &tap, &mut fast);
        int8::tile_reference(kq, &w, &xq, &base, &tap, &mut slow);
        prop_assert_eq!(fast.to_vec(), slow.to_vec());
    }
}

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    cin: usize,
    cout: usize,
    hw: (usize, usize),
    k: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    pad: (usize, usize, usize, usize),
    act: u8,
    /// 0: int8 zero point 0; 1: int8 with a zero point; 2: uint8.
    input: u8,
    per_tensor_weights: bool,
    residual: bool,
    /// The residual is fake-quantized as it is added ([`RESIDUAL_QUANT`]).
    residual_quant: bool,
    /// Input already fake-quantized (as after QuantizeLinear + DequantizeLinear).
    fake_quantized: bool,
    /// One group per channel (`cin == cout`).
    depthwise: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..4, 1usize..11, 1usize..70),
        ((1usize..14, 1usize..14), (1usize..4, 1usize..4)),
        ((1usize..3, 1usize..3), (1usize..3, 1usize..3)),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        (0u8..4, 0u8..3),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |((n, cin, cout), (hw, k), (stride, dilation), pad, (act, input), flags, seed)| Case {
                n,
                cin,
                cout,
                hw,
                k,
                stride,
                dilation,
                pad,
                act,
                input,
                per_tensor_weights: flags.0,
                residual: flags.1,
                residual_quant: flags.3,
                fake_quantized: flags.2,
                depthwise: false,
                seed,
            },
        )
        .prop_filter("kernel fits", |c| {
            c.hw.0 + c.pad.0 + c.pad.2 > c.dilation.0 * (c.k.0 - 1)
                && c.hw.1 + c.pad.1 + c.pad.3 > c.dilation.1 * (c.k.1 - 1)
        })
}

struct Built {
    /// The convolution on the integer kernel.
    int: Conv2d,
    /// The same convolution in float on dequantized weights.
    float: Conv2d,
    input: InputQuant,
}

/// Terms of one output's sum.
fn reduction(c: &Case) -> usize {
    let cin_g = if c.depthwise { 1 } else { c.cin };
    cin_g * c.k.0 * c.k.1
}

fn build(c: &Case) -> Built {
    let oh = (c.hw.0 + c.pad.0 + c.pad.2 - c.dilation.0 * (c.k.0 - 1) - 1) / c.stride.0 + 1;
    let ow = (c.hw.1 + c.pad.1 + c.pad.3 - c.dilation.1 * (c.k.1 - 1) - 1) / c.stride.1 + 1;
    let geom = ConvGeom {
        n: c.n,
        cin: c.cin,
        ih: c.hw.0,
        iw: c.hw.1,
        cout: c.cout,
        group: if c.depthwise { c.cin } else { 1 },
        kh: c.k.0,
        kw: c.k.1,
        stride: c.stride,
        dilation: c.dilation,
        pad: (c.pad.0, c.pad.1),
        oh,
        ow,
    };
    let taps = reduction(c);
    let q: Vec<f32> = ints(c.cout * taps, c.seed, -128, 127)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let w_scale = uniform(
        if c.per_tensor_weights { 1 } else { c.cout },
        c.seed ^ 11,
        0.001,
        0.02,
    );
    let weight: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &v)| v * w_scale[if c.per_tensor_weights { 0 } else { i / taps }])
        .collect();
    let input = match c.input {
        0 => InputQuant {
            scale: 0.02,
            zero: 0,
            qmin: -128,
            qmax: 127,
        },
        1 => InputQuant {
            scale: 0.015,
            zero: -9,
            qmin: -128,
            qmax: 127,
        },
        _ => InputQuant {
            scale: 0.01,
            zero: 100,
            qmin: 0,
            qmax: 255,
        },
    };
    let float = Conv2d {
        geom,
        weight: std::sync::Arc::new(weight),
        bias: uniform(c.cout, c.seed ^ 77, -1.0, 1.0),
        act: [
            Activation::None,
            Activation::Relu,
            Activation::Clip(-0.5, 0.8),
            Activation::Silu,
        ][c.act as usize],
        packed: Vec::new(),
        int8: None,
        winograd: None,
    };
    let mut int = float.clone().with_int8(Int8Source { q, w_scale, input });
    if c.residual_quant {
        int.int8 = int.int8.map(|w| w.with_residual_quant(RESIDUAL_QUANT));
    }
    Built {
        int,
        float: float.pack(),
        input,
    }
}

/// How a fused residual is quantized where a case asks for it: a scale
/// small enough that residuals in [-1, 1] also clip, and a zero point.
const RESIDUAL_QUANT: InputQuant = InputQuant {
    scale: 0.006,
    zero: 5,
    qmin: -128,
    qmax: 127,
};

/// QuantizeLinear then DequantizeLinear, as ONNX defines them.
fn fake_quant(x: &[f32], p: InputQuant) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let q = ((v / p.scale).round_ties_even() as i32 + p.zero).clamp(p.qmin, p.qmax);
            (q - p.zero) as f32 * p.scale
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    /// The integer convolution equals float convolution of the dequantized
    /// weights and the fake-quantized input (up to float rounding), reading
    /// either the float input or the fake-quantized one; the VNNI path
    /// equals the scalar reference path bit for bit.
    #[test]
    fn int8_conv_matches_float_on_dequantized_values(c in case()) {
        matches_float(&c)?;
    }
}

/// Stride-1 convolutions whose output positions run along the vector
/// lanes of the integer kernel: 1x1 without padding on planes of 16 or
/// more positions (runs across rows), and any window, padding and
/// dilation on rows of 16 or more, or exactly 4 or 8 (a vector of several
/// rows); with position tails inside a vector,
/// an odd number of 16-position segments, and channel counts off
/// multiples of the 8-channel tiles and 32-channel blocks.
fn lanes_case() -> impl Strategy<Value = Case> {
    let pointwise = (case(), (4usize..21, 4usize..21), 1usize..90).prop_map(|(c, hw, cout)| Case {
        hw,
        cout,
        k: (1, 1),
        stride: (1, 1),
        pad: (0, 0, 0, 0),
        ..c
    });
    let rows = (case(), (1usize..6, 16usize..40), 1usize..50).prop_map(|(c, hw, cout)| Case {
        hw,
        cout,
        stride: (1, 1),
        ..c
    });
    // Output rows exactly 4 or 8 wide, whatever the window and padding.
    let short = (case(), 4usize..12, any::<bool>(), 1usize..50).prop_map(|(c, ih, eight, cout)| {
        let span = c.dilation.1 * (c.k.1 - 1);
        let target = if eight { 8 } else { 4 };
        let (pl, pr) = if target + span > c.pad.1 + c.pad.3 {
            (c.pad.1, c.pad.3)
        } else {
            (0, 0)
        };
        Case {
            hw: (ih, target + span - pl - pr),
            cout,
            stride: (1, 1),
            pad: (c.pad.0, pl, c.pad.2, pr),
            ..c
        }
    });
    prop_oneof![pointwise, rows, short].prop_filter("kernel fits, lanes apply", |c| {
        let oh = (c.hw.0 + c.pad.0 + c.pad.2).saturating_sub(c.dilation.0 * (c.k.0 - 1));
        let ow = (c.hw.1 + c.pad.1 + c.pad.3).saturating_sub(c.dilation.1 * (c.k.1 - 1));
        oh > 0 && ow > 0 && (ow >= 16 || c.k == (1, 1) || (matches!(ow, 4 | 8) && oh * ow >= 16))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// The lanes path equals the scalar reference bit for bit and the
    /// float convolution up to rounding.
    #[test]
    fn lanes_int8_conv_matches_float(c in lanes_case()) {
        matches_float(&c)?;
    }
}

/// Depthwise convolutions on the integer kernel: 3x3 and 5x5 windows and
/// others, strides up to 4 across, rows of 16 or more positions (a vector
/// per 16) and shorter ones (several rows per vector), with row and plane
/// tails, every activation and input quantization (planes of 32 or more
/// positions, where the plan uses the kernel).
fn depthwise_case() -> impl Strategy<Value = Case> {
    (
        case(),
        2usize..40,
        (4usize..24, 4usize..40),
        (1usize..6, 1usize..6),
        (1usize..3, 1usize..5),
    )
        .prop_map(|(c, ch, hw, k, stride)| Case {
            n: c.n.min(2),
            cin: ch,
            cout: ch,
            hw,
            k,
            stride,
            dilation: (c.dilation.0, 1),
            residual: false,
            residual_quant: false,
            depthwise: true,
            ..c
        })
        .prop_filter("the depthwise kernel applies", |c| {
            let oh = (c.hw.0 + c.pad.0 + c.pad.2).checked_sub(c.dilation.0 * (c.k.0 - 1) + 1);
            let ow = (c.hw.1 + c.pad.1 + c.pad.3).checked_sub(c.k.1);
            match (oh, ow) {
                (Some(oh), Some(ow)) => (oh / c.stride.0 + 1) * (ow / c.stride.1 + 1) >= 32,
                _ => false,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// The depthwise integer kernel equals its scalar reference bit for bit
    /// and the float convolution up to rounding.
    #[test]
    fn depthwise_int8_conv_matches_float(c in depthwise_case()) {
        prop_assert!(build(&c).int.int8.as_ref().is_some_and(|w| w.is_depthwise()));
        matches_float(&c)?;
    }
}

/// The body of `int8_conv_matches_float_on_dequantized_values`.
fn matches_float(c: &Case) -> Result<(), TestCaseError> {
    note_if_emulated();
    let b = build(c);
    let conv = &b.int;
    let x_len = c.n * c.cin * c.hw.0 * c.hw.1;
    // Beyond the input range on purpose: clamping is part of QuantizeLinear.
    let raw = uniform(x_len, c.seed ^ 5, -3.0, 3.0);
    let fq = fake_quant(&raw, b.input);
    let x = if c.fake_quantized { &fq } else { &raw };
    let len = c.n * c.cout * conv.oh * conv.ow;
    let res = c.residual.then(|| uniform(len, c.seed ^ 9, -1.0, 1.0));
    let mut scratch = vec![0u32; int8::scratch_len(conv, conv.int8.as_ref().unwrap())];
    let (mut fast, mut slow) = (vec![0.0; len], vec![0.0; len]);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let w = conv.int8.as_ref().unwrap();
    pool.install(|| {
        int8::run(
            conv,
            w,
            x,
            res.as_deref(),
            &mut fast,
            &mut scratch,
            Kernels::Best,
        )
    });
    int8::run(
        conv,
        w,
        x,
        res.as_deref(),
        &mut slow,
        &mut scratch,
        Kernels::Reference,
    );
    prop_assert!(
        fast.iter()
            .zip(&slow)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "fast and reference paths differ"
    );
    // Float reference: no activation, then residual and activation.
    let mut plain = b.float.clone();
    plain.act = Activation::None;
    let mut expected = vec![0.0; len];
    plain.reference(&fq, &mut expected);
    let res_added = match (&res, c.residual_quant) {
        (Some(r), true) => Some(fake_quant(r, RESIDUAL_QUANT)),
        (r, _) => r.clone(),
    };
    for (i, e) in expected.iter_mut().enumerate() {
        *e = b
            .float
            .act
            .apply(*e + res_added.as_ref().map_or(0.0, |r| r[i]));
    }
    let k = reduction(c) as f32;
    for (i, (a, e)) in fast.iter().zip(&expected).enumerate() {
        prop_assert!(
            (a - e).abs() <= 2e-6 * k.sqrt() * (1.0 + e.abs()) * 8.0,
            "index {}: {} vs {}",
            i,
            a,
            e
        );
    }
    Ok(())
}

/// Convolutions on 1x1 planes quantize each image's channel vector in one
/// piece: channel counts around multiples of four, several images, with
/// and without a residual.
#[test]
fn single_pixel_planes_match_float() {
    for (cin, cout) in [(1, 3), (3, 20), (4, 17), (7, 33), (64, 70), (130, 9)] {
        for residual in [false, true] {
            let c = Case {
                n: 5,
                cin,
                cout,
                hw: (1, 1),
                k: (1, 1),
                pad: (0, 0, 0, 0),
                act: 1,
                input: 1,
                residual,
                ..three_by_three(cin as u64)
            };
            matches_float(&c).unwrap();
        }
    }
}

/// A 3x3 convolution with padding 1, the rest plain, for fixed cases.
fn three_by_three(seed: u64) -> Case {
    Case {
        n: 1,
        cin: 4,
        cout: 8,
        hw: (5, 5),
        k: (3, 3),
        stride: (1, 1),
        dilation: (1, 1),
        pad: (1, 1, 1, 1),
        act: 0,
        input: 0,
        per_tensor_weights: false,
        residual: false,
        residual_quant: false,
        fake_quantized: false,
        depthwise: false,
        seed,
    }
}

/// Through `Conv2d::run` (the plan's entry point), with the scratch it asks for.
#[test]
fn conv_run_dispatches_to_the_integer_kernel() {
    let c = Case {
        n: 2,
        cin: 5,
        cout: 40,
        hw: (9, 7),
        stride: (2, 1),
        act: 1,
        ..three_by_three(3)
    };
    let b = build(&c);
    let x = uniform(2 * 5 * 9 * 7, 8, -2.0, 2.0);
    let len = 2 * 40 * b.int.oh * b.int.ow;
    let (mut via_run, mut direct) = (vec![0.0; len], vec![0.0; len]);
    let mut scratch = vec![0.0f32; b.int.scratch_len()];
    b.int.run(&x, &mut via_run, &mut scratch, 1);
    let mut words = vec![0u32; b.int.scratch_len()];
    int8::run(
        &b.int,
        b.int.int8.as_ref().unwrap(),
        &x,
        None,
        &mut direct,
        &mut words,
        Kernels::Best,
    );
    assert_eq!(via_run, direct);
    // Float weights are dropped once the integer ones exist.
    assert!(b.int.weight.is_empty() && b.int.packed.is_empty());
    assert!(via_run.iter().any(|&v| v > 0.0) && via_run.iter().all(|&v| v >= 0.0));
}

/// Padding taps are dropped from the integer weights as from float ones.
#[test]
fn integer_weights_drop_dead_taps() {
    let c = Case {
        n: 3,
        cin: 8,
        cout: 33,
        hw: (1, 1),
        input: 2,
        per_tensor_weights: true,
        residual: true,
        ..three_by_three(17)
    };
    let b = build(&c);
    assert_eq!((b.int.kh, b.int.kw), (1, 1));
    let x = uniform(3 * 8, 4, -1.0, 1.0);
    let fq = fake_quant(&x, b.input);
    let res = uniform(3 * 33, 6, -1.0, 1.0);
    let mut out = vec![0.0; 3 * 33];
    let mut scratch = vec![0.0f32; b.int.scratch_len()];
    b.int
        .run_with_residual(&x, Some(&res), &mut out, &mut scratch, 1);
    let mut expected = vec![0.0; 3 * 33];
    b.float.reference(&fq, &mut expected);
    for ((a, e), r) in out.iter().zip(&expected).zip(&res) {
        assert!((a - (e + r)).abs() < 1e-4, "{a} vs {}", e + r);
    }
}
