//! The error type of this crate.

/// Everything that can go wrong in quantization arithmetic.
///
/// Variants carry the values a user needs to find the problem in their data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MathError {
    /// A range bound, scale or data value was NaN or infinite.
    #[error("non-finite {what}: {value}")]
    NonFinite {
        /// What was being read (for example "amax" or "histogram input").
        what: &'static str,
        /// The offending value.
        value: f32,
    },
    /// A data slice holds a NaN or infinity at `index`.
    #[error("non-finite value {value} at index {index} of {what}")]
    NonFiniteData {
        /// What was being read.
        what: &'static str,
        /// Flat index of the first offending element.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// A symmetric range was given a negative `amax`.
    #[error("amax must be >= 0, got {0}")]
    NegativeAmax(f32),
    /// An affine range had `min > max`.
    #[error("range min {min} is greater than max {max}")]
    InvertedRange {
        /// Lower bound as given.
        min: f32,
        /// Upper bound as given.
        max: f32,
    },
    /// A scale was zero, negative or non-finite.
    #[error("scale must be positive and finite, got {0}")]
    BadScale(f32),
    /// A zero point lies outside the integer range of its type.
    #[error("zero point {zero_point} outside [{qmin}, {qmax}]")]
    BadZeroPoint {
        /// The zero point.
        zero_point: i32,
        /// Lowest representable value.
        qmin: i32,
        /// Highest representable value.
        qmax: i32,
    },
    /// Two buffers that must have the same length do not.
    #[error("length mismatch in {what}: expected {expected}, got {got}")]
    LengthMismatch {
        /// Which buffers.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The shape given for a buffer does not match the buffer or the parameters.
    #[error("shape mismatch in {what}: {detail}")]
    ShapeMismatch {
        /// Which operation.
        what: &'static str,
        /// Human-readable detail (expected vs got).
        detail: String,
    },
    /// A per-channel axis is out of range for the tensor's rank.
    #[error("axis {axis} out of range for a tensor of rank {rank}")]
    BadAxis {
        /// The axis.
        axis: usize,
        /// The tensor's rank.
        rank: usize,
    },
    /// Per-channel parameters were requested with no channels.
    #[error("per-channel parameters need at least one channel")]
    NoChannels,
    /// The integer output type does not match the parameters' dtype.
    #[error("output type {got} does not match the parameters' dtype {expected}")]
    DtypeMismatch {
        /// The parameters' dtype.
        expected: &'static str,
        /// The output buffer's element type.
        got: &'static str,
    },
    /// A histogram was configured with an unusable number of bins or range.
    #[error("invalid histogram configuration: {0}")]
    BadHistogram(String),
    /// Two histograms cannot be merged.
    #[error("histograms cannot be merged: {0}")]
    HistogramMismatch(String),
    /// A range search was asked of a histogram that holds no data.
    #[error("histogram is empty")]
    EmptyHistogram,
    /// A method parameter is out of its valid range.
    #[error("invalid parameter {name} = {value}: {expected}")]
    BadParameter {
        /// Parameter name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What is allowed.
        expected: &'static str,
    },
}

/// Result alias for this crate.
pub type Result<T, E = MathError> = std::result::Result<T, E>;
