//! A model zoo: torchvision's ResNet-50, VGG-16 (with and without
//! BatchNorm) and EfficientNet-B0 as qint8 graphs, at any width multiplier,
//! input resolution, input channel count and class count, with seeded random
//! weights.
//!
//! The graphs look like PyTorch's TorchScript ONNX export of the *un-fused*
//! torchvision model (opset [`OPSET`]): input `input` `[batch, C, H, W]`,
//! output `logits` `[batch, classes]`; `Conv` nodes with explicit
//! `kernel_shape`/`strides`/`pads`/`dilations`/`group`; a
//! `BatchNormalization` node after every convolution torchvision normalizes;
//! SiLU as `Sigmoid` + `Mul`; `Dropout` nodes where torchvision has them;
//! heads `GlobalAveragePool` + `Flatten` + `Gemm` (`transB = 1`). Node names
//! follow torchvision's module paths (`layer1.0.conv1`, `features.2.0.block.1.0`,
//! `classifier.6`; a module applied several times gets `_1`, `_2` suffixes as
//! the exporter names them, e.g. `layer1.0.relu_2`); every node's output value
//! is named after the node (except the last, `logits`), and initializers after
//! PyTorch's state-dict keys (`layer1.0.conv1.weight`, `layer1.0.bn1.running_var`).
//! [`crate::passes::simplify`] folds every BatchNormalization and removes
//! every Dropout of these graphs.
//!
//! ```
//! use qint8_graph::zoo::{self, ZooConfig};
//!
//! let cfg = ZooConfig::resnet50()
//!     .with_width_mult(0.25)
//!     .with_resolution(64, 64)
//!     .with_in_channels(1)
//!     .with_classes(10);
//! let model = zoo::build(&cfg)?;
//! assert_eq!(model.graph.outputs[0].name, "logits");
//! // torchvision's parameter count at full size, without building anything:
//! assert_eq!(zoo::trainable_parameter_count(&ZooConfig::resnet50())?, 25_557_032);
//! # Ok::<(), qint8_graph::GraphError>(())
//! ```
//!
//! # Widths
//!
//! * ResNet-50: the stem width 64 and the bottleneck `planes` 64, 128, 256,
//!   512 are scaled (the expansion stays 4).
//! * VGG-16: the channel counts of torchvision's cfg `"D"` and the classifier's
//!   hidden size 4096 are scaled.
//! * EfficientNet-B0: torchvision's `width_mult` (channels become
//!   `_make_divisible(c * width_mult, 8)`, depth multiplier 1.0).
//!
//! For ResNet and VGG a channel count `c` becomes `max(1, round(c * width_mult))`
//! (round half away from zero).
//!
//! # Initialization
//!
//! Every tensor is drawn from its own stream, seeded by the config's seed
//! and the tensor's name (SplitMix64 + Box-Muller), so a tensor's values do
//! not depend on the other tensors' shapes: changing the class count changes
//! only the classifier.
//!
//! * Convolution weights: normal, then scaled (data-free, like LSUV without
//!   data) so that each convolution's output has mean square 1 for a
//!   standard-normal network input. The builder carries each channel's mean
//!   and variance through the network: through the actual weights of every
//!   convolution (zero padding at the borders counted exactly), exactly
//!   through BatchNormalization, by Gaussian quadrature through ReLU, SiLU,
//!   Sigmoid and max pooling. After a ReLU this is He/Kaiming-normal
//!   initialization with `fan_in`; unlike plain Kaiming it keeps residual
//!   sums, squeeze-excitation gates and SiLU from compounding. Measured with
//!   onnxruntime at 224x224, width 1: activation RMS stays within 0.9-3.4
//!   (ResNet-50), 0.5-2.4 (VGG-16, both), 0.4-13 (EfficientNet-B0, whose
//!   squeeze-excitation gates amplify what the per-channel statistics miss);
//!   logits RMS 0.5-1.9.
//! * Convolution biases: normal(0, 0.01). Linear layers: weights and
//!   biases normal(0, 0.01).
//! * BatchNormalization, non-trivial so that folding it changes the weights:
//!   scale ~ U(0.5, 1.5), bias ~ N(0, 0.1), running mean ~ N(0, 0.1),
//!   running variance ~ U(0.5, 1.5).
//!
//! # Deviations from torchvision
//!
//! * torchvision's stems take 3 channels; here the first convolution takes
//!   [`ZooConfig::in_channels`].
//! * EfficientNet-B0's BatchNormalization uses torchvision's B0 epsilon,
//!   1e-5 (`nn.BatchNorm2d`'s default; only B5-B7 and the V2 models pass
//!   1e-3).
//! * VGG's `AdaptiveAvgPool2d((7, 7))` is emitted as an `AveragePool` whose
//!   kernel and stride are `feature / 7` (nothing at all when the feature
//!   map is already 7x7, as at 224x224). This is exact, but only exists when
//!   the feature map (`floor(H / 32)` by `floor(W / 32)`) is a positive
//!   multiple of 7 on both axes — the same limit PyTorch's ONNX exporter has.
//!   Other resolutions are refused with an error.
//! * `Dropout` nodes have no `ratio` input (it would count as a float
//!   initializer); at inference the ratio does not matter.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use crate::error::{invalid, GraphError, Result};
use crate::ir::{Dim, Graph, Model, Node, ValueInfo};
use crate::ops::{AutoPad, ConvAttrs, Op, PoolAttrs};
use crate::tensor::{DataType, Tensor};

/// The ONNX opset of every zoo model.
pub const OPSET: i64 = 17;

/// The smallest input height and width accepted (all three networks
/// downsample by 32).
pub const MIN_RESOLUTION: usize = 32;

/// The largest input height and width accepted.
pub const MAX_RESOLUTION: usize = 1 << 16;

/// The largest number of parameter elements (all initializers, BatchNorm
/// statistics included) [`build`] materializes: 2^32 f32 values (16 GiB).
pub const MAX_PARAMETERS: usize = 1 << 32;

/// Name of the graph input.
pub const INPUT_NAME: &str = "input";

/// Name of the graph output.
pub const OUTPUT_NAME: &str = "logits";

