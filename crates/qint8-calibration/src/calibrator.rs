//! The streaming calibrator: a graph and representative data in, a
//! [`QuantPlan`] out.
//!
//! Two passes over the data through the runtime's observer hook: the first
//! records each planned tensor's largest `|x|`, the second fills a
//! histogram of `|x|` over exactly `[0, max]` per tensor, from which the
//! chosen method picks the clipping threshold. Fixing the range before
//! histogramming makes the result independent of batch size and order
//! (a histogram whose range follows the first batch is not: TensorRT issue
//! 1411), and memory is one histogram per tensor whatever the number of
//! images (activations are dropped after each batch). With
//! [`RangeMethod::Max`] the second pass is skipped. Graph inputs always get
//! their largest `|x|`: their range comes from preprocessing, and clipping
//! it removes content rather than outliers.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use qint8_graph::quant::{placement as placement_of, QuantPlan};
use qint8_graph::{Graph, Op};
use qint8_math::histogram::Histogram;
use qint8_math::params::{QuantDtype, QuantParams};
use qint8_math::search::{search_amax, EntropyVariant, RangeMethod};
use qint8_runtime::{Observer, RuntimeError, Session, SessionOptions};

use crate::dataset::ImageDataset;
use crate::error::{CalibError, Result};
use crate::smooth::Smoothing;

/// How to calibrate.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibConfig {
    /// How activation thresholds are chosen.
    pub method: RangeMethod,
    /// Weights per output channel (else one scale per weight tensor).
    pub per_channel: bool,
    /// Histogram bins.
    pub bins: usize,
    /// Images per batch.
    pub batch: usize,
    /// Runtime threads.
    pub threads: usize,
    /// Nodes to keep in float (their inputs are not quantized for them),
    /// by name in the simplified graph; `*` in an entry matches any run of
    /// characters. Each entry must match at least one node whose inputs
    /// the placement quantizes; the plan's [`QuantPlan::precision`] lists
    /// the nodes matched.
    pub float_nodes: BTreeSet<String>,
    /// Which tensors are quantized: TensorRT's rules (the default) or
    /// everything onnxruntime's QDQ quantizer would quantize.
    pub placement: qint8_graph::PlacementPolicy,
    /// Moving-average min-max instead of `method`: each tensor's range is
    /// `r += c * (batch_max - r)` over batches (the first batch sets it),
    /// with `c` this constant (0.01 in onnxruntime and PyTorch). Unlike the
    /// other methods its result depends on batch size and order.
    pub moving_average: Option<f32>,
    /// Also find a threshold for every other float tensor the graph
    /// computes (in [`Calibrated::ranges`]): TensorRT's implicit
    /// quantization reads a range for each tensor from its calibration
    /// cache and leaves layers without one in float.
    pub all_ranges: bool,
    /// After the histogram method, choose each activation's threshold among
    /// candidates by the output error on this many calibration images (see
    /// [`refine`](crate::refine)); `None` keeps the method's thresholds.
    pub refine: Option<usize>,
    /// Smooth per-channel gated activations (squeeze-and-excitation
    /// outputs feeding a convolution): their channels' range differences
    /// move into the weights (see [`smooth`](crate::smooth)); `None` leaves
    /// the graph as it is. Not applied with `moving_average` or
    /// `all_ranges` (a TensorRT cache describes the unmodified model).
    pub smooth: Option<Smoothing>,
    /// Activations' type: [`QuantDtype::Int8`], symmetric (`scale =
    /// threshold / 127`, zero point 0; what TensorRT requires), or
    /// [`QuantDtype::Uint8`], asymmetric: the method's threshold `t` as for
    /// int8, then the range is the part of `[-t, t]` the tensor's values
    /// occupied during calibration, widened to contain 0 (`scale = (hi -
    /// lo) / 255`). A tensor that is never negative (after Relu) gets all
    /// 256 levels on `[0, t]`, twice int8's resolution, and onnxruntime's
    /// CPU kernels run uint8 activations with int8 weights fastest. Min-max
    /// calibration then makes a second pass, for the signed ranges.
    pub activation_dtype: QuantDtype,
}

impl Default for CalibConfig {
    fn default() -> Self {
        Self {
            method: RangeMethod::entropy(),
            per_channel: true,
            bins: qint8_math::histogram::DEFAULT_BINS,
            batch: 32,
            threads: 0,
            float_nodes: BTreeSet::new(),
            placement: qint8_graph::PlacementPolicy::TensorRt,
            moving_average: None,
            all_ranges: false,
            refine: None,
            smooth: Some(Smoothing::Auto),
            activation_dtype: QuantDtype::Int8,
        }
    }
}

/// Where a calibration run is, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// 1: ranges, 2: histograms, 3: choosing thresholds by output error
    /// ([`CalibConfig::refine`]).
    pub pass: u8,
    /// Passes this run makes (1 for max calibration, 3 with `refine`, else 2).
    pub passes: u8,
    /// Images done in this pass (pass 3: candidate evaluations done).
    pub done: usize,
    /// Images in the calibration set (pass 3: candidate evaluations).
    pub total: usize,
}

