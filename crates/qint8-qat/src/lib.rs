//! Quantization-aware training (QAT) for qint8.
//!
//! [`train`] fine-tunes the float weights and biases of a calibrated model
//! (the graph and [`QuantPlan`] that calibration returns) with INT8
//! quantization simulated in the forward pass, so that the weights adapt to
//! the rounding and clipping they will see:
//!
//! - every activation the plan quantizes passes through QuantizeLinear ->
//!   DequantizeLinear at its calibrated range, which stays fixed unless
//!   [`QatConfig::learn_ranges`] trains it too (learned step sizes);
//! - every quantized weight is fake-quantized at each step with the scale
//!   it will be exported with (symmetric, narrow range, `max |W| / 127` per
//!   output channel or per tensor, as in the plan), so training sees the
//!   exported weights' rounding;
//! - gradients pass through both straight (the straight-through estimator),
//!   except where an activation saturates (the clipping mask);
//! - softmax cross-entropy against the labels, SGD with momentum, a cosine
//!   learning-rate schedule, and optional weight decay.
//!
//! The result is the float graph with the trained weights and the plan with
//! its weight scales recomputed from them: `insert_qdq` of the two is the
//! QDQ model, with the same ranges TensorRT or onnxruntime read from it.
//!
//! [`train_validated`] also scores the exported model on held-out images
//! before training and after every epoch, returns the best of those models
//! (the calibrated one included, so training never hands back a model that
//! scores worse there than PTQ's), and can stop once the score stops
//! improving.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use ndarray::{ArrayViewD, IxDyn};
use qint8_calibration::dataset::sample::SplitMix64;
use qint8_calibration::{weight_params, ImageDataset};
use qint8_graph::quant::insert_qdq;
use qint8_graph::{Graph, Op, Precision, QuantPlan, Tensor, WeightStorage};
use qint8_runtime::grad::{Backward, Value, Values};
use qint8_runtime::{Session, SessionOptions};

/// Errors of quantization-aware training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QatError {
    /// A setting is out of range.
    #[error("invalid QAT setting: {0}")]
    Config(String),
    /// The training data cannot be trained on (no labels, empty, labels
    /// beyond the model's classes).
    #[error("training data: {0}")]
    Data(String),
    /// The model or plan cannot be trained (nothing to train, an output
    /// that is not `[batch, classes]` logits).
    #[error("model: {0}")]
    Model(String),
    /// The loss or the weights became NaN or infinite.
    #[error("training diverged at epoch {epoch}, step {step}: the loss is {loss}; lower the learning rate")]
    Diverged {
        /// Epoch (from 1).
        epoch: usize,
        /// Step within the epoch (from 1).
        step: usize,
        /// The loss.
        loss: f64,
    },
    /// From the graph crate.
    #[error(transparent)]
    Graph(#[from] qint8_graph::GraphError),
    /// From the runtime (including the backward pass).
    #[error(transparent)]
    Runtime(#[from] qint8_runtime::RuntimeError),
    /// From the calibration crate (data access, weight scales).
    #[error(transparent)]
    Calibration(#[from] qint8_calibration::CalibError),
    /// From the quantization math.
    #[error(transparent)]
    Math(#[from] qint8_math::MathError),
    /// From scoring the validation images.
    #[error(transparent)]
    Eval(#[from] qint8_eval::EvalError),
}

/// `Result` with [`QatError`].
pub type Result<T, E = QatError> = std::result::Result<T, E>;

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QatConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate; it follows a cosine from there to zero over all
    /// steps. Fine-tuning wants a small one (about 1% of the rate the
    /// model was trained with).
    pub lr: f32,
    /// SGD momentum, in `[0, 1)`.
    pub momentum: f32,
    /// L2 weight decay on the weights (not the biases).
    pub weight_decay: f32,
    /// Seed of the order the images are visited in.
    pub seed: u64,
    /// Worker threads (0: one per available core).
    pub threads: usize,
    /// Also learn each quantized activation's step size (its scale, and so
    /// its range), starting from the calibrated one, with the learned step
    /// size gradient (LSQ) scaled by `1 / sqrt(elements per image * 127)`.
    /// Off: the calibrated ranges stay fixed.
    pub learn_ranges: bool,
}

impl Default for QatConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch: 32,
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 0,
            threads: 0,
            learn_ranges: false,
        }
    }
}

