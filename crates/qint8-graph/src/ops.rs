//! Operators: the typed form of ONNX nodes qint8 understands.
//!
//! Each variant documents the ONNX operator (<https://onnx.ai/onnx/operators/>)
//! and the opsets whose attribute layout it reads. Attributes that later
//! opsets moved to inputs (Clip min/max, Squeeze/Unsqueeze/ReduceMean axes)
//! are kept as optional attributes here; the runtime reads the inputs when
//! they are present.

use serde::{Deserialize, Serialize};

use crate::error::{GraphError, Result};
use crate::proto::{attribute_type as at, AttributeProto, NodeProto};
use crate::tensor::Tensor;

/// `auto_pad` of Conv and pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AutoPad {
    /// Use explicit `pads`.
    #[default]
    NotSet,
    /// Output size `ceil(in / stride)`, extra padding at the end.
    SameUpper,
    /// Output size `ceil(in / stride)`, extra padding at the start.
    SameLower,
    /// No padding.
    Valid,
}

/// Attributes of Conv (opsets 1-22).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConvAttrs {
    /// Spatial kernel size (taken from the weight when absent).
    pub kernel_shape: Option<Vec<usize>>,
    /// Strides per spatial axis (default 1).
    pub strides: Vec<usize>,
    /// `[begin..., end...]` padding (default 0).
    pub pads: Vec<usize>,
    /// Dilations per spatial axis (default 1).
    pub dilations: Vec<usize>,
    /// Groups (default 1; depthwise when equal to the input channels).
    pub group: usize,
    /// Automatic padding mode.
    pub auto_pad: AutoPad,
}

/// Attributes of MaxPool / AveragePool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PoolAttrs {
    /// Window size.
    pub kernel_shape: Vec<usize>,
    /// Strides (default 1).
    pub strides: Vec<usize>,
    /// `[begin..., end...]` padding.
    pub pads: Vec<usize>,
    /// Dilations (MaxPool only; default 1).
    pub dilations: Vec<usize>,
    /// Use ceil instead of floor for the output size.
    pub ceil_mode: bool,
    /// AveragePool: count padded elements in the divisor.
    pub count_include_pad: bool,
    /// Automatic padding mode.
    pub auto_pad: AutoPad,
}

