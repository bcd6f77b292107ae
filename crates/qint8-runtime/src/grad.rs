//! Reverse-mode gradients through a float graph, from the values one
//! forward run recorded (an [`Observer`](crate::Observer) on a session
//! compiled without fusion sees all of them).
//!
//! [`backward`] seeds the gradient of one output and walks the nodes between
//! the requested values and that output in reverse order, handing each
//! requested value's gradient to a callback once it is complete. Requested
//! values may be activations or initializers: a Conv's weights and bias, a
//! Gemm's B and C. QuantizeLinear/DequantizeLinear pass gradients straight
//! through (with the clipping mask), as quantization-aware training needs.
//! Per-layer sensitivity uses the activations' gradients: one backward
//! pass gives, for every layer at once, how the output moves when that
//! layer's result is perturbed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use qint8_graph::{shape, Graph, Node, Op};

use crate::error::{Result, RuntimeError};
use crate::kernels::conv::Conv2d;
pub use crate::kernels::conv::ConvGeom;
use crate::kernels::gemm::{sgemm, Mat};
use crate::kernels::packed::{gemm_packed, Epilogue, PackedA};
use crate::kernels::pool::Pool2d;
use crate::kernels::Activation;
use crate::plan::summed_over_copies;

/// A forward value: its shape and row-major data.
#[derive(Debug, Clone, Copy)]
pub struct Value<'a> {
    /// Shape.
    pub shape: &'a [usize],
    /// Row-major data.
    pub data: &'a [f32],
}

/// Recorded forward values by name (graph inputs and node outputs;
/// initializers are read from the graph).
pub type Values<'a> = HashMap<String, Value<'a>>;

thread_local! {
    /// Scratch of the convolutions the backward pass runs.
    static CONV_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The nodes on a path from any of `from` to `output`, in graph order.
fn path(graph: &Graph, from: &[&str], output: &str) -> (Vec<usize>, HashSet<String>) {
    let mut fwd: HashSet<&str> = from.iter().copied().collect();
    for n in &graph.nodes {
        if n.inputs
            .iter()
            .enumerate()
            .any(|(k, i)| differentiable(&n.op, k) && fwd.contains(i.as_str()))
        {
            fwd.extend(n.outputs.iter().map(String::as_str));
        }
    }
    let mut back: HashSet<&str> = HashSet::from([output]);
    for n in graph.nodes.iter().rev() {
        if n.outputs.iter().any(|o| back.contains(o.as_str())) {
            back.extend(
                n.inputs
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| differentiable(&n.op, *k))
                    .map(|(_, i)| i.as_str()),
            );
        }
    }
    let live: HashSet<String> = fwd.intersection(&back).map(|s| s.to_string()).collect();
    let nodes = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.outputs.iter().any(|o| live.contains(o)))
        .map(|(i, _)| i)
        .collect();
    (nodes, live)
}

/// Whether a gradient flows into input `i` of `op`: not into shapes,
/// indices, axes, pads or conditions, nor through operators whose output
/// does not vary smoothly with any input (Shape, comparisons, integer
/// arithmetic of shape subgraphs).
fn differentiable(op: &Op, i: usize) -> bool {
    match op {
        Op::Shape { .. }
        | Op::ConstantOfShape { .. }
        | Op::Equal
        | Op::Not
        | Op::Range
        | Op::Mod { .. } => false,
        Op::Cast { to } => {
            qint8_graph::DataType::from_onnx(*to) == Some(qint8_graph::DataType::Float)
        }
        Op::Reshape { .. }
        | Op::Expand
        | Op::Slice { .. }
        | Op::Pad { .. }
        | Op::Squeeze { .. }
        | Op::Unsqueeze { .. }
        | Op::Gather { .. }
        | Op::Split { .. }
        | Op::Clip { .. }
        | Op::ReduceMean { .. }
        | Op::Pow
        | Op::LayerNormalization { .. } => i == 0,
        Op::Where => i != 0,
        Op::ScatterND => i != 1,
        _ => true,
    }
}

