//! The typed graph IR.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::ops::Op;
use crate::tensor::{DataType, Tensor};

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// A known size.
    Fixed(usize),
    /// A named (dynamic) size, such as a batch dimension.
    Symbolic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) if s.is_empty() => write!(f, "?"),
            Dim::Symbolic(s) => write!(f, "{s}"),
        }
    }
}

/// A named value with its element type and (possibly partial) shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueInfo {
    /// Value name.
    pub name: String,
    /// Element type.
    pub dtype: DataType,
    /// Declared shape, if any.
    pub shape: Option<Vec<Dim>>,
}

impl ValueInfo {
    /// A float tensor of fixed shape.
    pub fn f32(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            dtype: DataType::Float,
            shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
        }
    }

    /// The declared shape with symbolic dimensions replaced by `fill`.
    pub fn concrete_shape(&self, fill: usize) -> Option<Vec<usize>> {
        self.shape.as_ref().map(|s| {
            s.iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Symbolic(_) => fill,
                })
                .collect()
        })
    }
}

/// A node: an operator applied to named inputs, producing named outputs.
/// An empty input name marks an omitted optional input.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Unique node name (assigned on load when the file has none).
    pub name: String,
    /// The operator.
    pub op: Op,
    /// Input value names.
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
}

impl Node {
    /// A node with the given name, op and value names.
    pub fn new(name: impl Into<String>, op: Op, inputs: &[&str], outputs: &[&str]) -> Self {
        Self {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Input `i`, if present and not omitted.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// A computation graph: nodes in topological order over named values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    /// Graph name.
    pub name: String,
    /// Runtime inputs (initializers are not listed here).
    pub inputs: Vec<ValueInfo>,
    /// Outputs.
    pub outputs: Vec<ValueInfo>,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Constant tensors by name (weights, biases, shape constants).
    pub initializers: BTreeMap<String, Tensor>,
    /// Extra type/shape information for intermediate values.
    pub value_info: Vec<ValueInfo>,
}

impl Graph {
    /// Index of the node producing `value`.
    pub fn producer(&self, value: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.outputs.iter().any(|o| o == value))
    }

    /// Indices of the nodes consuming `value`.
    pub fn consumers(&self, value: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.inputs.iter().any(|i| i == value))
            .map(|(k, _)| k)
            .collect()
    }