impl QatConfig {
    /// Checks every setting's range ([`train`] does too): an error names
    /// the first one out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(QatError::Config(what));
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("the batch must hold at least 1 image".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!(
                "the learning rate must be positive and finite, got {}",
                self.lr
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay must be >= 0 and finite, got {}",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// What one epoch measured, on the fake-quantized network as it trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochStats {
    /// Epoch (from 1).
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's images.
    pub loss: f64,
    /// Share of the epoch's images classified right (0 to 1).
    pub top1: f64,
    /// Wall time of the epoch.
    pub seconds: f64,
    /// The exported model's score on the validation images after this
    /// epoch ([`train_validated`] only).
    pub validation: Option<ValidationScore>,
}

/// Held-out labeled images that choose which model [`train_validated`]
/// returns, none of them trained on.
#[derive(Debug, Clone, Copy)]
pub struct Validation<'a> {
    /// The images, with labels, of the training images' shape.
    pub data: &'a ImageDataset,
    /// Stop once this many epochs in a row have not beaten the best score
    /// so far; `None` trains every epoch.
    pub patience: Option<usize>,
}

/// A model's score on the validation images: the QDQ model as it would be
/// exported, run by the INT8 runtime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidationScore {
    /// Share of the images classified right (0 to 1).
    pub top1: f64,
    /// Mean softmax cross-entropy.
    pub loss: f64,
}

impl ValidationScore {
    /// Whether this score is better than `other`: a higher top-1, or the
    /// same top-1 (on the same images, the same count) and a lower loss,
    /// which breaks the ties a few hundred images make common.
    pub fn beats(&self, other: &ValidationScore) -> bool {
        self.top1 > other.top1 || (self.top1 == other.top1 && self.loss < other.loss)
    }
}

/// Scores `graph` quantized by `plan` on the labeled images of `data`: the
/// QDQ model (int8 weights) as [`insert_qdq`] writes it, run on `threads`
/// threads (0: all cores) by the runtime that `qint8 eval` uses.
pub fn validation_score(
    graph: &Graph,
    plan: &QuantPlan,
    data: &ImageDataset,
    threads: usize,
) -> Result<ValidationScore> {
    let labels = data.labels().ok_or_else(|| {
        QatError::Data("the validation images have no labels; scoring needs them".into())
    })?;
    let qdq = qint8_graph::Model::new(insert_qdq(graph, plan, WeightStorage::Int8)?, 13);
    let evaluator = qint8_eval::Evaluator::new(&qdq, "the validation model", threads)?;
    let (accuracy, logits) = evaluator.evaluate_logits(data, 64, &mut |_| {})?;
    let classes = logits.len() / labels.len();
    let (_, loss, _) = cross_entropy(&logits, classes, labels)?;
    Ok(ValidationScore {
        top1: accuracy.score.top1_fraction(),
        loss: loss / labels.len() as f64,
    })
}

/// Where training is, after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Epoch (from 1).
    pub epoch: usize,
    /// Steps done in this epoch.
    pub step: usize,
    /// Steps per epoch.
    pub steps: usize,
    /// Mean loss of the epoch so far.
    pub loss: f64,
}

/// The trained model.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The float graph with the trained weights and biases.
    pub graph: Graph,
    /// The plan, its weight scales recomputed from the trained weights;
    /// activation ranges as calibrated, or as learned with
    /// [`QatConfig::learn_ranges`].
    pub plan: QuantPlan,
    /// One entry per epoch trained (fewer than configured when
    /// [`Validation::patience`] stopped training).
    pub epochs: Vec<EpochStats>,
    /// The epoch whose model this is: the last one trained, or with
    /// validation the best-scoring one, where 0 is the model as it came
    /// (graph and plan unchanged) when no epoch beat it.
    pub kept_epoch: usize,
    /// The score of the model as it came, before training ([`train_validated`] only).
    pub calibrated_validation: Option<ValidationScore>,
}

