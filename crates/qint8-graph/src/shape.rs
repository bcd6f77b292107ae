//! Shape inference with constant propagation.
//!
//! Given concrete input shapes, [`infer`] computes every value's element
//! type and shape, and the contents of every value computable from
//! constants alone (initializers, `Constant`, and `Shape` of known shapes
//! followed by Gather/Concat/Unsqueeze/... chains). With concrete shapes the
//! shape subgraphs PyTorch exporters emit become constants, so the runtime
//! never executes them.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis, IxDyn};

use crate::error::{GraphError, Result};
use crate::ir::{Graph, Node};
use crate::ops::{AutoPad, ConvAttrs, Op, PoolAttrs};
use crate::tensor::{DataType, Tensor};

/// Applies `|a| -> Result<ArrayD<T>>` to the array inside a tensor of any
/// element type, keeping the type.
macro_rules! map_each {
    ($t:expr, |$a:ident| $e:expr) => {
        match $t {
            Tensor::F32($a) => Tensor::F32($e?),
            Tensor::U8($a) => Tensor::U8($e?),
            Tensor::I8($a) => Tensor::I8($e?),
            Tensor::I32($a) => Tensor::I32($e?),
            Tensor::I64($a) => Tensor::I64($e?),
            Tensor::Bool($a) => Tensor::Bool($e?),
        }
    };
}

/// Constants above this many elements are not materialized by inference.
pub(crate) const MAX_FOLD_ELEMENTS: usize = 1 << 16;

/// What inference knows about a value.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueShape {
    /// Element type.
    pub dtype: DataType,
    /// Concrete shape.
    pub shape: Vec<usize>,
    /// Contents, when computable from constants.
    pub value: Option<Tensor>,
}

/// Inferred shapes of every value in a graph.
pub type Shapes = HashMap<String, ValueShape>;

/// Infers shapes for the given concrete input shapes (by input name).
/// Inputs missing from `inputs` use their declared shape with symbolic
/// dimensions set to 1.
pub fn infer(graph: &Graph, inputs: &HashMap<String, Vec<usize>>) -> Result<Shapes> {
    let mut s: Shapes = HashMap::new();
    for (name, t) in &graph.initializers {
        s.insert(
            name.clone(),
            ValueShape {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                // Weights (float tensors of rank 2 and up) and large
                // initializers are never folded: copying them here would
                // only double the memory of every compile.
                value: (t.len() <= MAX_FOLD_ELEMENTS
                    && (t.shape().len() <= 1 || t.dtype() != DataType::Float))
                    .then(|| t.clone()),
            },
        );
    }
    for v in &graph.inputs {
        let shape = match inputs.get(&v.name) {
            Some(sh) => sh.clone(),
            None => v.concrete_shape(1).ok_or_else(|| {
                GraphError::Invalid(format!("input {} has no declared shape; give one", v.name))
            })?,
        };
        s.insert(
            v.name.clone(),
            ValueShape {
                dtype: v.dtype,
                shape,
                value: None,
            },
        );
    }
    for node in &graph.nodes {
        let outs = infer_node(node, &s)?;
        for (name, vs) in node.outputs.iter().zip(outs) {
            if !name.is_empty() {
                s.insert(name.clone(), vs);
            }
        }
    }
    Ok(s)
}

pub(crate) fn shape_err(node: &Node, detail: impl Into<String>) -> GraphError {
    GraphError::Shape {
        node: node.name.clone(),
        op: node.op.op_type().to_string(),
        detail: detail.into(),
    }
}

/// Normalizes a possibly negative axis for a tensor of `rank`.
pub fn norm_axis(node: &Node, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(shape_err(
            node,
            format!("axis {axis} out of range for rank {rank}"),
        ));
    }
    Ok(a as usize)
}

/// Numpy-style broadcast of two shapes.
pub fn broadcast(node: &Node, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(shape_err(
                    node,
                    format!("shapes {a:?} and {b:?} do not broadcast"),
                ))
            }
        };
    }
    Ok(out)
}

/// Padding, strides, dilations and kernel of a Conv or pool, resolved for a
/// concrete input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Kernel size per spatial axis.
    pub kernel: Vec<usize>,
    /// Strides.
    pub strides: Vec<usize>,
    /// Dilations.
    pub dilations: Vec<usize>,
    /// Padding at the start of each spatial axis.
    pub pad_begin: Vec<usize>,
    /// Padding at the end of each spatial axis.
    pub pad_end: Vec<usize>,
    /// Output spatial size.
    pub out: Vec<usize>,
}

/// Resolves a window for spatial input size `input`.
#[allow(clippy::too_many_arguments)]
pub fn resolve_window(
    node: &Node,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    pads: &[usize],
    auto_pad: AutoPad,
    ceil_mode: bool,
) -> Result<Window> {
    let n = input.len();
    if kernel.len() != n {
        return Err(shape_err(
            node,
            format!("kernel {kernel:?} does not match {n} spatial dims of the input"),
        ));
    }
    let pick = |v: &[usize], what: &str| -> Result<Vec<usize>> {
        match v.len() {
            0 => Ok(vec![1; n]),
            l if l == n => {
                if v.contains(&0) {
                    Err(shape_err(node, format!("{what} {v:?} contains 0")))
                } else {
                    Ok(v.to_vec())
                }
            }
            _ => Err(shape_err(
                node,
                format!("{what} {v:?} has the wrong length for {n} spatial dims"),
            )),
        }
    };
    let strides = pick(strides, "strides")?;
    let dilations = pick(dilations, "dilations")?;
    let (mut pad_begin, mut pad_end) = match pads.len() {
        0 => (vec![0; n], vec![0; n]),
        l if l == 2 * n => (pads[..n].to_vec(), pads[n..].to_vec()),
        _ => {
            return Err(shape_err(
                node,
                format!("pads {pads:?} need {} values", 2 * n),
            ))
        }
    };
    let mut out = vec![0; n];
    for i in 0..n {
        let ek = dilations[i] * (kernel[i].max(1) - 1) + 1;
        match auto_pad {
            AutoPad::SameUpper | AutoPad::SameLower => {
                let o = input[i].div_ceil(strides[i]);
                let total = ((o.max(1) - 1) * strides[i] + ek).saturating_sub(input[i]);
                let small = total / 2;
                let (b, e) = if auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                pad_begin[i] = b;
                pad_end[i] = e;
                out[i] = o;
            }
            AutoPad::Valid | AutoPad::NotSet => {
                if auto_pad == AutoPad::Valid {
                    pad_begin[i] = 0;
                    pad_end[i] = 0;
                }
                let padded = input[i] + pad_begin[i] + pad_end[i];
                if padded < ek {
                    return Err(shape_err(
                        node,
                        format!("input size {} (padded {padded}) is smaller than the kernel extent {ek}", input[i]),
                    ));
                }
                let span = padded - ek;
                let mut o = if ceil_mode {
                    span.div_ceil(strides[i]) + 1
                } else {
                    span / strides[i] + 1
                };
                // A window may not start in the end padding (ONNX/PyTorch rule).
                if ceil_mode && (o - 1) * strides[i] >= input[i] + pad_begin[i] {
                    o -= 1;
                }
                out[i] = o;
            }
        }
    }
    Ok(Window {
        kernel: kernel.to_vec(),
        strides,
        dilations,
        pad_begin,
        pad_end,
        out,
    })
}

