//! Compilation of a graph, for concrete input shapes, into a flat list of
//! kernel steps over one activation arena.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use qint8_graph::shape::{self, ValueShape};
use qint8_graph::{DataType, Graph, Node, Op, Tensor};
use qint8_math::params::{ChannelParams, QuantDtype, QuantParams};

use crate::error::{Result, RuntimeError};
use crate::kernels::conv::Int8Source;
use crate::kernels::conv::{Conv2d, ConvGeom};
use crate::kernels::elementwise::{self as ew, BinOp, Broadcast, Unary};
use crate::kernels::gemm::{sgemm, Mat};
use crate::kernels::int8;
use crate::kernels::packed::{conv_source_available, gemm_packed, Epilogue, PackedA};
use crate::kernels::pool::{self, Pool2d};
use crate::kernels::Activation;

/// A place in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub offset: usize,
    pub len: usize,
}

/// Where a step reads an input from.
#[derive(Debug, Clone)]
pub(crate) enum Src {
    Slot(Slot),
    Const(Arc<Vec<f32>>),
    /// Graph input `i` (of `Plan::inputs`), read where the caller holds it.
    Input(usize),
}

/// A kernel with everything resolved for the plan's shapes.
#[derive(Debug, Clone)]
pub(crate) enum Kernel {
    /// A convolution; `true` when its last input is a fused residual.
    Conv(Box<Conv2d>, bool),
    /// `out[m, n] = a[m, k] * b + bias`, `b` given as (data, row stride, col stride).
    Gemm {
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        b: Arc<Vec<f32>>,
        b_rs: usize,
        b_cs: usize,
        /// Bias broadcast to `[m, n]` (already scaled by beta), if any.
        bias: Option<Arc<Vec<f32>>>,
        alpha: f32,
        /// A's columns are every `a_every`-th value of the input (1: all;
        /// more for an expanded map, see `expanded_gemm`).
        a_every: usize,
    },
    /// `Gemm` with `transB` weights on the packed kernel: `Y^T = W * X^T`
    /// into scratch, bias per output feature, then transposed into `Y`.
    GemmPacked {
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        w: PackedA,
        bias: Vec<f32>,
    },
    /// Batched matrix product of two runtime operands (or a constant B),
    /// batch dims already broadcast: `batch` products of `[m, k] x [k, n]`.
    MatMul {
        m: usize,
        n: usize,
        k: usize,
        a_batch: Vec<usize>,
        b_batch: Vec<usize>,
    },
    Binary(BinOp, Broadcast),
    Where(Broadcast),
    Expand(Broadcast),
    Unary(Unary),
    MaxPool(Pool2d),
    AvgPool(Pool2d),
    GlobalAvg {
        plane: usize,
    },
    Mean {
        n: usize,
        inner: usize,
    },
    Softmax {
        n: usize,
        inner: usize,
    },
    Transpose {
        shape: Vec<usize>,
        perm: Vec<usize>,
    },
    Concat {
        lens: Vec<usize>,
        outer: usize,
    },
    Gather {
        n: usize,
        inner: usize,
        idx: Vec<usize>,
    },
    Affine {
        a: Vec<f32>,
        b: Vec<f32>,
        inner: usize,
    },
    Slice {
        shape: Vec<usize>,
        axes: Vec<shape::SliceAxis>,
    },
    LayerNorm {
        scale: Vec<f32>,
        bias: Vec<f32>,
        eps: f32,
    },
    Pad {
        shape: Vec<usize>,
        spec: shape::PadSpec,
        mode: qint8_graph::PadMode,
    },
    ScatterNd {
        offsets: Vec<usize>,
        slice: usize,
    },
    Copy,
    Quantize {
        params: QuantParams,
        shape: Vec<usize>,
    },
    Dequantize {
        params: QuantParams,
        shape: Vec<usize>,
    },
    FakeQuant {
        params: QuantParams,
        shape: Vec<usize>,
    },
    /// Float to integer conversion (truncation toward zero, saturating).
    CastInt {
        lo: f32,
        hi: f32,
    },
}

/// One step: a kernel reading `ins` and writing `out`.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub node: String,
    pub op: &'static str,
    pub kernel: Kernel,
    pub ins: Vec<Src>,
    pub out: Slot,
    /// Values this step makes visible to observers: (name, shape). Aliases
    /// (Reshape, Flatten, ...) of the output are listed too.
    pub names: Vec<(String, Vec<usize>)>,
}

/// Where a graph output comes from.
#[derive(Debug, Clone)]
pub(crate) enum OutSrc {
    Slot(Slot),
    Const(Arc<Vec<f32>>),
}

/// Memory and size figures of a compiled plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanStats {
    /// Kernel steps executed per run.
    pub steps: usize,
    /// Bytes of the activation arena (all intermediate tensors, with reuse).
    pub arena_bytes: usize,
    /// Bytes of kernel scratch space (im2col buffers).
    pub scratch_bytes: usize,
    /// Sum of all intermediate tensor sizes without reuse, for comparison.
    pub unshared_bytes: usize,
    /// Bytes of constants held by the plan (packed weights, biases).
    pub constant_bytes: usize,
}

impl PlanStats {
    /// Peak activation memory: arena plus scratch.
    pub fn peak_activation_bytes(&self) -> usize {
        self.arena_bytes + self.scratch_bytes
    }
}

/// A graph compiled for one set of input shapes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) steps: Vec<Step>,
    pub(crate) inputs: Vec<(String, Slot, Vec<usize>)>,
    pub(crate) outputs: Vec<(String, OutSrc, Vec<usize>)>,
    pub(crate) arena_len: usize,
    pub(crate) scratch_len: usize,
    pub(crate) stats: PlanStats,
    /// Whether runs copy the graph inputs into the arena: a keep-all plan
    /// keeps them, and a graph output may be an input. Steps read them
    /// where the caller holds them either way.
    pub(crate) inputs_in_arena: bool,
    /// Where the values a finished run's arena holds lie, and their shapes
    /// (every value in a keep-all plan, the graph outputs otherwise).
    pub(crate) values: HashMap<String, (Slot, Vec<usize>)>,
}

impl Plan {
    /// Memory and size figures.
    pub fn stats(&self) -> PlanStats {
        self.stats
    }

    /// `(node name, operator)` of every step, in execution order (fused
    /// steps carry the first node's name).
    pub fn steps(&self) -> Vec<(&str, &'static str)> {
        self.steps.iter().map(|s| (s.node.as_str(), s.op)).collect()
    }
}

fn node_err(node: &Node, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Node {
        node: node.name.clone(),
        op: node.op.op_type().to_string(),
        detail: detail.into(),
    }
}

/// A value during compilation: constant, or produced into a buffer.
#[derive(Debug, Clone)]
enum Val {
    Const(Arc<Vec<f32>>),
    Buf(usize),
}

/// Arena allocation with first-fit reuse of freed ranges.
#[derive(Debug, Default)]
struct Arena {
    free: Vec<(usize, usize)>,
    end: usize,
}

impl Arena {
    fn alloc(&mut self, len: usize) -> usize {
        // Keep every tensor 64-byte aligned.
        let len = len.div_ceil(16) * 16;
        if let Some(i) = self.free.iter().position(|&(_, l)| l >= len) {
            let (off, l) = self.free[i];
            if l == len {
                self.free.remove(i);
            } else {
                self.free[i] = (off + len, l - len);
            }
            return off;
        }
        let off = self.end;
        self.end += len;
        off
    }

    fn release(&mut self, off: usize, len: usize) {
        let len = len.div_ceil(16) * 16;
        self.free.push((off, len));
        self.free.sort_unstable();
        // Merge neighbours.
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.free.len());
        for &(o, l) in &self.free {
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml == o => *ml += l,
                _ => merged.push((o, l)),
            }
        }
        // A free range at the very end shrinks the arena's high-water mark.
        self.free = merged;
    }
}