/// The result: the graph the plan refers to (simplified: BatchNorm folded,
/// Identity and Dropout removed; with [`CalibConfig::smooth`], gated
/// activations rescaled) and the plan.
#[derive(Debug, Clone)]
pub struct Calibrated {
    /// The simplified graph whose tensor names the plan uses.
    pub graph: Graph,
    /// Activation and weight parameters.
    pub plan: QuantPlan,
    /// The chosen threshold (amax) of every planned activation, and with
    /// [`CalibConfig::all_ranges`] of every float tensor the graph computes.
    pub ranges: BTreeMap<String, f32>,
    /// Activations that [`CalibConfig::smooth`] rescaled, in graph order.
    pub smoothed: Vec<String>,
    /// Activations smoothing considered (its sites), rescaled or not: where
    /// there are any, the result depends on the weights' granularity.
    pub smoothing_sites: Vec<String>,
    /// The `|x|` histogram over `[0, max]` of every tracked tensor with a
    /// nonzero range (empty for one-pass calibration: max and moving
    /// average), from which any histogram method's threshold can be found
    /// again ([`search_amax`]).
    pub histograms: BTreeMap<String, Histogram>,
}

/// Calibrates `graph` on every image of `data` (use
/// [`ImageDataset::take`] for the first N), placing
/// quantization by `cfg.placement` (see
/// [`placement`](qint8_graph::quant::placement)). Activations get
/// symmetric int8 with `scale = amax / 127`; weights the narrow range
/// `[-127, 127]`. Errors name the tensor when data hold NaN or infinity.
pub fn calibrate(
    graph: &Graph,
    data: &ImageDataset,
    cfg: &CalibConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<Calibrated> {
    calibrate_owned(graph.clone(), data, cfg, progress)
}

/// Runs calibration's forward passes somewhere other than qint8's CPU
/// runtime: `qint8_trt::cuda::CudaExecutor` (feature `cuda`) runs them on a
/// GPU. A runner either shows the tensors themselves, which the host then
/// folds into statistics exactly as for the CPU runtime, or computes the
/// maxima and histograms itself ([`computes_statistics`](Self::computes_statistics)).
pub trait BatchRunner {
    /// Runs one batch through the graph the runner was made for and calls
    /// `see` with the name, shape and values of every produced tensor named
    /// in `wanted` (the graph input too, when named), in graph order. An
    /// error from `see` stops the run and is returned.
    fn run_observed(
        &mut self,
        input: ndarray::ArrayViewD<'_, f32>,
        wanted: &BTreeSet<String>,
        see: &mut TensorSink<'_>,
    ) -> std::result::Result<(), String>;

    /// Whether the runner computes statistics where the batch runs
    /// ([`abs_max`](Self::abs_max), [`abs_histograms`](Self::abs_histograms)),
    /// so that the tensors need not be copied to the host. Calibration still
    /// copies those it must see whole (smoothing sites, moving averages).
    fn computes_statistics(&self) -> bool {
        false
    }

    /// Runs one batch and returns the largest `|x|` of every tensor in
    /// `wanted` it produced; a tensor holding NaN or infinity is an error
    /// naming it. Only called when [`computes_statistics`](Self::computes_statistics).
    fn abs_max(
        &mut self,
        input: ndarray::ArrayViewD<'_, f32>,
        wanted: &BTreeSet<String>,
    ) -> std::result::Result<BTreeMap<String, f32>, String> {
        let _ = (input, wanted);
        Err("this runner computes no statistics".into())
    }

    /// Runs one batch and returns, for every tensor `ranges` names, the
    /// histogram of its `|x|` over `[0, range]` in `bins` bins
    /// ([`Histogram::from_abs_counts`]). Only called when
    /// [`computes_statistics`](Self::computes_statistics).
    fn abs_histograms(
        &mut self,
        input: ndarray::ArrayViewD<'_, f32>,
        ranges: &BTreeMap<String, f32>,
        bins: usize,
    ) -> std::result::Result<BTreeMap<String, Histogram>, String> {
        let _ = (input, ranges, bins);
        Err("this runner computes no statistics".into())
    }
}

/// Receives a produced tensor's name, shape and values; an error stops the
/// run.
pub type TensorSink<'a> = dyn FnMut(&str, &[usize], &[f32]) -> std::result::Result<(), String> + 'a;

/// Makes a [`BatchRunner`] for the graph calibration runs: the input graph
/// simplified (BatchNormalization folded, constants folded), whose tensor
/// names the plan uses.
pub type RunnerFactory<'a> =
    dyn Fn(&Graph) -> std::result::Result<Box<dyn BatchRunner>, String> + 'a;

/// [`calibrate`] with the forward passes on a runner that `make` builds for
/// the simplified graph (a GPU). Output-error refinement
/// ([`CalibConfig::refine`]) still runs on the CPU.
pub fn calibrate_on(
    graph: &Graph,
    data: &ImageDataset,
    cfg: &CalibConfig,
    make: &RunnerFactory<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Calibrated> {
    calibrate_inner(graph.clone(), data, cfg, Some(make), progress)
}

/// [`calibrate`], taking the graph: its weights are not copied (on the
/// VGG-16-BN fixture, the two copies this saves took about 15 ms of CPU
/// time per `qint8 quantize` run in a perf profile, most of it page faults).
pub fn calibrate_owned(
    graph: Graph,
    data: &ImageDataset,
    cfg: &CalibConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<Calibrated> {
    calibrate_inner(graph, data, cfg, None, progress)
}

fn calibrate_inner(
    graph: Graph,
    data: &ImageDataset,
    cfg: &CalibConfig,
    make: Option<&RunnerFactory<'_>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Calibrated> {
    if data.is_empty() {
        return Err(CalibError::Invalid("the calibration set is empty".into()));
    }
    if cfg.batch == 0 {
        return Err(CalibError::Invalid("calibration batch size is 0".into()));
    }
    // Fusion on, except across the tensors the passes observe (below).
    // Kernels are chosen for batches of many images, once per session: a
    // sub-batch or a short last batch takes the same ones.
    let options = SessionOptions {
        threads: cfg.threads,
        many_images: true,
        ..Default::default()
    };
    let session = Session::from_graph(graph, options)?;
    let g = session.graph();
    let input = g
        .inputs
        .first()
        .map(|v| v.name.clone())
        .ok_or_else(|| CalibError::Invalid("the graph has no input".into()))?;
    let float_nodes = float_nodes_matching(g, cfg.placement, &cfg.float_nodes)?;
    let placement = placement_of(g, cfg.placement, &float_nodes);
    let mut tracked: BTreeSet<String> = placement.activations.clone();
    if cfg.all_ranges {
        tracked.extend(g.inputs.iter().map(|v| v.name.clone()));
        tracked.extend(g.nodes.iter().flat_map(|n| n.outputs.iter().cloned()));
    }
    if let Some(c) = cfg.moving_average {
        if !(c > 0.0 && c <= 1.0) {
            return Err(CalibError::Invalid(format!(
                "moving-average constant must be in (0, 1], got {c}"
            )));
        }
    }
    let sites = match cfg.smooth {
        Some(Smoothing::Alpha(a)) if !(0.0..=1.0).contains(&a) => {
            return Err(CalibError::Invalid(format!(
                "smoothing strength must be in [0, 1], got {a}"
            )))
        }
        Some(_) if cfg.moving_average.is_none() && !cfg.all_ranges => {
            let [c, h, w] = data.input_shape();
            crate::smooth::find_sites(g, &[1, c, h, w], &placement.activations)?
        }
        _ => Vec::new(),
    };
    // Every observed tensor must be materialized; the rest runs fused
    // (Conv + Relu, + residual Add, SiLU) instead of unfused: a min-max
    // `qint8 quantize` of the VGG-16-BN fixture took 0.187 s instead of
    // 0.208 s (best of 12 runs each).
    let wanted: BTreeSet<String> = tracked
        .iter()
        .cloned()
        .chain(sites.iter().map(|s| s.tensor.clone()))
        .collect();
    let session = session.keeping_visible(wanted.iter().cloned());
    let mut runner = make
        .map(|f| f(session.graph()))
        .transpose()
        .map_err(CalibError::Invalid)?;
    let mut external = runner.as_deref_mut().map(|r| External {
        runner: r,
        wanted: &wanted,
    });
    // The session's (simplified) graph, until smoothing rewrites a copy.
    let mut g: Cow<'_, Graph> = Cow::Borrowed(session.graph());
    let uint8 = cfg.activation_dtype == QuantDtype::Uint8;
    // The histogram pass also finds each tensor's signed range.
    let passes = if (cfg.method == RangeMethod::Max && !uint8) || cfg.moving_average.is_some() {
        1
    } else {
        2
    };

    let shown = if passes == 2 && cfg.refine.is_some() {
        3
    } else {
        passes
    };
    // Pass 1: largest |x| of every tracked tensor (or its moving average
    // over batches). Sub-batches run on separate workers, each into its own
    // state, merged afterwards (a maximum does not depend on the split). The
    // moving average needs each whole batch's maximum: one state.
    let workers = if cfg.moving_average.is_some() || external.is_some() {
        1
    } else {
        session.threads().max(1)
    };
    let empty = MaxState {
        amax: tracked.iter().map(|n| (n.clone(), 0.0)).collect(),
        // Signed ranges in pass 1 only where no histogram will give them:
        // the graph input (never histogrammed) and, with one pass, all.
        signed: tracked
            .iter()
            .filter(|n| uint8 && (passes == 1 || g.inputs.iter().any(|v| &v.name == *n)))
            .map(|n| (n.clone(), (f32::INFINITY, f32::NEG_INFINITY)))
            .collect(),
        seen: BTreeSet::new(),
        channels: sites
            .iter()
            .map(|s| {
                (
                    s.tensor.clone(),
                    crate::smooth::ChannelStats::new(s.channels),
                )
            })
            .collect(),
    };
    let mut states = vec![empty; workers];
    // With a runner that computes statistics, only the maxima come back,
    // unless some tensor must be seen whole.
    let device_stats = external
        .as_ref()
        .is_some_and(|e| e.runner.computes_statistics());
    if device_stats && sites.is_empty() && cfg.moving_average.is_none() {
        let ext = external
            .as_mut()
            .ok_or_else(|| CalibError::Invalid("no runner".into()))?;
        let st = &mut states[0];
        for_each_external_batch(ext, data, cfg.batch, 1, shown, progress, &mut |r, w, b| {
            for (n, m) in r.abs_max(b.inputs.view(), w)? {
                if let Some(a) = st.amax.get_mut(&n) {
                    *a = a.max(m);
                    st.seen.insert(n);
                }
            }
            // The input's signed range from the batch itself; the others'
            // come with their histograms.
            if let (Some(r), Some(x)) = (st.signed.get_mut(&input), b.inputs.as_slice()) {
                *r = widen(*r, signed_range(x));
            }
            Ok(())
        })?;
    } else {
        for_each_batch(
            &session,
            external.as_mut(),
            &input,
            data,
            cfg.batch,
            1,
            shown,
            progress,
            &mut states,
            &|st: &mut MaxState, name, shape, x| {
                if let Some(m) = st.channels.get_mut(name) {
                    m.observe(shape, x);
                }
                if let Some(m) = st.amax.get_mut(name) {
                    let batch_max = abs_max(name, x)?;
                    let first = !st.seen.contains(name);
                    match cfg.moving_average {
                        Some(c) if !first => *m += c * (batch_max - *m),
                        Some(_) => *m = batch_max,
                        None => *m = m.max(batch_max),
                    }
                    if let Some(r) = st.signed.get_mut(name) {
                        let (lo, hi) = signed_range(x);
                        *r = match cfg.moving_average {
                            Some(c) if !first => (r.0 + c * (lo - r.0), r.1 + c * (hi - r.1)),
                            Some(_) => (lo, hi),
                            None => widen(*r, (lo, hi)),
                        };
                    }
                    if !st.seen.contains(name) {
                        st.seen.insert(name.to_string());
                    }
                }
                Ok(())
            },
        )?;
    }
    let MaxState {
        mut amax,
        mut signed,
        mut seen,
        mut channels,
    } = states.swap_remove(0);
    for st in states {
        for (n, m) in st.amax {
            if let Some(a) = amax.get_mut(&n) {
                *a = a.max(m);
            }
        }
        for (n, m) in st.signed {
            if let Some(a) = signed.get_mut(&n) {
                *a = widen(*a, m);
            }
        }
        seen.extend(st.seen);
        for (n, m) in st.channels {
            if let Some(a) = channels.get_mut(&n) {
                a.merge(&m);
            }
        }
    }
    // A planned tensor the runtime never showed would get an arbitrary scale.
    if let Some(n) = placement.activations.iter().find(|n| !seen.contains(*n)) {
        return Err(CalibError::Invalid(format!(
            "planned tensor `{n}` was never produced as float data during calibration"
        )));
    }
    // Smoothing: rewrite the graph, and derive each smoothed tensor's range
    // from its channels'. The histogram pass runs the graph as it was and
    // divides the smoothed tensors by their factors as it sees them (the
    // same values up to rounding), so no second session is built.
    let mut smoothed = Vec::new();
    let mut divisors: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    if let (Some(how), false) = (cfg.smooth, sites.is_empty()) {
        // Sites read distinct weights: their factors can be found at once.
        let factors: Vec<Option<Vec<f32>>> = session.install(|| {
            use rayon::prelude::*;
            sites
                .par_iter()
                .map(|site| how.factors(&g, site, &channels[&site.tensor], cfg.per_channel))
                .collect()
        });
        let mut g2: Graph = g.as_ref().clone();
        for (site, k) in sites.iter().zip(factors) {
            let Some(k) = k else {
                continue;
            };
            crate::smooth::apply(&mut g2, site, &k)?;
            let ch = &channels[&site.tensor];
            let m = ch
                .amax
                .iter()
                .zip(&k)
                .fold(0.0f32, |m, (a, f)| m.max(a / f));
            amax.insert(site.tensor.clone(), m);
            smoothed.push(site.tensor.clone());
            divisors.insert(site.tensor.clone(), k);
        }
        if !smoothed.is_empty() {
            let after = placement_of(&g2, cfg.placement, &float_nodes);
            if after.activations != placement.activations {
                return Err(CalibError::Invalid(
                    "smoothing changed which tensors are quantized; calibrate without it".into(),
                ));
            }
            g = Cow::Owned(g2);
        }
    }
    // Alternative thresholds per activation, for `refine`.
    let mut candidates: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    // Pass 2: histograms over the fixed ranges.
    let mut histograms = BTreeMap::new();
    let thresholds: BTreeMap<String, f32> = if passes == 1 {
        amax.clone()
    } else {
        // Graph inputs keep their full range: preprocessing already bounds
        // them, and clipping removes image content (on Fashion-MNIST the
        // entropy threshold landed on the background's spike at 0.4 of the
        // range and cost 7.6 points of top-1).
        // Softmax outputs keep theirs too: probabilities are mostly near
        // 0, so a histogram method clips the few large ones, which carry
        // the attention (on the ViT fixture entropy's thresholds were
        // 0.15-0.5 and cost 0.97 points of top-1; the full range, 0.05).
        let mut full_range: BTreeSet<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        full_range.extend(probabilities(&g));
        let mut hists: BTreeMap<String, Histogram> = amax
            .iter()
            .filter(|(n, &m)| m > 0.0 && !full_range.contains(n.as_str()))
            .map(|(n, &m)| Ok((n.clone(), Histogram::fixed_abs(cfg.bins, m)?)))
            .collect::<std::result::Result<_, qint8_math::MathError>>()?;
        let workers = if external.is_some() {
            1
        } else {
            session.threads().max(1)
        };
        let mut states = vec![hists.clone(); workers];
        if device_stats && divisors.is_empty() {
            let ext = external
                .as_mut()
                .ok_or_else(|| CalibError::Invalid("no runner".into()))?;
            let ranges: BTreeMap<String, f32> =
                hists.keys().map(|n| (n.clone(), amax[n])).collect();
            let st = &mut states[0];
            for_each_external_batch(ext, data, cfg.batch, 2, shown, progress, &mut |r, _, b| {
                for (n, h) in r.abs_histograms(b.inputs.view(), &ranges, cfg.bins)? {
                    if let Some(total) = st.get_mut(&n) {
                        total.merge(&h).map_err(|e| format!("tensor `{n}`: {e}"))?;
                    }
                }
                Ok(())
            })?;
        } else {
            for_each_batch(
                &session,
                external.as_mut(),
                &input,
                data,
                cfg.batch,
                2,
                shown,
                progress,
                &mut states,
                &|st: &mut BTreeMap<String, Histogram>, name, shape, x| {
                    if let Some(h) = st.get_mut(name) {
                        let r = match divisors.get(name) {
                            Some(k) => h.add(&crate::smooth::divide_channels(shape, x, k)),
                            None => h.add(x),
                        };
                        r.map_err(|e| format!("tensor `{name}`: {e}"))?;
                    }
                    Ok(())
                },
            )?;
        }
        // Counts add up exactly, whatever the split.
        for st in states {
            for (n, h) in st {
                if let Some(total) = hists.get_mut(&n) {
                    total.merge(&h)?;
                }
            }
        }
        // The histograms saw the values as quantized (smoothed ones
        // divided): their signed ranges are the ones to use.
        if uint8 {
            for (n, h) in &hists {
                if let Some(mm) = h.min_max() {
                    signed.insert(n.clone(), mm);
                }
            }
        }
        let search = |n: &str, h: &Histogram, m: &RangeMethod| {
            search_amax(h, m).map_err(|e| CalibError::Invalid(format!("tensor `{n}`: {e}")))
        };
        // One search per tensor, independent: spread over the workers.
        let thresholds = session.install(|| {
            use rayon::prelude::*;
            amax.par_iter()
                .map(|(n, &m)| {
                    let t = match hists.get(n) {
                        Some(h) => search(n, h, &cfg.method)?,
                        None => m,
                    };
                    Ok((n.clone(), t))
                })
                .collect::<Result<BTreeMap<String, f32>>>()
        })?;
        if cfg.refine.is_some() {
            for n in &placement.activations {
                let (Some(h), Some(&t)) = (hists.get(n), thresholds.get(n)) else {
                    continue;
                };
                let m = amax[n];
                let mut c = vec![
                    search(n, h, &RangeMethod::entropy())?,
                    search(n, h, &RangeMethod::percentile(99.99))?,
                    search(n, h, &RangeMethod::mse())?,
                    m,
                ];
                c.extend(
                    crate::refine::SCALE_CANDIDATES
                        .iter()
                        .map(|f| (t * f).min(m)),
                );
                c.retain(|&a| a > 0.0 && a != t);
                c.sort_by(f32::total_cmp);
                c.dedup();
                candidates.insert(n.clone(), c);
            }
        }
        histograms = hists;
        thresholds
    };
    let mut plan = QuantPlan::new(match (cfg.moving_average, cfg.refine) {
        (Some(c), _) => format!("moving_average_max({c})"),
        (None, Some(_)) if passes == 2 => format!("auto({})", method_name(&cfg.method)),
        (None, _) => method_name(&cfg.method),
    });
    let mut ranges: BTreeMap<String, f32> = thresholds
        .iter()
        .filter(|(n, _)| seen.contains(*n))
        .map(|(n, &t)| (n.clone(), t))
        .collect();
    let params_for = |name: &str, t: f32| {
        activation_params(t, signed.get(name).copied(), cfg.activation_dtype)
            .map_err(|e| CalibError::Invalid(format!("tensor `{name}`: {e}")))
    };
    for (name, t) in thresholds {
        if !placement.activations.contains(&name) {
            continue;
        }
        let p = params_for(&name, t)?;
        plan.activations.insert(name, p);
    }
    // Tensors that reuse another's parameters (onnxruntime's max pool or
    // reshape outputs, Relu inputs) take them over.
    for (name, source) in &placement.shared {
        if let Some(p) = plan.activations.get(source).cloned() {
            plan.activations.insert(name.clone(), p);
        }
    }
    plan.weights = session.install(|| weight_params(&g, &placement.weights, cfg.per_channel))?;
    for n in &float_nodes {
        plan.precision
            .insert(n.clone(), qint8_graph::quant::Precision::Float);
    }
    if let (Some(images), false) = (cfg.refine, candidates.is_empty()) {
        let subset = data.clone().take(images.max(1))?;
        let batches = subset.batches(cfg.batch).collect::<Result<Vec<_>>>()?;
        crate::refine::choose_thresholds(
            &g,
            &mut plan,
            &candidates,
            &params_for,
            &placement.shared,
            &batches,
            cfg.threads,
            &mut |done, total| {
                progress(Progress {
                    pass: 3,
                    passes: 3,
                    done,
                    total,
                })
            },
        )?;
        // A cache written from this run carries the chosen thresholds.
        for (name, p) in &plan.activations {
            if let Some(r) = ranges.get_mut(name) {
                if params_for(name, *r).ok().as_ref() != Some(p) {
                    let (lo, hi) = p.channels()[0].real_range();
                    *r = match cfg.activation_dtype {
                        QuantDtype::Int8 => p.channels()[0].scale * 127.0,
                        QuantDtype::Uint8 => lo.abs().max(hi),
                    };
                }
            }
        }
    }

    plan.validate(&g)?;
    let graph = match g {
        Cow::Owned(g) => g,
        Cow::Borrowed(_) => session.into_graph(),
    };
    Ok(Calibrated {
        graph,
        plan,
        ranges,
        smoothed,
        smoothing_sites: sites.iter().map(|s| s.tensor.clone()).collect(),
        histograms,
    })
}

/// The nodes of `g` that `patterns` name (see [`CalibConfig::float_nodes`]),
/// among those whose inputs `policy` quantizes. Every pattern must match
/// one; the error lists those that match none.
fn float_nodes_matching(
    g: &Graph,
    policy: qint8_graph::PlacementPolicy,
    patterns: &BTreeSet<String>,
) -> Result<BTreeSet<String>> {
    if patterns.is_empty() {
        return Ok(BTreeSet::new());
    }
    let all = placement_of(g, policy, &BTreeSet::new());
    let quantized: Vec<&str> = g
        .nodes
        .iter()
        .filter(|n| {
            n.inputs
                .iter()
                .any(|i| all.activations.contains(i) || all.weights.contains_key(i))
        })
        .map(|n| n.name.as_str())
        .collect();
    match_node_patterns(&quantized, patterns, "(names after BatchNorm folding) ")
}

/// The names among `candidates` (nodes with quantized inputs) that
/// `patterns` match, each `*` in a pattern matching any run of characters.
/// Every pattern must match one: the error lists those that match none and
/// the first candidates (`note` describes their names).
pub fn match_node_patterns(
    candidates: &[&str],
    patterns: &BTreeSet<String>,
    note: &str,
) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    let mut unmatched = Vec::new();
    for p in patterns {
        let hits: Vec<&&str> = candidates.iter().filter(|n| glob_match(p, n)).collect();
        if hits.is_empty() {
            unmatched.push(format!("`{p}`"));
        }
        found.extend(hits.into_iter().map(|n| n.to_string()));
    }
    if unmatched.is_empty() {
        return Ok(found);
    }
    let shown: Vec<String> = candidates
        .iter()
        .take(6)
        .map(|n| format!("`{n}`"))
        .collect();
    let (noun, verb) = match unmatched.len() {
        1 => ("pattern", "matches"),
        _ => ("patterns", "match"),
    };
    Err(CalibError::Invalid(format!(
        "float node {noun} {} {verb} no node with quantized inputs; the {} such nodes {note}begin {}",
        unmatched.join(", "),
        candidates.len(),
        shown.join(", ")
    )))
}

/// Whether `name` matches `pattern`, where each `*` matches any run of
/// characters (the empty one included) and everything else itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let head = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(head) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((tail, middle)) = parts.split_last() else {
        // No `*`: the whole name.
        return rest.is_empty();
    };
    // Leftmost matches leave the most room for what follows.
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(tail)
}

