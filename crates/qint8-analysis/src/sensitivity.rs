//! Which layer hurts: per-node sensitivity to quantization, and mixed
//! precision (the fewest nodes kept in float for an accuracy budget).
//!
//! For every quantizable node (a Conv, Gemm or MatMul with a quantized
//! input) [`analyze`] measures two configurations on an evaluation subset:
//! the node alone quantized (everything else float), and the node alone in
//! float (everything else quantized). Each gives top-1, and the SQNR, mean
//! KL and mean Jensen-Shannon divergence against FP32; nodes rank by the
//! divergence their quantization alone causes, and say how far these images
//! tell their top sets apart ([`NodeSensitivity::top_set_z`]). On request
//! the node quantized alone is split between its weights and its
//! activations ([`Split`]). A convolution owns the
//! residual pair of the Add TensorRT would fuse into it ([`fused_adds`]).
//! Two methods:
//!
//! - [`Method::Linearized`] (the default) costs a few evaluations in all:
//!   one real evaluation of the quantized network, one FP32 pass that
//!   records every activation, one run of each node on its quantized
//!   inputs (its exact output error), and one backward pass of the decision
//!   margin (FP32's top class minus its runner-up) that carries every
//!   node's error to the output to first order. SQNR and divergences are
//!   those of that margin (of the two-class distribution it defines); the
//!   fully quantized row is the real evaluation, measured the same way.
//! - [`Method::Exact`] runs the whole network for both configurations of
//!   every node (2N + 1 evaluations) and compares all logits.
//!
//! [`mixed_precision`] then keeps nodes in float, greedily, verifying
//! every choice with a real evaluation until the budget holds: first the
//! top-ranked node, then each round the remaining node that, kept in float
//! together with those already chosen, brings the outputs closest to
//! FP32's (measured for real).

use std::collections::BTreeSet;
use std::time::Instant;

use qint8_calibration::ImageDataset;
use qint8_eval::{Accuracy, Evaluator};
use qint8_graph::quant::{insert_qdq, Precision, QuantPlan, WeightStorage};
use qint8_graph::{Graph, Model, Node, Op};

use crate::svg::{Bar, Chart, PALETTE};
use crate::{AnalysisError, Result};

/// How [`analyze`] measures each configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// First-order estimates from one recorded FP32 pass and one backward
    /// pass (see the module docs).
    #[default]
    Linearized,
    /// A real evaluation of every configuration.
    Exact,
}

/// Top-1 and logit error of one configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Top-1, as a fraction.
    pub top1: f64,
    /// SQNR of the logits against FP32's, dB.
    pub sqnr_db: f64,
    /// Mean over images of `KL(softmax(fp32) || softmax(this))`, nats.
    pub kl: f64,
    /// Mean over images of the Jensen-Shannon divergence between the two
    /// softmax distributions, nats (at most ln 2 per image).
    pub js: f64,
    /// Standard error of `js` (the images' standard deviation over the
    /// square root of their number): nodes whose divergences differ by
    /// less than about twice this are not told apart by these images, and
    /// another image set may order them the other way.
    pub js_stderr: f64,
}

/// Running mean and standard error of per-image values.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MeanError {
    sum: f64,
    sum_sq: f64,
    n: usize,
}

impl MeanError {
    /// Adds one image's value.
    pub(crate) fn add(&mut self, v: f64) {
        self.sum += v;
        self.sum_sq += v * v;
        self.n += 1;
    }

    /// The mean (0 for no images).
    pub(crate) fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }

    /// The standard error of the mean (0 for fewer than two images).
    pub(crate) fn stderr(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = self.n as f64;
        let var = ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0);
        (var / n).sqrt()
    }
}

/// Logit error of one model against the reference ([`logit_error`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitError {
    /// SQNR of all logits, dB.
    pub sqnr_db: f64,
    /// Mean over images of `KL(softmax(reference) || softmax(got))`, nats.
    pub kl: f64,
    /// Mean over images of the Jensen-Shannon divergence, nats.
    pub js: f64,
    /// Standard error of `js`.
    pub js_stderr: f64,
}

/// One node's damage quantized alone, split between its weights and its
/// activations (which of the two to fix: per-channel weights or keeping the
/// weights in float, against another range for its inputs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// Only the node's weights quantized; its inputs, and the residual it
    /// fuses, in float; everything else in float.
    pub weights: Outcome,
    /// Only the node's inputs and the residual it fuses quantized; its
    /// weights in float. [`Method::Linearized`] takes this as the node's
    /// error less its weights' (equal to first order).
    pub activations: Outcome,
}

/// One node's sensitivity.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSensitivity {
    /// Node name.
    pub node: String,
    /// Operator (`Conv`, `Gemm`, `MatMul`).
    pub op: &'static str,
    /// Only this node quantized.
    pub alone: Outcome,
    /// Only this node in float, everything else quantized.
    pub float: Outcome,
    /// SQNR of the node's own output with its inputs quantized, against
    /// FP32, dB ([`Method::Linearized`] only).
    pub output_sqnr_db: Option<f64>,
    /// For the node ranked `k` by [`Sensitivity::ranking`]: by how many
    /// standard errors these images set the top `k` apart from the nodes
    /// ranked below (see [`top_set_z`]). Under about 2 they do not: another
    /// image subset may well swap nodes across that boundary. `None` for
    /// the last node, or with fewer than two images.
    pub top_set_z: Option<f64>,
    /// Quantized alone, its weights' and its activations' shares (when the
    /// analysis was asked to split them).
    pub split: Option<Split>,
}