/// Resolves a Conv's window given input `[N, C, spatial...]` and weight `[M, C/g, k...]`.
pub fn conv_window(node: &Node, c: &ConvAttrs, x: &[usize], w: &[usize]) -> Result<Window> {
    if x.len() < 3 || w.len() != x.len() {
        return Err(shape_err(
            node,
            format!("input {x:?} and weight {w:?} ranks do not fit a Conv"),
        ));
    }
    if x[1] != w[1] * c.group || !w[0].is_multiple_of(c.group) {
        return Err(shape_err(
            node,
            format!(
                "input channels {} != weight channels {} x group {} (or {} output channels not divisible)",
                x[1], w[1], c.group, w[0]
            ),
        ));
    }
    let kernel = c.kernel_shape.clone().unwrap_or_else(|| w[2..].to_vec());
    if kernel != w[2..] {
        return Err(shape_err(
            node,
            format!("kernel_shape {kernel:?} != weight {:?}", &w[2..]),
        ));
    }
    resolve_window(
        node,
        &x[2..],
        &kernel,
        &c.strides,
        &c.dilations,
        &c.pads,
        c.auto_pad,
        false,
    )
}

/// Resolves a pool's window given input `[N, C, spatial...]`.
pub fn pool_window(node: &Node, p: &PoolAttrs, x: &[usize]) -> Result<Window> {
    if x.len() < 3 {
        return Err(shape_err(
            node,
            format!("pooling needs [N, C, spatial...], got {x:?}"),
        ));
    }
    resolve_window(
        node,
        &x[2..],
        &p.kernel_shape,
        &p.strides,
        &p.dilations,
        &p.pads,
        p.auto_pad,
        p.ceil_mode,
    )
}

fn get<'a>(node: &Node, s: &'a Shapes, i: usize) -> Result<&'a ValueShape> {
    let name = node
        .input(i)
        .ok_or_else(|| shape_err(node, format!("input {i} is missing")))?;
    s.get(name)
        .ok_or_else(|| shape_err(node, format!("input {name} has no known shape")))
}

fn opt<'a>(node: &Node, s: &'a Shapes, i: usize) -> Option<&'a ValueShape> {
    node.input(i).and_then(|n| s.get(n))
}

/// Integer contents of a constant input (shape, axes, indices).
fn const_ints(node: &Node, s: &Shapes, i: usize, what: &str) -> Result<Vec<i64>> {
    let v = get(node, s, i)?;
    v.value
        .as_ref()
        .and_then(Tensor::to_i64_vec)
        .ok_or_else(|| {
            shape_err(
                node,
                format!(
                    "{what} (input {i}) must be a constant integer tensor for a given input shape"
                ),
            )
        })
}

fn vs(dtype: DataType, shape: Vec<usize>) -> ValueShape {
    ValueShape {
        dtype,
        shape,
        value: None,
    }
}

fn with_value(t: Tensor) -> ValueShape {
    ValueShape {
        dtype: t.dtype(),
        shape: t.shape().to_vec(),
        value: Some(t),
    }
}

/// Output shapes (and constant values) of one node.
pub fn infer_node(node: &Node, s: &Shapes) -> Result<Vec<ValueShape>> {
    // Constant folding first: any supported op whose inputs are all known.
    if let Some(t) = fold(node, s)? {
        return Ok(vec![with_value(t)]);
    }
    infer_node_inner(node, s)
}

