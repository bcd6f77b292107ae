//! Quantization plans and their QDQ form.
//!
//! A [`QuantPlan`] is the currency between stages: calibration produces it,
//! the runtime simulates it, exporters write it. It names the activation
//! tensors and weight initializers to quantize with their parameters, and
//! the nodes kept in float. [`trt_placement`] chooses the tensors by
//! TensorRT's Q/DQ placement rules; [`insert_qdq`] rewrites a graph so that
//! every planned tensor passes through `QuantizeLinear` -> `DequantizeLinear`
//! (explicit quantization: what TensorRT 10 and onnxruntime consume).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use qint8_math::params::{QuantDtype, QuantParams};
use serde::{Deserialize, Serialize};

use crate::error::{GraphError, Result};
use crate::ir::{Graph, Node};
use crate::ops::Op;
use crate::tensor::Tensor;

/// Version of the plan's JSON layout.
pub const PLAN_VERSION: u32 = 1;

/// The precision a node runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Quantized inputs where the plan has parameters for them.
    #[default]
    Int8,
    /// Left in float: its inputs are not quantized for it.
    Float,
}

/// What to quantize and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct QuantPlan {
    /// [`PLAN_VERSION`].
    pub version: u32,
    /// How the ranges were chosen (informational, e.g. `entropy`).
    pub method: String,
    /// Activation tensors by value name, per-tensor parameters. One Q/DQ
    /// pair serves every consumer of a tensor.
    pub activations: BTreeMap<String, QuantParams>,
    /// Weight initializers by name, usually per output channel.
    pub weights: BTreeMap<String, QuantParams>,
    /// Nodes whose precision differs from the default ([`Precision::Int8`]).
    pub precision: BTreeMap<String, Precision>,
}

impl QuantPlan {
    /// An empty plan made by `method`.
    pub fn new(method: impl Into<String>) -> Self {
        Self {
            version: PLAN_VERSION,
            method: method.into(),
            ..Default::default()
        }
    }

    /// The precision of node `name`.
    pub fn precision_of(&self, name: &str) -> Precision {
        self.precision.get(name).copied().unwrap_or_default()
    }

    /// Checks the plan against `graph`: every tensor exists, weights are
    /// initializers whose shape fits their parameters, activations are
    /// per-tensor, every precision names a node.
    pub fn validate(&self, graph: &Graph) -> Result<()> {
        if self.version != PLAN_VERSION {
            return Err(GraphError::Invalid(format!(
                "quantization plan version {} (this build reads {PLAN_VERSION})",
                self.version
            )));
        }
        let values: BTreeSet<&str> = graph
            .inputs
            .iter()
            .map(|v| v.name.as_str())
            .chain(
                graph
                    .nodes
                    .iter()
                    .flat_map(|n| n.outputs.iter().map(String::as_str)),
            )
            .collect();
        let mut problems = Vec::new();
        for (name, p) in &self.activations {
            if !values.contains(name.as_str()) {
                problems.push(format!("activation `{name}` is not a value of the graph"));
            }
            if p.axis().is_some() {
                problems.push(format!("activation `{name}` has per-channel parameters"));
            }
        }
        for (name, p) in &self.weights {
            match graph.initializers.get(name) {
                None => problems.push(format!("weight `{name}` is not an initializer")),
                Some(t) => {
                    if let Err(e) = p.layout(t.shape()) {
                        problems.push(format!("weight `{name}` {:?}: {e}", t.shape()));
                    }
                    if t.as_f32().is_none() {
                        problems.push(format!("weight `{name}` is not float"));
                    }
                }
            }
        }
        for name in self.precision.keys() {
            if !graph.nodes.iter().any(|n| &n.name == name) {
                problems.push(format!("precision for unknown node `{name}`"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(GraphError::Invalid(format!(
                "quantization plan does not fit the graph: {}",
                problems.join("; ")
            )))
        }
    }

    /// The plan as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| GraphError::Invalid(format!("quantization plan to JSON: {e}")))
    }

    /// Reads a plan from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| GraphError::Invalid(format!("quantization plan JSON: {e}")))
    }

    /// Writes the plan as JSON, atomically (a temporary file beside `path`
    /// renamed over it, so no half-written file is left).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        crate::onnx::write_atomic(path, self.to_json()?.as_bytes())
    }

    /// Reads a plan written by [`QuantPlan::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| GraphError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text)
    }
}

