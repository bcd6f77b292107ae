//! Smoothing of per-channel gated activations before quantization.
//!
//! A squeeze-and-excitation block multiplies every channel of a feature map
//! by its own gate, `T = a * g` with `g` of shape `[N, C, 1, 1]`, and feeds
//! `T` to a 1x1 projection convolution. TensorRT quantizes `T` with one scale
//! for all channels, yet on the EfficientNet-B0 fixture the channels' largest
//! values differ 46x to 2,200x (far more where a channel is nearly silent),
//! so the weak channels keep only a few of the 255 levels. The product is
//! linear in the gate, so the range can move into the weights exactly:
//! `T' = a * (g / k)` and `W'[:, c] = W[:, c] * k_c` compute the same
//! convolution output, with `k_c = amax_c^α / wmax_c^(1-α)` (the migration of
//! SmoothQuant, Xiao et al. 2023, "SmoothQuant: Accurate and Efficient
//! Post-Training Quantization for Large Language Models", eq. 4). `amax_c` is
//! channel `c`'s largest `|T|` over the calibration set and `wmax_c` the
//! largest weight reading channel `c`. Weights quantized per output channel
//! lose little when their input channels are scaled, per-tensor weights
//! (one step for the whole tensor) can lose much: [`Smoothing::Auto`] picks
//! α per site by an estimate of the convolution's output error from both
//! roundings under the weights' granularity ([`output_error`]).
//!
//! The gate division is one `Mul` by a `[1, C, 1, 1]` constant on the small
//! gate tensor; TensorRT and onnxruntime run it in float. A site is smoothed
//! only when every consumer of `T` is an ungrouped `Conv` with its own float
//! weight initializer and neither `Mul` input is quantized, so the rewrite
//! changes no other value of the graph.
//!
//! Measured on the EfficientNet-B0 fixture (entropy, per-channel, full
//! Fashion-MNIST test set): top-1 90.18% without smoothing, 90.77% with
//! `Auto` (FP32 91.17%); see docs/results.md.

use std::collections::{BTreeSet, HashMap};

use ndarray::{ArrayD, Axis, IxDyn};
use qint8_graph::{Graph, Node, Op, Tensor};

use crate::error::{CalibError, Result};

/// How strongly ranges migrate into the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Smoothing {
    /// Per site, the strength in `0, 0.05, ..., 1` with the smallest
    /// estimated output error ([`choose_factors`]); a site where no
    /// strength beats the unsmoothed graph is left alone.
    Auto,
    /// One strength α in `[0, 1]` for every site.
    Alpha(f32),
}

impl Smoothing {
    /// The factors for `site`: `None` leaves it alone.
    /// `per_channel` tells how the weights will be quantized, which
    /// decides what scaling their input channels costs them.
    pub fn factors(
        &self,
        graph: &Graph,
        site: &Site,
        stats: &ChannelStats,
        per_channel: bool,
    ) -> Option<Vec<f32>> {
        match *self {
            Smoothing::Auto => choose_factors(graph, site, stats, per_channel).map(|(_, k)| k),
            Smoothing::Alpha(a) => factors(&stats.amax, &weight_amax(graph, site), a),
        }
    }
}

/// Bound on `k_c` relative to the geometric mean of a site's factors: keeps
/// the scaled weights and gates far from float underflow and overflow.
const MAX_FACTOR: f32 = 1e6;

/// A gated activation that can be smoothed.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// The `Mul` node producing the activation.
    pub mul: String,
    /// The activation (the `Mul`'s output).
    pub tensor: String,
    /// The `Mul` input that gets divided by `k` (the per-channel gate).
    pub gate: String,
    /// The consuming convolutions' weight initializers.
    pub weights: Vec<String>,
    /// Channels of the activation.
    pub channels: usize,
}