fn infer_node_inner(node: &Node, s: &Shapes) -> Result<Vec<ValueShape>> {
    let x = || get(node, s, 0);
    let out = match &node.op {
        Op::Conv(c) => {
            let (xs, ws) = (&x()?.shape, &get(node, s, 1)?.shape);
            let win = conv_window(node, c, xs, ws)?;
            if let Some(b) = opt(node, s, 2) {
                if b.shape != [ws[0]] {
                    return Err(shape_err(
                        node,
                        format!("bias shape {:?} != [{}]", b.shape, ws[0]),
                    ));
                }
            }
            let mut o = vec![xs[0], ws[0]];
            o.extend(win.out);
            vs(DataType::Float, o)
        }
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            let (a, b) = (&x()?.shape, &get(node, s, 1)?.shape);
            if a.len() != 2 || b.len() != 2 {
                return Err(shape_err(
                    node,
                    format!("Gemm needs 2-D inputs, got {a:?} and {b:?}"),
                ));
            }
            let (m, k) = if *trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
            let (k2, n) = if *trans_b { (b[1], b[0]) } else { (b[0], b[1]) };
            if k != k2 {
                return Err(shape_err(
                    node,
                    format!("inner dimensions differ: {a:?} x {b:?}"),
                ));
            }
            if let Some(c) = opt(node, s, 2) {
                broadcast(node, &c.shape, &[m, n])?;
            }
            vs(DataType::Float, vec![m, n])
        }
        Op::MatMul => {
            let (a, b) = (&x()?.shape, &get(node, s, 1)?.shape);
            vs(DataType::Float, matmul_shape(node, a, b)?)
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div => {
            let (a, b) = (x()?, get(node, s, 1)?);
            vs(a.dtype, broadcast(node, &a.shape, &b.shape)?)
        }
        Op::Equal => {
            let (a, b) = (x()?, get(node, s, 1)?);
            vs(DataType::Bool, broadcast(node, &a.shape, &b.shape)?)
        }
        Op::Where => {
            let (c, a, b) = (x()?, get(node, s, 1)?, get(node, s, 2)?);
            let ab = broadcast(node, &a.shape, &b.shape)?;
            vs(a.dtype, broadcast(node, &c.shape, &ab)?)
        }
        Op::Relu
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::HardSwish
        | Op::Clip { .. }
        | Op::Identity
        | Op::Softmax { .. }
        | Op::BatchNormalization { .. } => {
            let v = x()?;
            vs(v.dtype, v.shape.clone())
        }
        Op::Dropout => {
            let v = x()?;
            return Ok(vec![
                vs(v.dtype, v.shape.clone()),
                vs(DataType::Bool, v.shape.clone()),
            ]);
        }
        Op::MaxPool(p) | Op::AveragePool(p) => {
            let xs = &x()?.shape;
            let win = pool_window(node, p, xs)?;
            let mut o = vec![xs[0], xs[1]];
            o.extend(win.out);
            vs(DataType::Float, o)
        }
        Op::GlobalAveragePool => {
            let xs = &x()?.shape;
            if xs.len() < 3 {
                return Err(shape_err(
                    node,
                    format!("needs [N, C, spatial...], got {xs:?}"),
                ));
            }
            let mut o = xs[..2].to_vec();
            o.extend(std::iter::repeat_n(1, xs.len() - 2));
            vs(DataType::Float, o)
        }
        Op::ReduceMean { .. } => {
            let v = x()?;
            let axes = reduce_axes(node, s, v.shape.len())?;
            vs(v.dtype, reduced_shape(&node.op, &v.shape, &axes))
        }
        Op::Flatten { axis } => {
            let v = x()?;
            let a = if *axis == v.shape.len() as i64 {
                v.shape.len()
            } else {
                norm_axis(node, *axis, v.shape.len())?
            };
            vs(
                v.dtype,
                vec![v.shape[..a].iter().product(), v.shape[a..].iter().product()],
            )
        }
        Op::Reshape { allowzero } => {
            let v = x()?;
            let target = const_ints(node, s, 1, "shape")?;
            vs(v.dtype, reshape_shape(node, &v.shape, &target, *allowzero)?)
        }
        Op::Transpose { perm } => {
            let v = x()?;
            let p = transpose_perm(node, perm.as_deref(), v.shape.len())?;
            vs(v.dtype, p.iter().map(|&i| v.shape[i]).collect())
        }
        Op::Concat { axis } => {
            let first = x()?;
            let a = norm_axis(node, *axis, first.shape.len())?;
            let mut o = first.shape.clone();
            o[a] = 0;
            for i in 0..node.inputs.len() {
                let v = get(node, s, i)?;
                if v.shape.len() != o.len()
                    || v.shape
                        .iter()
                        .enumerate()
                        .any(|(k, &d)| k != a && d != first.shape[k])
                {
                    return Err(shape_err(
                        node,
                        format!(
                            "cannot concatenate {:?} with {:?} on axis {a}",
                            first.shape, v.shape
                        ),
                    ));
                }
                o[a] += v.shape[a];
            }
            vs(first.dtype, o)
        }
        Op::Squeeze { .. } => {
            let v = x()?;
            vs(v.dtype, squeeze_shape(node, s, &v.shape)?)
        }
        Op::Unsqueeze { .. } => {
            let v = x()?;
            vs(v.dtype, unsqueeze_shape(node, s, &v.shape)?)
        }
        Op::QuantizeLinear { .. } => {
            let v = x()?;
            let dtype = opt(node, s, 2).map(|z| z.dtype).unwrap_or(DataType::Uint8);
            vs(dtype, v.shape.clone())
        }
        Op::DequantizeLinear { .. } => vs(DataType::Float, x()?.shape.clone()),
        Op::Cast { to } => {
            let dtype = DataType::from_onnx(*to).ok_or_else(|| {
                shape_err(
                    node,
                    format!("Cast to unsupported type {}", DataType::onnx_name(*to)),
                )
            })?;
            vs(dtype, x()?.shape.clone())
        }
        Op::Expand => {
            let v = x()?;
            let target: Vec<usize> = const_ints(node, s, 1, "shape")?
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect();
            vs(v.dtype, broadcast(node, &v.shape, &target)?)
        }
        Op::ConstantOfShape { value } => {
            let target: Vec<usize> = const_ints(node, s, 0, "shape")?
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect();
            vs(value.dtype(), target)
        }
        Op::Gather { axis } => {
            let (d, idx) = (x()?, get(node, s, 1)?);
            let a = norm_axis(node, *axis, d.shape.len())?;
            let mut o = d.shape[..a].to_vec();
            o.extend(&idx.shape);
            o.extend(&d.shape[a + 1..]);
            vs(d.dtype, o)
        }
        Op::Slice { .. } => {
            let v = x()?;
            let axes = slice_axes(node, s, &v.shape)?;
            vs(v.dtype, axes.iter().map(|a| a.len).collect())
        }
        Op::Split { .. } => {
            let v = x()?;
            let (axis, sizes) = split_sizes(node, s, &v.shape)?;
            return Ok(sizes
                .iter()
                .map(|&n| {
                    let mut o = v.shape.clone();
                    o[axis] = n;
                    vs(v.dtype, o)
                })
                .collect());
        }
        Op::Erf | Op::Gelu { .. } | Op::Sqrt => {
            let v = x()?;
            vs(v.dtype, v.shape.clone())
        }
        Op::Not => vs(DataType::Bool, x()?.shape.clone()),
        Op::Pow | Op::Mod { .. } => {
            let (a, b) = (x()?, get(node, s, 1)?);
            vs(a.dtype, broadcast(node, &a.shape, &b.shape)?)
        }
        Op::Range => {
            return Err(shape_err(
                node,
                "start, limit and delta must be constants for a given input shape",
            ))
        }
        Op::LayerNormalization { axis, .. } => {
            let v = x()?;
            let a = norm_axis(node, *axis, v.shape.len())?;
            for i in 1..3 {
                if let Some(p) = opt(node, s, i) {
                    if broadcast(node, &p.shape, &v.shape[a..])? != v.shape[a..] {
                        return Err(shape_err(
                            node,
                            format!(
                                "{} {:?} does not broadcast to the normalized shape {:?}",
                                if i == 1 { "Scale" } else { "B" },
                                p.shape,
                                &v.shape[a..]
                            ),
                        ));
                    }
                }
            }
            let mut stats = v.shape.clone();
            stats[a..].iter_mut().for_each(|d| *d = 1);
            return Ok(vec![
                vs(v.dtype, v.shape.clone()),
                vs(DataType::Float, stats.clone()),
                vs(DataType::Float, stats),
            ]);
        }
        Op::Pad { .. } => {
            let v = x()?;
            let p = pad_spec(node, s, &v.shape)?;
            vs(v.dtype, p.out_shape)
        }
        Op::ScatterND => {
            let v = x()?;
            vs(v.dtype, v.shape.clone())
        }
        Op::Shape { .. } | Op::Constant(_) => {
            return Err(shape_err(node, "could not be evaluated"));
        }
    };
    Ok(vec![out])
}

