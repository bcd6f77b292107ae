//! qint8-math throughput: quantize/dequantize against a memcpy of the same
//! bytes, per-channel against per-tensor, histogram add, and range search.
//!
//! Quantize and dequantize run in a one-thread rayon pool, so the numbers are
//! single-core and directly comparable to the memcpy.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qint8_math::histogram::Histogram;
use qint8_math::kernels::SimdLevel;
use qint8_math::prelude::*;
use qint8_math::quant::{dequantize_into_with, quantize_into_with};
use qint8_math::search::{entropy_search, mse_search, EntropyVariant};

/// 64 MiB of f32.
const N: usize = 16 << 20;

fn data(n: usize) -> Vec<f32> {
    // Deterministic values spread over about [-4, 4].
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

fn one_thread() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool")
}

fn quantize_vs_memcpy(c: &mut Criterion) {
    let pool = one_thread();
    let x = data(N);
    let mut copy = vec![0f32; N];
    let mut q = vec![0i8; N];
    let mut d = vec![0f32; N];
    let per_tensor = QuantParams::symmetric(4.0, QuantDtype::Int8, false).expect("params");
    // Conv-weight-like layout: 1024 output channels of 16384 elements each.
    let shape0 = [1024usize, 16384];
    let amax0 = amax_per_channel(&x, &shape0, 0).expect("amax");
    let per_channel0 =
        QuantParams::symmetric_per_channel(&amax0, 0, QuantDtype::Int8, true).expect("params");
    // Channels on the last axis (e.g. a Gemm weight stored [K, N]).
    let shape1 = [16384usize, 1024];
    let amax1 = amax_per_channel(&x, &shape1, 1).expect("amax");
    let per_channel1 =
        QuantParams::symmetric_per_channel(&amax1, 1, QuantDtype::Int8, true).expect("params");

    let mut g = c.benchmark_group("quantize_64MiB_f32");
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.sample_size(10);
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            copy.copy_from_slice(black_box(&x));
            black_box(&copy);
        })
    });
    for level in SimdLevel::available() {
        if level == SimdLevel::Reference {
            continue;
        }
        let name = format!("{level:?}").to_lowercase();
        g.bench_function(BenchmarkId::new("per_tensor", &name), |b| {
            b.iter(|| {
                pool.install(|| quantize_into_with(level, black_box(&x), &[N], &per_tensor, &mut q))
            })
        });
    }
    let level = SimdLevel::active();
    g.bench_function("per_channel_axis0", |b| {
        b.iter(|| {
            pool.install(|| {
                quantize_into_with(level, black_box(&x), &shape0, &per_channel0, &mut q)
            })
        })
    });
    g.bench_function("per_channel_axis_last", |b| {
        b.iter(|| {
            pool.install(|| {
                quantize_into_with(level, black_box(&x), &shape1, &per_channel1, &mut q)
            })
        })
    });
    g.bench_function("reference_per_tensor", |b| {
        b.iter(|| {
            pool.install(|| {
                quantize_into_with(
                    SimdLevel::Reference,
                    black_box(&x),
                    &[N],
                    &per_tensor,
                    &mut q,
                )
            })
        })
    });
    g.bench_function("dequantize_per_tensor", |b| {
        b.iter(|| {
            pool.install(|| dequantize_into_with(level, black_box(&q), &[N], &per_tensor, &mut d))
        })
    });
    g.bench_function("dequantize_per_channel_axis0", |b| {
        b.iter(|| {
            pool.install(|| {
                dequantize_into_with(level, black_box(&q), &shape0, &per_channel0, &mut d)
            })
        })
    });
    g.finish();
}

