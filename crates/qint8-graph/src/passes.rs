//! Graph passes: Identity/Dropout removal, BatchNormalization folding,
//! constant folding (including the Shape/Gather/Unsqueeze/Concat/Reshape
//! chains PyTorch exporters emit for flattening), and dead-code removal.

use std::collections::{HashMap, HashSet};

use ndarray::{ArrayD, Axis};

use crate::error::{invalid, Result};
use crate::ir::Graph;
use crate::ops::Op;
use crate::shape::{self, ValueShape};
use crate::tensor::Tensor;

/// Runs every pass until nothing changes. Returns the number of nodes removed.
pub fn simplify(g: &mut Graph) -> Result<usize> {
    let before = g.nodes.len();
    g.toposort()?;
    loop {
        let n = g.nodes.len();
        remove_identities(g);
        fold_constants(g)?;
        fold_shape_reshapes(g)?;
        fold_batchnorm(g)?;
        remove_dead_nodes(g);
        if g.nodes.len() == n {
            break;
        }
    }
    g.remove_unused_initializers();
    g.validate()?;
    Ok(before - g.nodes.len())
}

/// Removes Identity and Dropout nodes (inference-mode Dropout is the identity),
/// rewiring their consumers to the node's input.
pub fn remove_identities(g: &mut Graph) -> usize {
    let mut removed = 0;
    let mut k = 0;
    while k < g.nodes.len() {
        let n = &g.nodes[k];
        let is_id = matches!(n.op, Op::Identity | Op::Dropout);
        // A Dropout whose mask output is used must stay.
        let mask_used = n
            .outputs
            .get(1)
            .is_some_and(|m| !m.is_empty() && (!g.consumers(m).is_empty() || g.is_output(m)));
        if !is_id || mask_used || n.input(0).is_none() {
            k += 1;
            continue;
        }
        let (inp, out) = (n.inputs[0].clone(), n.outputs[0].clone());
        if g.is_output(&out) {
            // Keep the graph output's name: rename the input instead, when it is
            // a plain intermediate value.
            let renamable =
                g.producer(&inp).is_some() && !g.is_output(&inp) && g.consumers(&inp).len() == 1;
            if !renamable {
                k += 1;
                continue;
            }
            g.nodes.remove(k);
            for n in &mut g.nodes {
                for o in &mut n.outputs {
                    if *o == inp {
                        *o = out.clone();
                    }
                }
            }
            g.rename_value(&inp, &out);
        } else {
            g.nodes.remove(k);
            g.rename_value(&out, &inp);
        }
        removed += 1;
    }
    removed
}

/// Replaces nodes whose inputs are all constants by initializers.
pub fn fold_constants(g: &mut Graph) -> Result<usize> {
    let mut known: shape::Shapes = g
        .initializers
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                ValueShape {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    // Weights are never folded: no copy of them.
                    value: (t.len() <= shape::MAX_FOLD_ELEMENTS).then(|| t.clone()),
                },
            )
        })
        .collect();
    let mut folded = 0;
    let mut keep = Vec::with_capacity(g.nodes.len());
    for node in std::mem::take(&mut g.nodes) {
        let all_const = node
            .inputs
            .iter()
            .all(|i| i.is_empty() || known.contains_key(i));
        let foldable = all_const
            && !matches!(node.op, Op::Shape { .. } if node.input(0).is_none())
            && node.outputs.len() == 1
            && !g.is_output(&node.outputs[0]);
        if foldable {
            if let Ok(mut out) = shape::infer_node(&node, &known) {
                if let Some(t) = out.first_mut().and_then(|v| v.value.take()) {
                    known.insert(
                        node.outputs[0].clone(),
                        ValueShape {
                            dtype: t.dtype(),
                            shape: t.shape().to_vec(),
                            value: Some(t.clone()),
                        },
                    );
                    g.initializers.insert(node.outputs[0].clone(), t);
                    folded += 1;
                    continue;
                }
            }
        }
        keep.push(node);
    }
    g.nodes = keep;
    Ok(folded)
}

/// One element of a shape-like i64 tensor, tracked symbolically.
#[derive(Debug, Clone, PartialEq)]
enum Sym {
    Const(i64),
    DimOf(String, usize),
}

