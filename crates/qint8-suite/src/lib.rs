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

/// Runs `model` in onnxruntime (CPU, `threads` threads, default graph
/// optimizations) on the NPY file `input` (fed to the first input) and
/// writes the first output to `output`.
pub fn onnxruntime_run(
    model: &Path,
    input: &Path,
    output: &Path,
    threads: usize,
) -> Result<(), String> {
    onnxruntime_run_with(model, input, output, threads, true)
}

/// [`onnxruntime_run`] with the graph optimizations on (`optimize`) or set
/// to `ORT_DISABLE_ALL`.
pub fn onnxruntime_run_with(
    model: &Path,
    input: &Path,
    output: &Path,
    threads: usize,
    optimize: bool,
) -> Result<(), String> {
    let script = r#"
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[4]); so.inter_op_num_threads = 1
if sys.argv[5] == "0":
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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
        .arg(if optimize { "1" } else { "0" })
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
    qint8_output_with(model, input, x, true)
}

/// [`qint8_output`] with the integer kernels on or off
/// ([`qint8_runtime::SessionOptions::integer`]).
pub fn qint8_output_with(
    model: &qint8_graph::Model,
    input: &str,
    x: ndarray::ArrayViewD<'_, f32>,
    integer: bool,
) -> Result<ndarray::ArrayD<f32>, qint8_runtime::RuntimeError> {
    let opts = qint8_runtime::SessionOptions {
        threads: 2,
        integer,
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

/// The first `n` images of a fixture IDX file (`fixtures/data/FILE`) with
/// their labels, preprocessed as the fixture models expect (pad 2, Fashion-MNIST
/// mean and std).
pub fn fixture_dataset(file: &str, n: usize) -> qint8_calibration::ImageDataset {
    let pre = qint8_calibration::Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    let labels = fixtures()
        .join("data")
        .join(file.replace("images-idx3", "labels-idx1"));
    qint8_calibration::ImageDataset::from_idx(
        fixtures().join("data").join(file),
        Some(&labels),
        pre,
    )
    .and_then(|d| d.take(n))
    .unwrap_or_else(|e| panic!("fixture {file}: {e}"))
}

/// Index of the largest value, as `numpy.argmax` picks it (the first on
/// ties, NaN above every number), which is what the onnxruntime side of the
/// comparisons uses.
pub use qint8_eval::accuracy::argmax;

/// How qint8 and onnxruntime classify the same images with the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// Images compared.
    pub images: usize,
    /// Same top-1 as onnxruntime with its default graph optimizations.
    pub optimized: usize,
    /// Same top-1 as onnxruntime with `ORT_DISABLE_ALL`.
    pub unoptimized: usize,
    /// qint8's correct top-1 predictions.
    pub ours_right: usize,
    /// onnxruntime's (optimized) correct top-1 predictions.
    pub theirs_right: usize,
    /// Same top-1 as onnxruntime with `ORT_DISABLE_ALL` when qint8 runs
    /// quantized convolutions in float (`SessionOptions::integer` off);
    /// the counts above are with the integer kernels where the CPU has them.
    pub unoptimized_simulated: usize,
}

/// Runs `model` (saved at `file`) in qint8 and in onnxruntime (optimized and
/// not) on `batch` and counts agreeing top-1 predictions; NPY files go to
/// `dir`.
pub fn top1_agreement(
    model: &qint8_graph::Model,
    file: &Path,
    batch: &qint8_calibration::Batch,
    dir: &Path,
) -> Result<Agreement, String> {
    use qint8_calibration::dataset::npy::{read_npy_f32, write_npy_f32};
    let input = &model.graph.inputs[0].name;
    let top1 = |integer: bool| -> Result<Vec<usize>, String> {
        let out = qint8_output_with(model, input, batch.inputs.view(), integer)
            .map_err(|e| e.to_string())?;
        let classes = out.shape()[1];
        Ok(out
            .as_slice()
            .ok_or("non-contiguous output")?
            .chunks(classes)
            .map(argmax)
            .collect())
    };
    let (ours, simulated) = (top1(true)?, top1(false)?);
    let x = dir.join("agreement.x.npy");
    write_npy_f32(&x, &batch.inputs).map_err(|e| e.to_string())?;
    let mut same = [0usize; 2];
    let mut same_simulated = 0;
    let mut theirs_right = 0;
    let labels = batch.labels.clone().unwrap_or_default();
    for (k, optimize) in [true, false].into_iter().enumerate() {
        let y = dir.join("agreement.y.npy");
        onnxruntime_run_with(file, &x, &y, 2, optimize)?;
        let theirs: Vec<f32> = read_npy_f32(&y)
            .map_err(|e| e.to_string())?
            .iter()
            .copied()
            .collect();
        let classes = theirs.len() / ours.len().max(1);
        let theirs: Vec<usize> = theirs.chunks(classes.max(1)).map(argmax).collect();
        same[k] = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
        if !optimize {
            same_simulated = simulated
                .iter()
                .zip(&theirs)
                .filter(|(a, b)| a == b)
                .count();
        }
        if optimize {
            theirs_right = theirs.iter().zip(&labels).filter(|(a, b)| a == b).count();
        }
    }
    Ok(Agreement {
        images: ours.len(),
        optimized: same[0],
        unoptimized: same[1],
        ours_right: ours.iter().zip(&labels).filter(|(a, b)| a == b).count(),
        theirs_right,
        unoptimized_simulated: same_simulated,
    })
}