/// Whether [`backward`] has a rule for `op`.
pub fn has_rule(op: &Op) -> bool {
    matches!(
        op,
        Op::Conv(_)
            | Op::Gemm { .. }
            | Op::MatMul
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Relu
            | Op::Clip { .. }
            | Op::Sigmoid
            | Op::HardSigmoid { .. }
            | Op::HardSwish
            | Op::MaxPool(_)
            | Op::AveragePool(_)
            | Op::GlobalAveragePool
            | Op::ReduceMean { .. }
            | Op::Flatten { .. }
            | Op::Reshape { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Identity
            | Op::Dropout
            | Op::Expand
            | Op::Concat { .. }
            | Op::BatchNormalization { .. }
            | Op::Softmax { .. }
            | Op::Transpose { .. }
            | Op::QuantizeLinear { .. }
            | Op::DequantizeLinear { .. }
            | Op::Erf
            | Op::Gelu { .. }
            | Op::Sqrt
            | Op::Pow
            | Op::Slice { .. }
            | Op::Pad { .. }
            | Op::Gather { .. }
            | Op::LayerNormalization { .. }
            | Op::Split { .. }
    ) || (matches!(op, Op::Cast { .. }) && differentiable(op, 0))
}

/// The operators between `from` and `output` that [`backward`] has no rule
/// for, each once, sorted (empty when the pass can run).
pub fn unsupported(graph: &Graph, from: &[&str], output: &str) -> Vec<String> {
    without_rule(graph, &path(graph, from, output).0)
}

/// The operators among `nodes` without a gradient rule, each once, sorted.
fn without_rule(graph: &Graph, nodes: &[usize]) -> Vec<String> {
    nodes
        .iter()
        .map(|&i| &graph.nodes[i])
        .filter(|n| !has_rule(&n.op))
        .map(|n| n.op.op_type().to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Back-propagates `seed` (the gradient of `output`, shaped like it) to
/// every value in `wanted`, calling `visit(name, gradient)` once per wanted
/// value as soon as its gradient is complete (in reverse graph order; a
/// value that does not reach `output` gets zeros). `values` must hold every
/// graph input and node output on the way. [`Backward`] prepares the same
/// pass once for many runs.
pub fn backward(
    graph: &Graph,
    values: &Values<'_>,
    output: &str,
    seed: &[f32],
    wanted: &[&str],
    visit: &mut dyn FnMut(&str, &[f32]) -> Result<()>,
) -> Result<()> {
    Backward::new(graph, wanted, output)?.run(values, seed, visit)
}

/// Per Conv node and geometry: its input gradient as forward convolutions,
/// or `None` where it takes [`conv_input_grad`].
type TransposedConvs = HashMap<(usize, ConvGeom), Option<Arc<InputGrad>>>;

/// Weights of a Gemm on an expanded map summed over the copies, in the
/// Gemm's own layout (`plan::summed_over_copies`), per Gemm node and copy
/// count.
type FoldedWeights = HashMap<(usize, usize), Arc<Vec<f32>>>;

/// The gradients of a binary operator's two operands (`None` where not
/// wanted).
type OperandGrads = (Option<Vec<f32>>, Option<Vec<f32>>);

/// A backward pass from one output to a set of values, prepared once (the
/// nodes on the way, which inputs take gradients, fused SiLU pairs) and run
/// on the values of any number of forward runs.
#[derive(Debug)]
pub struct Backward<'g> {
    graph: &'g Graph,
    output: String,
    wanted: Vec<String>,
    nodes: Vec<usize>,
    live: HashSet<String>,
    silu: HashMap<usize, usize>,
    /// Input-gradient convolutions prepared per Conv node and geometry
    /// (see [`InputGrad`]); `None` where the node takes the GEMM path.
    transposed: Mutex<TransposedConvs>,
    /// Gemm nodes whose input is a 1x1 map expanded and flattened
    /// ([`expanded_gemms`]): Gemm node to its Expand node.
    expanded: HashMap<usize, usize>,
    /// Their weights summed over the copies.
    folded: Mutex<FoldedWeights>,
    /// Input-gradient kernels chosen for batches on one thread
    /// ([`with_many_images`](Self::with_many_images)).
    many_images: bool,
    /// Shapes and constants (slice bounds, pads, gather indices, scalars
    /// computed from shapes) inferred per set of graph input shapes.
    consts: Mutex<HashMap<Vec<Vec<usize>>, Arc<Consts>>>,
}

/// What shape inference knows for one set of input shapes: every value's
/// shape and constant contents, and the constant float values as data.
#[derive(Debug)]
struct Consts {
    shapes: shape::Shapes,
    floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl<'g> Backward<'g> {
    /// Prepares the pass from `output` back to `wanted`; an error names
    /// every operator on the way that has no gradient rule.
    pub fn new(graph: &'g Graph, wanted: &[&str], output: &str) -> Result<Self> {
        let (nodes, live) = path(graph, wanted, output);
        let missing = without_rule(graph, &nodes);
        if !missing.is_empty() {
            return Err(RuntimeError::NoGradient(missing));
        }
        let want: HashSet<&str> = wanted.iter().copied().collect();
        let silu = silu_pairs(graph, &nodes, &want, output);
        let expanded = expanded_gemms(graph, &nodes, &want, &live);
        Ok(Self {
            graph,
            output: output.to_string(),
            wanted: wanted.iter().map(|w| w.to_string()).collect(),
            nodes,
            live,
            silu,
            transposed: Mutex::default(),
            expanded,
            folded: Mutex::default(),
            many_images: false,
            consts: Mutex::default(),
        })
    }

    /// Inferred shapes and constants for the graph input shapes of `values`.
    fn consts(&self, values: &Values<'_>) -> Result<Arc<Consts>> {
        let inputs: HashMap<String, Vec<usize>> = self
            .graph
            .inputs
            .iter()
            .filter_map(|v| {
                values
                    .get(&v.name)
                    .map(|x| (v.name.clone(), x.shape.to_vec()))
            })
            .collect();
        let key: Vec<Vec<usize>> = self
            .graph
            .inputs
            .iter()
            .map(|v| inputs.get(&v.name).cloned().unwrap_or_default())
            .collect();
        let mut cache = self.consts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.get(&key) {
            return Ok(s.clone());
        }
        let shapes = shape::infer(self.graph, &inputs)?;
        let floats = shapes
            .iter()
            // Initializers are read from the graph (`lookup`); only values
            // computed from constants need a copy here.
            .filter(|(n, v)| {
                v.dtype == qint8_graph::DataType::Float && !self.graph.initializers.contains_key(*n)
            })
            .filter_map(|(n, v)| {
                Some((n.clone(), (v.shape.clone(), v.value.as_ref()?.to_f32_vec())))
            })
            .collect();
        let s = Arc::new(Consts { shapes, floats });
        cache.insert(key, s.clone());
        Ok(s)
    }

    /// This pass with its convolutions' input gradients on kernels chosen
    /// as a session with [`SessionOptions::many_images`](crate::SessionOptions::many_images)
    /// chooses them: for passes over batches of many images on one thread
    /// each, as the sensitivity analysis runs (small planes then go on
    /// Winograd). Set before the first run or [`prepare`](Self::prepare).
    pub fn with_many_images(mut self, many_images: bool) -> Self {
        self.many_images = many_images;
        self
    }

    /// Gemm node `i`'s gradient straight to the 1x1 map its input expands
    /// ([`expanded_gemms`]): `alpha * g * W'` with `W'` the weights summed
    /// over the copies, instead of a product as wide as all the copies and
    /// a sum over them (VGG's first classifier layer at inputs of 32x32:
    /// 49 copies of each channel). `None` where the shapes do not fit that
    /// form; the general rules then run.
    fn expanded_gemm_grad(
        &self,
        i: usize,
        values: &Values<'_>,
        g: &[f32],
    ) -> Result<Option<(String, Vec<f32>)>> {
        let Some(&e) = self.expanded.get(&i) else {
            return Ok(None);
        };
        let (graph, node, expand) = (self.graph, &self.graph.nodes[i], &self.graph.nodes[e]);
        let Op::Gemm { alpha, trans_b, .. } = node.op else {
            return Ok(None);
        };
        let x = input(graph, values, expand, 0)?;
        let y = value(graph, values, expand, &expand.outputs[0])?;
        let b = input(graph, values, node, 1)?;
        // x: [n, c, 1, ...], y: [n, c, ...] with the same n and c.
        let fits = x.shape.len() == y.shape.len()
            && x.shape.len() >= 2
            && x.shape[..2] == y.shape[..2]
            && x.shape[2..].iter().all(|&d| d == 1)
            && b.shape.len() == 2;
        if !fits {
            return Ok(None);
        }
        let (n, c) = (x.shape[0], x.shape[1]);
        let copies: usize = y.shape[2..].iter().product();
        let (n_out, k) = match trans_b {
            true => (b.shape[0], b.shape[1]),
            false => (b.shape[1], b.shape[0]),
        };
        if k != c * copies || g.len() != n * n_out || copies == 0 {
            return Ok(None);
        }
        let w = cached(&self.folded, (i, copies), || {
            Arc::new(summed_over_copies(b.data, trans_b, n_out, c, copies))
        })?;
        // W' is [n_out, c] with `trans_b`, else [c, n_out]: as [k, n] =
        // [n_out, c] for the product, row-major or transposed.
        let w_view = match trans_b {
            true => Mat::row_major(&w, c),
            false => Mat::transposed(&w, n_out),
        };
        let mut gx = vec![0.0f32; n * c];
        matmul(n, c, n_out, Mat::row_major(g, n_out), w_view, &mut gx, node)?;
        gx.iter_mut().for_each(|v| *v *= alpha);
        Ok(Some((expand.inputs[0].clone(), gx)))
    }

    /// Prepares, ahead of the first [`run`](Self::run), every
    /// convolution's input-gradient kernels for the value shapes in
    /// `shapes` (by name; those of one batch size): otherwise the first
    /// run of each worker prepares them, one worker waiting on the other.
    /// Convolutions whose shapes are not given are prepared on first use.
    pub fn prepare(&self, shapes: &HashMap<String, Vec<usize>>) -> Result<()> {
        let none = Values::new();
        for &i in &self.nodes {
            let node = &self.graph.nodes[i];
            let Op::Conv(attrs) = &node.op else {
                continue;
            };
            if !node.inputs.iter().any(|n| self.live.contains(n)) {
                continue;
            }
            let (Some(x), Some(w)) = (
                node.input(0).and_then(|x| shapes.get(x)),
                node.input(1).and_then(|w| lookup(self.graph, &none, w)),
            ) else {
                continue;
            };
            let geom = ConvGeom::resolve(node, attrs, x, w.shape)?;
            cached(&self.transposed, (i, geom), || {
                InputGrad::new(&geom, w.data, self.many_images).map(Arc::new)
            })?;
        }
        Ok(())
    }

    /// Node `i`'s input gradient on the forward kernels ([`InputGrad`],
    /// prepared on first use for each geometry).
    fn conv_grad(&self, i: usize, values: &Values<'_>, g: &[f32]) -> Result<Option<Vec<f32>>> {
        let node = &self.graph.nodes[i];
        let Op::Conv(attrs) = &node.op else {
            return Ok(None);
        };
        let x = input(self.graph, values, node, 0)?;
        let w = input(self.graph, values, node, 1)?;
        let geom = ConvGeom::resolve(node, attrs, x.shape, w.shape)?;
        if g.len() != geom.n * geom.cout * geom.oh * geom.ow {
            return Ok(None);
        }
        let conv = cached(&self.transposed, (i, geom), || {
            InputGrad::new(&geom, w.data, self.many_images).map(Arc::new)
        })?;
        let Some(conv) = conv else {
            return Ok(None);
        };
        let mut gx = vec![0.0; x.data.len()];
        // The kernels' scratch needs no clearing; this thread's is reused
        // from node to node and batch to batch.
        crate::kernels::packed::with_reused(&CONV_SCRATCH, conv.scratch_len(), |scratch| {
            conv.run(g, &mut gx, scratch)
        });
        Ok(Some(gx))
    }

    /// Runs the pass (see [`backward`]).
    pub fn run(
        &self,
        values: &Values<'_>,
        seed: &[f32],
        visit: &mut dyn FnMut(&str, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let (graph, output) = (self.graph, self.output.as_str());
        let (nodes, live, silu) = (&self.nodes, &self.live, &self.silu);
        if let Some((name, v)) = values
            .iter()
            .find(|(_, v)| v.shape.iter().product::<usize>() != v.data.len())
        {
            return Err(RuntimeError::Gradient(format!(
                "value {name} has {} elements for shape {:?}",
                v.data.len(),
                v.shape
            )));
        }
        let out_len = lookup(graph, values, output)
            .ok_or_else(|| RuntimeError::MissingInput(output.to_string()))?
            .data
            .len();
        if seed.len() != out_len {
            return Err(RuntimeError::Gradient(format!(
                "gradient seed has {} values, output {output} has {out_len}",
                seed.len()
            )));
        }
        let want: HashSet<&str> = self.wanted.iter().map(String::as_str).collect();
        // Constants the plan folded (scalars computed from shapes, as
        // attention's 1/sqrt(d)) were never recorded: inference gives them.
        // Where inference fails the rules that need it say so themselves.
        let known = self.consts(values).unwrap_or_else(|_| {
            Arc::new(Consts {
                shapes: shape::Shapes::new(),
                floats: HashMap::new(),
            })
        });
        let mut merged: Values<'_> = values.clone();
        for (name, (shape, data)) in &known.floats {
            merged.entry(name.clone()).or_insert(Value { shape, data });
        }
        let values = &merged;
        let consts = &known.shapes;
        let mut done: HashSet<&str> = HashSet::new();
        let mut grads: HashMap<String, Vec<f32>> = HashMap::new();
        grads.insert(output.to_string(), seed.to_vec());
        for &i in nodes.iter().rev() {
            let node = &graph.nodes[i];
            if matches!(node.op, Op::Split { .. }) {
                // Several outputs: their gradients side by side along the
                // axis (zeros for parts no gradient reached) are the input's.
                let parts: Vec<Option<Vec<f32>>> = node
                    .outputs
                    .iter()
                    .map(|o| grads.remove(o.as_str()))
                    .collect();
                let Some(x) = node.input(0).filter(|x| live.contains(*x)) else {
                    continue;
                };
                if parts.iter().all(Option::is_none) {
                    continue;
                }
                let gx = split_grad(node, value(graph, values, node, x)?, &parts, consts)?;
                match grads.get_mut(x) {
                    Some(acc) => add_assign(acc, &gx),
                    None => {
                        grads.insert(x.to_string(), gx);
                    }
                }
                continue;
            }
            let out = node.outputs[0].as_str();
            // No gradient reached this value: it contributes nothing upstream.
            let Some(g) = grads.remove(out) else {
                if want.contains(out) {
                    let len = value(graph, values, node, out)?.data.len();
                    visit(out, &vec![0.0; len])?;
                    done.insert(out);
                }
                continue;
            };
            if want.contains(out) {
                visit(out, &g)?;
                done.insert(out);
            }
            let need: Vec<bool> = node.inputs.iter().map(|n| live.contains(n)).collect();
            if !need.iter().any(|&b| b) {
                continue;
            }
            if let Some((name, gx)) = self.expanded_gemm_grad(i, values, &g)? {
                // The Flatten and Expand between are skipped: no gradient
                // reaches their outputs.
                match grads.get_mut(&name) {
                    Some(acc) => add_assign(acc, &gx),
                    None => {
                        grads.insert(name, gx);
                    }
                }
                continue;
            }
            let gin = match silu.get(&i) {
                // x * sigmoid(x) in one pass, straight to x.
                Some(&x_at) => {
                    let x = input(graph, values, node, x_at)?;
                    let sg = input(graph, values, node, 1 - x_at)?;
                    let gx = in_place(g, x.data, sg.data, |g, x, s| g * (s + x * s * (1.0 - s)));
                    let mut gin = vec![None, None];
                    gin[x_at] = Some(gx);
                    gin
                }
                None => {
                    let fast = match need[0] {
                        true => self.conv_grad(i, values, &g)?,
                        false => None,
                    };
                    match fast {
                        Some(gx) if need.iter().skip(1).all(|&b| !b) => vec![Some(gx)],
                        // Weights or bias too: those from the rule, the
                        // input's from the forward kernels.
                        Some(gx) => {
                            let mut rest = need.clone();
                            rest[0] = false;
                            let mut gin = rule(graph, values, node, g, &rest, consts)?;
                            gin[0] = Some(gx);
                            gin
                        }
                        None => rule(graph, values, node, g, &need, consts)?,
                    }
                }
            };
            for (name, gi) in node.inputs.iter().zip(gin) {
                let Some(gi) = gi else { continue };
                match grads.get_mut(name) {
                    Some(acc) => add_assign(acc, &gi),
                    None => {
                        grads.insert(name.clone(), gi);
                    }
                }
            }
        }
        for w in self.wanted.iter().map(String::as_str) {
            if done.contains(w) {
                continue;
            }
            let len = lookup(graph, values, w)
                .ok_or_else(|| RuntimeError::MissingInput(w.to_string()))?
                .data
                .len();
            let g = grads.remove(w).unwrap_or_else(|| vec![0.0; len]);
            visit(w, &g)?;
        }
        Ok(())
    }
}

/// The value under `key` in a cache shared by the workers, made by `make`
/// on first use.
fn cached<K: std::hash::Hash + Eq, V: Clone>(
    cache: &Mutex<HashMap<K, V>>,
    key: K,
    make: impl FnOnce() -> V,
) -> Result<V> {
    let mut cache = cache
        .lock()
        .map_err(|_| RuntimeError::Gradient("gradient cache poisoned".into()))?;
    Ok(cache.entry(key).or_insert_with(make).clone())
}

/// The Gemm nodes on the path (A not transposed, B a constant) whose
/// input is `Flatten(axis 1)` of an `Expand`, each of those values read by
/// the next node alone and not wanted: Gemm node to Expand node. Whether
/// the Expand copies a 1x1 map is checked on the values
/// (`Backward::expanded_gemm_grad`).
fn expanded_gemms(
    graph: &Graph,
    nodes: &[usize],
    want: &HashSet<&str>,
    live: &HashSet<String>,
) -> HashMap<usize, usize> {
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .flat_map(|&i| graph.nodes[i].outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let only =
        |value: &str, reader: usize| !want.contains(value) && graph.consumers(value) == [reader];
    let mut out = HashMap::new();
    for &i in nodes {
        let node = &graph.nodes[i];
        let Op::Gemm { trans_a: false, .. } = node.op else {
            continue;
        };
        let constant_b = node
            .input(1)
            .is_some_and(|b| graph.initializers.contains_key(b));
        let Some(&f) = node.input(0).and_then(|a| producer.get(a)) else {
            continue;
        };
        let flatten = &graph.nodes[f];
        let Some(&e) = flatten.input(0).and_then(|v| producer.get(v)) else {
            continue;
        };
        let expand = &graph.nodes[e];
        // Gradients into B or C take the general rule.
        let weights_wanted = node.inputs.iter().skip(1).any(|n| live.contains(n));
        if constant_b
            && !weights_wanted
            && matches!(flatten.op, Op::Flatten { axis: 1 })
            && matches!(expand.op, Op::Expand)
            && only(&flatten.outputs[0], i)
            && only(&expand.outputs[0], f)
            && expand.input(0).is_some_and(|x| live.contains(x))
        {
            out.insert(i, e);
        }
    }
    out
}

/// The Mul nodes on the path that compute SiLU, `x * sigmoid(x)`, whose
/// Sigmoid output feeds nothing else (and is not wanted): node index to the
/// position of `x` among the Mul's inputs. Their backward runs as one pass.
fn silu_pairs(
    graph: &Graph,
    nodes: &[usize],
    want: &HashSet<&str>,
    output: &str,
) -> HashMap<usize, usize> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.nodes {
        for i in &n.inputs {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    let mut pairs = HashMap::new();
    for &i in nodes {
        let n = &graph.nodes[i];
        if !matches!(n.op, Op::Mul) || n.inputs.len() != 2 {
            continue;
        }
        for x_at in 0..2 {
            let (x, s) = (&n.inputs[x_at], &n.inputs[1 - x_at]);
            let sigmoid_of_x = graph.producer(s).is_some_and(|p| {
                let p = &graph.nodes[p];
                matches!(p.op, Op::Sigmoid) && p.inputs.first() == Some(x)
            });
            if sigmoid_of_x
                && x != s
                && uses.get(s.as_str()) == Some(&1)
                && !want.contains(s.as_str())
                && s != output
                && !graph.is_output(s)
            {
                pairs.insert(i, x_at);
                break;
            }
        }
    }
    pairs
}

/// Whether QuantizeLinear maps `v` inside its integer range (rounding to
/// `qmin..=qmax` rather than saturating): the straight-through mask.
fn inside_range(v: f32, cp: &qint8_math::ChannelParams) -> bool {
    let q = v / cp.scale + cp.zero_point as f32;
    q >= cp.qmin as f32 - 0.5 && q <= cp.qmax as f32 + 0.5
}

/// The gradient of QuantizeLinear/DequantizeLinear `node`'s output with
/// respect to its scale (one entry per channel of `p`), for `g` the
/// output's gradient and `x` its input. QuantizeLinear's rounding passes
/// straight through (`dq/ds = -x / s^2` where it does not saturate, 0 where
/// it does); DequantizeLinear's is `q - zero point`. Summed over a Q -> DQ
/// pair sharing the scale, that is the learned step size gradient (Esser et
/// al., "Learned Step Size Quantization", ICLR 2020): `round(x/s) - x/s`
/// inside the range, `qmin` or `qmax` (less the zero point) outside.
fn qdq_scale_grad(
    node: &Node,
    p: &qint8_math::QuantParams,
    x: Value<'_>,
    g: &[f32],
) -> Result<Vec<f32>> {
    let (_, c, inner) = p
        .layout(x.shape)
        .map_err(|e| node_err(node, e.to_string()))?;
    let ch = p.channels();
    let quantize = matches!(node.op, Op::QuantizeLinear { .. });
    let mut out = vec![0.0f64; ch.len()];
    let inner = inner.max(1);
    for (b, (xb, gb)) in x.data.chunks(inner).zip(g.chunks(inner)).enumerate() {
        let k = if ch.len() == 1 { 0 } else { b % c };
        let cp = &ch[k];
        let mut acc = 0.0f64;
        for (&v, &gv) in xb.iter().zip(gb) {
            let d = if quantize {
                if inside_range(v, cp) {
                    -v / (cp.scale * cp.scale)
                } else {
                    0.0
                }
            } else {
                v - cp.zero_point as f32
            };
            acc += (gv * d) as f64;
        }
        out[k] += acc;
    }
    Ok(out.into_iter().map(|v| v as f32).collect())
}

/// The parameters of QuantizeLinear/DequantizeLinear `node`, whose scale
/// and zero point must be initializers.
fn qdq_node_params(
    graph: &Graph,
    node: &Node,
    axis: i64,
    rank: usize,
) -> Result<qint8_math::QuantParams> {
    let mut known = shape::Shapes::new();
    for i in 1..3 {
        if let Some((name, t)) = node
            .input(i)
            .and_then(|n| graph.initializers.get(n).map(|t| (n, t)))
        {
            known.insert(
                name.to_string(),
                shape::ValueShape {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    value: Some(t.clone()),
                },
            );
        }
    }
    crate::plan::qdq_params(node, &known, axis, rank)?
        .ok_or_else(|| node_err(node, "the scale must be an initializer"))
}

fn lookup<'a>(graph: &'a Graph, values: &'a Values<'_>, name: &str) -> Option<Value<'a>> {
    if let Some(v) = values.get(name) {
        return Some(*v);
    }
    let t = graph.initializers.get(name)?;
    let a = t.as_f32()?;
    Some(Value {
        shape: t.shape(),
        data: a.as_slice()?,
    })
}

fn node_err(node: &Node, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Node {
        node: node.name.clone(),
        op: node.op.op_type().to_string(),
        detail: detail.into(),
    }
}

fn value<'a>(
    graph: &'a Graph,
    values: &'a Values<'_>,
    node: &Node,
    name: &str,
) -> Result<Value<'a>> {
    lookup(graph, values, name)
        .ok_or_else(|| node_err(node, format!("the forward value {name} was not recorded")))
}

fn input<'a>(graph: &'a Graph, values: &'a Values<'_>, node: &Node, i: usize) -> Result<Value<'a>> {
    let name = node
        .input(i)
        .ok_or_else(|| node_err(node, format!("input {i} is missing")))?;
    value(graph, values, node, name)
}