/// An operator with typed attributes.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Op {
    /// Conv: `X, W, [B]`.
    Conv(ConvAttrs),
    /// Gemm: `A, B, [C]`, `alpha * A' B' + beta * C`.
    Gemm {
        /// Scale of the product.
        alpha: f32,
        /// Scale of C.
        beta: f32,
        /// Transpose A.
        trans_a: bool,
        /// Transpose B.
        trans_b: bool,
    },
    /// MatMul with numpy broadcasting.
    MatMul,
    /// Elementwise addition with broadcasting.
    Add,
    /// Elementwise subtraction with broadcasting.
    Sub,
    /// Elementwise multiplication with broadcasting.
    Mul,
    /// Elementwise division with broadcasting.
    Div,
    /// max(x, 0).
    Relu,
    /// Clamp; opset < 11 attributes, or inputs 1 and 2 from opset 11.
    Clip {
        /// Lower bound from the attribute (opset < 11).
        min: Option<f32>,
        /// Upper bound from the attribute (opset < 11).
        max: Option<f32>,
    },
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// max(0, min(1, alpha x + beta)).
    HardSigmoid {
        /// Slope (0.2).
        alpha: f32,
        /// Offset (0.5).
        beta: f32,
    },
    /// x * HardSigmoid(x) with alpha 1/6, beta 0.5.
    HardSwish,
    /// Max pooling.
    MaxPool(PoolAttrs),
    /// Average pooling.
    AveragePool(PoolAttrs),
    /// Mean over all spatial positions, keeping dims.
    GlobalAveragePool,
    /// Mean over `axes` (attribute before opset 18, input from 18).
    ReduceMean {
        /// Axes from the attribute.
        axes: Option<Vec<i64>>,
        /// Keep reduced dimensions.
        keepdims: bool,
        /// With no axes: identity instead of reducing everything.
        noop_with_empty_axes: bool,
    },
    /// Flatten to 2-D at `axis`.
    Flatten {
        /// Split axis (1).
        axis: i64,
    },
    /// Reshape to the shape given by input 1.
    Reshape {
        /// A 0 in the shape means zero, not "copy the input dim".
        allowzero: bool,
    },
    /// Permute axes.
    Transpose {
        /// Permutation (reverse when absent).
        perm: Option<Vec<usize>>,
    },
    /// Concatenate along `axis`.
    Concat {
        /// Axis.
        axis: i64,
    },
    /// Remove size-1 axes.
    Squeeze {
        /// Axes from the attribute (opset < 13).
        axes: Option<Vec<i64>>,
    },
    /// Insert size-1 axes.
    Unsqueeze {
        /// Axes from the attribute (opset < 13).
        axes: Option<Vec<i64>>,
    },
    /// Softmax along `axis` (opset >= 13 semantics; earlier opsets coerce to 2-D,
    /// which equals a last-axis softmax for the 2-D logits classifiers produce).
    Softmax {
        /// Axis.
        axis: i64,
    },
    /// Inference-mode batch normalization: `X, scale, B, mean, var`.
    BatchNormalization {
        /// Epsilon (1e-5).
        epsilon: f32,
    },
    /// A constant tensor.
    Constant(Tensor),
    /// Identity.
    Identity,
    /// Dropout (identity at inference).
    Dropout,
    /// QuantizeLinear: `x, y_scale, [y_zero_point]`.
    QuantizeLinear {
        /// Per-channel axis (1).
        axis: i64,
    },
    /// DequantizeLinear: `x, x_scale, [x_zero_point]`.
    DequantizeLinear {
        /// Per-channel axis (1).
        axis: i64,
    },
    /// The shape of the input as an i64 tensor.
    Shape {
        /// First axis (opset 15).
        start: i64,
        /// End axis, exclusive (opset 15).
        end: Option<i64>,
    },
    /// Gather along `axis`.
    Gather {
        /// Axis.
        axis: i64,
    },
    /// Element type conversion.
    Cast {
        /// ONNX element type number.
        to: i32,
    },
    /// Broadcast the input to the shape given by input 1.
    Expand,
    /// A tensor of the shape given by input 0, filled with `value`.
    ConstantOfShape {
        /// Fill value (a one-element tensor; f32 0 when absent).
        value: Tensor,
    },
    /// Elementwise equality (boolean output).
    Equal,
    /// `cond ? x : y` with broadcasting.
    Where,
    /// Slice: `data, starts, ends, [axes], [steps]` from opset 10; the
    /// attributes before (kept here when present).
    Slice {
        /// Starts from the attribute (opset < 10).
        starts: Option<Vec<i64>>,
        /// Ends from the attribute (opset < 10).
        ends: Option<Vec<i64>>,
        /// Axes from the attribute (opset < 10).
        axes: Option<Vec<i64>>,
    },
    /// Split along `axis`: sizes from input 1 (opset 13+) or the `split`
    /// attribute (before), else `num_outputs` (opset 18) or one part per
    /// output, equal except for a shorter last part.
    Split {
        /// Axis.
        axis: i64,
        /// Sizes from the attribute (opset < 13).
        split: Option<Vec<i64>>,
    },
    /// Gauss error function.
    Erf,
    /// GELU (opset 20): `x * Phi(x)`, or its tanh approximation.
    Gelu {
        /// `approximate = "tanh"`.
        tanh: bool,
    },
    /// Square root.
    Sqrt,
    /// Elementwise power with broadcasting.
    Pow,
    /// Elementwise remainder: the divisor's sign (`fmod = 0`, integers) or
    /// C's `fmod` (`fmod = 1`).
    Mod {
        /// C `fmod` semantics.
        fmod: bool,
    },
    /// Logical not.
    Not,
    /// `start, limit, delta` as a 1-D sequence (constant inputs only).
    Range,
    /// Layer normalization over the axes from `axis` on: `X, Scale, [B]`.
    LayerNormalization {
        /// First normalized axis (-1).
        axis: i64,
        /// Epsilon (1e-5).
        epsilon: f32,
    },
    /// Pad: `data, pads, [constant_value], [axes]` from opset 11; the
    /// attributes before (kept here when present).
    Pad {
        /// Padding mode.
        mode: PadMode,
        /// `pads` from the attribute (opset < 11).
        pads: Option<Vec<i64>>,
        /// Fill value from the attribute (opset < 11).
        value: f32,
    },
    /// ScatterND without reduction: `data, indices, updates`.
    ScatterND,
}