/// Parameters of the float weight initializers named in `weights` (name ->
/// output-channel axis): symmetric narrow-range int8, one scale per channel
/// on that axis, or one per tensor. Errors name a weight holding NaN or
/// infinity. Runs on the current rayon pool.
pub fn weight_params(
    graph: &Graph,
    weights: &BTreeMap<String, usize>,
    per_channel: bool,
) -> Result<BTreeMap<String, QuantParams>> {
    use rayon::prelude::*;
    // Independent per weight: spread over the current pool (a VGG-16-BN
    // fixture's took 7 ms on one thread at the end of a calibration).
    weights
        .par_iter()
        .filter_map(|(name, &axis)| {
            let w = graph.initializers.get(name).and_then(|t| t.as_f32())?;
            Some(weight_param(name, w, axis, per_channel).map(|p| (name.clone(), p)))
        })
        .collect()
}

/// [`weight_params`] of one weight.
fn weight_param(
    name: &str,
    w: &ndarray::ArrayD<f32>,
    axis: usize,
    per_channel: bool,
) -> Result<QuantParams> {
    let shape = w.shape().to_vec();
    let copy: Vec<f32>;
    let values: &[f32] = match w.as_slice() {
        Some(s) => s,
        None => {
            copy = w.iter().copied().collect();
            &copy
        }
    };
    // Both scans reject NaN and infinities; the error names the first one
    // in the whole tensor (a per-channel scan counts within its block).
    let bad = |e| match e {
        qint8_math::MathError::NonFiniteData { .. } => {
            let index = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
            CalibError::Invalid(format!(
                "weight `{name}` holds a non-finite value at index {index}"
            ))
        }
        other => other.into(),
    };
    Ok(if per_channel {
        let a = qint8_math::stats::amax_per_channel(values, &shape, axis).map_err(bad)?;
        QuantParams::symmetric_per_channel(&a, axis, QuantDtype::Int8, true)?
    } else {
        let a = qint8_math::stats::abs_max("weight", values).map_err(bad)?;
        QuantParams::symmetric(a, QuantDtype::Int8, true)?
    })
}

