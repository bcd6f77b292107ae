//! The linearized sensitivity analysis: one FP32 pass that records every
//! activation, each node's quantization error computed once from the
//! recorded inputs, and one backward pass of the decision margin.
//!
//! For image `s` let `ŷ` and `r` be FP32's top two classes and
//! `m = z_ŷ - z_r` the margin between them. Quantizing node `i`'s inputs
//! changes its output by `δ_i` (computed exactly, by running the node on
//! its fake-quantized inputs and weights), which moves the margin by
//! `d_i ≈ <∂m/∂y_i, δ_i>` (first order from there to the logits). One
//! backward pass of `m` gives `∂m/∂y_i` for every node at once.
//!
//! - Where the first-order changes of all nodes together exceed the margin
//!   (`|Σ_j d_j| > |m|`: an error as large as the decision itself, where the
//!   network no longer responds linearly and the estimate overshoots), they
//!   are scaled by `ρ = clamp((m_q - m) / Σ_j d_j, 0, 1)`, the share the
//!   fully quantized network's real margin change `m_q - m` (from a real
//!   evaluation) bears out; elsewhere `ρ = 1`.
//! - Node alone quantized: the margin becomes `m + ρ d_i`; the prediction is
//!   `ŷ` while it stays positive, `r` otherwise.
//! - Node alone in float: the quantized network's margin loses that node's
//!   share of its error, `m_q - ρ d_i`; the prediction changes between `ŷ`
//!   and `r` only.
//! - A convolution's error includes that of the residual pair of the Add
//!   it fuses (the Add adds it to the output; see `fused_adds`): that pair
//!   goes to float with the convolution.
//! - With the split, node `i`'s weights alone give `d_i^w = <∂m/∂y_i, δ_i^w>`
//!   (its output on float inputs with its weights quantized, less `y_i`),
//!   scaled by the same `ρ`; its activations' share is `d_i - d_i^w` (the
//!   product of the two errors left out).
//! - KL and Jensen-Shannon divergence: between the two-class distributions
//!   `softmax(z_ŷ, z_r)` of FP32 and of the estimated margin. SQNR: of the
//!   margin.
//!
//! Cost: that real evaluation, the recorded FP32 pass (every value kept in
//! place, see [`Session::record_here`]), one run of a graph holding every
//! quantized node on its own copy of its recorded inputs, and the backward
//! pass; with the split, one more run of a graph holding every node with
//! quantized weights on its float inputs.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::IxDyn;
use qint8_calibration::ImageDataset;
use qint8_eval::accuracy::argmax;
use qint8_graph::quant::{insert_qdq, Precision, QuantPlan, WeightStorage};
use qint8_graph::{DataType, Graph, Model, Tensor, ValueInfo};
use qint8_math::params::QuantParams;
use qint8_math::quant::{fake_quant, fake_quant_array};
use qint8_runtime::grad::{Backward, Value, Values};
use qint8_runtime::{Recording, RuntimeError, Session, SessionOptions};

use crate::sensitivity::{
    analyzed_nodes, fused_adds, invalid, js_divergence, run, set_top_set_z, sqnr_db, MeanError,
    Method, NodeSensitivity, Outcome, Sensitivity, Split,
};
use crate::{AnalysisError, Result};

/// One quantizable node, ready to compute its quantization error.
struct Probe {
    node: usize,
    /// Whether the plan quantizes the node (otherwise its error is 0).
    quantized: bool,
    /// Whether it quantizes one of the node's weights.
    weights_quantized: bool,
    /// Activation (non-constant) inputs.
    inputs: Vec<String>,
    output: String,
    /// The quantized residual of the Add this convolution fuses, when that
    /// Add is its output's only consumer: the residual's error then enters
    /// where the node's own does, and goes to float with the node.
    residual: Option<(String, QuantParams)>,
}

impl Probe {
    /// Whether the probe is in [`probes_session`]'s graph (with or without
    /// `weights_only`).
    fn runs(&self, weights_only: bool) -> bool {
        if weights_only {
            self.weights_quantized
        } else {
            self.quantized
        }
    }
}

/// The name of probe `k`'s copy of `name` in [`probes_session`]'s graph.
fn probe_name(k: usize, name: &str) -> String {
    format!("{k}:{name}")
}