/// Padding mode of [`Op::Pad`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PadMode {
    /// A constant fill value.
    #[default]
    Constant,
    /// Mirror without repeating the edge.
    Reflect,
    /// Repeat the edge value.
    Edge,
    /// Wrap around.
    Wrap,
}

/// Every operator type qint8 parses.
pub const SUPPORTED_OPS: &[&str] = &[
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Transpose",
    "Concat",
    "Squeeze",
    "Unsqueeze",
    "Softmax",
    "BatchNormalization",
    "Constant",
    "Identity",
    "Dropout",
    "QuantizeLinear",
    "DequantizeLinear",
    "Shape",
    "Gather",
    "Cast",
    "Expand",
    "ConstantOfShape",
    "Equal",
    "Where",
    "Slice",
    "Split",
    "Erf",
    "Gelu",
    "Sqrt",
    "Pow",
    "Mod",
    "Not",
    "Range",
    "LayerNormalization",
    "Pad",
    "ScatterND",
];

impl Op {
    /// The ONNX operator type.
    pub fn op_type(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Add => "Add",
            Op::Sub => "Sub",
            Op::Mul => "Mul",
            Op::Div => "Div",
            Op::Relu => "Relu",
            Op::Clip { .. } => "Clip",
            Op::Sigmoid => "Sigmoid",
            Op::HardSigmoid { .. } => "HardSigmoid",
            Op::HardSwish => "HardSwish",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool(_) => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::ReduceMean { .. } => "ReduceMean",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Concat { .. } => "Concat",
            Op::Squeeze { .. } => "Squeeze",
            Op::Unsqueeze { .. } => "Unsqueeze",
            Op::Softmax { .. } => "Softmax",
            Op::BatchNormalization { .. } => "BatchNormalization",
            Op::Constant(_) => "Constant",
            Op::Identity => "Identity",
            Op::Dropout => "Dropout",
            Op::QuantizeLinear { .. } => "QuantizeLinear",
            Op::DequantizeLinear { .. } => "DequantizeLinear",
            Op::Shape { .. } => "Shape",
            Op::Gather { .. } => "Gather",
            Op::Cast { .. } => "Cast",
            Op::Expand => "Expand",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Equal => "Equal",
            Op::Where => "Where",
            Op::Slice { .. } => "Slice",
            Op::Split { .. } => "Split",
            Op::Erf => "Erf",
            Op::Gelu { .. } => "Gelu",
            Op::Sqrt => "Sqrt",
            Op::Pow => "Pow",
            Op::Mod { .. } => "Mod",
            Op::Not => "Not",
            Op::Range => "Range",
            Op::LayerNormalization { .. } => "LayerNormalization",
            Op::Pad { .. } => "Pad",
            Op::ScatterND => "ScatterND",
        }
    }

    /// Whether the op has weights that are quantized per channel (Conv, Gemm, MatMul).
    pub fn is_weighted(&self) -> bool {
        matches!(self, Op::Conv(_) | Op::Gemm { .. } | Op::MatMul)
    }

    /// Parses a node of the default ONNX domain at `opset`. Returns
    /// `Ok(None)` for operator types qint8 does not know (the caller collects
    /// them all), and an error for malformed attributes.
    pub fn from_proto(node: &NodeProto, opset: i64) -> Result<Option<Op>> {
        let a = Attrs { node };
        let op = match node.op_type.as_str() {
            "Conv" => Op::Conv(ConvAttrs {
                kernel_shape: a.usizes_opt("kernel_shape")?,
                strides: a.usizes_opt("strides")?.unwrap_or_default(),
                pads: a.usizes_opt("pads")?.unwrap_or_default(),
                dilations: a.usizes_opt("dilations")?.unwrap_or_default(),
                group: a.int("group", 1)?.max(1) as usize,
                auto_pad: a.auto_pad()?,
            }),
            "Gemm" => Op::Gemm {
                alpha: a.float("alpha", 1.0)?,
                beta: a.float("beta", 1.0)?,
                trans_a: a.int("transA", 0)? != 0,
                trans_b: a.int("transB", 0)? != 0,
            },
            "MatMul" => Op::MatMul,
            "Add" => Op::Add,
            "Sub" => Op::Sub,
            "Mul" => Op::Mul,
            "Div" => Op::Div,
            "Relu" => Op::Relu,
            "Clip" => Op::Clip {
                min: a.float_opt("min")?,
                max: a.float_opt("max")?,
            },
            "Sigmoid" => Op::Sigmoid,
            "HardSigmoid" => Op::HardSigmoid {
                alpha: a.float("alpha", 0.2)?,
                beta: a.float("beta", 0.5)?,
            },
            "HardSwish" => Op::HardSwish,
            "MaxPool" => Op::MaxPool(a.pool()?),
            "AveragePool" => Op::AveragePool(a.pool()?),
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "ReduceMean" => Op::ReduceMean {
                axes: a.ints_opt("axes")?,
                keepdims: a.int("keepdims", 1)? != 0,
                noop_with_empty_axes: a.int("noop_with_empty_axes", 0)? != 0,
            },
            "Flatten" => Op::Flatten {
                axis: a.int("axis", 1)?,
            },
            "Reshape" => Op::Reshape {
                allowzero: a.int("allowzero", 0)? != 0,
            },
            "Transpose" => Op::Transpose {
                perm: a.usizes_opt("perm")?,
            },
            "Concat" => Op::Concat {
                axis: a.int("axis", 0)?,
            },
            "Squeeze" => Op::Squeeze {
                axes: a.ints_opt("axes")?,
            },
            "Unsqueeze" => Op::Unsqueeze {
                axes: a.ints_opt("axes")?,
            },
            "Softmax" => Op::Softmax {
                axis: a.int("axis", if opset >= 13 { -1 } else { 1 })?,
            },
            "BatchNormalization" => {
                if a.int("training_mode", 0)? != 0 {
                    return Err(a.err(
                        "training_mode",
                        "training-mode BatchNormalization is not supported",
                    ));
                }
                Op::BatchNormalization {
                    epsilon: a.float("epsilon", 1e-5)?,
                }
            }
            "Constant" => Op::Constant(a.constant()?),
            "Identity" => Op::Identity,
            "Dropout" => Op::Dropout,
            "QuantizeLinear" => Op::QuantizeLinear {
                axis: a.int("axis", 1)?,
            },
            "DequantizeLinear" => Op::DequantizeLinear {
                axis: a.int("axis", 1)?,
            },
            "Shape" => Op::Shape {
                start: a.int("start", 0)?,
                end: a.int_opt("end")?,
            },
            "Gather" => Op::Gather {
                axis: a.int("axis", 0)?,
            },
            "Cast" => Op::Cast {
                to: a.int("to", 1)? as i32,
            },
            "Expand" => Op::Expand,
            "ConstantOfShape" => Op::ConstantOfShape {
                value: match a.get("value").and_then(|v| v.t.as_ref()) {
                    Some(t) => crate::onnx::tensor_from_proto(t, None)?,
                    None => Tensor::scalar_f32(0.0),
                },
            },
            "Equal" => Op::Equal,
            "Where" => Op::Where,
            "Slice" => Op::Slice {
                starts: a.ints_opt("starts")?,
                ends: a.ints_opt("ends")?,
                axes: a.ints_opt("axes")?,
            },
            "Split" => Op::Split {
                axis: a.int("axis", 0)?,
                split: a.ints_opt("split")?,
            },
            "Erf" => Op::Erf,
            "Gelu" => Op::Gelu {
                tanh: match a.string("approximate")?.as_deref() {
                    None | Some("none") => false,
                    Some("tanh") => true,
                    Some(other) => {
                        return Err(a.err("approximate", format!("unknown value {other:?}")))
                    }
                },
            },
            "Sqrt" => Op::Sqrt,
            "Pow" => Op::Pow,
            "Mod" => Op::Mod {
                fmod: a.int("fmod", 0)? != 0,
            },
            "Not" => Op::Not,
            "Range" => Op::Range,
            "LayerNormalization" => Op::LayerNormalization {
                axis: a.int("axis", -1)?,
                epsilon: a.float("epsilon", 1e-5)?,
            },
            "Pad" => Op::Pad {
                mode: match a.string("mode")?.as_deref() {
                    None | Some("constant") => PadMode::Constant,
                    Some("reflect") => PadMode::Reflect,
                    Some("edge") => PadMode::Edge,
                    Some("wrap") => PadMode::Wrap,
                    Some(other) => return Err(a.err("mode", format!("unknown value {other:?}"))),
                },
                pads: a.ints_opt("pads")?,
                value: a.float("value", 0.0)?,
            },
            "ScatterND" => {
                if let Some(r) = a.string("reduction")? {
                    if r != "none" {
                        return Err(a.err("reduction", format!("reduction {r:?} is not supported")));
                    }
                }
                Op::ScatterND
            }
            _ => return Ok(None),
        };
        Ok(Some(op))
    }

    /// The ONNX attributes of this op (written for opset 13+ layouts, except
    /// attributes kept from older opsets which are written back as read).
    pub fn to_attributes(&self) -> Vec<AttributeProto> {
        let mut v = Vec::new();
        match self {
            Op::Conv(c) => {
                if let Some(k) = &c.kernel_shape {
                    v.push(ints("kernel_shape", k));
                }
                push_nonempty(&mut v, "strides", &c.strides);
                push_nonempty(&mut v, "pads", &c.pads);
                push_nonempty(&mut v, "dilations", &c.dilations);
                v.push(int("group", c.group as i64));
                push_auto_pad(&mut v, c.auto_pad);
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                v.push(float("alpha", *alpha));
                v.push(float("beta", *beta));
                v.push(int("transA", *trans_a as i64));
                v.push(int("transB", *trans_b as i64));
            }
            Op::Clip { min, max } => {
                if let Some(m) = min {
                    v.push(float("min", *m));
                }
                if let Some(m) = max {
                    v.push(float("max", *m));
                }
            }
            Op::HardSigmoid { alpha, beta } => {
                v.push(float("alpha", *alpha));
                v.push(float("beta", *beta));
            }
            Op::MaxPool(p) | Op::AveragePool(p) => {
                v.push(ints("kernel_shape", &p.kernel_shape));
                push_nonempty(&mut v, "strides", &p.strides);
                push_nonempty(&mut v, "pads", &p.pads);
                if matches!(self, Op::MaxPool(_)) {
                    push_nonempty(&mut v, "dilations", &p.dilations);
                } else {
                    v.push(int("count_include_pad", p.count_include_pad as i64));
                }
                v.push(int("ceil_mode", p.ceil_mode as i64));
                push_auto_pad(&mut v, p.auto_pad);
            }
            Op::ReduceMean {
                axes,
                keepdims,
                noop_with_empty_axes,
            } => {
                if let Some(a) = axes {
                    v.push(ints_i64("axes", a));
                }
                v.push(int("keepdims", *keepdims as i64));
                if *noop_with_empty_axes {
                    v.push(int("noop_with_empty_axes", 1));
                }
            }
            Op::Flatten { axis }
            | Op::Concat { axis }
            | Op::Softmax { axis }
            | Op::Gather { axis } => v.push(int("axis", *axis)),
            Op::Slice { starts, ends, axes } => {
                for (name, x) in [("starts", starts), ("ends", ends), ("axes", axes)] {
                    if let Some(x) = x {
                        v.push(ints_i64(name, x));
                    }
                }
            }
            Op::Split { axis, split } => {
                v.push(int("axis", *axis));
                if let Some(x) = split {
                    v.push(ints_i64("split", x));
                }
            }
            Op::Gelu { tanh } => {
                if *tanh {
                    v.push(string("approximate", "tanh"));
                }
            }
            Op::Mod { fmod } => v.push(int("fmod", *fmod as i64)),
            Op::LayerNormalization { axis, epsilon } => {
                v.push(int("axis", *axis));
                v.push(float("epsilon", *epsilon));
            }
            Op::Pad { mode, pads, value } => {
                let m = match mode {
                    PadMode::Constant => "constant",
                    PadMode::Reflect => "reflect",
                    PadMode::Edge => "edge",
                    PadMode::Wrap => "wrap",
                };
                v.push(string("mode", m));
                if let Some(p) = pads {
                    v.push(ints_i64("pads", p));
                    v.push(float("value", *value));
                }
            }
            Op::QuantizeLinear { axis } | Op::DequantizeLinear { axis } => {
                v.push(int("axis", *axis))
            }
            Op::Reshape { allowzero } => {
                if *allowzero {
                    v.push(int("allowzero", 1));
                }
            }
            Op::Transpose { perm } => {
                if let Some(p) = perm {
                    v.push(ints("perm", p));
                }
            }
            Op::Squeeze { axes } | Op::Unsqueeze { axes } => {
                if let Some(a) = axes {
                    v.push(ints_i64("axes", a));
                }
            }
            Op::BatchNormalization { epsilon } => v.push(float("epsilon", *epsilon)),
            Op::Constant(t) => v.push(AttributeProto {
                name: "value".into(),
                r#type: at::TENSOR,
                t: Some(crate::onnx::tensor_to_proto("", t)),
                ..Default::default()
            }),
            Op::Shape { start, end } => {
                if *start != 0 {
                    v.push(int("start", *start));
                }
                if let Some(e) = end {
                    v.push(int("end", *e));
                }
            }
            Op::Cast { to } => v.push(int("to", *to as i64)),
            Op::ConstantOfShape { value } => v.push(AttributeProto {
                name: "value".into(),
                r#type: at::TENSOR,
                t: Some(crate::onnx::tensor_to_proto("", value)),
                ..Default::default()
            }),
            Op::MatMul
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Relu
            | Op::Sigmoid
            | Op::HardSwish
            | Op::GlobalAveragePool
            | Op::Identity
            | Op::Dropout
            | Op::Expand
            | Op::Equal
            | Op::Where
            | Op::Erf
            | Op::Sqrt
            | Op::Pow
            | Op::Not
            | Op::Range
            | Op::ScatterND => {}
        }
        v
    }
}