/// Where quantization goes, before ranges are known.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Placement {
    /// Activation tensors (per-tensor).
    pub activations: BTreeSet<String>,
    /// Weight initializers and their channel axis.
    pub weights: BTreeMap<String, usize>,
}

/// TensorRT's Q/DQ placement ("Q/DQ layer placement" in its developer
/// guide): both inputs of every Conv, Gemm and MatMul (weights per output
/// channel: axis 0 for Conv and transposed Gemm weights, the last axis for
/// plain `[k, n]` Gemm and MatMul weights), the residual input of an Add
/// that follows a convolution (so TensorRT can fuse the Add into it), and
/// no outputs. Nodes in `float` are skipped. When both inputs of an Add come
/// from convolutions, the second is treated as the residual.
pub fn trt_placement(graph: &Graph, float: &BTreeSet<String>) -> Placement {
    let mut p = Placement::default();
    let conv_out: BTreeSet<&str> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_)))
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .collect();
    for node in graph.nodes.iter().filter(|n| !float.contains(&n.name)) {
        let weight_axis = match &node.op {
            Op::Conv(_) => Some(0),
            Op::Gemm { trans_b, .. } => Some(if *trans_b { 0 } else { 1 }),
            Op::MatMul => graph
                .initializers
                .get(node.input(1).unwrap_or(""))
                .map(|t| t.shape().len().saturating_sub(1)),
            Op::Add => {
                let ins: Vec<&str> = node.inputs.iter().map(String::as_str).collect();
                if let [a, b] = ins[..] {
                    let residual = match (conv_out.contains(a), conv_out.contains(b)) {
                        (true, _) => Some(b),
                        (false, true) => Some(a),
                        _ => None,
                    };
                    if let Some(r) = residual.filter(|r| !graph.initializers.contains_key(*r)) {
                        p.activations.insert(r.to_string());
                    }
                }
                None
            }
            _ => None,
        };
        let Some(axis) = weight_axis else { continue };
        for (i, input) in node.inputs.iter().enumerate().take(2) {
            if input.is_empty() {
                continue;
            }
            match graph.initializers.get(input) {
                Some(t) if i == 1 && t.as_f32().is_some() => {
                    p.weights
                        .insert(input.clone(), axis.min(t.shape().len().saturating_sub(1)));
                }
                Some(_) => {}
                None => {
                    p.activations.insert(input.clone());
                }
            }
        }
    }
    p
}

/// How quantized weights are stored in an exported model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightStorage {
    /// int8 initializers feeding `DequantizeLinear` (4x smaller files).
    #[default]
    Int8,
    /// float initializers through `QuantizeLinear` -> `DequantizeLinear`
    /// (the form TensorRT Model Optimizer writes).
    FloatQdq,
}