/// Options that change what a plan computes or exposes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CompileOptions {
    pub fuse: bool,
    pub threads: usize,
    /// Run convolutions between DequantizeLinear nodes on the integer kernel.
    pub integer: bool,
    /// Observers watch the run: keep every DequantizeLinear output (no
    /// integer convolution reads the float tensor before QuantizeLinear).
    pub observed: bool,
    /// Every value keeps its own part of the arena to the end of the run
    /// (no buffer reuse), so a finished run holds all of them.
    pub keep_all: bool,
    /// Kernels chosen for batches of many images
    /// ([`crate::SessionOptions::many_images`]).
    pub many_images: bool,
}

/// The Sigmoid and the Mul (node indices) that compute SiLU of `y`, when
/// nodes `a` and `b` are those two in either order: `Sigmoid(y)` and
/// `Mul(y, Sigmoid(y))` with its operands either way round.
fn silu_readers(g: &Graph, y: &str, a: usize, b: usize) -> Option<(usize, usize)> {
    let (s, m) = match g.nodes[a].op {
        Op::Sigmoid => (a, b),
        _ => (b, a),
    };
    let (sn, mn) = (&g.nodes[s], &g.nodes[m]);
    let sig = sn.outputs.first()?;
    let ok = matches!(sn.op, Op::Sigmoid)
        && sn.input(0) == Some(y)
        && matches!(mn.op, Op::Mul)
        && mn.inputs.len() == 2
        && ((mn.inputs[0] == y && mn.inputs[1] == *sig)
            || (mn.inputs[1] == y && mn.inputs[0] == *sig));
    ok.then_some((s, m))
}

