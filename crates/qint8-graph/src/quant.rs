//! Quantization plans and their QDQ form.
//!
//! A [`QuantPlan`] is the currency between stages: calibration produces it,
//! the runtime simulates it, exporters write it. It names the activation
//! tensors and weight initializers to quantize with their parameters, and
//! the nodes kept in float. [`trt_placement`] chooses the tensors by
//! TensorRT's Q/DQ placement rules, [`ort_placement`] as onnxruntime's QDQ
//! quantizer does ([`placement`] picks by [`PlacementPolicy`]);
//! [`insert_qdq`] rewrites a graph so that every planned tensor passes
//! through `QuantizeLinear` -> `DequantizeLinear` (explicit quantization:
//! what TensorRT 10 and onnxruntime consume).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use qint8_math::params::{QuantDtype, QuantParams};
use serde::{Deserialize, Serialize};

use crate::error::{GraphError, Result};
use crate::ir::{Graph, Node};
use crate::ops::Op;
use crate::tensor::{DataType, Tensor};

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
    /// Activations that take the parameters of another tensor instead of
    /// their own range (the output of a max pool or reshape shares its
    /// input's scale): tensor -> tensor whose parameters it reuses. Every
    /// key and value is also in `activations`, and no value is itself a key
    /// (chains are resolved to the tensor that owns the parameters).
    pub shared: BTreeMap<String, String>,
}

/// Which tensors a plan quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPolicy {
    /// TensorRT's Q/DQ placement rules (see [`trt_placement`]).
    #[default]
    TensorRt,
    /// Every tensor onnxruntime's QDQ quantizer would quantize (see
    /// [`ort_placement`]).
    OnnxRuntime,
}