/// Every quantized probe node in one QDQ graph, each alone on its own copy
/// of its inputs (named by [`probe_name`]) and quantized as `plan`
/// quantizes it (its planned inputs through QuantizeLinear /
/// DequantizeLinear, its planned weights int8 + DequantizeLinear): a
/// convolution then runs on the runtime's integer kernel where the CPU has
/// one, as in the real evaluation. Fed the recorded float inputs, one run
/// gives every node's quantized output, and one plan is compiled per
/// sub-batch shape for all of them. `None` when no probe is quantized.
///
/// With `weights_only`, the graph holds instead the probes that quantize a
/// weight, on float inputs, their quantized weights stored fake-quantized
/// (the values of `DequantizeLinear(QuantizeLinear(w))`): it gives each
/// node's error from its weights alone (`None` when no probe quantizes a
/// weight).
fn probes_session(
    graph: &Graph,
    probes: &[Probe],
    plan: &QuantPlan,
    weights_only: bool,
    threads: usize,
) -> Result<Option<Session>> {
    let mut g = Graph {
        name: "probes".into(),
        inputs: vec![],
        outputs: vec![],
        nodes: vec![],
        initializers: Default::default(),
        value_info: vec![],
    };
    let mut own = QuantPlan::new(plan.method.clone());
    for (k, probe) in probes
        .iter()
        .enumerate()
        .filter(|(_, p)| p.runs(weights_only))
    {
        let mut node = graph.nodes[probe.node].clone();
        for name in node.inputs.iter_mut().filter(|n| !n.is_empty()) {
            match graph.initializers.get(name.as_str()) {
                Some(t) => {
                    let params = plan.weights.get(name.as_str());
                    let t = match (params, weights_only) {
                        (Some(p), true) => fake_quant_tensor(name, t, p)?,
                        (Some(p), false) => {
                            own.weights.insert(name.clone(), p.clone());
                            t.clone()
                        }
                        (None, _) => t.clone(),
                    };
                    g.initializers.insert(name.clone(), t);
                }
                None => {
                    let renamed = probe_name(k, name);
                    if let Some(p) = plan
                        .activations
                        .get(name.as_str())
                        .filter(|_| !weights_only)
                    {
                        own.activations.insert(renamed.clone(), p.clone());
                    }
                    if !g.inputs.iter().any(|v| v.name == renamed) {
                        g.inputs.push(ValueInfo {
                            name: renamed.clone(),
                            dtype: DataType::Float,
                            shape: None,
                        });
                    }
                    *name = renamed;
                }
            }
        }
        node.name = probe_name(k, &node.name);
        node.outputs = vec![probe_name(k, &probe.output)];
        g.outputs.push(ValueInfo {
            name: node.outputs[0].clone(),
            dtype: DataType::Float,
            shape: None,
        });
        g.nodes.push(node);
    }
    if g.nodes.is_empty() {
        return Ok(None);
    }
    let g = match weights_only {
        true => g,
        false => insert_qdq(&g, &own, WeightStorage::Int8).map_err(invalid)?,
    };
    Session::from_graph(
        g,
        SessionOptions {
            threads,
            simplify: false,
            ..Default::default()
        },
    )
    .map(Some)
    .map_err(invalid)
}

/// Weight `name`, fake-quantized by `params`.
fn fake_quant_tensor(name: &str, t: &Tensor, params: &QuantParams) -> Result<Tensor> {
    let w = t
        .as_f32()
        .ok_or_else(|| invalid(format!("weight {name} is not float")))?;
    let q = fake_quant_array(w.view(), params).map_err(|e| invalid(format!("{name}: {e}")))?;
    Ok(Tensor::F32(q))
}

/// Per image: FP32's top two classes, their margin, and the label.
#[derive(Clone, Copy)]
struct Margin {
    top: usize,
    second: usize,
    m: f32,
    label: usize,
    /// FP32's two-class distribution, `sigmoid(m)`, and the logarithms of
    /// both probabilities: computed once, read by every node's outcome.
    p: f64,
    ln_p: f64,
    ln_q: f64,
}

fn margin(row: &[f32], label: usize) -> Margin {
    let top = argmax(row);
    let mut second = usize::from(top == 0);
    for (c, &v) in row.iter().enumerate() {
        if c != top && v > row[second] {
            second = c;
        }
    }
    let m = row[top] - row[second];
    let (ln_p, ln_q) = log_sigmoid_pair(m as f64);
    Margin {
        top,
        second,
        m,
        label,
        p: sigmoid(m as f64),
        ln_p,
        ln_q,
    }
}

/// `sum(a * b)`, in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    qint8_runtime::grad::dot(a, b) as f64
}

/// `(Σ y², Σ δ², Σ g δ)` for `δ = (q - y) + e` (`e`, when given, the
/// rounding of a fused residual), in sixteen f32 lanes (they vectorize),
/// in one pass and without materializing `δ`. All slices have the same
/// length.
fn error_dots(q: &[f32], y: &[f32], e: Option<&[f32]>, g: &[f32]) -> (f32, f32, f32) {
    const L: usize = 16;
    let (mut yy, mut nn, mut gd) = ([0.0f32; L], [0.0f32; L], [0.0f32; L]);
    let body = q.len() / L * L;
    let chunks = q[..body]
        .chunks_exact(L)
        .zip(y[..body].chunks_exact(L))
        .zip(g[..body].chunks_exact(L));
    // One loop per case, so that neither tests `e` per element.
    match e {
        Some(e) => {
            for (((qs, ys), gs), es) in chunks.zip(e[..body].chunks_exact(L)) {
                for l in 0..L {
                    let d = (qs[l] - ys[l]) + es[l];
                    yy[l] += ys[l] * ys[l];
                    nn[l] += d * d;
                    gd[l] += gs[l] * d;
                }
            }
        }
        None => {
            for ((qs, ys), gs) in chunks {
                for l in 0..L {
                    let d = qs[l] - ys[l];
                    yy[l] += ys[l] * ys[l];
                    nn[l] += d * d;
                    gd[l] += gs[l] * d;
                }
            }
        }
    }
    let (mut ty, mut tn, mut tg) = (0.0f32, 0.0f32, 0.0f32);
    for i in body..q.len() {
        let v = (q[i] - y[i]) + e.map_or(0.0, |e| e[i]);
        ty += y[i] * y[i];
        tn += v * v;
        tg += g[i] * v;
    }
    let sum = |a: [f32; L], t: f32| a.iter().sum::<f32>() + t;
    (sum(yy, ty), sum(nn, tn), sum(gd, tg))
}