    /// Whether `value` is a graph output.
    pub fn is_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o.name == value)
    }

    /// Total number of elements in float initializers (the parameter count).
    pub fn parameter_count(&self) -> usize {
        self.initializers
            .values()
            .filter(|t| t.dtype() == DataType::Float)
            .map(Tensor::len)
            .sum()
    }

    /// Bytes of all initializers.
    pub fn initializer_bytes(&self) -> usize {
        self.initializers.values().map(Tensor::byte_size).sum()
    }

    /// Number of nodes of each operator type.
    pub fn op_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for n in &self.nodes {
            *m.entry(n.op.op_type()).or_insert(0) += 1;
        }
        m
    }

    /// Checks that every value is defined once before it is used, that
    /// node names are unique, and that every output is produced.
    pub fn validate(&self) -> Result<()> {
        let mut defined: HashSet<&str> = self.inputs.iter().map(|v| v.name.as_str()).collect();
        defined.extend(self.initializers.keys().map(String::as_str));
        let mut names = HashSet::new();
        for n in &self.nodes {
            if !names.insert(n.name.as_str()) {
                return Err(invalid(format!("duplicate node name {}", n.name)));
            }
            for i in &n.inputs {
                if !i.is_empty() && !defined.contains(i.as_str()) {
                    return Err(invalid(format!(
                        "node {} ({}) reads {i}, which no earlier node, input or initializer defines",
                        n.name,
                        n.op.op_type()
                    )));
                }
            }
            for o in &n.outputs {
                if !o.is_empty() && !defined.insert(o.as_str()) {
                    return Err(invalid(format!(
                        "value {o} is defined twice (node {})",
                        n.name
                    )));
                }
            }
        }
        for o in &self.outputs {
            if !defined.contains(o.name.as_str()) {
                return Err(invalid(format!(
                    "graph output {} is never produced",
                    o.name
                )));
            }
        }
        Ok(())
    }

    /// Reorders nodes topologically (stable for already sorted graphs).
    pub fn toposort(&mut self) -> Result<()> {
        let mut available: HashSet<String> = self.inputs.iter().map(|v| v.name.clone()).collect();
        available.extend(self.initializers.keys().cloned());
        let mut pending: Vec<Node> = std::mem::take(&mut self.nodes);
        let mut out = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for n in pending {
                if n.inputs
                    .iter()
                    .all(|i| i.is_empty() || available.contains(i))
                {
                    available.extend(n.outputs.iter().cloned());
                    out.push(n);
                } else {
                    rest.push(n);
                }
            }
            if rest.len() == before {
                let names: Vec<_> = rest.iter().map(|n| n.name.clone()).collect();
                self.nodes = out.into_iter().chain(rest).collect();
                return Err(invalid(format!(
                    "graph has a cycle or undefined inputs at nodes {names:?}"
                )));
            }
            pending = rest;
        }
        self.nodes = out;
        Ok(())
    }

    /// Renames value `from` to `to` in every node input and graph output.
    pub fn rename_value(&mut self, from: &str, to: &str) {
        for n in &mut self.nodes {
            for i in &mut n.inputs {
                if i == from {
                    *i = to.to_string();
                }
            }
        }
        for o in &mut self.outputs {
            if o.name == from {
                o.name = to.to_string();
            }
        }
    }

    /// Drops initializers no node reads.
    pub fn remove_unused_initializers(&mut self) {
        let used: HashSet<&str> = self
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().map(String::as_str))
            .chain(self.outputs.iter().map(|o| o.name.as_str()))
            .collect();
        let keep: HashMap<String, bool> = self
            .initializers
            .keys()
            .map(|k| (k.clone(), used.contains(k.as_str())))
            .collect();
        self.initializers
            .retain(|k, _| keep.get(k).copied().unwrap_or(false));
    }

    /// A value name not used by any input, node output or initializer.
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |s: &str| {
            self.initializers.contains_key(s)
                || self.inputs.iter().any(|v| v.name == s)
                || self
                    .nodes
                    .iter()
                    .any(|n| n.outputs.iter().any(|o| o == s) || n.name == s)
        };
        if !taken(base) {
            return base.to_string();
        }
        (1..)
            .map(|k| format!("{base}_{k}"))
            .find(|s| !taken(s))
            .unwrap_or_else(|| base.to_string())
    }
}

/// A model: a graph plus the metadata ONNX files carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// The graph.
    pub graph: Graph,
    /// Opset of the default ONNX domain.
    pub opset: i64,
    /// ONNX IR version.
    pub ir_version: i64,
    /// Producer name.
    pub producer_name: String,
    /// Producer version.
    pub producer_version: String,
}

impl Model {
    /// A model around `graph` at `opset`, produced by qint8.
    pub fn new(graph: Graph, opset: i64) -> Self {
        Self {
            graph,
            opset,
            ir_version: 8,
            producer_name: "qint8".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// A model with this one's metadata (IR version, producer) around
    /// `graph` at `opset`, without copying this model's graph (and its
    /// weights) as `..model.clone()` would.
    pub fn with_graph(&self, graph: Graph, opset: i64) -> Self {
        Self {
            graph,
            opset,
            ir_version: self.ir_version,
            producer_name: self.producer_name.clone(),
            producer_version: self.producer_version.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Graph, Model};

    #[test]
    fn with_graph_keeps_the_metadata_and_takes_the_graph_and_opset() {
        let mut m = Model::new(
            Graph {
                name: "old".into(),
                ..Default::default()
            },
            11,
        );
        m.ir_version = 7;
        m.producer_name = "exporter".into();
        m.producer_version = "2.1".into();
        let g = Graph {
            name: "new".into(),
            ..Default::default()
        };
        let q = m.with_graph(g.clone(), 13);
        assert_eq!((q.graph, q.opset, q.ir_version), (g, 13, 7));
        assert_eq!(
            (q.producer_name.as_str(), q.producer_version.as_str()),
            ("exporter", "2.1")
        );
        assert_eq!(m.graph.name, "old");
    }
}