/// A full sensitivity analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct Sensitivity {
    /// How the configurations were measured.
    pub method: Method,
    /// Images evaluated.
    pub images: usize,
    /// FP32 top-1.
    pub fp32_top1: f64,
    /// Every quantizable node quantized (the plan as given).
    pub int8: Outcome,
    /// One entry per quantizable node, in graph order.
    pub nodes: Vec<NodeSensitivity>,
    /// Seconds of one evaluation of the quantized network (the plan as
    /// given) on the subset: the unit the analysis's cost is told in.
    pub eval_seconds: f64,
    /// Seconds of the whole analysis.
    pub seconds: f64,
}

impl Sensitivity {
    /// Node indices, most sensitive first: by the Jensen-Shannon
    /// divergence from FP32's predictions when the node alone is quantized
    /// (the damage it does on its own, unmasked by the other nodes' errors),
    /// then by the top-1 that keeping the node alone in float recovers. The
    /// divergence is continuous, so it ranks more stably across image
    /// subsets than a top-1 count, and bounded per image, so a few images
    /// whose first-order estimate overshoots cannot dominate the mean as
    /// they do the KL divergence's (docs/results.md gives the overlaps).
    pub fn ranking(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&self.nodes[a], &self.nodes[b]);
            y.alone
                .js
                .total_cmp(&x.alone.js)
                .then(y.float.top1.total_cmp(&x.float.top1))
        });
        order
    }

    /// What the SQNR and divergences compare: `"margin"` (the linearized
    /// analysis' top-2 margin) or `"logit"` (all logits, exact analysis).
    pub fn measured_on(&self) -> &'static str {
        match self.method {
            Method::Linearized => "margin",
            Method::Exact => "logit",
        }
    }

    /// A bar chart of the `n` most sensitive nodes' divergence with one
    /// node quantized alone, in 1e-3 nats, with standard-error bars;
    /// `name` heads the title.
    pub fn chart(&self, name: &str, n: usize) -> Chart {
        let order = self.ranking();
        let top = &order[..n.min(order.len())];
        Chart {
            title: format!(
                "{name}: {} JS divergence with one node quantized alone ({} images)",
                self.measured_on(),
                self.images
            ),
            x_label: "node (most sensitive first)".into(),
            y_label: "JS(fp32, one node int8), 1e-3 nats, ± s.e.".into(),
            bars: top
                .iter()
                .map(|&i| Bar {
                    label: node_label(&self.nodes[i].node),
                    value: self.nodes[i].alone.js * 1000.0,
                    color: PALETTE[0].into(),
                })
                .collect(),
            errors: top
                .iter()
                .map(|&i| self.nodes[i].alone.js_stderr * 1000.0)
                .collect(),
            ..Default::default()
        }
    }

    /// One line on which top sets (of up to `max_k` nodes) these images
    /// resolve at `z`, for a reader who asks how far to trust the order.
    pub fn resolved_text(&self, z: f64, max_k: usize) -> String {
        let sets: Vec<String> = self
            .resolved_top_sets(z)
            .iter()
            .take_while(|&&k| k <= max_k)
            .map(|k| k.to_string())
            .collect();
        let told = if sets.is_empty() {
            format!("no top set of up to {max_k} nodes")
        } else {
            format!("the top {}", sets.join(", "))
        };
        format!(
            "These images set {told} apart from the rest (z >= {z}); where z is under {z}, nodes on either side of that rank may trade places on other images."
        )
    }

    /// The ranks `k` whose top `k` these images set apart from the rest
    /// by at least `z` standard errors ([`NodeSensitivity::top_set_z`]).
    pub fn resolved_top_sets(&self, z: f64) -> Vec<usize> {
        self.ranking()
            .iter()
            .enumerate()
            .filter(|(_, &i)| self.nodes[i].top_set_z.is_some_and(|v| v >= z))
            .map(|(k, _)| k + 1)
            .collect()
    }
}

/// The last two components of a node name (`block.1/Conv`), at most 28
/// characters, for chart labels.
pub fn node_label(node: &str) -> String {
    let parts: Vec<&str> = node.trim_start_matches('/').split('/').collect();
    let k = parts.len().saturating_sub(2);
    crate::report::short(&parts[k..].join("/"), 28)
}