/// `(ln sigmoid(t), ln sigmoid(-t))` from one exponential and one
/// logarithm, stable for large `|t|`.
fn log_sigmoid_pair(t: f64) -> (f64, f64) {
    let e = (-t.abs()).exp().ln_1p();
    if t >= 0.0 {
        (-e, -t - e)
    } else {
        (t - e, -e)
    }
}

fn sigmoid(t: f64) -> f64 {
    1.0 / (1.0 + (-t).exp())
}

/// KL from FP32's two-class distribution (image `a`) to the one with
/// margin `b`.
fn kl2(a: &Margin, b: f64) -> f64 {
    let (ln_b, ln_not_b) = log_sigmoid_pair(b);
    (a.p * (a.ln_p - ln_b) + (1.0 - a.p) * (a.ln_q - ln_not_b)).max(0.0)
}

/// Top-1, and SQNR, mean two-class KL and JS divergence of estimated
/// margins `est` against FP32's; `pred(image, margin)` is the predicted
/// class. Also each image's JS divergence.
fn outcome(
    margins: &[Margin],
    est: &[f64],
    pred: impl Fn(usize, f64) -> usize,
) -> (Outcome, Vec<f64>) {
    let (mut sig, mut noise, mut kl, mut correct) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    let mut js = MeanError::default();
    let mut images = Vec::with_capacity(margins.len());
    for (s, (mg, &e)) in margins.iter().zip(est).enumerate() {
        let m = mg.m as f64;
        sig += m * m;
        noise += (e - m) * (e - m);
        kl += kl2(mg, e);
        let (p, q) = (mg.p, sigmoid(e));
        let v = js_divergence(&[p, 1.0 - p], &[q, 1.0 - q]);
        js.add(v);
        images.push(v);
        correct += usize::from(pred(s, e) == mg.label);
    }
    let n = margins.len().max(1) as f64;
    let o = Outcome {
        top1: correct as f64 / n,
        sqnr_db: sqnr_db(sig, noise),
        kl: kl / n,
        js: js.mean(),
        js_stderr: js.stderr(),
    };
    (o, images)
}

/// One sub-batch: its recorded tensors, inputs and labels. The images
/// past the labels are padding ([`pad_batch`]): they run, but count
/// nowhere.
struct Part<'a> {
    rec: &'a Recording,
    x: &'a [f32],
    shape: Vec<usize>,
    labels: &'a [usize],
}

/// `x` (`[n, ...]`, `n >= 1`) followed by copies of its last image up to
/// `batch` images.
fn pad_batch(x: &ndarray::ArrayD<f32>, batch: usize) -> Result<ndarray::ArrayD<f32>> {
    let data = x
        .as_slice()
        .ok_or_else(|| invalid("input batch is not contiguous"))?;
    let n = x.shape().first().copied().unwrap_or(0);
    let per = data.len() / n.max(1);
    let mut out = Vec::with_capacity(batch * per);
    out.extend_from_slice(data);
    for _ in n..batch {
        out.extend_from_within(data.len() - per..data.len());
    }
    let mut shape = x.shape().to_vec();
    shape[0] = batch;
    ndarray::ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(invalid)
}

/// What one sub-batch contributes.
struct PartResult {
    margins: Vec<Margin>,
    /// Per node, per image: the first-order margin change.
    d: Vec<Vec<f32>>,
    /// The same from the node's weights alone (empty without the split).
    dw: Vec<Vec<f32>>,
    /// Per node: sums of `y^2` and `δ^2` over the node's output.
    signal: Vec<f64>,
    noise: Vec<f64>,
}

/// One input of the probes' session: renamed input, shape, data.
type ProbeInput<'p> = (String, &'p [usize], &'p [f32]);

/// Everything the sub-batch workers share.
struct Context<'a> {
    /// The backward pass from the logits to every probe's output.
    pass: Backward<'a>,
    probes: &'a [Probe],
    /// Every quantized probe's quantized output ([`probes_session`]).
    session: Option<&'a Session>,
    /// With the split asked for: every probe's output with only its
    /// weights quantized ([`probes_session`] with `weights_only`).
    weights: Option<&'a Session>,
    /// Whether the analysis splits each node's error between its weights
    /// and its activations.
    split: bool,
    input: &'a str,
    output: &'a str,
    by_output: HashMap<&'a str, usize>,
    classes: usize,
}