/// Gradients of `node`'s inputs (those marked in `need`) from its output's.
fn rule(
    graph: &Graph,
    values: &Values<'_>,
    node: &Node,
    g: Vec<f32>,
    need: &[bool],
    consts: &shape::Shapes,
) -> Result<Vec<Option<Vec<f32>>>> {
    let mut out: Vec<Option<Vec<f32>>> = vec![None; node.inputs.len()];
    let y = value(graph, values, node, &node.outputs[0])?;
    if g.len() != y.data.len() {
        return Err(node_err(node, "gradient and output sizes differ"));
    }
    // Concat needs only its inputs' shapes: one computed by the plan as a
    // constant (ViT's class token expanded to the batch) was not recorded.
    if let Op::Concat { axis } = &node.op {
        let g = &g[..];
        let rank = y.shape.len();
        let ax = shape::norm_axis(node, *axis, rank)?;
        let outer: usize = y.shape[..ax].iter().product();
        let inner: usize = y.shape[ax + 1..].iter().product();
        let total = y.shape[ax] * inner;
        let mut off = 0;
        for (k, name) in node.inputs.iter().enumerate() {
            let v_shape = match lookup(graph, values, name) {
                Some(v) => v.shape,
                None => consts
                    .get(name)
                    .map(|v| v.shape.as_slice())
                    .ok_or_else(|| node_err(node, format!("the shape of {name} is unknown")))?,
            };
            let len = v_shape.get(ax).copied().unwrap_or(0) * inner;
            if need[k] {
                let mut gi = Vec::with_capacity(outer * len);
                for o in 0..outer {
                    gi.extend_from_slice(&g[o * total + off..o * total + off + len]);
                }
                out[k] = Some(gi);
            }
            off += len;
        }
        return Ok(out);
    }
    let x = input(graph, values, node, 0)?;
    // Operators that pass the gradient through unchanged take it as is.
    if matches!(
        node.op,
        Op::Identity
            | Op::Cast { .. }
            | Op::Dropout
            | Op::Flatten { .. }
            | Op::Reshape { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
    ) {
        out[0] = Some(g);
        return Ok(out);
    }
    if matches!(node.op, Op::Add) && need[0] && need[1] && x.data.len() == g.len() {
        let b = input(graph, values, node, 1)?;
        if b.data.len() == g.len() {
            out[0] = Some(g.clone());
            out[1] = Some(g);
            return Ok(out);
        }
    }
    // Unary operators scale the gradient in place.
    if matches!(
        node.op,
        Op::Relu | Op::Sigmoid | Op::Clip { .. } | Op::HardSigmoid { .. } | Op::HardSwish
    ) {
        let gx = match &node.op {
            Op::Relu => in_place(g, x.data, y.data, |g, _, y| if y > 0.0 { g } else { 0.0 }),
            Op::Sigmoid => in_place(g, x.data, y.data, |g, _, y| g * y * (1.0 - y)),
            Op::Clip { min, max } => {
                let bound = |i: usize, attr: Option<f32>, default: f32| -> Result<f32> {
                    match node.input(i) {
                        Some(n) => Ok(value(graph, values, node, n)?
                            .data
                            .first()
                            .copied()
                            .unwrap_or(default)),
                        None => Ok(attr.unwrap_or(default)),
                    }
                };
                let lo = bound(1, *min, f32::NEG_INFINITY)?;
                let hi = bound(2, *max, f32::INFINITY)?;
                in_place(
                    g,
                    x.data,
                    y.data,
                    |g, x, _| {
                        if x > lo && x < hi {
                            g
                        } else {
                            0.0
                        }
                    },
                )
            }
            Op::HardSigmoid { alpha, beta } => {
                let (a, b) = (*alpha, *beta);
                in_place(g, x.data, y.data, |g, x, _| {
                    let t = a * x + b;
                    if t > 0.0 && t < 1.0 {
                        g * a
                    } else {
                        0.0
                    }
                })
            }
            Op::HardSwish => in_place(g, x.data, y.data, |g, x, _| {
                let t = x / 6.0 + 0.5;
                if t <= 0.0 {
                    0.0
                } else if t >= 1.0 {
                    g
                } else {
                    g * (t + x / 6.0)
                }
            }),
            _ => g,
        };
        out[0] = Some(gx);
        return Ok(out);
    }
    match node.op {
        Op::Erf => {
            // d erf(x) / dx = 2 / sqrt(pi) exp(-x^2)
            const K: f32 = std::f32::consts::FRAC_2_SQRT_PI;
            out[0] = Some(in_place(g, x.data, y.data, |g, x, _| {
                g * K * (-x * x).exp()
            }));
            return Ok(out);
        }
        Op::Gelu { tanh: false } => {
            // Phi(x) + x phi(x)
            out[0] = Some(in_place(g, x.data, y.data, |g, x, _| {
                let phi = (-0.5 * x * x).exp() * 0.398_942_3;
                let cdf = 0.5
                    * (1.0 + crate::kernels::elementwise::erf(x * std::f32::consts::FRAC_1_SQRT_2));
                g * (cdf + x * phi)
            }));
            return Ok(out);
        }
        Op::Gelu { tanh: true } => {
            out[0] = Some(in_place(g, x.data, y.data, |g, x, _| {
                const K: f32 = 0.797_884_6;
                let t = (K * (x + 0.044_715 * x * x * x)).tanh();
                g * (0.5 * (1.0 + t)
                    + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * 0.044_715 * x * x))
            }));
            return Ok(out);
        }
        Op::Sqrt => {
            out[0] = Some(in_place(g, x.data, y.data, |g, _, y| {
                if y > 0.0 {
                    g * 0.5 / y
                } else {
                    0.0
                }
            }));
            return Ok(out);
        }
        _ => {}
    }
    let g = &g[..];
    match &node.op {
        Op::Pow => {
            // Constants the plan folded are among `values` (see `run`).
            let e = input(graph, values, node, 1)?.data;
            let &[e] = e else {
                return Err(node_err(node, "gradients need a constant scalar exponent"));
            };
            out[0] = Some(elementwise(g, x.data, y.data, |g, x, _| {
                g * e * x.powf(e - 1.0)
            }));
        }
        Op::Slice { .. } => {
            let axes = shape::slice_axes(node, consts, x.shape)?;
            let mut gx = vec![0.0; x.data.len()];
            for (k, o) in crate::kernels::elementwise::slice_offsets(x.shape, &axes)
                .into_iter()
                .enumerate()
            {
                gx[o] += g[k];
            }
            out[0] = Some(gx);
        }
        Op::Pad { mode, .. } => {
            let spec = shape::pad_spec(node, consts, x.shape)?;
            let mut gx = vec![0.0; x.data.len()];
            crate::kernels::elementwise::for_each_pad_source(x.shape, &spec, *mode, |k, src| {
                if let Some(o) = src {
                    gx[o] += g[k];
                }
            });
            out[0] = Some(gx);
        }
        Op::Gather { axis } => {
            let ax = shape::norm_axis(node, *axis, x.shape.len())?;
            let raw = consts
                .get(&node.inputs[1])
                .and_then(|v| v.value.as_ref())
                .and_then(|t| t.to_i64_vec())
                .ok_or_else(|| node_err(node, "gradients need constant indices"))?;
            let dim = x.shape[ax];
            let idx = shape::gather_indices(node, &raw, dim)?;
            let inner: usize = x.shape[ax + 1..].iter().product();
            let outer: usize = x.shape[..ax].iter().product();
            let mut gx = vec![0.0; x.data.len()];
            for o in 0..outer {
                for (j, &i) in idx.iter().enumerate() {
                    let src = &g[(o * idx.len() + j) * inner..][..inner];
                    let dst = &mut gx[(o * dim + i) * inner..][..inner];
                    add_assign(dst, src);
                }
            }
            out[0] = Some(gx);
        }
        Op::LayerNormalization { axis, epsilon } => {
            let ax = shape::norm_axis(node, *axis, x.shape.len())?;
            let norm = &x.shape[ax..];
            let n: usize = norm.iter().product();
            let scale = input(graph, values, node, 1)?;
            let mut sc = vec![0.0; n];
            crate::kernels::elementwise::expand(
                &crate::kernels::elementwise::Broadcast::new(&[scale.shape], norm),
                scale.data,
                &mut sc,
            );
            let mut gx = vec![0.0; x.data.len()];
            for ((xr, gr), dr) in x
                .data
                .chunks_exact(n.max(1))
                .zip(g.chunks_exact(n.max(1)))
                .zip(gx.chunks_exact_mut(n.max(1)))
            {
                let (mean, inv) = crate::kernels::elementwise::mean_inv_std(xr, *epsilon);
                // dx = inv (gs - mean(gs) - xhat mean(gs xhat)), gs = g * scale.
                let (mut m1, mut m2) = (0.0f64, 0.0f64);
                for k in 0..n {
                    let gs = f64::from(gr[k] * sc[k]);
                    m1 += gs;
                    m2 += gs * (f64::from(xr[k]) - mean) * inv;
                }
                let (m1, m2) = (m1 / n as f64, m2 / n as f64);
                for k in 0..n {
                    let xhat = (f64::from(xr[k]) - mean) * inv;
                    dr[k] = (inv * (f64::from(gr[k] * sc[k]) - m1 - xhat * m2)) as f32;
                }
            }
            out[0] = Some(gx);
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div => {
            let b = input(graph, values, node, 1)?;
            if x.shape.len() > y.shape.len() || b.shape.len() > y.shape.len() {
                return Err(node_err(
                    node,
                    "an operand has a higher rank than the result",
                ));
            }
            let (ga, gb) = binary_grad(&node.op, x, b, y.shape, g, need[0], need[1]);
            out[0] = ga;
            out[1] = gb;
        }
        Op::Expand => {
            if x.shape.len() > y.shape.len() {
                return Err(node_err(
                    node,
                    "the input has a higher rank than the result",
                ));
            }
            out[0] = Some(unbroadcast(g, y.shape, x.shape))
        }
        Op::GlobalAveragePool => {
            let plane: usize = x.shape.iter().skip(2).product();
            let mut gx = vec![0.0; x.data.len()];
            if plane > 0 {
                let inv = 1.0 / plane as f32;
                for (dst, &gv) in gx.chunks_exact_mut(plane).zip(g) {
                    dst.fill(gv * inv);
                }
            }
            out[0] = Some(gx);
        }
        Op::ReduceMean { .. } => {
            // Constant axes come from the attribute or an initializer input.
            let mut known = shape::Shapes::new();
            if let Some(t) = node.input(1).and_then(|n| graph.initializers.get(n)) {
                known.insert(
                    node.inputs[1].clone(),
                    shape::ValueShape {
                        dtype: t.dtype(),
                        shape: t.shape().to_vec(),
                        value: Some(t.clone()),
                    },
                );
            }
            let axes = shape::reduce_axes(node, &known, x.shape.len())?;
            let kept: Vec<usize> = x
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            if kept.iter().product::<usize>() != g.len() {
                return Err(node_err(node, "gradient and reduced sizes differ"));
            }
            let inv = 1.0 / axes.iter().map(|&a| x.shape[a]).product::<usize>().max(1) as f32;
            let mut gx = vec![0.0; x.data.len()];
            match trailing_broadcast(x.shape, &kept) {
                Some(inner) => {
                    for (dst, &gv) in gx.chunks_exact_mut(inner).zip(g) {
                        dst.fill(gv * inv);
                    }
                }
                None => {
                    let (sa, sb) = (bstrides(x.shape, x.shape), bstrides(x.shape, &kept));
                    for_each_bcast(x.shape, &sa, &sb, |o, _, ib| gx[o] = g[ib] * inv);
                }
            }
            out[0] = Some(gx);
        }
        Op::Softmax { axis } => {
            // dx_i = y_i (g_i - sum_j g_j y_j) along the axis.
            let ax = shape::norm_axis(node, *axis, y.shape.len())?;
            let n = y.shape[ax];
            let inner: usize = y.shape[ax + 1..].iter().product();
            let mut gx = vec![0.0; g.len()];
            let block = (n * inner).max(1);
            for ((gb, yb), xb) in g
                .chunks_exact(block)
                .zip(y.data.chunks_exact(block))
                .zip(gx.chunks_exact_mut(block))
            {
                for j in 0..inner {
                    let dot: f32 = (0..n).map(|i| gb[i * inner + j] * yb[i * inner + j]).sum();
                    for i in 0..n {
                        let k = i * inner + j;
                        xb[k] = yb[k] * (gb[k] - dot);
                    }
                }
            }
            out[0] = Some(gx);
        }
        Op::Transpose { perm } => {
            let perm = shape::transpose_perm(node, perm.as_deref(), x.shape.len())?;
            let mut inverse = vec![0; perm.len()];
            for (k, &p) in perm.iter().enumerate() {
                inverse[p] = k;
            }
            let mut gx = vec![0.0; g.len()];
            crate::kernels::elementwise::transpose(g, y.shape, &inverse, &mut gx);
            out[0] = Some(gx);
        }
        Op::BatchNormalization { epsilon } => {
            let scale = input(graph, values, node, 1)?;
            let var = input(graph, values, node, 4)?;
            let c = x.shape.get(1).copied().unwrap_or(1);
            if scale.data.len() != c || var.data.len() != c {
                return Err(node_err(
                    node,
                    "scale and variance need one value per channel",
                ));
            }
            let plane: usize = x.shape.iter().skip(2).product();
            let mut gx = g.to_vec();
            for (k, chunk) in gx.chunks_exact_mut(plane.max(1)).enumerate() {
                let ch = k % c;
                let f = scale.data[ch] / (var.data[ch] + epsilon).sqrt();
                chunk.iter_mut().for_each(|v| *v *= f);
            }
            out[0] = Some(gx);
        }
        Op::MaxPool(p) | Op::AveragePool(p) => {
            let pool = Pool2d::resolve(node, p, x.shape)?;
            let mut gx = vec![0.0; x.data.len()];
            if matches!(node.op, Op::MaxPool(_)) {
                maxpool_grad(&pool, x.data, g, &mut gx);
            } else {
                avgpool_grad(&pool, g, &mut gx);
            }
            out[0] = Some(gx);
        }
        Op::Conv(c) => {
            let w = input(graph, values, node, 1)?;
            let geom = ConvGeom::resolve(node, c, x.shape, w.shape)?;
            if need[0] {
                let mut gx = vec![0.0; x.data.len()];
                conv_input_grad(&geom, w.data, g, &mut gx);
                out[0] = Some(gx);
            }
            if need.get(1).copied().unwrap_or(false) {
                let mut gw = vec![0.0; w.data.len()];
                conv_weight_grad(&geom, x.data, g, &mut gw);
                out[1] = Some(gw);
            }
            if need.get(2).copied().unwrap_or(false) {
                out[2] = Some(channel_sums(g, geom.n, geom.cout));
            }
        }
        Op::QuantizeLinear { axis } | Op::DequantizeLinear { axis } => {
            // Straight-through: DequantizeLinear scales by s, and
            // QuantizeLinear divides by s where it does not saturate (the
            // clipping mask) and passes nothing where it does.
            let p = qdq_node_params(graph, node, *axis, x.shape.len())?;
            if need[0] {
                let mut gx = vec![0.0f32; x.data.len()];
                if matches!(node.op, Op::QuantizeLinear { .. }) {
                    crate::plan::map_per_channel(x.data, x.shape, &p, &mut gx, |v, cp| {
                        if inside_range(v, cp) {
                            1.0 / cp.scale
                        } else {
                            0.0
                        }
                    });
                } else {
                    crate::plan::map_per_channel(x.data, x.shape, &p, &mut gx, |_, cp| cp.scale);
                }
                gx.iter_mut().zip(g).for_each(|(f, &gv)| *f *= gv);
                out[0] = Some(gx);
            }
            if need.get(1).copied().unwrap_or(false) {
                out[1] = Some(qdq_scale_grad(node, &p, x, g)?);
            }
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let b = input(graph, values, node, 1)?;
            if x.shape.len() != 2 || b.shape.len() != 2 {
                return Err(node_err(node, "Gemm operands must be matrices"));
            }
            let (m, k) = if *trans_a {
                (x.shape[1], x.shape[0])
            } else {
                (x.shape[0], x.shape[1])
            };
            let n = if *trans_b { b.shape[0] } else { b.shape[1] };
            // A' = op(A) is [m, k], B' = op(B) is [k, n].
            let b_view = if *trans_b {
                Mat::transposed(b.data, k)
            } else {
                Mat::row_major(b.data, n)
            };
            let gv = Mat::row_major(g, n);
            if need[0] {
                // dA' = alpha * g * B'^T, or its transpose (B' g^T) when A
                // is stored transposed.
                let mut ga = vec![0.0; m * k];
                if *trans_a {
                    matmul(k, m, n, b_view, gv.t(), &mut ga, node)?;
                } else {
                    matmul(m, k, n, gv, b_view.t(), &mut ga, node)?;
                }
                ga.iter_mut().for_each(|v| *v *= alpha);
                out[0] = Some(ga);
            }
            if need.get(1).copied().unwrap_or(false) {
                // dB' = alpha * A'^T g ([k, n]), stored as B is: its
                // transpose g^T A' ([n, k]) under trans_b.
                let mut gb = vec![0.0; k * n];
                let a_t = if *trans_a {
                    Mat::row_major(x.data, m)
                } else {
                    Mat::transposed(x.data, k)
                };
                if *trans_b {
                    matmul(n, k, m, gv.t(), a_t.t(), &mut gb, node)?;
                } else {
                    matmul(k, n, m, a_t, gv, &mut gb, node)?;
                }
                gb.iter_mut().for_each(|v| *v *= alpha);
                out[1] = Some(gb);
            }
            if need.get(2).copied().unwrap_or(false) {
                let c = input(graph, values, node, 2)?;
                let mut gc = unbroadcast(g, y.shape, c.shape);
                gc.iter_mut().for_each(|v| *v *= beta);
                out[2] = Some(gc);
            }
        }
        Op::MatMul => {
            let b = input(graph, values, node, 1)?;
            if x.shape.len() < 2 || b.shape.len() < 2 {
                return Err(node_err(node, "gradients need operands of rank >= 2"));
            }
            if b.shape.len() > 2 {
                let (ga, gb) = batched_matmul_grad(node, x, b, g, need)?;
                out[0] = ga;
                out[1] = gb;
                return Ok(out);
            }
            let k = b.shape[0];
            let n = b.shape[1];
            let rows = x.data.len() / k.max(1);
            let gv = Mat::row_major(g, n);
            if need[0] {
                let mut ga = vec![0.0; rows * k];
                matmul(rows, k, n, gv, Mat::transposed(b.data, n), &mut ga, node)?;
                out[0] = Some(ga);
            }
            if need[1] {
                let mut gb = vec![0.0; k * n];
                matmul(k, n, rows, Mat::transposed(x.data, k), gv, &mut gb, node)?;
                out[1] = Some(gb);
            }
        }
        other => {
            return Err(RuntimeError::NoGradient(vec![other.op_type().to_string()]));
        }
    }
    Ok(out)
}

/// `sum(a * b)` in sixteen f32 lanes (they vectorize).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::kernels::wide(|| dot_lanes(a, b))
}