/// Name of the symbolic batch dimension (when [`ZooConfig::batch`] is `None`).
pub const BATCH_DIM: &str = "batch";

/// A network topology of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Arch {
    /// `torchvision.models.resnet50` (Bottleneck blocks `[3, 4, 6, 3]`,
    /// stride on the 3x3 convolution, "ResNet v1.5").
    #[default]
    #[serde(rename = "resnet50")]
    ResNet50,
    /// `torchvision.models.vgg16` / `vgg16_bn` (configuration `"D"`).
    #[serde(rename = "vgg16")]
    Vgg16 {
        /// BatchNormalization after every convolution (`vgg16_bn`).
        batch_norm: bool,
    },
    /// `torchvision.models.efficientnet_b0`.
    #[serde(rename = "efficientnet_b0")]
    EfficientNetB0,
}

impl Arch {
    /// Every architecture of the zoo.
    pub const ALL: [Arch; 4] = [
        Arch::ResNet50,
        Arch::Vgg16 { batch_norm: false },
        Arch::Vgg16 { batch_norm: true },
        Arch::EfficientNetB0,
    ];

    /// torchvision's function name: `resnet50`, `vgg16`, `vgg16_bn` or
    /// `efficientnet_b0` (what [`FromStr`] parses).
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet50 => "resnet50",
            Arch::Vgg16 { batch_norm: false } => "vgg16",
            Arch::Vgg16 { batch_norm: true } => "vgg16_bn",
            Arch::EfficientNetB0 => "efficientnet_b0",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = GraphError;