impl Context<'_> {
    /// Compiles the plans of the recorded pass and of the probes' session,
    /// and prepares the backward pass's convolutions, for every sub-batch
    /// size in `jobs`, before the workers start: otherwise every worker's
    /// first sub-batch compiles its own copy of both plans at the same
    /// time as the other (on a ResNet-50 fixture analysis, 14-19 ms each
    /// for the probes' plan where one compilation alone takes about 8-10),
    /// and one waits on the other's backward preparation. Best effort: what
    /// fails here (a shape inference cannot give) is prepared by the
    /// workers on first use, which report any error.
    fn prepare(
        &self,
        fp32: &Session,
        graph: &Graph,
        jobs: &[(usize, usize, usize)],
        [c, h, w]: [usize; 3],
    ) {
        let mut sizes: Vec<usize> = jobs.iter().map(|j| j.2).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for n in sizes {
            let shape = [n, c, h, w];
            let given = HashMap::from([(self.input.to_string(), shape.to_vec())]);
            let Ok(shapes) = qint8_graph::shape::infer(graph, &given) else {
                continue;
            };
            let shapes: HashMap<String, Vec<usize>> =
                shapes.into_iter().map(|(k, v)| (k, v.shape)).collect();
            let plans = || {
                if fp32.prepare_recording(&[(self.input, &shape[..])]).is_err() {
                    return;
                }
                for (session, weights_only) in [(self.session, false), (self.weights, true)] {
                    let Some(session) = session else {
                        continue;
                    };
                    let mut ins: Vec<(String, &[usize])> = Vec::new();
                    for (renamed, name) in self.probe_input_names(weights_only) {
                        let Some(s) = shapes.get(name) else {
                            return;
                        };
                        ins.push((renamed, s));
                    }
                    let ins: Vec<(&str, &[usize])> =
                        ins.iter().map(|(n, s)| (n.as_str(), *s)).collect();
                    let _ = session.plan(&ins);
                }
            };
            // The backward convolutions on one worker while the other
            // compiles both plans.
            fp32.install(|| {
                rayon::join(plans, || {
                    let _ = self.pass.prepare(&shapes);
                })
            });
        }
    }

    fn value<'p>(&self, part: &'p Part<'_>, name: &str) -> Result<(&'p [usize], &'p [f32])> {
        if name == self.input {
            return Ok((&part.shape, part.x));
        }
        part.rec
            .get(name)
            .ok_or_else(|| invalid(format!("{name} was not recorded")))
    }

    /// One run of the probes' session on this sub-batch: every quantized
    /// probe's output with its inputs (and weights) quantized, left in the
    /// run's buffer (`None` when no probe is quantized). With `weights_only`,
    /// the same from the weights-only graph.
    fn quantized_outputs(&self, part: &Part<'_>, weights_only: bool) -> Result<Option<Recording>> {
        let session = if weights_only {
            self.weights
        } else {
            self.session
        };
        let Some(session) = session else {
            return Ok(None);
        };
        let mut views = Vec::new();
        for (name, shape, xs) in self.probe_inputs(part, weights_only)? {
            let view = ndarray::ArrayViewD::from_shape(IxDyn(shape), xs).map_err(invalid)?;
            views.push((name, view));
        }
        let views: Vec<(&str, _)> = views.iter().map(|(n, v)| (n.as_str(), v.view())).collect();
        session.run_here_kept(&views).map(Some).map_err(invalid)
    }

    /// The probes' session's inputs for this sub-batch: every quantized
    /// probe's inputs under their renamed names (with `weights_only`, those
    /// of the probes that quantize a weight).
    fn probe_inputs<'p>(
        &self,
        part: &'p Part<'_>,
        weights_only: bool,
    ) -> Result<Vec<ProbeInput<'p>>> {
        let mut ins = Vec::new();
        for (renamed, name) in self.probe_input_names(weights_only) {
            let (shape, xs) = self.value(part, name)?;
            ins.push((renamed, shape, xs));
        }
        Ok(ins)
    }

    /// `(name in the probes' graph, recorded name)` of every input of the
    /// probes' session ([`probes_session`], with or without `weights_only`).
    fn probe_input_names(&self, weights_only: bool) -> impl Iterator<Item = (String, &str)> {
        self.probes
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.runs(weights_only))
            .flat_map(|(k, p)| p.inputs.iter().map(move |n| (probe_name(k, n), n.as_str())))
    }

    /// Node `k`'s output power and error statistics given the gradient `g`
    /// of every image's margin at its output: `Σ y²`, `Σ δ²` and, per
    /// image (into `d`), `<g, δ>`, where `δ` is its quantized output (in
    /// `quantized`) less its FP32 output `y`, plus the rounding of the
    /// residual it fuses; no error for a node left in float.
    ///
    /// With the split, `dw` gets `<g, δ_w>` per image, `δ_w` its output with
    /// only its weights quantized (in `weights_only`) less `y`.
    #[allow(clippy::too_many_arguments)]
    fn error_terms(
        &self,
        part: &Part<'_>,
        k: usize,
        quantized: Option<&Recording>,
        weights_only: Option<&Recording>,
        g: &[f32],
        d: &mut [f32],
        dw: &mut [f32],
    ) -> Result<(f64, f64)> {
        let probe = &self.probes[k];
        let (_, y) = self.value(part, &probe.output)?;
        // Images past `d` are padding.
        let per = y.len() / part.shape[0].max(1);
        if let Some(rec) = weights_only.filter(|_| probe.weights_quantized) {
            let (_, qw) = rec
                .get(&probe_name(k, &probe.output))
                .ok_or_else(|| invalid(format!("{}: no weights-only output", probe.output)))?;
            if qw.len() != y.len() || g.len() != y.len() {
                return Err(invalid(format!(
                    "{}: weights-only output or gradient size differs",
                    probe.output
                )));
            }
            for (s, ds) in dw.iter_mut().enumerate() {
                let at = s * per..(s + 1) * per;
                *ds = error_dots(&qw[at.clone()], &y[at.clone()], None, &g[at]).2;
            }
        }
        let q = match quantized {
            Some(rec) if probe.quantized => {
                rec.get(&probe_name(k, &probe.output))
                    .ok_or_else(|| invalid(format!("{}: no quantized output", probe.output)))?
                    .1
            }
            _ => {
                let y = &y[..(d.len() * per).min(y.len())];
                return Ok((dot(y, y), 0.0));
            }
        };
        if q.len() != y.len() || g.len() != y.len() {
            return Err(invalid(format!(
                "{}: quantized output or gradient size differs",
                probe.output
            )));
        }
        // A broadcast residual's error spreads over the output in a way
        // this sum does not follow; it is left out (and shows only in the
        // real quantized evaluation).
        let residual = match &probe.residual {
            Some((name, params)) => {
                let (shape, r) = self.value(part, name)?;
                match r.len() == y.len() {
                    true => {
                        let mut e = fake_quant(r, shape, params).map_err(invalid)?;
                        e.iter_mut().zip(r).for_each(|(a, b)| *a -= b);
                        Some(e)
                    }
                    false => None,
                }
            }
            None => None,
        };
        let (mut signal, mut noise) = (0.0f64, 0.0f64);
        for (s, ds) in d.iter_mut().enumerate() {
            let at = s * per..(s + 1) * per;
            let e = residual.as_ref().map(|e| &e[at.clone()]);
            let (yy, nn, gd) = error_dots(&q[at.clone()], &y[at.clone()], e, &g[at]);
            signal += yy as f64;
            noise += nn as f64;
            *ds = gd;
        }
        Ok((signal, noise))
    }

    fn run(&self, part: &Part<'_>) -> Result<PartResult> {
        // `n` images count, of `all` that ran (the rest is padding).
        let (n, all) = (part.labels.len(), part.shape[0]);
        let mut r = PartResult {
            margins: Vec::with_capacity(n),
            d: vec![vec![0.0; n]; self.probes.len()],
            dw: vec![vec![0.0; if self.split { n } else { 0 }]; self.probes.len()],
            signal: vec![0.0; self.probes.len()],
            noise: vec![0.0; self.probes.len()],
        };
        let logits = self.value(part, self.output)?.1;
        let classes = self.classes;
        if logits.len() != all * classes {
            return Err(invalid(format!(
                "output {} is not [batch, {classes}]",
                self.output
            )));
        }
        r.margins = logits
            .chunks_exact(classes)
            .zip(part.labels)
            .map(|(row, &l)| margin(row, l))
            .collect();
        // The gradient of every image's margin z_top - z_second (zero for
        // the padding).
        let mut seed = vec![0.0f32; all * classes];
        for (s, mg) in r.margins.iter().enumerate() {
            seed[s * classes + mg.top] = 1.0;
            seed[s * classes + mg.second] = -1.0;
        }
        let mut vals: Values<'_> = part
            .rec
            .iter()
            .map(|(k, shape, data)| (k.to_string(), Value { shape, data }))
            .collect();
        vals.insert(
            self.input.to_string(),
            Value {
                shape: &part.shape,
                data: part.x,
            },
        );
        // All quantized outputs at once; each node's error terms are taken
        // when its gradient is complete.
        let quantized = self.quantized_outputs(part, false)?;
        let weights_only = match self.split {
            true => self.quantized_outputs(part, true)?,
            false => None,
        };
        let mut failed: Option<AnalysisError> = None;
        let done = self.pass.run(&vals, &seed, &mut |name, g| {
            let k = self.by_output[name];
            match self.error_terms(
                part,
                k,
                quantized.as_ref(),
                weights_only.as_ref(),
                g,
                &mut r.d[k],
                &mut r.dw[k],
            ) {
                Ok((signal, noise)) => {
                    r.signal[k] = signal;
                    r.noise[k] = noise;
                    Ok(())
                }
                Err(e) => {
                    // Stop the pass; the analysis error is returned below.
                    let msg = e.to_string();
                    failed = Some(e);
                    Err(RuntimeError::Gradient(msg))
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        done.map_err(invalid)?;
        Ok(r)
    }
}

/// Bytes the recorded FP32 pass and the values held beside it may take at
/// once. Smaller batches also ran faster on large inputs (a 224x224
/// ResNet-50: docs/results.md).
const RECORD_BUDGET: usize = 1 << 29;

/// `batch`, made smaller where recording every activation of that many
/// images, plus the values named in `held` (once per mention), would pass
/// [`RECORD_BUDGET`] (large inputs: a 224x224 ResNet-50 records about
/// 0.1 GB per image).
fn recording_batch(
    graph: &Graph,
    input: &str,
    image: [usize; 3],
    batch: usize,
    held: &[&str],
) -> Result<usize> {
    let one = HashMap::from([(input.to_string(), vec![1, image[0], image[1], image[2]])]);
    let shapes = qint8_graph::shape::infer(graph, &one).map_err(invalid)?;
    let floats: usize = graph
        .nodes
        .iter()
        .flat_map(|n| &n.outputs)
        .filter_map(|o| shapes.get(o))
        .filter(|v| v.dtype == DataType::Float && v.value.is_none())
        .map(|v| v.shape.iter().product::<usize>())
        .sum::<usize>()
        + held
            .iter()
            .filter_map(|o| shapes.get(*o))
            .map(|v| v.shape.iter().product::<usize>())
            .sum::<usize>();
    Ok(batch.clamp(1, (RECORD_BUDGET / (4 * floats.max(1))).max(1)))
}

/// See the module docs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn analyze(
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
    let nodes = analyzed_nodes(graph, plan)?;
    if graph.inputs.len() != 1 || graph.outputs.is_empty() {
        return Err(AnalysisError::Invalid(
            "sensitivity needs one image input and [batch, classes] logits as the first output"
                .into(),
        ));
    }
    let input = graph.inputs[0].name.clone();
    let output = graph.outputs[0].name.clone();
    let outs: Vec<&str> = nodes
        .iter()
        .map(|&i| graph.nodes[i].outputs[0].as_str())
        .collect();
    // Prepared before anything runs, so a model it cannot differentiate
    // fails at once.
    let pass = Backward::new(graph, &outs, &output).map_err(|e| match e {
        RuntimeError::NoGradient(ops) => AnalysisError::Invalid(format!(
            "the linearized analysis has no gradient for {} (between the quantized nodes and the output); the exact analysis runs any model",
            ops.join(", ")
        )),
        other => invalid(other),
    })?
    // Like the FP32 session below: each worker runs a sub-batch.
    .with_many_images(true);
    let total = data.len();
    // The plan as given: one real evaluation, the unit of the cost.
    let t = Instant::now();
    let (int8_acc, int8_logits) = run(model, graph, Some(plan), data, batch, threads)?;
    let eval_seconds = t.elapsed().as_secs_f64();
    let classes = int8_acc.classes;
    if classes < 2 {
        return Err(AnalysisError::Invalid(format!(
            "the output has {classes} class(es); sensitivity needs at least 2"
        )));
    }
    let fp32 = Session::from_graph(
        graph.clone(),
        SessionOptions {
            threads,
            simplify: false,
            fuse: false,
            // Each worker runs a sub-batch on its own thread.
            many_images: true,
            ..Default::default()
        },
    )
    .map_err(invalid)?;
    let mut probes: Vec<Probe> = Vec::with_capacity(nodes.len());
    for &i in &nodes {
        let node = &graph.nodes[i];
        let float = plan.precision_of(&node.name) == Precision::Float;
        probes.push(Probe {
            node: i,
            quantized: !float,
            weights_quantized: !float
                && node
                    .inputs
                    .iter()
                    .any(|n| graph.initializers.contains_key(n) && plan.weights.contains_key(n)),
            inputs: node
                .inputs
                .iter()
                .filter(|n| !n.is_empty() && !graph.initializers.contains_key(*n))
                .cloned()
                .collect(),
            output: node.outputs[0].clone(),
            residual: match fused_adds(graph, plan, node)[..] {
                [(_, r)] if !float && graph.consumers(&node.outputs[0]).len() == 1 => {
                    plan.activations.get(r).map(|p| (r.to_string(), p.clone()))
                }
                _ => None,
            },
        });
    }
    let session = probes_session(graph, &probes, plan, false, threads)?
        .map(|s| s.sharing_buffers_with(&fp32));
    let weights = match split {
        true => probes_session(graph, &probes, plan, true, threads)?
            .map(|s| s.sharing_buffers_with(&fp32)),
        false => None,
    };
    let ctx = Context {
        pass,
        probes: &probes,
        session: session.as_ref(),
        weights: weights.as_ref(),
        split,
        input: &input,
        output: &output,
        by_output: outs.iter().enumerate().map(|(k, o)| (*o, k)).collect(),
        classes,
    };
    let mut margins: Vec<Margin> = Vec::with_capacity(total);
    // d[k][s]: node k's first-order margin change on image s; dw[k][s], that
    // of its weights alone (with the split).
    let mut d: Vec<Vec<f32>> = vec![Vec::with_capacity(total); nodes.len()];
    let mut dw: Vec<Vec<f32>> = vec![Vec::new(); nodes.len()];
    let (mut signal, mut noise) = (vec![0.0f64; nodes.len()], vec![0.0f64; nodes.len()]);
    // One per thread of the session's pool (its resolved count where `threads` is 0).
    let workers = fp32.threads().max(1);
    // Beside the record: the probes' session's buffer, which holds every
    // quantized probe's output until the backward pass is done, and its
    // intermediates (up to the size of the probes' inputs), and the
    // backward pass's gradients (about the outputs' size again).
    let held: Vec<&str> = probes
        .iter()
        .filter(|p| p.quantized)
        .flat_map(|p| {
            p.inputs
                .iter()
                .chain([&p.output, &p.output])
                .map(String::as_str)
        })
        // With the split, the weights-only outputs too.
        .chain(
            probes
                .iter()
                .filter(|p| split && p.weights_quantized)
                .map(|p| p.output.as_str()),
        )
        .collect();
    let batch = recording_batch(graph, &input, data.input_shape(), batch, &held)?;
    // Sub-batches as (first image, images, images run). Batches as the
    // evaluation's, except that a short last batch after full ones, if at
    // least half full, is padded with copies of its last image to the full
    // batch, so that it runs on the plans and backward convolutions
    // prepared for the full batch instead of preparing new ones (about as
    // long as running the padding); the padding's results are dropped.
    // Each batch is cut into one sub-batch per worker where the graph
    // allows.
    let splits = workers > 1 && {
        let [c, h, w] = data.input_shape();
        fp32.splits_batches(&[(input.as_str(), &[batch, c, h, w][..])], batch)
    };
    let mut jobs: Vec<(usize, usize, usize)> = Vec::new();
    let mut from = 0;
    while from < total {
        let len = batch.min(total - from);
        let run = if from > 0 && len < batch && 2 * len >= batch {
            batch
        } else {
            len
        };
        let t = if splits { workers.min(run) } else { 1 };
        let mut at = 0;
        for i in 0..t {
            let n = run / t + usize::from(i < run % t);
            let real = len.saturating_sub(at).min(n);
            if real > 0 {
                jobs.push((from + at, real, n));
            }
            at += n;
        }
        from += len;
    }
    // Each worker records a sub-batch and runs its quantization errors and
    // backward pass, then takes the next one: no barrier between
    // sub-batches or batches. On the FP32 session's persistent workers,
    // whose per-thread kernel buffers stay allocated from one sub-batch to
    // the next, each sub-batch's kernels sequential.
    ctx.prepare(&fp32, graph, &jobs, data.input_shape());
    let job = |j: usize, _: &mut ()| -> Result<PartResult> {
        let (first, real, run) = jobs[j];
        let b = data.batch(first, real).map_err(invalid)?;
        let labels = b.labels.clone().ok_or_else(|| {
            AnalysisError::Invalid("the sensitivity images have no labels".into())
        })?;
        let padded = (real < run)
            .then(|| pad_batch(&b.inputs, run))
            .transpose()?;
        let inputs = padded.as_ref().unwrap_or(&b.inputs);
        let x = inputs
            .as_slice()
            .ok_or_else(|| invalid("input batch is not contiguous"))?;
        let run_part = || {
            let rec = fp32
                .record_here(&[(input.as_str(), inputs.view())])
                .map_err(invalid)?;
            let part = Part {
                rec: &rec,
                x,
                shape: inputs.shape().to_vec(),
                labels: &labels,
            };
            qint8_runtime::kernels::sequential(|| ctx.run(&part))
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run_part))
            .unwrap_or_else(|_| Err(invalid("a sensitivity worker panicked")))
    };
    let mut results: Vec<Option<PartResult>> = (0..jobs.len()).map(|_| None).collect();
    let mut finished = 0;
    let mut states = vec![(); workers];
    fp32.pull(jobs.len(), &mut states, &job, &mut |j, r| {
        finished += jobs[j].1;
        results[j] = Some(r);
        progress(finished, total);
    })?;
    for r in results {
        let r = r.ok_or_else(|| invalid("a sub-batch did not run"))?;
        margins.extend(r.margins);
        for (k, (v, w)) in r.d.into_iter().zip(r.dw).enumerate() {
            d[k].extend(v);
            dw[k].extend(w);
            signal[k] += r.signal[k];
            noise[k] += r.noise[k];
        }
    }
    if int8_logits.len() != margins.len() * classes {
        return Err(invalid(
            "the quantized evaluation saw a different number of images",
        ));
    }
    let fp32_top1 =
        margins.iter().filter(|m| m.top == m.label).count() as f64 / margins.len().max(1) as f64;
    // The quantized network's margin between FP32's two classes, and its prediction.
    let mq: Vec<(f64, usize)> = int8_logits
        .chunks_exact(classes)
        .zip(&margins)
        .map(|(row, mg)| ((row[mg.top] - row[mg.second]) as f64, argmax(row)))
        .collect();
    // The real quantized run, measured on the same margin as the nodes.
    let two = |s: usize, e: f64| {
        if e >= 0.0 {
            margins[s].top
        } else {
            margins[s].second
        }
    };
    let int8_margin: Vec<f64> = mq.iter().map(|&(m, _)| m).collect();
    let int8 = Outcome {
        top1: int8_acc.score.top1_fraction(),
        ..outcome(&margins, &int8_margin, two).0
    };
    // Per image, how far the first-order changes can be trusted. Where
    // their sum stays within the margin they are used as they are; where it
    // exceeds it (one node's error as large as the decision itself: the
    // network no longer responds linearly), they are scaled down by the
    // ratio of the real quantized network's margin change to that sum, at
    // most 1.
    let share: Vec<f64> = margins
        .iter()
        .zip(&mq)
        .enumerate()
        .map(|(s, (mg, &(m, _)))| {
            let sum: f64 = d.iter().map(|v| v[s] as f64).sum();
            if sum.abs() <= (mg.m as f64).abs() || sum.abs() <= f64::EPSILON {
                1.0
            } else {
                ((m - mg.m as f64) / sum).clamp(0.0, 1.0)
            }
        })
        .collect();
    let node_outcome = |k: usize| {
        let node = &graph.nodes[probes[k].node];
        // FP32's margin moved by a share of the first-order change `part`.
        let est = |part: &dyn Fn(usize) -> f64| -> Vec<f64> {
            margins
                .iter()
                .zip(&share)
                .enumerate()
                .map(|(s, (mg, &rho))| mg.m as f64 + rho * part(s))
                .collect()
        };
        let (alone, alone_js) = outcome(&margins, &est(&|s| d[k][s] as f64), two);
        // The node's weights alone, and the rest of its error (its inputs
        // and the residual it fuses; to first order, the two add up).
        let split = split.then(|| {
            let w = |s: usize| dw[k].get(s).map_or(0.0, |&v| v as f64);
            let weights = outcome(&margins, &est(&w), two).0;
            let a = |s: usize| d[k][s] as f64 - w(s);
            let activations = outcome(&margins, &est(&a), two).0;
            Split {
                weights,
                activations,
            }
        });
        // The real quantized margin loses this node's share of its error.
        let float_est: Vec<f64> = mq
            .iter()
            .zip(&d[k])
            .zip(&share)
            .map(|((&(m, _), &dv), &rho)| m - rho * dv as f64)
            .collect();
        let (float, _) = outcome(&margins, &float_est, |s, e| {
            let (mg, q) = (margins[s], mq[s].1);
            if q == mg.top || q == mg.second {
                two(s, e)
            } else {
                q
            }
        });
        let n = NodeSensitivity {
            node: node.name.clone(),
            op: node.op.op_type(),
            alone,
            float,
            output_sqnr_db: Some(sqnr_db(signal[k], noise[k])),
            top_set_z: None,
            split,
        };
        (n, alone_js)
    };
    // Nodes split over the workers (a few logarithms per node and image).
    let count = probes.len();
    let per = count.div_ceil(workers).max(1);
    let out: Vec<(NodeSensitivity, Vec<f64>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(per)
            .map(|first| {
                let node_outcome = &node_outcome;
                scope.spawn(move || {
                    (first..(first + per).min(count))
                        .map(node_outcome)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| invalid("a sensitivity worker panicked"))
            })
            .collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let (nodes, alone_js): (Vec<_>, Vec<_>) = out.into_iter().unzip();
    let mut s = Sensitivity {
        method: Method::Linearized,
        images: margins.len(),
        fp32_top1,
        int8,
        nodes,
        eval_seconds,
        seconds: 0.0,
    };
    set_top_set_z(&mut s, &alone_js);
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qint8_graph::{Node, Op};

    #[test]
    fn error_dots_equal_the_materialized_sums() {
        for len in [0usize, 1, 15, 16, 17, 100] {
            let f = |k: usize, i: usize| ((i * 37 + k * 11) % 19) as f32 / 7.0 - 1.3;
            let (q, y, e, g): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..len).map(|i| f(1, i)).collect(),
                (0..len).map(|i| f(2, i)).collect(),
                (0..len).map(|i| f(3, i) * 0.01).collect(),
                (0..len).map(|i| f(4, i)).collect(),
            );
            for e in [None, Some(&e[..])] {
                let delta: Vec<f64> = (0..len)
                    .map(|i| ((q[i] - y[i]) + e.map_or(0.0, |e| e[i])) as f64)
                    .collect();
                let nn: f64 = delta.iter().map(|d| d * d).sum();
                let gd: f64 = delta.iter().zip(&g).map(|(d, &g)| d * g as f64).sum();
                let yy: f64 = y.iter().map(|&v| v as f64 * v as f64).sum();
                let (s, a, b) = error_dots(&q, &y, e, &g);
                assert!(
                    (s as f64 - yy).abs() <= 1e-4 * (1.0 + yy),
                    "{len}: {s} vs {yy}"
                );
                assert!(
                    (a as f64 - nn).abs() <= 1e-4 * (1.0 + nn),
                    "{len}: {a} vs {nn}"
                );
                assert!(
                    (b as f64 - gd).abs() <= 1e-4 * (1.0 + gd.abs()),
                    "{len}: {b} vs {gd}"
                );
            }
        }
    }

    #[test]
    fn recording_batch_keeps_the_recorded_pass_within_its_budget() {
        let graph = Graph {
            name: "g".into(),
            inputs: vec![ValueInfo::f32("x", &[1, 2, 8, 8])],
            outputs: vec![ValueInfo::f32("y", &[1, 2, 8, 8])],
            nodes: vec![
                Node::new("a", Op::Relu, &["x"], &["r"]),
                Node::new("b", Op::Sigmoid, &["r"], &["y"]),
            ],
            initializers: Default::default(),
            value_info: vec![],
        };
        // Two recorded tensors of 128 floats per image.
        let per_image = 2 * 128 * 4;
        assert_eq!(
            recording_batch(&graph, "x", [2, 8, 8], 64, &[]).unwrap(),
            64
        );
        assert_eq!(
            recording_batch(&graph, "x", [2, 8, 8], usize::MAX, &[]).unwrap(),
            RECORD_BUDGET / per_image
        );
        // Larger images, proportionally fewer of them.
        assert_eq!(
            recording_batch(&graph, "x", [2, 64, 64], usize::MAX, &[]).unwrap(),
            RECORD_BUDGET / (per_image * 64)
        );
        assert_eq!(recording_batch(&graph, "x", [2, 8, 8], 0, &[]).unwrap(), 1);
        // Values held beside the record count once per mention.
        assert_eq!(
            recording_batch(&graph, "x", [2, 8, 8], usize::MAX, &["r", "r"]).unwrap(),
            RECORD_BUDGET / (per_image + 2 * 128 * 4)
        );
    }
}
