//! Post-training quantization of a fixture model, end to end: calibrate on
//! 1000 Fashion-MNIST images, score FP32 and simulated INT8 on the 2000
//! evaluation images, write the QDQ file.
//!
//! ```text
//! cargo run --release -p qint8 --example ptq_fixture [MODEL.onnx] [OUT.onnx]
//! ```
//!
//! MODEL defaults to the ResNet-50 fixture; OUT to a file in the system's
//! temporary directory.

use std::path::PathBuf;

use qint8::prelude::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn main() -> qint8::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures().join("models/resnet50.onnx"));
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("qint8-example.int8.onnx"));

    let model = qint8::graph::onnx::load(&model_path)?;
    // The fixtures' preprocessing: pad 28x28 to 32x32, Fashion-MNIST mean/std.
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    let calib =
        ImageDataset::from_idx_auto(fixtures().join("data/calib-images-idx3-ubyte"), pre.clone())?;
    let eval = ImageDataset::from_idx_auto(fixtures().join("data/eval-images-idx3-ubyte"), pre)?;

    let quantized = ptq::quantize(&model, &calib, &PtqConfig::default())?;
    let fp32 = ptq::evaluate(&model, &eval, 64, 0)?;
    let int8 = quantized.evaluate(&eval, 64, 0)?;
    quantized.save_qdq(&out)?;

    println!(
        "{}: {} activations and {} weights quantized ({})",
        model_path.display(),
        quantized.plan().activations.len(),
        quantized.plan().weights.len(),
        quantized.plan().method
    );
    println!(
        "top-1 fp32 {:.2}%  int8 {:.2}%  (same prediction on {} of {} images)",
        fp32.score.top1_fraction() * 100.0,
        int8.score.top1_fraction() * 100.0,
        int8.agreement(&fp32),
        eval.len()
    );
    println!(
        "wrote {} ({} TensorRT rule violations)",
        out.display(),
        qint8::trt::check_file(&out)?.len()
    );
    Ok(())
}