/// [`dot`]'s body, inlined into callers that run wide already.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

crate::kernels::multiversion! {
    /// Gradients of `x * b` or `x / b` (`div`) where `b` holds one value
    /// per block of `inner` values of `x` (a gate `[N, C, 1, 1]` on `[N,
    /// C, H, W]`): into `ga` (when not empty) `g` times one factor per
    /// block, into `gb` (when not empty) a multiple of the block's
    /// `sum(g * x)`.
    fn gate_grads(g: &[f32], x: &[f32], b: &[f32], inner: usize, div: bool, ga: &mut [f32], gb: &mut [f32]) {
        for (j, &bv) in b.iter().enumerate() {
            let (gs, xs) = (&g[j * inner..][..inner], &x[j * inner..][..inner]);
            if !ga.is_empty() {
                // g * b and g / b as g times one factor per block.
                let f = if div { 1.0 / bv } else { 1.0 * bv };
                for (d, &gv) in ga[j * inner..][..inner].iter_mut().zip(gs) {
                    *d = gv * f;
                }
            }
            if !gb.is_empty() {
                // d(a*b)/db = sum(g*a); d(a/b)/db = -sum(g*a) / b^2.
                let s = dot_lanes(gs, xs);
                gb[j] = if div { -s * 1.0 / (bv * bv) } else { s * 1.0 };
            }
        }
    }
}

/// `acc += g`, elementwise: a value read by several nodes collects their
/// gradients.
fn add_assign(acc: &mut [f32], g: &[f32]) {
    crate::kernels::wide(|| acc.iter_mut().zip(g).for_each(|(a, b)| *a += b))
}

/// `g = f(g, x, y)` over three equally long slices, reusing `g`.
#[inline]
fn in_place(mut g: Vec<f32>, x: &[f32], y: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> Vec<f32> {
    crate::kernels::wide(|| {
        for (g, (&x, &y)) in g.iter_mut().zip(x.iter().zip(y)) {
            *g = f(*g, x, y);
        }
    });
    g
}

/// `f(g, x, y)` over three equally long slices.
#[inline]
fn elementwise(g: &[f32], x: &[f32], y: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> Vec<f32> {
    crate::kernels::wide(|| {
        g.iter()
            .zip(x.iter().zip(y))
            .map(|(&g, (&x, &y))| f(g, x, y))
            .collect()
    })
}

/// `c[m x n] = a[m x k] * b[k x n]`. A row-major `a` (a gradient, a few
/// images' rows) is packed for the runtime's own kernel, which is faster
/// than the general one on AVX-512 CPUs (VGG-16's classifier gradients).
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [f32],
    node: &Node,
) -> Result<()> {
    let fits = if a.cs == 1 && a.rs == k && a.data.len() >= m * k {
        let packed = PackedA::new(Arc::new(a.data[..m * k].to_vec()), m, k);
        let epi = Epilogue {
            bias: &vec![0.0; m],
            res: None,
            act: Activation::None,
        };
        gemm_packed(&packed, b, n, c, n, epi, 1)
    } else {
        sgemm(m, n, k, a, b, c, n, false, 1)
    };
    if fits {
        Ok(())
    } else {
        Err(node_err(node, "operand sizes do not fit"))
    }
}

/// Row-major strides of `inp` read at the positions of `out` (0 along
/// broadcast axes), right-aligned as ONNX broadcasting aligns shapes.
fn bstrides(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let r = out.len();
    let mut s = vec![0; r];
    let mut stride = 1;
    for (k, &d) in inp.iter().enumerate().rev() {
        let pos = r - (inp.len() - k);
        s[pos] = if d == 1 { 0 } else { stride };
        stride *= d;
    }
    s
}

/// Calls `f(out_index, a_offset, b_offset)` for every element of `out`.
fn for_each_bcast(
    out: &[usize],
    sa: &[usize],
    sb: &[usize],
    mut f: impl FnMut(usize, usize, usize),
) {
    let total: usize = out.iter().product();
    if total == 0 {
        return;
    }
    let r = out.len();
    if r == 0 {
        f(0, 0, 0);
        return;
    }
    let last = out[r - 1];
    let (la, lb) = (sa[r - 1], sb[r - 1]);
    let mut idx = vec![0usize; r];
    let (mut oa, mut ob) = (0usize, 0usize);
    let mut o = 0;
    while o < total {
        for j in 0..last {
            f(o + j, oa + j * la, ob + j * lb);
        }
        o += last;
        // Odometer over the leading axes.
        let mut d = r - 1;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            oa += sa[d];
            ob += sb[d];
            if idx[d] < out[d] {
                break;
            }
            oa -= sa[d] * out[d];
            ob -= sb[d] * out[d];
            idx[d] = 0;
        }
    }
}