/// How far a ranking's top sets stand apart from the rest, given each
/// ranked node's per-image values (`values[r]` for the node ranked `r`,
/// most sensitive first; every node measured on the same images).
///
/// For nodes `a` ranked above `b`, the paired difference of their values
/// image by image has mean `μ` and standard error `σ/√n`; its `z` is
/// `μ / (σ/√n)`. Pairing cancels what the two nodes' images share, so the
/// test is much sharper than comparing the two means' own standard errors.
/// Entry `k - 1` is the smallest `z` over every pair with `a` in the top
/// `k` and `b` below: the evidence that the top `k` are the top `k`. There
/// are `len - 1` entries; none with fewer than two images.
pub fn top_set_z(values: &[&[f64]]) -> Vec<f64> {
    let r = values.len();
    let n = values.first().map_or(0, |v| v.len());
    if r < 2 || n < 2 || values.iter().any(|v| v.len() != n) {
        return Vec::new();
    }
    let m = n as f64;
    // Pairwise z, row `a`, column `b > a`.
    let mut z = vec![0.0f64; r * r];
    for a in 0..r {
        for b in a + 1..r {
            let (s1, s2) = diff_sums(values[a], values[b]);
            let mean = s1 / m;
            let se = (((s2 - s1 * mean) / (m - 1.0)).max(0.0) / m).sqrt();
            z[a * r + b] = if se > 0.0 {
                mean / se
            } else if mean > 0.0 {
                // The same difference on every image: as apart as can be.
                f64::MAX
            } else {
                0.0
            };
        }
    }
    // The boundary below rank k + 1: every pair across it. Going down,
    // pairs with `b = k + 1` leave and pairs with `a = k + 1` join, so keep
    // the minimum per column over the rows above.
    let mut col_min = vec![f64::INFINITY; r];
    (0..r - 1)
        .map(|k| {
            for b in k + 1..r {
                col_min[b] = col_min[b].min(z[k * r + b]);
            }
            col_min[k + 1..]
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}

/// `(Σ (x - y), Σ (x - y)²)`, in four lanes (a few million pairs of
/// values on a large model).
fn diff_sums(x: &[f64], y: &[f64]) -> (f64, f64) {
    const L: usize = 4;
    let (mut s1, mut s2) = ([0.0f64; L], [0.0f64; L]);
    let body = x.len().min(y.len()) / L * L;
    for (xs, ys) in x[..body].chunks_exact(L).zip(y[..body].chunks_exact(L)) {
        for l in 0..L {
            let d = xs[l] - ys[l];
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    let (mut t1, mut t2) = (s1.iter().sum::<f64>(), s2.iter().sum::<f64>());
    for (a, b) in x[body..].iter().zip(&y[body..]) {
        let d = a - b;
        t1 += d;
        t2 += d * d;
    }
    (t1, t2)
}

/// Sets every node's [`NodeSensitivity::top_set_z`]: `alone_js[i]` holds
/// node `i`'s per-image divergence with it alone quantized.
pub(crate) fn set_top_set_z(s: &mut Sensitivity, alone_js: &[Vec<f64>]) {
    let order = s.ranking();
    for n in &mut s.nodes {
        n.top_set_z = None;
    }
    if alone_js.len() != order.len() {
        return;
    }
    let ranked: Vec<&[f64]> = order.iter().map(|&i| alone_js[i].as_slice()).collect();
    for (&i, z) in order.iter().zip(top_set_z(&ranked)) {
        s.nodes[i].top_set_z = Some(z);
    }
}

/// Whether a top-1 drop from `fp32` to `top1` (fractions) is at most
/// `max_drop`. Top-1 values are counts over the images, and their
/// difference as fractions carries rounding: 91.17% less 91.07% on 10,000
/// images is 0.0010000000000000009, which a plain `<=` would put over a
/// budget of 0.001. A drop within 1e-9 of the budget (far below one image
/// in any evaluation set) meets it.
pub fn within_budget(fp32: f64, top1: f64, max_drop: f64) -> bool {
    fp32 - top1 <= max_drop + 1e-9
}

/// One point of the accuracy / float-node curve.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvePoint {
    /// Nodes kept in float.
    pub float_nodes: usize,
    /// Verified top-1 (a real evaluation), as a fraction.
    pub top1: f64,
}

/// The result of [`mixed_precision`].
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPrecision {
    /// The nodes kept in float, in the order they were added: the fewest
    /// that meet the budget, or, where no prefix of the search does (and
    /// without a budget), the prefix with the best verified top-1 (the
    /// fewest nodes among equals).
    pub float_nodes: Vec<String>,
    /// Every node the search added, in order: curve point `i` is the first
    /// `i` of them in float.
    pub order: Vec<String>,
    /// For each of them, the residual Adds it takes to float ([`fused_adds`]).
    pub float_adds: Vec<Vec<String>>,
    /// The plan with those nodes in float.
    pub plan: QuantPlan,
    /// Verified top-1 of that plan on the evaluation set.
    pub top1: f64,
    /// FP32 top-1 on the same set.
    pub fp32_top1: f64,
    /// Whether the budget holds (`fp32_top1 - top1 <= max_drop`, see
    /// [`within_budget`]).
    pub met: bool,
    /// Top-1 after each prefix of the ranking, from 0 float nodes on.
    pub curve: Vec<CurvePoint>,
}

/// The nodes whose inputs `plan` quantizes and whose kind counts for
/// mixed precision (Conv, Gemm, MatMul), in graph order. A node the plan
/// keeps in float is not one, even where its input is quantized for
/// another consumer.
pub fn quantizable_nodes(graph: &Graph, plan: &QuantPlan) -> Vec<usize> {
    graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op, Op::Conv(_) | Op::Gemm { .. } | Op::MatMul))
        .filter(|(_, n)| plan.precision_of(&n.name) == Precision::Int8)
        .filter(|(_, n)| {
            n.inputs
                .iter()
                .any(|i| plan.activations.contains_key(i) || plan.weights.contains_key(i))
        })
        .map(|(i, _)| i)
        .collect()
}

/// [`quantizable_nodes`], or an error when there are none.
pub(crate) fn analyzed_nodes(graph: &Graph, plan: &QuantPlan) -> Result<Vec<usize>> {
    let nodes = quantizable_nodes(graph, plan);
    if nodes.is_empty() {
        return Err(AnalysisError::Invalid(
            "the plan quantizes no Conv, Gemm or MatMul input".into(),
        ));
    }
    Ok(nodes)
}

/// The Adds that convolution `node` would take into its INT8 epilogue under
/// `plan`: each reads the convolution's output, which the plan leaves
/// unquantized, and a residual the plan quantizes (the pair
/// `qint8_graph::quant::trt_placement` inserts so TensorRT can fuse the
/// Add). Each comes as `(Add's name, residual's name)`. Empty for any other
/// node.
pub fn fused_adds<'g>(graph: &'g Graph, plan: &QuantPlan, node: &Node) -> Vec<(&'g str, &'g str)> {
    let (Op::Conv(_), Some(out)) = (&node.op, node.outputs.first()) else {
        return Vec::new();
    };
    if plan.activations.contains_key(out) {
        return Vec::new();
    }
    graph
        .consumers(out)
        .into_iter()
        .map(|i| &graph.nodes[i])
        .filter(|add| matches!(add.op, Op::Add))
        .filter_map(|add| {
            let residual = add
                .inputs
                .iter()
                .find(|r| *r != out && plan.activations.contains_key(*r))?;
            Some((add.name.as_str(), residual.as_str()))
        })
        .collect()
}