/// Compiles `g` for the given input shapes; no fusion hides a value named
/// in `visible`.
pub(crate) fn compile(
    g: &Graph,
    input_shapes: &HashMap<String, Vec<usize>>,
    opts: CompileOptions,
    visible: &HashSet<String>,
) -> Result<Plan> {
    let shapes = shape::infer(g, input_shapes)?;
    let outputs: HashSet<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
    // Consumers per value, for fusion decisions and lifetimes.
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
            consumers.entry(inp.as_str()).or_default().push(i);
        }
    }
    // Fusion swallows a value only where its one reader is the next step
    // and nobody else (no graph output, no caller) needs to see it.
    let single_use = |v: &str| {
        consumers.get(v).map(Vec::len) == Some(1) && !outputs.contains(v) && !visible.contains(v)
    };
    let producers: HashMap<&str, &Node> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let integer = opts.integer && int8::available();

    let mut vals: HashMap<String, Val> = HashMap::new();
    // Buffers: id -> (len, last step index reading it).
    let mut bufs: Vec<(usize, usize)> = Vec::new();
    let mut buf_names: Vec<Vec<(String, Vec<usize>)>> = Vec::new();
    let mut pending: Vec<(Node, Kernel, Vec<Val>, usize)> = Vec::new();
    let mut inputs = Vec::new();

    for v in &g.inputs {
        let vs = &shapes[&v.name];
        let id = bufs.len();
        bufs.push((vs.shape.iter().product(), 0));
        buf_names.push(vec![(v.name.clone(), vs.shape.clone())]);
        vals.insert(v.name.clone(), Val::Buf(id));
        inputs.push((v.name.clone(), id, vs.shape.clone()));
    }

    let mut skip: HashSet<usize> = HashSet::new();
    // Outputs of fake-quant steps that an integer convolution read past
    // (it quantizes the value before them itself): steps nobody else reads
    // are dropped after the loop.
    let mut bypassed: HashSet<usize> = HashSet::new();
    let mut scratch_len = 0usize;
    let mut const_bytes = 0usize;
    // Splits run as one Slice step per output (steps have one output).
    let mut parts: HashMap<usize, Vec<Node>> = HashMap::new();
    for (idx, node) in g.nodes.iter().enumerate() {
        if matches!(node.op, Op::Split { .. }) {
            parts.insert(idx, qint8_graph::passes::split_as_slices(node, &shapes)?);
        }
    }
    let steps = g.nodes.iter().enumerate().flat_map(|(idx, node)| {
        let own = (!parts.contains_key(&idx)).then_some((idx, node));
        let split = parts.get(&idx).into_iter().flatten();
        own.into_iter().chain(split.map(move |n| (idx, n)))
    });
    for (idx, node) in steps {
        if skip.contains(&idx) {
            continue;
        }
        // Values inference already knows are constants.
        if node
            .outputs
            .iter()
            .all(|o| o.is_empty() || shapes.get(o).is_some_and(|s| s.value.is_some()))
        {
            for o in node.outputs.iter().filter(|o| !o.is_empty()) {
                let t = shapes[o]
                    .value
                    .as_ref()
                    .map(Tensor::to_f32_vec)
                    .unwrap_or_default();
                vals.insert(o.clone(), Val::Const(Arc::new(t)));
            }
            continue;
        }
        let out_name = node.outputs[0].clone();
        let out_shape = shapes
            .get(&out_name)
            .map(|s| s.shape.clone())
            .ok_or_else(|| node_err(node, "output shape unknown"))?;
        let ins: Vec<Val> = node
            .inputs
            .iter()
            .map(|i| {
                if i.is_empty() {
                    Ok(Val::Const(Arc::new(Vec::new())))
                } else {
                    vals.get(i)
                        .cloned()
                        .or_else(|| {
                            shapes
                                .get(i)
                                .and_then(|s| s.value.as_ref())
                                .or_else(|| g.initializers.get(i))
                                .map(|t| Val::Const(Arc::new(t.to_f32_vec())))
                        })
                        .ok_or_else(|| node_err(node, format!("input {i} is not available")))
                }
            })
            .collect::<Result<_>>()?;

        // Aliases: same data, new shape.
        if matches!(
            node.op,
            Op::Reshape { .. }
                | Op::Flatten { .. }
                | Op::Squeeze { .. }
                | Op::Unsqueeze { .. }
                | Op::Identity
                | Op::Dropout
        ) {
            match &ins[0] {
                Val::Buf(id) => {
                    buf_names[*id].push((out_name.clone(), out_shape.clone()));
                    vals.insert(out_name, Val::Buf(*id));
                }
                c @ Val::Const(_) => {
                    vals.insert(out_name, c.clone());
                }
            }
            continue;
        }

        let int8 = match integer {
            true => int8_source(g, &producers, node, &shapes, &vals)?,
            false => None,
        };
        // A Gemm on a flattened Expand of a 1x1 map runs in float on the
        // map, with its weights summed over the copies.
        let folded = expanded_gemm(node, &producers, &shapes, &vals, &ins, int8.is_some());
        let (node, mut ins, int8, every) = match &folded {
            Some((n, i, every)) => (n, i.clone(), None, *every),
            None => (node, ins, int8, 1),
        };
        let mut kernel = build_kernel(
            node,
            &shapes,
            &ins,
            &out_shape,
            int8,
            every,
            opts.many_images,
        )?;
        // An integer convolution quantizes its input itself: with fusion,
        // it reads the tensor before QuantizeLinear, and the fake-quant step
        // that fed only it goes away.
        // With other readers, the fake-quant step stays for them, unless
        // they read past it too (see `bypassed` below).
        if let (Kernel::Conv(c, _), Some(inp), Some(Val::Buf(id))) =
            (&kernel, node.input(0), ins.first())
        {
            let id = *id;
            if c.int8.is_some() && opts.fuse && !opts.observed {
                let fq = pending
                    .iter()
                    .rposition(|e| e.3 == id && matches!(e.1, Kernel::FakeQuant { .. }));
                if let Some(pos) = fq {
                    if single_use(inp) {
                        let (_, _, fq_ins, _) = pending.remove(pos);
                        ins[0] = fq_ins[0].clone();
                    } else if !opts.keep_all {
                        ins[0] = pending[pos].2[0].clone();
                        bypassed.insert(id);
                    }
                }
            }
        }
        let mut final_name = out_name.clone();
        let mut final_shape = out_shape.clone();
        // Conv + SiLU as exported (EfficientNet): Sigmoid(y) and
        // Mul(y, Sigmoid(y)) are the convolution output's only readers.
        // The epilogue computes the same values in registers, where the
        // two steps made two more passes over the tensor.
        if let (true, Kernel::Conv(c, _)) = (opts.fuse, &mut kernel) {
            let silu = consumers
                .get(out_name.as_str())
                .filter(|r| r.len() == 2 && c.act == Activation::None)
                .filter(|_| !outputs.contains(out_name.as_str()) && !visible.contains(&out_name))
                .and_then(|r| silu_readers(g, &out_name, r[0], r[1]))
                .filter(|&(s, _)| single_use(&g.nodes[s].outputs[0]));
            if let Some((s, m)) = silu {
                c.act = Activation::Silu;
                skip.insert(s);
                skip.insert(m);
                final_name = g.nodes[m].outputs[0].clone();
                final_shape = shapes
                    .get(&final_name)
                    .map(|v| v.shape.clone())
                    .ok_or_else(|| node_err(node, "SiLU output shape unknown"))?;
            }
        }
        // Fusions.
        if opts.fuse && single_use(&out_name) {
            let next = consumers[out_name.as_str()][0];
            let nn = &g.nodes[next];
            match (&mut kernel, &nn.op) {
                (Kernel::Conv(c, residual), Op::Add)
                    if c.act == Activation::None && !*residual && c.can_fuse_residual() =>
                {
                    // Conv + residual Add (+ Relu), as in every ResNet block.
                    let other = if nn.inputs[0] == out_name {
                        nn.input(1)
                    } else {
                        nn.input(0)
                    };
                    let fits = other.and_then(|o| shapes.get(o)).is_some_and(|v| {
                        v.shape == out_shape && v.dtype == qint8_graph::DataType::Float
                    });
                    if let (true, Some(v)) = (fits, other.and_then(|o| vals.get(o))) {
                        let mut v = v.clone();
                        // An integer convolution fake-quantizes a residual
                        // that comes out of a per-tensor fake-quant step
                        // itself, reading the value before it.
                        if let (Some(w), &Val::Buf(id), false) =
                            (c.int8.as_mut(), &v, opts.observed || opts.keep_all)
                        {
                            let fq = pending.iter().rev().find_map(|e| match &e.1 {
                                Kernel::FakeQuant { params, .. } if e.3 == id => {
                                    Some((params.clone(), e.2[0].clone()))
                                }
                                _ => None,
                            });
                            if let Some((params, before)) = fq {
                                if let (None, [p]) = (params.axis(), params.channels()) {
                                    *w = w.clone().with_residual_quant(int8::InputQuant {
                                        scale: p.scale,
                                        zero: p.zero_point,
                                        qmin: p.qmin,
                                        qmax: p.qmax,
                                    });
                                    v = before;
                                    bypassed.insert(id);
                                }
                            }
                        }
                        ins.push(v);
                        *residual = true;
                        skip.insert(next);
                        final_name = nn.outputs[0].clone();
                        if single_use(&final_name) {
                            let after = consumers[final_name.as_str()][0];
                            if matches!(g.nodes[after].op, Op::Relu) {
                                c.act = Activation::Relu;
                                skip.insert(after);
                                final_name = g.nodes[after].outputs[0].clone();
                            }
                        }
                    }
                }
                (Kernel::Conv(c, _), Op::Relu) if c.act == Activation::None => {
                    c.act = Activation::Relu;
                    skip.insert(next);
                    final_name = nn.outputs[0].clone();
                }
                (Kernel::Conv(c, _), Op::Clip { .. }) if c.act == Activation::None => {
                    if let Some((lo, hi)) = clip_bounds(nn, &shapes)? {
                        c.act = Activation::Clip(lo, hi);
                        skip.insert(next);
                        final_name = nn.outputs[0].clone();
                    }
                }
                (Kernel::Unary(Unary::Sigmoid), Op::Mul) => {
                    // Mul(x, Sigmoid(x)) in either order is SiLU.
                    let x = node.inputs[0].as_str();
                    let other = if nn.inputs[0] == out_name {
                        nn.inputs.get(1)
                    } else {
                        nn.inputs.first()
                    };
                    if other.map(String::as_str) == Some(x) {
                        kernel = Kernel::Unary(Unary::Silu);
                        skip.insert(next);
                        final_name = nn.outputs[0].clone();
                    }
                }
                (Kernel::Quantize { params, shape }, Op::DequantizeLinear { .. }) => {
                    if let Some(dq) = dq_params(nn, &shapes)? {
                        if dq == *params {
                            kernel = Kernel::FakeQuant {
                                params: params.clone(),
                                shape: shape.clone(),
                            };
                            skip.insert(next);
                            final_name = nn.outputs[0].clone();
                        }
                    }
                }
                _ => {}
            }
            final_shape = shapes[&final_name].shape.clone();
        }
        if let Kernel::Conv(c, _) = &kernel {
            scratch_len = scratch_len.max(c.scratch_len());
            const_bytes += 4 * (c.weight.len() + c.bias.len());
            const_bytes += c.int8.as_ref().map_or(0, |w| w.bytes());
        }
        if let Kernel::Gemm { b, bias, .. } = &kernel {
            const_bytes += 4 * (b.len() + bias.as_ref().map_or(0, |v| v.len()));
        }
        if let Kernel::GemmPacked { m, n, k, bias, .. } = &kernel {
            scratch_len = scratch_len.max(m * n);
            const_bytes += 4 * (n * k + bias.len());
        }

        // All inputs constant: evaluate now and keep the result.
        if ins.iter().all(|v| matches!(v, Val::Const(_))) {
            let srcs: Vec<&[f32]> = ins
                .iter()
                .map(|v| match v {
                    Val::Const(c) => c.as_slice(),
                    Val::Buf(_) => &[],
                })
                .collect();
            let mut out = vec![0.0; final_shape.iter().product()];
            let mut scratch = vec![0.0; scratch_len];
            run_kernel(&kernel, &srcs, &mut out, &mut scratch, opts.threads);
            vals.insert(final_name, Val::Const(Arc::new(out)));
            continue;
        }
        let id = bufs.len();
        bufs.push((final_shape.iter().product(), 0));
        buf_names.push(vec![(final_name.clone(), final_shape.clone())]);
        vals.insert(final_name, Val::Buf(id));
        pending.push((node.clone(), kernel, ins, id));
    }

    if !bypassed.is_empty() {
        let read: HashSet<usize> = pending
            .iter()
            .flat_map(|e| &e.2)
            .filter_map(|v| match v {
                Val::Buf(id) => Some(*id),
                Val::Const(_) => None,
            })
            .collect();
        pending.retain(|(_, kernel, _, id)| {
            let seen = buf_names[*id]
                .iter()
                .any(|(n, _)| outputs.contains(n.as_str()) || visible.contains(n));
            let dead = matches!(kernel, Kernel::FakeQuant { .. })
                && bypassed.contains(id)
                && !read.contains(id)
                && !seen;
            !dead
        });
    }
    // Lifetimes: the last step reading each buffer; graph outputs live to the end.
    let n_steps = pending.len();
    for (s, (_, _, ins, _)) in pending.iter().enumerate() {
        for v in ins {
            if let Val::Buf(id) = v {
                bufs[*id].1 = bufs[*id].1.max(s);
            }
        }
    }
    for o in &g.outputs {
        if let Some(Val::Buf(id)) = vals.get(&o.name) {
            bufs[*id].1 = n_steps;
        }
    }
    // Allocate: inputs first, then each step's output, freeing dead buffers after each step.
    let mut arena = Arena::default();
    let mut offsets: Vec<Option<usize>> = vec![None; bufs.len()];
    // Steps read the graph inputs where the caller holds them; the arena
    // holds a copy only for a keep-all plan or an input that is an output.
    let inputs_in_arena = opts.keep_all
        || g.outputs.iter().any(|o| {
            matches!(vals.get(&o.name), Some(Val::Buf(id)) if inputs.iter().any(|(_, i, _)| i == id))
        });
    if inputs_in_arena {
        for (_, id, _) in &inputs {
            offsets[*id] = Some(arena.alloc(bufs[*id].0));
        }
    }
    // Steps read graph inputs where the caller holds them (no copy into
    // the arena, unless an observer or a recording needs them there).
    let input_of: HashMap<usize, usize> = inputs
        .iter()
        .enumerate()
        .map(|(i, (_, id, _))| (*id, i))
        .collect();
    let mut steps = Vec::with_capacity(n_steps);
    let mut freed = vec![false; bufs.len()];
    for (s, (node, kernel, ins, out)) in pending.into_iter().enumerate() {
        let off = arena.alloc(bufs[out].0);
        offsets[out] = Some(off);
        let srcs = ins
            .iter()
            .map(|v| match v {
                Val::Const(c) => Ok(Src::Const(c.clone())),
                Val::Buf(id) if input_of.contains_key(id) => Ok(Src::Input(input_of[id])),
                Val::Buf(id) => offsets[*id]
                    .map(|offset| {
                        Src::Slot(Slot {
                            offset,
                            len: bufs[*id].0,
                        })
                    })
                    .ok_or_else(|| node_err(&node, "input buffer was never produced")),
            })
            .collect::<Result<Vec<_>>>()?;
        let op = match &kernel {
            Kernel::Conv(c, _) if c.int8.is_some() && matches!(node.op, Op::Gemm { .. }) => {
                "Gemm(int8)"
            }
            Kernel::Conv(c, _) if c.int8.as_ref().is_some_and(|w| w.is_depthwise()) => {
                "Conv(int8 depthwise)"
            }
            Kernel::Conv(c, _) if c.int8.is_some() => "Conv(int8)",
            Kernel::Conv(c, _) if c.group > 1 && c.group == c.cin => "Conv(depthwise)",
            Kernel::Conv(c, _) if c.kh * c.kw == 1 => "Conv(1x1)",
            Kernel::Unary(Unary::Silu) => "SiLU",
            Kernel::FakeQuant { .. } => "FakeQuant",
            _ => node.op.op_type(),
        };
        steps.push(Step {
            op,
            node: node.name.clone(),
            kernel,
            ins: srcs,
            out: Slot {
                offset: off,
                len: bufs[out].0,
            },
            names: std::mem::take(&mut buf_names[out]),
        });
        // Free buffers whose last reader is this step.
        for (id, &(len, last)) in bufs.iter().enumerate() {
            if last == s && last < n_steps && !freed[id] && !opts.keep_all {
                if let Some(o) = offsets[id] {
                    freed[id] = true;
                    arena.release(o, len);
                }
            }
        }
    }
    let outputs = g
        .outputs
        .iter()
        .map(|o| {
            let shape = shapes
                .get(&o.name)
                .map(|s| s.shape.clone())
                .unwrap_or_default();
            let src = match vals.get(&o.name) {
                Some(Val::Buf(id)) => offsets[*id]
                    .map(|offset| {
                        OutSrc::Slot(Slot {
                            offset,
                            len: bufs[*id].0,
                        })
                    })
                    .ok_or_else(|| {
                        RuntimeError::Graph(qint8_graph::GraphError::Invalid(format!(
                            "output {} never produced",
                            o.name
                        )))
                    })?,
                Some(Val::Const(c)) => OutSrc::Const(c.clone()),
                None => {
                    return Err(RuntimeError::Graph(qint8_graph::GraphError::Invalid(
                        format!("output {} is not computed", o.name),
                    )))
                }
            };
            Ok((o.name.clone(), src, shape))
        })
        .collect::<Result<Vec<_>>>()?;
    let inputs = inputs
        .into_iter()
        .map(|(name, id, shape)| {
            let offset = offsets[id].unwrap_or(0);
            (
                name,
                Slot {
                    offset,
                    len: bufs[id].0,
                },
                shape,
            )
        })
        .collect::<Vec<(String, Slot, Vec<usize>)>>();
    let unshared: usize = bufs.iter().map(|b| b.0).sum();
    let stats = PlanStats {
        steps: steps.len(),
        arena_bytes: arena.end * 4,
        scratch_bytes: scratch_len * 4,
        unshared_bytes: unshared * 4,
        constant_bytes: const_bytes,
    };
    // What a finished run's arena still holds: everything in a keep-all
    // plan, the graph outputs (alive to the end) in any other.
    let values = match opts.keep_all {
        true => inputs
            .iter()
            .map(|(n, slot, shape)| (n.clone(), (*slot, shape.clone())))
            .chain(steps.iter().flat_map(|st| {
                st.names
                    .iter()
                    .map(|(n, shape)| (n.clone(), (st.out, shape.clone())))
            }))
            .collect(),
        false => outputs
            .iter()
            .filter_map(|(n, src, shape)| match src {
                OutSrc::Slot(slot) => Some((n.clone(), (*slot, shape.clone()))),
                OutSrc::Const(_) => None,
            })
            .collect(),
    };
    Ok(Plan {
        steps,
        inputs,
        outputs,
        values,
        inputs_in_arena,
        arena_len: arena.end,
        scratch_len,
        stats,
    })
}