fn histogram_add(c: &mut Criterion) {
    let x = data(1 << 22);
    let mut g = c.benchmark_group("histogram_add_16MiB_f32");
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    g.sample_size(10);
    let pool = one_thread();
    g.bench_function("fixed_abs_2048_one_thread", |b| {
        b.iter(|| {
            let mut h = Histogram::fixed_abs(2048, 4.0).expect("histogram");
            pool.install(|| h.add(black_box(&x))).expect("add");
            black_box(h.total())
        })
    });
    // Post-ReLU values: half of them exactly zero, all in one bin.
    let relu: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    g.bench_function("fixed_abs_2048_relu_one_thread", |b| {
        b.iter(|| {
            let mut h = Histogram::fixed_abs(2048, 4.0).expect("histogram");
            pool.install(|| h.add(black_box(&relu))).expect("add");
            black_box(h.total())
        })
    });
    // The same in pieces of 4096 values, as the small tensors of a
    // network's last layers arrive (under the sub-histograms' threshold).
    g.bench_function("fixed_abs_2048_relu_4096_pieces_one_thread", |b| {
        b.iter(|| {
            let mut h = Histogram::fixed_abs(2048, 4.0).expect("histogram");
            pool.install(|| {
                relu.chunks(4096)
                    .try_for_each(|piece| h.add(black_box(piece)))
            })
            .expect("add");
            black_box(h.total())
        })
    });
    // Pieces of 16384, about what one tensor of a batch of 25 brings on
    // the ResNet-50 fixture (40M values in 2100 pieces over a
    // calibration): over the threshold, so each piece pays for its own
    // sub-histograms.
    g.bench_function("fixed_abs_2048_relu_16384_pieces_one_thread", |b| {
        b.iter(|| {
            let mut h = Histogram::fixed_abs(2048, 4.0).expect("histogram");
            pool.install(|| {
                relu.chunks(16384)
                    .try_for_each(|piece| h.add(black_box(piece)))
            })
            .expect("add");
            black_box(h.total())
        })
    });
    g.bench_function("dynamic_abs_2048_all_threads", |b| {
        b.iter(|| {
            let mut h = Histogram::dynamic_abs(2048).expect("histogram");
            h.add(black_box(&x)).expect("add");
            black_box(h.total())
        })
    });
    g.finish();
}

fn range_search(c: &mut Criterion) {
    // A post-ReLU-like histogram: half zeros, a decaying tail, a few outliers.
    let mut x: Vec<f32> = data(1 << 20)
        .into_iter()
        .map(|v| (v * v * 0.1).max(0.0))
        .collect();
    x.iter_mut().step_by(2).for_each(|v| *v = 0.0);
    x.extend([20.0, 18.0, 15.0]);
    let mut h = Histogram::fixed_abs(2048, 20.0).expect("histogram");
    h.add(&x).expect("add");
    let pool = one_thread();
    let mut g = c.benchmark_group("range_search_2048_bins");
    g.bench_function("entropy_modelopt_one_thread", |b| {
        b.iter(|| {
            pool.install(|| {
                entropy_search(black_box(h.counts()), EntropyVariant::Modelopt, 128, 128)
            })
        })
    });
    // The same values without the three far outliers, binned up to their
    // largest |x| as calibration does: mass reaches the last bins, so few
    // candidates end on an empty bin (which the search skips at once) and
    // nearly all cost their full 128 groups.
    let spread = &x[..x.len() - 3];
    let top = spread.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut full = Histogram::fixed_abs(2048, top).expect("histogram");
    full.add(spread).expect("add");
    g.bench_function("entropy_spike_aware_full_range_one_thread", |b| {
        b.iter(|| {
            pool.install(|| {
                entropy_search(
                    black_box(full.counts()),
                    EntropyVariant::SpikeAware,
                    128,
                    128,
                )
            })
        })
    });
    g.bench_function("mse_one_thread", |b| {
        b.iter(|| pool.install(|| mse_search(black_box(h.counts()), 128)))
    });
    g.finish();
}

criterion_group!(benches, quantize_vs_memcpy, histogram_add, range_search);
criterion_main!(benches);
