//! TensorRT-facing output of qint8.
//!
//! - [`cache`]: TensorRT's legacy (implicit-quantization) calibration cache,
//!   `TRT-<version>-<algorithm>` followed by one `name: <hex scale>` line per
//!   tensor, written atomically and parsed strictly.
//! - [`check`]: a checker for TensorRT's explicit-quantization rules (opset,
//!   QOperator/integer operators, symmetric int8 Q/DQ, per-channel weight
//!   axes, unquantized Conv/Gemm/MatMul inputs), run on the raw ONNX protobuf
//!   so it also sees operators qint8's IR does not support.
//!
//! Malformed input (cache text, ONNX bytes) gives a [`TrtError`] naming the
//! line or file, never a panic.
//!
//! ```
//! use qint8_trt::CalibrationCache;
//!
//! // The version is copied verbatim into the header: pass the one of the
//! // TensorRT build that will read the cache.
//! let cache = CalibrationCache::from_amax(
//!     "8601",
//!     "EntropyCalibration2",
//!     [("input", 2.54f32), ("conv1_out", 127.0), ("relu_out", 0.0)],
//! )?;
//! let text = cache.to_text();
//! assert_eq!(
//!     text,
//!     "TRT-8601-EntropyCalibration2\ninput: 3ca3d70a\nconv1_out: 3f800000\nrelu_out: 0\n"
//! );
//!
//! let parsed = CalibrationCache::parse(&text)?;
//! assert_eq!(parsed, cache);
//! assert_eq!(parsed.amax("conv1_out"), Some(127.0));
//!
//! // Files are written through a temporary sibling and a rename.
//! let path = std::env::temp_dir().join(format!("qint8-trt-doc-{}.cache", std::process::id()));
//! cache.write(&path)?;
//! assert_eq!(CalibrationCache::read(&path)?, cache);
//! std::fs::remove_file(&path).ok();
//! # Ok::<(), qint8_trt::TrtError>(())
//! ```

pub mod cache;
pub mod check;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;

pub use cache::{CacheHeader, CalibrationCache};
pub use check::{check_file, check_model, Rule, Violation};
pub use error::{Result, TrtError};