/// Rewrites `Reshape(x, Concat(Unsqueeze(Gather(Shape(x), i)), ..., c))`
/// into `Reshape(x, [0, ..., c])` when every symbolic element copies the
/// same dimension of `x` (Reshape's `0` means "copy"), so the shape chain
/// becomes dead and dynamic batch sizes keep working.
pub fn fold_shape_reshapes(g: &mut Graph) -> Result<usize> {
    let mut sym: HashMap<String, Vec<Sym>> = HashMap::new();
    // Rank first: converting every weight tensor to i64 only to drop it
    // allocated eight bytes per weight on every simplification.
    for (k, t) in g.initializers.iter().filter(|(_, t)| t.shape().len() <= 1) {
        if let Some(v) = t.to_i64_vec() {
            sym.insert(k.clone(), v.into_iter().map(Sym::Const).collect());
        }
    }
    let mut rewrites = Vec::new();
    for (idx, n) in g.nodes.iter().enumerate() {
        let input_sym = |i: usize| n.input(i).and_then(|v| sym.get(v));
        let out: Option<Vec<Sym>> = match &n.op {
            Op::Shape { start, end } if n.input(0).is_some() => {
                let x = n.inputs[0].clone();
                let rank = g
                    .inputs
                    .iter()
                    .chain(&g.value_info)
                    .find(|v| v.name == x)
                    .and_then(|v| v.shape.as_ref().map(Vec::len));
                rank.map(|r| {
                    let r = r as i64;
                    let c = |i: i64| (if i < 0 { i + r } else { i }).clamp(0, r) as usize;
                    (c(*start)..c(end.unwrap_or(r)))
                        .map(|a| Sym::DimOf(x.clone(), a))
                        .collect()
                })
            }
            Op::Gather { axis: 0 } => {
                match (input_sym(0), n.input(1).and_then(|v| g.initializers.get(v))) {
                    (Some(src), Some(idx)) if idx.shape().len() <= 1 => {
                        idx.to_i64_vec().and_then(|ix| {
                            ix.iter()
                                .map(|&i| {
                                    let j = if i < 0 { i + src.len() as i64 } else { i };
                                    src.get(j as usize).cloned()
                                })
                                .collect()
                        })
                    }
                    _ => None,
                }
            }
            Op::Unsqueeze { .. } | Op::Squeeze { .. } | Op::Cast { .. } | Op::Identity => {
                input_sym(0).cloned()
            }
            Op::Concat { .. } => {
                let parts: Option<Vec<&Vec<Sym>>> = (0..n.inputs.len()).map(input_sym).collect();
                parts.map(|p| p.into_iter().flatten().cloned().collect())
            }
            Op::Reshape { allowzero: false } => {
                if let (Some(data), Some(target)) = (n.input(0), input_sym(1)) {
                    let resolved: Option<Vec<i64>> = target
                        .iter()
                        .enumerate()
                        .map(|(pos, s)| match s {
                            Sym::Const(c) => Some(*c),
                            Sym::DimOf(v, a) if v == data && *a == pos => Some(0),
                            Sym::DimOf(..) => None,
                        })
                        .collect();
                    let is_const = n.input(1).is_some_and(|v| g.initializers.contains_key(v));
                    if let (Some(r), false) = (resolved, is_const) {
                        rewrites.push((idx, r));
                    }
                }
                None
            }
            _ => None,
        };
        if let (Some(o), Some(name)) = (out, n.outputs.first()) {
            sym.insert(name.clone(), o);
        }
    }
    let count = rewrites.len();
    for (idx, shape) in rewrites {
        let name = g.fresh_name(&format!("{}_shape", g.nodes[idx].name));
        g.initializers.insert(name.clone(), Tensor::vec_i64(&shape));
        g.nodes[idx].inputs[1] = name;
    }
    Ok(count)
}