/// One trained tensor.
struct Param {
    name: String,
    shape: Vec<usize>,
    value: Vec<f32>,
    velocity: Vec<f32>,
    /// Output-channel axis of its weight scales; `None` for a bias or a
    /// weight that stays float.
    quantized: Option<QuantizedWeight>,
    /// For an activation's scale: the activation it quantizes and the
    /// factor its gradient is scaled by (LSQ's `1 / sqrt(N * Qp)`).
    step_size: Option<(String, f32)>,
    /// The least value an entry may take (step sizes stay positive).
    floor: f32,
}

#[derive(Clone, Copy)]
struct QuantizedWeight {
    axis: usize,
    per_channel: bool,
}

/// Fine-tunes `graph`'s Conv and Gemm weights and biases with the
/// quantization of `plan` simulated (see the crate documentation), on the
/// labeled images of `data`. `graph` must be the graph the plan was made
/// for (calibration's simplified graph), its first output
/// `[batch, classes]` logits. `progress` is called after every step.
pub fn train(
    graph: &Graph,
    plan: &QuantPlan,
    data: &ImageDataset,
    config: &QatConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Trained> {
    train_with_epochs(graph, plan, data, config, progress, &mut |_, _, _| Ok(()))
}

/// [`train`], also handing `epoch_end` the model as it stands after each
/// epoch (its stats, the float graph and the plan, as [`Trained`] would
/// hold them), to score or save it; an error from it stops training.
pub fn train_with_epochs(
    graph: &Graph,
    plan: &QuantPlan,
    data: &ImageDataset,
    config: &QatConfig,
    progress: &mut dyn FnMut(&Progress),
    epoch_end: &mut dyn FnMut(&EpochStats, &Graph, &QuantPlan) -> Result<()>,
) -> Result<Trained> {
    train_inner(graph, plan, data, None, config, progress, epoch_end)
}

/// [`train_with_epochs`] with held-out images that choose the model it
/// returns: the exported model is scored on `validation.data` before
/// training and after every epoch ([`EpochStats::validation`]), and the
/// best-scoring one ([`ValidationScore::beats`]) is returned, the
/// untrained one when no epoch beats it ([`Trained::kept_epoch`] 0).
/// With [`Validation::patience`] training stops early. Scoring runs the
/// INT8 runtime over the validation images once per epoch.
pub fn train_validated(
    graph: &Graph,
    plan: &QuantPlan,
    data: &ImageDataset,
    validation: &Validation<'_>,
    config: &QatConfig,
    progress: &mut dyn FnMut(&Progress),
    epoch_end: &mut dyn FnMut(&EpochStats, &Graph, &QuantPlan) -> Result<()>,
) -> Result<Trained> {
    train_inner(
        graph,
        plan,
        data,
        Some(validation),
        config,
        progress,
        epoch_end,
    )
}

fn train_inner(
    graph: &Graph,
    plan: &QuantPlan,
    data: &ImageDataset,
    validation: Option<&Validation<'_>>,
    config: &QatConfig,
    progress: &mut dyn FnMut(&Progress),
    epoch_end: &mut dyn FnMut(&EpochStats, &Graph, &QuantPlan) -> Result<()>,
) -> Result<Trained> {
    config.validate()?;
    if data.is_empty() {
        return Err(QatError::Data("no images".into()));
    }
    let labels = data.labels().ok_or_else(|| {
        QatError::Data("the images have no labels; training needs the class of every image".into())
    })?;
    let input = graph
        .inputs
        .first()
        .map(|i| i.name.clone())
        .ok_or_else(|| QatError::Model("the graph has no input".into()))?;
    let output = graph
        .outputs
        .first()
        .map(|o| o.name.clone())
        .ok_or_else(|| QatError::Model("the graph has no output".into()))?;
    if let Some(v) = validation {
        if v.patience == Some(0) {
            return Err(QatError::Config("patience must be at least 1 epoch".into()));
        }
        if v.data.labels().is_none() {
            return Err(QatError::Data(
                "the validation images have no labels; choosing a model needs them".into(),
            ));
        }
        if v.data.input_shape() != data.input_shape() {
            return Err(QatError::Data(format!(
                "the validation images are {:?} (C, H, W), the training images {:?}",
                v.data.input_shape(),
                data.input_shape()
            )));
        }
    }
    let mut params = trainable(graph, plan)?;
    if params.is_empty() {
        return Err(QatError::Model(
            "no Conv or Gemm has float weights to train".into(),
        ));
    }
    // Activations get their Q/DQ pairs once; weights are fake-quantized
    // into the graph at every step.
    let mut activations = plan.clone();
    activations.weights.clear();
    let mut qgraph = insert_qdq(graph, &activations, WeightStorage::Int8)?;
    if config.learn_ranges {
        let [c, h, w] = data.input_shape();
        params.extend(step_sizes(&qgraph, plan, &[c, h, w])?);
    }
    let wanted: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
    let wanted_refs: Vec<&str> = wanted.iter().map(String::as_str).collect();

    let n = data.len();
    let steps = n.div_ceil(config.batch);
    let total = steps * config.epochs;
    let [c, h, w] = data.input_shape();
    let per = c * h * w;
    let mut rng = SplitMix64::new(config.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut epochs = Vec::with_capacity(config.epochs);
    let mut step_index = 0usize;
    // The best model so far: its epoch, score and (once trained) itself;
    // the untrained model is epoch 0.
    let calibrated_validation = match validation {
        Some(v) => Some(validation_score(graph, plan, v.data, config.threads)?),
        None => None,
    };
    let mut best: (usize, Option<ValidationScore>, Option<(Graph, QuantPlan)>) =
        (0, calibrated_validation, None);
    let mut since_best = 0usize;
    for epoch in 1..=config.epochs {
        let start = Instant::now();
        // Fisher-Yates with the seeded generator.
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for step in 0..steps {
            let idx = &order[step * config.batch..((step + 1) * config.batch).min(n)];
            let mut x = vec![0.0f32; idx.len() * per];
            for (dst, &i) in x.chunks_exact_mut(per).zip(idx) {
                data.batch_into(i, 1, dst)?;
            }
            let y: Vec<usize> = idx.iter().map(|&i| labels[i]).collect();
            for p in &params {
                qgraph.initializers.insert(p.name.clone(), step_tensor(p)?);
            }
            let lr = cosine(config.lr, step_index, total);
            let shape = [idx.len(), c, h, w];
            // The graph moves into the step's session and back out: a model's
            // weights are never held twice.
            let session = step_session(std::mem::take(&mut qgraph), config.threads)?;
            let step_result = gradients(&session, &input, &output, &wanted_refs, &x, &shape, &y);
            qgraph = session.into_graph();
            let (grads, loss, hits) = step_result?;
            if !loss.is_finite() {
                return Err(QatError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: loss / idx.len() as f64,
                });
            }
            loss_sum += loss;
            correct += hits;
            seen += idx.len();
            update(&mut params, &grads, idx.len(), lr, config);
            if params
                .iter()
                .any(|p| p.value.iter().any(|v| !v.is_finite()))
            {
                // The step overflowed the weights: the next loss would be
                // NaN, so say so now.
                return Err(QatError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: f64::INFINITY,
                });
            }
            step_index += 1;
            progress(&Progress {
                epoch,
                step: step + 1,
                steps,
                loss: loss_sum / seen as f64,
            });
        }
        let seconds = start.elapsed().as_secs_f64();
        let (g, p) = assemble(graph, plan, &params)?;
        let score = match validation {
            Some(v) => Some(validation_score(&g, &p, v.data, config.threads)?),
            None => None,
        };
        let stats = EpochStats {
            epoch,
            loss: loss_sum / n as f64,
            top1: correct as f64 / n as f64,
            seconds,
            validation: score,
        };
        epochs.push(stats);
        epoch_end(&stats, &g, &p)?;
        let better = match (score, best.1) {
            (Some(s), Some(b)) => s.beats(&b),
            // Without validation the last epoch is kept, and no other
            // epoch's model is held meanwhile.
            _ => epoch == config.epochs,
        };
        if better {
            best = (epoch, score, Some((g, p)));
            since_best = 0;
        } else {
            since_best += 1;
            if validation
                .and_then(|v| v.patience)
                .is_some_and(|k| since_best >= k)
            {
                break;
            }
        }
    }
    let (kept_epoch, _, model) = best;
    let (graph, plan) = model.unwrap_or_else(|| (graph.clone(), plan.clone()));
    Ok(Trained {
        graph,
        plan,
        epochs,
        kept_epoch,
        calibrated_validation,
    })
}

