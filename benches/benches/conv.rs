//! Convolution throughput on the integer kernel (int8 weights, quantized
//! input) against the float kernels on the same layer, single-threaded:
//! ResNet-50 layer shapes at 224x224 and at the fixtures' 32x32.
//!
//! The integer kernel runs only where the CPU has AVX-512 VNNI; elsewhere
//! its group measures the scalar reference, which says nothing about speed
//! (the plan compiler would use the float kernels there).
//!
//! Winograd F(4x4, 3x3) against the direct float kernels on 3x3 layers.
//!
//! Depthwise convolutions (EfficientNet-B0's, with its SiLU) on the
//! integer kernel against the float one, one thread; the integer kernel
//! also needs AVX-512 VBMI.
//!
//! Also the float activations that follow EfficientNet-B0's convolutions
//! (SiLU, and the gates' Sigmoid) on 256k values, one thread.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qint8_runtime::kernels::conv::{Conv2d, Int8Source};
use qint8_runtime::kernels::int8::InputQuant;

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// (name, batch, cin, cout, plane, kernel, stride)
const LAYERS: [(&str, usize, usize, usize, usize, usize, usize); 5] = [
    ("224 3x3 64->64 @56", 1, 64, 64, 56, 3, 1),
    ("224 1x1 256->64 @56", 1, 256, 64, 56, 1, 1),
    ("224 3x3 256->256 @14", 1, 256, 256, 14, 3, 1),
    ("32 1x1 256->64 @8 b32", 32, 256, 64, 8, 1, 1),
    ("32 3x3 128->128 @4 b32", 32, 128, 128, 4, 3, 1),
];

/// `float` on the integer kernel: weights in [-1, 1] rounded to 1/127
/// steps, the input quantized per tensor with the same step.
fn on_integers(float: &Conv2d) -> Conv2d {
    let q: Vec<f32> = float.weight.iter().map(|v| (v * 127.0).round()).collect();
    float.clone().with_int8(Int8Source {
        q,
        w_scale: vec![1.0 / 127.0],
        input: InputQuant {
            scale: 1.0 / 127.0,
            zero: 0,
            qmin: -128,
            qmax: 127,
        },
    })
}

fn conv_int8_vs_float(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    let mut g = c.benchmark_group("conv");
    for (name, n, cin, cout, hw, k, stride) in LAYERS {
        let pad = k / 2;
        let float = qint8_benches::square_conv(
            n,
            (cin, cout),
            hw,
            (k, stride, pad),
            data(cout * cin * k * k, 1),
        );
        let o = float.oh;
        let int = on_integers(&float);
        let float = float.pack();
        let x = data(n * cin * hw * hw, 3);
        let mut y = vec![0f32; n * cout * o * o];
        g.throughput(Throughput::Elements(
            (n * cout * o * o * cin * k * k) as u64,
        ));
        for (kind, conv) in [("float", &float), ("int8", &int)] {
            let mut scratch = vec![0f32; conv.scratch_len()];
            g.bench_with_input(BenchmarkId::new(kind, name), &x, |b, x| {
                b.iter(|| pool.install(|| conv.run(black_box(x), &mut y, &mut scratch, 1)))
            });
        }
    }
    g.finish();
}

/// (name, batch, channels, plane): 3x3 stride-1 layers of the VGG-16-BN
/// fixture (batch 25, as calibration runs it) and of ResNet-50 and VGG-16
/// at 224x224. (The fixture's 16-channel layers are below Winograd's
/// channel threshold.)
const WINOGRAD_LAYERS: [(&str, usize, usize, usize); 5] = [
    ("vgg 32 @8 b25", 25, 32, 8),
    ("224 64 @56", 1, 64, 56),
    ("224 128 @28", 1, 128, 28),
    ("224 256 @14", 1, 256, 14),
    ("224 512 @28", 1, 512, 28),
];