    /// Parses [`Arch::name`] (case-insensitive, `-` accepted for `_`).
    fn from_str(s: &str) -> Result<Arch> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == norm)
            .ok_or_else(|| {
                let names: Vec<_> = Arch::ALL.iter().map(|a| a.name()).collect();
                invalid(format!(
                    "unknown zoo architecture {s:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// What to build: architecture, sizes and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ZooConfig {
    /// The topology.
    pub arch: Arch,
    /// Width multiplier (1.0 = torchvision's widths); see the module docs
    /// for how each architecture applies it. Must be finite and positive.
    pub width_mult: f64,
    /// Input `(height, width)` in pixels, each in
    /// [`MIN_RESOLUTION`]..=[`MAX_RESOLUTION`].
    pub resolution: (usize, usize),
    /// Input channels (3 for RGB).
    pub in_channels: usize,
    /// Number of classes (the length of each logits row).
    pub classes: usize,
    /// Seed of the random initialization.
    pub seed: u64,
    /// A fixed batch size, or `None` for a symbolic `batch` dimension.
    pub batch: Option<usize>,
}

impl Default for ZooConfig {
    /// ResNet-50 at torchvision's ImageNet settings (see [`ZooConfig::new`]).
    fn default() -> Self {
        ZooConfig::new(Arch::ResNet50)
    }
}

impl ZooConfig {
    /// `arch` at torchvision's ImageNet settings: width 1, 224x224, 3 input
    /// channels, 1000 classes, seed 0, symbolic batch.
    pub fn new(arch: Arch) -> Self {
        ZooConfig {
            arch,
            width_mult: 1.0,
            resolution: (224, 224),
            in_channels: 3,
            classes: 1000,
            seed: 0,
            batch: None,
        }
    }

    /// ResNet-50 at ImageNet settings.
    pub fn resnet50() -> Self {
        Self::new(Arch::ResNet50)
    }

    /// VGG-16 (no BatchNorm) at ImageNet settings.
    pub fn vgg16() -> Self {
        Self::new(Arch::Vgg16 { batch_norm: false })
    }

    /// VGG-16 with BatchNorm at ImageNet settings.
    pub fn vgg16_bn() -> Self {
        Self::new(Arch::Vgg16 { batch_norm: true })
    }

    /// EfficientNet-B0 at ImageNet settings.
    pub fn efficientnet_b0() -> Self {
        Self::new(Arch::EfficientNetB0)
    }

    /// Sets the width multiplier.
    pub fn with_width_mult(mut self, width_mult: f64) -> Self {
        self.width_mult = width_mult;
        self
    }

    /// Sets the input resolution (height, width).
    pub fn with_resolution(mut self, height: usize, width: usize) -> Self {
        self.resolution = (height, width);
        self
    }

    /// Sets the number of input channels.
    pub fn with_in_channels(mut self, in_channels: usize) -> Self {
        self.in_channels = in_channels;
        self
    }

    /// Sets the number of classes.
    pub fn with_classes(mut self, classes: usize) -> Self {
        self.classes = classes;
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets a fixed batch size (`None`: symbolic).
    pub fn with_batch(mut self, batch: Option<usize>) -> Self {
        self.batch = batch;
        self
    }

    /// Checks the sizes (architecture-specific limits, such as VGG's
    /// supported resolutions, are checked by [`build`] and [`param_specs`]).
    pub fn validate(&self) -> Result<()> {
        let arch = self.arch;
        if !(self.width_mult.is_finite() && self.width_mult > 0.0) {
            return Err(invalid(format!(
                "zoo {arch}: width multiplier must be finite and positive, got {}",
                self.width_mult
            )));
        }
        let (h, w) = self.resolution;
        if h > MAX_RESOLUTION || w > MAX_RESOLUTION {
            return Err(invalid(format!(
                "zoo {arch}: input resolution {h}x{w} is too large: height and width must be at most \
                 {MAX_RESOLUTION}"
            )));
        }
        if h < MIN_RESOLUTION || w < MIN_RESOLUTION {
            return Err(invalid(format!(
                "zoo {arch}: input resolution {h}x{w} is too small: height and width must be at least \
                 {MIN_RESOLUTION} (the network downsamples by 32)"
            )));
        }
        if self.in_channels == 0 {
            return Err(invalid(format!(
                "zoo {arch}: input channels must be at least 1"
            )));
        }
        if self.classes == 0 {
            return Err(invalid(format!(
                "zoo {arch}: the class count must be at least 1"
            )));
        }
        if self.batch == Some(0) {
            return Err(invalid(format!(
                "zoo {arch}: a fixed batch size must be at least 1 (use None for a symbolic batch)"
            )));
        }
        Ok(())
    }
}

/// What a parameter tensor is (PyTorch's state-dict roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ParamKind {
    /// A Conv or Gemm weight (`*.weight`).
    Weight,
    /// A Conv or Gemm bias (`*.bias`).
    Bias,
    /// BatchNormalization scale, gamma (`*.weight`).
    BnScale,
    /// BatchNormalization shift, beta (`*.bias`).
    BnBias,
    /// BatchNormalization running mean (`*.running_mean`, a buffer).
    BnMean,
    /// BatchNormalization running variance (`*.running_var`, a buffer).
    BnVar,
}

impl ParamKind {
    /// Whether PyTorch counts it as a parameter (everything but the
    /// BatchNorm running statistics, which are buffers).
    pub fn is_trainable(self) -> bool {
        !matches!(self, ParamKind::BnMean | ParamKind::BnVar)
    }
}

/// One initializer of a zoo model, described without its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// Initializer name (the PyTorch state-dict key).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Role.
    pub kind: ParamKind,
}

impl ParamInfo {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements (never, for zoo models).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds the model `cfg` describes, weights included.
///
/// Errors (never panics) for a non-finite or non-positive width, a
/// resolution outside [`MIN_RESOLUTION`]..=[`MAX_RESOLUTION`], a VGG resolution whose feature map is
/// not a multiple of 7x7, zero input channels, zero classes, a zero fixed
/// batch, or more than [`MAX_PARAMETERS`] parameter elements.
pub fn build(cfg: &ZooConfig) -> Result<Model> {
    // A dry run first: refuse absurd sizes before allocating anything.
    let total = param_specs(cfg)?
        .iter()
        .try_fold(0usize, |acc, p| acc.checked_add(p.len()))
        .filter(|&t| t <= MAX_PARAMETERS);
    if total.is_none() {
        return Err(invalid(format!(
            "zoo {}: width multiplier {} needs more than {MAX_PARAMETERS} parameters",
            cfg.arch, cfg.width_mult
        )));
    }
    let b = construct(cfg, true)?;
    Ok(Model::new(b.graph, OPSET))
}

/// Every initializer [`build`] would create for `cfg` (name, shape, role),
/// in creation order, without allocating any weights. Cheap at any size.
pub fn param_specs(cfg: &ZooConfig) -> Result<Vec<ParamInfo>> {
    Ok(construct(cfg, false)?.params)
}

/// The number of parameters as PyTorch counts them
/// (`sum(p.numel() for p in model.parameters())`): weights, biases and
/// BatchNorm scale/shift, but not the running statistics. At width 1,
/// 224x224, 3 channels and 1000 classes this is torchvision's count:
/// ResNet-50 25,557,032; VGG-16 138,357,544; VGG-16-BN 138,365,992;
/// EfficientNet-B0 5,288,548.
pub fn trainable_parameter_count(cfg: &ZooConfig) -> Result<usize> {
    Ok(param_specs(cfg)?
        .iter()
        .filter(|p| p.kind.is_trainable())
        .map(ParamInfo::len)
        .sum())
}

// ---------------------------------------------------------------------------
// Random numbers: SplitMix64 streams and Box-Muller normals.
// ---------------------------------------------------------------------------

struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The stream of tensor `name` under `seed`.
    fn for_tensor(seed: u64, name: &str) -> Self {
        // FNV-1a of the name, mixed with the seed through one SplitMix step.
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
        let mut s = SplitMix64(seed);
        SplitMix64(s.next_u64() ^ h)
    }
}

#[derive(Debug, Clone, Copy)]
enum Init {
    Normal { mean: f64, std: f64 },
    Uniform { lo: f64, hi: f64 },
}

/// Normal(0, 1).
const STANDARD: Init = Init::Normal {
    mean: 0.0,
    std: 1.0,
};
/// Uniform(0.5, 1.5): BatchNorm scale and running variance.
const BN_UNIFORM: Init = Init::Uniform { lo: 0.5, hi: 1.5 };
/// Normal(0, 0.1): BatchNorm shift and running mean.
const BN_NORMAL: Init = Init::Normal {
    mean: 0.0,
    std: 0.1,
};
/// Normal(0, 0.01): linear weights and every bias.
const SMALL_NORMAL: Init = Init::Normal {
    mean: 0.0,
    std: 0.01,
};

/// Draws `n` values from `init`, handing each to `push`.
fn draw(rng: &mut SplitMix64, n: usize, init: Init, mut push: impl FnMut(f64)) {
    match init {
        Init::Normal { mean, std } => {
            let mut left = n;
            while left > 0 {
                let u1 = 1.0 - rng.uniform(); // (0, 1]
                let u2 = rng.uniform();
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
                push(mean + r * c);
                left -= 1;
                if left > 0 {
                    push(mean + r * s);
                    left -= 1;
                }
            }
        }
        Init::Uniform { lo, hi } => (0..n).for_each(|_| push(lo + (hi - lo) * rng.uniform())),
    }
}

/// `n` f32 values from `init`.
fn sample(rng: &mut SplitMix64, n: usize, init: Init) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    draw(rng, n, init, |x| v.push(x as f32));
    v
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

// ---------------------------------------------------------------------------
// Activation statistics, for scaling the weights.
//
// Every value carries the mean and variance of each of its channels for a
// standard-normal network input. Convolutions propagate them through their
// actual weights (treating input elements as independent and counting zero
// padding exactly), BatchNormalization exactly, elementwise functions by
// Gaussian quadrature, global pooling keeps the channel means.
// ---------------------------------------------------------------------------

/// Mean and variance of one channel's elements.
#[derive(Debug, Clone, Copy)]
struct Moments {
    mean: f64,
    var: f64,
}

impl Moments {
    fn m2(self) -> f64 {
        self.mean * self.mean + self.var
    }

    /// From `E[X]` and `E[X^2]`.
    fn from_raw(e1: f64, e2: f64) -> Self {
        Moments {
            mean: e1,
            var: (e2 - e1 * e1).max(0.0),
        }
    }
}

/// Mean square over channels.
fn mean_square(st: &[Moments]) -> f64 {
    st.iter().map(|m| m.m2()).sum::<f64>() / st.len().max(1) as f64
}

/// A uniform quadrature grid for expectations over a standard normal
/// (spacing 1/4 on [-7, 7]).
struct Quadrature {
    z: Vec<f64>,
    /// Probability weights (sum 1).
    w: Vec<f64>,
    /// The normal CDF at each node.
    cdf: Vec<f64>,
}

impl Quadrature {
    fn new() -> Self {
        let z: Vec<f64> = (0..57).map(|i| -7.0 + 0.25 * f64::from(i)).collect();
        let pdf: Vec<f64> = z.iter().map(|v| (-0.5 * v * v).exp()).collect();
        let total: f64 = pdf.iter().sum();
        let w: Vec<f64> = pdf.iter().map(|p| p / total).collect();
        let mut acc = 0.0;
        let cdf = w
            .iter()
            .map(|p| {
                acc += p;
                acc - 0.5 * p
            })
            .collect();
        Quadrature { z, w, cdf }
    }

    /// Moments of `f(X)` for `X ~ N(m.mean, m.var)`.
    fn map(&self, m: Moments, f: impl Fn(f64) -> f64) -> Moments {
        let sd = m.var.max(0.0).sqrt();
        let (mut e1, mut e2) = (0.0, 0.0);
        for (z, w) in self.z.iter().zip(&self.w) {
            let y = f(m.mean + sd * z);
            e1 += w * y;
            e2 += w * y * y;
        }
        Moments::from_raw(e1, e2)
    }

    /// Moments of the maximum of `n` independent draws of `N(m.mean, m.var)`.
    fn max_of(&self, m: Moments, n: usize) -> Moments {
        let sd = m.var.max(0.0).sqrt();
        let (mut total, mut e1, mut e2) = (0.0, 0.0, 0.0);
        for ((z, w), c) in self.z.iter().zip(&self.w).zip(&self.cdf) {
            let d = w * c.powi(n as i32 - 1);
            let y = m.mean + sd * z;
            total += d;
            e1 += d * y;
            e2 += d * y * y;
        }
        Moments::from_raw(e1 / total, e2 / total)
    }
}

/// The output positions of one spatial axis grouped by which kernel taps
/// fall inside the input (`lo..hi`; the others read zero padding):
/// `(lo, hi, positions)`.
fn tap_classes(n: usize, k: usize, stride: usize, pad: usize) -> Vec<(usize, usize, usize)> {
    let mut classes: Vec<(usize, usize, usize)> = Vec::new();
    if n + 2 * pad < k {
        return classes;
    }
    for o in 0..(n + 2 * pad - k) / stride + 1 {
        let start = (o * stride) as isize - pad as isize;
        let lo = (-start).clamp(0, k as isize) as usize;
        let hi = (n as isize - start).clamp(0, k as isize) as usize;
        match classes.iter_mut().find(|c| c.0 == lo && c.1 == hi) {
            Some(c) => c.2 += 1,
            None => classes.push((lo, hi, 1)),
        }
    }
    classes
}

/// A Conv's geometry: weight `[out, in/groups, k, k]` over an `h` x `w` input.
struct ConvShape {
    out: usize,
    groups: usize,
    k: usize,
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

/// Per-output-channel moments of a Conv with weight `wt` (no bias) over
/// inputs with per-channel moments `input`. Positions near the border see
/// fewer taps; the result mixes those position classes.
fn conv_moments(wt: &[f32], g: &ConvShape, input: &[Moments]) -> Vec<Moments> {
    let cin = input.len() / g.groups.max(1);
    let per_group = (g.out / g.groups.max(1)).max(1);
    let (k, kk, k1) = (g.k, g.k * g.k, g.k + 1);
    let rows = tap_classes(g.h, k, g.stride, g.pad);
    let cols = tap_classes(g.w, k, g.stride, g.pad);
    let total =
        (rows.iter().map(|r| r.2).sum::<usize>() * cols.iter().map(|c| c.2).sum::<usize>()).max(1);
    let classes: Vec<(usize, usize, usize, usize, f64)> = rows
        .iter()
        .flat_map(|r| {
            cols.iter()
                .map(move |c| (r.0, r.1, c.0, c.1, (r.2 * c.2) as f64 / total as f64))
        })
        .collect();
    // Summed-area tables of w and w^2 of one (out, in) kernel.
    let mut s1 = vec![0.0f64; k1 * k1];
    let mut s2 = vec![0.0f64; k1 * k1];
    let rect = |t: &[f64], r0: usize, r1: usize, c0: usize, c1: usize| {
        t[r1 * k1 + c1] - t[r0 * k1 + c1] - t[r1 * k1 + c0] + t[r0 * k1 + c0]
    };
    let mut mean = vec![0.0f64; classes.len()];
    let mut var = vec![0.0f64; classes.len()];
    (0..g.out)
        .map(|c| {
            let grp = c / per_group;
            mean.iter_mut().for_each(|v| *v = 0.0);
            var.iter_mut().for_each(|v| *v = 0.0);
            for j in 0..cin {
                let base = (c * cin + j) * kk;
                let Some(ws) = wt.get(base..base + kk) else {
                    break;
                };
                for y in 0..k {
                    for x in 0..k {
                        let v = f64::from(ws[y * k + x]);
                        let i = (y + 1) * k1 + x + 1;
                        s1[i] = v + s1[i - 1] + s1[i - k1] - s1[i - k1 - 1];
                        s2[i] = v * v + s2[i - 1] + s2[i - k1] - s2[i - k1 - 1];
                    }
                }
                let m = input[grp * cin + j];
                for (q, &(r0, r1, c0, c1, _)) in classes.iter().enumerate() {
                    mean[q] += m.mean * rect(&s1, r0, r1, c0, c1);
                    var[q] += m.var * rect(&s2, r0, r1, c0, c1);
                }
            }
            let (mut e1, mut e2) = (0.0, 0.0);
            for (q, cl) in classes.iter().enumerate() {
                e1 += cl.4 * mean[q];
                e2 += cl.4 * (var[q] + mean[q] * mean[q]);
            }
            Moments::from_raw(e1, e2)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The builder.
// ---------------------------------------------------------------------------

/// A value flowing through the network: name, channels, spatial size, and
/// (when weights are materialized) the moments of each channel.
#[derive(Debug, Clone)]
struct Act {
    name: String,
    c: usize,
    h: usize,
    w: usize,
    stats: Option<Vec<Moments>>,
}

impl Act {
    /// The same shape under a new name and statistics.
    fn with(&self, name: &str, stats: Option<Vec<Moments>>) -> Act {
        Act {
            name: name.to_string(),
            c: self.c,
            h: self.h,
            w: self.w,
            stats,
        }
    }

    /// Statistics after applying `f` to every channel's moments.
    fn each(&self, f: impl FnMut(&Moments) -> Moments) -> Option<Vec<Moments>> {
        Some(self.stats.as_ref()?.iter().map(f).collect())
    }
}

struct Builder {
    arch: Arch,
    graph: Graph,
    seed: u64,
    materialize: bool,
    params: Vec<ParamInfo>,
    quad: Quadrature,
}

impl Builder {
    fn err(&self, msg: impl fmt::Display) -> GraphError {
        invalid(format!("zoo {}: {msg}", self.arch))
    }

    fn param(
        &mut self,
        name: String,
        shape: &[usize],
        kind: ParamKind,
        init: Init,
    ) -> Result<String> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_PARAMETERS)
            .ok_or_else(|| self.err(format!("parameter {name} of shape {shape:?} is too large")))?;
        if self.materialize {
            let data = sample(&mut SplitMix64::for_tensor(self.seed, &name), n, init);
            let a = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| self.err(e))?;
            self.graph.initializers.insert(name.clone(), Tensor::F32(a));
        }
        self.params.push(ParamInfo {
            name: name.clone(),
            shape: shape.to_vec(),
            kind,
        });
        Ok(name)
    }

    /// The data of a materialized f32 initializer.
    fn data(&self, name: &str) -> Option<&[f32]> {
        self.graph.initializers.get(name)?.as_f32()?.as_slice()
    }

    fn push(&mut self, name: &str, op: Op, inputs: Vec<String>, output: &str) {
        self.graph.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
            outputs: vec![output.to_string()],
        });
    }

    /// A same-shape elementwise node computing `f`, its output named after it.
    fn unary(&mut self, name: &str, op: Op, x: &Act, f: impl Fn(f64) -> f64 + Copy) -> Act {
        self.push(name, op, vec![x.name.clone()], name);
        x.with(name, x.each(|&m| self.quad.map(m, f)))
    }

    /// `Add` or `Mul` of two independent values; the result has `b`'s shape
    /// (`a` may broadcast to it).
    fn binary(&mut self, name: &str, op: Op, a: &Act, b: &Act) -> Act {
        let mul = matches!(op, Op::Mul);
        self.push(name, op, vec![a.name.clone(), b.name.clone()], name);
        let stats = match (&a.stats, &b.stats) {
            (Some(sa), Some(sb)) => Some(
                sa.iter()
                    .zip(sb)
                    .map(|(x, y)| {
                        if mul {
                            let mean = x.mean * y.mean;
                            Moments::from_raw(mean, x.m2() * y.m2())
                        } else {
                            Moments {
                                mean: x.mean + y.mean,
                                var: x.var + y.var,
                            }
                        }
                    })
                    .collect(),
            ),
            _ => None,
        };
        b.with(name, stats)
    }

    /// Output size of a window `k`, stride `stride`, padding `pad` on each side.
    fn window(
        &self,
        name: &str,
        x: &Act,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<(usize, usize)> {
        let size = |d: usize| -> Result<usize> {
            if d + 2 * pad < k {
                return Err(self.err(format!("input {}x{} is too small for {name}", x.h, x.w)));
            }
            Ok((d + 2 * pad - k) / stride + 1)
        };
        Ok((size(x.h)?, size(x.w)?))
    }

    /// Conv with `pad = (k - 1) / 2` (torchvision's `padding=k // 2` for odd
    /// kernels); `bias`: whether it has one (convs followed by BN do not).
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        x: &Act,
        out: usize,
        k: usize,
        stride: usize,
        groups: usize,
        bias: bool,
    ) -> Result<Act> {
        let pad = (k - 1) / 2;
        let (h, w) = self.window(name, x, k, stride, pad)?;
        let cin = x.c / groups;
        let weight = self.param(
            format!("{name}.weight"),
            &[out, cin, k, k],
            ParamKind::Weight,
            STANDARD,
        )?;
        let mut inputs = vec![x.name.clone(), weight.clone()];
        if bias {
            inputs.push(self.param(
                format!("{name}.bias"),
                &[out],
                ParamKind::Bias,
                SMALL_NORMAL,
            )?);
        }
        let geometry = ConvShape {
            out,
            groups,
            k,
            stride,
            pad,
            h: x.h,
            w: x.w,
        };
        let stats = self.scale_conv(x, &weight, inputs.get(2), &geometry);
        let attrs = ConvAttrs {
            kernel_shape: Some(vec![k, k]),
            strides: vec![stride, stride],
            pads: vec![pad; 4],
            dilations: vec![1, 1],
            group: groups,
            auto_pad: AutoPad::NotSet,
        };
        self.push(name, Op::Conv(attrs), inputs, name);
        Ok(Act {
            name: name.to_string(),
            c: out,
            h,
            w,
            stats,
        })
    }

    /// Scales a materialized, standard-normal conv weight so that the output
    /// has mean square 1 for the input's statistics, and returns the output
    /// statistics (None in dry runs).
    fn scale_conv(
        &mut self,
        x: &Act,
        weight: &str,
        bias: Option<&String>,
        g: &ConvShape,
    ) -> Option<Vec<Moments>> {
        let raw = conv_moments(self.data(weight)?, g, x.stats.as_ref()?);
        let m2 = mean_square(&raw);
        let scale = if m2 > 0.0 && m2.is_finite() {
            1.0 / m2.sqrt()
        } else {
            1.0
        };
        if let Some(Tensor::F32(a)) = self.graph.initializers.get_mut(weight) {
            a.mapv_inplace(|v| (f64::from(v) * scale) as f32);
        }
        let b = bias.and_then(|b| self.data(b)).unwrap_or(&[]);
        Some(
            raw.iter()
                .enumerate()
                .map(|(c, m)| Moments {
                    mean: m.mean * scale + b.get(c).copied().map_or(0.0, f64::from),
                    var: m.var * scale * scale,
                })
                .collect(),
        )
    }

    fn bn(&mut self, name: &str, x: &Act, epsilon: f32) -> Result<Act> {
        let c = [x.c];
        let inputs = vec![
            x.name.clone(),
            self.param(format!("{name}.weight"), &c, ParamKind::BnScale, BN_UNIFORM)?,
            self.param(format!("{name}.bias"), &c, ParamKind::BnBias, BN_NORMAL)?,
            self.param(
                format!("{name}.running_mean"),
                &c,
                ParamKind::BnMean,
                BN_NORMAL,
            )?,
            self.param(
                format!("{name}.running_var"),
                &c,
                ParamKind::BnVar,
                BN_UNIFORM,
            )?,
        ];
        let stats = x.stats.as_ref().and_then(|st| {
            let p: Vec<&[f32]> = inputs[1..]
                .iter()
                .map(|n| self.data(n))
                .collect::<Option<_>>()?;
            let eps = f64::from(epsilon);
            let at = |t: usize, c: usize| p[t].get(c).copied().map_or(0.0, f64::from);
            Some(
                st.iter()
                    .enumerate()
                    .map(|(c, m)| {
                        let a = at(0, c) / (at(3, c) + eps).sqrt();
                        Moments {
                            mean: a * (m.mean - at(2, c)) + at(1, c),
                            var: a * a * m.var,
                        }
                    })
                    .collect(),
            )
        });
        self.push(name, Op::BatchNormalization { epsilon }, inputs, name);
        Ok(x.with(name, stats))
    }

    fn relu(&mut self, name: &str, x: &Act) -> Act {
        self.unary(name, Op::Relu, x, |v| v.max(0.0))
    }

    /// SiLU as the exporter writes it: `Mul(x, Sigmoid(x))`, nodes
    /// `{name}.sigmoid` and `{name}.mul`.
    fn silu(&mut self, name: &str, x: &Act) -> Act {
        let sig = format!("{name}.sigmoid");
        let mul = format!("{name}.mul");
        self.push(&sig, Op::Sigmoid, vec![x.name.clone()], &sig);
        self.push(&mul, Op::Mul, vec![x.name.clone(), sig], &mul);
        x.with(&mul, x.each(|&m| self.quad.map(m, |v| v * sigmoid(v))))
    }

    fn max_pool(
        &mut self,
        name: &str,
        x: &Act,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Act> {
        let (h, w) = self.window(name, x, k, stride, pad)?;
        let attrs = PoolAttrs {
            kernel_shape: vec![k, k],
            strides: vec![stride, stride],
            pads: vec![pad; 4],
            dilations: vec![1, 1],
            ceil_mode: false,
            count_include_pad: false,
            auto_pad: AutoPad::NotSet,
        };
        self.push(name, Op::MaxPool(attrs), vec![x.name.clone()], name);
        // The maximum over a window; neighbours are correlated, so count
        // half the window as independent draws.
        let draws = (k * k).div_ceil(2);
        let stats = x.each(|&m| self.quad.max_of(m, draws));
        Ok(Act {
            h,
            w,
            ..x.with(name, stats)
        })
    }

    fn global_avg_pool(&mut self, name: &str, x: &Act) -> Act {
        self.push(name, Op::GlobalAveragePool, vec![x.name.clone()], name);
        // What is left of a channel is its mean.
        let stats = x.each(|m| Moments {
            mean: m.mean,
            var: 0.0,
        });
        Act {
            h: 1,
            w: 1,
            ..x.with(name, stats)
        }
    }

    /// `AveragePool` with kernel = stride = `(kh, kw)` and no padding. Only
    /// fixed-scale Linear layers follow, so statistics end here.
    fn avg_pool(&mut self, name: &str, x: &Act, kh: usize, kw: usize) -> Act {
        let attrs = PoolAttrs {
            kernel_shape: vec![kh, kw],
            strides: vec![kh, kw],
            pads: vec![0; 4],
            dilations: Vec::new(),
            ceil_mode: false,
            count_include_pad: false,
            auto_pad: AutoPad::NotSet,
        };
        self.push(name, Op::AveragePool(attrs), vec![x.name.clone()], name);
        Act {
            h: x.h / kh,
            w: x.w / kw,
            ..x.with(name, None)
        }
    }

    /// `Flatten(axis = 1)`; the result is tracked as `c = C*H*W`, 1x1. Only
    /// fixed-scale Linear layers follow, so statistics end here.
    fn flatten(&mut self, name: &str, x: &Act) -> Act {
        self.push(name, Op::Flatten { axis: 1 }, vec![x.name.clone()], name);
        Act {
            c: x.c * x.h * x.w,
            h: 1,
            w: 1,
            ..x.with(name, None)
        }
    }

    fn dropout(&mut self, name: &str, x: &Act) -> Act {
        self.unary(name, Op::Dropout, x, |v| v)
    }

    /// `Gemm(x, W, b)` with `transB = 1`, `W: [out, in]` (PyTorch's Linear),
    /// writing value `output`.
    fn linear(&mut self, name: &str, x: &Act, out: usize, output: &str) -> Result<Act> {
        let w = self.param(
            format!("{name}.weight"),
            &[out, x.c],
            ParamKind::Weight,
            SMALL_NORMAL,
        )?;
        let b = self.param(
            format!("{name}.bias"),
            &[out],
            ParamKind::Bias,
            SMALL_NORMAL,
        )?;
        let op = Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: true,
        };
        self.push(name, op, vec![x.name.clone(), w, b], output);
        Ok(Act {
            name: output.to_string(),
            c: out,
            h: 1,
            w: 1,
            stats: None,
        })
    }
}

fn construct(cfg: &ZooConfig, materialize: bool) -> Result<Builder> {
    cfg.validate()?;
    let batch = match cfg.batch {
        Some(n) => Dim::Fixed(n),
        None => Dim::Symbolic(BATCH_DIM.into()),
    };
    let (h, w) = cfg.resolution;
    let mut b = Builder {
        arch: cfg.arch,
        graph: Graph {
            name: cfg.arch.name().to_string(),
            inputs: vec![ValueInfo {
                name: INPUT_NAME.into(),
                dtype: DataType::Float,
                shape: Some(vec![
                    batch.clone(),
                    Dim::Fixed(cfg.in_channels),
                    Dim::Fixed(h),
                    Dim::Fixed(w),
                ]),
            }],
            outputs: vec![ValueInfo {
                name: OUTPUT_NAME.into(),
                dtype: DataType::Float,
                shape: Some(vec![batch, Dim::Fixed(cfg.classes)]),
            }],
            nodes: Vec::new(),
            initializers: BTreeMap::new(),
            value_info: Vec::new(),
        },
        seed: cfg.seed,
        materialize,
        params: Vec::new(),
        quad: Quadrature::new(),
    };
    // A standard-normal input.
    let stats = materialize.then(|| {
        vec![
            Moments {
                mean: 0.0,
                var: 1.0
            };
            cfg.in_channels
        ]
    });
    let x = Act {
        name: INPUT_NAME.into(),
        c: cfg.in_channels,
        h,
        w,
        stats,
    };
    match cfg.arch {
        Arch::ResNet50 => resnet50(&mut b, cfg, x)?,
        Arch::Vgg16 { batch_norm } => vgg16(&mut b, cfg, x, batch_norm)?,
        Arch::EfficientNetB0 => efficientnet_b0(&mut b, cfg, x)?,
    }
    Ok(b)
}

/// `max(1, round(c * width_mult))` (ResNet and VGG widths).
fn scale_channels(c: usize, width_mult: f64) -> usize {
    // `as` saturates for huge products; the parameter limit catches those.
    ((c as f64 * width_mult).round() as usize).max(1)
}

/// torchvision's `_make_divisible(v, divisor)` with `min_value = divisor`.
fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0).trunc() / d).floor() * d).max(d);
    if new_v < 0.9 * v {
        new_v += d;
    }
    new_v as usize
}