/// The sites of `graph` (shapes inferred for one input of `input_shape`,
/// batch included) whose activation is in `quantized` and whose `Mul`
/// inputs are not.
pub fn find_sites(
    graph: &Graph,
    input_shape: &[usize],
    quantized: &BTreeSet<String>,
) -> Result<Vec<Site>> {
    let Some(input) = graph.inputs.first() else {
        return Ok(Vec::new());
    };
    let shapes = qint8_graph::shape::infer(
        graph,
        &HashMap::from([(input.name.clone(), input_shape.to_vec())]),
    )?;
    let shape = |v: &str| shapes.get(v).map(|s| s.shape.as_slice());
    let mut sites = Vec::new();
    for node in &graph.nodes {
        if !matches!(node.op, Op::Mul) || node.inputs.len() != 2 || node.outputs.len() != 1 {
            continue;
        }
        let t = &node.outputs[0];
        if !quantized.contains(t) || node.inputs.iter().any(|i| quantized.contains(i)) {
            continue;
        }
        let (Some(ts), Some(s0), Some(s1)) =
            (shape(t), shape(&node.inputs[0]), shape(&node.inputs[1]))
        else {
            continue;
        };
        if ts.len() != 4 || graph.is_output(t) || is_swish(graph, node) {
            continue;
        }
        let c = ts[1];
        let per_channel = |s: &[usize]| s.len() == 4 && s[1] == c && s[2] == 1 && s[3] == 1;
        // The gate: a per-channel operand; of two, the one read only here
        // (an SE block's sigmoid output rather than the feature map, which
        // its pooling branch also reads).
        let gate = match (per_channel(s0), per_channel(s1)) {
            (true, false) if s1 == ts => 0,
            (false, true) if s0 == ts => 1,
            (true, true) => {
                if graph.consumers(&node.inputs[0]).len() == 1
                    && graph.consumers(&node.inputs[1]).len() > 1
                {
                    0
                } else {
                    1
                }
            }
            _ => continue,
        };
        let Some(weights) = conv_weights(graph, t, c) else {
            continue;
        };
        sites.push(Site {
            mul: node.name.clone(),
            tensor: t.clone(),
            gate: node.inputs[gate].clone(),
            weights,
            channels: c,
        });
    }
    Ok(sites)
}

/// Whether one input of `mul` is computed from the other (`x * f(x)`, as in
/// SiLU / swish): its factor is not a gate of the other's channels, and on
/// the EfficientNet-B0 fixture smoothing those products with alpha 0.75 cost
/// 20 points of top-1 where the gates alone cost none.
fn is_swish(graph: &Graph, mul: &Node) -> bool {
    mul.inputs.iter().any(|i| {
        graph
            .producer(i)
            .is_some_and(|p| graph.nodes[p].inputs.iter().any(|j| mul.inputs.contains(j)))
    })
}

/// The weight initializers of the consumers of `t` when every consumer is
/// an ungrouped `Conv` reading `t` as its data input and the only reader of
/// its float weight with `channels` input channels.
fn conv_weights(graph: &Graph, t: &str, channels: usize) -> Option<Vec<String>> {
    let consumers = graph.consumers(t);
    if consumers.is_empty() {
        return None;
    }
    let mut weights = Vec::new();
    for i in consumers {
        let n: &Node = &graph.nodes[i];
        let Op::Conv(a) = &n.op else { return None };
        if a.group != 1 || n.input(0) != Some(t) || n.inputs[1..].iter().any(|i| i == t) {
            return None;
        }
        let w = n.input(1)?;
        let wt = graph.initializers.get(w)?.as_f32()?;
        if wt.ndim() < 2 || wt.shape()[1] != channels || graph.consumers(w).len() != 1 {
            return None;
        }
        weights.push(w.to_string());
    }
    Some(weights)
}

/// Largest `|w|` per input channel (axis 1) over all `weights`.
pub fn weight_amax(graph: &Graph, site: &Site) -> Vec<f32> {
    let mut m = vec![0.0f32; site.channels];
    for w in &site.weights {
        if let Some(t) = graph.initializers.get(w).and_then(Tensor::as_f32) {
            for (c, lane) in t.axis_iter(Axis(1)).enumerate() {
                m[c] = lane.iter().fold(m[c], |a, v| a.max(v.abs()));
            }
        }
    }
    m
}