/// One axis of a resolved Slice: the output takes `len` elements of the
/// input, `start`, `start + step`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceAxis {
    /// First input index.
    pub start: usize,
    /// Stride between taken indices (negative walks backwards).
    pub step: i64,
    /// Number of indices taken.
    pub len: usize,
}

/// Resolves a Slice for an input of `shape`: one entry per input axis
/// (untouched axes take everything), with ONNX's clamping of starts and ends.
pub fn slice_axes(node: &Node, s: &Shapes, shape: &[usize]) -> Result<Vec<SliceAxis>> {
    let Op::Slice { starts, ends, axes } = &node.op else {
        return Err(shape_err(node, "not a Slice"));
    };
    let input_or = |attr: &Option<Vec<i64>>, i: usize, what: &str| -> Result<Option<Vec<i64>>> {
        match attr {
            Some(a) => Ok(Some(a.clone())),
            None if node.input(i).is_some() => Ok(Some(const_ints(node, s, i, what)?)),
            None => Ok(None),
        }
    };
    let starts = input_or(starts, 1, "starts")?.ok_or_else(|| shape_err(node, "needs starts"))?;
    let ends = input_or(ends, 2, "ends")?.ok_or_else(|| shape_err(node, "needs ends"))?;
    let rank = shape.len();
    let axes = match input_or(axes, 3, "axes")? {
        Some(a) => a
            .iter()
            .map(|&v| norm_axis(node, v, rank))
            .collect::<Result<Vec<_>>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = match node.input(4) {
        Some(_) => const_ints(node, s, 4, "steps")?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(shape_err(
            node,
            format!(
                "starts, ends, axes and steps differ in length ({}, {}, {}, {})",
                starts.len(),
                ends.len(),
                axes.len(),
                steps.len()
            ),
        ));
    }
    let mut out: Vec<SliceAxis> = shape
        .iter()
        .map(|&d| SliceAxis {
            start: 0,
            step: 1,
            len: d,
        })
        .collect();
    let mut seen = vec![false; rank];
    for (k, &a) in axes.iter().enumerate() {
        if std::mem::replace(&mut seen[a], true) {
            return Err(shape_err(node, format!("axis {a} is sliced twice")));
        }
        let dim = shape[a] as i64;
        let step = steps[k];
        if step == 0 {
            return Err(shape_err(node, "a step is 0"));
        }
        let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (start, end) = if step > 0 {
            (wrap(starts[k]).clamp(0, dim), wrap(ends[k]).clamp(0, dim))
        } else {
            (
                wrap(starts[k]).clamp(0, (dim - 1).max(0)),
                wrap(ends[k]).clamp(-1, dim - 1),
            )
        };
        let span = if step > 0 { end - start } else { start - end };
        let len = if span <= 0 || dim == 0 {
            0
        } else {
            (span + step.abs() - 1) / step.abs()
        };
        out[a] = SliceAxis {
            start: if len == 0 { 0 } else { start as usize },
            step,
            len: len as usize,
        };
    }
    Ok(out)
}

/// Gather indices for an axis of `dim` entries, negative ones counted from
/// the end; an index outside the axis is an error naming the node.
pub fn gather_indices(node: &Node, raw: &[i64], dim: usize) -> Result<Vec<usize>> {
    let d = dim as i64;
    raw.iter()
        .map(|&i| {
            let j = if i < 0 { i + d } else { i };
            if (0..d).contains(&j) {
                Ok(j as usize)
            } else {
                Err(shape_err(
                    node,
                    format!("index {i} out of range for dimension {dim}"),
                ))
            }
        })
        .collect()
}

/// The axis and the part sizes of a Split for an input of `shape`.
pub fn split_sizes(node: &Node, s: &Shapes, shape: &[usize]) -> Result<(usize, Vec<usize>)> {
    let Op::Split { axis, split } = &node.op else {
        return Err(shape_err(node, "not a Split"));
    };
    let a = norm_axis(node, *axis, shape.len())?;
    let dim = shape[a];
    let given = match (split, node.input(1)) {
        (Some(v), _) => Some(v.clone()),
        (None, Some(_)) => Some(const_ints(node, s, 1, "split")?),
        (None, None) => None,
    };
    let parts = node.outputs.len().max(1);
    let sizes: Vec<usize> = match given {
        Some(v) => {
            if v.iter().any(|&x| x < 0) {
                return Err(shape_err(node, format!("negative split sizes {v:?}")));
            }
            v.iter().map(|&x| x as usize).collect()
        }
        None => {
            let each = dim.div_ceil(parts);
            (0..parts)
                .map(|i| each.min(dim.saturating_sub(i * each)))
                .collect()
        }
    };
    if sizes.len() != node.outputs.len() || sizes.iter().sum::<usize>() != dim {
        return Err(shape_err(
            node,
            format!(
                "split sizes {sizes:?} do not divide dimension {dim} into {} outputs",
                node.outputs.len()
            ),
        ));
    }
    Ok((a, sizes))
}

/// A resolved Pad: padding before and after each axis (negative crops), the
/// fill value and the output shape.
#[derive(Debug, Clone, PartialEq)]
pub struct PadSpec {
    /// Elements added before each axis.
    pub begin: Vec<i64>,
    /// Elements added after each axis.
    pub end: Vec<i64>,
    /// Fill value of constant mode.
    pub value: f32,
    /// Output shape.
    pub out_shape: Vec<usize>,
}

/// Resolves a Pad for an input of `shape` (`pads` and `axes` must be
/// constants).
pub fn pad_spec(node: &Node, s: &Shapes, shape: &[usize]) -> Result<PadSpec> {
    let Op::Pad { pads, value, .. } = &node.op else {
        return Err(shape_err(node, "not a Pad"));
    };
    let rank = shape.len();
    let raw = match pads {
        Some(p) => p.clone(),
        None => const_ints(node, s, 1, "pads")?,
    };
    let value = match (pads, opt(node, s, 2)) {
        (None, Some(v)) => match &v.value {
            Some(t) => t.to_f32_vec().first().copied().unwrap_or(0.0),
            None => {
                return Err(shape_err(
                    node,
                    "constant_value (input 2) must be a constant",
                ))
            }
        },
        _ => *value,
    };
    let axes: Vec<usize> = match node.input(3) {
        Some(_) if pads.is_none() => const_ints(node, s, 3, "axes")?
            .iter()
            .map(|&a| norm_axis(node, a, rank))
            .collect::<Result<_>>()?,
        _ => (0..rank).collect(),
    };
    if raw.len() != 2 * axes.len() {
        return Err(shape_err(
            node,
            format!("pads {raw:?} need {} values", 2 * axes.len()),
        ));
    }
    let (mut begin, mut end) = (vec![0i64; rank], vec![0i64; rank]);
    for (k, &a) in axes.iter().enumerate() {
        begin[a] = raw[k];
        end[a] = raw[k + axes.len()];
    }
    let out_shape = (0..rank)
        .map(|i| {
            let d = shape[i] as i64 + begin[i] + end[i];
            if d < 0 {
                Err(shape_err(
                    node,
                    format!("pads {raw:?} crop axis {i} of {shape:?} below zero"),
                ))
            } else {
                Ok(d as usize)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PadSpec {
        begin,
        end,
        value,
        out_shape,
    })
}

/// Where ScatterND writes: the flat offset in the data of each update
/// slice, and the slice length. `indices` has shape `idx_shape`, its last
/// dimension indexing the leading axes of `data_shape`.
pub fn scatter_offsets(
    node: &Node,
    data_shape: &[usize],
    indices: &[i64],
    idx_shape: &[usize],
    updates_len: usize,
) -> Result<(Vec<usize>, usize)> {
    let k = *idx_shape
        .last()
        .ok_or_else(|| shape_err(node, "indices must have rank 1 or more"))?;
    if k > data_shape.len() {
        return Err(shape_err(
            node,
            format!(
                "index tuples of length {k} for data of rank {}",
                data_shape.len()
            ),
        ));
    }
    let slice: usize = data_shape[k..].iter().product();
    let n = indices.len().checked_div(k).unwrap_or(0);
    if n * slice != updates_len {
        return Err(shape_err(
            node,
            format!("updates hold {updates_len} values, the indices address {n} slices of {slice}"),
        ));
    }
    let mut offsets = Vec::with_capacity(n);
    for t in indices.chunks(k.max(1)).take(n) {
        let mut off = 0usize;
        for (j, &i) in t.iter().enumerate() {
            let d = data_shape[j] as i64;
            let w = if i < 0 { i + d } else { i };
            if w < 0 || w >= d {
                return Err(shape_err(
                    node,
                    format!("index {i} out of range for dimension {d}"),
                ));
            }
            off = off * data_shape[j] + w as usize;
        }
        offsets.push(off * slice);
    }
    Ok((offsets, slice))
}

/// MatMul operand shapes with numpy's 1-D promotion: a vector A becomes
/// `[1, k]`, a vector B becomes `[k, 1]`.
pub fn matmul_operands(a: &[usize], b: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let a2 = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2 = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    (a2, b2)
}

/// Output shape of a numpy-style matrix product.
pub fn matmul_shape(node: &Node, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    if a.is_empty() || b.is_empty() {
        return Err(shape_err(node, "MatMul of a scalar"));
    }
    let (a2, b2) = matmul_operands(a, b);
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(shape_err(
            node,
            format!("inner dimensions differ: {a:?} x {b:?}"),
        ));
    }
    let mut o = broadcast(node, &a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        o.push(m);
    }
    if b.len() > 1 {
        o.push(n);
    }
    Ok(o)
}

/// Axes of a ReduceMean (attribute or input 1), normalized.
pub fn reduce_axes(node: &Node, s: &Shapes, rank: usize) -> Result<Vec<usize>> {
    let Op::ReduceMean {
        axes,
        noop_with_empty_axes,
        ..
    } = &node.op
    else {
        return Err(shape_err(node, "not a ReduceMean"));
    };
    let raw = match (axes, node.input(1)) {
        (Some(a), _) => a.clone(),
        (None, Some(_)) => const_ints(node, s, 1, "axes")?,
        (None, None) => Vec::new(),
    };
    if raw.is_empty() {
        return Ok(if *noop_with_empty_axes {
            Vec::new()
        } else {
            (0..rank).collect()
        });
    }
    let mut v = raw
        .iter()
        .map(|&a| norm_axis(node, a, rank))
        .collect::<Result<Vec<_>>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn reduced_shape(op: &Op, shape: &[usize], axes: &[usize]) -> Vec<usize> {
    let keep = matches!(op, Op::ReduceMean { keepdims: true, .. });
    shape
        .iter()
        .enumerate()
        .filter_map(|(i, &d)| match (axes.contains(&i), keep) {
            (true, true) => Some(1),
            (true, false) => None,
            (false, _) => Some(d),
        })
        .collect()
}

/// Resolves a Reshape target (`0` copies, `-1` infers).
pub fn reshape_shape(
    node: &Node,
    input: &[usize],
    target: &[i64],
    allowzero: bool,
) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err(shape_err(node, format!("shape {target:?} has two -1")));
                }
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                shape_err(
                    node,
                    format!("shape {target:?} copies dim {i} of {input:?}, which does not exist"),
                )
            })?),
            t if t >= 0 => out.push(t as usize),
            _ => {
                return Err(shape_err(
                    node,
                    format!("invalid dimension {t} in shape {target:?}"),
                ))
            }
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(shape_err(
                node,
                format!("cannot reshape {input:?} to {target:?}"),
            ));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(shape_err(
            node,
            format!("cannot reshape {input:?} ({total} elements) to {target:?}"),
        ));
    }
    Ok(out)
}

