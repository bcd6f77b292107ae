//! Single-thread GFLOP/s of the packed convolution GEMM on ResNet-50 shapes,
//! with the weights warm (one matrix reused) and cold (cycling through
//! copies larger than the last-level cache, as in a whole network).
use std::sync::Arc;
use std::time::Instant;

use qint8_runtime::kernels::gemm::Mat;
use qint8_runtime::kernels::packed::{gemm_packed, Epilogue, PackedA};
use qint8_runtime::kernels::Activation;

/// Bytes of weight copies cycled through in the cold runs.
const COLD_BYTES: usize = 96 << 20;

fn main() {
    for (m, k, n) in [
        (64, 576, 3136),
        (256, 64, 3136),
        (64, 256, 3136),
        (128, 1152, 784),
        (512, 4608, 49),
        (2048, 512, 49),
        (1024, 512, 196),
        (256, 1024, 196),
        (1024, 256, 196),
    ] {
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let copies = (COLD_BYTES / (m * k * 4)).max(2);
        let packed: Vec<PackedA> = (0..copies)
            .map(|s| {
                let a = (0..m * k).map(|i| ((i + s) % 7) as f32 * 0.1).collect();
                PackedA::new(Arc::new(a), m, k)
            })
            .collect();
        let bias = vec![0.0f32; m];
        let epi = Epilogue {
            bias: &bias,
            res: None,
            act: Activation::None,
        };
        let flops = 2.0 * (m * n * k) as f64;
        let mut rate = |cold: bool| {
            let iters = 20.max(copies);
            gemm_packed(&packed[0], Mat::row_major(&b, n), n, &mut c, n, epi, 1);
            let t = Instant::now();
            for i in 0..iters {
                let a = &packed[if cold { i % copies } else { 0 }];
                gemm_packed(a, Mat::row_major(&b, n), n, &mut c, n, epi, 1);
            }
            flops * iters as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let (warm, cold) = (rate(false), rate(true));
        println!("m={m} k={k} n={n}: warm {warm:.1} GFLOP/s, cold weights {cold:.1} GFLOP/s");
    }
}
