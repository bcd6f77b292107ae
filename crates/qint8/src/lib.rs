//! qint8: make trained neural networks INT8.
//!
//! Load an FP32 ONNX model, calibrate its activation ranges on
//! representative images (TensorRT's entropy method by default; min-max,
//! percentile and MSE too), then evaluate the quantized model on qint8's
//! CPU runtime (integer convolutions where the CPU has AVX-512 VNNI, the
//! rest simulated) and export what deployment tools read: an
//! explicitly quantized QDQ ONNX file for TensorRT 10+ and onnxruntime, or
//! a TensorRT calibration cache.
//!
//! This crate is a facade: each module re-exports one crate of the
//! workspace, [`ptq`] strings them into the post-training quantization
//! pipeline, [`qat`] fine-tunes its result with INT8 simulated, and
//! [`prelude`] imports the common items at once.
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`math`] | `qint8-math` | quantization parameters, quantize/dequantize, histograms, range search, error metrics |
//! | [`graph`] | `qint8-graph` | ONNX I/O, graph IR, shape inference, passes, `QuantPlan`, Q/DQ placement and rewriting, model zoo |
//! | [`runtime`] | `qint8-runtime` | CPU execution of FP32 and QDQ graphs, observers |
//! | [`calibration`] | `qint8-calibration` | datasets (IDX, image folders, NPY), preprocessing, the calibrator |
//! | [`trt`] | `qint8-trt` | TensorRT calibration caches, checker of TensorRT's Q/DQ rules; with the `cuda` feature, `trt::cuda`: GPU execution, and calibration through `calibration::calibrate_on` |
//! | [`eval`] | `qint8-eval` | accuracy, per-layer error, size, latency |
//! | [`analysis`] | `qint8-analysis` | per-node sensitivity, mixed precision, reports with SVG plots |
//!
//! # Quick start
//!
//! ```
//! use qint8::prelude::*;
//!
//! # fn main() -> qint8::Result<()> {
//! // An FP32 model: here a small ResNet-50 from the zoo; usually
//! // `qint8::graph::onnx::load("model.onnx")?`.
//! let model = qint8::graph::zoo::build(&ZooConfig {
//!     width_mult: 0.125,
//!     resolution: (32, 32),
//!     in_channels: 1,
//!     classes: 10,
//!     ..ZooConfig::new(Arch::ResNet50)
//! })?;
//!
//! // Calibration images: here 16 synthetic 32x32 grayscale images, usually
//! // `ImageDataset::from_idx_auto(path, preprocess)` or an image folder.
//! let pixels: Vec<u8> = (0..16 * 32 * 32).map(|i| (i * 7 % 256) as u8).collect();
//! let labels = (0..16).map(|i| i % 10).collect();
//! let calib = ImageDataset::new(
//!     Images::new(16, 32, 32, 1, pixels)?,
//!     Some(labels),
//!     Preprocess::normalize(vec![0.5], vec![0.25]),
//! )?;
//!
//! // Calibrate (entropy, per-channel weights, TensorRT's Q/DQ placement).
//! let quantized = ptq::quantize(&model, &calib, &PtqConfig::default())?;
//! assert!(!quantized.plan().activations.is_empty());
//!
//! // Evaluate in INT8 and compare with FP32.
//! let int8 = quantized.evaluate(&calib, 8, 0)?;
//! let fp32 = ptq::evaluate(&model, &calib, 8, 0)?;
//! assert_eq!(int8.predictions.len(), 16);
//! println!("agreement with FP32: {}/16", int8.agreement(&fp32));
//!
//! // Save for TensorRT / onnxruntime.
//! let dir = std::env::temp_dir().join(format!("qint8-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).ok();
//! quantized.save_qdq(dir.join("model.int8.onnx"))?;
//! quantized.save_trt_cache(dir.join("model.cache"), "8601")?;
//! assert!(qint8::trt::check_file(dir.join("model.int8.onnx"))?.is_empty());
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

pub use qint8_analysis as analysis;
pub use qint8_calibration as calibration;
pub use qint8_eval as eval;
pub use qint8_graph as graph;
pub use qint8_math as math;
pub use qint8_runtime as runtime;
pub use qint8_trt as trt;

pub mod ptq;
pub mod qat;

use thiserror::Error;

/// Any error of the qint8 crates.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Quantization arithmetic.
    #[error(transparent)]
    Math(#[from] qint8_math::MathError),
    /// Model files and graphs.
    #[error(transparent)]
    Graph(#[from] qint8_graph::GraphError),
    /// Execution.
    #[error(transparent)]
    Runtime(#[from] qint8_runtime::RuntimeError),
    /// Data and calibration.
    #[error(transparent)]
    Calibration(#[from] qint8_calibration::CalibError),
    /// TensorRT caches and checks.
    #[error(transparent)]
    Trt(#[from] qint8_trt::TrtError),
    /// Evaluation.
    #[error(transparent)]
    Eval(#[from] qint8_eval::EvalError),
    /// Reports.
    #[error(transparent)]
    Analysis(#[from] qint8_analysis::AnalysisError),
    /// Quantization-aware training.
    #[error(transparent)]
    Qat(#[from] qint8_qat::QatError),
}

/// Result with [`Error`](enum@Error).
pub type Result<T> = std::result::Result<T, Error>;

/// The commonly used items in one import.
pub mod prelude {
    pub use crate::ptq::{self, PtqConfig, QuantizedModel};
    pub use crate::qat::{self, QatConfig};
    pub use crate::{Error, Result};
    pub use qint8_calibration::{ColorMode, ImageDataset, Images, Preprocess, Smoothing};
    pub use qint8_eval::{Accuracy, Score};
    pub use qint8_graph::zoo::{Arch, ZooConfig};
    pub use qint8_graph::{Graph, Model, PlacementPolicy, QuantPlan, WeightStorage};
    pub use qint8_math::search::RangeMethod;
    pub use qint8_runtime::{Session, SessionOptions};
    pub use qint8_trt::CalibrationCache;
}