/// The float graph with the trained weights and biases of `params`, and
/// `plan` with their weight scales and any learned step sizes.
fn assemble(graph: &Graph, plan: &QuantPlan, params: &[Param]) -> Result<(Graph, QuantPlan)> {
    let mut trained = graph.clone();
    for p in params.iter().filter(|p| p.step_size.is_none()) {
        trained.initializers.insert(
            p.name.clone(),
            Tensor::F32(
                ndarray::ArrayD::from_shape_vec(IxDyn(&p.shape), p.value.clone())
                    .map_err(|e| QatError::Model(format!("weight `{}`: {e}", p.name)))?,
            ),
        );
    }
    let mut out_plan = plan.clone();
    for p in params {
        let Some((activation, _)) = &p.step_size else {
            continue;
        };
        if let Some(old) = out_plan.activations.get_mut(activation) {
            let channels: Vec<qint8_math::ChannelParams> = old
                .channels()
                .iter()
                .zip(&p.value)
                .map(|(c, &scale)| qint8_math::ChannelParams { scale, ..*c })
                .collect();
            *old = match (old.axis(), channels.as_slice()) {
                (None, [one]) => qint8_math::QuantParams::per_tensor(*one),
                (Some(axis), _) => qint8_math::QuantParams::per_channel(channels, axis)?,
                (None, _) => {
                    return Err(QatError::Model(format!(
                        "activation `{activation}` has per-tensor parameters but {} scales",
                        p.value.len()
                    )))
                }
            };
        }
    }
    for per_channel in [true, false] {
        let axes: BTreeMap<String, usize> = params
            .iter()
            .filter_map(|p| {
                let q = p.quantized?;
                (q.per_channel == per_channel).then(|| (p.name.clone(), q.axis))
            })
            .collect();
        out_plan
            .weights
            .extend(weight_params(&trained, &axes, per_channel)?);
    }
    Ok((trained, out_plan))
}