/// `small`'s shape with ones in front to `out`'s rank (`None` if longer).
fn right_aligned(out: &[usize], small: &[usize]) -> Option<Vec<usize>> {
    let lead = out.len().checked_sub(small.len())?;
    Some(
        std::iter::repeat_n(1, lead)
            .chain(small.iter().copied())
            .collect(),
    )
}

/// With `small` right-aligned against `out`: the block size when `small`
/// equals `out`'s leading axes followed by ones (each of its values covers
/// one contiguous block of `out`).
fn trailing_broadcast(out: &[usize], small: &[usize]) -> Option<usize> {
    let padded = right_aligned(out, small)?;
    let k = padded.iter().rposition(|&d| d != 1).map_or(0, |p| p + 1);
    let (inner, outer): (usize, usize) = (out[k..].iter().product(), out[..k].iter().product());
    (padded[..k] == out[..k] && inner > 1 && outer == small.iter().product::<usize>())
        .then_some(inner)
}

/// With `small` right-aligned against `out`: its length when `small` is
/// ones followed by `out`'s trailing axes (it repeats along the leading
/// axes: a per-channel constant `[1, C, 1, 1]` on `[N, C, 1, 1]`), so
/// that element `o` of `out` reads element `o % len` of `small`.
fn leading_broadcast(out: &[usize], small: &[usize]) -> Option<usize> {
    let padded = right_aligned(out, small)?;
    let k = padded.iter().position(|&d| d != 1).unwrap_or(out.len());
    let (repeats, len): (usize, usize) = (out[..k].iter().product(), out[k..].iter().product());
    (padded[k..] == out[k..] && repeats > 1 && len > 0).then_some(len)
}

crate::kernels::multiversion! {
    /// Gradients of `x * b` or `x / b` (`div`) where `b` repeats every
    /// `b.len()` values of `x` ([`leading_broadcast`]): the general path's
    /// sums in its order (into `ga` and `gb` when not empty).
    fn periodic_grads(g: &[f32], x: &[f32], b: &[f32], div: bool, ga: &mut [f32], gb: &mut [f32]) {
        let p = b.len();
        for (c, (gs, xs)) in g.chunks_exact(p).zip(x.chunks_exact(p)).enumerate() {
            if !ga.is_empty() {
                let d = &mut ga[c * p..][..p];
                if div {
                    for ((d, &gv), &bv) in d.iter_mut().zip(gs).zip(b) {
                        *d += gv / bv;
                    }
                } else {
                    for ((d, &gv), &bv) in d.iter_mut().zip(gs).zip(b) {
                        *d += gv * bv;
                    }
                }
            }
            if !gb.is_empty() {
                if div {
                    for (((s, &gv), &xv), &bv) in gb.iter_mut().zip(gs).zip(xs).zip(b) {
                        *s += -gv * xv / (bv * bv);
                    }
                } else {
                    for ((s, &gv), &xv) in gb.iter_mut().zip(gs).zip(xs) {
                        *s += gv * xv;
                    }
                }
            }
        }
    }
}

/// Sums `g` (shaped `out`) down to the broadcast input shape `inp`.
fn unbroadcast(g: &[f32], out: &[usize], inp: &[usize]) -> Vec<f32> {
    let n: usize = inp.iter().product();
    if n == g.len() {
        return g.to_vec();
    }
    let mut r = vec![0.0; n];
    let s = bstrides(out, inp);
    for_each_bcast(out, &s, &s, |o, a, _| r[a] += g[o]);
    r
}

/// Gradients of both operands of an elementwise Add/Sub/Mul/Div.
fn binary_grad(
    op: &Op,
    a: Value<'_>,
    b: Value<'_>,
    out: &[usize],
    g: &[f32],
    need_a: bool,
    need_b: bool,
) -> OperandGrads {
    let same = a.data.len() == g.len() && b.data.len() == g.len();
    match op {
        Op::Add | Op::Sub => {
            let ga = need_a.then(|| unbroadcast(g, out, a.shape));
            let gb = need_b.then(|| {
                let mut v = unbroadcast(g, out, b.shape);
                if matches!(op, Op::Sub) {
                    v.iter_mut().for_each(|x| *x = -*x);
                }
                v
            });
            (ga, gb)
        }
        _ => {
            let div = matches!(op, Op::Div);
            // d(a*b) = (g*b, g*a); d(a/b) = (g/b, -g*a/b^2).
            let da = |g: f32, _a: f32, b: f32| if div { g / b } else { g * b };
            let db = |g: f32, a: f32, b: f32| if div { -g * a / (b * b) } else { g * a };
            if same {
                // Separate loops per operator, so each vectorizes.
                let ga = need_a.then(|| {
                    if div {
                        elementwise(g, a.data, b.data, |g, _, y| g / y)
                    } else {
                        elementwise(g, a.data, b.data, |g, _, y| g * y)
                    }
                });
                let gb = need_b.then(|| {
                    if div {
                        elementwise(g, a.data, b.data, |g, x, y| -g * x / (y * y))
                    } else {
                        elementwise(g, a.data, b.data, |g, x, _| g * x)
                    }
                });
                return (ga, gb);
            }
            // A product is symmetric: a gate on the left (`scale * x`, as
            // torchvision's squeeze-and-excitation writes it) takes the
            // path below with the operands swapped.
            if matches!(op, Op::Mul)
                && b.data.len() == g.len()
                && a.data.len() != g.len()
                && (trailing_broadcast(out, a.shape).is_some()
                    || leading_broadcast(out, a.shape).is_some())
            {
                let (gb, ga) = binary_grad(op, b, a, out, g, need_b, need_a);
                return (ga, gb);
            }
            // One operand constant over trailing axes (a gate [N, C, 1, 1]
            // on [N, C, H, W]): per block, a scaled copy and a dot product.
            if a.data.len() == g.len() {
                if let Some(inner) = trailing_broadcast(out, b.shape) {
                    let mut ga = need_a.then(|| vec![0.0f32; g.len()]);
                    let mut gb = need_b.then(|| vec![0.0f32; b.data.len()]);
                    gate_grads(
                        g,
                        a.data,
                        b.data,
                        inner,
                        div,
                        ga.as_deref_mut().unwrap_or_default(),
                        gb.as_deref_mut().unwrap_or_default(),
                    );
                    return (ga, gb);
                }
                // One operand repeating along leading axes (a per-channel
                // constant on a gate, as smoothing writes it).
                if leading_broadcast(out, b.shape) == Some(b.data.len()) {
                    let mut ga = need_a.then(|| vec![0.0f32; g.len()]);
                    let mut gb = need_b.then(|| vec![0.0f32; b.data.len()]);
                    periodic_grads(
                        g,
                        a.data,
                        b.data,
                        div,
                        ga.as_deref_mut().unwrap_or_default(),
                        gb.as_deref_mut().unwrap_or_default(),
                    );
                    return (ga, gb);
                }
            }
            let (sa, sb) = (bstrides(out, a.shape), bstrides(out, b.shape));
            let mut ga = need_a.then(|| vec![0.0f32; a.data.len()]);
            let mut gb = need_b.then(|| vec![0.0f32; b.data.len()]);
            for_each_bcast(out, &sa, &sb, |o, ia, ib| {
                let (x, y) = (a.data[ia], b.data[ib]);
                if let Some(ga) = ga.as_mut() {
                    ga[ia] += da(g[o], x, y);
                }
                if let Some(gb) = gb.as_mut() {
                    gb[ib] += db(g[o], x, y);
                }
            });
            (ga, gb)
        }
    }
}

/// MaxPool: each output's gradient is added, in `gx`, at its window's
/// (first) maximum, the one the forward kernel picks. Each output row's
/// and column's in-bounds taps are listed once, not per window; windows
/// wholly inside the plane of the common undilated square pools (ResNet's
/// 3x3 of stride 2, VGG's 2x2) take fixed-offset loops.
fn maxpool_grad(p: &Pool2d, x: &[f32], g: &[f32], gx: &mut [f32]) {
    let (ip, op) = (p.ih * p.iw, p.oh * p.ow);
    if ip == 0 || op == 0 {
        return;
    }
    // As in the forward kernel: only where every window lies inside the
    // plane (not a last window cut by ceil_mode or end padding).
    if (p.k, p.stride, p.dilation, p.pad) == ((2, 2), (2, 2), (1, 1), (0, 0))
        && 2 * p.oh <= p.ih
        && 2 * p.ow <= p.iw
    {
        maxpool2_grad(p, x, g, gx);
        return;
    }
    if (p.k, p.stride, p.dilation) == ((3, 3), (2, 2), (1, 1)) {
        maxpool3s2_grad(p, x, g, gx);
        return;
    }
    let taps = |out: usize, stride: usize, pad: usize, k: usize, d: usize, len: usize| {
        (0..out)
            .map(|o| {
                (0..k)
                    .filter_map(|t| (o * stride + t * d).checked_sub(pad).filter(|&i| i < len))
                    .collect::<Vec<usize>>()
            })
            .collect::<Vec<_>>()
    };
    let rows = taps(p.oh, p.stride.0, p.pad.0, p.k.0, p.dilation.0, p.ih);
    let cols = taps(p.ow, p.stride.1, p.pad.1, p.k.1, p.dilation.1, p.iw);
    // Outputs whose whole window lies inside the plane along one axis: a
    // contiguous range, since windows move forward with the output.
    let inside = |lists: &[Vec<usize>], k: usize| {
        let full = |o: &usize| lists[*o].len() == k;
        let lo = (0..lists.len()).find(full).unwrap_or(lists.len());
        let hi = (lo..lists.len()).find(|o| !full(o)).unwrap_or(lists.len());
        (lo, hi)
    };
    // Undilated 2x2 and 3x3 windows: those wholly inside the plane take
    // a loop of fixed offsets.
    let fixed = match (p.k, p.dilation) {
        ((k, l), (1, 1)) if k == l && (k == 2 || k == 3) => Some(k),
        _ => None,
    };
    let (ylo, yhi) = inside(&rows, p.k.0);
    let (xlo, xhi) = inside(&cols, p.k.1);
    for ((xs, gs), gxs) in x
        .chunks_exact(ip)
        .zip(g.chunks_exact(op))
        .zip(gx.chunks_exact_mut(ip))
    {
        for (oy, ys) in rows.iter().enumerate() {
            let Some((&y0, ys)) = ys.split_first() else {
                continue;
            };
            let grow = &gs[oy * p.ow..][..p.ow];
            // The best tap of output `ox`'s window, from the tap lists.
            let listed = |ox: usize| {
                let xcols = &cols[ox];
                let (&x0, xrest) = xcols.split_first()?;
                // Selects, not branches: which tap wins is data-dependent
                // and mispredicted branches cost more than the compares.
                let mut best = y0 * p.iw + x0;
                let mut kb = pool_key(xs[best]);
                let mut take = |pos: usize| {
                    let k = pool_key(xs[pos]);
                    let t = k > kb || k == u32::MAX;
                    best = std::hint::select_unpredictable(t, pos, best);
                    kb = std::hint::select_unpredictable(t, k, kb);
                };
                xrest.iter().for_each(|&ix| take(y0 * p.iw + ix));
                for &iy in ys {
                    xcols.iter().for_each(|&ix| take(iy * p.iw + ix));
                }
                Some(best)
            };
            let (lo, hi) = match fixed {
                Some(_) if (ylo..yhi).contains(&oy) => (xlo, xhi),
                _ => (p.ow, p.ow),
            };
            for ox in 0..p.ow {
                let best = if (lo..hi).contains(&ox) {
                    // The window's top-left tap is (y0, cols[ox][0]).
                    let at = y0 * p.iw + cols[ox][0];
                    Some(match fixed {
                        Some(2) => window_best::<2>(xs, p.iw, at),
                        _ => window_best::<3>(xs, p.iw, at),
                    })
                } else {
                    listed(ox)
                };
                if let Some(b) = best {
                    gxs[b] += grow[ox];
                }
            }
        }
    }
}