/// Folds BatchNormalization into a preceding Conv or Gemm whose output it
/// alone consumes, when all parameters are initializers.
pub fn fold_batchnorm(g: &mut Graph) -> Result<usize> {
    let mut folded = 0;
    let mut k = 0;
    while k < g.nodes.len() {
        let Op::BatchNormalization { epsilon } = g.nodes[k].op else {
            k += 1;
            continue;
        };
        let bn = g.nodes[k].clone();
        let Some(x) = bn.input(0) else {
            k += 1;
            continue;
        };
        let params: Option<Vec<ArrayD<f32>>> = (1..5)
            .map(|i| {
                bn.input(i)
                    .and_then(|n| g.initializers.get(n))
                    .and_then(Tensor::as_f32)
                    .cloned()
            })
            .collect();
        let (Some(params), Some(p)) = (params, g.producer(x)) else {
            k += 1;
            continue;
        };
        if g.consumers(x).len() != 1 || g.is_output(x) {
            k += 1;
            continue;
        }
        let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
        let c = gamma.len();
        if [beta.len(), mean.len(), var.len()].iter().any(|&l| l != c) {
            return Err(invalid(format!(
                "BatchNormalization {} has parameters of different lengths",
                bn.name
            )));
        }
        let a: Vec<f32> = gamma
            .iter()
            .zip(var)
            .map(|(g, v)| g / (v + epsilon).sqrt())
            .collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * a[i]).collect();
        let prod = g.nodes[p].clone();
        let Some(wname) = prod.input(1).map(str::to_string) else {
            k += 1;
            continue;
        };
        let Some(w) = g.initializers.get(&wname).and_then(Tensor::as_f32).cloned() else {
            k += 1;
            continue;
        };
        // Output channel axis of the weight.
        let axis = match &prod.op {
            Op::Conv(_) if w.shape().first() == Some(&c) => 0,
            Op::Gemm {
                trans_b: true,
                beta: b,
                ..
            } if w.ndim() == 2 && w.shape()[0] == c && (*b == 1.0 || prod.input(2).is_none()) => 0,
            Op::Gemm {
                trans_b: false,
                beta: b,
                ..
            } if w.ndim() == 2 && w.shape()[1] == c && (*b == 1.0 || prod.input(2).is_none()) => 1,
            _ => {
                k += 1;
                continue;
            }
        };
        // A weight shared with another node cannot be rewritten in place.
        if g.consumers(&wname).len() != 1 {
            k += 1;
            continue;
        }
        let mut w2 = w.clone();
        for (i, mut lane) in w2.axis_iter_mut(Axis(axis)).enumerate() {
            lane.mapv_inplace(|v| v * a[i]);
        }
        let old_bias: Vec<f32> = prod
            .input(2)
            .and_then(|b| g.initializers.get(b))
            .map(Tensor::to_f32_vec)
            .unwrap_or_else(|| vec![0.0; c]);
        if old_bias.len() != c {
            k += 1;
            continue;
        }
        let bias: Vec<f32> = (0..c).map(|i| old_bias[i] * a[i] + shift[i]).collect();
        let bname = g.fresh_name(&format!("{}_bias_folded", prod.name));
        g.initializers.insert(wname.clone(), Tensor::F32(w2));
        g.initializers.insert(
            bname.clone(),
            Tensor::F32(ndarray::Array1::from(bias).into_dyn()),
        );
        let pn = &mut g.nodes[p];
        if pn.inputs.len() < 3 {
            pn.inputs.resize(3, String::new());
        }
        pn.inputs[2] = bname;
        if let Op::Gemm { beta, .. } = &mut pn.op {
            *beta = 1.0;
        }
        // The producer now writes the BN's output.
        let bn_out = bn.outputs[0].clone();
        pn.outputs[0] = bn_out;
        g.nodes.remove(k);
        folded += 1;
    }
    if folded > 0 {
        g.remove_unused_initializers();
    }
    Ok(folded)
}

/// Removes nodes none of whose outputs is consumed or a graph output.
pub fn remove_dead_nodes(g: &mut Graph) -> usize {
    let mut removed = 0;
    loop {
        let used: HashSet<String> = g
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().cloned())
            .chain(g.outputs.iter().map(|o| o.name.clone()))
            .collect();
        let before = g.nodes.len();
        g.nodes
            .retain(|n| n.outputs.iter().any(|o| used.contains(o)));
        removed += before - g.nodes.len();
        if g.nodes.len() == before {
            return removed;
        }
    }
}

/// A Split node as one Slice per used output (attribute form, resolved for
/// the inferred `shapes`), each with the Split's output name, so that
/// executors that run one output per step can run it.
pub fn split_as_slices(
    n: &crate::ir::Node,
    shapes: &shape::Shapes,
) -> Result<Vec<crate::ir::Node>> {
    let x = n.input(0).unwrap_or_default();
    let xs = &shapes
        .get(x)
        .ok_or_else(|| invalid(format!("{}: input {x} has no known shape", n.name)))?
        .shape;
    let (axis, sizes) = shape::split_sizes(n, shapes, xs)?;
    let mut start = 0i64;
    let mut out = Vec::new();
    for (k, (o, &len)) in n.outputs.iter().zip(&sizes).enumerate() {
        let end = start + len as i64;
        if !o.is_empty() {
            out.push(crate::ir::Node::new(
                format!("{}/part{k}", n.name),
                Op::Slice {
                    starts: Some(vec![start]),
                    ends: Some(vec![end]),
                    axes: Some(vec![axis as i64]),
                },
                &[x],
                &[o],
            ));
        }
        start = end;
    }
    Ok(out)
}
