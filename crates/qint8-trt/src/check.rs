//! A checker for TensorRT's explicit-quantization (Q/DQ) rules.
//!
//! It reads the raw ONNX protobuf rather than qint8's IR, so it also sees
//! operators the IR does not support (QOperator nodes, contrib ops). Every
//! violation is reported, not only the first. Only the main graph is
//! checked: qint8's protobuf subset does not decode subgraph attributes.
//!
//! The rules (see [`Rule`]) come from TensorRT's explicit-quantization
//! requirements: default-domain opset 13 or newer, no QOperator or integer
//! operators, symmetric int8 Q/DQ (constant int8 zero points that are all
//! zero, constant positive finite scales), per-channel weight scales along
//! the output-channel axis (0 for `Conv`, 1 for `ConvTranspose`). A warning
//! rule, [`Rule::UnquantizedInput`], flags Conv/ConvTranspose/Gemm/MatMul
//! inputs that do not come from a `DequantizeLinear`: TensorRT accepts them
//! but runs the layer in higher precision.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use prost::Message;
use qint8_graph::proto::{GraphProto, ModelProto, NodeProto, TensorProto};
use qint8_graph::DataType;

use crate::error::{Result, TrtError};

/// Oldest default-domain opset TensorRT's explicit quantization accepts:
/// per-channel `axis` on QuantizeLinear/DequantizeLinear arrived in 13.
pub const MIN_OPSET: i64 = 13;

/// Operators of the QOperator / integer formulation, which TensorRT rejects
/// (export QDQ instead). Matched in any domain: several are `com.microsoft`
/// contrib operators.
pub const INTEGER_OPS: &[&str] = &[
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "DynamicQuantizeLinear",
];

/// ONNX `INT8`.
const INT8: i32 = 3;

/// The rule a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// The default-domain opset is below [`MIN_OPSET`] or not imported.
    OpsetTooOld,
    /// A QOperator or integer operator (see [`INTEGER_OPS`]).
    IntegerOperator,
    /// A Q/DQ zero point whose element type is not int8, or a missing one
    /// that ONNX defines as uint8.
    ZeroPointNotInt8,
    /// A Q/DQ zero point that has a non-zero value or is computed at run
    /// time (TensorRT needs constant zeros).
    ZeroPointNotZero,
    /// A Q/DQ scale that is missing or not an initializer or `Constant`.
    ScaleNotConstant,
    /// A Q/DQ scale that is not a floating-point tensor of positive finite
    /// values.
    ScaleInvalid,
    /// A per-channel Q/DQ on a Conv weight with `axis` != 0, or on a
    /// ConvTranspose weight with `axis` != 1.
    WeightAxis,
    /// Warning: an input 0 or 1 of Conv/ConvTranspose/Gemm/MatMul that does
    /// not come from a DequantizeLinear, so TensorRT runs the layer in
    /// higher precision.
    UnquantizedInput,
    /// A scale or zero point whose data could not be read (malformed,
    /// unsupported type, external data unavailable), so it was not checked.
    UnreadableConstant,
    /// The model has no graph.
    NoGraph,
}

impl Rule {
    /// Whether TensorRT accepts the model anyway (the rule is advice).
    pub fn is_warning(self) -> bool {
        matches!(self, Rule::UnquantizedInput)
    }

    /// A stable kebab-case identifier, for filtering and reports.
    pub fn id(self) -> &'static str {
        match self {
            Rule::OpsetTooOld => "opset-too-old",
            Rule::IntegerOperator => "integer-operator",
            Rule::ZeroPointNotInt8 => "zero-point-not-int8",
            Rule::ZeroPointNotZero => "zero-point-not-zero",
            Rule::ScaleNotConstant => "scale-not-constant",
            Rule::ScaleInvalid => "scale-invalid",
            Rule::WeightAxis => "weight-axis",
            Rule::UnquantizedInput => "unquantized-input",
            Rule::UnreadableConstant => "unreadable-constant",
            Rule::NoGraph => "no-graph",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Node name (`<node N>` for an unnamed node, the index in the graph's
    /// node list; empty for model-level rules).
    pub node: String,
    /// Operator type (empty for model-level rules).
    pub op: String,
    /// The rule.
    pub rule: Rule,
    /// What is wrong, naming the tensors and values involved.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = if self.rule.is_warning() {
            "warning"
        } else {
            "error"
        };
        if self.node.is_empty() {
            write!(f, "{level}[{}] model: {}", self.rule, self.detail)
        } else {
            write!(
                f,
                "{level}[{}] {} ({}): {}",
                self.rule, self.node, self.op, self.detail
            )
        }
    }
}