/// A copy of `graph` with every tensor of `plan` passed through
/// `QuantizeLinear` -> `DequantizeLinear`. Activations get one pair shared
/// by all consumers except nodes the plan keeps in float; weights get a pair
/// (or an int8 initializer and a `DequantizeLinear`) per quantized consumer
/// set. Scales are float32, zero points int8 or uint8 as the parameters say.
pub fn insert_qdq(graph: &Graph, plan: &QuantPlan, storage: WeightStorage) -> Result<Graph> {
    plan.validate(graph)?;
    let mut g = graph.clone();
    // Consumers that take the quantized form of a value.
    let quantized_consumers = |g: &Graph, value: &str| -> Vec<usize> {
        g.consumers(value)
            .into_iter()
            .filter(|&i| plan.precision_of(&g.nodes[i].name) == Precision::Int8)
            .collect()
    };
    // Weights: insert before their first quantized consumer.
    for (name, params) in &plan.weights {
        let consumers = quantized_consumers(&g, name);
        let Some(&first) = consumers.iter().min() else {
            continue;
        };
        let (scale_name, zp_name) = add_param_initializers(&mut g, name, params);
        let axis = params.axis().unwrap_or(0) as i64;
        let dq_out = g.fresh_name(&format!("{name}_dequantized"));
        let mut new_nodes = Vec::new();
        let dq_in = match storage {
            WeightStorage::Int8 => {
                let w = g
                    .initializers
                    .get(name)
                    .and_then(Tensor::as_f32)
                    .ok_or_else(|| {
                        GraphError::Invalid(format!("weight `{name}` is not a float initializer"))
                    })?;
                let shape = w.shape().to_vec();
                let data: Vec<f32> = w.iter().copied().collect();
                let q = quantized_tensor(&data, &shape, params)?;
                let q_name = g.fresh_name(&format!("{name}_quantized"));
                g.initializers.insert(q_name.clone(), q);
                q_name
            }
            WeightStorage::FloatQdq => {
                let q_out = g.fresh_name(&format!("{name}_quantized"));
                let q_node = g.fresh_name(&format!("{name}_QuantizeLinear"));
                new_nodes.push(Node::new(
                    q_node,
                    Op::QuantizeLinear { axis },
                    &[name, &scale_name, &zp_name],
                    &[&q_out],
                ));
                q_out
            }
        };
        let dq_node = g.fresh_name(&format!("{name}_DequantizeLinear"));
        new_nodes.push(Node::new(
            dq_node,
            Op::DequantizeLinear { axis },
            &[&dq_in, &scale_name, &zp_name],
            &[&dq_out],
        ));
        rewire(&mut g, &consumers, name, &dq_out);
        g.nodes.splice(first..first, new_nodes);
    }
    // Activations: insert right after the producer (or first for inputs).
    for (name, params) in &plan.activations {
        let consumers = quantized_consumers(&g, name);
        if consumers.is_empty() {
            continue;
        }
        let (scale_name, zp_name) = add_param_initializers(&mut g, name, params);
        let q_out = g.fresh_name(&format!("{name}_quantized"));
        let dq_out = g.fresh_name(&format!("{name}_dequantized"));
        let q_node = Node::new(
            g.fresh_name(&format!("{name}_QuantizeLinear")),
            Op::QuantizeLinear { axis: 1 },
            &[name, &scale_name, &zp_name],
            &[&q_out],
        );
        let dq_node = Node::new(
            g.fresh_name(&format!("{name}_DequantizeLinear")),
            Op::DequantizeLinear { axis: 1 },
            &[&q_out, &scale_name, &zp_name],
            &[&dq_out],
        );
        rewire(&mut g, &consumers, name, &dq_out);
        let at = g.producer(name).map_or(0, |p| p + 1);
        g.nodes.splice(at..at, [q_node, dq_node]);
    }
    // Float weights every consumer now reads as int8 are gone.
    g.remove_unused_initializers();
    g.validate()?;
    Ok(g)
}

/// Adds the scale and zero point of `params` for tensor `name` as
/// initializers; returns their names.
fn add_param_initializers(g: &mut Graph, name: &str, params: &QuantParams) -> (String, String) {
    let (scale, zp) = param_tensors(params);
    let scale_name = g.fresh_name(&format!("{name}_scale"));
    g.initializers.insert(scale_name.clone(), scale);
    let zp_name = g.fresh_name(&format!("{name}_zero_point"));
    g.initializers.insert(zp_name.clone(), zp);
    (scale_name, zp_name)
}

/// Points input `from` of the nodes at `indices` to `to`.
fn rewire(g: &mut Graph, indices: &[usize], from: &str, to: &str) {
    for &i in indices {
        for input in g.nodes[i].inputs.iter_mut().filter(|s| *s == from) {
            *input = to.to_string();
        }
    }
}

/// Scale (scalar or 1-D) and zero point tensors of `params`.
fn param_tensors(params: &QuantParams) -> (Tensor, Tensor) {
    let scales = params.scales();
    let zps = params.zero_points();
    let per_channel = params.axis().is_some();
    let shape: Vec<usize> = if per_channel {
        vec![scales.len()]
    } else {
        vec![]
    };
    let scale = Tensor::F32(
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), scales)
            .unwrap_or_else(|_| ndarray::ArrayD::zeros(ndarray::IxDyn(&shape))),
    );
    let zp = match params.channels().first().map(dtype_of) {
        Some(QuantDtype::Uint8) => Tensor::U8(
            ndarray::ArrayD::from_shape_vec(
                ndarray::IxDyn(&shape),
                zps.iter().map(|&z| z.clamp(0, 255) as u8).collect(),
            )
            .unwrap_or_else(|_| ndarray::ArrayD::zeros(ndarray::IxDyn(&shape))),
        ),
        _ => Tensor::I8(
            ndarray::ArrayD::from_shape_vec(
                ndarray::IxDyn(&shape),
                zps.iter().map(|&z| z.clamp(-128, 127) as i8).collect(),
            )
            .unwrap_or_else(|_| ndarray::ArrayD::zeros(ndarray::IxDyn(&shape))),
        ),
    };
    (scale, zp)
}