/// For a Gemm (A not transposed, B a constant) whose A is `Flatten(axis
/// 1)` of an `Expand` that copies a `[n, c, 1, ...]` map `h` times: the
/// same Gemm on `c` columns instead of `c * h`, with B summed over the
/// copies, as a node reading the map (for its shapes), its inputs, and
/// which of A's values the product reads. VGG's classifier at inputs of
/// 32x32 reads 49 copies of each of 64 channels this way, a seventh of the
/// network's multiply-adds. Float graphs read the map itself (every value);
/// with `integer`, where A is that Flatten through per-tensor
/// QuantizeLinear and DequantizeLinear, the product reads every `h`-th
/// value of the fake-quantized copies (the same values, quantized
/// alike) and runs in float on the dequantized weights instead of on int8
/// ones. The same function up to float rounding.
fn expanded_gemm(
    node: &Node,
    producers: &HashMap<&str, &Node>,
    shapes: &HashMap<String, ValueShape>,
    vals: &HashMap<String, Val>,
    ins: &[Val],
    integer: bool,
) -> Option<(Node, Vec<Val>, usize)> {
    let Op::Gemm {
        trans_a: false,
        trans_b,
        ..
    } = node.op
    else {
        return None;
    };
    let mut a = producers.get(node.input(0)?)?;
    if integer {
        // DequantizeLinear(QuantizeLinear(Flatten)), one scale for all.
        let scalar = |n: &Node| {
            n.input(1)
                .and_then(|sc| shapes.get(sc))
                .is_some_and(|v| v.shape.iter().product::<usize>() == 1)
        };
        let q = producers.get(a.input(0)?)?;
        let qdq = matches!(a.op, Op::DequantizeLinear { .. })
            && matches!(q.op, Op::QuantizeLinear { .. });
        if !qdq || !scalar(a) || !scalar(q) {
            return None;
        }
        a = producers.get(q.input(0)?)?;
    }
    let (flatten, expand) = (a, producers.get(a.input(0)?)?);
    if !matches!(flatten.op, Op::Flatten { axis: 1 }) || !matches!(expand.op, Op::Expand) {
        return None;
    }
    let x = expand.input(0)?;
    let (xs, ys) = (
        &shapes.get(x)?.shape,
        &shapes.get(&expand.outputs[0])?.shape,
    );
    let bs = &shapes.get(node.input(1)?)?.shape;
    if xs.len() < 2 || xs.len() != ys.len() || xs[..2] != ys[..2] || bs.len() != 2 {
        return None;
    }
    if xs[2..].iter().any(|&d| d != 1) {
        return None;
    }
    let (c, copies): (usize, usize) = (xs[1], ys[2..].iter().product());
    let (n, k) = match trans_b {
        true => (bs[0], bs[1]),
        false => (bs[1], bs[0]),
    };
    let Some(Val::Const(b)) = ins.get(1) else {
        return None;
    };
    if copies < 2 || k != c * copies || b.len() != n * k {
        return None;
    }
    let summed = summed_over_copies(b, trans_b, n, c, copies);
    let mut reads = node.clone();
    reads.inputs[0] = x.to_string();
    let mut ins = ins.to_vec();
    ins[1] = Val::Const(Arc::new(summed));
    let every = match integer {
        true => copies,
        false => {
            ins[0] = vals.get(x)?.clone();
            1
        }
    };
    Some((reads, ins, every))
}

