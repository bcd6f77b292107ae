//! The error type of this crate.

use qint8_graph::GraphError;

/// Everything that can go wrong compiling or running a graph.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The graph is invalid, unsupported, or its shapes do not fit.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// An input was not provided.
    #[error("missing input {0}")]
    MissingInput(String),
    /// An input name that the graph does not have.
    #[error("unknown input {name}; the graph's inputs are {known:?}")]
    UnknownInput {
        /// The name given.
        name: String,
        /// The graph's input names.
        known: Vec<String>,
    },
    /// An input's shape does not fit the graph.
    #[error("input {name}: shape {got:?} does not match the declared {expected}")]
    InputShape {
        /// Input name.
        name: String,
        /// Declared shape, printed.
        expected: String,
        /// Given shape.
        got: Vec<usize>,
    },
    /// A node cannot be executed as configured.
    #[error("node {node} ({op}): {detail}")]
    Node {
        /// Node name.
        node: String,
        /// Operator type.
        op: String,
        /// What is wrong.
        detail: String,
    },
    /// An observer asked to stop.
    #[error("observer: {0}")]
    Observer(String),
    /// A quantization computation failed.
    #[error(transparent)]
    Math(#[from] qint8_math::MathError),
    /// No backward rule exists for these operators (each named once).
    #[error("no gradient rule for operator(s) {}", .0.join(", "))]
    NoGradient(Vec<String>),
    /// A backward pass got inconsistent inputs.
    #[error("gradient: {0}")]
    Gradient(String),
    /// The thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

/// Result alias for this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