/// A short name for a method, as plans and reports print it.
pub fn method_name(m: &RangeMethod) -> String {
    match m {
        RangeMethod::Max => "max".into(),
        RangeMethod::Percentile { percentile } => format!("percentile({percentile})"),
        RangeMethod::Entropy { variant, .. } => format!(
            "entropy({})",
            match variant {
                EntropyVariant::SpikeAware => "spike_aware",
                EntropyVariant::Modelopt => "modelopt",
                EntropyVariant::Gtc2017 => "gtc2017",
            }
        ),
        RangeMethod::Mse { .. } => "mse".into(),
    }
}

/// Largest `|x|`, or an error naming the tensor and the first bad index.
fn abs_max(name: &str, x: &[f32]) -> std::result::Result<f32, String> {
    qint8_math::stats::abs_max("tensor", x).map_err(|e| match e {
        qint8_math::MathError::NonFiniteData { index, value, .. } => {
            format!("tensor `{name}` holds {value} at index {index}")
        }
        other => format!("tensor `{name}`: {other}"),
    })
}

/// What pass 1 accumulates (per worker).
#[derive(Clone)]
struct MaxState {
    /// Largest `|x|` (or its moving average) per tracked tensor.
    amax: BTreeMap<String, f32>,
    /// Smallest and largest `x` (or their moving averages) per tracked
    /// tensor, for uint8 activations only.
    signed: BTreeMap<String, (f32, f32)>,
    /// Tensors the runtime showed (integer tensors never are).
    seen: BTreeSet<String>,
    /// Per-channel statistics of the tensors to smooth.
    channels: BTreeMap<String, crate::smooth::ChannelStats>,
}

