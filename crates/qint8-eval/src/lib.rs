//! Evaluation for qint8.
//!
//! - [`accuracy`]: top-1/top-5 with `numpy.argmax`'s tie rule, agreement of
//!   two models' predictions, and an [`Evaluator`] that scores a model
//!   (FP32, or QDQ run in INT8) on a labeled
//!   [`ImageDataset`](qint8_calibration::ImageDataset).
//! - [`layers`]: per-tensor SQNR and cosine similarity
//!   of one model's activations against another's on the same images.
//! - [`perf`]: serialized model size, batch latency and throughput, and
//!   the runtime memory a compiled plan holds.
//!
//! ```
//! use qint8_eval::accuracy::{argmax, rank_of, Score};
//!
//! let logits = [0.1f32, 2.0, 2.0, -1.0];
//! assert_eq!(argmax(&logits), 1); // the lowest index wins ties
//! assert_eq!(rank_of(&logits, 2), 1);
//! let mut s = Score::default();
//! s.add(&logits, 1);
//! s.add(&logits, 3);
//! assert_eq!((s.n, s.top1, s.top5), (2, 1, 2));
//! assert_eq!(s.top1_fraction(), 0.5);
//! ```

pub mod accuracy;
pub mod layers;
pub mod perf;

pub use accuracy::{Accuracy, Evaluator, Score};
pub use layers::{activation_errors, LayerError};
pub use perf::{model_bytes, Latency};

use thiserror::Error;

/// Errors of evaluation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EvalError {
    /// The model or data do not fit together (names what and why).
    #[error("{0}")]
    Invalid(String),
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] qint8_runtime::RuntimeError),
    /// Reading the data failed.
    #[error(transparent)]
    Data(#[from] qint8_calibration::CalibError),
    /// A metric could not be computed.
    #[error(transparent)]
    Math(#[from] qint8_math::MathError),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;