/// A Transpose permutation, validated (reverse when absent).
pub fn transpose_perm(node: &Node, perm: Option<&[usize]>, rank: usize) -> Result<Vec<usize>> {
    let p: Vec<usize> = perm
        .map(<[usize]>::to_vec)
        .unwrap_or_else(|| (0..rank).rev().collect());
    let mut seen = vec![false; rank];
    if p.len() != rank
        || p.iter()
            .any(|&i| i >= rank || std::mem::replace(&mut seen[i], true))
    {
        return Err(shape_err(
            node,
            format!("perm {p:?} is not a permutation of rank {rank}"),
        ));
    }
    Ok(p)
}

fn axes_of(node: &Node, s: &Shapes, attr: &Option<Vec<i64>>) -> Result<Option<Vec<i64>>> {
    Ok(match (attr, node.input(1)) {
        (Some(a), _) => Some(a.clone()),
        (None, Some(_)) => Some(const_ints(node, s, 1, "axes")?),
        (None, None) => None,
    })
}

fn squeeze_shape(node: &Node, s: &Shapes, shape: &[usize]) -> Result<Vec<usize>> {
    let Op::Squeeze { axes } = &node.op else {
        return Err(shape_err(node, "not a Squeeze"));
    };
    match axes_of(node, s, axes)? {
        None => Ok(shape.iter().copied().filter(|&d| d != 1).collect()),
        Some(a) => {
            let ax = a
                .iter()
                .map(|&v| norm_axis(node, v, shape.len()))
                .collect::<Result<Vec<_>>>()?;
            if let Some(&bad) = ax.iter().find(|&&i| shape[i] != 1) {
                return Err(shape_err(
                    node,
                    format!("cannot squeeze axis {bad} of {shape:?}"),
                ));
            }
            Ok(shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !ax.contains(i))
                .map(|(_, &d)| d)
                .collect())
        }
    }
}