/// Checks an in-memory model. Tensors whose data lives in external files
/// cannot be read here and are reported as [`Rule::UnreadableConstant`];
/// [`check_file`] reads them.
pub fn check_model(model: &ModelProto) -> Vec<Violation> {
    check(model, None)
}

/// Reads an ONNX file and checks it; external data is read relative to the
/// file's folder (and must stay inside it). A file that does not decode, or
/// decodes to a model without a graph (as empty or garbage bytes can), is an
/// error.
pub fn check_file(path: impl AsRef<Path>) -> Result<Vec<Violation>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| TrtError::Io {
        path: path.to_path_buf(),
        action: "reading",
        source,
    })?;
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| TrtError::Decode {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if model.graph.is_none() {
        return Err(TrtError::Decode {
            path: path.to_path_buf(),
            detail: "the model has no graph".into(),
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok(check(&model, Some(dir)))
}

fn check(model: &ModelProto, dir: Option<&Path>) -> Vec<Violation> {
    let mut out = Vec::new();
    check_opset(model, &mut out);
    let Some(graph) = &model.graph else {
        out.push(Violation {
            node: String::new(),
            op: String::new(),
            rule: Rule::NoGraph,
            detail: "the model has no graph".into(),
        });
        return out;
    };
    let mut checker = Checker::new(graph, dir);
    for (i, node) in graph.node.iter().enumerate() {
        checker.check_node(i, node);
    }
    out.append(&mut checker.out);
    out
}

fn check_opset(model: &ModelProto, out: &mut Vec<Violation>) {
    let mut found = false;
    for o in &model.opset_import {
        if !is_default_domain(&o.domain) {
            continue;
        }
        found = true;
        if o.version < MIN_OPSET {
            out.push(Violation {
                node: String::new(),
                op: String::new(),
                rule: Rule::OpsetTooOld,
                detail: format!(
                    "default-domain opset {} is below {MIN_OPSET}, the first with per-channel Q/DQ",
                    o.version
                ),
            });
        }
    }
    if !found {
        out.push(Violation {
            node: String::new(),
            op: String::new(),
            rule: Rule::OpsetTooOld,
            detail: format!(
                "the model imports no default-domain opset (needs {MIN_OPSET} or newer)"
            ),
        });
    }
}

fn is_default_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

fn is_onnx_op(node: &NodeProto, op: &str) -> bool {
    node.op_type == op && is_default_domain(&node.domain)
}

/// A present optional input (ONNX marks an omitted one with "").
fn input(node: &NodeProto, i: usize) -> Option<&str> {
    node.input
        .get(i)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

fn int_attr(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn type_name(t: i32) -> String {
    format!("{} ({t})", DataType::onnx_name(t))
}

struct Checker<'a> {
    graph: &'a GraphProto,
    dir: Option<&'a Path>,
    /// Initializers and `Constant` outputs; `Err` says why a `Constant` has
    /// no tensor value.
    consts: HashMap<&'a str, std::result::Result<Cow<'a, TensorProto>, String>>,
    /// Node index producing each value.
    producers: HashMap<&'a str, usize>,
    /// Element types and ranks declared for graph inputs and value_info.
    declared: HashMap<&'a str, (i32, Option<usize>)>,
    /// (Q/DQ node, expected axis) already checked, so a weight shared by
    /// several convolutions is reported once.
    axis_checked: HashSet<(usize, i64)>,
    out: Vec<Violation>,
}

impl<'a> Checker<'a> {
    fn new(graph: &'a GraphProto, dir: Option<&'a Path>) -> Self {
        let mut consts = HashMap::new();
        for t in &graph.initializer {
            consts.insert(t.name.as_str(), Ok(Cow::Borrowed(t)));
        }
        let mut producers = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for o in &node.output {
                producers.insert(o.as_str(), i);
            }
            if is_onnx_op(node, "Constant") {
                if let Some(o) = node.output.first() {
                    consts.insert(o.as_str(), constant_value(node));
                }
            }
        }
        let mut declared = HashMap::new();
        for v in graph.input.iter().chain(&graph.value_info) {
            let tensor_type = v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
            // Element type 0 (UNDEFINED) declares nothing.
            if let Some(t) = tensor_type.filter(|t| t.elem_type != 0) {
                let rank = t.shape.as_ref().map(|s| s.dim.len());
                declared.insert(v.name.as_str(), (t.elem_type, rank));
            }
        }
        Checker {
            graph,
            dir,
            consts,
            producers,
            declared,
            axis_checked: HashSet::new(),
            out: Vec::new(),
        }
    }

    fn push(&mut self, i: usize, node: &NodeProto, rule: Rule, detail: String) {
        let name = if node.name.is_empty() {
            format!("<node {i}>")
        } else {
            node.name.clone()
        };
        self.out.push(Violation {
            node: name,
            op: node.op_type.clone(),
            rule,
            detail,
        });
    }

    fn node(&self, i: usize) -> Option<&'a NodeProto> {
        self.graph.node.get(i)
    }

    /// The node producing `value`, if it is the default-domain `op`.
    fn produced_by(&self, value: &str, op: &str) -> Option<(usize, &'a NodeProto)> {
        let &i = self.producers.get(value)?;
        let node = self.node(i)?;
        is_onnx_op(node, op).then_some((i, node))
    }

    fn check_node(&mut self, i: usize, node: &'a NodeProto) {
        if INTEGER_OPS.contains(&node.op_type.as_str()) {
            self.push(
                i,
                node,
                Rule::IntegerOperator,
                "QOperator/integer operators are rejected by TensorRT: export QuantizeLinear/DequantizeLinear pairs instead".into(),
            );
        }
        if !is_default_domain(&node.domain) {
            return;
        }
        match node.op_type.as_str() {
            "QuantizeLinear" | "DequantizeLinear" => {
                self.check_scale(i, node);
                self.check_zero_point(i, node);
            }
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul" => {
                self.check_quantized_inputs(i, node);
                match node.op_type.as_str() {
                    "Conv" => self.check_weight_axis(node, 0),
                    "ConvTranspose" => self.check_weight_axis(node, 1),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn check_scale(&mut self, i: usize, node: &NodeProto) {
        let Some(scale) = input(node, 1) else {
            self.push(
                i,
                node,
                Rule::ScaleNotConstant,
                "the scale input (1) is missing".into(),
            );
            return;
        };
        let t = match self.consts.get(scale) {
            None => {
                self.push(
                    i,
                    node,
                    Rule::ScaleNotConstant,
                    format!("scale {scale:?} is computed at run time: TensorRT needs an initializer or Constant"),
                );
                return;
            }
            Some(Err(why)) => {
                let detail = format!("scale {scale:?} not checked: {why}");
                self.push(i, node, Rule::UnreadableConstant, detail);
                return;
            }
            Some(Ok(t)) => t.clone(),
        };
        if !matches!(t.data_type, 1 | 10 | 11 | 16) {
            let detail = format!(
                "scale {scale:?} has element type {}, not a floating-point type",
                type_name(t.data_type)
            );
            self.push(i, node, Rule::ScaleInvalid, detail);
            return;
        }
        match values(&t, self.dir) {
            Err(why) => {
                let detail = format!("scale {scale:?} not checked: {why}");
                self.push(i, node, Rule::UnreadableConstant, detail);
            }
            Ok(v) if v.is_empty() => {
                let detail = format!("scale {scale:?} has no elements");
                self.push(i, node, Rule::ScaleInvalid, detail);
            }
            Ok(v) => {
                let bad = |x: &f64| !(*x > 0.0 && x.is_finite());
                if let Some((first, x)) = v.iter().enumerate().find(|(_, x)| bad(x)) {
                    let count = v.iter().filter(|x| bad(x)).count();
                    let detail = format!(
                        "scale {scale:?}: {count} of {} values are not positive finite numbers (first: element {first} = {x})",
                        v.len()
                    );
                    self.push(i, node, Rule::ScaleInvalid, detail);
                }
            }
        }
    }

    fn check_zero_point(&mut self, i: usize, node: &NodeProto) {
        let Some(zp) = input(node, 2) else {
            self.check_missing_zero_point(i, node);
            return;
        };
        let t = match self.consts.get(zp) {
            None => {
                let detail = format!(
                    "zero point {zp:?} is computed at run time: TensorRT needs constant zeros"
                );
                self.push(i, node, Rule::ZeroPointNotZero, detail);
                return;
            }
            Some(Err(why)) => {
                let detail = format!("zero point {zp:?} not checked: {why}");
                self.push(i, node, Rule::UnreadableConstant, detail);
                return;
            }
            Some(Ok(t)) => t.clone(),
        };
        if t.data_type != INT8 {
            let detail = format!(
                "zero point {zp:?} has element type {}: TensorRT's INT8 Q/DQ is symmetric int8",
                type_name(t.data_type)
            );
            self.push(i, node, Rule::ZeroPointNotInt8, detail);
        }
        match values(&t, self.dir) {
            Ok(v) => {
                if let Some((first, x)) = v.iter().enumerate().find(|(_, x)| **x != 0.0) {
                    let count = v.iter().filter(|x| **x != 0.0).count();
                    let detail = format!(
                        "zero point {zp:?}: {count} of {} values are not 0 (first: element {first} = {x})",
                        v.len()
                    );
                    self.push(i, node, Rule::ZeroPointNotZero, detail);
                }
            }
            // A zero point of another type is already reported.
            Err(why) if t.data_type == INT8 => {
                let detail = format!("zero point {zp:?} not checked: {why}");
                self.push(i, node, Rule::UnreadableConstant, detail);
            }
            Err(_) => {}
        }
    }

    /// Without a zero point, QuantizeLinear produces uint8 (unless opset
    /// 21's `output_dtype` says otherwise), while DequantizeLinear takes the
    /// type of its input, which is checked where it is known.
    fn check_missing_zero_point(&mut self, i: usize, node: &NodeProto) {
        if node.op_type == "QuantizeLinear" {
            let detail = match int_attr(node, "output_dtype") {
                Some(t) if t == i64::from(INT8) => return,
                Some(t) => format!(
                    "zero point missing and output_dtype is {}",
                    i32::try_from(t).map_or_else(|_| t.to_string(), type_name)
                ),
                None => "zero point missing: defaults to uint8".into(),
            };
            self.push(i, node, Rule::ZeroPointNotInt8, detail);
            return;
        }
        let Some(x) = input(node, 0) else { return };
        let x_type = match self.consts.get(x) {
            Some(Ok(t)) => Some(t.data_type),
            _ => self.declared.get(x).map(|&(t, _)| t),
        };
        if let Some(t) = x_type.filter(|&t| t != INT8) {
            let detail = format!(
                "zero point missing and input {x:?} has element type {}: TensorRT's INT8 Q/DQ is int8",
                type_name(t)
            );
            self.push(i, node, Rule::ZeroPointNotInt8, detail);
        }
    }

    fn check_quantized_inputs(&mut self, i: usize, node: &NodeProto) {
        for k in 0..2 {
            let Some(x) = input(node, k) else { continue };
            if self.produced_by(x, "DequantizeLinear").is_none() {
                let detail = format!(
                    "input {k} ({x:?}) does not come from a DequantizeLinear: TensorRT runs this layer in higher precision"
                );
                self.push(i, node, Rule::UnquantizedInput, detail);
            }
        }
    }

    /// Checks the axis of a per-channel DequantizeLinear producing the
    /// weight (input 1), and of a QuantizeLinear feeding that.
    fn check_weight_axis(&mut self, conv: &NodeProto, expected: i64) {
        let Some(w) = input(conv, 1) else { return };
        let Some((dq_i, dq)) = self.produced_by(w, "DequantizeLinear") else {
            return;
        };
        let mut chain = vec![(dq_i, dq)];
        if let Some(q) = input(dq, 0).and_then(|x| self.produced_by(x, "QuantizeLinear")) {
            chain.push(q);
        }
        for (qi, q) in chain {
            if !self.axis_checked.insert((qi, expected)) {
                continue;
            }
            let per_channel = input(q, 1)
                .and_then(|s| self.consts.get(s))
                .and_then(|t| t.as_ref().ok())
                .and_then(|t| element_count(t).ok())
                .is_some_and(|n| n > 1);
            if !per_channel {
                continue;
            }
            // Opset 13+ default; older opsets are reported on their own.
            let axis = int_attr(q, "axis").unwrap_or(1);
            let resolved = if axis < 0 {
                // A negative axis counts from the weight's rank; when the
                // rank is unknown the axis cannot be judged.
                match input(q, 0).and_then(|x| self.rank(x)) {
                    Some(r) => axis.saturating_add(r),
                    None => continue,
                }
            } else {
                axis
            };
            if resolved != expected {
                let detail = format!(
                    "per-channel scale on the weight of {} {:?} uses axis {axis}: TensorRT needs axis {expected} (output channels)",
                    conv.op_type, conv.name
                );
                self.push(qi, q, Rule::WeightAxis, detail);
            }
        }
    }

    fn rank(&self, value: &str) -> Option<i64> {
        let rank = match self.consts.get(value) {
            Some(Ok(t)) => Some(t.dims.len()),
            _ => self.declared.get(value).and_then(|&(_, r)| r),
        };
        rank.and_then(|r| i64::try_from(r).ok())
    }
}

/// The tensor a `Constant` node holds, with the scalar and list attributes
/// turned into tensors.
fn constant_value(node: &NodeProto) -> std::result::Result<Cow<'_, TensorProto>, String> {
    let tensor = |data_type, dims| TensorProto {
        data_type,
        dims,
        ..Default::default()
    };
    for a in &node.attribute {
        let t =
            match a.name.as_str() {
                "value" => {
                    return a.t.as_ref().map(Cow::Borrowed).ok_or_else(|| {
                        "the Constant's `value` attribute holds no tensor".to_string()
                    })
                }
                "value_float" => TensorProto {
                    float_data: vec![a.f],
                    ..tensor(1, vec![])
                },
                "value_floats" => TensorProto {
                    float_data: a.floats.clone(),
                    ..tensor(1, vec![len_i64(a.floats.len())])
                },
                "value_int" => TensorProto {
                    int64_data: vec![a.i],
                    ..tensor(7, vec![])
                },
                "value_ints" => TensorProto {
                    int64_data: a.ints.clone(),
                    ..tensor(7, vec![len_i64(a.ints.len())])
                },
                "sparse_value" | "value_string" | "value_strings" => {
                    return Err(format!("the Constant holds a `{}` attribute", a.name))
                }
                _ => continue,
            };
        return Ok(Cow::Owned(t));
    }
    Err("the Constant has no value attribute".into())
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn element_count(t: &TensorProto) -> std::result::Result<usize, String> {
    t.dims.iter().try_fold(1usize, |n, &d| {
        let d = usize::try_from(d).map_err(|_| format!("negative dimension {d}"))?;
        n.checked_mul(d)
            .ok_or_else(|| format!("dimensions {:?} overflow", t.dims))
    })
}

/// Element types whose values can be read, with their byte size.
#[derive(Clone, Copy)]
enum Elem {
    F32,
    F64,
    F16,
    Bf16,
    I8,
    U8,
    I16,
    U16,
    I32,
    I64,
    U32,
    U64,
}

impl Elem {
    fn from_onnx(t: i32) -> Option<Elem> {
        Some(match t {
            1 => Elem::F32,
            2 => Elem::U8,
            3 => Elem::I8,
            4 => Elem::U16,
            5 => Elem::I16,
            6 => Elem::I32,
            7 => Elem::I64,
            10 => Elem::F16,
            11 => Elem::F64,
            12 => Elem::U32,
            13 => Elem::U64,
            16 => Elem::Bf16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Elem::I8 | Elem::U8 => 1,
            Elem::F16 | Elem::Bf16 | Elem::I16 | Elem::U16 => 2,
            Elem::F32 | Elem::I32 | Elem::U32 => 4,
            Elem::F64 | Elem::I64 | Elem::U64 => 8,
        }
    }

    /// Value of one little-endian element (`b.len() == self.size()`).
    fn decode_le(self, b: &[u8]) -> f64 {
        let mut w = [0u8; 8];
        for (d, s) in w.iter_mut().zip(b) {
            *d = *s;
        }
        let u = u64::from_le_bytes(w);
        // Truncating casts pick the element's bits out of the widened word.
        match self {
            Elem::F32 => f64::from(f32::from_bits(u as u32)),
            Elem::F64 => f64::from_bits(u),
            Elem::F16 => f16_to_f64(u as u16),
            Elem::Bf16 => f64::from(f32::from_bits((u as u32) << 16)),
            Elem::I8 => f64::from(u as u8 as i8),
            Elem::U8 => f64::from(u as u8),
            Elem::I16 => f64::from(u as u16 as i16),
            Elem::U16 => f64::from(u as u16),
            Elem::I32 => f64::from(u as u32 as i32),
            Elem::U32 => f64::from(u as u32),
            Elem::I64 => u as i64 as f64,
            Elem::U64 => u as f64,
        }
    }

    /// Value of one element stored in `int32_data` (ONNX keeps 8- and
    /// 16-bit types there, half floats as their bit patterns).
    fn decode_i32(self, v: i32) -> f64 {
        match self {
            Elem::F16 => f16_to_f64(v as u16),
            Elem::Bf16 => f64::from(f32::from_bits(u32::from(v as u16) << 16)),
            Elem::I8 => f64::from(v as i8),
            Elem::U8 => f64::from(v as u8),
            Elem::I16 => f64::from(v as i16),
            Elem::U16 => f64::from(v as u16),
            _ => f64::from(v),
        }
    }
}

fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let man = f64::from(bits & 0x3ff);
    sign * match exp {
        0 => man * 2f64.powi(-24),
        31 if man == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + man / 1024.0) * 2f64.powi(e - 15),
    }
}

/// A tensor's values as f64 (exact for every type but 64-bit integers
/// beyond 2^53, which stay non-zero).
fn values(t: &TensorProto, dir: Option<&Path>) -> std::result::Result<Vec<f64>, String> {
    let n = element_count(t)?;
    let elem = Elem::from_onnx(t.data_type)
        .ok_or_else(|| format!("element type {} is not readable", type_name(t.data_type)))?;
    let nbytes = n
        .checked_mul(elem.size())
        .ok_or_else(|| format!("dimensions {:?} overflow", t.dims))?;
    let from_bytes = |b: &[u8]| {
        if b.len() != nbytes {
            return Err(format!(
                "shape {:?} of {} needs {nbytes} bytes, data has {}",
                t.dims,
                type_name(t.data_type),
                b.len()
            ));
        }
        Ok(b.chunks_exact(elem.size())
            .map(|c| elem.decode_le(c))
            .collect())
    };
    if t.data_location == 1 || !t.external_data.is_empty() {
        return from_bytes(&read_external(t, dir, nbytes)?);
    }
    if !t.raw_data.is_empty() {
        return from_bytes(&t.raw_data);
    }
    let typed: Vec<f64> = match elem {
        Elem::F32 => t.float_data.iter().map(|&v| f64::from(v)).collect(),
        Elem::F64 => t.double_data.clone(),
        Elem::I64 => t.int64_data.iter().map(|&v| v as f64).collect(),
        Elem::U32 | Elem::U64 => t.uint64_data.iter().map(|&v| v as f64).collect(),
        _ => t.int32_data.iter().map(|&v| elem.decode_i32(v)).collect(),
    };
    if typed.len() != n {
        return Err(format!(
            "shape {:?} holds {n} elements, data has {}",
            t.dims,
            typed.len()
        ));
    }
    Ok(typed)
}

/// Reads `nbytes` of a tensor's external data, only the bytes needed (the
/// file may hold all weights). Like qint8-graph's loader, the location must
/// be a relative path inside the model's folder.
fn read_external(
    t: &TensorProto,
    dir: Option<&Path>,
    nbytes: usize,
) -> std::result::Result<Vec<u8>, String> {
    let dir = dir
        .ok_or("its data is in an external file, which check_model cannot read (use check_file)")?;
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.as_str())
    };
    let number = |k: &str| {
        get(k)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("external data {k} {v:?} is not a number"))
            })
            .transpose()
    };
    let location = get("location").ok_or("external data without a location")?;
    let rel = Path::new(location);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "external data location {location:?} must be a relative path inside the model's folder"
        ));
    }
    let offset = number("offset")?.unwrap_or(0);
    if let Some(len) = number("length")? {
        if u64::try_from(nbytes) != Ok(len) {
            return Err(format!(
                "external data length {len} does not match the {nbytes} bytes of its shape"
            ));
        }
    }
    let path = dir.join(rel);
    let fail = |e: std::io::Error| format!("reading {}: {e}", path.display());
    let mut file = File::open(&path).map_err(fail)?;
    file.seek(SeekFrom::Start(offset)).map_err(fail)?;
    let mut bytes = Vec::new();
    // `take` bounds the read, so a bad length cannot make it read the file.
    file.take(u64::try_from(nbytes).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() != nbytes {
        return Err(format!(
            "{} ends {} bytes into the {nbytes} needed at offset {offset}",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