/// The names of the Adds [`fused_adds`] finds for the node named `name`.
fn fused_add_names<'g>(graph: &'g Graph, plan: &QuantPlan, name: &str) -> Vec<&'g str> {
    graph
        .nodes
        .iter()
        .find(|n| n.name == name)
        .map(|n| {
            fused_adds(graph, plan, n)
                .into_iter()
                .map(|(a, _)| a)
                .collect()
        })
        .unwrap_or_default()
}

/// `plan` with `float` nodes kept in float (their inputs not quantized for
/// them). The Adds a float convolution would have fused ([`fused_adds`])
/// go to float with it: their residual pair exists only for that fusion,
/// and a float convolution has no INT8 epilogue to take them.
pub fn with_float_nodes<'a>(
    graph: &Graph,
    plan: &QuantPlan,
    float: impl IntoIterator<Item = &'a str>,
) -> QuantPlan {
    let mut p = plan.clone();
    for n in float {
        p.precision.insert(n.to_string(), Precision::Float);
        for add in fused_add_names(graph, plan, n) {
            p.precision.insert(add.to_string(), Precision::Float);
        }
    }
    p
}

/// Softmax of one row, in f64.
fn softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// `10 log10(signal / noise)` from sums of squares (infinite without
/// noise, as `qint8_math::metrics::sqnr_db`).
pub(crate) fn sqnr_db(signal: f64, noise: f64) -> f64 {
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// Jensen-Shannon divergence of two distributions, nats.
pub(crate) fn js_divergence(p: &[f64], q: &[f64]) -> f64 {
    let kl_to_mid = |a: &[f64], b: &[f64]| -> f64 {
        a.iter()
            .zip(b)
            .filter(|(x, _)| **x > 0.0)
            .map(|(x, y)| x * (2.0 * x / (x + y)).ln())
            .sum()
    };
    (0.5 * (kl_to_mid(p, q) + kl_to_mid(q, p))).max(0.0)
}

/// Logit SQNR (dB), mean KL and mean Jensen-Shannon divergence (with its
/// standard error) of `got` against `reference`, both `[images, classes]`.
pub fn logit_error(reference: &[f32], got: &[f32], classes: usize) -> LogitError {
    logit_error_images(reference, got, classes).0
}

/// [`logit_error`], and each image's Jensen-Shannon divergence.
fn logit_error_images(reference: &[f32], got: &[f32], classes: usize) -> (LogitError, Vec<f64>) {
    let (mut sig, mut noise) = (0.0f64, 0.0f64);
    for (&a, &b) in reference.iter().zip(got) {
        sig += (a as f64) * (a as f64);
        noise += (a as f64 - b as f64) * (a as f64 - b as f64);
    }
    let sqnr = sqnr_db(sig, noise);
    let mut kl = 0.0;
    let mut js = MeanError::default();
    let mut images = Vec::with_capacity(reference.len() / classes.max(1));
    if classes > 0 {
        for (r, g) in reference
            .chunks_exact(classes)
            .zip(got.chunks_exact(classes))
        {
            let (p, q) = (softmax(r), softmax(g));
            kl += p
                .iter()
                .zip(&q)
                .filter(|(pi, _)| **pi > 0.0)
                .map(|(pi, qi)| pi * (pi / qi.max(1e-300)).ln())
                .sum::<f64>();
            let v = js_divergence(&p, &q);
            js.add(v);
            images.push(v);
        }
    }
    let e = LogitError {
        sqnr_db: sqnr,
        kl: kl / js.n.max(1) as f64,
        js: js.mean(),
        js_stderr: js.stderr(),
    };
    (e, images)
}

/// Scores `graph` on `data`, returning accuracy and logits: quantized by
/// `plan` (QDQ, int8 weights), or in float with `None`. `model` gives the
/// opset and metadata.
pub(crate) fn run(
    model: &Model,
    graph: &Graph,
    plan: Option<&QuantPlan>,
    data: &ImageDataset,
    batch: usize,
    threads: usize,
) -> Result<(Accuracy, Vec<f32>)> {
    let (graph_to_run, opset) = match plan {
        Some(p) => (
            insert_qdq(graph, p, WeightStorage::Int8).map_err(invalid)?,
            model.opset.max(13),
        ),
        None => (graph.clone(), model.opset),
    };
    let q = model.with_graph(graph_to_run, opset);
    let e = Evaluator::new(&q, &graph.name, threads).map_err(invalid)?;
    e.evaluate_logits(data, batch, &mut |_| {}).map_err(invalid)
}

pub(crate) fn invalid(e: impl std::fmt::Display) -> AnalysisError {
    AnalysisError::Invalid(e.to_string())
}

/// Measures every quantizable node of `graph` under `plan` on `data` (see
/// the module docs). With `split`, each node quantized alone is also
/// measured with only its weights quantized ([`Split`]): one more run of
/// every node with its quantized weights for [`Method::Linearized`], two
/// more evaluations per node for [`Method::Exact`]. `progress` is told
/// `(steps done, total)`: images for [`Method::Linearized`],
/// configurations for [`Method::Exact`].
#[allow(clippy::too_many_arguments)]
pub fn analyze(
    model: &Model,
    graph: &Graph,
    plan: &QuantPlan,
    data: &ImageDataset,
    method: Method,
    batch: usize,
    threads: usize,
    split: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Sensitivity> {
    match method {
        Method::Linearized => {
            crate::linearized::analyze(model, graph, plan, data, batch, threads, split, progress)
        }
        Method::Exact => analyze_exact(model, graph, plan, data, batch, threads, split, progress),
    }
}

/// `alone` (a plan with node `name` alone quantized) with only the node's
/// weights quantized (`weights`) or only its inputs and fused residuals.
fn split_plan(graph: &Graph, alone: &QuantPlan, name: &str, weights: bool) -> QuantPlan {
    let mut p = alone.clone();
    let Some(node) = graph.nodes.iter().find(|n| n.name == name) else {
        return p;
    };
    for input in node.inputs.iter().filter(|n| !n.is_empty()) {
        match (graph.initializers.contains_key(input), weights) {
            (true, false) => {
                p.weights.remove(input);
            }
            (false, true) => {
                p.activations.remove(input);
            }
            _ => {}
        }
    }
    if weights {
        for add in fused_add_names(graph, alone, name) {
            p.precision.insert(add.to_string(), Precision::Float);
        }
    }
    p
}

#[allow(clippy::too_many_arguments)]
fn analyze_exact(
    model: &Model,
    graph: &Graph,
    plan: &QuantPlan,
    data: &ImageDataset,
    batch: usize,
    threads: usize,
    split: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Sensitivity> {
    let start = Instant::now();
    let (fp32, reference) = run(model, graph, None, data, batch, threads)?;
    let classes = fp32.classes;
    let outcome = |a: &Accuracy, logits: &[f32]| {
        let (e, images) = logit_error_images(&reference, logits, classes);
        let o = Outcome {
            top1: a.score.top1_fraction(),
            sqnr_db: e.sqnr_db,
            kl: e.kl,
            js: e.js,
            js_stderr: e.js_stderr,
        };
        (o, images)
    };
    let nodes = analyzed_nodes(graph, plan)?;
    let per_node = if split { 4 } else { 2 };
    let total = 1 + per_node * nodes.len();
    let t = Instant::now();
    let (a, l) = run(model, graph, Some(plan), data, batch, threads)?;
    let eval_seconds = t.elapsed().as_secs_f64();
    let (int8, _) = outcome(&a, &l);
    progress(1, total);
    let all: Vec<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut out = Vec::with_capacity(nodes.len());
    let mut alone_js = Vec::with_capacity(nodes.len());
    for (k, &i) in nodes.iter().enumerate() {
        let node = &graph.nodes[i];
        // Quantized alone: with the Adds it fuses, as it would be in INT8.
        let fused = fused_add_names(graph, plan, &node.name);
        let others = all
            .iter()
            .copied()
            .filter(|n| *n != node.name && !fused.contains(n));
        let alone_plan = with_float_nodes(graph, plan, others);
        let (a, l) = run(model, graph, Some(&alone_plan), data, batch, threads)?;
        let (alone, images) = outcome(&a, &l);
        alone_js.push(images);
        progress(2 + per_node * k, total);
        let split = match split {
            true => {
                let mut part = |weights: bool, step: usize| -> Result<Outcome> {
                    let p = split_plan(graph, &alone_plan, &node.name, weights);
                    let (a, l) = run(model, graph, Some(&p), data, batch, threads)?;
                    progress(step + per_node * k, total);
                    Ok(outcome(&a, &l).0)
                };
                Some(Split {
                    weights: part(true, 3)?,
                    activations: part(false, 4)?,
                })
            }
            false => None,
        };
        let (a, l) = run(
            model,
            graph,
            Some(&with_float_nodes(graph, plan, [node.name.as_str()])),
            data,
            batch,
            threads,
        )?;
        let (float, _) = outcome(&a, &l);
        progress(per_node * (k + 1) + 1, total);
        out.push(NodeSensitivity {
            node: node.name.clone(),
            op: node.op.op_type(),
            alone,
            float,
            output_sqnr_db: None,
            top_set_z: None,
            split,
        });
    }
    let mut s = Sensitivity {
        method: Method::Exact,
        images: data.len(),
        fp32_top1: fp32.score.top1_fraction(),
        int8,
        nodes: out,
        eval_seconds,
        seconds: 0.0,
    };
    set_top_set_z(&mut s, &alone_js);
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}

/// Greedy mixed precision. Round 1 keeps in float the first node of
/// `sens`'s [`ranking`](Sensitivity::ranking); every later round runs, on
/// `subset`, each remaining node kept in float together with those
/// already chosen (one node's error can hide the others', so the first
/// ranking says little beyond its top) and adds the one whose outputs come
/// closest to FP32's (mean Jensen-Shannon divergence). Each choice is
/// verified by a real evaluation on `data`, until the top-1 drop against
/// FP32 is at most `max_drop` (a fraction: 0.001 is 0.1 points) or
/// `max_float` nodes are in float. With `candidates = Some(k)` a round runs
/// only the `k` remaining nodes that `sens` ranks highest (k evaluations of
/// `subset` per round instead of one per remaining node; on large models
/// the full rounds dominate the search's time). With `max_drop = None` every round up to
/// `max_float` runs and the best verified prefix is kept (the best accuracy
/// reachable with at most that many float nodes); so is it when the budget
/// is not met within `max_float` nodes. `progress` is told each verified
/// curve point.
#[allow(clippy::too_many_arguments)]
pub fn mixed_precision(
    model: &Model,
    graph: &Graph,
    plan: &QuantPlan,
    sens: &Sensitivity,
    subset: &ImageDataset,
    data: &ImageDataset,
    max_drop: Option<f64>,
    max_float: usize,
    candidates: Option<usize>,
    batch: usize,
    threads: usize,
    progress: &mut dyn FnMut(&CurvePoint),
) -> Result<MixedPrecision> {
    if candidates == Some(0) {
        return Err(AnalysisError::Invalid(
            "mixed precision needs at least 1 candidate per round".into(),
        ));
    }
    let (fp32, _) = run(model, graph, None, data, batch, threads)?;
    let fp32_top1 = fp32.score.top1_fraction();
    let known: BTreeSet<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    if let Some(missing) = sens.nodes.iter().find(|n| !known.contains(n.node.as_str())) {
        return Err(AnalysisError::Invalid(format!(
            "the sensitivity analysis names node `{}`, which the graph lacks",
            missing.node
        )));
    }
    let verify = |float: &[String]| -> Result<f64> {
        let p = with_float_nodes(graph, plan, float.iter().map(String::as_str));
        Ok(run(model, graph, Some(&p), data, batch, threads)?
            .0
            .score
            .top1_fraction())
    };
    let meets = |top1: f64| max_drop.is_some_and(|d| within_budget(fp32_top1, top1, d));
    // Candidates are scored by how close they bring the network to FP32's
    // outputs on `subset`: the mean divergence moves with every image,
    // where top-1 moves with the few near the decision boundary (on 1000
    // images, candidates a few images apart in top-1 are not told apart).
    let mut subset_fp32: Option<Vec<f32>> = None;
    let mut float: Vec<String> = Vec::new();
    let first = CurvePoint {
        float_nodes: 0,
        top1: verify(&float)?,
    };
    progress(&first);
    let mut curve = vec![first.clone()];
    let limit = max_float.min(sens.nodes.len());
    let ranking = sens.ranking();
    while float.len() < limit && !meets(curve[curve.len() - 1].top1) {
        let next = if float.is_empty() {
            ranking.first().map(|&i| sens.nodes[i].node.clone())
        } else {
            // Each remaining node, in float with those already chosen.
            // FP32 on `subset`, run once, when a round first needs it.
            let reference: &[f32] = match &subset_fp32 {
                Some(r) => r,
                None => subset_fp32.insert(run(model, graph, None, subset, batch, threads)?.1),
            };
            let mut scored: Vec<(f64, String)> = Vec::new();
            let remaining = ranking
                .iter()
                .map(|&i| &sens.nodes[i])
                .filter(|n| !float.contains(&n.node))
                .take(candidates.unwrap_or(usize::MAX));
            for n in remaining {
                let with: Vec<&str> = float
                    .iter()
                    .map(String::as_str)
                    .chain([n.node.as_str()])
                    .collect();
                let (a, l) = run(
                    model,
                    graph,
                    Some(&with_float_nodes(graph, plan, with)),
                    subset,
                    batch,
                    threads,
                )?;
                scored.push((logit_error(reference, &l, a.classes).js, n.node.clone()));
            }
            scored
                .into_iter()
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, n)| n)
        };
        let Some(next) = next else { break };
        float.push(next);
        let point = CurvePoint {
            float_nodes: float.len(),
            top1: verify(&float)?,
        };
        progress(&point);
        curve.push(point);
    }
    let k = chosen_prefix(&curve, meets(curve[curve.len() - 1].top1));
    let top1 = curve[k].top1;
    let float_nodes: Vec<String> = float[..k].to_vec();
    let float_adds = float_nodes
        .iter()
        .map(|n| {
            fused_add_names(graph, plan, n)
                .into_iter()
                .map(str::to_string)
                .collect()
        })
        .collect();
    Ok(MixedPrecision {
        plan: with_float_nodes(graph, plan, float_nodes.iter().map(String::as_str)),
        float_nodes,
        order: float,
        float_adds,
        top1,
        fp32_top1,
        met: max_drop.is_none_or(|d| within_budget(fp32_top1, top1, d)),
        curve,
    })
}

/// Which prefix of the search mixed precision returns: the last when it
/// meets the budget (the search stops at the first that does, so it is the
/// fewest nodes), else the best verified top-1, the fewest nodes among
/// equals.
fn chosen_prefix(curve: &[CurvePoint], last_meets: bool) -> usize {
    if last_meets {
        return curve.len().saturating_sub(1);
    }
    let mut best = 0;
    for (i, c) in curve.iter().enumerate() {
        if c.top1 > curve[best].top1 {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_of_exactly_the_budget_meets_it() {
        // 10 images of 10,000: 0.1 points, as fractions one rounding over.
        let (fp32, top1) = (std::hint::black_box(9117.0) / 10000.0, 9107.0 / 10000.0);
        assert!(fp32 - top1 > 0.001);
        assert!(within_budget(fp32, top1, 0.001));
        assert!(!within_budget(9117.0 / 10000.0, 9106.0 / 10000.0, 0.001));
        assert!(within_budget(0.5, 0.5, 0.0));
        assert!(!within_budget(0.5, 0.4999, 0.0));
    }

    #[test]
    fn an_unmet_budget_returns_the_best_prefix_and_a_met_one_the_last() {
        let curve: Vec<CurvePoint> = [0.79, 0.90, 0.908, 0.906, 0.908]
            .iter()
            .enumerate()
            .map(|(float_nodes, &top1)| CurvePoint { float_nodes, top1 })
            .collect();
        assert_eq!(chosen_prefix(&curve, false), 2);
        assert_eq!(chosen_prefix(&curve, true), 4);
        assert_eq!(chosen_prefix(&curve[..1], false), 0);
    }

    #[test]
    fn logit_error_is_exact_for_equal_logits_and_grows_with_noise() {
        let r = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        let e = logit_error(&r, &r, 3);
        assert_eq!(
            (e.sqnr_db, e.kl, e.js, e.js_stderr),
            (f64::INFINITY, 0.0, 0.0, 0.0)
        );
        let g: Vec<f32> = r.iter().map(|v| v + 0.1).collect();
        // A constant shift changes no softmax.
        let LogitError {
            sqnr_db: s1,
            kl: k1,
            js: j1,
            ..
        } = logit_error(&r, &g, 3);
        assert!(
            s1.is_finite() && k1.abs() < 1e-12 && j1.abs() < 1e-12,
            "{s1} {k1} {j1}"
        );
        let h = [1.0f32, 2.5, 0.5, -1.0, 0.0, 2.0];
        let e2 = logit_error(&r, &h, 3);
        let (k2, j2) = (e2.kl, e2.js);
        assert!(k2 > 0.0 && j2 > 0.0 && j2 < std::f64::consts::LN_2);
        // Two images, one unchanged: the standard error of the mean of
        // (0, d) is d / 2.
        let one_changed = logit_error(&r, &[1.0, 2.0, 0.5, -1.0, 0.0, 2.0], 3);
        let d = 2.0 * one_changed.js;
        assert!(
            (one_changed.js_stderr - d / 2.0).abs() < 1e-12,
            "{one_changed:?}"
        );
        // Far apart: the divergence approaches, never passes, ln 2.
        let j3 = logit_error(&[50.0, 0.0], &[0.0, 50.0], 2).js;
        assert!((j3 - std::f64::consts::LN_2).abs() < 1e-9, "{j3}");
    }

    #[test]
    fn ranking_puts_the_largest_damage_first() {
        let o = |top1, js| Outcome {
            top1,
            sqnr_db: 0.0,
            kl: 0.0,
            js,
            js_stderr: 0.0,
        };
        let node = |n: &str, t, kl| NodeSensitivity {
            node: n.into(),
            op: "Conv",
            alone: o(0.9, kl),
            float: o(t, 0.0),
            output_sqnr_db: None,
            top_set_z: None,
            split: None,
        };
        let s = Sensitivity {
            method: Method::Exact,
            images: 10,
            fp32_top1: 0.9,
            int8: o(0.8, 0.1),
            nodes: vec![
                node("a", 0.81, 0.01),
                node("b", 0.88, 0.05),
                node("c", 0.83, 0.01),
                node("d", 0.85, 0.02),
            ],
            eval_seconds: 1.0,
            seconds: 2.0,
        };
        // JS 0.05 > 0.02 > 0.01 (= 0.01, broken by recovered top-1).
        assert_eq!(s.ranking(), vec![1, 3, 2, 0]);
    }

    #[test]
    fn top_sets_are_told_apart_by_paired_differences() {
        // Differences 2 and 3: mean 2.5, standard deviation 0.5^0.5, so a
        // standard error of 0.5 over two images.
        let z = top_set_z(&[&[3.0, 5.0], &[1.0, 2.0]]);
        assert_eq!(z.len(), 1);
        assert!((z[0] - 5.0).abs() < 1e-12, "{z:?}");
        // Lanes and tail sum what one loop sums.
        for len in [0usize, 3, 4, 7, 9] {
            let x: Vec<f64> = (0..len).map(|i| (i * i) as f64 * 0.5).collect();
            let y: Vec<f64> = (0..len).map(|i| (i * 3 % 5) as f64).collect();
            let d: Vec<f64> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
            let (s1, s2) = diff_sums(&x, &y);
            assert!((s1 - d.iter().sum::<f64>()).abs() < 1e-9, "{len}");
            assert!(
                (s2 - d.iter().map(|v| v * v).sum::<f64>()).abs() < 1e-9,
                "{len}"
            );
        }
        // Too few images, mismatched lengths or one node: nothing to say.
        assert!(top_set_z(&[&[3.0], &[1.0]]).is_empty());
        assert!(top_set_z(&[&[3.0, 1.0], &[1.0]]).is_empty());
        assert!(top_set_z(&[&[3.0, 1.0]]).is_empty());
        // Images that differ a hundredfold but every node a fixed step
        // above the next on each of them: the pairs share that spread,
        // so the top sets stand far apart. Nodes 1 and 2 then differ by
        // noise only, so the top 2 are not told apart from the rest (their
        // z is that of the pair across the boundary, small).
        let n = 200;
        let base: Vec<f64> = (0..n).map(|i| 1.0 + (i % 7) as f64 * 15.0).collect();
        let wiggle = |i: usize, k: usize| ((i * 31 + k * 17) % 11) as f64 * 1e-3;
        let nodes: Vec<Vec<f64>> = [3.0, 2.0, 2.0, 1.0]
            .iter()
            .enumerate()
            .map(|(k, step)| {
                (0..n)
                    .map(|i| base[i] + step * 10.0 + wiggle(i, k))
                    .collect()
            })
            .collect();
        let ranked: Vec<&[f64]> = nodes.iter().map(Vec::as_slice).collect();
        let z = top_set_z(&ranked);
        assert_eq!(z.len(), 3);
        assert!(z[0] > 100.0 && z[2] > 100.0, "{z:?}");
        assert!(z[1] < 3.0, "{z:?}");
        // Unpaired, the spread of the images would hide every step.
        let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
        let sd = |v: &[f64]| {
            let m = mean(v);
            (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64).sqrt()
        };
        let unpaired = (mean(&nodes[2]) - mean(&nodes[3]))
            / ((sd(&nodes[2]).powi(2) + sd(&nodes[3]).powi(2)) / n as f64).sqrt();
        assert!(unpaired < z[2] / 10.0, "{unpaired} {z:?}");
        // Any pair across the boundary counts, not only the neighbours:
        // the third node ranks below the fourth on every image but one
        // (a ranking by mean puts it third), so the top 3 are not apart.
        let mut odd = nodes.clone();
        odd[2] = (0..n)
            .map(|i| if i == 0 { 1e4 } else { base[i] + 5.0 })
            .collect();
        let ranked: Vec<&[f64]> = odd.iter().map(Vec::as_slice).collect();
        let z = top_set_z(&ranked);
        assert!(z[2] < 2.0, "{z:?}");

        // On a whole analysis: nodes in graph order, z by rank.
        let o = |js| Outcome {
            top1: 0.9,
            sqnr_db: 0.0,
            kl: 0.0,
            js,
            js_stderr: 0.0,
        };
        let mut s = Sensitivity {
            method: Method::Linearized,
            images: n,
            fp32_top1: 0.9,
            int8: o(1.0),
            nodes: [1.0, 3.0, 2.0, 2.0]
                .iter()
                .enumerate()
                .map(|(k, &step)| NodeSensitivity {
                    node: format!("n{k}"),
                    op: "Conv",
                    alone: o(mean(&base) + step * 10.0 + 1e-9 * k as f64),
                    float: o(0.9),
                    output_sqnr_db: None,
                    top_set_z: None,
                    split: None,
                })
                .collect(),
            eval_seconds: 1.0,
            seconds: 1.0,
        };
        let per_node = vec![
            nodes[3].clone(),
            nodes[0].clone(),
            nodes[2].clone(),
            nodes[1].clone(),
        ];
        assert_eq!(s.ranking(), vec![1, 3, 2, 0]);
        set_top_set_z(&mut s, &per_node);
        assert!(s.nodes[0].top_set_z.is_none());
        assert!(s.nodes[1].top_set_z.unwrap() > 100.0);
        assert!(s.nodes[3].top_set_z.unwrap() < 3.0);
        assert!(s.nodes[2].top_set_z.unwrap() > 100.0);
        assert_eq!(s.resolved_top_sets(2.0), vec![1, 3]);
    }
}