/// The smallest and largest of `x` (infinities for no values).
fn signed_range(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// The range covering both.
fn widen(a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    (a.0.min(b.0), a.1.max(b.1))
}

/// An activation's parameters for threshold `t` (see
/// [`CalibConfig::activation_dtype`]): symmetric int8, or uint8 over the
/// part of `[-t, t]` that `seen` (the tensor's signed range; none: all of
/// it) covers, with 0 in it.
pub fn activation_params(
    t: f32,
    seen: Option<(f32, f32)>,
    dtype: QuantDtype,
) -> qint8_math::Result<QuantParams> {
    match dtype {
        QuantDtype::Int8 => QuantParams::symmetric(t, QuantDtype::Int8, false),
        QuantDtype::Uint8 => {
            let (lo, hi) = seen.filter(|(lo, hi)| lo <= hi).unwrap_or((-t, t));
            QuantParams::affine(lo.max(-t).min(0.0), hi.min(t).max(0.0), dtype, false)
        }
    }
}

/// Largest activation memory, summed over the workers, for which
/// calibration runs a whole batch on each worker ([`for_each_batch`]).
const WHOLE_BATCHES_BUDGET: usize = 256 << 20;

/// Folds one produced tensor (by name) into a worker's state; an error
/// stops the run.
type StateSink<'a, S> =
    dyn Fn(&mut S, &str, &[usize], &[f32]) -> std::result::Result<(), String> + Sync + 'a;

/// A [`BatchRunner`] in use, with the tensors it must show.
struct External<'a> {
    runner: &'a mut dyn BatchRunner,
    wanted: &'a BTreeSet<String>,
}

