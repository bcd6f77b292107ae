//! Single-thread GFLOP/s of the packed convolution GEMM on ResNet-50 shapes.
use std::sync::Arc;
use std::time::Instant;

use qint8_runtime::kernels::gemm::Mat;
use qint8_runtime::kernels::packed::{gemm_packed, Epilogue, PackedA};
use qint8_runtime::kernels::Activation;

fn main() {
    for (m, k, n) in [
        (64, 576, 3136),
        (256, 64, 3136),
        (64, 256, 3136),
        (128, 1152, 784),
        (512, 4608, 49),
        (2048, 512, 49),
    ] {
        let a = Arc::new((0..m * k).map(|i| (i % 7) as f32 * 0.1).collect::<Vec<_>>());
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let pa = PackedA::new(a, m, k);
        let bias = vec![0.0f32; m];
        let epi = Epilogue {
            bias: &bias,
            res: None,
            act: Activation::None,
        };
        let iters = 20;
        gemm_packed(&pa, Mat::row_major(&b, n), n, &mut c, n, epi, 1);
        let t = Instant::now();
        for _ in 0..iters {
            gemm_packed(&pa, Mat::row_major(&b, n), n, &mut c, n, epi, 1);
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "m={m} k={k} n={n}: {:.1} GFLOP/s",
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
}