fn unsqueeze_shape(node: &Node, s: &Shapes, shape: &[usize]) -> Result<Vec<usize>> {
    let Op::Unsqueeze { axes } = &node.op else {
        return Err(shape_err(node, "not an Unsqueeze"));
    };
    let a = axes_of(node, s, axes)?.ok_or_else(|| shape_err(node, "Unsqueeze needs axes"))?;
    let rank = shape.len() + a.len();
    let mut ax = a
        .iter()
        .map(|&v| norm_axis(node, v, rank))
        .collect::<Result<Vec<_>>>()?;
    ax.sort_unstable();
    let mut out = Vec::with_capacity(rank);
    let mut it = shape.iter();
    for i in 0..rank {
        if ax.contains(&i) {
            out.push(1);
        } else {
            out.push(*it.next().ok_or_else(|| shape_err(node, "duplicate axes"))?);
        }
    }
    Ok(out)
}

/// Evaluates `node` when all its inputs are known constants (and small).
fn fold(node: &Node, s: &Shapes) -> Result<Option<Tensor>> {
    match &node.op {
        Op::Constant(t) => return Ok(Some(t.clone())),
        Op::Shape { start, end } => {
            let v = get(node, s, 0)?;
            let r = v.shape.len() as i64;
            let clampi = |i: i64| (if i < 0 { i + r } else { i }).clamp(0, r) as usize;
            let (a, b) = (clampi(*start), clampi(end.unwrap_or(r)));
            let dims: Vec<i64> = v.shape[a..b.max(a)].iter().map(|&d| d as i64).collect();
            return Ok(Some(Tensor::vec_i64(&dims)));
        }
        _ => {}
    }
    let foldable = matches!(
        node.op,
        Op::Gather { .. }
            | Op::Unsqueeze { .. }
            | Op::Squeeze { .. }
            | Op::Concat { .. }
            | Op::Cast { .. }
            | Op::Reshape { .. }
            | Op::ConstantOfShape { .. }
            | Op::Equal
            | Op::Where
            | Op::Expand
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Identity
            | Op::Flatten { .. }
            | Op::Slice { .. }
            | Op::Transpose { .. }
            | Op::Range
            | Op::Mod { .. }
            | Op::Not
            | Op::Sqrt
            | Op::Pow
            | Op::ScatterND
    );
    if !foldable {
        return Ok(None);
    }
    let mut vals = Vec::new();
    for i in &node.inputs {
        if i.is_empty() {
            continue;
        }
        match s.get(i).and_then(|v| v.value.as_ref()) {
            Some(t) if t.len() <= MAX_FOLD_ELEMENTS => vals.push(t),
            _ => return Ok(None),
        }
    }
    let t = match &node.op {
        Op::Identity => vals[0].clone(),
        Op::Cast { to } => cast(node, vals[0], *to)?,
        Op::Reshape { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } | Op::Flatten { .. } => {
            let shape = infer_unfolded(node, s)?.shape;
            map_each!(vals[0], |a| a
                .clone()
                .into_shape_with_order(IxDyn(&shape))
                .map_err(|e| shape_err(node, e.to_string())))
        }
        Op::Gather { axis } => {
            let data = vals[0];
            let a = norm_axis(node, *axis, data.shape().len())?;
            let raw = vals[1]
                .to_i64_vec()
                .ok_or_else(|| shape_err(node, "Gather indices must be integers"))?;
            let idx = gather_indices(node, &raw, data.shape()[a])?;
            let shape = infer_unfolded(node, s)?.shape;
            map_each!(data, |arr| arr
                .select(Axis(a), &idx)
                .into_shape_with_order(IxDyn(&shape))
                .map_err(|e| shape_err(node, e.to_string())))
        }
        Op::Concat { axis } => {
            let a = norm_axis(node, *axis, vals[0].shape().len())?;
            concat(node, &vals, a)?
        }
        Op::ConstantOfShape { value } => {
            let shape: Vec<usize> = vals[0]
                .to_i64_vec()
                .unwrap_or_default()
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect();
            if shape.iter().product::<usize>() > MAX_FOLD_ELEMENTS {
                return Ok(None);
            }
            map_each!(value, |v| v
                .iter()
                .next()
                .map(|&x| ArrayD::from_elem(IxDyn(&shape), x))
                .ok_or_else(|| shape_err(node, "empty fill value")))
        }
        Op::Expand => {
            let shape = infer_unfolded(node, s)?.shape;
            if shape.iter().product::<usize>() > MAX_FOLD_ELEMENTS {
                return Ok(None);
            }
            map_each!(vals[0], |a| a
                .broadcast(IxDyn(&shape))
                .map(|v| v.to_owned())
                .ok_or_else(|| shape_err(
                    node,
                    format!("cannot expand {:?} to {shape:?}", a.shape())
                )))
        }
        Op::Slice { .. } => {
            let axes = slice_axes(node, s, vals[0].shape())?;
            let mut t = vals[0].clone();
            for (a, sl) in axes.iter().enumerate() {
                let idx: Vec<usize> = (0..sl.len)
                    .map(|k| (sl.start as i64 + k as i64 * sl.step) as usize)
                    .collect();
                t = map_each!(&t, |arr| Ok::<_, GraphError>(arr.select(Axis(a), &idx)));
            }
            t
        }
        Op::Range => range(node, &vals)?,
        Op::Transpose { perm } => {
            let p = transpose_perm(node, perm.as_deref(), vals[0].shape().len())?;
            map_each!(vals[0], |a| Ok::<_, GraphError>(
                a.clone()
                    .permuted_axes(IxDyn(&p))
                    .as_standard_layout()
                    .into_owned()
            ))
        }
        Op::ScatterND => {
            let idx = vals[1]
                .to_i64_vec()
                .ok_or_else(|| shape_err(node, "ScatterND indices must be integers"))?;
            let (offsets, slice) =
                scatter_offsets(node, vals[0].shape(), &idx, vals[1].shape(), vals[2].len())?;
            macro_rules! scatter {
                ($($v:ident),*) => {
                    match (vals[0], vals[2]) {
                        $((Tensor::$v(d), Tensor::$v(u)) => {
                            let mut out = d.as_standard_layout().into_owned();
                            let u = u.as_standard_layout();
                            let (dst, src) = (
                                out.as_slice_mut().ok_or_else(|| shape_err(node, "layout"))?,
                                u.as_slice().ok_or_else(|| shape_err(node, "layout"))?,
                            );
                            for (i, &o) in offsets.iter().enumerate() {
                                dst[o..o + slice].copy_from_slice(&src[i * slice..(i + 1) * slice]);
                            }
                            Tensor::$v(out)
                        })*
                        _ => return Err(shape_err(node, "data and updates differ in type")),
                    }
                };
            }
            scatter!(F32, U8, I8, I32, I64, Bool)
        }
        Op::Equal
        | Op::Where
        | Op::Add
        | Op::Sub
        | Op::Mul
        | Op::Div
        | Op::Mod { .. }
        | Op::Pow
        | Op::Not
        | Op::Sqrt => elementwise(node, &vals)?,
        _ => return Ok(None),
    };
    Ok(Some(t))
}