/// TensorRT's Q/DQ placement ("Q/DQ layer placement" in its developer
/// guide): both inputs of every Conv, Gemm and MatMul, attention's products
/// of two activations included (weights per output
/// channel: axis 0 for Conv and transposed Gemm weights, the last axis for
/// plain `[k, n]` Gemm and MatMul weights), the residual input of an Add
/// that follows a quantized convolution (so TensorRT can fuse the Add into
/// it), and no outputs. Nodes in `float` are skipped. A convolution in
/// `float` cannot take an Add into an INT8 epilogue, so an Add that follows
/// only float convolutions keeps its residual in float: a pair there would
/// cost accuracy and buy no fusion. When both inputs of an Add come from
/// quantized convolutions, the second is treated as the residual.
pub fn trt_placement(graph: &Graph, float: &BTreeSet<String>) -> Placement {
    let mut p = Placement::default();
    let conv_out: BTreeSet<&str> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_)) && !float.contains(&n.name))
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .collect();
    for node in graph.nodes.iter().filter(|n| !float.contains(&n.name)) {
        let weight_axis = match &node.op {
            Op::Conv(_) => Some(0),
            Op::Gemm { trans_b, .. } => Some(if *trans_b { 0 } else { 1 }),
            // Attention's products of two activations too: TensorRT runs a
            // MatMul in INT8 only when both inputs come from a Q/DQ pair.
            Op::MatMul => Some(
                graph
                    .initializers
                    .get(node.input(1).unwrap_or(""))
                    .map_or(0, |t| t.shape().len().saturating_sub(1)),
            ),
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

/// The tensors onnxruntime's static QDQ quantizer marks for quantization
/// (`onnxruntime.quantization.quantize_static` with `QuantFormat.QDQ`, the
/// default operator types, `per_channel=True` and symmetric int8
/// activations), on the operators of qint8's IR. Nodes in `float` are
/// skipped, as onnxruntime skips `nodes_to_exclude`.
///
/// What onnxruntime does, read from its Python package
/// (`onnxruntime/quantization/`, version 1.32):
///
/// - *Which operators* (`quantize.py`, `registry.py`): with no
///   `op_types_to_quantize`, every type of `QLinearOpsRegistry` and
///   `QDQRegistry` is quantized. Of qint8's operators those are Conv, Gemm,
///   MatMul, Add, Mul, Relu, Clip, Sigmoid, MaxPool, AveragePool,
///   GlobalAveragePool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze,
///   Concat, Softmax, Gather, Where and BatchNormalization; Sub, Div,
///   HardSigmoid, HardSwish, ReduceMean, Cast, Shape, Expand and the rest
///   stay float.
/// - *Marking* (`qdq_quantizer.py`, `QDQQuantizer.quantize_model`): nodes are
///   visited in graph order and each operator's quantizer marks tensors;
///   only float tensors can be marked (`_is_tensor_quantizable`), a tensor
///   that is already the output of a `DequantizeLinear` is left alone, and
///   every marked activation gets one Q/DQ pair shared by all its consumers
///   (`DedicatedQDQPair` is off), graph outputs included.
/// - *Inputs and outputs* (`operators/qdq_base_operator.py`): an operator
///   without a dedicated class (Add, Mul, Sigmoid, GlobalAveragePool,
///   Concat, Softmax) has every input and every output quantized, each with
///   its own calibrated range. Conv and Gemm (`operators/conv.py`,
///   `operators/gemm.py`) quantize input 0, the weight and the output;
///   MatMul (`operators/matmul.py`) every input and the output;
///   BatchNormalization (`operators/norm.py`) input 0 and its outputs.
///   Unlike TensorRT's rules, outputs of Conv/Gemm/MatMul are quantized.
/// - *Shared scales* (`operators/direct_q8.py` `QDQDirect8BitOp` for Reshape,
///   Transpose, Squeeze, Unsqueeze, Flatten and AveragePool;
///   `operators/maxpool.py` for MaxPool, from opset 12 only: a [`Graph`]
///   carries no opset, so opset >= 12 is assumed, as in the fixtures and
///   qint8's exports; `operators/gather.py`): the output is quantized with the
///   scale and zero point of input 0 (`quantize_output_same_as_input`), and
///   only when input 0 is already marked when the node is visited (by its
///   producer or an earlier consumer). Such outputs are keys of
///   [`Placement::shared`]. Where (`operators/where.py`) quantizes its output,
///   with its own range, when both data inputs are marked.
/// - *Relu and Clip* (`operators/activation.py`, `QDQRemovableActivation`):
///   nothing happens unless the input is already marked. With asymmetric
///   activations (onnxruntime's default) the node is deleted and its
///   producer writes the activation's output, so no Q/DQ stays between, say,
///   a Conv and its Relu. With symmetric activations (this policy, and the
///   only kind qint8 calibrates) the node stays and both its input and output
///   are quantized; `adjust_tensor_ranges` (`base_quantizer.py`) gives the
///   input of every quantized Relu/Clip with exactly one consumer the range
///   of the output, so the Conv (or Add) output shares the Relu output's
///   parameters. A zero-point-0 quantizer commutes with Relu, so after the
///   Relu the extra pair on its input changes nothing: the two pairs act
///   like the single one the asymmetric removal leaves.
/// - *Weights* (`is_tensor_per_channel`, `_calc_initializer_quant_params` in
///   `qdq_quantizer.py`): per channel, symmetric, on axis 0 for Conv, axis 0
///   (`transB = 1`) or 1 for Gemm, axis 1 for every constant MatMul operand
///   of rank >= 2. A weight input that is not an initializer is quantized as
///   an activation.
/// - *Bias* (`quantize_bias_tensor`, `quantize_bias_static` in
///   `qdq_quantizer.py`, `quantize_bias_static_impl` in `base_quantizer.py`):
///   constant Conv and Gemm biases (and BatchNormalization's B) are stored
///   as int32 `round(b / s_b)` with zero point 0 and scale
///   `s_b = s_input * s_weight[c]` (times Gemm's beta), read through a
///   `DequantizeLinear`; when `|b|` would overflow int32 with that scale,
///   the weight's scale is enlarged (`_adjust_weight_scale_for_int32_bias`).
///
/// Differences, because a [`Placement`] (and the [`QuantPlan`] made from it)
/// cannot express them:
///
/// - Biases stay float. A plan has no int32 type (`QuantDtype` is int8 or
///   uint8), a bias scale is derived from two other tensors' parameters
///   rather than calibrated, and qint8's runtime dequantizes int8/uint8
///   only. onnxruntime's bias differs from the float one by at most
///   `s_input * s_weight[c] / 2` per output channel (and in the rare
///   weight-scale enlargement above).
/// - Float initializers that onnxruntime quantizes *per tensor* stay float:
///   constant inputs of Add, Mul, Concat and Where (onnxruntime uses the
///   activation type for them), a constant Gemm input
///   A, constant MatMul operands of rank < 2, BatchNormalization's scale and
///   a constant Gather data input (whose output then is not quantized
///   either). [`Placement::weights`] holds per-channel axes only.
/// - Softmax outputs get their observed maximum (calibration never clips
///   them); onnxruntime fixes the range to `[0, 1]` (`adjust_tensor_ranges`).
/// - Relu/Clip chains: onnxruntime copies the range an intermediate output
///   had before its own consumer's adjustment; here every shared tensor maps
///   to the end of its chain (see [`Placement::shared`]).
/// - Graph outputs are planned as onnxruntime marks them, but
///   [`insert_qdq`] only rewrites tensors that have consumers.
pub fn ort_placement(graph: &Graph, float: &BTreeSet<String>) -> Placement {
    let mut m = OrtMarks::new(graph);
    // Relu/Clip (input, output) pairs whose input takes the output's range.
    let mut adopt_range: Vec<(&str, &str)> = Vec::new();
    for node in graph.nodes.iter().filter(|n| !float.contains(&n.name)) {
        let (Some(x), Some(y)) = (node.input(0), node.outputs.first().map(String::as_str)) else {
            continue;
        };
        match &node.op {
            Op::Conv(_) | Op::Gemm { .. } => {
                m.activation(x);
                m.activation(y);
                let axis = match node.op {
                    Op::Gemm { trans_b: false, .. } => 1,
                    _ => 0,
                };
                if let Some(w) = node.input(1) {
                    m.weight(w, axis);
                }
            }
            Op::MatMul => {
                for input in node.inputs.iter().filter(|s| !s.is_empty()) {
                    if graph.initializers.contains_key(input) {
                        m.weight(input, 1);
                    } else {
                        m.activation(input);
                    }
                }
                m.activation(y);
            }
            Op::Add
            | Op::Mul
            | Op::Sigmoid
            | Op::GlobalAveragePool
            | Op::Concat { .. }
            | Op::Softmax { .. } => {
                for t in node.inputs.iter().chain(&node.outputs) {
                    m.activation(t);
                }
            }
            Op::BatchNormalization { .. } => {
                m.activation(x);
                if let Some(scale) = node.input(1) {
                    if !graph.initializers.contains_key(scale) {
                        m.activation(scale);
                    }
                }
                for t in &node.outputs {
                    m.activation(t);
                }
            }
            Op::Relu | Op::Clip { .. } => {
                if m.marked(x) {
                    m.activation(x);
                    m.activation(y);
                }
                if m.uses.get(x) == Some(&1) {
                    adopt_range.push((x, y));
                }
            }
            Op::MaxPool(_)
            | Op::AveragePool(_)
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Flatten { .. }
            | Op::Gather { .. }
                if m.marked(x) =>
            {
                m.share(y, x);
            }
            Op::Where
                if node.input(1).is_some_and(|a| m.marked(a))
                    && node.input(2).is_some_and(|b| m.marked(b)) =>
            {
                for t in &node.outputs {
                    m.activation(t);
                }
            }
            _ => {}
        }
    }
    // Ranges are adopted in graph order from whatever the output had then.
    let mut range_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (x, y) in adopt_range {
        let source = range_of.get(y).copied().unwrap_or(y);
        range_of.insert(x, source);
    }
    let mut p = m.placement;
    for (x, source) in range_of {
        // A tensor already sharing its input's parameters ignores its range.
        if p.activations.contains(x) && p.activations.contains(source) && !p.shared.contains_key(x)
        {
            p.shared.insert(x.to_string(), source.to_string());
        }
    }
    p.shared = resolve_shared(&p.shared);
    p
}

/// Follows every chain of `shared` to its end (a tensor with its own
/// parameters); entries caught in a cycle are dropped.
fn resolve_shared(shared: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for key in shared.keys() {
        let mut at = key;
        let mut steps = 0;
        while let Some(next) = shared.get(at) {
            at = next;
            steps += 1;
            if steps > shared.len() {
                break;
            }
        }
        if steps <= shared.len() && at != key {
            out.insert(key.clone(), at.clone());
        }
    }
    out
}

/// The marking state of [`ort_placement`].
struct OrtMarks<'g> {
    graph: &'g Graph,
    /// Float-typed values (inputs, initializers, node outputs).
    floats: BTreeSet<&'g str>,
    /// Outputs of `DequantizeLinear` nodes already in the graph.
    dequantized: BTreeSet<&'g str>,
    /// How many node inputs read each value.
    uses: HashMap<&'g str, usize>,
    placement: Placement,
}

impl<'g> OrtMarks<'g> {
    fn new(graph: &'g Graph) -> Self {
        let mut uses = HashMap::new();
        for input in graph.nodes.iter().flat_map(|n| &n.inputs) {
            if !input.is_empty() {
                *uses.entry(input.as_str()).or_insert(0) += 1;
            }
        }
        Self {
            graph,
            floats: float_values(graph),
            dequantized: graph
                .nodes
                .iter()
                .filter(|n| matches!(n.op, Op::DequantizeLinear { .. }))
                .flat_map(|n| n.outputs.iter().map(String::as_str))
                .collect(),
            uses,
            placement: Placement::default(),
        }
    }

    /// Whether `name` is a float activation that may get a Q/DQ pair.
    fn quantizable(&self, name: &str) -> bool {
        !name.is_empty()
            && !self.graph.initializers.contains_key(name)
            && self.floats.contains(name)
            && !self.dequantized.contains(name)
    }

    /// Whether `name` is marked as an activation.
    fn marked(&self, name: &str) -> bool {
        self.placement.activations.contains(name)
    }

    /// Marks an activation with its own range (no-op for initializers:
    /// onnxruntime's per-tensor initializers are not expressible).
    fn activation(&mut self, name: &str) {
        if self.quantizable(name) {
            self.placement.activations.insert(name.to_string());
        }
    }

    /// Marks `output` to reuse the parameters of `input`.
    fn share(&mut self, output: &str, input: &str) {
        if self.quantizable(output) {
            self.placement.activations.insert(output.to_string());
            self.placement
                .shared
                .insert(output.to_string(), input.to_string());
        }
    }

    /// A weight input: per channel on `axis` when it is a float initializer
    /// of rank > `axis`, an activation when it is not constant.
    fn weight(&mut self, name: &str, axis: usize) {
        match self.graph.initializers.get(name) {
            Some(t) if t.as_f32().is_some() && axis < t.shape().len() => {
                self.placement.weights.insert(name.to_string(), axis);
            }
            Some(_) => {}
            None => self.activation(name),
        }
    }
}

/// Names of the float-typed values of `graph`: float inputs and
/// initializers, and node outputs whose type follows from the operator
/// (the type of input 0 for most; Shape, Equal and QuantizeLinear give
/// integers; Cast, Constant and ConstantOfShape say).
fn float_values(graph: &Graph) -> BTreeSet<&str> {
    let mut f: BTreeSet<&str> = graph
        .inputs
        .iter()
        .filter(|v| v.dtype == DataType::Float)
        .map(|v| v.name.as_str())
        .collect();
    f.extend(
        graph
            .initializers
            .iter()
            .filter(|(_, t)| t.dtype() == DataType::Float)
            .map(|(n, _)| n.as_str()),
    );
    for node in &graph.nodes {
        let is_float = {
            let from = |i: usize| node.input(i).is_some_and(|n| f.contains(n));
            match &node.op {
                Op::Shape { .. } | Op::Equal | Op::QuantizeLinear { .. } => false,
                Op::Cast { to } => DataType::from_onnx(*to) == Some(DataType::Float),
                Op::Constant(t) => t.dtype() == DataType::Float,
                Op::ConstantOfShape { value } => value.dtype() == DataType::Float,
                Op::DequantizeLinear { .. } => true,
                Op::Where => from(1),
                _ => from(0),
            }
        };
        if is_float {
            f.extend(
                node.outputs
                    .iter()
                    .filter(|o| !o.is_empty())
                    .map(String::as_str),
            );
        }
    }
    f
}

/// The placement `policy` chooses for `graph`, skipping nodes in `float`.
pub fn placement(graph: &Graph, policy: PlacementPolicy, float: &BTreeSet<String>) -> Placement {
    match policy {
        PlacementPolicy::TensorRt => trt_placement(graph, float),
        PlacementPolicy::OnnxRuntime => ort_placement(graph, float),
    }
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
    insert_qdq_owned(graph.clone(), plan, storage)
}

/// [`insert_qdq`], taking the graph: its weights are not copied.
pub fn insert_qdq_owned(graph: Graph, plan: &QuantPlan, storage: WeightStorage) -> Result<Graph> {
    plan.validate(&graph)?;
    // The original node list, read while `g` gains pairs.
    let original = graph.nodes.clone();
    let mut g = graph;
    let mut names = Names::of(&g);
    // Consumers (by index into the original node list) that take the
    // quantized form of each value. Rewiring only renames inputs to fresh
    // names, so these stay valid while pairs are added.
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, n) in original.iter().enumerate() {
        if plan.precision_of(&n.name) != Precision::Int8 {
            continue;
        }
        for i in &n.inputs {
            let list = consumers.entry(i.as_str()).or_default();
            if list.last() != Some(&k) {
                list.push(k);
            }
        }
    }
    let producer: HashMap<&str, usize> = original
        .iter()
        .enumerate()
        .flat_map(|(k, n)| n.outputs.iter().map(move |o| (o.as_str(), k)))
        .collect();
    // New nodes go before node k (`before[k]`, weights, in the order they
    // are made) or after it (`after[k]`, activations, each new pair ahead
    // of earlier ones, as inserting right after the producer would put
    // it); graph inputs' pairs go first (`after_inputs`).
    let count = original.len();
    let mut before: Vec<Vec<Node>> = vec![Vec::new(); count];
    let mut after: Vec<Vec<Node>> = vec![Vec::new(); count];
    let mut after_inputs: Vec<Node> = Vec::new();
    // Weights: before their first quantized consumer.
    for (name, params) in &plan.weights {
        let Some(consumers) = consumers.get(name.as_str()) else {
            continue;
        };
        let Some(&first) = consumers.first() else {
            continue;
        };
        let (scale_name, zp_name) = add_param_initializers(&mut g, &mut names, name, params);
        let axis = params.axis().unwrap_or(0) as i64;
        let dq_out = names.fresh(&format!("{name}_dequantized"));
        let dq_in = match storage {
            WeightStorage::Int8 => {
                let w = g
                    .initializers
                    .get(name)
                    .and_then(Tensor::as_f32)
                    .ok_or_else(|| {
                        GraphError::Invalid(format!("weight `{name}` is not a float initializer"))
                    })?;
                let q = match w.as_slice() {
                    Some(data) => quantized_tensor(data, w.shape(), params)?,
                    None => {
                        let data: Vec<f32> = w.iter().copied().collect();
                        quantized_tensor(&data, w.shape(), params)?
                    }
                };
                let q_name = names.fresh(&format!("{name}_quantized"));
                g.initializers.insert(q_name.clone(), q);
                q_name
            }
            WeightStorage::FloatQdq => {
                let q_out = names.fresh(&format!("{name}_quantized"));
                let q_node = names.fresh(&format!("{name}_QuantizeLinear"));
                before[first].push(Node::new(
                    q_node,
                    Op::QuantizeLinear { axis },
                    &[name, &scale_name, &zp_name],
                    &[&q_out],
                ));
                q_out
            }
        };
        let dq_node = names.fresh(&format!("{name}_DequantizeLinear"));
        before[first].push(Node::new(
            dq_node,
            Op::DequantizeLinear { axis },
            &[&dq_in, &scale_name, &zp_name],
            &[&dq_out],
        ));
        rewire(&mut g, consumers, name, &dq_out);
    }
    // Activations: right after the producer (or first for inputs).
    for (name, params) in &plan.activations {
        let Some(consumers) = consumers.get(name.as_str()) else {
            continue;
        };
        let (scale_name, zp_name) = add_param_initializers(&mut g, &mut names, name, params);
        let q_out = names.fresh(&format!("{name}_quantized"));
        let dq_out = names.fresh(&format!("{name}_dequantized"));
        let q_node = Node::new(
            names.fresh(&format!("{name}_QuantizeLinear")),
            Op::QuantizeLinear { axis: 1 },
            &[name, &scale_name, &zp_name],
            &[&q_out],
        );
        let dq_node = Node::new(
            names.fresh(&format!("{name}_DequantizeLinear")),
            Op::DequantizeLinear { axis: 1 },
            &[&q_out, &scale_name, &zp_name],
            &[&dq_out],
        );
        rewire(&mut g, consumers, name, &dq_out);
        let slot = match producer.get(name.as_str()) {
            Some(&p) => &mut after[p],
            None => &mut after_inputs,
        };
        slot.splice(0..0, [q_node, dq_node]);
    }
    let old = std::mem::take(&mut g.nodes);
    let mut nodes =
        Vec::with_capacity(old.len() + 4 * plan.activations.len() + 2 * plan.weights.len());
    nodes.append(&mut after_inputs);
    for ((node, mut pre), mut post) in old.into_iter().zip(before).zip(after) {
        nodes.append(&mut pre);
        nodes.push(node);
        nodes.append(&mut post);
    }
    g.nodes = nodes;
    // Float weights every consumer now reads as int8 are gone.
    g.remove_unused_initializers();
    g.validate()?;
    Ok(g)
}

