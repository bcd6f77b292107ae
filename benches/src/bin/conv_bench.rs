//! Single-thread GFLOP/s of single convolutions with ResNet-50's shapes at
//! batch 1 (whole-model and multi-thread figures come from the FP32
//! comparison script, which runs the session as users do).
//!
//! Usage: `conv_bench [--iters N] [--only SUBSTRING]`
use std::time::Instant;

/// (name, cin, h = w, cout, kernel, stride, pad).
const SHAPES: [(&str, usize, usize, usize, usize, usize, usize); 9] = [
    ("conv1 7x7/2", 3, 224, 64, 7, 2, 3),
    ("layer1 3x3", 64, 56, 64, 3, 1, 1),
    ("layer1 1x1 256->64", 256, 56, 64, 1, 1, 0),
    ("layer1 1x1 64->256", 64, 56, 256, 1, 1, 0),
    ("layer2.0 3x3/2", 128, 56, 128, 3, 2, 1),
    ("layer2 3x3", 128, 28, 128, 3, 1, 1),
    ("layer3 3x3", 256, 14, 256, 3, 1, 1),
    ("layer3 1x1 1024->256", 1024, 14, 256, 1, 1, 0),
    ("layer4 3x3", 512, 7, 512, 3, 1, 1),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(20);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    for (name, cin, hw, cout, k, s, p) in SHAPES {
        if only.is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let o = (hw + 2 * p - k) / s + 1;
        let weights: Vec<f32> = (0..cout * cin * k * k)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
            .collect();
        let conv = qint8_benches::square_conv(1, (cin, cout), hw, (k, s, p), weights).pack();
        let x: Vec<f32> = (0..cin * hw * hw)
            .map(|i| ((i % 11) as f32 - 5.0) * 0.1)
            .collect();
        let mut y = vec![0.0f32; cout * o * o];
        let mut scratch = vec![0.0f32; conv.scratch_len()];
        let flops = 2.0 * (cout * o * o * cin * k * k) as f64;
        conv.run(&x, &mut y, &mut scratch, 1);
        let t = Instant::now();
        for _ in 0..iters {
            conv.run(&x, &mut y, &mut scratch, 1);
        }
        let secs = t.elapsed().as_secs_f64() / iters as f64;
        let rate = format!("{:.3} ms {:.0} GFLOP/s", secs * 1e3, flops / secs / 1e9);
        println!("{name:22} {rate}");
    }
}