/// torchvision `resnet50`: stem, Bottleneck stages `[3, 4, 6, 3]`, head.
fn resnet50(b: &mut Builder, cfg: &ZooConfig, x: Act) -> Result<()> {
    const EPS: f32 = 1e-5;
    const EXPANSION: usize = 4;
    let s = |c| scale_channels(c, cfg.width_mult);
    let stem = s(64);
    let x = b.conv("conv1", &x, stem, 7, 2, 1, false)?;
    let x = b.bn("bn1", &x, EPS)?;
    let x = b.relu("relu", &x);
    let mut x = b.max_pool("maxpool", &x, 3, 2, 1)?;
    let mut inplanes = stem;
    for (li, (planes, blocks, stride)) in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
        .into_iter()
        .enumerate()
    {
        let planes = s(planes);
        let out = planes * EXPANSION;
        for bi in 0..blocks {
            let st = if bi == 0 { stride } else { 1 };
            let p = format!("layer{}.{bi}", li + 1);
            let y = b.conv(&format!("{p}.conv1"), &x, planes, 1, 1, 1, false)?;
            let y = b.bn(&format!("{p}.bn1"), &y, EPS)?;
            let y = b.relu(&format!("{p}.relu"), &y);
            let y = b.conv(&format!("{p}.conv2"), &y, planes, 3, st, 1, false)?;
            let y = b.bn(&format!("{p}.bn2"), &y, EPS)?;
            let y = b.relu(&format!("{p}.relu_1"), &y);
            let y = b.conv(&format!("{p}.conv3"), &y, out, 1, 1, 1, false)?;
            let y = b.bn(&format!("{p}.bn3"), &y, EPS)?;
            let identity = if st != 1 || inplanes != out {
                let d = b.conv(&format!("{p}.downsample.0"), &x, out, 1, st, 1, false)?;
                b.bn(&format!("{p}.downsample.1"), &d, EPS)?
            } else {
                x.clone()
            };
            let sum = b.binary(&format!("{p}.add"), Op::Add, &y, &identity);
            x = b.relu(&format!("{p}.relu_2"), &sum);
            inplanes = out;
        }
    }
    let x = b.global_avg_pool("avgpool", &x);
    let x = b.flatten("flatten", &x);
    b.linear("fc", &x, cfg.classes, OUTPUT_NAME)?;
    Ok(())
}