/// The Conv and Gemm weights and biases that are float initializers, with
/// how the plan quantizes each weight (if it does for an INT8 consumer).
fn trainable(graph: &Graph, plan: &QuantPlan) -> Result<Vec<Param>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for node in &graph.nodes {
        if !matches!(node.op, Op::Conv(_) | Op::Gemm { .. }) {
            continue;
        }
        for name in node.inputs.iter().skip(1) {
            if name.is_empty() || !seen.insert(name.clone()) {
                continue;
            }
            let Some(t) = graph.initializers.get(name).and_then(Tensor::as_f32) else {
                continue;
            };
            let int8_consumer = graph
                .consumers(name)
                .iter()
                .any(|&k| plan.precision_of(&graph.nodes[k].name) == Precision::Int8);
            let quantized = match plan.weights.get(name) {
                Some(p) if int8_consumer => Some(QuantizedWeight {
                    axis: p.axis().unwrap_or(0),
                    per_channel: p.axis().is_some(),
                }),
                _ => None,
            };
            if let Some(i) = t.iter().position(|v| !v.is_finite()) {
                return Err(QatError::Model(format!(
                    "`{name}` holds a non-finite value at index {i}"
                )));
            }
            out.push(Param {
                name: name.clone(),
                shape: t.shape().to_vec(),
                value: t.iter().copied().collect(),
                velocity: vec![0.0; t.len()],
                quantized,
                step_size: None,
                floor: f32::NEG_INFINITY,
            });
        }
    }
    Ok(out)
}

/// The tensor a step runs with: the weight fake-quantized with the scales
/// it would be exported with, or the value itself.
fn step_tensor(p: &Param) -> Result<Tensor> {
    let data = match p.quantized {
        Some(q) => {
            let params = if q.per_channel {
                let amax = qint8_math::stats::amax_per_channel(&p.value, &p.shape, q.axis)?;
                qint8_math::QuantParams::symmetric_per_channel(
                    &amax,
                    q.axis,
                    qint8_math::QuantDtype::Int8,
                    true,
                )?
            } else {
                let amax = qint8_math::stats::abs_max("weight", &p.value)?;
                qint8_math::QuantParams::symmetric(amax, qint8_math::QuantDtype::Int8, true)?
            };
            qint8_math::quant::fake_quant(&p.value, &p.shape, &params)?
        }
        None => p.value.clone(),
    };
    ndarray::ArrayD::from_shape_vec(IxDyn(&p.shape), data)
        .map(Tensor::F32)
        .map_err(|e| QatError::Model(format!("`{}`: {e}", p.name)))
}