/// A Gemm's B (`[n, c * copies]` with `trans_b`, else `[c * copies, n]`,
/// each input channel's copies adjacent) summed over the copies, in the
/// same layout: `[n, c]` or `[c, n]`.
pub(crate) fn summed_over_copies(
    b: &[f32],
    trans_b: bool,
    n: usize,
    c: usize,
    copies: usize,
) -> Vec<f32> {
    let k = c * copies;
    let mut summed = vec![0.0f32; n * c];
    for o in 0..n {
        for ch in 0..c {
            let sum = (ch * copies..(ch + 1) * copies)
                .map(|r| match trans_b {
                    true => b[o * k + r],
                    false => b[r * n + o],
                })
                .sum();
            match trans_b {
                true => summed[o * c + ch] = sum,
                false => summed[ch * n + o] = sum,
            }
        }
    }
    summed
}

fn const_of<'a>(node: &Node, ins: &'a [Val], i: usize, what: &str) -> Result<&'a Arc<Vec<f32>>> {
    match ins.get(i) {
        Some(Val::Const(c)) if !c.is_empty() || i == 0 => Ok(c),
        _ => Err(node_err(
            node,
            format!("{what} (input {i}) must be a constant"),
        )),
    }
}

fn in_shape<'a>(
    node: &Node,
    shapes: &'a HashMap<String, ValueShape>,
    i: usize,
) -> Result<&'a [usize]> {
    node.input(i)
        .and_then(|n| shapes.get(n))
        .map(|s| s.shape.as_slice())
        .ok_or_else(|| node_err(node, format!("shape of input {i} unknown")))
}

fn clip_bounds(node: &Node, shapes: &HashMap<String, ValueShape>) -> Result<Option<(f32, f32)>> {
    let Op::Clip { min, max } = &node.op else {
        return Ok(None);
    };
    let read = |i: usize| -> Result<Option<f32>> {
        match node.input(i) {
            None => Ok(None),
            Some(n) => match shapes.get(n).and_then(|s| s.value.as_ref()) {
                Some(t) => Ok(t.to_f32_vec().first().copied()),
                None => Err(node_err(node, format!("Clip bound {n} must be a constant"))),
            },
        }
    };
    let lo = read(1)?.or(*min).unwrap_or(f32::NEG_INFINITY);
    let hi = read(2)?.or(*max).unwrap_or(f32::INFINITY);
    Ok(Some((lo, hi)))
}

