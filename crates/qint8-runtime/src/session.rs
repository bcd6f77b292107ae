//! Sessions: a simplified graph, a thread pool, and compiled plans cached by
//! input shape.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use qint8_graph::{passes, Dim, Graph, Model};

use crate::error::{Result, RuntimeError};
use crate::plan::{self, CompileOptions, OutSrc, Plan, Slot, Src};

/// Sees every tensor a run produces (after fusion), by value name. `Send`
/// because the plan runs on a worker thread of the session's pool.
pub trait Observer: Send {
    /// Called once per produced tensor, in execution order. Returning an
    /// error stops the run with [`RuntimeError::Observer`].
    fn observe(
        &mut self,
        name: &str,
        shape: &[usize],
        data: &[f32],
    ) -> std::result::Result<(), String>;
}

impl<F: FnMut(&str, &[usize], &[f32]) -> std::result::Result<(), String> + Send> Observer for F {
    fn observe(
        &mut self,
        name: &str,
        shape: &[usize],
        data: &[f32],
    ) -> std::result::Result<(), String> {
        self(name, shape, data)
    }
}

/// How a session compiles and runs graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Worker threads (0: one per available core).
    pub threads: usize,
    /// Run the graph passes (BatchNorm and constant folding, Identity removal) first.
    pub simplify: bool,
    /// Fuse Conv + Relu/Clip, Sigmoid + Mul (SiLU) and QuantizeLinear +
    /// DequantizeLinear. Fused-away intermediate tensors are not observable.
    pub fuse: bool,
    /// For batches of at least `threads` samples, run sub-batches on
    /// separate threads (each executing its whole plan sequentially) when
    /// no operator mixes samples. Batch 1 always uses intra-operator threads.
    pub batch_parallel: bool,
    /// Run each convolution whose input and weights come from
    /// DequantizeLinear (a QDQ model's quantized convolutions) on integer
    /// kernels, where the CPU has them (AVX-512 VNNI): int8 products summed
    /// exactly in i32, as TensorRT and onnxruntime's integer kernels do.
    /// Off, or on other CPUs, they run in float on the dequantized values;
    /// the two differ only by float rounding.
    pub integer: bool,
    /// Choose kernels for batches of many images: 3x3 convolutions whose
    /// output planes hold fewer than four 4x4 Winograd tiles (4x4, 4x8)
    /// run on Winograd too, which gains at a few images per batch and loses at
    /// one (see [`crate::kernels::winograd::Winograd::applies`]). The
    /// choice depends on this option, never on the batch a run gets, so
    /// results do not depend on the batch size either way. Calibration
    /// sets it.
    pub many_images: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            simplify: true,
            fuse: true,
            batch_parallel: true,
            integer: true,
            many_images: false,
        }
    }
}

/// What a compiled plan is cached by: the input shapes, whether observers
/// watch the run, and whether it keeps every value (a recording).
type PlanKey = (Vec<Vec<usize>>, bool, bool);

/// A graph ready to run on the CPU.
pub struct Session {
    graph: Graph,
    opts: SessionOptions,
    threads: usize,
    pool: rayon::ThreadPool,
    plans: Mutex<HashMap<PlanKey, Arc<Plan>>>,
    splittable: Mutex<HashMap<Vec<Vec<usize>>, bool>>,
    buffers: Arc<BufferPool>,
    /// Values no fusion may hide ([`Session::keeping_visible`]).
    visible: HashSet<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("nodes", &self.graph.nodes.len())
            .field("threads", &self.threads)
            .finish()
    }
}

impl Session {
    /// Prepares `model` for execution.
    pub fn new(model: &Model, opts: SessionOptions) -> Result<Self> {
        Self::from_graph(model.graph.clone(), opts)
    }

