//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong loading, checking, transforming or saving a graph.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GraphError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bytes are not a valid ONNX protobuf.
    #[error("{path}: not a valid ONNX model ({detail})")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder reported.
        detail: String,
    },
    /// The model is structurally invalid.
    #[error("invalid model: {0}")]
    Invalid(String),
    /// The model uses operators qint8 does not support; every one is listed.
    #[error("unsupported operators ({} nodes): {}", .0.len(), format_unsupported(.0))]
    Unsupported(Vec<UnsupportedOp>),
    /// A node's attribute is missing or has the wrong type or value.
    #[error("node {node} ({op}): attribute {attr}: {detail}")]
    Attribute {
        /// Node name.
        node: String,
        /// Operator type.
        op: String,
        /// Attribute name.
        attr: String,
        /// What is wrong.
        detail: String,
    },
    /// A tensor's data is malformed (size mismatch, bad external data, unsupported type).
    #[error("tensor {name}: {detail}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// Shapes of a node's inputs do not fit together.
    #[error("node {node} ({op}): {detail}")]
    Shape {
        /// Node name.
        node: String,
        /// Operator type.
        op: String,
        /// What is wrong (expected vs got).
        detail: String,
    },
    /// A quantization parameter computation failed.
    #[error(transparent)]
    Math(#[from] qint8_math::MathError),
}

/// One node whose operator is not supported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedOp {
    /// Node name.
    pub node: String,
    /// Operator type (with domain when not the default one).
    pub op_type: String,
    /// Why (for example "unknown operator" or "opset 9 not handled").
    pub reason: String,
}

fn format_unsupported(v: &[UnsupportedOp]) -> String {
    // One entry per operator type and reason, in order of first use, with
    // a few of its nodes: a model with 200 unsupported nodes of 8 types
    // reads as 8 entries.
    let mut groups: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for u in v {
        match groups
            .iter_mut()
            .find(|g| g.0 == u.op_type && g.1 == u.reason)
        {
            Some(g) => g.2.push(&u.node),
            None => groups.push((&u.op_type, &u.reason, vec![&u.node])),
        }
    }
    groups
        .iter()
        .map(|(op, reason, nodes)| {
            const SHOWN: usize = 3;
            let mut names = nodes[..nodes.len().min(SHOWN)].join(", ");
            if nodes.len() > SHOWN {
                names.push_str(&format!(" and {} more", nodes.len() - SHOWN));
            }
            let count = match nodes.len() {
                1 => "1 node".to_string(),
                n => format!("{n} nodes"),
            };
            format!("{op}: {reason} ({count}: {names})")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Result alias for this crate.
pub type Result<T, E = GraphError> = std::result::Result<T, E>;

pub(crate) fn invalid(msg: impl Into<String>) -> GraphError {
    GraphError::Invalid(msg.into())
}
