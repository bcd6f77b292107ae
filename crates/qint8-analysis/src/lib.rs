//! Analysis for qint8: reports on how a model quantizes.
//!
//! - [`sensitivity`]: which layer hurts: every quantizable node measured
//!   alone quantized and alone in float, and mixed precision (the fewest
//!   nodes in float for an accuracy budget, verified by evaluation).
//! - [`svg`]: small dependency-free SVG charts (bars, lines, labelled
//!   markers, linear or logarithmic axes).
//! - [`report`]: a report directory, `report.md` plus one SVG per plot: per
//!   model, a table of every calibration method (top-1, drop, calibration
//!   time, file size), activation histograms of representative layers with
//!   each method's threshold marked, top-1 per method, per-layer SQNR
//!   of the INT8 activations against FP32, and, when given, the most
//!   sensitive nodes of a sensitivity analysis.
//!
//! ```
//! use qint8_analysis::svg::{Bar, Chart};
//!
//! let chart = Chart {
//!     title: "top-1".into(),
//!     y_label: "%".into(),
//!     bars: vec![
//!         Bar { label: "fp32".into(), value: 92.4, color: "#888".into() },
//!         Bar { label: "entropy".into(), value: 92.5, color: "#1f77b4".into() },
//!     ],
//!     ..Default::default()
//! };
//! let svg = chart.to_svg();
//! assert!(svg.starts_with("<svg") && svg.matches("class=\"bar\"").count() == 2);
//! ```

mod linearized;
pub mod report;
pub mod sensitivity;
pub mod svg;

pub use report::{write_report, HistogramPlot, MethodRow, ModelReport};

use thiserror::Error;

/// Errors of analysis.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AnalysisError {
    /// Writing a report file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Inputs that cannot make a report.
    #[error("{0}")]
    Invalid(String),
}

impl From<qint8_runtime::RuntimeError> for AnalysisError {
    fn from(e: qint8_runtime::RuntimeError) -> Self {
        AnalysisError::Invalid(e.to_string())
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, AnalysisError>;