/// Every name a graph's values and nodes use, for making fresh ones
/// without a scan of the graph per name ([`Graph::fresh_name`]'s rule).
struct Names(HashSet<String>);

impl Names {
    fn of(g: &Graph) -> Self {
        let mut s: HashSet<String> = g.initializers.keys().cloned().collect();
        s.extend(g.inputs.iter().map(|v| v.name.clone()));
        for n in &g.nodes {
            s.extend(n.outputs.iter().cloned());
            s.insert(n.name.clone());
        }
        Self(s)
    }

    /// `base`, or `base_k` for the first free `k`; the name is taken from
    /// then on.
    fn fresh(&mut self, base: &str) -> String {
        let name = if self.0.contains(base) {
            (1..)
                .map(|k| format!("{base}_{k}"))
                .find(|s| !self.0.contains(s))
                .unwrap_or_else(|| base.to_string())
        } else {
            base.to_string()
        };
        self.0.insert(name.clone());
        name
    }
}

/// Adds the scale and zero point of `params` for tensor `name` as
/// initializers; returns their names.
fn add_param_initializers(
    g: &mut Graph,
    names: &mut Names,
    name: &str,
    params: &QuantParams,
) -> (String, String) {
    let (scale, zp) = param_tensors(params);
    let scale_name = names.fresh(&format!("{name}_scale"));
    g.initializers.insert(scale_name.clone(), scale);
    let zp_name = names.fresh(&format!("{name}_zero_point"));
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

/// The parameters a `QuantizeLinear` or `DequantizeLinear` node applies
/// to `x`: constant scale (scalar or per channel along `axis`) and zero
/// point (uint8 when absent, as ONNX defines). `Ok(None)` where the scale
/// is absent.
fn node_params(graph: &Graph, node: &Node, axis: i64) -> Result<Option<QuantParams>> {
    let (Some(x), Some(scale)) = (node.input(0), node.input(1)) else {
        return Ok(None);
    };
    let scale_t = graph.initializers.get(scale).ok_or_else(|| {
        GraphError::Invalid(format!(
            "{}: scale `{scale}` is not a constant, cannot import",
            node.name
        ))
    })?;
    let scales = scale_t.to_f32_vec();
    let zp_t = node.input(2).and_then(|z| graph.initializers.get(z));
    let zps: Vec<i64> = zp_t
        .and_then(Tensor::to_i64_vec)
        .unwrap_or_else(|| vec![0; scales.len()]);
    let dtype = match zp_t {
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
    Ok(Some(if let [only] = channels[..] {
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
    }))
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
        let Some(params) = node_params(graph, node, axis)? else {
            continue;
        };
        let x = node.input(0).unwrap_or_default();
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

/// What [`restore_float_weights`] did, by node name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RestoredWeights {
    /// Nodes whose weights now hold the FP32 values.
    pub restored: Vec<String>,
    /// Nodes that keep the dequantized weights, with the reason.
    pub kept: Vec<(String, String)>,
}

/// Puts FP32 weights in place of the dequantized ones in `graph` (a float
/// graph from [`float_from_qdq`] of a model that stores its weights as
/// integers), so that it computes the FP32 network and quantizing it
/// measures the weights' rounding again. `fp32` is the float graph the QDQ
/// model was made from, simplified as the quantizer simplified it
/// (BatchNorm folded). For each node with a planned weight, the node of the
/// same name in `fp32` must hold an initializer of the same shape at the
/// same input whose every value rounds, under the plan's parameters, to the
/// integer the file stores (a value within a rounding of a step's midpoint
/// counts); otherwise the node keeps the dequantized weight and the reason
/// is listed (a rescaled weight, another model).
pub fn restore_float_weights(
    graph: &mut Graph,
    plan: &QuantPlan,
    fp32: &Graph,
) -> Result<RestoredWeights> {
    let mut done = RestoredWeights::default();
    let by_name: HashMap<&str, &Node> = fp32.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut replace: Vec<(String, Tensor)> = Vec::new();
    for node in &graph.nodes {
        let weights: Vec<(usize, &String)> = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, i)| plan.weights.contains_key(i.as_str()))
            .collect();
        if weights.is_empty() {
            continue;
        }
        let Some(theirs) = by_name.get(node.name.as_str()) else {
            done.kept.push((
                node.name.clone(),
                "no node of that name in the FP32 model".into(),
            ));
            continue;
        };
        let mut why: Option<String> = None;
        let mut found: Vec<(String, Tensor)> = Vec::new();
        for (k, name) in weights {
            let (Some(ours), Some(fp)) = (
                graph
                    .initializers
                    .get(name.as_str())
                    .and_then(Tensor::as_f32),
                theirs
                    .input(k)
                    .and_then(|n| fp32.initializers.get(n))
                    .and_then(Tensor::as_f32),
            ) else {
                why = Some(format!(
                    "input {k} is not a float initializer in the FP32 model"
                ));
                break;
            };
            if ours.shape() != fp.shape() {
                why = Some(format!(
                    "input {k} has shape {:?} in the FP32 model, {:?} in the file",
                    fp.shape(),
                    ours.shape()
                ));
                break;
            }
            let ours: Vec<f32> = ours.iter().copied().collect();
            let fp_values: Vec<f32> = fp.iter().copied().collect();
            let rounded =
                qint8_math::quant::fake_quant(&fp_values, fp.shape(), &plan.weights[name])
                    .map_err(|e| GraphError::Invalid(format!("{}: {e}", node.name)))?;
            // A value that rounds to another integer must sit at a step's
            // midpoint (up to float rounding, as when BatchNorm was folded
            // in another order).
            let off = ours
                .iter()
                .zip(&rounded)
                .zip(&fp_values)
                .filter(|((d, r), w)| d != r && (**w - **d).abs() > 0.5001 * (**r - **d).abs())
                .count();
            if off > 0 {
                why = Some(format!(
                    "{off} of the {} FP32 values of input {k} do not round to the file's integers",
                    ours.len()
                ));
                break;
            }
            found.push((name.clone(), Tensor::F32(fp.clone())));
        }
        match why {
            Some(w) => done.kept.push((node.name.clone(), w)),
            None => {
                done.restored.push(node.name.clone());
                replace.extend(found);
            }
        }
    }
    for (name, t) in replace {
        graph.initializers.insert(name, t);
    }
    Ok(done)
}