/// torchvision `vgg16` / `vgg16_bn`: configuration "D", adaptive pooling to
/// 7x7, classifier Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear.
fn vgg16(b: &mut Builder, cfg: &ZooConfig, x: Act, batch_norm: bool) -> Result<()> {
    const EPS: f32 = 1e-5;
    const M: usize = 0; // max-pool marker
    const CFG_D: [usize; 18] = [
        64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
    ];
    let s = |c| scale_channels(c, cfg.width_mult);
    let mut x = x;
    let mut idx = 0;
    for v in CFG_D {
        if v == M {
            x = b.max_pool(&format!("features.{idx}"), &x, 2, 2, 0)?;
            idx += 1;
            continue;
        }
        x = b.conv(&format!("features.{idx}"), &x, s(v), 3, 1, 1, true)?;
        idx += 1;
        if batch_norm {
            x = b.bn(&format!("features.{idx}"), &x, EPS)?;
            idx += 1;
        }
        x = b.relu(&format!("features.{idx}"), &x);
        idx += 1;
    }
    // AdaptiveAvgPool2d((7, 7)).
    let (fh, fw) = (x.h, x.w);
    if fh == 0 || fw == 0 || fh % 7 != 0 || fw % 7 != 0 {
        let (h, w) = cfg.resolution;
        return Err(b.err(format!(
            "input {h}x{w} gives a {fh}x{fw} feature map before AdaptiveAvgPool2d((7, 7)), which is only \
             supported (as an exact AveragePool) when both sides are positive multiples of 7: use a \
             height and width in 224..=255, 448..=479, 672..=703, ... (floor(size / 32) a multiple of 7)"
        )));
    }
    if (fh, fw) != (7, 7) {
        x = b.avg_pool("avgpool", &x, fh / 7, fw / 7);
    }
    let x = b.flatten("flatten", &x);
    let hidden = s(4096);
    let x = b.linear("classifier.0", &x, hidden, "classifier.0")?;
    let x = b.relu("classifier.1", &x);
    let x = b.dropout("classifier.2", &x);
    let x = b.linear("classifier.3", &x, hidden, "classifier.3")?;
    let x = b.relu("classifier.4", &x);
    let x = b.dropout("classifier.5", &x);
    b.linear("classifier.6", &x, cfg.classes, OUTPUT_NAME)?;
    Ok(())
}

