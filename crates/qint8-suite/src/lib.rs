//! Helpers shared by the cross-crate test suites: fixture paths and an
//! onnxruntime oracle driven through Python.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's `fixtures/` directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The six fixture model files (three architectures, two exporters).
pub fn fixture_models() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for name in ["resnet50", "vgg16_bn", "efficientnet_b0"] {
        for suffix in ["", "_dynamo"] {
            v.push(
                fixtures()
                    .join("models")
                    .join(format!("{name}{suffix}.onnx")),
            );
        }
    }
    v
}

/// Whether `python3` can import onnxruntime and numpy.
pub fn onnxruntime_available() -> bool {
    Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `model` in onnxruntime (CPU, `threads` threads) on the NPY file
/// `input` (fed to the first input) and writes the first output to `output`.
pub fn onnxruntime_run(
    model: &Path,
    input: &Path,
    output: &Path,
    threads: usize,
) -> Result<(), String> {
    let script = r#"
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[4]); so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
y = s.run(None, {s.get_inputs()[0].name: x})[0]
np.save(sys.argv[3], y.astype(np.float32))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(model)
        .arg(input)
        .arg(output)
        .arg(threads.to_string())
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(())
}

/// Largest absolute difference divided by the largest magnitude of the reference.
pub fn relative_max_error(reference: &[f32], got: &[f32]) -> f32 {
    let scale = reference
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-12);
    let err = reference
        .iter()
        .zip(got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if reference.len() != got.len() {
        return f32::INFINITY;
    }
    err / scale
}

/// The first output of `model` run by qint8 (2 threads) on `x` fed to `input`.
pub fn qint8_output(
    model: &qint8_graph::Model,
    input: &str,
    x: ndarray::ArrayViewD<'_, f32>,
) -> Result<ndarray::ArrayD<f32>, qint8_runtime::RuntimeError> {
    let opts = qint8_runtime::SessionOptions {
        threads: 2,
        ..Default::default()
    };
    let session = qint8_runtime::Session::new(model, opts)?;
    Ok(session.run(&[(input, x)])?.swap_remove(0))
}

/// The first output of the ONNX file `model` run by onnxruntime (2 threads)
/// on `x`, exchanged through NPY files named after `tag` in `dir`.
pub fn onnxruntime_output(
    model: &Path,
    x: &ndarray::ArrayD<f32>,
    dir: &Path,
    tag: &str,
) -> Result<ndarray::ArrayD<f32>, String> {
    use qint8_calibration::dataset::npy::{read_npy_f32, write_npy_f32};
    let input = dir.join(format!("{tag}.x.npy"));
    let output = dir.join(format!("{tag}.y.npy"));
    write_npy_f32(&input, x).map_err(|e| e.to_string())?;
    onnxruntime_run(model, &input, &output, 2)?;
    read_npy_f32(&output).map_err(|e| e.to_string())
}