/// The learning rate at `step` of `total`: a cosine from `peak` to zero.
fn cosine(peak: f32, step: usize, total: usize) -> f32 {
    let t = step as f64 / total.max(1) as f64;
    (peak as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
}

/// One SGD step with momentum on the batch's summed gradients.
fn update(
    params: &mut [Param],
    grads: &HashMap<String, Vec<f32>>,
    batch: usize,
    lr: f32,
    c: &QatConfig,
) {
    let inv = 1.0 / batch as f32;
    for p in params.iter_mut() {
        let Some(g) = grads.get(&p.name) else {
            continue;
        };
        let decay = if p.quantized.is_some() || p.shape.len() > 1 {
            c.weight_decay
        } else {
            0.0
        };
        let scale = p.step_size.as_ref().map_or(1.0, |s| s.1);
        for ((w, v), &g) in p.value.iter_mut().zip(&mut p.velocity).zip(g) {
            *v = c.momentum * *v + g * inv * scale + decay * *w;
            *w -= lr * *v;
        }
        if p.step_size.is_some() {
            // A step size must stay positive: no lower than a thousandth
            // of what it was.
            let floor = p.floor;
            p.value.iter_mut().for_each(|s| *s = s.max(floor));
        }
    }
}

/// Per worker: summed gradients, summed loss, correct predictions.
type WorkerSums = (HashMap<String, Vec<f32>>, f64, usize);

/// A session that runs `qgraph` as training records it: every value kept
/// (no fusion), Q/DQ in float, kernels chosen for many images per thread.
fn step_session(qgraph: Graph, threads: usize) -> Result<Session> {
    Ok(Session::from_graph(
        qgraph,
        SessionOptions {
            threads,
            simplify: false,
            fuse: false,
            integer: false,
            batch_parallel: false,
            many_images: true,
        },
    )?)
}

/// `g` added into `sums[name]` (inserted if absent).
fn accumulate(sums: &mut HashMap<String, Vec<f32>>, name: &str, g: &[f32]) {
    match sums.get_mut(name) {
        Some(acc) => acc.iter_mut().zip(g).for_each(|(a, &b)| *a += b),
        None => {
            sums.insert(name.to_string(), g.to_vec());
        }
    }
}

/// The summed gradients of the batch's cross-entropy with respect to
/// `wanted`, the summed loss and the number of right predictions, the
/// batch split among the workers of `session` (a [`step_session`]).
fn gradients(
    session: &Session,
    input: &str,
    output: &str,
    wanted: &[&str],
    x: &[f32],
    shape: &[usize; 4],
    labels: &[usize],
) -> Result<WorkerSums> {
    let backward = Backward::new(session.graph(), wanted, output)?.with_many_images(true);
    let workers = session.threads().clamp(1, shape[0]);
    let per_part = shape[0].div_ceil(workers);
    let parts = shape[0].div_ceil(per_part);
    let per = shape[1] * shape[2] * shape[3];
    let mut states: Vec<WorkerSums> = (0..workers).map(|_| (HashMap::new(), 0.0, 0)).collect();
    let job = |part: usize, state: &mut WorkerSums| -> Result<()> {
        let lo = part * per_part;
        let hi = ((part + 1) * per_part).min(shape[0]);
        let part_shape = [hi - lo, shape[1], shape[2], shape[3]];
        let view = ArrayViewD::from_shape(IxDyn(&part_shape), &x[lo * per..hi * per])
            .map_err(|e| QatError::Model(format!("batch view: {e}")))?;
        let rec = session.record_here(&[(input, view)])?;
        let mut values: Values<'_> = rec
            .iter()
            .map(|(name, s, d)| (name.to_string(), Value { shape: s, data: d }))
            .collect();
        values.insert(
            input.to_string(),
            Value {
                shape: &part_shape,
                data: &x[lo * per..hi * per],
            },
        );
        let (logit_shape, logits) = rec
            .get(output)
            .ok_or_else(|| QatError::Model(format!("the output `{output}` was not computed")))?;
        let classes = match logit_shape {
            [b, k] if *b == hi - lo => *k,
            other => {
                return Err(QatError::Model(format!(
                    "the output `{output}` must be [batch, classes] logits, got shape {other:?}"
                )))
            }
        };
        let (seed, loss, hits) = cross_entropy(logits, classes, &labels[lo..hi])?;
        state.1 += loss;
        state.2 += hits;
        let sums = &mut state.0;
        backward.run(&values, &seed, &mut |name, g| {
            accumulate(sums, name, g);
            Ok(())
        })?;
        Ok(())
    };
    session.pull(parts, &mut states, &job, &mut |_, ()| {})?;
    let mut total: WorkerSums = (HashMap::new(), 0.0, 0);
    for (grads, loss, hits) in states {
        total.1 += loss;
        total.2 += hits;
        for (name, g) in grads {
            accumulate(&mut total.0, &name, &g);
        }
    }
    Ok(total)
}

/// Softmax cross-entropy of each row of `logits` against its label: the
/// gradient with respect to the logits (softmax minus one-hot), the summed
/// loss and the number of rows whose largest logit is the label's.
fn cross_entropy(
    logits: &[f32],
    classes: usize,
    labels: &[usize],
) -> Result<(Vec<f32>, f64, usize)> {
    let mut seed = vec![0.0f32; logits.len()];
    let (mut loss, mut hits) = (0.0f64, 0usize);
    for ((row, g), &label) in logits
        .chunks_exact(classes)
        .zip(seed.chunks_exact_mut(classes))
        .zip(labels)
    {
        if label >= classes {
            return Err(QatError::Data(format!(
                "label {label} is not one of the model's {classes} classes"
            )));
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        for (gi, &v) in g.iter_mut().zip(row) {
            *gi = (((v - max) as f64).exp() / sum) as f32;
        }
        g[label] -= 1.0;
        loss += sum.ln() - (row[label] - max) as f64;
        let best = row
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
        hits += usize::from(best == label);
    }
    Ok((seed, loss, hits))
}

/// The scale initializers of the activation Q/DQ pairs in `qgraph`, as
/// trainable step sizes (per image, the activations' shapes come from
/// shape inference on one image of `image`'s shape).
fn step_sizes(qgraph: &Graph, plan: &QuantPlan, image: &[usize; 3]) -> Result<Vec<Param>> {
    let input = qgraph
        .inputs
        .first()
        .map(|i| i.name.clone())
        .ok_or_else(|| QatError::Model("the graph has no input".into()))?;
    let shapes = qint8_graph::shape::infer(
        qgraph,
        &HashMap::from([(input, vec![1, image[0], image[1], image[2]])]),
    )?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for node in &qgraph.nodes {
        let (Op::QuantizeLinear { .. }, Some(x), Some(scale)) =
            (&node.op, node.input(0), node.input(1))
        else {
            continue;
        };
        let Some(params) = plan.activations.get(x) else {
            continue;
        };
        if !seen.insert(scale.to_string()) {
            continue;
        }
        let Some(t) = qgraph.initializers.get(scale).and_then(Tensor::as_f32) else {
            continue;
        };
        let per_image: usize = shapes
            .get(x)
            .map(|s| s.shape.iter().product())
            .unwrap_or(1)
            .max(1);
        let (_, qmax) = params.qrange();
        let value: Vec<f32> = t.iter().copied().collect();
        let floor = value.iter().copied().fold(f32::INFINITY, f32::min) * 1e-3;
        out.push(Param {
            name: scale.to_string(),
            shape: t.shape().to_vec(),
            velocity: vec![0.0; value.len()],
            value,
            quantized: None,
            step_size: Some((
                x.to_string(),
                1.0 / ((per_image as f32) * qmax.max(1) as f32).sqrt(),
            )),
            floor,
        });
    }
    Ok(out)
}