/// torchvision `efficientnet_b0` (`width_mult` from the config, depth 1.0).
fn efficientnet_b0(b: &mut Builder, cfg: &ZooConfig, x: Act) -> Result<()> {
    // torchvision builds B0 with nn.BatchNorm2d's default eps (only B5-B7
    // and the V2 models pass eps=1e-3).
    const EPS: f32 = 1e-5;
    // (expand_ratio, kernel, stride, input_channels, out_channels, num_layers)
    const SETTING: [(usize, usize, usize, usize, usize, usize); 7] = [
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    ];
    let adjust = |c: usize| make_divisible(c as f64 * cfg.width_mult, 8);
    let x = b.conv("features.0.0", &x, adjust(SETTING[0].3), 3, 2, 1, false)?;
    let x = b.bn("features.0.1", &x, EPS)?;
    let mut x = b.silu("features.0.2", &x);
    for (si, &(ratio, k, stride, cin, cout, layers)) in SETTING.iter().enumerate() {
        let (cin, cout) = (adjust(cin), adjust(cout));
        for bi in 0..layers {
            let (inc, st) = if bi == 0 { (cin, stride) } else { (cout, 1) };
            let p = format!("features.{}.{bi}.block", si + 1);
            let input = x.clone();
            let expanded = make_divisible((inc * ratio) as f64, 8);
            let mut sub = 0;
            let mut y = x;
            if expanded != inc {
                y = b.conv(&format!("{p}.0.0"), &y, expanded, 1, 1, 1, false)?;
                y = b.bn(&format!("{p}.0.1"), &y, EPS)?;
                y = b.silu(&format!("{p}.0.2"), &y);
                sub += 1;
            }
            y = b.conv(
                &format!("{p}.{sub}.0"),
                &y,
                expanded,
                k,
                st,
                expanded,
                false,
            )?;
            y = b.bn(&format!("{p}.{sub}.1"), &y, EPS)?;
            y = b.silu(&format!("{p}.{sub}.2"), &y);
            sub += 1;
            // Squeeze-excitation: scale = sigmoid(fc2(silu(fc1(avgpool(y))))).
            let se = format!("{p}.{sub}");
            let squeeze = (inc / 4).max(1);
            let z = b.global_avg_pool(&format!("{se}.avgpool"), &y);
            let z = b.conv(&format!("{se}.fc1"), &z, squeeze, 1, 1, 1, true)?;
            let z = b.silu(&format!("{se}.activation"), &z);
            let z = b.conv(&format!("{se}.fc2"), &z, expanded, 1, 1, 1, true)?;
            let z = b.unary(&format!("{se}.scale_activation"), Op::Sigmoid, &z, sigmoid);
            y = b.binary(&format!("{se}.mul"), Op::Mul, &z, &y);
            sub += 1;
            y = b.conv(&format!("{p}.{sub}.0"), &y, cout, 1, 1, 1, false)?;
            y = b.bn(&format!("{p}.{sub}.1"), &y, EPS)?;
            if st == 1 && inc == cout {
                let name = format!("features.{}.{bi}.add", si + 1);
                y = b.binary(&name, Op::Add, &y, &input);
            }
            x = y;
        }
    }
    let last_in = adjust(SETTING[6].4);
    let x = b.conv("features.8.0", &x, 4 * last_in, 1, 1, 1, false)?;
    let x = b.bn("features.8.1", &x, EPS)?;
    let x = b.silu("features.8.2", &x);
    let x = b.global_avg_pool("avgpool", &x);
    let x = b.flatten("flatten", &x);
    let x = b.dropout("classifier.0", &x);
    b.linear("classifier.1", &x, cfg.classes, OUTPUT_NAME)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_torchvision() {
        // Values computed with torchvision.models._utils._make_divisible.
        assert_eq!(make_divisible(32.0, 8), 32);
        assert_eq!(make_divisible(16.0 * 0.5, 8), 8);
        assert_eq!(make_divisible(24.0 * 0.25, 8), 8);
        assert_eq!(make_divisible(40.0 * 0.5, 8), 24); // int(24) // 8 * 8 = 24
        assert_eq!(make_divisible(112.0 * 0.5, 8), 56);
        assert_eq!(make_divisible(320.0 * 0.25, 8), 80);
        assert_eq!(make_divisible(20.0, 8), 24);
        assert_eq!(make_divisible(11.0, 8), 16); // 8 < 0.9 * 11 = 9.9 -> 16
        assert_eq!(make_divisible(1.0, 8), 8);
    }

    #[test]
    fn streams_are_per_tensor() {
        let a = sample(
            &mut SplitMix64::for_tensor(1, "a"),
            5,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        );
        let a2 = sample(
            &mut SplitMix64::for_tensor(1, "a"),
            5,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        );
        let b = sample(
            &mut SplitMix64::for_tensor(1, "b"),
            5,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        );
        let c = sample(
            &mut SplitMix64::for_tensor(2, "a"),
            5,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        );
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn normal_and_uniform_moments() {
        let n = 200_000;
        let v = sample(
            &mut SplitMix64::for_tensor(7, "x"),
            n,
            Init::Normal {
                mean: 1.0,
                std: 2.0,
            },
        );
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        assert!((var - 4.0).abs() < 0.06, "{var}");
        let u = sample(
            &mut SplitMix64::for_tensor(7, "u"),
            n,
            Init::Uniform { lo: 0.5, hi: 1.5 },
        );
        assert!(u.iter().all(|&x| (0.5..=1.5).contains(&x)));
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
    }
}