/// Winograd F(4x4, 3x3) against the direct float kernels on the same
/// layer, one thread (throughput in the direct sum's multiply-adds).
fn winograd_vs_direct(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    let mut g = c.benchmark_group("winograd");
    for (name, n, ch, hw) in WINOGRAD_LAYERS {
        let conv = qint8_benches::square_conv(n, (ch, ch), hw, (3, 1, 1), data(ch * ch * 9, 1));
        let x = data(n * ch * hw * hw, 3);
        let mut y = vec![0f32; n * ch * hw * hw];
        g.throughput(Throughput::Elements((n * ch * ch * 9 * hw * hw) as u64));
        for (kind, conv) in [
            ("direct", conv.clone().pack_direct()),
            ("winograd", conv.pack()),
        ] {
            assert_eq!(conv.winograd.is_some(), kind == "winograd");
            let mut scratch = vec![0f32; conv.scratch_len()];
            g.bench_with_input(BenchmarkId::new(kind, name), &x, |b, x| {
                b.iter(|| pool.install(|| conv.run(black_box(x), &mut y, &mut scratch, 1)))
            });
        }
    }
    g.finish();
}

/// (name, batch, channels, plane, kernel, stride): EfficientNet-B0's
/// depthwise layers at 224x224 and on the fixtures' 32x32 images.
/// (Planes under 32 positions, such as the fixture's 4x4 ones, keep the
/// float kernel: see `int8::depthwise_fits`.)
const DEPTHWISE_LAYERS: [(&str, usize, usize, usize, usize, usize); 7] = [
    ("224 3x3 32 @112", 1, 32, 112, 3, 1),
    ("224 3x3 96 @112 s2", 1, 96, 112, 3, 2),
    ("224 5x5 144 @56 s2", 1, 144, 56, 5, 2),
    ("224 5x5 672 @14", 1, 672, 14, 5, 1),
    ("224 5x5 1152 @7", 1, 1152, 7, 5, 1),
    ("32 3x3 32 @16 b32", 32, 32, 16, 3, 1),
    ("32 3x3 96 @16 s2 b32", 32, 96, 16, 3, 2),
];

/// Depthwise convolutions with SiLU, integer kernel against float, one
/// thread (throughput in multiply-adds).
fn depthwise_int8_vs_float(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    let mut g = c.benchmark_group("depthwise");
    for (name, n, ch, hw, k, stride) in DEPTHWISE_LAYERS {
        let mut float =
            qint8_benches::square_conv(n, (ch, ch), hw, (k, stride, k / 2), data(ch * k * k, 1));
        float.geom.group = ch;
        float.act = qint8_runtime::kernels::Activation::Silu;
        let o = float.oh;
        let int = on_integers(&float);
        assert!(
            int.int8.as_ref().is_some_and(|w| w.is_depthwise()),
            "{name}"
        );
        let float = float.pack();
        let x = data(n * ch * hw * hw, 3);
        let mut y = vec![0f32; n * ch * o * o];
        g.throughput(Throughput::Elements((n * ch * o * o * k * k) as u64));
        for (kind, conv) in [("float", &float), ("int8", &int)] {
            let mut scratch = vec![0f32; conv.scratch_len()];
            g.bench_with_input(BenchmarkId::new(kind, name), &x, |b, x| {
                b.iter(|| pool.install(|| conv.run(black_box(x), &mut y, &mut scratch, 1)))
            });
        }
    }
    g.finish();
}

fn activations(c: &mut Criterion) {
    use qint8_runtime::kernels::elementwise::{unary, Unary};
    let x: Vec<f32> = data(1 << 18, 5).iter().map(|v| v * 8.0).collect();
    let mut y = vec![0f32; x.len()];
    let mut g = c.benchmark_group("activation");
    g.throughput(Throughput::Elements(x.len() as u64));
    for (name, f) in [("silu", Unary::Silu), ("sigmoid", Unary::Sigmoid)] {
        g.bench_function(name, |b| b.iter(|| unary(f, black_box(&x), &mut y)));
    }
    g.finish();
}

criterion_group!(
    benches,
    conv_int8_vs_float,
    winograd_vs_direct,
    depthwise_int8_vs_float,
    activations
);
criterion_main!(benches);