    /// Prepares a graph for execution.
    pub fn from_graph(mut graph: Graph, opts: SessionOptions) -> Result<Self> {
        if opts.simplify {
            passes::simplify(&mut graph)?;
        } else {
            graph.validate()?;
        }
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| RuntimeError::ThreadPool(e.to_string()))?;
        Ok(Self {
            graph,
            opts,
            threads,
            pool,
            plans: Mutex::new(HashMap::new()),
            splittable: Mutex::new(HashMap::new()),
            buffers: Arc::default(),
            visible: HashSet::new(),
        })
    }

    /// This session with `names` kept out of fusion: every one of them is
    /// produced as a value of its own (and shown to observers) while the
    /// rest fuses as the options say. A calibration run that observes a
    /// few tensors then runs the fused graph instead of an unfused one.
    /// Plans compiled before are dropped.
    pub fn keeping_visible(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.visible = names.into_iter().collect();
        self.plans = Mutex::new(HashMap::new());
        self
    }

    /// This session, taking its run buffers (arenas and scratch) from the
    /// same small pool as `other`: many sessions run one after another (one
    /// per layer, say) then hold a few buffers between them instead of a
    /// few each.
    pub fn sharing_buffers_with(mut self, other: &Session) -> Self {
        self.buffers = other.buffers.clone();
        self
    }

    /// The (simplified) graph this session runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The (simplified) graph, taken out of the session.
    pub fn into_graph(self) -> Graph {
        self.graph
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` in the session's worker pool, so rayon work inside it uses
    /// the session's threads (and no more).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Names of the graph's inputs.
    pub fn input_names(&self) -> Vec<&str> {
        self.graph.inputs.iter().map(|v| v.name.as_str()).collect()
    }

    /// Names of the graph's outputs.
    pub fn output_names(&self) -> Vec<&str> {
        self.graph.outputs.iter().map(|v| v.name.as_str()).collect()
    }

    /// The compiled plan for these input shapes (compiled on first use).
    pub fn plan(&self, shapes: &[(&str, &[usize])]) -> Result<Arc<Plan>> {
        self.plan_for(shapes, false, false)
    }

    /// The plan for these shapes; `observed`: for a run with observers,
    /// which keep every DequantizeLinear output visible (an integer
    /// convolution otherwise quantizes its float input itself).
    /// `keep_all`: for a [`Recording`], every value in its own buffer.
    fn plan_for(
        &self,
        shapes: &[(&str, &[usize])],
        observed: bool,
        keep_all: bool,
    ) -> Result<Arc<Plan>> {
        // Only the integer path's fusion differs: otherwise one plan serves both.
        let observed = observed && self.opts.integer && self.opts.fuse;
        let by_name = self.checked_shapes(shapes)?;
        let key: Vec<Vec<usize>> = self
            .graph
            .inputs
            .iter()
            .map(|v| {
                by_name
                    .get(&v.name)
                    .cloned()
                    .ok_or_else(|| RuntimeError::MissingInput(v.name.clone()))
            })
            .collect::<Result<_>>()?;
        let key = (key, observed, keep_all);
        if let Some(p) = self
            .plans
            .lock()
            .map_err(|_| RuntimeError::ThreadPool("plan cache poisoned".into()))?
            .get(&key)
        {
            return Ok(p.clone());
        }
        let opts = CompileOptions {
            fuse: self.opts.fuse,
            threads: self.threads,
            integer: self.opts.integer,
            observed,
            keep_all,
            many_images: self.opts.many_images,
        };
        let p = Arc::new(
            self.pool
                .install(|| plan::compile(&self.graph, &by_name, opts, &self.visible))?,
        );
        self.plans
            .lock()
            .map_err(|_| RuntimeError::ThreadPool("plan cache poisoned".into()))?
            .insert(key, p.clone());
        Ok(p)
    }

    /// Checks the whole batch's inputs against the graph's declarations
    /// before any split, so that a wrong input is reported with its own
    /// shape rather than a sub-batch's.
    fn check_whole(&self, inputs: &[(&str, ArrayViewD<'_, f32>)]) -> Result<()> {
        let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
        self.checked_shapes(&shapes).map(drop)
    }

    /// `shapes` by input name, each checked against the graph's declaration.
    fn checked_shapes(&self, shapes: &[(&str, &[usize])]) -> Result<HashMap<String, Vec<usize>>> {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (name, shape) in shapes {
            let decl = self
                .graph
                .inputs
                .iter()
                .find(|v| v.name == *name)
                .ok_or_else(|| RuntimeError::UnknownInput {
                    name: name.to_string(),
                    known: self.input_names().iter().map(|s| s.to_string()).collect(),
                })?;
            if let Some(d) = &decl.shape {
                let fits = d.len() == shape.len()
                    && d.iter().zip(shape.iter()).all(|(a, &b)| match a {
                        Dim::Fixed(n) => *n == b,
                        Dim::Symbolic(_) => true,
                    });
                if !fits {
                    return Err(RuntimeError::InputShape {
                        name: name.to_string(),
                        expected: format!(
                            "[{}]",
                            d.iter()
                                .map(|x| x.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        got: shape.to_vec(),
                    });
                }
            }
            by_name.insert(name.to_string(), shape.to_vec());
        }
        Ok(by_name)
    }

    /// Runs the graph; returns the outputs in graph order.
    pub fn run(&self, inputs: &[(&str, ArrayViewD<'_, f32>)]) -> Result<Vec<ArrayD<f32>>> {
        self.run_inner(inputs, None, None)
    }

    /// Runs the graph, showing every produced tensor to `observer`.
    pub fn run_observed(
        &self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        observer: &mut dyn Observer,
    ) -> Result<Vec<ArrayD<f32>>> {
        self.run_inner(inputs, Some(observer), None)
    }

    /// Runs the graph once and returns the wall time of every step:
    /// `(node, operator, seconds)` in execution order.
    pub fn profile(
        &self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
    ) -> Result<Vec<(String, &'static str, f64)>> {
        let mut times = Vec::new();
        self.run_inner(inputs, None, Some(&mut times))?;
        Ok(times)
    }

    fn run_inner(
        &self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        observer: Option<&mut dyn Observer>,
        times: Option<&mut Vec<(String, &'static str, f64)>>,
    ) -> Result<Vec<ArrayD<f32>>> {
        let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
        self.check_whole(inputs)?;
        let batch = inputs
            .first()
            .and_then(|(_, a)| a.shape().first().copied())
            .unwrap_or(0);
        if observer.is_none()
            && times.is_none()
            && self.opts.batch_parallel
            && self.threads > 1
            && batch >= self.threads
            && self.batch_splittable(inputs, batch)
        {
            return self.run_split(inputs, batch);
        }
        let plan = self.plan_for(&shapes, observer.is_some(), false)?;
        let owned = contiguous(inputs);
        let flat: Vec<(&str, &[f32])> = owned.iter().map(|(n, d)| (*n, d.as_ref())).collect();
        run_plan(
            &plan,
            &flat,
            observer,
            times,
            self.threads,
            Some(&self.pool),
            &self.buffers,
        )
    }

    /// Runs the graph on the calling thread with every kernel sequential,
    /// outside the session's pool: for callers that spread their own work
    /// (sub-batches, many small graphs) over threads, which the pool would
    /// otherwise take one at a time.
    pub fn run_here(&self, inputs: &[(&str, ArrayViewD<'_, f32>)]) -> Result<Vec<ArrayD<f32>>> {
        let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
        let plan = self.plan(&shapes)?;
        let owned = contiguous(inputs);
        let flat: Vec<(&str, &[f32])> = owned.iter().map(|(n, d)| (*n, d.as_ref())).collect();
        crate::kernels::sequential(|| run_plan(&plan, &flat, None, None, 1, None, &self.buffers))
    }

    /// Whether every runtime tensor keeps the batch as its leading dimension
    /// and no operator mixes samples, so sub-batches can run independently.
    ///
    /// Decided from the graph and shape inference, not from a compiled
    /// plan: a plan for the whole batch would be compiled only to be
    /// dropped (on 1000 images in batches of 64, four of a run's eight
    /// compilations).
    fn batch_splittable(&self, inputs: &[(&str, ArrayViewD<'_, f32>)], batch: usize) -> bool {
        let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
        self.splits_batches(&shapes, batch)
    }

    /// Whether batches of inputs of these shapes (`batch` samples each)
    /// can run as sub-batches: no operator mixes samples and every value
    /// that depends on an input keeps the batch in front (what
    /// [`observe_split`](Self::observe_split) and
    /// [`record_split`](Self::record_split) check before cutting).
    pub fn splits_batches(&self, inputs: &[(&str, &[usize])], batch: usize) -> bool {
        let key: Vec<Vec<usize>> = inputs.iter().map(|(_, s)| s.to_vec()).collect();
        if let Ok(cache) = self.splittable.lock() {
            if let Some(&v) = cache.get(&key) {
                return v;
            }
        }
        // A fixed batch dimension cannot take sub-batches.
        let dynamic_batch = self.graph.inputs.iter().all(|v| {
            v.shape
                .as_ref()
                .is_none_or(|s| matches!(s.first(), Some(Dim::Symbolic(_))))
        });
        let leading_ok =
            dynamic_batch && inputs.iter().all(|(_, s)| s.first() == Some(&batch)) && {
                let given: HashMap<String, Vec<usize>> = inputs
                    .iter()
                    .map(|(n, s)| (n.to_string(), s.to_vec()))
                    .collect();
                // Every value that depends on an input keeps the batch in
                // front (weights' DequantizeLinear outputs do not depend
                // on one); a graph whose shapes cannot be inferred runs
                // whole, where the run reports why.
                qint8_graph::shape::infer(&self.graph, &given).is_ok_and(|shapes| {
                    let mut varying: std::collections::HashSet<&str> =
                        given.keys().map(String::as_str).collect();
                    self.graph.nodes.iter().all(|n| {
                        let depends = n.inputs.iter().any(|i| varying.contains(i.as_str()));
                        let outs = n.outputs.iter().filter(|o| !o.is_empty());
                        match depends {
                            true => outs.into_iter().all(|o| {
                                varying.insert(o.as_str());
                                shapes.get(o).is_some_and(|v| {
                                    v.value.is_some() || v.shape.first() == Some(&batch)
                                })
                            }),
                            false => true,
                        }
                    })
                })
            };
        let ops_ok = self.graph.nodes.iter().all(|n| {
            let rank = 4i64;
            let touches0 = |axis: i64| axis == 0 || axis == -rank;
            match &n.op {
                qint8_graph::Op::Softmax { axis }
                | qint8_graph::Op::Concat { axis }
                | qint8_graph::Op::Gather { axis }
                | qint8_graph::Op::Flatten { axis } => !touches0(*axis) && *axis != 0,
                qint8_graph::Op::Transpose { perm } => {
                    perm.as_ref().is_some_and(|p| p.first() == Some(&0))
                }
                qint8_graph::Op::ReduceMean { axes, .. } => {
                    // Axes from the attribute, or (opset 18) a constant input.
                    let axes = axes.clone().or_else(|| {
                        n.input(1)
                            .and_then(|a| self.graph.initializers.get(a))
                            .and_then(qint8_graph::Tensor::to_i64_vec)
                    });
                    axes.is_some_and(|a| !a.is_empty() && !a.iter().any(|&x| touches0(x)))
                }
                _ => true,
            }
        });
        let ok = leading_ok && ops_ok;
        if let Ok(mut cache) = self.splittable.lock() {
            cache.insert(key, ok);
        }
        ok
    }

    /// Runs sub-batches on separate threads, each executing its whole plan
    /// sequentially (no per-operator synchronization), and concatenates.
    fn run_split(
        &self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        batch: usize,
    ) -> Result<Vec<ArrayD<f32>>> {
        let parts = self.split_parts(inputs, self.threads.min(batch), false, false)?;
        let run_part = |(plan, data): &Part<'_>| {
            let flat: Vec<(&str, &[f32])> = data.iter().map(|(n, d)| (*n, d.as_slice())).collect();
            crate::kernels::sequential(|| run_plan(plan, &flat, None, None, 1, None, &self.buffers))
        };
        // On the pool's persistent workers, whose per-thread buffers stay
        // allocated between runs (fresh threads would fault them in again;
        // running the first part on the calling thread measured slower).
        let results: Vec<Result<Vec<ArrayD<f32>>>> = self.pool.install(|| {
            use rayon::prelude::*;
            parts.par_iter().with_max_len(1).map(run_part).collect()
        });
        concat_outputs(results.into_iter().collect::<Result<Vec<_>>>()?)
    }

    /// `inputs` cut into `t` sub-batches along axis 0, each with its plan
    /// (for observed runs when `observed`).
    fn split_parts<'a>(
        &self,
        inputs: &[(&'a str, ArrayViewD<'_, f32>)],
        t: usize,
        observed: bool,
        keep_all: bool,
    ) -> Result<Vec<Part<'a>>> {
        let batch = inputs
            .first()
            .and_then(|(_, a)| a.shape().first().copied())
            .unwrap_or(0);
        let sizes: Vec<usize> = (0..t)
            .map(|i| batch / t + usize::from(i < batch % t))
            .collect();
        let mut parts = Vec::with_capacity(t);
        let mut start = 0;
        for &n in &sizes {
            let sub: Vec<(&str, ArrayViewD<'_, f32>)> = inputs
                .iter()
                .map(|(name, a)| {
                    (
                        *name,
                        a.slice_axis(ndarray::Axis(0), (start..start + n).into()),
                    )
                })
                .collect();
            let shapes: Vec<(&str, &[usize])> = sub.iter().map(|(n, a)| (*n, a.shape())).collect();
            let plan = self.plan_for(&shapes, observed, keep_all)?;
            let data: Vec<(&'a str, Vec<f32>)> = sub
                .iter()
                .map(|(n, a)| {
                    // A batch's leading-axis slice is contiguous: one copy.
                    let v = match a.as_slice() {
                        Some(x) => x.to_vec(),
                        None => a.iter().copied().collect(),
                    };
                    (*n, v)
                })
                .collect();
            parts.push((plan, data));
            start += n;
        }
        Ok(parts)
    }

    /// Runs the graph for its observers only: the batch is cut into
    /// `observers.len()` sub-batches along axis 0 that run at the same time
    /// on the pool's workers, sub-batch `i` showing its tensors to
    /// `observers[i]`. So each observer sees part of every tensor, and
    /// whatever it accumulates must be merged by the caller. When the graph
    /// cannot take sub-batches (or there is one observer or one sample) the
    /// whole batch goes to `observers[0]` through
    /// [`run_observed`](Self::run_observed). Calibration uses this: on small
    /// images, whole-plan threads are several times faster than
    /// intra-operator threads.
    pub fn observe_split(
        &self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        observers: &mut [&mut dyn Observer],
    ) -> Result<()> {
        let batch = inputs
            .first()
            .and_then(|(_, a)| a.shape().first().copied())
            .unwrap_or(0);
        let t = observers.len().min(batch);
        self.check_whole(inputs)?;
        let split = t > 1 && self.batch_splittable(inputs, batch);
        if !split {
            let Some(first) = observers.first_mut() else {
                return Err(RuntimeError::Observer("no observer given".into()));
            };
            return self.run_observed(inputs, &mut **first).map(drop);
        }
        let parts = self.split_parts(inputs, t, true, false)?;
        let flat: Vec<_> = parts
            .iter()
            .map(|(plan, data)| (plan, data.iter().map(|(n, d)| (*n, d.as_slice())).collect()))
            .collect();
        self.observe_parts(&flat, &mut observers[..t])
            .into_iter()
            .collect()
    }

    /// Runs part `i`'s plan on its inputs on one of the pool's workers,
    /// sequentially, showing its tensors to `observers[i]`; one result per
    /// part.
    fn observe_parts(
        &self,
        parts: &[ObservedPart<'_, '_>],
        observers: &mut [&mut dyn Observer],
    ) -> Vec<Result<()>> {
        self.pool.install(|| {
            use rayon::prelude::*;
            parts
                .par_iter()
                .zip(observers.par_iter_mut())
                .with_max_len(1)
                .map(|((plan, flat), observer)| {
                    crate::kernels::sequential(|| {
                        run_plan(
                            plan,
                            flat,
                            Some(&mut **observer),
                            None,
                            1,
                            None,
                            &self.buffers,
                        )
                    })
                    .map(drop)
                })
                .collect()
        })
    }

    /// Peak activation bytes (arena and kernel scratch) of the plan that
    /// an observed run of these input shapes uses, compiled on first use:
    /// what each worker holds while it runs a batch of these shapes with
    /// [`observe_here`](Self::observe_here).
    pub fn observed_peak_bytes(&self, shapes: &[(&str, &[usize])]) -> Result<usize> {
        Ok(self
            .plan_for(shapes, true, false)?
            .stats()
            .peak_activation_bytes())
    }

    /// The observed plan for a whole batch of `inputs` and their data as
    /// slices (copied only where a view is not contiguous).
    #[allow(clippy::type_complexity)]
    fn whole_part<'d, 'v: 'd>(
        &self,
        inputs: &'d [(&'d str, ArrayViewD<'v, f32>)],
    ) -> Result<(Arc<Plan>, Vec<(&'d str, std::borrow::Cow<'d, [f32]>)>)> {
        self.check_whole(inputs)?;
        let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
        let plan = self.plan_for(&shapes, true, false)?;
        let data = inputs
            .iter()
            .map(|(n, a)| {
                let v = match a.as_slice() {
                    Some(x) => std::borrow::Cow::Borrowed(x),
                    None => std::borrow::Cow::Owned(a.iter().copied().collect()),
                };
                (*n, v)
            })
            .collect();
        Ok((plan, data))
    }

    /// Runs one whole batch on the calling thread, sequentially (no pool
    /// tasks), showing its tensors to `observer`: the step each worker of
    /// [`pull`](Self::pull) takes in calibration.
    pub fn observe_here(
        &self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let (plan, data) = self.whole_part(inputs)?;
        let flat: Vec<(&str, &[f32])> = data.iter().map(|(n, d)| (*n, &d[..])).collect();
        crate::kernels::sequential(|| {
            run_plan(&plan, &flat, Some(observer), None, 1, None, &self.buffers)
        })
        .map(drop)
    }

    /// Compiles, ahead of the first [`record_here`](Self::record_here) for
    /// these shapes, the plan it runs: workers that start together then
    /// find it ready instead of each compiling a copy of it at once.
    pub fn prepare_recording(&self, shapes: &[(&str, &[usize])]) -> Result<()> {
        self.plan_for(shapes, true, true).map(drop)
    }

    /// [`record_split`](Self::record_split) of one whole batch on the
    /// calling thread, sequentially (no pool tasks): the step each worker
    /// of [`pull`](Self::pull) takes in the sensitivity analysis.
    pub fn record_here(&self, inputs: &[(&str, ArrayViewD<'_, f32>)]) -> Result<Recording> {
        self.check_whole(inputs)?;
        let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
        let plan = self.plan_for(&shapes, true, true)?;
        self.record_whole(plan, inputs, true)
    }

    /// Runs `job(i, state)` for every `i` in `0..count` on the pool's
    /// workers, one worker per state: each worker takes the next `i` as
    /// soon as it is free, and its jobs see only its own state (for
    /// calibration, its observer; jobs typically build batch `i` and run
    /// it with [`observe_here`](Self::observe_here)). `done(i, t)` is
    /// called on the calling thread with what job `i` returned, as jobs
    /// finish.
    ///
    /// Calibration runs batches this way: a worker's products are as wide
    /// as a whole batch, where cutting each batch into sub-batches made
    /// them narrow (a ResNet-50 fixture pass over 1000 images in batches of
    /// 25: about 20% slower), and with no barrier between batches a slow
    /// batch holds up only its own worker (in lockstep groups of one batch
    /// per worker, the VGG-16-BN fixture's calibration spent 10-35 ms of a
    /// 100 ms pass outside the slower worker's runs).
    ///
    /// Jobs run in no fixed order and on no fixed worker, so results must
    /// not depend on either. On failure, the error of the lowest `i` that
    /// failed is returned (jobs above a failed one are not started, those
    /// below still run, so the error is the same from run to run). Jobs
    /// with no state to run them with are an error.
    pub fn pull<S: Send, T: Send, E: Send + From<RuntimeError>>(
        &self,
        count: usize,
        states: &mut [S],
        job: &(dyn Fn(usize, &mut S) -> std::result::Result<T, E> + Sync),
        done: &mut dyn FnMut(usize, T),
    ) -> std::result::Result<(), E> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        if states.is_empty() && count > 0 {
            return Err(RuntimeError::ThreadPool(format!(
                "{count} jobs and no worker state to run them with"
            ))
            .into());
        }
        let (next, failed) = (&AtomicUsize::new(0), &AtomicUsize::new(usize::MAX));
        let (tx, rx) = std::sync::mpsc::channel::<(usize, std::result::Result<T, E>)>();
        self.pool.in_place_scope(|scope| {
            for state in states.iter_mut() {
                let tx = tx.clone();
                scope.spawn(move |_| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || i > failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = job(i, state);
                    if r.is_err() {
                        failed.fetch_min(i, Ordering::Relaxed);
                    }
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            // Ends when every worker has dropped its sender.
            let mut first: Option<(usize, E)> = None;
            for (i, r) in rx {
                match r {
                    Ok(t) => done(i, t),
                    Err(e) if first.as_ref().is_none_or(|(j, _)| i < *j) => first = Some((i, e)),
                    Err(_) => {}
                }
            }
            first.map_or(Ok(()), |(_, e)| Err(e))
        })
    }

    /// Runs the graph and keeps every value an observer would see (graph
    /// inputs and every step's output), each in its own part of one buffer,
    /// instead of handing them to an observer to copy. The batch is cut
    /// into at most `parts` sub-batches along axis 0 that run at the same
    /// time on the pool's workers, as in [`observe_split`](Self::observe_split);
    /// one [`Recording`] per sub-batch, in batch order. A recording's
    /// buffer goes back to the session's pool when it is dropped, so
    /// recording batch after batch reuses the same memory.
    pub fn record_split(
        &self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        parts: usize,
    ) -> Result<Vec<Recording>> {
        let batch = inputs
            .first()
            .and_then(|(_, a)| a.shape().first().copied())
            .unwrap_or(0);
        let t = parts.min(batch);
        self.check_whole(inputs)?;
        if t < 2 || !self.batch_splittable(inputs, batch) {
            let shapes: Vec<(&str, &[usize])> =
                inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
            let whole = self.plan_for(&shapes, true, true)?;
            return Ok(vec![self.record_whole(whole, inputs, false)?]);
        }
        let parts = self.split_parts(inputs, t, true, true)?;
        self.pool.install(|| {
            use rayon::prelude::*;
            parts
                .into_par_iter()
                .with_max_len(1)
                .map(|(plan, data)| {
                    let flat: Vec<(&str, &[f32])> =
                        data.iter().map(|(n, d)| (*n, d.as_slice())).collect();
                    crate::kernels::sequential(|| self.record_plan(plan, &flat, 1, false))
                })
                .collect()
        })
    }

    /// [`run_here`](Self::run_here) that hands over the run's buffer
    /// instead of copying the outputs out of it: read them from the
    /// [`Recording`] (which holds the graph outputs only; the plan reused
    /// the other values' memory).
    pub fn run_here_kept(&self, inputs: &[(&str, ArrayViewD<'_, f32>)]) -> Result<Recording> {
        let shapes: Vec<(&str, &[usize])> = inputs.iter().map(|(n, a)| (*n, a.shape())).collect();
        self.record_whole(self.plan(&shapes)?, inputs, true)
    }

    /// One run of `plan` over the whole of `inputs`, its buffer kept: on
    /// the calling thread with every kernel sequential (`here`), or in the
    /// session's pool with its threads.
    fn record_whole(
        &self,
        plan: Arc<Plan>,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        here: bool,
    ) -> Result<Recording> {
        let owned = contiguous(inputs);
        let flat: Vec<(&str, &[f32])> = owned.iter().map(|(n, d)| (*n, d.as_ref())).collect();
        match here {
            true => crate::kernels::sequential(|| self.record_plan(plan, &flat, 1, false)),
            false => self.record_plan(plan, &flat, self.threads, true),
        }
    }

    /// One run of a plan, its buffer kept as a [`Recording`].
    fn record_plan(
        &self,
        plan: Arc<Plan>,
        inputs: &[(&str, &[f32])],
        threads: usize,
        in_pool: bool,
    ) -> Result<Recording> {
        let mut arena = self.buffers.take(plan.arena_len);
        let mut scratch = self.buffers.take(plan.scratch_len);
        let mut go = || {
            execute(
                &plan,
                inputs,
                true,
                &mut None,
                &mut None,
                threads,
                &mut arena[..plan.arena_len],
                &mut scratch[..plan.scratch_len],
            )
        };
        let result = match in_pool {
            true if threads > 1 => self.pool.install(|| with_awake_workers(threads - 1, go)),
            true => self.pool.install(go),
            false => go(),
        };
        self.buffers.give(scratch);
        let recording = Recording {
            arena,
            plan,
            buffers: self.buffers.clone(),
        };
        result.map(|_| recording)
    }
}

/// The values one run of a session left in its buffer, by name: after
/// [`Session::record_split`], the graph inputs and the output of every
/// step (a fused step shows only its last output, as to observers); after
/// [`Session::run_here_kept`], the graph outputs.
pub struct Recording {
    arena: Vec<f32>,
    plan: Arc<Plan>,
    buffers: Arc<BufferPool>,
}

impl Recording {
    /// The shape and data of value `name`, if the run produced it.
    pub fn get(&self, name: &str) -> Option<(&[usize], &[f32])> {
        self.plan
            .values
            .get(name)
            .map(|(slot, shape)| (shape.as_slice(), self.data(*slot, shape)))
    }

    /// Every value: name, shape and data.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> + '_ {
        self.plan
            .values
            .iter()
            .map(|(n, (slot, shape))| (n.as_str(), shape.as_slice(), self.data(*slot, shape)))
    }

    fn data(&self, slot: Slot, shape: &[usize]) -> &[f32] {
        let len = shape.iter().product::<usize>().min(slot.len);
        &self.arena[slot.offset..slot.offset + len]
    }
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("floats", &self.plan.arena_len)
            .finish()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.buffers.give(std::mem::take(&mut self.arena));
    }
}

/// One sub-batch: its plan and its inputs by name.
type Part<'a> = (Arc<Plan>, Vec<(&'a str, Vec<f32>)>);

/// A plan and its inputs, as [`Session::observe_parts`] runs them.
type ObservedPart<'p, 'd> = (&'p Arc<Plan>, Vec<(&'d str, &'d [f32])>);

/// Joins the sub-batches' outputs along the batch axis.
fn concat_outputs(results: Vec<Vec<ArrayD<f32>>>) -> Result<Vec<ArrayD<f32>>> {
    let n_out = results.first().map(Vec::len).unwrap_or(0);
    (0..n_out)
        .map(|k| {
            let views: Vec<_> = results.iter().map(|r| r[k].view()).collect();
            ndarray::concatenate(ndarray::Axis(0), &views).map_err(|e| {
                RuntimeError::Graph(qint8_graph::GraphError::Invalid(format!(
                    "joining sub-batches: {e}"
                )))
            })
        })
        .collect()
}

/// Every input's data as one contiguous slice (copied only when strided).
fn contiguous<'a>(
    inputs: &'a [(&'a str, ArrayViewD<'_, f32>)],
) -> Vec<(&'a str, std::borrow::Cow<'a, [f32]>)> {
    inputs
        .iter()
        .map(|(n, a)| {
            let data = match a.as_slice() {
                Some(s) => std::borrow::Cow::Borrowed(s),
                None => std::borrow::Cow::Owned(a.iter().copied().collect()),
            };
            (*n, data)
        })
        .collect()
}

/// Executes a plan on one thread's worth of arena (kernels may still use
/// the current rayon pool unless the thread is sequential).
fn run_plan(
    plan: &Plan,
    inputs: &[(&str, &[f32])],
    mut observer: Option<&mut dyn Observer>,
    mut times: Option<&mut Vec<(String, &'static str, f64)>>,
    threads: usize,
    pool: Option<&rayon::ThreadPool>,
    buffers: &BufferPool,
) -> Result<Vec<ArrayD<f32>>> {
    let mut arena = buffers.take(plan.arena_len);
    let mut scratch = buffers.take(plan.scratch_len);
    let mut go = || {
        execute(
            plan,
            inputs,
            false,
            &mut observer,
            &mut times,
            threads,
            &mut arena[..plan.arena_len],
            &mut scratch[..plan.scratch_len],
        )
    };
    let result = match pool {
        // The whole plan runs inside the pool, with the other workers kept
        // awake between operators (see `with_awake_workers`).
        Some(p) if threads > 1 => p.install(|| with_awake_workers(threads - 1, go)),
        Some(p) => p.install(go),
        None => go(),
    };
    buffers.give(arena);
    buffers.give(scratch);
    result
}

/// Runs `f` on the current pool worker while `others` jobs keep the other
/// workers busy-waiting for work. A sleeping worker takes tens of
/// microseconds to wake (measured here: 25-120 us per fork-join after 0-500
/// us of serial work, against operators of 0.1-2 ms), so without this every
/// operator's parallel region would start late on all but one thread. The
/// keepers run whatever work the operators spawn (`rayon::yield_now`) and
/// return when `f` is done; one that lands on `f`'s own thread returns at once.
fn with_awake_workers<R: Send>(others: usize, f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    let owner = rayon::current_thread_index();
    rayon::scope(|s| {
        for _ in 0..others {
            s.spawn(|_| {
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let r = f();
        done.store(true, Ordering::Release);
        r
    })
}

/// Reusable arena buffers: fresh allocations of tens of MB cost page faults
/// and zeroing on every run. Kernels overwrite what they produce, so a
/// reused buffer needs no clearing: [`take`](Self::take) hands out at
/// least the length asked for, never shortening a buffer, so that what was
/// once zeroed is not zeroed again when a buffer serves a larger plan than
/// its last one (arenas and scratch buffers of several sizes circulate
/// between a session and those sharing its pool: on the VGG-16-BN fixture's
/// analysis, growing them back was 0.7% of the process's samples).
#[derive(Debug, Default)]
pub(crate) struct BufferPool(Mutex<Vec<Vec<f32>>>);

impl BufferPool {
    /// A buffer of at least `len` floats (callers use its first `len`).
    fn take(&self, len: usize) -> Vec<f32> {
        let mut v = self
            .0
            .lock()
            .ok()
            .and_then(|mut free| {
                // The smallest buffer that fits: with several threads taking
                // arenas and scratch buffers of different sizes, first fit
                // hands a thread a buffer another size was using, which then
                // grows (reallocating and zeroing megabytes) on every run.
                let best = free
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.capacity() >= len)
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i)?;
                Some(free.swap_remove(best))
            })
            .unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        v
    }

    fn give(&self, v: Vec<f32>) {
        if let Ok(mut free) = self.0.lock() {
            // Keep a few buffers: one arena and one scratch per worker thread.
            if free.len() < 16 {
                free.push(v);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// Runs `plan` in `arena`; returns copies of the graph outputs unless
/// `keep` (the caller keeps the arena and reads them there).
fn execute(
    plan: &Plan,
    inputs: &[(&str, &[f32])],
    keep: bool,
    observer: &mut Option<&mut dyn Observer>,
    times: &mut Option<&mut Vec<(String, &'static str, f64)>>,
    threads: usize,
    arena: &mut [f32],
    scratch: &mut [f32],
) -> Result<Vec<ArrayD<f32>>> {
    let mut given: Vec<&[f32]> = Vec::with_capacity(plan.inputs.len());
    for (name, slot, shape) in &plan.inputs {
        let (_, a) = inputs
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| RuntimeError::MissingInput(name.clone()))?;
        let a = a.get(..slot.len).ok_or_else(|| RuntimeError::InputShape {
            name: name.clone(),
            expected: format!("{shape:?} ({} values)", slot.len),
            got: vec![a.len()],
        })?;
        if plan.inputs_in_arena {
            arena[slot.offset..slot.offset + slot.len].copy_from_slice(a);
        }
        if let Some(obs) = observer.as_deref_mut() {
            obs.observe(name, shape, a)
                .map_err(RuntimeError::Observer)?;
        }
        given.push(a);
    }
    for step in &plan.steps {
        // Inputs never overlap the output: the allocator keeps live buffers
        // disjoint, so split the arena around the output.
        let out_range = step.out.offset..step.out.offset + step.out.len;
        let (lo, rest) = arena.split_at_mut(out_range.start);
        let (out, hi) = rest.split_at_mut(step.out.len);
        let ins: Vec<&[f32]> = step
            .ins
            .iter()
            .map(|s| match s {
                Src::Const(c) => c.as_slice(),
                Src::Input(i) => given[*i],
                Src::Slot(sl) => {
                    if sl.offset + sl.len <= out_range.start {
                        &lo[sl.offset..sl.offset + sl.len]
                    } else {
                        let o = sl.offset - out_range.end;
                        &hi[o..o + sl.len]
                    }
                }
            })
            .collect();
        let t0 = times.is_some().then(std::time::Instant::now);
        plan::run_kernel(&step.kernel, &ins, out, scratch, threads);
        if let (Some(t), Some(t0)) = (times.as_deref_mut(), t0) {
            t.push((step.node.clone(), step.op, t0.elapsed().as_secs_f64()));
        }
        if let Some(obs) = observer.as_deref_mut() {
            for (name, shape) in &step.names {
                obs.observe(name, shape, out)
                    .map_err(RuntimeError::Observer)?;
            }
        }
    }
    if keep {
        return Ok(Vec::new());
    }
    plan.outputs
        .iter()
        .map(|(name, src, shape)| {
            let data = match src {
                OutSrc::Slot(s) => arena[s.offset..s.offset + s.len].to_vec(),
                OutSrc::Const(c) => c.as_ref().clone(),
            };
            ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| {
                RuntimeError::Graph(qint8_graph::GraphError::Invalid(format!(
                    "output {name}: {e}"
                )))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;
    use qint8_graph::zoo::{build, ZooConfig};
    use std::collections::BTreeMap;

    #[test]
    fn pooled_buffers_are_not_shortened_or_cleared_again() {
        let pool = BufferPool::default();
        let mut v = pool.take(100);
        assert_eq!(v, vec![0.0; 100], "fresh buffers start zeroed");
        v.fill(7.0);
        pool.give(v);
        // A smaller plan gets the same buffer, whole.
        let v = pool.take(50);
        assert_eq!(v.len(), 100);
        pool.give(v);
        // A larger one again: nothing was cleared in between.
        let v = pool.take(100);
        assert!(v.iter().all(|&x| x == 7.0));
        pool.give(v);
        // Beyond what was ever written, floats are zero.
        let v = pool.take(300);
        assert_eq!(v.len(), 300);
        assert!(v[100..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn a_prepared_recording_plan_is_the_one_record_here_runs() {
        let cfg = ZooConfig::resnet50()
            .with_width_mult(0.125)
            .with_resolution(32, 32)
            .with_in_channels(1)
            .with_classes(3);
        let graph = build(&cfg).unwrap().graph;
        let opts = || SessionOptions {
            threads: 1,
            simplify: false,
            fuse: false,
            ..Default::default()
        };
        let input = graph.inputs[0].name.clone();
        let shape = [2usize, 1, 32, 32];
        let x = ArrayD::from_shape_fn(IxDyn(&shape), |i| (i[2] * 32 + i[3]) as f32 / 1024.0);
        let ready = Session::from_graph(graph.clone(), opts()).unwrap();
        ready.prepare_recording(&[(&input, &shape[..])]).unwrap();
        let compiled = |s: &Session| s.plans.lock().unwrap().len();
        assert_eq!(compiled(&ready), 1);
        let a = ready.record_here(&[(&input, x.view())]).unwrap();
        assert_eq!(compiled(&ready), 1, "record_here found the plan ready");
        let b = Session::from_graph(graph, opts())
            .unwrap()
            .record_here(&[(&input, x.view())])
            .unwrap();
        let values = |r: &Recording| {
            r.iter()
                .map(|(n, s, d)| (n.to_string(), (s.to_vec(), d.to_vec())))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(a.iter().count() > 10);
        assert!(values(&a) == values(&b), "the same recorded values");
        // A shape the graph does not take is an error, as for a run.
        assert!(ready
            .prepare_recording(&[(&input, &[2, 3, 32, 32][..])])
            .is_err());
    }
}