fn push_nonempty(v: &mut Vec<AttributeProto>, name: &str, x: &[usize]) {
    if !x.is_empty() {
        v.push(ints(name, x));
    }
}

fn push_auto_pad(v: &mut Vec<AttributeProto>, p: AutoPad) {
    let s = match p {
        AutoPad::NotSet => return,
        AutoPad::SameUpper => "SAME_UPPER",
        AutoPad::SameLower => "SAME_LOWER",
        AutoPad::Valid => "VALID",
    };
    v.push(AttributeProto {
        name: "auto_pad".into(),
        r#type: at::STRING,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    });
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: at::INT,
        i,
        ..Default::default()
    }
}

fn float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: at::FLOAT,
        f,
        ..Default::default()
    }
}

fn string(name: &str, x: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: at::STRING,
        s: x.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn ints(name: &str, x: &[usize]) -> AttributeProto {
    ints_i64(name, &x.iter().map(|&v| v as i64).collect::<Vec<_>>())
}

fn ints_i64(name: &str, x: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: at::INTS,
        ints: x.to_vec(),
        ..Default::default()
    }
}

/// Typed attribute access with errors naming node and attribute.
struct Attrs<'a> {
    node: &'a NodeProto,
}

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    fn err(&self, attr: &str, detail: impl Into<String>) -> GraphError {
        GraphError::Attribute {
            node: self.node.name.clone(),
            op: self.node.op_type.clone(),
            attr: attr.into(),
            detail: detail.into(),
        }
    }

    fn check_type(&self, a: &AttributeProto, want: i32, what: &str) -> Result<()> {
        // Type 0 (UNDEFINED) comes from IR version 1 writers: trust the field used.
        if a.r#type != want && a.r#type != at::UNDEFINED {
            return Err(self.err(
                &a.name,
                format!("expected {what}, found attribute type {}", a.r#type),
            ));
        }
        Ok(())
    }

    fn int_opt(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => {
                self.check_type(a, at::INT, "an int")?;
                Ok(Some(a.i))
            }
        }
    }

    fn int(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self.int_opt(name)?.unwrap_or(default))
    }

    fn float_opt(&self, name: &str) -> Result<Option<f32>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => {
                self.check_type(a, at::FLOAT, "a float")?;
                Ok(Some(a.f))
            }
        }
    }

    fn float(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self.float_opt(name)?.unwrap_or(default))
    }

    fn ints_opt(&self, name: &str) -> Result<Option<Vec<i64>>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => {
                self.check_type(a, at::INTS, "a list of ints")?;
                Ok(Some(a.ints.clone()))
            }
        }
    }

    fn usizes_opt(&self, name: &str) -> Result<Option<Vec<usize>>> {
        match self.ints_opt(name)? {
            None => Ok(None),
            Some(v) => v
                .iter()
                .map(|&x| {
                    usize::try_from(x).map_err(|_| self.err(name, format!("negative value {x}")))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
        }
    }

    fn string(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(a) => {
                self.check_type(a, at::STRING, "a string")?;
                Ok(Some(String::from_utf8_lossy(&a.s).into_owned()))
            }
        }
    }

    fn auto_pad(&self) -> Result<AutoPad> {
        let Some(a) = self.get("auto_pad") else {
            return Ok(AutoPad::NotSet);
        };
        self.check_type(a, at::STRING, "a string")?;
        Ok(match a.s.as_slice() {
            b"NOTSET" | b"" => AutoPad::NotSet,
            b"SAME_UPPER" => AutoPad::SameUpper,
            b"SAME_LOWER" => AutoPad::SameLower,
            b"VALID" => AutoPad::Valid,
            other => {
                return Err(self.err(
                    "auto_pad",
                    format!("unknown value {:?}", String::from_utf8_lossy(other)),
                ))
            }
        })
    }

    fn pool(&self) -> Result<PoolAttrs> {
        Ok(PoolAttrs {
            kernel_shape: self
                .usizes_opt("kernel_shape")?
                .ok_or_else(|| self.err("kernel_shape", "required"))?,
            strides: self.usizes_opt("strides")?.unwrap_or_default(),
            pads: self.usizes_opt("pads")?.unwrap_or_default(),
            dilations: self.usizes_opt("dilations")?.unwrap_or_default(),
            ceil_mode: self.int("ceil_mode", 0)? != 0,
            count_include_pad: self.int("count_include_pad", 0)? != 0,
            auto_pad: self.auto_pad()?,
        })
    }

    fn constant(&self) -> Result<Tensor> {
        if let Some(a) = self.get("value") {
            let t =
                a.t.as_ref()
                    .ok_or_else(|| self.err("value", "missing tensor"))?;
            return crate::onnx::tensor_from_proto(t, None);
        }
        if let Some(f) = self.float_opt("value_float")? {
            return Ok(Tensor::scalar_f32(f));
        }
        if let Some(i) = self.int_opt("value_int")? {
            return Ok(Tensor::I64(ndarray::arr0(i).into_dyn()));
        }
        if let Some(v) = self.ints_opt("value_ints")? {
            return Ok(Tensor::vec_i64(&v));
        }
        if let Some(a) = self.get("value_floats") {
            self.check_type(a, at::FLOATS, "a list of floats")?;
            return Ok(Tensor::F32(
                ndarray::Array1::from(a.floats.clone()).into_dyn(),
            ));
        }
        Err(self.err(
            "value",
            "Constant needs value, value_float(s) or value_int(s)",
        ))
    }
}