/// What [`for_each_external_batch`] does with one batch: given the runner
/// and the tensors it must show.
type BatchJob<'a> = dyn FnMut(
        &mut dyn BatchRunner,
        &BTreeSet<String>,
        &crate::dataset::Batch,
    ) -> std::result::Result<(), String>
    + 'a;

/// Hands every batch of `data` to `each` with the runner and the tensors
/// it must show, reporting progress; an error names the batch and its
/// images.
fn for_each_external_batch(
    ext: &mut External<'_>,
    data: &ImageDataset,
    batch: usize,
    pass: u8,
    passes: u8,
    progress: &mut dyn FnMut(Progress),
    each: &mut BatchJob<'_>,
) -> Result<()> {
    let total = data.len();
    let mut done = 0;
    progress(Progress {
        pass,
        passes,
        done,
        total,
    });
    for (index, b) in data.batches(batch).enumerate() {
        let b = b?;
        each(ext.runner, ext.wanted, &b).map_err(|msg| {
            CalibError::Invalid(format!(
                "calibration batch {index} (images {}..{}): {msg}",
                index * batch,
                index * batch + b.len()
            ))
        })?;
        done += b.len();
        progress(Progress {
            pass,
            passes,
            done,
            total,
        });
    }
    Ok(())
}

/// Runs every batch of `data`, showing each produced tensor to `see` with
/// the state of the worker that produced it: while the workers' arenas for
/// whole batches fit [`WHOLE_BATCHES_BUDGET`], whole batches, each worker
/// building and running the next one as soon as it is free
/// ([`Session::pull`]); otherwise each batch cut into one
/// sub-batch per state ([`Session::observe_split`]).
/// With an external runner, batch after batch on it, into the first state.
#[allow(clippy::too_many_arguments)]
fn for_each_batch<S: Send>(
    session: &Session,
    external: Option<&mut External<'_>>,
    input: &str,
    data: &ImageDataset,
    batch: usize,
    pass: u8,
    passes: u8,
    progress: &mut dyn FnMut(Progress),
    states: &mut [S],
    see: &StateSink<'_, S>,
) -> Result<()> {
    if let Some(ext) = external {
        let st = states
            .first_mut()
            .ok_or_else(|| CalibError::Invalid("no calibration state".into()))?;
        return for_each_external_batch(
            ext,
            data,
            batch,
            pass,
            passes,
            progress,
            &mut |r, w, b| {
                r.run_observed(b.inputs.view(), w, &mut |name, shape, x| {
                    see(st, name, shape, x)
                })
            },
        );
    }
    let total = data.len();
    let mut done = 0;
    progress(Progress {
        pass,
        passes,
        done,
        total,
    });
    // Data errors name the batch and its images (pass 1 sees them all).
    let name_batch = |index: usize, len: usize, e: RuntimeError| match e {
        RuntimeError::Observer(msg) => CalibError::Invalid(format!(
            "calibration batch {index} (images {}..{}): {msg}",
            index * batch,
            index * batch + len
        )),
        other => other.into(),
    };
    // Whole batches on every worker at once hold one batch's activations
    // per worker, where cut batches hold one batch's in all: only while
    // that stays within WHOLE_BATCHES_BUDGET (large images give wide
    // products when cut anyway).
    let whole = states.len() > 1 && {
        let [c, h, w] = data.input_shape();
        let shape = [batch.min(total).max(1), c, h, w];
        let peak = session.observed_peak_bytes(&[(input, &shape)])?;
        peak.saturating_mul(states.len()) <= WHOLE_BATCHES_BUDGET
    };
    let mut observers: Vec<_> = states
        .iter_mut()
        .map(|st| move |name: &str, shape: &[usize], x: &[f32]| see(st, name, shape, x))
        .collect();
    let mut dyns: Vec<&mut dyn Observer> = observers
        .iter_mut()
        .map(|o| o as &mut dyn Observer)
        .collect();
    if whole {
        // Every worker takes the next batch as soon as it is free, and
        // builds it itself.
        let job = |index: usize, observer: &mut &mut dyn Observer| -> Result<usize> {
            let start = index * batch;
            let b = data.batch(start, batch.min(total - start))?;
            session
                .observe_here(&[(input, b.inputs.view())], *observer)
                .map_err(|e| name_batch(index, b.len(), e))?;
            Ok(b.len())
        };
        let mut finished = |_, n: usize| {
            done += n;
            progress(Progress {
                pass,
                passes,
                done,
                total,
            });
        };
        return session.pull(total.div_ceil(batch), &mut dyns, &job, &mut finished);
    }
    for (index, b) in data.batches(batch).enumerate() {
        let b = b?;
        session
            .observe_split(&[(input, b.inputs.view())], &mut dyns)
            .map_err(|e| name_batch(index, b.len(), e))?;
        done += b.len();
        progress(Progress {
            pass,
            passes,
            done,
            total,
        });
    }
    Ok(())
}