/// 3x3 windows of stride 2 (torchvision ResNets' stem pool). Each plane's
/// [`pool_key`]s go into a padded plane whose padding keeps key 0, below
/// every number's key, so that every window, at the edges too, is nine
/// fixed offsets; the plane is kept as its even and its odd columns, so
/// that a row of windows reads each of its taps at unit stride and its
/// best taps are one pass the compiler vectorizes ([`best3s2_row`]). The
/// gradients are then added in output order, as in [`maxpool_grad`]'s
/// general path (which took 0.45 ms for the ResNet-50 fixture's pool of
/// 32 images, this path 0.15 ms).
fn maxpool3s2_grad(p: &Pool2d, x: &[f32], g: &[f32], gx: &mut [f32]) {
    let (ip, op) = (p.ih * p.iw, p.oh * p.ow);
    let (pt, pl) = p.pad;
    // Covers every window, those cut by ceil_mode or end padding included.
    let ph = (2 * (p.oh - 1) + 3).max(pt + p.ih);
    let pw = (2 * (p.ow - 1) + 3).max(pl + p.iw);
    // Even columns (0, 2, ...) and odd ones, row after row, wide enough for
    // whole groups of eight windows (the extra windows' keys stay 0).
    let groups = p.ow.div_ceil(8) * 8;
    let (we, wo) = (pw.div_ceil(2).max(groups + 1), (pw / 2).max(groups));
    let mut even = vec![0u32; ph * we];
    let mut odd = vec![0u32; ph * wo];
    let mut best = vec![0u32; groups];
    for ((xs, gs), gxs) in x
        .chunks_exact(ip)
        .zip(g.chunks_exact(op))
        .zip(gx.chunks_exact_mut(ip))
    {
        // Only the plane's own positions are written: the padding stays 0.
        for (iy, row) in xs.chunks_exact(p.iw).enumerate() {
            let (e, o) = (
                &mut even[(iy + pt) * we..][..we],
                &mut odd[(iy + pt) * wo..][..wo],
            );
            // Column pl + i: the row's first element lands in the even
            // columns when pl is even.
            match pl % 2 {
                0 => split_keys(row, &mut e[pl / 2..], &mut o[pl / 2..]),
                _ => split_keys(row, &mut o[pl / 2..], &mut e[pl.div_ceil(2)..]),
            }
        }
        for (oy, grow) in gs.chunks_exact(p.ow).enumerate() {
            let e = |ky: usize| &even[(2 * oy + ky) * we..][..we];
            let o = |ky: usize| &odd[(2 * oy + ky) * wo..][..wo];
            best3s2_row([e(0), e(1), e(2)], [o(0), o(1), o(2)], &mut best);
            for (ox, (&t, &gv)) in best.iter().zip(grow).enumerate() {
                // u32::MAX: a window of padding alone (past a ceil_mode edge).
                if t != u32::MAX {
                    let (ky, kx) = (t as usize / 3, t as usize % 3);
                    gxs[(2 * oy + ky - pt) * p.iw + (2 * ox + kx - pl)] += gv;
                }
            }
        }
    }
}

crate::kernels::multiversion! {
    /// `a` takes the keys of `xs`'s even elements, `b` those of its odd
    /// ones ([`pool_key`]), as far as each is long enough.
    fn split_keys(xs: &[f32], a: &mut [u32], b: &mut [u32]) {
        for ((pair, ka), kb) in xs.chunks_exact(2).zip(a.iter_mut()).zip(b.iter_mut()) {
            *ka = pool_key(pair[0]);
            *kb = pool_key(pair[1]);
        }
        if let ([.., last], true) = (xs, xs.len() % 2 == 1) {
            if let Some(k) = a.get_mut(xs.len() / 2) {
                *k = pool_key(*last);
            }
        }
    }
}

crate::kernels::multiversion! {
    /// For a row of 3x3 windows of stride 2 over three key rows, given as
    /// their even columns `e` (each at least `best.len() + 1` long) and odd
    /// ones `o` (at least `best.len()`; `best.len()` a multiple of 8),
    /// each window's best tap 0..9
    /// (row-major; a later tap takes over when its key is larger or NaN's,
    /// as [`window_best`] chooses), or `u32::MAX` where all nine are
    /// padding (key 0).
    fn best3s2_row(e: [&[u32]; 3], o: [&[u32]; 3], best: &mut [u32]) {
        // Groups of eight windows, each step over fixed-size arrays: the
        // rows are short (8 windows on the ResNet-50 fixture), too short
        // for a loop vectorized at the full vector width.
        const L: usize = 8;
        // One vector load each (the rows are long enough: see above).
        let load = |r: &[u32], at: usize| -> [u32; L] {
            <[u32; L]>::try_from(&r[at..at + L]).unwrap_or([0; L])
        };
        for (gi, b) in best.chunks_exact_mut(L).enumerate() {
            let i = gi * L;
            let (mut kb, mut t) = (load(e[0], i), [0u32; L]);
            let taps = [
                (load(o[0], i), 1u32),
                (load(e[0], i + 1), 2),
                (load(e[1], i), 3),
                (load(o[1], i), 4),
                (load(e[1], i + 1), 5),
                (load(e[2], i), 6),
                (load(o[2], i), 7),
                (load(e[2], i + 1), 8),
            ];
            for (k, tap) in taps {
                for l in 0..L {
                    let w = k[l] > kb[l] || k[l] == u32::MAX;
                    kb[l] = if w { k[l] } else { kb[l] };
                    t[l] = if w { tap } else { t[l] };
                }
            }
            for l in 0..L {
                b[l] = if kb[l] == 0 { u32::MAX } else { t[l] };
            }
        }
    }
}

/// The position in `xs` of the best tap (the first maximum, or the last
/// NaN, as in [`maxpool_grad`]) of the undilated `K x K` window whose
/// top-left tap is at `at`, all of it inside planes `iw` wide.
#[inline]
fn window_best<const K: usize>(xs: &[f32], iw: usize, at: usize) -> usize {
    let win = &xs[at..at + (K - 1) * iw + K];
    let (mut best, mut kb) = (0, pool_key(win[0]));
    for ky in 0..K {
        for kx in 0..K {
            let pos = ky * iw + kx;
            let k = pool_key(win[pos]);
            let t = k > kb || k == u32::MAX;
            best = std::hint::select_unpredictable(t, pos, best);
            kb = std::hint::select_unpredictable(t, k, kb);
        }
    }
    at + best
}

/// An order-preserving integer image of `v` for the pool gradient's
/// search: `key(a) > key(b)` exactly when `a > b` for numbers (the two
/// zeros equal), and NaN maps above every number. On integers the selects
/// compile to conditional moves; on floats they compiled to branches that
/// the data mispredicts (the ResNet-50 fixture's pool gradient, 32 images:
/// 0.9 ms, against 0.5-0.6 ms).
#[inline(always)]
fn pool_key(v: f32) -> u32 {
    let b = if v == 0.0 { 0 } else { v.to_bits() };
    let k = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    if v.is_nan() {
        u32::MAX
    } else {
        k
    }
}

/// [`maxpool_grad`] for 2x2 windows of stride 2 without padding, all
/// inside the plane (VGG's pools): the windows do not overlap, so each row
/// pair is one pass ([`maxpool2_row`]) with no data-dependent addresses.
fn maxpool2_grad(p: &Pool2d, x: &[f32], g: &[f32], gx: &mut [f32]) {
    let (iw, ip, op, ow) = (p.iw, p.ih * p.iw, p.oh * p.ow, p.ow);
    for ((xs, gs), gxs) in x
        .chunks_exact(ip)
        .zip(g.chunks_exact(op))
        .zip(gx.chunks_exact_mut(ip))
    {
        for (oy, grow) in gs.chunks_exact(ow).enumerate() {
            let top = &xs[2 * oy * iw..][..2 * ow];
            let bottom = &xs[(2 * oy + 1) * iw..][..2 * ow];
            let (gtop, gbottom) = gxs[2 * oy * iw..].split_at_mut(iw);
            maxpool2_row(
                top,
                bottom,
                grow,
                &mut gtop[..2 * ow],
                &mut gbottom[..2 * ow],
            );
        }
    }
}

crate::kernels::multiversion! {
    /// One row of 2x2 windows: adds each window's gradient `grow[o]` at
    /// its best tap among `top[2o]`, `top[2o + 1]`, `bottom[2o]`,
    /// `bottom[2o + 1]` (in that order; a later tap wins when larger or
    /// NaN, as in [`maxpool_grad`]) and zero at the others, so that every
    /// lane does the same work and the loop vectorizes.
    fn maxpool2_row(top: &[f32], bottom: &[f32], grow: &[f32], gtop: &mut [f32], gbottom: &mut [f32]) {
        for ((((t, b), gt), gb), &gv) in top
            .chunks_exact(2)
            .zip(bottom.chunks_exact(2))
            .zip(gtop.chunks_exact_mut(2))
            .zip(gbottom.chunks_exact_mut(2))
            .zip(grow)
        {
            let w1 = t[1] > t[0] || t[1].is_nan();
            let v1 = if w1 { t[1] } else { t[0] };
            let w2 = b[0] > v1 || b[0].is_nan();
            let v2 = if w2 { b[0] } else { v1 };
            let w3 = b[1] > v2 || b[1].is_nan();
            // The last tap that took over wins.
            let (s3, s2) = (w3, w2 && !w3);
            let s1 = w1 && !w2 && !w3;
            let s0 = !(w1 || w2 || w3);
            let at = |s: bool| if s { gv } else { 0.0 };
            gt[0] += at(s0);
            gt[1] += at(s1);
            gb[0] += at(s2);
            gb[1] += at(s3);
        }
    }
}

/// AveragePool: each output's gradient spread evenly over what it averaged,
/// with the forward kernel's divisor.
fn avgpool_grad(p: &Pool2d, g: &[f32], gx: &mut [f32]) {
    let (ip, op) = (p.ih * p.iw, p.oh * p.ow);
    for (gs, gxs) in g.chunks_exact(op).zip(gx.chunks_exact_mut(ip)) {
        for oy in 0..p.oh {
            for ox in 0..p.ow {
                let inside = p.taps(oy, ox).count();
                let v = gs[oy * p.ow + ox] / p.divisor(oy, ox, inside) as f32;
                for (iy, ix) in p.taps(oy, ox) {
                    gxs[iy * p.iw + ix] += v;
                }
            }
        }
    }
}

impl ConvGeom {
    fn fits(&self, w: &[f32], g: &[f32], gx: &[f32]) -> bool {
        self.group > 0
            && self.cin.is_multiple_of(self.group)
            && self.cout.is_multiple_of(self.group)
            && w.len() == self.cout * self.cin / self.group * self.kh * self.kw
            && g.len() == self.n * self.cout * self.oh * self.ow
            && gx.len() == self.n * self.cin * self.ih * self.iw
    }

    /// Output columns `[lo, hi)` whose tap `kx` lands inside the input row.
    fn ox_range(&self, kx: usize) -> (usize, usize) {
        range(
            self.iw,
            self.ow,
            self.stride.1,
            kx * self.dilation.1,
            self.pad.1,
        )
    }

    /// Output rows whose tap `ky` lands inside the input.
    fn oy_range(&self, ky: usize) -> (usize, usize) {
        range(
            self.ih,
            self.oh,
            self.stride.0,
            ky * self.dilation.0,
            self.pad.0,
        )
    }
}