/// Range on constant scalars, in the type of `start`.
fn range(node: &Node, vals: &[&Tensor]) -> Result<Tensor> {
    if vals.len() != 3 || vals.iter().any(|t| t.len() != 1) {
        return Err(shape_err(node, "start, limit and delta must be scalars"));
    }
    if let (Some(a), Some(b), Some(d)) = (
        vals[0].to_i64_vec(),
        vals[1].to_i64_vec(),
        vals[2].to_i64_vec(),
    ) {
        let (a, b, d) = (a[0], b[0], d[0]);
        if d == 0 {
            return Err(shape_err(node, "delta is 0"));
        }
        let n = ((b - a) as f64 / d as f64).ceil().max(0.0) as usize;
        if n > MAX_FOLD_ELEMENTS {
            return Err(shape_err(node, format!("{n} elements is too many")));
        }
        let v: Vec<i64> = (0..n as i64).map(|i| a + i * d).collect();
        return Ok(match vals[0] {
            Tensor::I32(_) => {
                Tensor::I32(ndarray::Array1::from_iter(v.iter().map(|&x| x as i32)).into_dyn())
            }
            _ => Tensor::vec_i64(&v),
        });
    }
    let f = |t: &Tensor| t.to_f32_vec()[0];
    let (a, b, d) = (f(vals[0]), f(vals[1]), f(vals[2]));
    if d == 0.0 || !(a.is_finite() && b.is_finite() && d.is_finite()) {
        return Err(shape_err(node, "delta is 0 or a bound is not finite"));
    }
    let n = ((b - a) / d).ceil().max(0.0) as usize;
    if n > MAX_FOLD_ELEMENTS {
        return Err(shape_err(node, format!("{n} elements is too many")));
    }
    Ok(Tensor::F32(
        ndarray::Array1::from_iter((0..n).map(|i| a + i as f32 * d)).into_dyn(),
    ))
}

/// Inference without constant folding (the output shape of a foldable node).
fn infer_unfolded(node: &Node, s: &Shapes) -> Result<ValueShape> {
    let mut v = infer_node_inner(node, s)?;
    Ok(v.swap_remove(0))
}