/// The smoothing factors `k_c = amax_c^α / wmax_c^(1-α)`, divided by their
/// geometric mean and bounded to `[1e-6, 1e6]`. A channel that is zero in
/// the data or in the weights keeps `k = 1`. `None` when no channel is live.
pub fn factors(act_amax: &[f32], weight_amax: &[f32], alpha: f32) -> Option<Vec<f32>> {
    let live = |a: f32, w: f32| a > 0.0 && w > 0.0 && a.is_finite() && w.is_finite();
    let logs: Vec<Option<f64>> = act_amax
        .iter()
        .zip(weight_amax)
        .map(|(&a, &w)| {
            live(a, w)
                .then(|| alpha as f64 * (a as f64).ln() - (1.0 - alpha as f64) * (w as f64).ln())
        })
        .collect();
    let n = logs.iter().flatten().count();
    if n == 0 {
        return None;
    }
    let mean = logs.iter().flatten().sum::<f64>() / n as f64;
    let bound = (MAX_FACTOR as f64).ln();
    Some(
        logs.iter()
            .map(|l| l.map_or(1.0, |l| (l - mean).clamp(-bound, bound).exp() as f32))
            .collect(),
    )
}

/// Rewrites `graph` so that the site's activation becomes `T / k` per
/// channel while every consumer's output stays the same: a `Mul` by `1 / k`
/// on the gate, and the consumers' weights scaled by `k` on their input
/// channels. Returns the name of the new gate value.
pub fn apply(graph: &mut Graph, site: &Site, k: &[f32]) -> Result<String> {
    if k.len() != site.channels || k.iter().any(|&f| !(f.is_finite() && f > 0.0)) {
        return Err(CalibError::Invalid(format!(
            "smoothing `{}`: need {} positive finite factors",
            site.tensor, site.channels
        )));
    }
    let at = graph
        .nodes
        .iter()
        .position(|n| n.name == site.mul)
        .ok_or_else(|| CalibError::Invalid(format!("smoothing: no node `{}`", site.mul)))?;
    for w in &site.weights {
        let t = graph
            .initializers
            .get_mut(w)
            .and_then(|t| match t {
                Tensor::F32(a) => Some(a),
                _ => None,
            })
            .ok_or_else(|| CalibError::Invalid(format!("smoothing: no float weight `{w}`")))?;
        for (mut lane, &f) in t.axis_iter_mut(Axis(1)).zip(k) {
            lane.mapv_inplace(|v| v * f);
        }
    }
    let inv: Vec<f32> = k.iter().map(|f| 1.0 / f).collect();
    let inv = ArrayD::from_shape_vec(IxDyn(&[1, site.channels, 1, 1]), inv)
        .map_err(|e| CalibError::Invalid(format!("smoothing `{}`: {e}", site.tensor)))?;
    let scale = graph.fresh_name(&format!("{}_smooth_scale", site.gate));
    let gated = graph.fresh_name(&format!("{}_smoothed", site.gate));
    let name = graph.fresh_name(&format!("{}_smooth", site.mul));
    graph.initializers.insert(scale.clone(), Tensor::F32(inv));
    for i in graph.nodes[at].inputs.iter_mut() {
        if *i == site.gate {
            *i = gated.clone();
        }
    }
    graph.nodes.insert(
        at,
        Node::new(
            name,
            Op::Mul,
            &[site.gate.as_str(), scale.as_str()],
            &[gated.as_str()],
        ),
    );
    Ok(gated)
}

/// `x` (shape `[N, C, ...]`) with channel `c` divided by `k[c]`: the
/// values the smoothed graph computes, up to rounding. `x` itself when the
/// shape does not match.
pub fn divide_channels(shape: &[usize], x: &[f32], k: &[f32]) -> Vec<f32> {
    let inner: usize = shape.get(2..).map_or(0, |s| s.iter().product());
    if shape.len() < 2 || shape[1] != k.len() || inner == 0 || !x.len().is_multiple_of(inner) {
        return x.to_vec();
    }
    let inv: Vec<f32> = k.iter().map(|f| 1.0 / f).collect();
    let mut y = x.to_vec();
    for (j, plane) in y.chunks_exact_mut(inner).enumerate() {
        let s = inv[j % k.len()];
        plane.iter_mut().for_each(|v| *v *= s);
    }
    y
}

/// Per-channel statistics of an activation over the calibration set.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    /// Largest `|x|` per channel.
    pub amax: Vec<f32>,
    /// Sum of `x^2` per channel.
    pub sum_sq: Vec<f64>,
    /// Values seen per channel.
    pub count: u64,
}

impl ChannelStats {
    /// Empty statistics of `channels` channels.
    pub fn new(channels: usize) -> Self {
        Self {
            amax: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            count: 0,
        }
    }

