//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or validating a calibration
/// cache, or reading an ONNX model to check.
///
/// Cache errors carry the 1-based line number (the header is line 1). For a
/// cache built in memory and validated before writing, the line is the one
/// the entry would occupy in the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrtError {
    /// The cache text is empty or its first line is empty.
    #[error("line 1: missing header: a calibration cache starts with `TRT-<version>-<algorithm>`")]
    MissingHeader,
    /// The header is not `TRT-<version>-<algorithm>` with non-empty parts.
    #[error("line 1: malformed header {text:?}: {reason}")]
    BadHeader {
        /// The header text.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A tensor line has no `: ` between name and scale.
    #[error("line {line}: expected `<tensor name>: <hex scale>`, found no `: ` in {text:?}")]
    MissingSeparator {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A tensor name is empty or contains a newline.
    #[error("line {line}: invalid tensor name {name:?}: {reason}")]
    InvalidName {
        /// 1-based line number.
        line: usize,
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The scale is empty or has a character that is not a hexadecimal digit.
    #[error(
        "line {line}: tensor {name:?}: scale {hex:?} is not a hexadecimal float32 bit pattern"
    )]
    InvalidHex {
        /// 1-based line number.
        line: usize,
        /// Tensor name.
        name: String,
        /// The scale text.
        hex: String,
    },
    /// The scale has more than 8 hexadecimal digits (a float32 has 32 bits).
    #[error("line {line}: tensor {name:?}: scale {hex:?} has {} hex digits, a float32 has at most 8", hex.len())]
    HexTooLong {
        /// 1-based line number.
        line: usize,
        /// Tensor name.
        name: String,
        /// The scale text.
        hex: String,
    },
    /// The scale's bit pattern is NaN, infinite or negative (including -0).
    #[error("line {line}: tensor {name:?}: scale bits {bits:x} are {value}, not a finite non-negative float32")]
    InvalidScale {
        /// 1-based line number.
        line: usize,
        /// Tensor name.
        name: String,
        /// The bit pattern.
        bits: u32,
        /// The bit pattern as a float.
        value: f32,
    },
    /// A tensor appears twice.
    #[error("line {line}: tensor {name:?} appears again (first on line {first_line})")]
    DuplicateName {
        /// 1-based line number of the repeat.
        line: usize,
        /// 1-based line number of the first occurrence.
        first_line: usize,
        /// Tensor name.
        name: String,
    },
    /// An amax given to [`CalibrationCache::from_amax`](crate::CalibrationCache::from_amax)
    /// is NaN, infinite or negative.
    #[error("tensor {name:?}: amax {amax} is not a finite non-negative number")]
    InvalidAmax {
        /// Tensor name.
        name: String,
        /// The amax.
        amax: f32,
    },
    /// An operating-system I/O error.
    #[error("I/O error while {action} {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What was being done ("reading", "writing", ...).
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A calibration cache file is malformed.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line number.
        #[source]
        source: Box<TrtError>,
    },
    /// The bytes are not an ONNX model.
    #[error("{}: not a valid ONNX model ({detail})", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder reported.
        detail: String,
    },
    /// GPU execution (feature `cuda`): CUDA or a library is missing, a
    /// CUDA call failed, or the graph has something the GPU executor does
    /// not run (named).
    #[error("GPU: {0}")]
    Gpu(String),
    /// The graph could not be simplified or its shapes inferred.
    #[error(transparent)]
    Graph(#[from] qint8_graph::GraphError),
}

/// `Result` with [`TrtError`].
pub type Result<T, E = TrtError> = std::result::Result<T, E>;