fn cast(node: &Node, t: &Tensor, to: i32) -> Result<Tensor> {
    let dtype = DataType::from_onnx(to).ok_or_else(|| {
        shape_err(
            node,
            format!("Cast to unsupported type {}", DataType::onnx_name(to)),
        )
    })?;
    let f = t.to_f32_vec();
    let shape = IxDyn(t.shape());
    let mk = |e: ndarray::ShapeError| shape_err(node, e.to_string());
    Ok(match (dtype, t.to_i64_vec()) {
        (DataType::Float, _) => Tensor::F32(ArrayD::from_shape_vec(shape, f).map_err(mk)?),
        (DataType::Int64, Some(v)) => Tensor::I64(ArrayD::from_shape_vec(shape, v).map_err(mk)?),
        (DataType::Int64, None) => Tensor::I64(
            ArrayD::from_shape_vec(shape, f.iter().map(|&x| x as i64).collect()).map_err(mk)?,
        ),
        (DataType::Int32, _) => Tensor::I32(
            ArrayD::from_shape_vec(shape, f.iter().map(|&x| x as i32).collect()).map_err(mk)?,
        ),
        (DataType::Bool, _) => Tensor::Bool(
            ArrayD::from_shape_vec(shape, f.iter().map(|&x| x != 0.0).collect()).map_err(mk)?,
        ),
        (DataType::Int8, _) => Tensor::I8(
            ArrayD::from_shape_vec(shape, f.iter().map(|&x| x as i8).collect()).map_err(mk)?,
        ),
        (DataType::Uint8, _) => Tensor::U8(
            ArrayD::from_shape_vec(shape, f.iter().map(|&x| x as u8).collect()).map_err(mk)?,
        ),
    })
}

fn concat(node: &Node, vals: &[&Tensor], axis: usize) -> Result<Tensor> {
    macro_rules! cat {
        ($variant:ident) => {{
            let arrs = vals
                .iter()
                .map(|t| match t {
                    Tensor::$variant(a) => Ok(a.view()),
                    other => Err(shape_err(
                        node,
                        format!(
                            "cannot concatenate {:?} with {:?}",
                            vals[0].dtype(),
                            other.dtype()
                        ),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::$variant(
                ndarray::concatenate(Axis(axis), &arrs)
                    .map_err(|e| shape_err(node, e.to_string()))?,
            )
        }};
    }
    Ok(match vals[0] {
        Tensor::F32(_) => cat!(F32),
        Tensor::I64(_) => cat!(I64),
        Tensor::I32(_) => cat!(I32),
        Tensor::I8(_) => cat!(I8),
        Tensor::U8(_) => cat!(U8),
        Tensor::Bool(_) => cat!(Bool),
    })
}

/// Elementwise ops on constants, computed in f64 (exact for the small
/// integers of shape arithmetic) and converted back to the inputs' type.
fn elementwise(node: &Node, vals: &[&Tensor]) -> Result<Tensor> {
    let shapes: Vec<&[usize]> = vals.iter().map(|t| t.shape()).collect();
    let mut shape = shapes[0].to_vec();
    for sh in &shapes[1..] {
        shape = broadcast(node, &shape, sh)?;
    }
    let f64s: Vec<ArrayD<f64>> = vals
        .iter()
        .map(|t| {
            let v: Vec<f64> = match t.to_i64_vec() {
                Some(i) => i.into_iter().map(|x| x as f64).collect(),
                None => t.to_f32_vec().into_iter().map(f64::from).collect(),
            };
            ArrayD::from_shape_vec(IxDyn(t.shape()), v).map_err(|e| shape_err(node, e.to_string()))
        })
        .collect::<Result<_>>()?;
    let views = f64s
        .iter()
        .map(|a| {
            a.broadcast(IxDyn(&shape))
                .ok_or_else(|| shape_err(node, "broadcast failed"))
        })
        .collect::<Result<Vec<_>>>()?;
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let iters: Vec<Vec<f64>> = views.iter().map(|v| v.iter().copied().collect()).collect();
    for k in 0..n {
        let a = iters[0][k];
        let b = iters.get(1).map(|v| v[k]).unwrap_or(0.0);
        out.push(match node.op {
            Op::Add => a + b,
            Op::Sub => a - b,
            Op::Mul => a * b,
            Op::Div => {
                if vals[0].dtype() == DataType::Float {
                    a / b
                } else if b == 0.0 {
                    return Err(shape_err(node, "integer division by zero"));
                } else {
                    (a / b).trunc()
                }
            }
            Op::Equal => (a == b) as u8 as f64,
            Op::Not => (a == 0.0) as u8 as f64,
            Op::Sqrt => a.sqrt(),
            Op::Pow => a.powf(b),
            Op::Mod { fmod } => {
                if vals[0].dtype() != DataType::Float && b == 0.0 {
                    return Err(shape_err(node, "integer modulo by zero"));
                }
                let r = a % b;
                if fmod || r == 0.0 || (r < 0.0) == (b < 0.0) {
                    r
                } else {
                    r + b
                }
            }
            Op::Where => {
                if a != 0.0 {
                    b
                } else {
                    iters[2][k]
                }
            }
            _ => return Err(shape_err(node, "not an elementwise op")),
        });
    }
    let out_type = match node.op {
        Op::Equal | Op::Not => DataType::Bool,
        Op::Where => vals[1].dtype(),
        _ => vals[0].dtype(),
    };
    let dim = IxDyn(&shape);
    let mk = |e: ndarray::ShapeError| shape_err(node, e.to_string());
    Ok(match out_type {
        DataType::Float => Tensor::F32(
            ArrayD::from_shape_vec(dim, out.iter().map(|&x| x as f32).collect()).map_err(mk)?,
        ),
        DataType::Int64 => Tensor::I64(
            ArrayD::from_shape_vec(dim, out.iter().map(|&x| x as i64).collect()).map_err(mk)?,
        ),
        DataType::Int32 => Tensor::I32(
            ArrayD::from_shape_vec(dim, out.iter().map(|&x| x as i32).collect()).map_err(mk)?,
        ),
        DataType::Bool => Tensor::Bool(
            ArrayD::from_shape_vec(dim, out.iter().map(|&x| x != 0.0).collect()).map_err(mk)?,
        ),
        DataType::Int8 => Tensor::I8(
            ArrayD::from_shape_vec(dim, out.iter().map(|&x| x as i8).collect()).map_err(mk)?,
        ),
        DataType::Uint8 => Tensor::U8(
            ArrayD::from_shape_vec(dim, out.iter().map(|&x| x as u8).collect()).map_err(mk)?,
        ),
    })
}