    /// Folds in a tensor of shape `[N, C, ...]` (ignored when `C` differs).
    pub fn observe(&mut self, shape: &[usize], x: &[f32]) {
        let c = self.amax.len();
        if shape.len() < 2 || shape[1] != c || c == 0 || x.len() != shape.iter().product::<usize>()
        {
            return;
        }
        let inner: usize = shape[2..].iter().product();
        if inner == 0 {
            return;
        }
        for (j, plane) in x.chunks_exact(inner).enumerate() {
            // f32 within a plane (vectorizes), f64 across planes.
            let a = plane.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let q = plane.iter().fold(0.0f32, |q, v| q + v * v);
            self.amax[j % c] = self.amax[j % c].max(a);
            self.sum_sq[j % c] += q as f64;
        }
        self.count += (shape[0] * inner) as u64;
    }

    /// Adds another worker's statistics of the same tensor.
    pub fn merge(&mut self, other: &ChannelStats) {
        self.amax
            .iter_mut()
            .zip(&other.amax)
            .for_each(|(a, b)| *a = a.max(*b));
        self.sum_sq
            .iter_mut()
            .zip(&other.sum_sq)
            .for_each(|(a, b)| *a += b);
        self.count += other.count;
    }

    /// Mean of `x^2` per channel.
    pub fn mean_square(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum_sq.iter().map(|q| q / n).collect()
    }
}

/// Expected squared error of the consumers' outputs, summed over their
/// output channels, when the activation is divided by `k` per channel and
/// the weights multiplied by it: rounding noise of the activation (one
/// step over the largest `|x / k|`) through the weights, plus each output
/// channel's weight rounding noise (one step per output channel, or one per
/// weight tensor when `per_channel` is false) on the activation's power. Both take uniform rounding noise (the common 1/12
/// is left out).
pub fn output_error(
    graph: &Graph,
    site: &Site,
    stats: &ChannelStats,
    k: &[f32],
    per_channel: bool,
) -> f64 {
    Moments::new(graph, site, per_channel).error(stats, &stats.mean_square(), k)
}

/// Per output channel and input channel of a site's weights: the largest
/// `|w|` and the sum of `w^2` over the kernel taps.
struct Moments {
    channels: usize,
    /// Per output row: (index of its weight tensor, taps, largest |w| per
    /// input channel, sum of w^2 per input channel); f32 keeps this at
    /// twice the weights' size.
    rows: Vec<(usize, f64, Vec<f32>, Vec<f32>)>,
    /// Whether each output row gets its own weight scale.
    per_channel: bool,
}

impl Moments {
    fn new(graph: &Graph, site: &Site, per_channel: bool) -> Self {
        let mut rows = Vec::new();
        for (wi, w) in site.weights.iter().enumerate() {
            let Some(t) = graph.initializers.get(w).and_then(Tensor::as_f32) else {
                continue;
            };
            let (o, c) = (t.shape()[0], t.shape()[1]);
            let taps = t.len() / (o * c).max(1);
            let Some(flat) = t.as_slice() else { continue };
            for row in flat.chunks_exact((c * taps).max(1)) {
                let (mut mx, mut sq) = (vec![0.0f32; c], vec![0.0f32; c]);
                for (ci, lane) in row.chunks_exact(taps.max(1)).enumerate() {
                    for &v in lane {
                        mx[ci] = mx[ci].max(v.abs());
                        sq[ci] += v * v;
                    }
                }
                rows.push((wi, taps as f64, mx, sq));
            }
        }
        Self {
            channels: site.channels,
            rows,
            per_channel,
        }
    }