/// Quantization parameters of a QuantizeLinear/DequantizeLinear node.
pub(crate) fn qdq_params(
    node: &Node,
    shapes: &HashMap<String, ValueShape>,
    axis: i64,
    data_rank: usize,
) -> Result<Option<QuantParams>> {
    let tensor = |i: usize| {
        node.input(i)
            .and_then(|n| shapes.get(n))
            .and_then(|s| s.value.as_ref())
    };
    let Some(scale) = tensor(1) else {
        return Ok(None);
    };
    let scales = scale.to_f32_vec();
    let zp = tensor(2);
    let input_type = node.input(0).and_then(|n| shapes.get(n)).map(|s| s.dtype);
    // int32 only as DequantizeLinear input: the int32 biases onnxruntime's
    // QDQ quantizer writes (scale = input scale * weight scale).
    let int32 = matches!(node.op, Op::DequantizeLinear { .. })
        && (zp.map(Tensor::dtype) == Some(DataType::Int32)
            || (zp.is_none() && input_type == Some(DataType::Int32)));
    let dtype = match zp.map(Tensor::dtype) {
        _ if int32 => QuantDtype::Int8,
        None | Some(DataType::Uint8) => QuantDtype::Uint8,
        Some(DataType::Int8) => QuantDtype::Int8,
        Some(other) => {
            return Err(node_err(
                node,
                format!(
                    "zero point type {other:?} is not supported (int8/uint8, int32 for DequantizeLinear)"
                ),
            ))
        }
    };
    let zps: Vec<i32> = match zp {
        Some(t) => t.to_f32_vec().iter().map(|&v| v as i32).collect(),
        None => vec![0; scales.len()],
    };
    if zps.len() != scales.len() {
        return Err(node_err(
            node,
            format!("{} scales but {} zero points", scales.len(), zps.len()),
        ));
    }
    let channels = scales
        .iter()
        .zip(&zps)
        .map(|(&s, &z)| {
            if int32 {
                // Only scale and zero point matter to DequantizeLinear;
                // the range is int32's.
                ChannelParams::new(s, 0, dtype, false).map(|c| ChannelParams {
                    zero_point: z,
                    qmin: i32::MIN,
                    qmax: i32::MAX,
                    ..c
                })
            } else {
                ChannelParams::new(s, z, dtype, false)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A scalar or one-element scale is per-tensor (same result as per-axis
    // over a dimension of size 1).
    if scales.len() == 1 && scale.shape().len() <= 1 {
        return Ok(Some(QuantParams::per_tensor(channels[0])));
    }
    let r = data_rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(node_err(
            node,
            format!("axis {axis} out of range for rank {data_rank}"),
        ));
    }
    Ok(Some(QuantParams::per_channel(channels, a as usize)?))
}

fn dq_params(node: &Node, shapes: &HashMap<String, ValueShape>) -> Result<Option<QuantParams>> {
    let Op::DequantizeLinear { axis } = node.op else {
        return Ok(None);
    };
    let rank = in_shape(node, shapes, 0)?.len();
    qdq_params(node, shapes, axis, rank)
}

/// Integer weights (as f32) of a Conv (or classifier Gemm) whose weight is
/// DequantizeLinear of int8 constants (zero points 0, per output channel
/// or per tensor) and whose input is DequantizeLinear output quantized per
/// tensor: what the integer kernel needs, or `None` when the node does not
/// qualify.
fn int8_source(
    g: &Graph,
    producers: &HashMap<&str, &Node>,
    node: &Node,
    shapes: &HashMap<String, ValueShape>,
    vals: &HashMap<String, Val>,
) -> Result<Option<Int8Source>> {
    // A Gemm with [n, k] weights is a 1x1 convolution of [m, k, 1, 1].
    let group = match &node.op {
        Op::Conv(attrs) => attrs.group,
        Op::Gemm {
            alpha,
            trans_a: false,
            trans_b: true,
            ..
        } if *alpha == 1.0 => 1,
        _ => return Ok(None),
    };
    let dq = |i: usize| {
        node.input(i)
            .and_then(|n| producers.get(n))
            .filter(|p| matches!(p.op, Op::DequantizeLinear { .. }))
    };
    let (Some(xdq), Some(wdq)) = (dq(0), dq(1)) else {
        return Ok(None);
    };
    // The integers: an int8 initializer, or (float weights + Q + DQ, as
    // some tools write them) recovered from the dequantized constant.
    let Some(wname) = wdq.input(0) else {
        return Ok(None);
    };
    let Some(ws) = shapes.get(wname).filter(|v| v.dtype == DataType::Int8) else {
        return Ok(None);
    };
    let (cout, cin) = match ws.shape[..] {
        [cout, cin, ..] => (cout, cin),
        _ => return Ok(None),
    };
    // A Gemm's C must be one value per output (a bias), as in classifiers.
    let per_output_c = match (&node.op, node.input(2)) {
        (Op::Gemm { .. }, Some(c)) => shapes
            .get(c)
            .is_some_and(|v| v.shape.iter().product::<usize>() == cout),
        _ => true,
    };
    let taps: usize = ws.shape[2..].iter().product();
    // Depthwise: one input channel per output channel, on its own kernel
    // where the CPU has one (else the float one is faster).
    let depthwise = group > 1 && group == cout && cin == 1;
    if depthwise {
        if !int8::depthwise_available() {
            return Ok(None);
        }
    } else if group > 1 || cin < 3 || cin * taps > int8::MAX_REDUCTION || !per_output_c {
        // One or two input channels would fill most of each 4-byte group
        // with padding: such a stem runs in float.
        return Ok(None);
    }
    let (Some(xp), Some(wp)) = (dq_params(xdq, shapes)?, dq_params(wdq, shapes)?) else {
        return Ok(None);
    };
    let xc = xp.channels()[0];
    // Any 8-bit integer range (int32 is DequantizeLinear of biases only).
    let x_ok = xp.axis().is_none() && xc.qmin >= -128 && xc.qmax <= 255 && xc.qmax - xc.qmin <= 255;
    let w_ok = wp.zero_points().iter().all(|&z| z == 0)
        && (wp.axis().is_none() || (wp.axis() == Some(0) && wp.channels().len() == cout));
    if !x_ok || !w_ok {
        return Ok(None);
    }
    let q = match (
        g.initializers.get(wname),
        node.input(1).and_then(|n| vals.get(n)),
    ) {
        (Some(t), _) => t.to_f32_vec(),
        // The dequantized weights, each `q * scale` rounded to f32: dividing
        // by the scale and rounding gives `q` back exactly (|q| <= 128).
        (None, Some(Val::Const(w))) => {
            let scales = wp.scales();
            let per = w.len() / cout.max(1);
            w.iter()
                .enumerate()
                .map(|(i, &v)| (v / scales[if scales.len() == 1 { 0 } else { i / per }]).round())
                .collect()
        }
        _ => return Ok(None),
    };
    if q.len() != cout * cin * taps {
        return Ok(None);
    }
    let x = xp.channels()[0];
    Ok(Some(Int8Source {
        q,
        w_scale: wp.scales(),
        input: int8::InputQuant {
            scale: x.scale,
            zero: x.zero_point,
            qmin: x.qmin,
            qmax: x.qmax,
        },
    }))
}

/// A Gemm `[m, k] x [n, k]^T + C` on the integer kernel, as a 1x1
/// convolution of `[m, k, 1, 1]` (whose input and output layouts are the
/// Gemm's); [`int8_source`] checked that `C` has one value per output.
fn int8_gemm(
    node: &Node,
    shapes: &HashMap<String, ValueShape>,
    ins: &[Val],
    beta: f32,
    src: Int8Source,
) -> Result<Kernel> {
    let (a, w) = (in_shape(node, shapes, 0)?, in_shape(node, shapes, 1)?);
    let (m, k, n) = (a[0], a[1], w[0]);
    let bias = match node.input(2) {
        None => vec![0.0; n],
        Some(_) => const_of(node, ins, 2, "C")?
            .iter()
            .map(|v| v * beta)
            .collect(),
    };
    if bias.len() != n {
        return Err(node_err(
            node,
            format!("C has {} values for {n} outputs", bias.len()),
        ));
    }
    let geom = ConvGeom {
        n: m,
        cin: k,
        ih: 1,
        iw: 1,
        cout: n,
        group: 1,
        kh: 1,
        kw: 1,
        stride: (1, 1),
        dilation: (1, 1),
        pad: (0, 0),
        oh: 1,
        ow: 1,
    };
    let conv = Conv2d {
        geom,
        weight: Arc::new(Vec::new()),
        bias,
        act: Activation::None,
        packed: Vec::new(),
        int8: None,
        winograd: None,
    };
    Ok(Kernel::Conv(Box::new(conv.with_int8(src)), false))
}

/// `every`: a Gemm's A columns are every `every`-th value of its input
/// (see `expanded_gemm`; 1 otherwise). `many_images`: float convolutions'
/// kernels are chosen for batches of many images.
fn build_kernel(
    node: &Node,
    shapes: &HashMap<String, ValueShape>,
    ins: &[Val],
    out_shape: &[usize],
    int8: Option<Int8Source>,
    every: usize,
    many_images: bool,
) -> Result<Kernel> {
    let x_shape = || in_shape(node, shapes, 0);
    let int8 = match (&node.op, int8) {
        (Op::Gemm { beta, .. }, Some(src)) => return int8_gemm(node, shapes, ins, *beta, src),
        (_, int8) => int8,
    };
    Ok(match &node.op {
        Op::Conv(attrs) => {
            let xs = x_shape()?;
            let ws = in_shape(node, shapes, 1)?;
            let geom = ConvGeom::resolve(node, attrs, xs, ws)?;
            let w = const_of(node, ins, 1, "weight")?;
            let bias = match node.input(2) {
                Some(_) => const_of(node, ins, 2, "bias")?.as_ref().clone(),
                None => vec![0.0; geom.cout],
            };
            let conv = Conv2d {
                geom,
                weight: w.clone(),
                bias,
                act: Activation::None,
                packed: Vec::new(),
                int8: None,
                winograd: None,
            };
            let conv = match int8 {
                Some(src) => conv.with_int8(src),
                None => conv.without_dead_taps().pack_for(many_images),
            };
            Kernel::Conv(Box::new(conv), false)
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let a = x_shape()?;
            let bs = in_shape(node, shapes, 1)?;
            let (m, k) = if *trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
            let n = if *trans_b { bs[0] } else { bs[1] };
            let b = const_of(node, ins, 1, "B")?.clone();
            let (b_rs, b_cs) = if *trans_b { (1, k) } else { (n, 1) };
            let bias = match node.input(2) {
                None => None,
                Some(_) => {
                    let c = const_of(node, ins, 2, "C")?;
                    let cs = in_shape(node, shapes, 2)?;
                    let plan = Broadcast::new(&[cs, &[1]], &[m, n]);
                    let mut full = vec![0.0; m * n];
                    ew::binary(BinOp::Mul, &plan, c, &[*beta], &mut full);
                    Some(Arc::new(full))
                }
            };
            // The packed kernel takes weights stored [n, k] and a bias that
            // is the same for every row.
            let row_bias = match &bias {
                None => Some(vec![0.0; n]),
                Some(full) if m > 0 && full.chunks(n).all(|r| r == &full[..n]) => {
                    Some(full[..n].to_vec())
                }
                Some(_) => None,
            };
            match row_bias {
                Some(bias)
                    if *trans_b && *alpha == 1.0 && every == 1 && conv_source_available() =>
                {
                    Kernel::GemmPacked {
                        m,
                        n,
                        k,
                        trans_a: *trans_a,
                        w: PackedA::new(b, n, k),
                        bias,
                    }
                }
                _ => Kernel::Gemm {
                    m,
                    n,
                    k,
                    trans_a: *trans_a,
                    b,
                    b_rs,
                    b_cs,
                    bias,
                    alpha: *alpha,
                    a_every: every,
                },
            }
        }
        Op::MatMul => {
            let (a2, b2) = shape::matmul_operands(x_shape()?, in_shape(node, shapes, 1)?);
            let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
            let n = b2[b2.len() - 1];
            let batch = shape::broadcast(node, &a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
            Kernel::MatMul {
                m,
                n,
                k,
                a_batch: matmul_batch_offsets(&batch, &a2[..a2.len() - 2]),
                b_batch: matmul_batch_offsets(&batch, &b2[..b2.len() - 2]),
            }
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Equal => {
            let op = match node.op {
                Op::Add => BinOp::Add,
                Op::Sub => BinOp::Sub,
                Op::Mul => BinOp::Mul,
                Op::Div => BinOp::Div,
                _ => BinOp::Equal,
            };
            let (a, b) = (x_shape()?, in_shape(node, shapes, 1)?);
            Kernel::Binary(op, Broadcast::new(&[a, b], out_shape))
        }
        Op::Where => {
            let (c, a, b) = (
                x_shape()?,
                in_shape(node, shapes, 1)?,
                in_shape(node, shapes, 2)?,
            );
            Kernel::Where(Broadcast::new(&[c, a, b], out_shape))
        }
        Op::Expand => Kernel::Expand(Broadcast::new(&[x_shape()?], out_shape)),
        Op::Relu => Kernel::Unary(Unary::Act(Activation::Relu)),
        Op::Clip { .. } => {
            let (lo, hi) = clip_bounds(node, shapes)?.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
            Kernel::Unary(Unary::Act(Activation::Clip(lo, hi)))
        }
        Op::Sigmoid => Kernel::Unary(Unary::Sigmoid),
        Op::Erf => Kernel::Unary(Unary::Erf),
        Op::Gelu { tanh } => Kernel::Unary(Unary::Gelu(*tanh)),
        Op::Sqrt => Kernel::Unary(Unary::Sqrt),
        Op::Not => Kernel::Unary(Unary::Not),
        Op::Pow | Op::Mod { .. } => {
            let op = match node.op {
                Op::Mod { fmod } => BinOp::Mod(fmod),
                _ => BinOp::Pow,
            };
            let (a, b) = (x_shape()?, in_shape(node, shapes, 1)?);
            Kernel::Binary(op, Broadcast::new(&[a, b], out_shape))
        }
        Op::Slice { .. } => {
            let xs = x_shape()?;
            Kernel::Slice {
                shape: xs.to_vec(),
                axes: shape::slice_axes(node, shapes, xs)?,
            }
        }
        Op::LayerNormalization { axis, epsilon } => {
            if node.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                return Err(node_err(
                    node,
                    "the Mean and InvStdDev outputs are not supported",
                ));
            }
            let xs = x_shape()?;
            let a = shape::norm_axis(node, *axis, xs.len())?;
            let norm = &xs[a..];
            let n: usize = norm.iter().product();
            // Scale and bias broadcast to the normalized shape once, here.
            let full = |i: usize, what: &str| -> Result<Vec<f32>> {
                let v = const_of(node, ins, i, what)?;
                let mut o = vec![0.0; n];
                ew::expand(
                    &Broadcast::new(&[in_shape(node, shapes, i)?], norm),
                    v,
                    &mut o,
                );
                Ok(o)
            };
            Kernel::LayerNorm {
                scale: full(1, "Scale")?,
                bias: match node.input(2) {
                    Some(_) => full(2, "B")?,
                    None => vec![0.0; n],
                },
                eps: *epsilon,
            }
        }
        Op::Pad { mode, .. } => {
            let xs = x_shape()?;
            Kernel::Pad {
                shape: xs.to_vec(),
                spec: shape::pad_spec(node, shapes, xs)?,
                mode: *mode,
            }
        }
        Op::ScatterND => {
            let idx_vals = const_of(node, ins, 1, "indices")?;
            let idx: Vec<i64> = idx_vals.iter().map(|&v| v as i64).collect();
            let (offsets, slice) = shape::scatter_offsets(
                node,
                x_shape()?,
                &idx,
                in_shape(node, shapes, 1)?,
                in_shape(node, shapes, 2)?.iter().product(),
            )?;
            Kernel::ScatterNd { offsets, slice }
        }
        Op::HardSigmoid { alpha, beta } => Kernel::Unary(Unary::HardSigmoid(*alpha, *beta)),
        Op::HardSwish => Kernel::Unary(Unary::HardSwish),
        Op::MaxPool(p) | Op::AveragePool(p) => {
            let pool = Pool2d::resolve(node, p, x_shape()?)?;
            if matches!(node.op, Op::MaxPool(_)) {
                if node.outputs.get(1).is_some_and(|o| !o.is_empty()) {
                    return Err(node_err(node, "MaxPool's Indices output is not supported"));
                }
                Kernel::MaxPool(pool)
            } else {
                Kernel::AvgPool(pool)
            }
        }
        Op::GlobalAveragePool => {
            let xs = x_shape()?;
            Kernel::GlobalAvg {
                plane: xs[2..].iter().product(),
            }
        }
        Op::ReduceMean { .. } => {
            let xs = x_shape()?;
            let axes = shape::reduce_axes(node, shapes, xs.len())?;
            if axes.is_empty() {
                Kernel::Copy
            } else if axes.windows(2).all(|w| w[1] == w[0] + 1) {
                let (a0, a1) = (axes[0], axes[axes.len() - 1]);
                Kernel::Mean {
                    n: xs[a0..=a1].iter().product(),
                    inner: xs[a1 + 1..].iter().product(),
                }
            } else {
                return Err(node_err(
                    node,
                    format!("ReduceMean over non-adjacent axes {axes:?} is not supported"),
                ));
            }
        }
        Op::Softmax { axis } => {
            let xs = x_shape()?;
            let a = shape::norm_axis(node, *axis, xs.len())?;
            Kernel::Softmax {
                n: xs[a],
                inner: xs[a + 1..].iter().product(),
            }
        }
        Op::Transpose { perm } => {
            let xs = x_shape()?;
            Kernel::Transpose {
                shape: xs.to_vec(),
                perm: shape::transpose_perm(node, perm.as_deref(), xs.len())?,
            }
        }
        Op::Concat { axis } => {
            let xs = x_shape()?;
            let a = shape::norm_axis(node, *axis, xs.len())?;
            let lens = (0..node.inputs.len())
                .map(|i| in_shape(node, shapes, i).map(|s| s[a..].iter().product()))
                .collect::<Result<Vec<usize>>>()?;
            Kernel::Concat {
                lens,
                outer: xs[..a].iter().product(),
            }
        }
        Op::Gather { axis } => {
            let xs = x_shape()?;
            let a = shape::norm_axis(node, *axis, xs.len())?;
            let raw: Vec<i64> = const_of(node, ins, 1, "indices")?
                .iter()
                .map(|&v| v as i64)
                .collect();
            let idx = shape::gather_indices(node, &raw, xs[a])?;
            Kernel::Gather {
                n: xs[a],
                inner: xs[a + 1..].iter().product(),
                idx,
            }
        }
        Op::BatchNormalization { epsilon } => {
            let xs = x_shape()?;
            let p: Vec<&Arc<Vec<f32>>> = (1..5)
                .map(|i| const_of(node, ins, i, "BatchNormalization parameter"))
                .collect::<Result<_>>()?;
            let c = xs.get(1).copied().unwrap_or(1);
            if p.iter().any(|v| v.len() != c) {
                return Err(node_err(node, format!("parameters must have {c} entries")));
            }
            let a: Vec<f32> = (0..c)
                .map(|i| p[0][i] / (p[3][i] + epsilon).sqrt())
                .collect();
            let b: Vec<f32> = (0..c).map(|i| p[1][i] - p[2][i] * a[i]).collect();
            Kernel::Affine {
                a,
                b,
                inner: xs.get(2..).map(|s| s.iter().product()).unwrap_or(1),
            }
        }
        Op::QuantizeLinear { axis } => {
            let xs = x_shape()?;
            let params = qdq_params(node, shapes, *axis, xs.len())?
                .ok_or_else(|| node_err(node, "scale must be a constant"))?;
            Kernel::Quantize {
                params,
                shape: xs.to_vec(),
            }
        }
        Op::DequantizeLinear { axis } => {
            let xs = x_shape()?;
            let params = qdq_params(node, shapes, *axis, xs.len())?
                .ok_or_else(|| node_err(node, "scale must be a constant"))?;
            Kernel::Dequantize {
                params,
                shape: xs.to_vec(),
            }
        }
        Op::Cast { to } => match DataType::from_onnx(*to) {
            Some(DataType::Float) => Kernel::Copy,
            Some(DataType::Int64) | Some(DataType::Int32) => Kernel::CastInt {
                lo: i32::MIN as f32,
                hi: i32::MAX as f32,
            },
            Some(DataType::Int8) => Kernel::CastInt {
                lo: -128.0,
                hi: 127.0,
            },
            Some(DataType::Uint8) => Kernel::CastInt { lo: 0.0, hi: 255.0 },
            Some(DataType::Bool) => {
                Kernel::Binary(BinOp::Equal, Broadcast::new(&[x_shape()?, &[1]], out_shape))
            }
            None => {
                return Err(node_err(
                    node,
                    format!("Cast to {} is not supported", DataType::onnx_name(*to)),
                ))
            }
        },
        Op::Identity
        | Op::Dropout
        | Op::Reshape { .. }
        | Op::Flatten { .. }
        | Op::Squeeze { .. }
        | Op::Unsqueeze { .. } => Kernel::Copy,
        Op::Shape { .. } | Op::Constant(_) | Op::ConstantOfShape { .. } => {
            return Err(node_err(node, "should have been folded to a constant"));
        }
        other => {
            return Err(node_err(
                node,
                format!("{} has no CPU kernel", other.op_type()),
            ))
        }
    })
}

/// Offsets (in matrices) into an operand with batch dimensions `dims` of
/// every entry of the broadcast `batch` (numpy's matmul broadcasting:
/// `dims` right-aligned, size-1 dimensions repeated).
pub(crate) fn matmul_batch_offsets(batch: &[usize], dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![0usize; batch.len()];
    let mut acc = 1;
    for i in (0..dims.len()).rev() {
        let o = batch.len() - dims.len() + i;
        strides[o] = if dims[i] == 1 { 0 } else { acc };
        acc *= dims[i];
    }
    let nb: usize = batch.iter().product();
    (0..nb)
        .map(|mut r| {
            let mut off = 0;
            for d in (0..batch.len()).rev() {
                off += (r % batch[d]) * strides[d];
                r /= batch[d];
            }
            off
        })
        .collect()
}

/// Runs one kernel. `ins` are the step's inputs in node order.
pub(crate) fn run_kernel(
    k: &Kernel,
    ins: &[&[f32]],
    out: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
) {
    match k {
        Kernel::Conv(c, residual) => {
            let res = if *residual { ins.last().copied() } else { None };
            c.run_with_residual(ins[0], res, out, scratch, threads)
        }
        Kernel::Gemm {
            m,
            n,
            k,
            trans_a,
            b,
            b_rs,
            b_cs,
            bias,
            alpha,
            a_every,
        } => {
            let a = match trans_a {
                true => Mat::transposed(ins[0], *m),
                false => Mat {
                    data: ins[0],
                    rs: *k * *a_every,
                    cs: *a_every,
                },
            };
            let bm = Mat {
                data: b,
                rs: *b_rs,
                cs: *b_cs,
            };
            match bias {
                Some(c) if *alpha == 1.0 => {
                    out.copy_from_slice(c);
                    sgemm(*m, *n, *k, a, bm, out, *n, true, threads);
                }
                _ => {
                    sgemm(*m, *n, *k, a, bm, out, *n, false, threads);
                    if *alpha != 1.0 {
                        out.iter_mut().for_each(|v| *v *= alpha);
                    }
                    if let Some(c) = bias {
                        out.iter_mut().zip(c.iter()).for_each(|(v, b)| *v += b);
                    }
                }
            }
        }
        Kernel::GemmPacked {
            m,
            n,
            k,
            trans_a,
            w,
            bias,
        } => {
            // B = X^T: X is [m, k] (or stored [k, m] when transposed).
            let b = if *trans_a {
                Mat::row_major(ins[0], *m)
            } else {
                Mat {
                    data: ins[0],
                    rs: 1,
                    cs: *k,
                }
            };
            let yt = &mut scratch[..m * n];
            let epi = Epilogue {
                bias,
                res: None,
                act: Activation::None,
            };
            gemm_packed(w, b, *m, yt, *m, epi, threads);
            for (i, row) in out.chunks_exact_mut(*n).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = yt[j * m + i];
                }
            }
        }
        Kernel::MatMul {
            m,
            n,
            k,
            a_batch,
            b_batch,
        } => {
            for (i, (&oa, &ob)) in a_batch.iter().zip(b_batch).enumerate() {
                let a = &ins[0][oa * m * k..(oa + 1) * m * k];
                let b = &ins[1][ob * k * n..(ob + 1) * k * n];
                sgemm(
                    *m,
                    *n,
                    *k,
                    Mat::row_major(a, *k),
                    Mat::row_major(b, *n),
                    &mut out[i * m * n..(i + 1) * m * n],
                    *n,
                    false,
                    threads,
                );
            }
        }
        Kernel::Binary(op, plan) => ew::binary(*op, plan, ins[0], ins[1], out),
        Kernel::Where(plan) => ew::where_(plan, ins[0], ins[1], ins[2], out),
        Kernel::Expand(plan) => ew::expand(plan, ins[0], out),
        Kernel::Unary(f) => ew::unary(*f, ins[0], out),
        Kernel::MaxPool(p) => p.max(ins[0], out),
        Kernel::AvgPool(p) => p.average(ins[0], out),
        Kernel::GlobalAvg { plane } => pool::global_average(ins[0], out, *plane),
        Kernel::Mean { n, inner } => ew::mean_axis(ins[0], out, *n, *inner),
        Kernel::Softmax { n, inner } => ew::softmax(ins[0], out, *n, *inner),
        Kernel::Transpose { shape, perm } => ew::transpose(ins[0], shape, perm, out),
        Kernel::Concat { lens, outer } => {
            let parts: Vec<(&[f32], usize)> = ins.iter().zip(lens).map(|(x, &l)| (*x, l)).collect();
            ew::concat(&parts, out, *outer);
        }
        Kernel::Gather { n, inner, idx } => ew::gather(ins[0], out, *n, *inner, idx),
        Kernel::Affine { a, b, inner } => ew::channel_affine(ins[0], out, a, b, *inner),
        Kernel::Slice { shape, axes } => ew::slice(ins[0], shape, axes, out),
        Kernel::LayerNorm { scale, bias, eps } => ew::layer_norm(ins[0], out, scale, bias, *eps),
        Kernel::Pad { shape, spec, mode } => ew::pad(ins[0], shape, spec, *mode, out),
        Kernel::ScatterNd { offsets, slice } => {
            ew::scatter_nd(ins[0], ins[2], offsets, *slice, out)
        }
        Kernel::Copy => out.copy_from_slice(&ins[0][..out.len()]),
        Kernel::Quantize { params, shape } => quantize_as_f32(ins[0], shape, params, out),
        Kernel::Dequantize { params, shape } => dequantize_f32(ins[0], shape, params, out),
        Kernel::FakeQuant { params, shape } => {
            // Shapes and parameters were validated at compile time.
            let _ = qint8_math::quant::fake_quant_into(ins[0], shape, params, out);
        }
        Kernel::CastInt { lo, hi } => {
            for (o, &v) in out.iter_mut().zip(ins[0]) {
                *o = v.trunc().clamp(*lo, *hi);
            }
        }
    }
}

/// Applies `f(x, channel params)` elementwise, per channel as `p` lays out `shape`.
pub(crate) fn map_per_channel(
    x: &[f32],
    shape: &[usize],
    p: &QuantParams,
    out: &mut [f32],
    f: impl Fn(f32, &ChannelParams) -> f32,
) {
    // Shapes and parameters were validated when the kernel was built.
    let Ok((_, c, inner)) = p.layout(shape) else {
        return;
    };
    let ch = p.channels();
    // Block by block of `inner` elements (one channel each), with no
    // division per element.
    let inner = inner.max(1);
    for (b, (ob, xb)) in out.chunks_mut(inner).zip(x.chunks(inner)).enumerate() {
        let cp = &ch[if ch.len() == 1 { 0 } else { b % c }];
        for (o, &v) in ob.iter_mut().zip(xb) {
            *o = f(v, cp);
        }
    }
}

/// QuantizeLinear with integer results stored as f32 (exact for 8-bit values).
/// 8-bit ranges take the math crate's vectorized kernels (property-tested
/// against the reference), others the reference itself.
fn quantize_as_f32(x: &[f32], shape: &[usize], p: &QuantParams, out: &mut [f32]) {
    let (qmin, qmax) = p.qrange();
    let fast = if qmin >= i32::from(i8::MIN) && qmax <= i32::from(i8::MAX) {
        let mut q = vec![0i8; x.len()];
        let done = qint8_math::quant::quantize_into(x, shape, p, &mut q).is_ok();
        out.iter_mut().zip(&q).for_each(|(o, &v)| *o = f32::from(v));
        done
    } else if qmin >= 0 && qmax <= i32::from(u8::MAX) {
        let mut q = vec![0u8; x.len()];
        let done = qint8_math::quant::quantize_into(x, shape, p, &mut q).is_ok();
        out.iter_mut().zip(&q).for_each(|(o, &v)| *o = f32::from(v));
        done
    } else {
        false
    };
    if !fast {
        map_per_channel(x, shape, p, out, |v, cp| {
            qint8_math::reference::quantize_value(v, cp) as f32
        });
    }
}

/// DequantizeLinear of integer-valued f32 input.
fn dequantize_f32(x: &[f32], shape: &[usize], p: &QuantParams, out: &mut [f32]) {
    map_per_channel(x, shape, p, out, |v, cp| {
        // i64: int32 inputs minus an int32 zero point may overflow i32.
        (v as i64 - i64::from(cp.zero_point)) as f32 * cp.scale
    });
}