/// Softmax outputs, and the values only reshaped or permuted from them.
fn probabilities(g: &Graph) -> BTreeSet<&str> {
    let mut out: BTreeSet<&str> = BTreeSet::new();
    for n in &g.nodes {
        let from_probs = n.input(0).is_some_and(|x| out.contains(x));
        let keeps = match n.op {
            Op::Softmax { .. } => true,
            Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Flatten { .. }
            | Op::Identity
            | Op::Dropout => from_probs,
            _ => false,
        };
        if keeps {
            if let Some(y) = n.outputs.first() {
                out.insert(y.as_str());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{abs_max, glob_match};

    #[test]
    fn globs_match_whole_names_with_stars_for_any_run() {
        let yes = [
            ("c1", "c1"),
            ("*", ""),
            ("*", "/a/Conv"),
            ("/features.1/*", "/features.1/block/Conv"),
            ("*Gemm", "/classifier/Gemm"),
            ("*.1*Conv", "/f.1/x/Conv"),
            ("a*b*a", "aba"),
            ("a**a", "aa"),
        ];
        let no = [
            ("c1", "c10"),
            ("c1", "xc1"),
            ("*Gemm", "/Gemm/Add"),
            ("ab*ba", "aba"),
            ("a*b*c", "acb"),
            ("", "c1"),
        ];
        for (p, n) in yes {
            assert!(glob_match(p, n), "`{p}` should match `{n}`");
        }
        for (p, n) in no {
            assert!(!glob_match(p, n), "`{p}` should not match `{n}`");
        }
    }

    #[test]
    fn abs_max_by_bits_matches_the_float_maximum_and_finds_bad_values() {
        assert_eq!(abs_max("t", &[]), Ok(0.0));
        assert_eq!(abs_max("t", &[-0.0, 0.5, -3.25, 3.0]), Ok(3.25));
        assert_eq!(abs_max("t", &[f32::MAX, -f32::MIN_POSITIVE]), Ok(f32::MAX));
        let e = abs_max("t", &[1.0, f32::NEG_INFINITY, f32::NAN]).unwrap_err();
        assert_eq!(e, "tensor `t` holds -inf at index 1");
        let e = abs_max("t", &[1.0, 2.0, -f32::NAN]).unwrap_err();
        assert!(e.ends_with("at index 2"), "{e}");
    }
}
