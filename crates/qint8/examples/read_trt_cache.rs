//! Reading a TensorRT calibration cache: the header and every tensor's
//! range (`amax = scale * 127`).
//!
//! ```text
//! cargo run --release -p qint8 --example read_trt_cache [CACHE]
//! ```
//!
//! Without CACHE the example first calibrates the EfficientNet-B0 fixture
//! for TensorRT's implicit quantization (a range for every tensor) and
//! writes its cache to a temporary file, the same as
//! `qint8 quantize MODEL --calib IMAGES --trt-cache CACHE -o OUT.onnx`.

use std::path::PathBuf;

use qint8::prelude::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn main() -> qint8::Result<()> {
    let path = match std::env::args().nth(1) {
        Some(p) => PathBuf::from(p),
        None => {
            let model = qint8::graph::onnx::load(fixtures().join("models/efficientnet_b0.onnx"))?;
            let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
            let calib =
                ImageDataset::from_idx_auto(fixtures().join("data/calib-images-idx3-ubyte"), pre)?
                    .take(256)?;
            let config = PtqConfig {
                all_ranges: true,
                ..Default::default()
            };
            let path =
                std::env::temp_dir().join(format!("qint8-example-{}.cache", std::process::id()));
            ptq::quantize(&model, &calib, &config)?.save_trt_cache(&path, "8601")?;
            path
        }
    };
    let cache = CalibrationCache::read(&path)?;
    println!(
        "{}: TRT-{}-{}, {} tensors",
        path.display(),
        cache.header.version,
        cache.header.algorithm,
        cache.entries.len()
    );
    let mut ranges: Vec<(&str, f32)> = cache
        .entries
        .iter()
        .map(|(n, _)| (n.as_str(), cache.amax(n).unwrap_or(0.0)))
        .collect();
    ranges.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("widest ranges:");
    for (name, amax) in ranges.iter().take(8) {
        println!("  {amax:>10.4}  {name}");
    }
    Ok(())
}