/// Outputs `o` in `[lo, hi)` with `0 <= o * stride + off - pad < input`.
fn range(input: usize, out: usize, stride: usize, off: usize, pad: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(off).div_ceil(stride);
    let hi = if input + pad > off {
        ((input + pad - off - 1) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// The gradient of a convolution's input: `gx = conv_transpose(g, w)`,
/// overwriting `gx`. Depthwise convolutions run a direct kernel, others a
/// GEMM with the transposed weights and a col2im scatter. Does nothing when
/// the buffer sizes do not fit `geom`.
pub fn conv_input_grad(geom: &ConvGeom, w: &[f32], g: &[f32], gx: &mut [f32]) {
    if !geom.fits(w, g, gx) {
        return;
    }
    gx.fill(0.0);
    let c = geom;
    let (cin_g, cout_g) = (c.cin / c.group, c.cout / c.group);
    let (ip, op) = (c.ih * c.iw, c.oh * c.ow);
    if cin_g == 1 && cout_g == 1 && (c.ow < 16 || c.stride.1 != 1) {
        depthwise_nhwc(c, w, g, gx);
        return;
    }
    if cin_g == 1 && cout_g == 1 {
        // Depthwise: every tap is a shifted axpy over output rows.
        for img in 0..c.n {
            for ch in 0..c.cin {
                let gp = &g[(img * c.cout + ch) * op..][..op];
                let xp = &mut gx[(img * c.cin + ch) * ip..][..ip];
                let wk = &w[ch * c.kh * c.kw..][..c.kh * c.kw];
                for ky in 0..c.kh {
                    let (ylo, yhi) = c.oy_range(ky);
                    for kx in 0..c.kw {
                        let wv = wk[ky * c.kw + kx];
                        let (xlo, xhi) = c.ox_range(kx);
                        if xlo >= xhi {
                            continue;
                        }
                        for oy in ylo..yhi {
                            let iy = oy * c.stride.0 + ky * c.dilation.0 - c.pad.0;
                            let grow = &gp[oy * c.ow..][..c.ow];
                            let xrow = &mut xp[iy * c.iw..][..c.iw];
                            let ix0 = kx * c.dilation.1;
                            if c.stride.1 == 1 {
                                let s = xlo + ix0 - c.pad.1;
                                for (d, &gv) in
                                    xrow[s..s + (xhi - xlo)].iter_mut().zip(&grow[xlo..xhi])
                                {
                                    *d += wv * gv;
                                }
                            } else {
                                for ox in xlo..xhi {
                                    xrow[ox * c.stride.1 + ix0 - c.pad.1] += wv * grow[ox];
                                }
                            }
                        }
                    }
                }
            }
        }
        return;
    }
    let k = cin_g * c.kh * c.kw;
    let pointwise = c.kh == 1
        && c.kw == 1
        && c.stride == (1, 1)
        && c.pad == (0, 0)
        && (c.oh, c.ow) == (c.ih, c.iw);
    // Small planes: one GEMM over the whole batch (better shaped).
    let batched = op < 256 && c.n > 1;
    let cols_len = if batched { k * c.n * op } else { k * op };
    let mut cols = if pointwise && !batched {
        Vec::new()
    } else {
        vec![0.0f32; cols_len]
    };
    let mut gt = if batched {
        vec![0.0f32; cout_g * c.n * op]
    } else {
        Vec::new()
    };
    for grp in 0..c.group {
        let wg = &w[grp * cout_g * k..][..cout_g * k];
        // W_g^T viewed as [k, cout_g].
        let wt = Mat::transposed(wg, k);
        if batched {
            let np = c.n * op;
            for img in 0..c.n {
                for co in 0..cout_g {
                    let src = &g[(img * c.cout + grp * cout_g + co) * op..][..op];
                    gt[co * np + img * op..][..op].copy_from_slice(src);
                }
            }
            sgemm(
                k,
                np,
                cout_g,
                wt,
                Mat::row_major(&gt, np),
                &mut cols,
                np,
                false,
                1,
            );
            for img in 0..c.n {
                let xg = &mut gx[(img * c.cin + grp * cin_g) * ip..][..cin_g * ip];
                col2im(c, &cols, np, img * op, xg);
            }
        } else {
            for img in 0..c.n {
                let gg = &g[(img * c.cout + grp * cout_g) * op..][..cout_g * op];
                let xg = &mut gx[(img * c.cin + grp * cin_g) * ip..][..cin_g * ip];
                if pointwise {
                    sgemm(k, op, cout_g, wt, Mat::row_major(gg, op), xg, op, false, 1);
                } else {
                    sgemm(
                        k,
                        op,
                        cout_g,
                        wt,
                        Mat::row_major(gg, op),
                        &mut cols,
                        op,
                        false,
                        1,
                    );
                    col2im(c, &cols, op, 0, xg);
                }
            }
        }
    }
}

/// The taps of one kernel axis that reach input positions `phase`,
/// `phase + stride`, ... in a convolution's input gradient, and how they
/// read the output gradient there: `(taps, dilation, pad)` such that the
/// gradient at input position `phase + stride * a` is
/// `sum_t w[taps[t]] * g[a + t * dilation - pad]` (taps listed from the
/// last kernel position to the first). `None` when that would need
/// negative padding; an empty list when no tap reaches the phase.
fn phase_taps(
    k: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    phase: usize,
) -> Option<(Vec<usize>, usize, usize)> {
    // Tap `kt` reaches input `phase + stride * a` from output
    // `a + (phase + pad - kt * dilation) / stride` when that divides.
    let reach = |kt: usize| (phase + pad).checked_sub(kt * dilation);
    let taps: Vec<usize> = (0..k)
        .rev()
        .filter(|&kt| {
            let off = (phase + pad) as isize - (kt * dilation) as isize;
            off.rem_euclid(stride as isize) == 0
        })
        .collect();
    let Some(&last) = taps.first() else {
        return Some((taps, 1, 0));
    };
    // The last kernel position reads the earliest output; it must not
    // lie past the phase's own position (negative padding).
    if reach(last).is_some_and(|r| r > 0) {
        return None;
    }
    let pad = (last * dilation - pad - phase) / stride;
    let step = match taps.get(1) {
        Some(&next) => (last - next) * dilation / stride,
        None => 1,
    };
    Some((taps, step, pad))
}

/// One phase of [`InputGrad`]: the forward convolution that gives the
/// input gradient at rows `py, py + sy, ...` and columns `px, px + sx, ...`,
/// or `None` where no tap reaches them (the gradient there is zero).
#[derive(Debug)]
struct Phase {
    at: (usize, usize),
    conv: Option<Conv2d>,
}

/// A convolution's input gradient as forward convolutions of the output
/// gradient, so that it runs on the forward kernels (packed GEMM,
/// whole-batch GEMMs on small planes, taps that only see padding dropped)
/// without a GEMM into columns and a col2im scatter. For stride 1 it is one
/// convolution, `gx = conv(g, W')` with `W'[ci, co, ky, kx] = W[co, ci,
/// kh-1-ky, kw-1-kx]` within each group and top/left padding
/// `dilation * (k - 1) - pad`. A strided convolution's gradient splits by
/// input position modulo the stride into `sy * sx` phases, each a stride-1
/// convolution with the taps that reach it, whose output
/// is spread to its positions.
#[derive(Debug)]
pub struct InputGrad {
    geom: ConvGeom,
    phases: Vec<Phase>,
}

impl InputGrad {
    /// `None` where a phase would need negative padding (padding larger
    /// than the dilated kernel), when `w` does not fit `geom`, and for
    /// depthwise convolutions, whose direct input-gradient kernels
    /// [`conv_input_grad`] runs measured faster (EfficientNet-B0's backward
    /// pass 0.44-0.46 s against 0.51-0.53 s through the forward kernel).
    /// `many_images`: kernels chosen as for
    /// [`SessionOptions::many_images`](crate::SessionOptions::many_images),
    /// for batches run on one thread.
    pub fn new(geom: &ConvGeom, w: &[f32], many_images: bool) -> Option<Self> {
        let c = geom;
        if c.group == 0
            || c.stride.0 == 0
            || c.stride.1 == 0
            || !c.cin.is_multiple_of(c.group)
            || !c.cout.is_multiple_of(c.group)
            || w.len() != c.cout * c.cin / c.group * c.kh * c.kw
            || (c.cin == c.group && c.cout == c.group)
        {
            return None;
        }
        let mut phases = Vec::with_capacity(c.stride.0 * c.stride.1);
        for py in 0..c.stride.0.min(c.ih) {
            let rows = phase_taps(c.kh, c.stride.0, c.dilation.0, c.pad.0, py)?;
            for px in 0..c.stride.1.min(c.iw) {
                let cols = phase_taps(c.kw, c.stride.1, c.dilation.1, c.pad.1, px)?;
                let conv = (!rows.0.is_empty() && !cols.0.is_empty())
                    .then(|| phase_conv(c, w, (py, px), &rows, &cols, many_images));
                phases.push(Phase { at: (py, px), conv });
            }
        }
        Some(Self {
            geom: *geom,
            phases,
        })
    }

    /// The scratch [`InputGrad::run`] needs.
    pub fn scratch_len(&self) -> usize {
        self.phases
            .iter()
            .filter_map(|p| p.conv.as_ref())
            .map(Conv2d::scratch_len)
            .max()
            .unwrap_or(0)
    }

    /// Writes the input gradient of output gradient `g` into `gx` (both
    /// sized for the geometry it was made for), on this thread.
    pub fn run(&self, g: &[f32], gx: &mut [f32], scratch: &mut [f32]) {
        let c = &self.geom;
        if c.stride == (1, 1) {
            if let Some(conv) = self.phases.first().and_then(|p| p.conv.as_ref()) {
                conv.run(g, gx, scratch, 1);
                return;
            }
        }
        gx.fill(0.0);
        let mut out = Vec::new();
        for phase in &self.phases {
            let Some(conv) = &phase.conv else { continue };
            let (oh, ow) = (conv.geom.oh, conv.geom.ow);
            out.resize(c.n * c.cin * oh * ow, 0.0);
            conv.run(g, &mut out, scratch, 1);
            let (py, px) = phase.at;
            for (plane, src) in gx
                .chunks_exact_mut(c.ih * c.iw)
                .zip(out.chunks_exact(oh * ow))
            {
                for (a, row) in src.chunks_exact(ow).enumerate() {
                    let dst = &mut plane[(py + a * c.stride.0) * c.iw..][..c.iw];
                    for (b, &v) in row.iter().enumerate() {
                        dst[px + b * c.stride.1] = v;
                    }
                }
            }
        }
    }
}

/// The stride-1 convolution of phase `at` of [`InputGrad`]: the output
/// gradient convolved with the transposed weights' `rows` x `cols` taps.
fn phase_conv(
    c: &ConvGeom,
    w: &[f32],
    at: (usize, usize),
    rows: &(Vec<usize>, usize, usize),
    cols: &(Vec<usize>, usize, usize),
    many_images: bool,
) -> Conv2d {
    let (cin_g, cout_g) = (c.cin / c.group, c.cout / c.group);
    let (kh, kw) = (rows.0.len(), cols.0.len());
    let mut wt = Vec::with_capacity(c.cin * cout_g * kh * kw);
    for grp in 0..c.group {
        for ci in 0..cin_g {
            for co in 0..cout_g {
                let src = &w[((grp * cout_g + co) * cin_g + ci) * c.kh * c.kw..][..c.kh * c.kw];
                for &ky in &rows.0 {
                    wt.extend(cols.0.iter().map(|&kx| src[ky * c.kw + kx]));
                }
            }
        }
    }
    let conv = Conv2d {
        geom: ConvGeom {
            n: c.n,
            cin: c.cout,
            ih: c.oh,
            iw: c.ow,
            cout: c.cin,
            group: c.group,
            kh,
            kw,
            stride: (1, 1),
            dilation: (rows.1, cols.1),
            pad: (rows.2, cols.2),
            oh: (c.ih - at.0).div_ceil(c.stride.0),
            ow: (c.iw - at.1).div_ceil(c.stride.1),
        },
        weight: Arc::new(wt),
        bias: vec![0.0; c.cin],
        act: Activation::None,
        packed: Vec::new(),
        int8: None,
        winograd: None,
    };
    conv.without_dead_taps().pack_for(many_images)
}

/// Depthwise input gradient channels-last, for narrow or strided rows:
/// each tap is an axpy across channels (vectorizes where rows would not).
fn depthwise_nhwc(c: &ConvGeom, w: &[f32], g: &[f32], gx: &mut [f32]) {
    let ch = c.cin;
    let (ip, op, taps) = (c.ih * c.iw, c.oh * c.ow, c.kh * c.kw);
    let mut wt = vec![0.0f32; taps * ch];
    for k in 0..ch {
        for t in 0..taps {
            wt[t * ch + k] = w[k * taps + t];
        }
    }
    let (mut gt, mut xt) = (vec![0.0f32; op * ch], vec![0.0f32; ip * ch]);
    for img in 0..c.n {
        crate::kernels::transpose(&g[img * ch * op..][..ch * op], ch, op, &mut gt);
        xt.fill(0.0);
        for ky in 0..c.kh {
            let (ylo, yhi) = c.oy_range(ky);
            for kx in 0..c.kw {
                let (xlo, xhi) = c.ox_range(kx);
                let wr = &wt[(ky * c.kw + kx) * ch..][..ch];
                for oy in ylo..yhi {
                    let iy = oy * c.stride.0 + ky * c.dilation.0 - c.pad.0;
                    for ox in xlo..xhi {
                        let ix = ox * c.stride.1 + kx * c.dilation.1 - c.pad.1;
                        let gr = &gt[(oy * c.ow + ox) * ch..][..ch];
                        let xr = &mut xt[(iy * c.iw + ix) * ch..][..ch];
                        for ((x, &wv), &gv) in xr.iter_mut().zip(wr).zip(gr) {
                            *x += wv * gv;
                        }
                    }
                }
            }
        }
        crate::kernels::transpose(&xt, ip, ch, &mut gx[img * ch * ip..][..ch * ip]);
    }
}

/// Adds `cols[(ci, ky, kx), off + (oy, ox)]` (row stride `ld`) into the
/// input-gradient planes `xg` of one image and group.
fn col2im(c: &ConvGeom, cols: &[f32], ld: usize, off: usize, xg: &mut [f32]) {
    let cin_g = c.cin / c.group;
    let ip = c.ih * c.iw;
    if c.kh == 1
        && c.kw == 1
        && c.stride == (1, 1)
        && c.pad == (0, 0)
        && (c.oh, c.ow) == (c.ih, c.iw)
    {
        // Pointwise: each row is one whole input plane.
        for ci in 0..cin_g {
            xg[ci * ip..][..ip].copy_from_slice(&cols[ci * ld + off..][..ip]);
        }
        return;
    }
    for ci in 0..cin_g {
        let xp = &mut xg[ci * ip..][..ip];
        for ky in 0..c.kh {
            let (ylo, yhi) = c.oy_range(ky);
            for kx in 0..c.kw {
                let row = &cols[((ci * c.kh + ky) * c.kw + kx) * ld + off..];
                let (xlo, xhi) = c.ox_range(kx);
                if xlo >= xhi {
                    continue;
                }
                let ix0 = kx * c.dilation.1;
                for oy in ylo..yhi {
                    let iy = oy * c.stride.0 + ky * c.dilation.0 - c.pad.0;
                    let xrow = &mut xp[iy * c.iw..][..c.iw];
                    let crow = &row[oy * c.ow..][..c.ow];
                    if c.stride.1 == 1 {
                        let s = xlo + ix0 - c.pad.1;
                        for (d, &v) in xrow[s..s + (xhi - xlo)].iter_mut().zip(&crow[xlo..xhi]) {
                            *d += v;
                        }
                    } else {
                        for ox in xlo..xhi {
                            xrow[ox * c.stride.1 + ix0 - c.pad.1] += crow[ox];
                        }
                    }
                }
            }
        }
    }
}

/// [`conv_input_grad`] as the plain seven-deep loop, for tests.
pub fn conv_input_grad_reference(geom: &ConvGeom, w: &[f32], g: &[f32], gx: &mut [f32]) {
    if !geom.fits(w, g, gx) {
        return;
    }
    gx.fill(0.0);
    let c = geom;
    let (cin_g, cout_g) = (c.cin / c.group, c.cout / c.group);
    for img in 0..c.n {
        for co in 0..c.cout {
            let grp = co / cout_g;
            for oy in 0..c.oh {
                for ox in 0..c.ow {
                    let gv = g[((img * c.cout + co) * c.oh + oy) * c.ow + ox];
                    for ci in 0..cin_g {
                        for ky in 0..c.kh {
                            for kx in 0..c.kw {
                                let iy = (oy * c.stride.0 + ky * c.dilation.0) as isize
                                    - c.pad.0 as isize;
                                let ix = (ox * c.stride.1 + kx * c.dilation.1) as isize
                                    - c.pad.1 as isize;
                                if iy < 0 || ix < 0 || iy as usize >= c.ih || ix as usize >= c.iw {
                                    continue;
                                }
                                let ch = grp * cin_g + ci;
                                let wv = w[((co * cin_g + ci) * c.kh + ky) * c.kw + kx];
                                gx[((img * c.cin + ch) * c.ih + iy as usize) * c.iw
                                    + ix as usize] += wv * gv;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The gradient of a convolution's weights, `gw[co, ci, ky, kx] = sum over
/// images and output positions of g[co] * x[ci] at the tap`, overwriting
/// `gw` (layout `[cout, cin / group, kh, kw]`). Grouped convolutions with
/// more than one input channel per group run as one GEMM per image and
/// group on the im2col matrix; depthwise ones as the direct loop, whose
/// products are few. Does nothing when the buffer sizes do not fit `geom`.
pub fn conv_weight_grad(geom: &ConvGeom, x: &[f32], g: &[f32], gw: &mut [f32]) {
    if !geom.fits(gw, g, x) {
        return;
    }
    let c = geom;
    let (cin_g, cout_g) = (c.cin / c.group, c.cout / c.group);
    if cin_g == 1 && cout_g == 1 {
        depthwise_weight_grad(geom, x, g, gw);
        return;
    }
    gw.fill(0.0);
    let (ip, op) = (c.ih * c.iw, c.oh * c.ow);
    let rows = cin_g * c.kh * c.kw;
    let mut cols = vec![0.0f32; rows * op];
    for img in 0..c.n {
        for grp in 0..c.group {
            let xg = &x[(img * c.cin + grp * cin_g) * ip..][..cin_g * ip];
            for (r, row) in cols.chunks_exact_mut(op).enumerate() {
                let (ci, ky, kx) = (r / (c.kh * c.kw), (r / c.kw) % c.kh, r % c.kw);
                im2col_tap(c, &xg[ci * ip..][..ip], ky, kx, row);
            }
            // gw_g [cout_g, rows] += g_g [cout_g, op] * cols^T [op, rows]
            let gg = &g[(img * c.cout + grp * cout_g) * op..][..cout_g * op];
            let out = &mut gw[grp * cout_g * rows..][..cout_g * rows];
            sgemm(
                cout_g,
                rows,
                op,
                Mat::row_major(gg, op),
                Mat::transposed(&cols, op),
                out,
                rows,
                true,
                1,
            );
        }
    }
}

/// [`conv_weight_grad`] of a depthwise convolution. With stride and
/// dilation 1, each channel's input is copied zero-padded to width
/// `W = iw + pads` and its gradient plane to the same width (zeros past
/// `ow`): tap `(ky, kx)` is then one long dot product of the gradient with
/// the padded input shifted by `ky * W + kx`, the zero columns keeping rows
/// apart, where a direct loop would run rows of a few values each. Other
/// geometries take the direct loop.
fn depthwise_weight_grad(c: &ConvGeom, x: &[f32], g: &[f32], gw: &mut [f32]) {
    if c.stride != (1, 1) || c.dilation != (1, 1) {
        conv_weight_grad_reference(c, x, g, gw);
        return;
    }
    gw.fill(0.0);
    let (ip, op, taps) = (c.ih * c.iw, c.oh * c.ow, c.kh * c.kw);
    // Padded width and height: every tap's window fits inside.
    let wp = c.ow + c.kw - 1;
    let hp = c.oh + c.kh - 1;
    let mut xpad = vec![0.0f32; hp * wp + c.kw];
    let mut gpad = vec![0.0f32; c.oh * wp];
    crate::kernels::wide(|| {
        for img in 0..c.n {
            for ch in 0..c.cout {
                let gp = &g[(img * c.cout + ch) * op..][..op];
                let xp = &x[(img * c.cin + ch) * ip..][..ip];
                // Input row iy lands at padded row iy + pad; columns past the
                // input (when the window does not reach them) stay zero.
                xpad.fill(0.0);
                for iy in 0..c.ih {
                    let py = iy + c.pad.0;
                    if py >= hp {
                        break;
                    }
                    let cols = c.iw.min(wp.saturating_sub(c.pad.1));
                    xpad[py * wp + c.pad.1..][..cols].copy_from_slice(&xp[iy * c.iw..][..cols]);
                }
                for (oy, dst) in gpad.chunks_exact_mut(wp).enumerate() {
                    dst[..c.ow].copy_from_slice(&gp[oy * c.ow..][..c.ow]);
                }
                let wk = &mut gw[ch * taps..][..taps];
                for (t, w) in wk.iter_mut().enumerate() {
                    let off = (t / c.kw) * wp + t % c.kw;
                    *w += dot_lanes(&gpad, &xpad[off..off + gpad.len()]);
                }
            }
        }
    });
}

/// One im2col row: tap `(ky, kx)` of input plane `plane` at every output
/// position, zero where the tap falls on padding.
fn im2col_tap(c: &ConvGeom, plane: &[f32], ky: usize, kx: usize, row: &mut [f32]) {
    row.fill(0.0);
    let (ylo, yhi) = c.oy_range(ky);
    let (xlo, xhi) = c.ox_range(kx);
    for oy in ylo..yhi {
        let iy = oy * c.stride.0 + ky * c.dilation.0 - c.pad.0;
        let src = &plane[iy * c.iw..][..c.iw];
        let dst = &mut row[oy * c.ow..][..c.ow];
        for ox in xlo..xhi {
            dst[ox] = src[ox * c.stride.1 + kx * c.dilation.1 - c.pad.1];
        }
    }
}

/// [`conv_weight_grad`] as the plain seven-deep loop: the reference its
/// GEMM and depthwise paths are tested against.
pub fn conv_weight_grad_reference(geom: &ConvGeom, x: &[f32], g: &[f32], gw: &mut [f32]) {
    if !geom.fits(gw, g, x) {
        return;
    }
    gw.fill(0.0);
    let c = geom;
    let (cin_g, cout_g) = (c.cin / c.group, c.cout / c.group);
    for img in 0..c.n {
        for co in 0..c.cout {
            let grp = co / cout_g;
            let gp = &g[(img * c.cout + co) * c.oh * c.ow..][..c.oh * c.ow];
            for ci in 0..cin_g {
                let xp = &x[(img * c.cin + grp * cin_g + ci) * c.ih * c.iw..][..c.ih * c.iw];
                for ky in 0..c.kh {
                    let (ylo, yhi) = c.oy_range(ky);
                    for kx in 0..c.kw {
                        let (xlo, xhi) = c.ox_range(kx);
                        let mut acc = 0.0f32;
                        for oy in ylo..yhi {
                            let iy = oy * c.stride.0 + ky * c.dilation.0 - c.pad.0;
                            for ox in xlo..xhi {
                                let ix = ox * c.stride.1 + kx * c.dilation.1 - c.pad.1;
                                acc += gp[oy * c.ow + ox] * xp[iy * c.iw + ix];
                            }
                        }
                        gw[((co * cin_g + ci) * c.kh + ky) * c.kw + kx] += acc;
                    }
                }
            }
        }
    }
}

/// The gradient of a per-channel bias on axis 1 of `g` (`[n, c, ...]`):
/// the sum over images and positions.
fn channel_sums(g: &[f32], n: usize, c: usize) -> Vec<f32> {
    let inner = g.len().checked_div(n * c).unwrap_or(0);
    let mut out = vec![0.0f32; c];
    for (k, chunk) in g.chunks_exact(inner.max(1)).enumerate().take(n * c) {
        out[k % c] += chunk.iter().sum::<f32>();
    }
    out
}

#[cfg(test)]
mod tests;

/// Gradients of a MatMul whose operands both carry batch dimensions
/// (attention's products), batch dimensions broadcast as numpy does:
/// `dA_i += g_i B_i^T`, `dB_i += A_i^T g_i` for every batch entry.
fn batched_matmul_grad(
    node: &Node,
    a: Value<'_>,
    b: Value<'_>,
    g: &[f32],
    need: &[bool],
) -> Result<OperandGrads> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    if b.shape[rb - 2] != k {
        return Err(node_err(node, "inner dimensions differ"));
    }
    let batch = shape::broadcast(node, &a.shape[..ra - 2], &b.shape[..rb - 2])?;
    let oa = crate::plan::matmul_batch_offsets(&batch, &a.shape[..ra - 2]);
    let ob = crate::plan::matmul_batch_offsets(&batch, &b.shape[..rb - 2]);
    if g.len() != oa.len() * m * n {
        return Err(node_err(node, "gradient and output sizes differ"));
    }
    let mut ga = need[0].then(|| vec![0.0; a.data.len()]);
    let mut gb = need
        .get(1)
        .copied()
        .unwrap_or(false)
        .then(|| vec![0.0; b.data.len()]);
    let mut tmp = vec![0.0; (m * k).max(k * n)];
    for (i, (&pa, &pb)) in oa.iter().zip(&ob).enumerate() {
        let gi = Mat::row_major(&g[i * m * n..(i + 1) * m * n], n);
        let ai = &a.data[pa * m * k..(pa + 1) * m * k];
        let bi = &b.data[pb * k * n..(pb + 1) * k * n];
        if let Some(ga) = ga.as_mut() {
            matmul(m, k, n, gi, Mat::transposed(bi, n), &mut tmp[..m * k], node)?;
            add_assign(&mut ga[pa * m * k..(pa + 1) * m * k], &tmp[..m * k]);
        }
        if let Some(gb) = gb.as_mut() {
            matmul(k, n, m, Mat::transposed(ai, k), gi, &mut tmp[..k * n], node)?;
            add_assign(&mut gb[pb * k * n..(pb + 1) * k * n], &tmp[..k * n]);
        }
    }
    Ok((ga, gb))
}

/// The input gradient of a Split from its outputs' (`None`: no gradient
/// reached that part).
fn split_grad(
    node: &Node,
    x: Value<'_>,
    parts: &[Option<Vec<f32>>],
    consts: &shape::Shapes,
) -> Result<Vec<f32>> {
    let (axis, sizes) = shape::split_sizes(node, consts, x.shape)?;
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let total = x.shape[axis] * inner;
    let mut gx = vec![0.0; x.data.len()];
    let mut off = 0;
    for (part, &size) in parts.iter().zip(&sizes) {
        let len = size * inner;
        if let Some(g) = part {
            if g.len() != outer * len {
                return Err(node_err(node, "gradient and output sizes differ"));
            }
            for o in 0..outer {
                gx[o * total + off..o * total + off + len]
                    .copy_from_slice(&g[o * len..(o + 1) * len]);
            }
        }
        off += len;
    }
    Ok(gx)
}