    fn error(&self, stats: &ChannelStats, mean_square: &[f64], k: &[f32]) -> f64 {
        let k: Vec<f64> = k.iter().map(|&f| f as f64).collect();
        if k.len() != self.channels {
            return f64::INFINITY;
        }
        let act_step = stats
            .amax
            .iter()
            .zip(&k)
            .fold(0.0f64, |m, (&a, f)| m.max(a as f64 / f))
            / 127.0;
        // The activation's power per channel after division by k.
        let power: Vec<f64> = mean_square
            .iter()
            .zip(&k)
            .map(|(m, f)| m / (f * f))
            .collect();
        // Per row: its largest scaled weight, the power its weights pass
        // and the activation power it reads.
        let rows: Vec<(usize, f64, f64, f64)> = self
            .rows
            .iter()
            .map(|(wi, taps, mx, sq)| {
                let (mut wmax, mut through, mut pow) = (0.0f64, 0.0f64, 0.0f64);
                for c in 0..self.channels {
                    wmax = wmax.max(mx[c] as f64 * k[c]);
                    through += sq[c] as f64 * k[c] * k[c];
                    pow += taps * power[c];
                }
                (*wi, wmax, through, pow)
            })
            .collect();
        // Per-tensor weights share one step: the tensor's largest weight.
        let mut tensor_max = vec![0.0f64; rows.iter().map(|r| r.0 + 1).max().unwrap_or(0)];
        for &(wi, wmax, ..) in &rows {
            tensor_max[wi] = tensor_max[wi].max(wmax);
        }
        rows.iter()
            .map(|&(wi, wmax, through, pow)| {
                let w_step = if self.per_channel {
                    wmax
                } else {
                    tensor_max[wi]
                } / 127.0;
                act_step * act_step * through + w_step * w_step * pow
            })
            .sum()
    }
}

/// Strengths tried by [`choose_factors`]: 0, 0.05, ..., 1.
pub const AUTO_ALPHAS: usize = 21;

/// The factors of the strength in `0, 0.05, ..., 1` whose [`output_error`]
/// is smallest, or `None` when none beats leaving the site alone.
pub fn choose_factors(
    graph: &Graph,
    site: &Site,
    stats: &ChannelStats,
    per_channel: bool,
) -> Option<(f32, Vec<f32>)> {
    let wmax = weight_amax(graph, site);
    let moments = Moments::new(graph, site, per_channel);
    let ms = stats.mean_square();
    let ones = vec![1.0; site.channels];
    let mut best: (f64, Option<(f32, Vec<f32>)>) = (moments.error(stats, &ms, &ones), None);
    for i in 0..AUTO_ALPHAS {
        let alpha = i as f32 / (AUTO_ALPHAS - 1) as f32;
        let k = factors(&stats.amax, &wmax, alpha)?;
        let e = moments.error(stats, &ms, &k);
        if e < best.0 {
            best = (e, Some((alpha, k)));
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_balance_the_product_and_leave_dead_channels() {
        let k = factors(&[4.0, 1.0, 0.0], &[1.0, 4.0, 2.0], 0.5).unwrap();
        // k = sqrt(a / w) up to a common factor: 2 and 0.5, mean 1.
        assert!(
            (k[0] - 2.0).abs() < 1e-6 && (k[1] - 0.5).abs() < 1e-6,
            "{k:?}"
        );
        assert_eq!(k[2], 1.0);
        // After smoothing both live channels reach the same activation range.
        assert!((4.0 / k[0] - 1.0 / k[1]).abs() < 1e-6);
        assert_eq!(factors(&[0.0], &[1.0], 0.5), None);
        let k = factors(&[1e30, 1e-30], &[1.0, 1.0], 1.0).unwrap();
        assert!(k.iter().all(|&f| (1e-6..=1e6).contains(&f)), "{k:?}");
    }

    #[test]
    fn divide_channels_scales_each_plane() {
        let y = divide_channels(&[2, 2, 1], &[1.0, 2.0, 3.0, 4.0], &[2.0, 0.5]);
        assert_eq!(y, vec![0.5, 4.0, 1.5, 8.0]);
        // A shape that does not fit leaves the values alone.
        assert_eq!(
            divide_channels(&[4], &[1.0, 2.0, 3.0, 4.0], &[2.0]),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn channel_stats_read_each_plane() {
        let mut s = ChannelStats::new(2);
        // N = 2, C = 2, 2 values each.
        s.observe(&[2, 2, 2], &[1.0, -3.0, 0.5, 0.25, 2.0, 0.0, -0.75, 0.5]);
        assert_eq!(s.amax, vec![3.0, 0.75]);
        assert_eq!(s.count, 4);
        assert_eq!(
            s.mean_square(),
            vec![14.0 / 4.0, (0.25 + 0.0625 + 0.5625 + 0.25) / 4.0]
        );
        let mut t = ChannelStats::new(2);
        t.observe(&[1, 2, 1], &[-4.0, 0.5]);
        s.merge(&t);
        assert_eq!((s.amax.clone(), s.count), (vec![4.0, 0.75], 5));
    }
}