/// The integer type of a channel's range.
fn dtype_of(c: &qint8_math::ChannelParams) -> QuantDtype {
    if c.qmin < 0 {
        QuantDtype::Int8
    } else {
        QuantDtype::Uint8
    }
}

/// `data` quantized with `params` as an int8 or uint8 tensor of `shape`.
fn quantized_tensor(data: &[f32], shape: &[usize], params: &QuantParams) -> Result<Tensor> {
    let err = |e: qint8_math::MathError| GraphError::Invalid(format!("quantizing a weight: {e}"));
    let dim = ndarray::IxDyn(shape);
    let bad_shape = |e: ndarray::ShapeError| GraphError::Invalid(format!("weight shape: {e}"));
    Ok(match params.channels().first().map(dtype_of) {
        Some(QuantDtype::Uint8) => {
            let q: Vec<u8> = qint8_math::quant::quantize(data, shape, params).map_err(err)?;
            Tensor::U8(ndarray::ArrayD::from_shape_vec(dim, q).map_err(bad_shape)?)
        }
        _ => {
            let q: Vec<i8> = qint8_math::quant::quantize(data, shape, params).map_err(err)?;
            Tensor::I8(ndarray::ArrayD::from_shape_vec(dim, q).map_err(bad_shape)?)
        }
    })
}

/// Reads the plan a QDQ graph encodes (made by qint8 or another tool):
/// each `DequantizeLinear` with constant scale and zero point gives the
/// parameters of the tensor its `QuantizeLinear` quantizes (an activation)
/// or of the initializer it dequantizes (a weight, keyed by the float
/// initializer when one is quantized in the graph, else by the integer one).
pub fn plan_from_qdq(graph: &Graph) -> Result<QuantPlan> {
    let mut plan = QuantPlan::new("imported");
    let producers: HashMap<&str, &Node> = graph
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
        .collect();
    for node in &graph.nodes {
        let Op::DequantizeLinear { axis } = node.op else {
            continue;
        };
        let (Some(x), Some(scale)) = (node.input(0), node.input(1)) else {
            continue;
        };
        let scale_t = graph.initializers.get(scale).ok_or_else(|| {
            GraphError::Invalid(format!(
                "{}: scale `{scale}` is not a constant, cannot import",
                node.name
            ))
        })?;
        let scales = scale_t.to_f32_vec();
        let zps: Vec<i64> = match node.input(2).and_then(|z| graph.initializers.get(z)) {
            Some(t) => t.to_i64_vec().unwrap_or_default(),
            None => vec![0; scales.len()],
        };
        let dtype = match node.input(2).and_then(|z| graph.initializers.get(z)) {
            Some(Tensor::I8(_)) => QuantDtype::Int8,
            _ => QuantDtype::Uint8,
        };
        let channels = scales
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let z = zps.get(i).or(zps.first()).copied().unwrap_or(0) as i32;
                qint8_math::params::ChannelParams::new(s, z, dtype, false)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| GraphError::Invalid(format!("{}: {e}", node.name)))?;
        let params = if let [only] = channels[..] {
            QuantParams::per_tensor(only)
        } else if channels.is_empty() {
            return Err(GraphError::Invalid(format!(
                "{}: empty scale `{scale}`",
                node.name
            )));
        } else {
            let rank = graph
                .initializers
                .get(x)
                .map(|t| t.shape().len() as i64)
                .unwrap_or(4);
            let axis = if axis < 0 { axis + rank } else { axis };
            QuantParams::per_channel(channels, axis.max(0) as usize)
                .map_err(|e| GraphError::Invalid(format!("{}: {e}", node.name)))?
        };
        if graph.initializers.contains_key(x) {
            plan.weights.insert(x.to_string(), params);
            continue;
        }
        // x is a QuantizeLinear's output: the quantized tensor is its input.
        match producers.get(x) {
            Some(q) if matches!(q.op, Op::QuantizeLinear { .. }) => {
                let source = q.input(0).unwrap_or_default().to_string();
                if graph.initializers.contains_key(&source) {
                    plan.weights.insert(source, params);
                } else {
                    plan.activations.insert(source, params);
                }
            }
            _ => {}
        }
    }
    Ok(plan)
}