/// A QDQ graph (made by qint8 or another tool) as the float graph and the
/// plan it encodes, such that [`insert_qdq`] of the two computes what the
/// QDQ graph computes:
///
/// - each `QuantizeLinear` -> `DequantizeLinear` pair goes; the nodes that
///   read the pair read its float input, which the plan quantizes (as an
///   activation, or as a weight when it is an initializer);
/// - each integer initializer read through a `DequantizeLinear` becomes a
///   float initializer of its dequantized values under that node's output
///   name: a weight of the plan when it is 8-bit (quantizing it again gives
///   the same integers), a float bias when it is int32 (its rounding, on a
///   step of input scale times weight scale, is left out);
/// - a node that reads a planned tensor directly (not through its pair),
///   and nothing through a pair, is kept in float ([`Precision::Float`]);
/// - a graph output read through a pair gets an `Identity` from the float
///   tensor, so that the pair is kept and the output keeps its name.
///
/// Scales and zero points may be initializers or `Constant` nodes (as
/// exporters write them); the latter are read as initializers.
///
/// Errors name every construct a plan cannot hold: a tensor quantized with
/// two different parameters, a node that reads one planned tensor through
/// its pair and another directly, a pair whose two halves disagree, a
/// `QuantizeLinear` read by anything but `DequantizeLinear`, a
/// `DequantizeLinear` of anything but an integer initializer or a
/// `QuantizeLinear`.
pub fn float_from_qdq(graph: &Graph) -> Result<(Graph, QuantPlan)> {
    // Constant nodes (exporters write scales and zero points as such) read
    // as the initializers they are.
    let outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
    let constant = |n: &Node| {
        matches!(n.op, Op::Constant(_)) && n.outputs.iter().all(|o| !outputs.contains(o.as_str()))
    };
    let folded;
    let graph = if graph.nodes.iter().any(constant) {
        let mut g = graph.clone();
        for n in graph.nodes.iter().filter(|n| constant(n)) {
            if let (Op::Constant(t), Some(out)) = (&n.op, n.outputs.first()) {
                g.initializers.insert(out.clone(), t.clone());
            }
        }
        g.nodes.retain(|n| !constant(n));
        folded = g;
        &folded
    } else {
        graph
    };
    let mut plan = QuantPlan::new("imported");
    let producers: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(k, n)| n.outputs.iter().map(move |o| (o.as_str(), k)))
        .collect();
    let mut problems: Vec<String> = Vec::new();
    let mut removed: HashSet<usize> = HashSet::new();
    // Output of a removed DequantizeLinear -> the float tensor read instead.
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut initializers = graph.initializers.clone();
    // Dequantized 8-bit initializers: weights read through their pair.
    let mut dequantized: HashSet<String> = HashSet::new();
    let mut names = Names::of(graph);
    // Relu nodes standing in for pairs whose range starts at 0, by the
    // tensor they read, and where they go (the first pair's position).
    let mut relu_of: HashMap<String, String> = HashMap::new();
    let mut emit: HashMap<usize, Node> = HashMap::new();
    let plan_param = |plan: &mut QuantPlan, name: &str, weight: bool, p: QuantParams| {
        let map = if weight {
            &mut plan.weights
        } else {
            &mut plan.activations
        };
        match map.get(name) {
            Some(old) if *old != p => Err(format!(
                "`{name}` is quantized with two different parameters"
            )),
            _ => {
                map.insert(name.to_string(), p);
                Ok(())
            }
        }
    };
    for (k, node) in graph.nodes.iter().enumerate() {
        let Op::DequantizeLinear { axis } = node.op else {
            continue;
        };
        let (Some(x), Some(out)) = (node.input(0), node.outputs.first()) else {
            problems.push(format!(
                "{}: DequantizeLinear without input or output",
                node.name
            ));
            continue;
        };
        // Read in place from the file's initializers (no copy).
        match graph.initializers.get(x) {
            Some(t @ (Tensor::I8(_) | Tensor::U8(_))) => {
                let Some(p) = node_params(graph, node, axis)? else {
                    problems.push(format!("{}: no scale", node.name));
                    continue;
                };
                let values = if let Tensor::I8(a) = t {
                    let q: Vec<i8> = a.iter().copied().collect();
                    qint8_math::quant::dequantize(&q, a.shape(), &p)
                } else if let Tensor::U8(a) = t {
                    let q: Vec<u8> = a.iter().copied().collect();
                    qint8_math::quant::dequantize(&q, a.shape(), &p)
                } else {
                    continue;
                }
                .map_err(|e| GraphError::Invalid(format!("{}: {e}", node.name)))?;
                let w = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(t.shape()), values)
                    .map_err(|e| GraphError::Invalid(format!("{}: {e}", node.name)))?;
                initializers.insert(out.clone(), Tensor::F32(w));
                if let Err(e) = plan_param(&mut plan, out, true, p) {
                    problems.push(e);
                }
                dequantized.insert(out.clone());
                removed.insert(k);
            }
            Some(Tensor::I32(a)) => {
                // A bias: (q - zero point) * scale, per element or for all.
                let scale = node
                    .input(1)
                    .and_then(|n| graph.initializers.get(n))
                    .map(Tensor::to_f32_vec)
                    .unwrap_or_default();
                let zp = node
                    .input(2)
                    .and_then(|n| graph.initializers.get(n))
                    .and_then(Tensor::to_i64_vec)
                    .unwrap_or_default();
                let n = a.len();
                if !(scale.len() == 1 || scale.len() == n) || !(zp.len() <= 1 || zp.len() == n) {
                    problems.push(format!(
                        "{}: int32 `{x}` of {n} values with {} scales and {} zero points",
                        node.name,
                        scale.len(),
                        zp.len()
                    ));
                    continue;
                }
                let values: Vec<f32> = a
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| {
                        let z = zp.get(i).or(zp.first()).copied().unwrap_or(0);
                        let s = scale.get(i).or(scale.first()).copied().unwrap_or(1.0);
                        ((q as i64 - z) as f64 * s as f64) as f32
                    })
                    .collect();
                let b = ndarray::ArrayD::from_shape_vec(a.raw_dim(), values)
                    .map_err(|e| GraphError::Invalid(format!("{}: {e}", node.name)))?;
                initializers.insert(out.clone(), Tensor::F32(b));
                removed.insert(k);
            }
            Some(_) => problems.push(format!(
                "{}: DequantizeLinear of `{x}`, which is not an integer initializer",
                node.name
            )),
            None => {
                let q = producers.get(x).map(|&i| (i, &graph.nodes[i]));
                let Some((
                    qi,
                    qn @ Node {
                        op: Op::QuantizeLinear { axis: q_axis },
                        ..
                    },
                )) = q
                else {
                    problems.push(format!(
                        "{}: DequantizeLinear of `{x}`, which no QuantizeLinear makes",
                        node.name
                    ));
                    continue;
                };
                let (Some(src), Some(p), Some(qp)) = (
                    qn.input(0),
                    node_params(graph, node, axis)?,
                    node_params(graph, qn, *q_axis)?,
                ) else {
                    problems.push(format!("{}: no scale", node.name));
                    continue;
                };
                if p != qp {
                    problems.push(format!(
                        "{} and {}: QuantizeLinear and DequantizeLinear of `{src}` with different parameters",
                        qn.name, node.name
                    ));
                    continue;
                }
                let weight = initializers.contains_key(src);
                // A pair whose range starts at 0 also sets negative values
                // to 0: some quantizers drop a Relu before such a pair and
                // leave that to it (onnxruntime's quantize_static does), so
                // the float graph gets the Relu back (a no-op on a tensor
                // that is never negative).
                let floor = !weight && p.channels().iter().all(|c| c.zero_point == c.qmin);
                let read = match floor {
                    true => relu_of
                        .entry(src.to_string())
                        .or_insert_with(|| {
                            let out = names.fresh(&format!("{src}_relu"));
                            let name = names.fresh(&format!("{src}_Relu"));
                            emit.insert(k, Node::new(name, Op::Relu, &[src], &[&out]));
                            out
                        })
                        .clone(),
                    false => src.to_string(),
                };
                if let Err(e) = plan_param(&mut plan, &read, weight, p) {
                    problems.push(e);
                }
                alias.insert(out.clone(), read);
                removed.insert(k);
                removed.insert(qi);
            }
        }
    }
    // Every QuantizeLinear must feed imported DequantizeLinear nodes only.
    for (k, node) in graph.nodes.iter().enumerate() {
        if !matches!(node.op, Op::QuantizeLinear { .. }) {
            continue;
        }
        let out = node.outputs.first().map(String::as_str).unwrap_or_default();
        let mut readers: Vec<&str> = graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| n.inputs.iter().any(|s| s == out) && !removed.contains(i))
            .map(|(_, n)| n.name.as_str())
            .collect();
        if graph.outputs.iter().any(|v| v.name == out) {
            readers.push("the graph's outputs");
        }
        if !removed.contains(&k) || !readers.is_empty() {
            problems.push(format!(
                "{}: QuantizeLinear read by {} (only a DequantizeLinear can follow it)",
                node.name,
                if readers.is_empty() {
                    "nothing".to_string()
                } else {
                    readers.join(", ")
                }
            ));
        }
    }
    let mut nodes: Vec<Node> = Vec::with_capacity(graph.nodes.len());
    let mut precision: BTreeMap<String, Precision> = BTreeMap::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        if let Some(relu) = emit.remove(&k) {
            nodes.push(relu);
        }
        if removed.contains(&k) {
            continue;
        }
        let mut n = node.clone();
        let (mut through_pair, mut direct) = (Vec::new(), Vec::new());
        for input in n.inputs.iter_mut().filter(|s| !s.is_empty()) {
            if let Some(src) = alias.get(input.as_str()) {
                through_pair.push(src.clone());
                *input = src.clone();
            } else if dequantized.contains(input.as_str()) {
                through_pair.push(input.clone());
            } else if plan.activations.contains_key(input.as_str())
                || plan.weights.contains_key(input.as_str())
            {
                direct.push(input.clone());
            }
        }
        match (through_pair.is_empty(), direct.is_empty()) {
            (_, true) => {}
            (true, false) => {
                precision.insert(n.name.clone(), Precision::Float);
            }
            (false, false) => problems.push(format!(
                "{}: reads {} quantized and {} in float (a plan quantizes a tensor for all the nodes that quantize their inputs)",
                n.name,
                through_pair.join(", "),
                direct.join(", ")
            )),
        }
        nodes.push(n);
    }
    if !problems.is_empty() {
        return Err(GraphError::Invalid(format!(
            "cannot read the QDQ graph as a float graph and a plan: {}",
            problems.join("; ")
        )));
    }
    // Graph outputs read through a pair keep it: an Identity of the float
    // tensor, named as the output.
    for out in &graph.outputs {
        if let Some(src) = alias.get(&out.name) {
            let name = names.fresh(&format!("{}_Identity", out.name));
            nodes.push(Node::new(name, Op::Identity, &[src], &[&out.name]));
        }
    }
    plan.precision = precision;
    let used: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .chain(graph.outputs.iter().map(|v| v.name.as_str()))
        .collect();
    initializers.retain(|name, _| used.contains(name.as_str()));
    let values: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .chain(graph.inputs.iter().map(|v| v.name.as_str()))
        .collect();
    let g = Graph {
        name: graph.name.clone(),
        inputs: graph.inputs.clone(),
        outputs: graph.outputs.clone(),
        value_info: graph
            .value_info
            .iter()
            .filter(|v| values.contains(v.name.as_str()))
            .cloned()
            .collect(),
        nodes,
        initializers,
    };
    plan.validate(&g)?;
    Ok((g, plan))
}
