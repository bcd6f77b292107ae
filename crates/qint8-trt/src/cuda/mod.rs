//! GPU execution of a graph through CUDA (feature `cuda`).
//!
//! [`CudaExecutor`] runs an FP32 or QDQ graph on an NVIDIA GPU the way the
//! ONNX operators define it: Q/DQ pairs round and clip in float, exactly
//! as onnxruntime with its optimizations off does, so a QDQ file scores on
//! the GPU what it scores in onnxruntime and, up to float rounding, in
//! qint8's CPU runtime. It is meant for evaluating and checking exported
//! models on large sets, not as a TensorRT replacement.
//!
//! - CUDA is loaded at run time (cudarc with dynamic loading, pinned to
//!   CUDA 13.0): the crate builds and its tests pass on machines without
//!   CUDA, and [`probe`] names the library or device that is missing.
//! - Device code is CUDA C ([`KERNELS`]) compiled by NVRTC when an executor
//!   is made. Gemm/MatMul and convolutions with one group go through cuBLAS
//!   (im2col'd, or as they are for 1x1), or through cuDNN where timing both
//!   on the convolution's shapes found cuDNN faster; grouped ones through a
//!   direct kernel. Strict FP32 throughout (no TF32).
//! - As calibration's `BatchRunner` it computes each tensor's largest `|x|`
//!   and its histogram on the device ([`CudaExecutor::run_stats`]).
//! - Every tensor lives on the device as contiguous float32; quantized
//!   values are float integers, which hold int8 and uint8 exactly.
//! - It runs every operator qint8 parses; Shape, Gather, Cast, Equal,
//!   Where and ConstantOfShape only where they fold to constants, and
//!   windows (Conv, pooling) in two spatial axes. Planning lists every node
//!   it cannot run in one error.
//! - Shapes come from [`qint8_graph::shape::infer`] per input shape, so
//!   shape subgraphs (PyTorch's flatten and adaptive-pooling chains) run on
//!   the host once per shape, never on the device.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::cudnn::{ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::CompileOptions;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use qint8_graph::shape::{self, Shapes};
use qint8_graph::{Graph, Node, Op, Tensor};

use crate::error::{Result, TrtError};

/// The CUDA C source of every kernel, compiled by NVRTC at run time.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Kernel names in [`KERNELS`], loaded once per executor.
pub const KERNEL_NAMES: [&str; 13] = [
    "unary_f32",
    "binary_f32",
    "scatter_f32",
    "im2col_f32",
    "conv_grouped_f32",
    "add_channel_f32",
    "affine_channel_f32",
    "pool2d_f32",
    "row_mean_f32",
    "softmax_f32",
    "linear8_f32",
    "stats_f32",
    "abs_hist_f32",
];

/// Tensors of higher rank than this are rejected (broadcast and permute
/// index arithmetic is unrolled to it).
const MAX_RANK: usize = 6;

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

fn dbg_err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> TrtError + '_ {
    move |e| TrtError::Gpu(format!("{what}: {e:?}"))
}

/// Launches kernel `$name` of [`KERNELS`] with launch configuration `$cfg`,
/// pushing each argument and then each element of the optional trailing
/// `$ints` (all by reference); `$what` names the launch in errors.
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr, $what:literal; $($arg:expr),+ $(; $ints:expr)?) => {{
        let f = $self.func($name)?;
        let mut l = $self.stream.launch_builder(f);
        $( l.arg($arg); )+
        $( for v in $ints { l.arg(v); } )?
        // SAFETY: the arguments are the kernel's parameters, in order and of
        // its types (`kernels.cu`).
        unsafe { l.launch($cfg) }.map_err(dbg_err($what))?;
    }};
}

/// Runs `f`, turning a panic inside the CUDA bindings (a symbol an old
/// driver lacks) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            Err(TrtError::Gpu(format!(
                "{what}: CUDA library failure: {msg}"
            )))
        }
    }
}

/// Keeps memory freed to the device's default pool instead of handing it
/// back to the driver at every synchronization (the pool's default): each
/// run allocates its activations from the pool, and mapping them afresh
/// every batch costs more than the kernels on small inputs.
fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return;
    }
    // SAFETY: plain driver calls on this context's device; a failure only
    // leaves the pool's default in place.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            == sys::cudaError_enum::CUDA_SUCCESS
        {
            let mut keep = u64::MAX;
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            );
        }
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name (`NVIDIA H200`).
    pub name: String,
    /// Compute capability, major and minor.
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub memory: usize,
}

/// Checks that the CUDA driver, NVRTC and cuBLAS libraries load and that
/// device 0 exists. The error names everything missing, so callers (and
/// tests) can skip GPU work cleanly on machines without CUDA.
pub fn probe() -> Result<DeviceInfo> {
    let mut missing = Vec::new();
    // SAFETY: these only try to open the shared libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("the CUDA driver (libcuda.so.1)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("NVRTC (libnvrtc.so.13)");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            missing.push("cuBLAS (libcublas.so.13)");
        }
    }
    if !missing.is_empty() {
        return Err(TrtError::Gpu(format!(
            "CUDA is not available: cannot load {}; install the NVIDIA driver and the CUDA 13 \
             libraries, or add their folder to LD_LIBRARY_PATH",
            missing.join(", ")
        )));
    }
    guarded("probing the GPU", || {
        let n = CudaContext::device_count()
            .map_err(|e| TrtError::Gpu(format!("no usable CUDA device: {e:?}")))?;
        if n < 1 {
            return Err(TrtError::Gpu("no CUDA device found".into()));
        }
        let ctx = CudaContext::new(0).map_err(dbg_err("opening CUDA device 0"))?;
        Ok(DeviceInfo {
            name: ctx.name().map_err(dbg_err("reading the device name"))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(dbg_err("reading the compute capability"))?,
            memory: ctx
                .total_mem()
                .map_err(dbg_err("reading the memory size"))?,
        })
    })
}

/// Compiles [`KERNELS`] with NVRTC to PTX for `arch` (`compute_90`; the
/// NVRTC default when `None`). Needs only the NVRTC library, no GPU: the
/// tests run it wherever NVRTC loads. The PTX is kept per architecture for
/// the process: NVRTC takes most of a second, and each executor needs it.
pub fn compile_kernels(arch: Option<&'static str>) -> Result<String> {
    static COMPILED: std::sync::Mutex<Vec<(Option<&'static str>, String)>> =
        std::sync::Mutex::new(Vec::new());
    let cached = |c: &Vec<(Option<&'static str>, String)>| {
        c.iter().find(|(a, _)| *a == arch).map(|(_, p)| p.clone())
    };
    if let Some(p) = COMPILED.lock().ok().and_then(|c| cached(&c)) {
        return Ok(p);
    }
    let ptx = compile_uncached(arch)?;
    if let Ok(mut c) = COMPILED.lock() {
        if cached(&c).is_none() {
            c.push((arch, ptx.clone()));
        }
    }
    Ok(ptx)
}

fn compile_uncached(arch: Option<&'static str>) -> Result<String> {
    // SAFETY: only opens the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(TrtError::Gpu(
            "CUDA is not available: cannot load NVRTC (libnvrtc.so.13)".into(),
        ));
    }
    guarded("compiling the kernels", || {
        let opts = CompileOptions {
            arch,
            // Correctly rounded division and square root, no flush to zero
            // and no fused multiply-adds beyond those written: the same
            // float results as the CPU up to summation order.
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ftz: Some(false),
            fmad: Some(false),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
            .map_err(|e| TrtError::Gpu(format!("NVRTC rejected the kernels: {e}")))?;
        Ok(ptx.to_src())
    })
}

/// The `compute_XY` name NVRTC takes for a compute capability it knows.
fn arch_name(cc: (i32, i32)) -> Option<&'static str> {
    Some(match cc {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        _ => return None,
    })
}

/// Broadcast, permute and scatter geometry as the kernels read it (the
/// `Strided` struct of [`KERNELS`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Strided {
    rank: i32,
    kind: i32,
    dims: [i64; MAX_RANK],
    sa: [i64; MAX_RANK],
    sb: [i64; MAX_RANK],
}

// SAFETY: plain `repr(C)` integers, laid out as the CUDA struct.
unsafe impl DeviceRepr for Strided {}

/// Contiguous strides of `shape`.
fn strides_of(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1] as i64;
    }
    s
}

/// Strides that read an operand of `shape` broadcast to `out` (numpy rules:
/// aligned at the right, size-1 axes repeat).
fn broadcast_strides(node: &Node, shape: &[usize], out: &[usize]) -> Result<[i64; MAX_RANK]> {
    if shape.len() > out.len() {
        return Err(unsupported_here(
            node,
            format!("operand {shape:?} does not broadcast to {out:?}"),
        ));
    }
    let own = strides_of(shape);
    let lead = out.len() - shape.len();
    let mut s = [0i64; MAX_RANK];
    for (d, &o) in out.iter().enumerate() {
        if d < lead {
            continue;
        }
        let k = shape[d - lead];
        s[d] = if k == o {
            own[d - lead]
        } else if k == 1 {
            0
        } else {
            return Err(unsupported_here(
                node,
                format!("operand {shape:?} does not broadcast to {out:?}"),
            ));
        };
    }
    Ok(s)
}

fn dims_of(node: &Node, out: &[usize]) -> Result<[i64; MAX_RANK]> {
    if out.len() > MAX_RANK {
        return Err(unsupported_here(
            node,
            format!("rank {} is above the GPU executor's {MAX_RANK}", out.len()),
        ));
    }
    let mut d = [1i64; MAX_RANK];
    for (k, &v) in out.iter().enumerate() {
        d[k] = v as i64;
    }
    Ok(d)
}

fn unsupported_here(node: &Node, why: impl Display) -> TrtError {
    TrtError::Gpu(format!("node {} ({}): {why}", node.name, node.op.op_type()))
}

/// A 2-D window (convolution or pooling) resolved for one input shape.
#[derive(Debug, Clone, Copy)]
struct Window2 {
    kh: i32,
    kw: i32,
    sh: i32,
    sw: i32,
    ph: i32,
    pw: i32,
    phe: i32,
    pwe: i32,
    dh: i32,
    dw: i32,
    oh: i32,
    ow: i32,
}

fn window2(node: &Node, w: &shape::Window) -> Result<Window2> {
    if w.kernel.len() != 2 {
        return Err(unsupported_here(
            node,
            format!(
                "{} spatial axes; the GPU executor runs 2-D windows",
                w.kernel.len()
            ),
        ));
    }
    let i = |v: usize| v as i32;
    Ok(Window2 {
        kh: i(w.kernel[0]),
        kw: i(w.kernel[1]),
        sh: i(w.strides[0]),
        sw: i(w.strides[1]),
        ph: i(w.pad_begin[0]),
        pw: i(w.pad_begin[1]),
        phe: i(w.pad_end[0]),
        pwe: i(w.pad_end[1]),
        dh: i(w.dilations[0]),
        dw: i(w.dilations[1]),
        oh: i(w.out[0]),
        ow: i(w.out[1]),
    })
}

/// One device operation of a compiled plan. Names refer to live values or
/// to constants uploaded for the plan.
#[derive(Debug, Clone)]
enum Step {
    Unary {
        x: String,
        y: String,
        n: usize,
        kind: i32,
        a: f32,
        b: f32,
    },
    Binary {
        a: String,
        b: Option<String>,
        y: String,
        n: usize,
        p: Strided,
    },
    /// The output is the input's buffer (Reshape, Flatten, Squeeze, ...).
    Alias { x: String, y: String },
    /// Convolution with one group: im2col (skipped for 1x1, stride 1, no
    /// padding) and a batched cuBLAS product, then the bias.
    ConvGemm {
        x: String,
        w: String,
        bias: Option<String>,
        y: String,
        dims: [i32; 4],
        m: i32,
        win: Window2,
        direct: bool,
    },
    ConvGrouped {
        x: String,
        w: String,
        bias: Option<String>,
        y: String,
        dims: [i32; 4],
        m: i32,
        groups: i32,
        win: Window2,
    },
    /// `Y[m, n] = alpha A'[m, k] B'[k, n] + beta C`; `c` is read through
    /// broadcast strides into Y before the product.
    Gemm {
        a: String,
        b: String,
        c: Option<(String, Strided)>,
        y: String,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    Pool {
        x: String,
        y: String,
        planes: i32,
        h: i32,
        w: i32,
        win: Window2,
        is_max: bool,
        count_include_pad: bool,
    },
    RowMean {
        x: String,
        y: String,
        rows: usize,
        len: usize,
    },
    Softmax {
        x: String,
        y: String,
        outer: usize,
        len: usize,
        inner: usize,
    },
    /// QuantizeLinear (`saturate`: its output range) or DequantizeLinear.
    Linear8 {
        x: String,
        y: String,
        n: usize,
        scale: String,
        zero: String,
        channels: i32,
        inner: usize,
        saturate: Option<(f32, f32)>,
    },
    Affine {
        x: String,
        y: String,
        n: usize,
        channels: i32,
        inner: usize,
        a: String,
        b: String,
    },
    Concat {
        parts: Vec<(String, usize, usize, Strided)>,
        y: String,
        n: usize,
    },
}

/// A plan for one input shape, made on the host: steps, the values each
/// step frees after it, constants to upload, and the outputs.
#[derive(Debug)]
struct HostPlan {
    input_shape: Vec<usize>,
    steps: Vec<Step>,
    frees: Vec<Vec<String>>,
    uploads: Vec<(String, Vec<f32>)>,
    outputs: Vec<(String, Vec<usize>)>,
    /// Outputs known on the host for this shape (constant results).
    host_outputs: HashMap<String, Vec<f32>>,
    /// The shape of each step's output, by step.
    shapes: Vec<Vec<usize>>,
}

/// A host plan with its constants on the device, and the cuDNN setup of
/// each convolution step that cuDNN runs.
struct Plan {
    host: HostPlan,
    consts: HashMap<String, CudaSlice<f32>>,
    convs: Vec<Option<CudnnConv>>,
    /// Bytes of the largest cuDNN workspace.
    workspace: usize,
    /// Elements of the largest im2col buffer of the steps cuDNN does not run.
    col_len: usize,
}

/// One convolution's cuDNN descriptors and algorithm.
struct CudnnConv {
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    conv: ConvDescriptor<f32>,
    algo: cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t,
}

/// How a [`CudaExecutor`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Spatial convolutions with one group through cuDNN where it loads
    /// (strict FP32, no TF32) and the padding is symmetric. The rest, and
    /// all with `false`, run on the built-in path: im2col and cuBLAS, cuBLAS
    /// alone for 1x1 convolutions, a direct kernel for grouped ones.
    pub cudnn: bool,
    /// Time cuDNN against the built-in path on each convolution's shapes
    /// when a plan is made, and keep the faster; with `false` cuDNN runs
    /// every convolution it can.
    pub tune: bool,
}

impl Default for CudaOptions {
    /// cuDNN on, unless the environment says `QINT8_CUDNN=0` (or `off`),
    /// which lets the command-line tool compare the two paths.
    fn default() -> Self {
        let off =
            std::env::var("QINT8_CUDNN").is_ok_and(|v| v == "0" || v.eq_ignore_ascii_case("off"));
        Self {
            cudnn: !off,
            tune: true,
        }
    }
}

/// Runs one graph on GPU 0 (see the module docs).
pub struct CudaExecutor {
    graph: Graph,
    input: String,
    device: DeviceInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    _module: Arc<CudaModule>,
    weights: HashMap<String, CudaSlice<f32>>,
    cudnn: Option<Arc<Cudnn>>,
    tune: bool,
    plan: Option<Plan>,
}

impl std::fmt::Debug for CudaExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaExecutor")
            .field("graph", &self.graph.name)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// The data inputs of a node: the ones read on the device. The others
/// (shapes, axes, scales, clip bounds) are read on the host.
fn data_inputs(op: &Op) -> &'static [usize] {
    match op {
        Op::Conv(_) | Op::Gemm { .. } => &[0, 1, 2],
        Op::MatMul | Op::Add | Op::Sub | Op::Mul | Op::Div => &[0, 1],
        Op::Concat { .. } => &[],
        _ => &[0],
    }
}

impl CudaExecutor {
    /// Prepares `graph` (simplified first: BatchNormalization folded,
    /// constants folded) on GPU 0: checks every operator, compiles the
    /// kernels and uploads the weights. Errors name every operator type the
    /// executor does not run, or what CUDA lacks.
    pub fn new(graph: &Graph) -> Result<Self> {
        Self::with_options(graph, CudaOptions::default())
    }

    /// [`new`](Self::new) with explicit options.
    pub fn with_options(graph: &Graph, options: CudaOptions) -> Result<Self> {
        let mut g = graph.clone();
        qint8_graph::passes::simplify(&mut g)?;
        let input = match g.inputs.as_slice() {
            [one] => one.name.clone(),
            other => {
                return Err(TrtError::Gpu(format!(
                    "the GPU executor runs graphs with one input; this one has {}",
                    other.len()
                )))
            }
        };
        let device = probe()?;
        guarded("preparing the GPU executor", move || {
            let ctx = CudaContext::new(0).map_err(dbg_err("opening CUDA device 0"))?;
            // One stream runs everything in order: the per-buffer events
            // that order work across streams are not needed.
            // SAFETY: no other stream uses this context's buffers.
            unsafe { ctx.disable_event_tracking() };
            keep_freed_memory(&ctx);
            let stream = ctx
                .new_stream()
                .map_err(dbg_err("creating a CUDA stream"))?;
            let ptx = compile_kernels(arch_name(device.compute_capability))?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(dbg_err("loading the kernels"))?;
            let mut funcs = HashMap::new();
            for name in KERNEL_NAMES {
                let f = module
                    .load_function(name)
                    .map_err(dbg_err(&format!("loading kernel {name}")))?;
                funcs.insert(name, f);
            }
            let blas =
                CudaBlas::new(stream.clone()).map_err(dbg_err("creating a cuBLAS handle"))?;
            // SAFETY: only opens the library.
            let cudnn = if options.cudnn && unsafe { cudarc::cudnn::sys::is_culib_present() } {
                Some(Cudnn::new(stream.clone()).map_err(dbg_err("creating a cuDNN handle"))?)
            } else {
                None
            };
            // Weights: every initializer a node reads as data.
            let mut weights = HashMap::new();
            for n in &g.nodes {
                for &i in data_inputs(&n.op) {
                    if let Some(name) = n.input(i) {
                        if let (Some(t), false) =
                            (g.initializers.get(name), weights.contains_key(name))
                        {
                            let d = stream
                                .clone_htod(&t.to_f32_vec())
                                .map_err(dbg_err(&format!("uploading {name}")))?;
                            weights.insert(name.to_string(), d);
                        }
                    }
                }
            }
            Ok(Self {
                graph: g,
                input,
                device,
                stream,
                blas,
                funcs,
                _module: module,
                weights,
                cudnn,
                tune: options.tune,
                plan: None,
            })
        })
    }

    /// The device it runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.device
    }

    /// What runs the convolutions: `"cuDNN"`, or `"im2col + cuBLAS"` when
    /// cuDNN is off or does not load.
    pub fn convolutions(&self) -> &'static str {
        if self.cudnn.is_some() {
            "cuDNN"
        } else {
            "im2col + cuBLAS"
        }
    }

    /// How many convolutions of the last input shape's plan cuDNN runs.
    pub fn cudnn_convolutions(&self) -> usize {
        self.plan
            .as_ref()
            .map_or(0, |p| p.convs.iter().flatten().count())
    }

    /// The (simplified) graph it runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph on `input` (the graph's one input) and returns every
    /// graph output. A new input shape compiles a new plan.
    pub fn run(&mut self, input: ArrayViewD<'_, f32>) -> Result<Vec<ArrayD<f32>>> {
        self.prepare(input.shape())?;
        let plan = self
            .plan
            .take()
            .ok_or_else(|| TrtError::Gpu("no plan".into()))?;
        let result = guarded("running on the GPU", || self.execute(&plan, input, None));
        self.plan = Some(plan);
        result
    }

    /// [`run`](Self::run), also calling `see` with the name, shape and values
    /// of every tensor in `wanted` as it is produced (the input included):
    /// each is copied to the host. An error from `see` stops the run and is
    /// returned as it is (`Err(Ok(message))`); others come as `Err(Err(_))`.
    #[allow(clippy::type_complexity)]
    pub fn run_observed(
        &mut self,
        input: ArrayViewD<'_, f32>,
        wanted: &std::collections::BTreeSet<String>,
        see: &mut qint8_calibration::TensorSink<'_>,
    ) -> std::result::Result<Vec<ArrayD<f32>>, std::result::Result<String, TrtError>> {
        self.prepare(input.shape()).map_err(Err)?;
        let plan = self
            .plan
            .take()
            .ok_or_else(|| Err(TrtError::Gpu("no plan".into())))?;
        let mut failed = None;
        let mut sink = |name: &str, shape: &[usize], x: &[f32]| {
            see(name, shape, x).map_err(|m| {
                failed = Some(m);
                TrtError::Gpu("stopped by the observer".into())
            })
        };
        let result = guarded("running on the GPU", || {
            self.execute(&plan, input, Some(Watch::Data(wanted, &mut sink)))
        });
        self.plan = Some(plan);
        match (result, failed) {
            (_, Some(m)) => Err(Ok(m)),
            (r, None) => r.map_err(Err),
        }
    }

    /// Runs the graph on `input` and computes calibration statistics of the
    /// tensors `requests` names on the device, as they are produced: only
    /// the statistics come back to the host. A tensor holding NaN or
    /// infinity is an error naming it.
    pub fn run_stats(
        &mut self,
        input: ArrayViewD<'_, f32>,
        requests: &BTreeMap<String, StatRequest>,
    ) -> Result<BTreeMap<String, TensorStats>> {
        self.prepare(input.shape())?;
        let plan = self
            .plan
            .take()
            .ok_or_else(|| TrtError::Gpu("no plan".into()))?;
        let mut found = Vec::new();
        let result = guarded("running on the GPU", || {
            self.execute(&plan, input, Some(Watch::Stats(requests, &mut found)))
        });
        self.plan = Some(plan);
        result?;
        guarded("reading statistics", || {
            let mut out = BTreeMap::new();
            for (name, d) in found {
                out.insert(name.clone(), self.read_stats(&name, d)?);
            }
            Ok(out)
        })
    }

    /// Launches the statistics kernels of one tensor.
    fn stats_of(&self, x: &CudaSlice<f32>, r: StatRequest) -> Result<DeviceStats> {
        let s = &self.stream;
        let n = x.len() as u64;
        let mut summary = s
            .clone_htod(&[0u32, 0, u32::MAX, 0])
            .map_err(dbg_err("uploading"))?;
        let blocks = Self::cfg(x.len().min(1 << 18));
        launch!(self, "stats_f32", blocks, "statistics kernel"; x, &n, &mut summary);
        let histogram = match r {
            StatRequest::AbsMax => None,
            StatRequest::AbsHistogram { bins, amax } => {
                let mut counts = s
                    .alloc_zeros::<u64>(bins)
                    .map_err(dbg_err("allocating a histogram"))?;
                let mut clipped = s.alloc_zeros::<u64>(1).map_err(dbg_err("allocating"))?;
                // The CPU's bin rule, with its `inv` computed the same way.
                let inv = bins as f32 / amax;
                let bins32 = u32::try_from(bins)
                    .map_err(|_| TrtError::Gpu(format!("{bins} histogram bins")))?;
                let shared = i32::from(bins <= 8192);
                let mut cfg = blocks;
                if shared == 1 {
                    cfg.shared_mem_bytes = bins32 * 4;
                }
                // With `shared` set, each block counts in dynamic shared memory.
                launch!(
                    self, "abs_hist_f32", cfg, "histogram kernel";
                    x, &n, &inv, &amax, &bins32, &mut counts, &mut clipped, &shared
                );
                Some((counts, clipped))
            }
        };
        Ok(DeviceStats { summary, histogram })
    }

    fn read_stats(&self, name: &str, d: DeviceStats) -> Result<TensorStats> {
        let s = &self.stream;
        let v = s.clone_dtoh(&d.summary).map_err(dbg_err("downloading"))?;
        if v[1] > 0 {
            return Err(TrtError::Gpu(format!(
                "tensor `{name}` holds {} NaN or infinite value(s)",
                v[1]
            )));
        }
        let unorder = |o: u32| {
            f32::from_bits(if o & 0x8000_0000 != 0 {
                o & 0x7fff_ffff
            } else {
                !o
            })
        };
        let amax = f32::from_bits(v[0]);
        Ok(match d.histogram {
            None => TensorStats::AbsMax(amax),
            Some((counts, clipped)) => {
                let counts = s.clone_dtoh(&counts).map_err(dbg_err("downloading"))?;
                let clipped = s.clone_dtoh(&clipped).map_err(dbg_err("downloading"))?[0];
                let total: u64 = counts.iter().sum();
                let (min, max) = if total > 0 {
                    (unorder(v[2]), unorder(v[3]))
                } else {
                    (0.0, 0.0)
                };
                TensorStats::AbsHistogram {
                    counts,
                    clipped,
                    min,
                    max,
                }
            }
        })
    }

    /// Makes the plan for an input of `shape` unless it is the current one.
    fn prepare(&mut self, shape: &[usize]) -> Result<()> {
        let shape = shape.to_vec();
        if self.plan.as_ref().map(|p| &p.host.input_shape) != Some(&shape) {
            self.plan = None;
            let host = plan_host(&self.graph, &self.input, &shape)?;
            let plan = guarded("uploading constants", || {
                let mut consts = HashMap::new();
                for (name, v) in &host.uploads {
                    let d = self
                        .stream
                        .clone_htod(v)
                        .map_err(dbg_err(&format!("uploading {name}")))?;
                    consts.insert(name.clone(), d);
                }
                let mut convs = Vec::with_capacity(host.steps.len());
                let (mut workspace, mut col_len) = (0, 0);
                for step in &host.steps {
                    let c = match &self.cudnn {
                        Some(h) => cudnn_conv(h, step),
                        None => None,
                    };
                    let c = match c {
                        Some((c, bytes)) if !self.tune || self.cudnn_wins(&c, bytes, step) => {
                            Some((c, bytes))
                        }
                        _ => None,
                    };
                    if let Some((c, bytes)) = c {
                        workspace = workspace.max(bytes);
                        convs.push(Some(c));
                    } else {
                        col_len = col_len.max(im2col_len(step));
                        convs.push(None);
                    }
                }
                Ok(Plan {
                    host,
                    consts,
                    convs,
                    workspace,
                    col_len,
                })
            })?;
            self.plan = Some(plan);
        }
        Ok(())
    }

    fn execute(
        &self,
        plan: &Plan,
        input: ArrayViewD<'_, f32>,
        mut observe: Option<Watch<'_>>,
    ) -> Result<Vec<ArrayD<f32>>> {
        let s = &self.stream;
        let mut live: HashMap<String, Rc<CudaSlice<f32>>> = HashMap::new();
        let host = input.as_standard_layout();
        let data = host
            .as_slice()
            .ok_or_else(|| TrtError::Gpu("input is not contiguous".into()))?;
        let x = s.clone_htod(data).map_err(dbg_err("uploading the input"))?;
        live.insert(self.input.clone(), Rc::new(x));
        match observe.as_mut() {
            Some(Watch::Data(wanted, see)) if wanted.contains(&self.input) => {
                see(&self.input, &plan.host.input_shape, data)?;
            }
            Some(Watch::Stats(requests, found)) => {
                if let (Some(r), Some(d)) = (requests.get(&self.input), live.get(&self.input)) {
                    found.push((self.input.clone(), self.stats_of(d, *r)?));
                }
            }
            _ => {}
        }
        let mut col = if plan.col_len > 0 {
            // SAFETY: im2col writes every element before the product reads it.
            Some(
                unsafe { s.alloc::<f32>(plan.col_len) }
                    .map_err(dbg_err("allocating im2col space"))?,
            )
        } else {
            None
        };
        let mut workspace = if plan.workspace > 0 {
            // SAFETY: scratch space cuDNN writes before it reads.
            Some(
                unsafe { s.alloc::<u8>(plan.workspace) }
                    .map_err(dbg_err("allocating cuDNN workspace"))?,
            )
        } else {
            None
        };
        for (i, step) in plan.host.steps.iter().enumerate() {
            let scratch = Scratch {
                col: col.as_mut(),
                cudnn: plan.convs[i].as_ref(),
                workspace: workspace.as_mut(),
            };
            self.exec(step, plan, &mut live, scratch)?;
            let y = step_output(step);
            match observe.as_mut() {
                Some(Watch::Data(wanted, see)) => {
                    if let (true, Some(d)) = (wanted.contains(y), live.get(y)) {
                        let v = s
                            .clone_dtoh(d.as_ref())
                            .map_err(dbg_err(&format!("downloading {y}")))?;
                        see(y, &plan.host.shapes[i], &v)?;
                    }
                }
                Some(Watch::Stats(requests, found)) => {
                    if let (Some(r), Some(d)) = (requests.get(y), live.get(y)) {
                        found.push((y.to_string(), self.stats_of(d, *r)?));
                    }
                }
                None => {}
            }
            for f in &plan.host.frees[i] {
                live.remove(f);
            }
        }
        drop(col.take());
        drop(workspace.take());
        let mut out = Vec::with_capacity(plan.host.outputs.len());
        for (name, shape) in &plan.host.outputs {
            let v = match plan.host.host_outputs.get(name) {
                Some(v) => v.clone(),
                None => {
                    let d = live
                        .get(name)
                        .ok_or_else(|| TrtError::Gpu(format!("output {name} was not computed")))?;
                    s.clone_dtoh(d.as_ref())
                        .map_err(dbg_err(&format!("downloading {name}")))?
                }
            };
            out.push(
                ArrayD::from_shape_vec(IxDyn(shape), v)
                    .map_err(|e| TrtError::Gpu(format!("output {name}: {e}")))?,
            );
        }
        s.synchronize().map_err(dbg_err("finishing the run"))?;
        Ok(out)
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| TrtError::Gpu(format!("kernel {name} is not loaded")))
    }

    fn cfg(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every kernel writing a fresh buffer writes all of it.
        unsafe { self.stream.alloc::<f32>(n.max(1)) }.map_err(dbg_err("allocating device memory"))
    }

    /// `out[n][c][p] += bias[c]`.
    fn add_bias(
        &self,
        out: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        total: usize,
        channels: i32,
        inner: usize,
    ) -> Result<()> {
        let (t64, p64) = (total as u64, inner as u64);
        launch!(
            self, "add_channel_f32", Self::cfg(total), "bias kernel";
            out, bias, &t64, &channels, &p64
        );
        Ok(())
    }

    /// A convolution with one group as one batched cuBLAS product: of the
    /// input itself for 1x1 windows with stride 1 and no padding
    /// (`direct`), else of its im2col unrolling in `col`.
    #[allow(clippy::too_many_arguments)]
    fn conv_gemm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        col: Option<&mut CudaSlice<f32>>,
        dims: [i32; 4],
        m: i32,
        win: &Window2,
        direct: bool,
    ) -> Result<()> {
        let [n, c, h, wd] = dims;
        let p = (win.oh * win.ow) as i64;
        let k = (c * win.kh * win.kw) as i64;
        // Column-major, per image: out^T (p x m) = col^T (p x k) * w^T (k x m).
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: p as i32,
                n: m,
                k: k as i32,
                alpha: 1.0f32,
                lda: p as i32,
                ldb: k as i32,
                beta: 0.0f32,
                ldc: p as i32,
            },
            batch_size: n,
            stride_a: k * p,
            stride_b: 0,
            stride_c: m as i64 * p,
        };
        if direct {
            // SAFETY: x is [n][k][p], w [m][k], out [n][m][p].
            return unsafe { self.blas.gemm_strided_batched(cfg, x, w, out) }
                .map_err(dbg_err("cuBLAS convolution product"));
        }
        let col = col.ok_or_else(|| TrtError::Gpu("no im2col space".into()))?;
        let cells = n as usize * k as usize * p as usize;
        let ints = [
            n, c, h, wd, win.kh, win.kw, win.sh, win.sw, win.ph, win.pw, win.dh, win.dw, win.oh,
            win.ow,
        ];
        launch!(self, "im2col_f32", Self::cfg(cells), "im2col kernel"; x, &mut *col; &ints);
        let colv = col.slice(..cells);
        // SAFETY: col is [n][k][p], w [m][k], out [n][m][p].
        unsafe { self.blas.gemm_strided_batched(cfg, &colv, w, out) }
            .map_err(dbg_err("cuBLAS convolution product"))
    }

    /// Whether cuDNN runs step `step` faster than [`conv_gemm`](Self::conv_gemm):
    /// each is timed with device events on scratch buffers of the step's
    /// shapes, best of three runs after one untimed run. cuDNN's own
    /// heuristic pick lost to im2col and cuBLAS on small planes (the 32x32
    /// fixtures) and won on 224x224 inputs, so it is measured per shape.
    /// Where the trial cannot run (memory for im2col), cuDNN, which needs
    /// less, is kept.
    ///
    /// Decisions are kept for the process by device and convolution
    /// geometry: the trial is most of the time a plan takes, and one
    /// command's models (`qint8 compare`'s FP32 model, its QDQ variants and
    /// calibration runners) share their convolutions' shapes.
    fn cudnn_wins(&self, cv: &CudnnConv, bytes: usize, step: &Step) -> bool {
        static DECIDED: std::sync::Mutex<BTreeMap<ConvKey, bool>> =
            std::sync::Mutex::new(BTreeMap::new());
        let Step::ConvGemm { dims, m, win, .. } = step else {
            return true;
        };
        let w = win;
        let key = (
            self.stream.context().ordinal(),
            *dims,
            *m,
            [w.kh, w.kw, w.sh, w.sw, w.ph, w.pw, w.dh, w.dw],
        );
        if let Some(wins) = DECIDED.lock().ok().and_then(|d| d.get(&key).copied()) {
            return wins;
        }
        match self.time_both(cv, bytes, step) {
            Ok([cudnn, gemm]) => {
                let wins = cudnn < gemm;
                if let Ok(mut d) = DECIDED.lock() {
                    d.insert(key, wins);
                }
                wins
            }
            // Not remembered: the trial may fit another time.
            Err(_) => true,
        }
    }

    /// Best-of-three milliseconds of cuDNN and of im2col + cuBLAS on `step`.
    fn time_both(&self, cv: &CudnnConv, bytes: usize, step: &Step) -> Result<[f32; 2]> {
        let Step::ConvGemm { dims, m, win, .. } = step else {
            return Err(TrtError::Gpu("not a convolution".into()));
        };
        let ctx = self.stream.context();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (
            ctx.new_event(timing)
                .map_err(dbg_err("creating an event"))?,
            ctx.new_event(timing)
                .map_err(dbg_err("creating an event"))?,
        );
        let xlen: usize = dims.iter().map(|&v| v as usize).product();
        let ylen = dims[0] as usize * *m as usize * (win.oh * win.ow) as usize;
        let x = self.alloc(xlen)?;
        let wb = self.alloc(*m as usize * (dims[1] * win.kh * win.kw) as usize)?;
        let mut y = self.alloc(ylen)?;
        let mut col = self.alloc(im2col_len(step))?;
        let mut ws = if bytes > 0 {
            // SAFETY: scratch space cuDNN writes before it reads.
            Some(unsafe { self.stream.alloc::<u8>(bytes) }.map_err(dbg_err("allocating"))?)
        } else {
            None
        };
        let mut best = [f32::INFINITY; 2];
        for (which, b) in best.iter_mut().enumerate() {
            for rep in 0..4 {
                start.record(&self.stream).map_err(dbg_err("recording"))?;
                if which == 0 {
                    self.conv_cudnn(cv, &x, &wb, &mut y, ws.as_mut())?;
                } else {
                    self.conv_gemm(&x, &wb, &mut y, Some(&mut col), *dims, *m, win, false)?;
                }
                end.record(&self.stream).map_err(dbg_err("recording"))?;
                let ms = start.elapsed_ms(&end).map_err(dbg_err("timing"))?;
                if rep > 0 {
                    *b = b.min(ms);
                }
            }
        }
        Ok(best)
    }

    fn conv_cudnn(
        &self,
        c: &CudnnConv,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        workspace: Option<&mut CudaSlice<u8>>,
    ) -> Result<()> {
        let fwd = ConvForward {
            conv: &c.conv,
            x: &c.x,
            w: &c.w,
            y: &c.y,
        };
        // SAFETY: the descriptors were made for these buffers' shapes.
        unsafe { fwd.launch(c.algo, workspace, (1.0f32, 0.0f32), x, w, out) }
            .map_err(dbg_err("cuDNN convolution"))
    }

    #[allow(clippy::too_many_lines)]
    fn exec(
        &self,
        step: &Step,
        plan: &Plan,
        live: &mut HashMap<String, Rc<CudaSlice<f32>>>,
        scratch: Scratch<'_>,
    ) -> Result<()> {
        let Scratch {
            col,
            cudnn,
            workspace,
        } = scratch;
        let s = &self.stream;
        let get = |live: &HashMap<String, Rc<CudaSlice<f32>>>,
                   name: &str|
         -> Result<Rc<CudaSlice<f32>>> {
            if let Some(v) = live.get(name) {
                return Ok(v.clone());
            }
            Err(TrtError::Gpu(format!("value {name} is not on the device")))
        };
        // Constants are borrowed from the plan or the weights.
        let konst = |name: &str| -> Option<&CudaSlice<f32>> {
            plan.consts.get(name).or_else(|| self.weights.get(name))
        };
        macro_rules! read {
            ($holder:ident, $name:expr) => {
                let $holder = match konst($name) {
                    Some(_) => None,
                    None => Some(get(live, $name)?),
                };
            };
        }
        macro_rules! buf {
            ($holder:ident, $name:expr) => {
                match &$holder {
                    Some(r) => r.as_ref(),
                    None => konst($name)
                        .ok_or_else(|| TrtError::Gpu(format!("constant {} is missing", $name)))?,
                }
            };
        }
        match step {
            Step::Alias { x, y } => {
                read!(hx, x);
                let v = match hx {
                    Some(r) => r,
                    None => {
                        // An alias of a constant: copy it once per run.
                        let c = konst(x)
                            .ok_or_else(|| TrtError::Gpu(format!("constant {x} is missing")))?;
                        Rc::new(s.clone_dtod(c).map_err(dbg_err("copying a constant"))?)
                    }
                };
                live.insert(y.clone(), v);
            }
            Step::Unary {
                x,
                y,
                n,
                kind,
                a,
                b,
            } => {
                read!(hx, x);
                let xb = buf!(hx, x);
                let mut out = self.alloc(*n)?;
                let n64 = *n as u64;
                launch!(
                    self, "unary_f32", Self::cfg(*n), "unary kernel";
                    xb, &mut out, &n64, kind, a, b
                );
                live.insert(y.clone(), Rc::new(out));
            }
            Step::Binary { a, b, y, n, p } => {
                read!(ha, a);
                let ab = buf!(ha, a);
                let bname = b.as_deref().unwrap_or(a);
                read!(hb, bname);
                let bb = buf!(hb, bname);
                let mut out = self.alloc(*n)?;
                let n64 = *n as u64;
                launch!(
                    self, "binary_f32", Self::cfg(*n), "broadcast kernel";
                    ab, bb, &mut out, &n64, p
                );
                live.insert(y.clone(), Rc::new(out));
            }
            Step::Concat { parts, y, n } => {
                let mut out = self.alloc(*n)?;
                for (name, nx, offset, p) in parts {
                    read!(hx, name);
                    let xb = buf!(hx, name);
                    let (n64, o64) = (*nx as u64, *offset as u64);
                    launch!(
                        self, "scatter_f32", Self::cfg(*nx), "concat kernel";
                        xb, &mut out, &n64, &o64, p
                    );
                }
                live.insert(y.clone(), Rc::new(out));
            }
            Step::ConvGemm {
                x,
                w,
                bias,
                y,
                dims,
                m,
                win,
                direct,
            } => {
                read!(hx, x);
                let xb = buf!(hx, x);
                read!(hw, w);
                let wb = buf!(hw, w);
                let p = (win.oh * win.ow) as usize;
                let total = dims[0] as usize * *m as usize * p;
                let mut out = self.alloc(total)?;
                match cudnn {
                    Some(cv) => self.conv_cudnn(cv, xb, wb, &mut out, workspace)?,
                    None => self.conv_gemm(xb, wb, &mut out, col, *dims, *m, win, *direct)?,
                }
                if let Some(bn) = bias {
                    read!(hb, bn);
                    self.add_bias(&mut out, buf!(hb, bn), total, *m, p)?;
                }
                live.insert(y.clone(), Rc::new(out));
            }
            Step::ConvGrouped {
                x,
                w,
                bias,
                y,
                dims,
                m,
                groups,
                win,
            } => {
                let [n, c, h, wd] = *dims;
                read!(hx, x);
                let xb = buf!(hx, x);
                read!(hw, w);
                let wb = buf!(hw, w);
                let total = n as usize * *m as usize * (win.oh * win.ow) as usize;
                let mut out = self.alloc(total)?;
                let has_bias: i32 = bias.is_some().into();
                let bname = bias.as_deref().unwrap_or(w);
                read!(hb, bname);
                let bb = buf!(hb, bname);
                let ints = [
                    n, c, h, wd, *m, *groups, win.kh, win.kw, win.sh, win.sw, win.ph, win.pw,
                    win.dh, win.dw, win.oh, win.ow,
                ];
                launch!(
                    self, "conv_grouped_f32", Self::cfg(total), "grouped convolution kernel";
                    xb, wb, bb, &has_bias, &mut out; &ints
                );
                live.insert(y.clone(), Rc::new(out));
            }
            Step::Gemm {
                a,
                b,
                c,
                y,
                m,
                n,
                k,
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                read!(ha, a);
                let ab = buf!(ha, a);
                read!(hb, b);
                let bb = buf!(hb, b);
                let total = *m as usize * *n as usize;
                let mut out = self.alloc(total)?;
                let beta_run = if let Some((cn, p)) = c {
                    read!(hc, cn);
                    let cb = buf!(hc, cn);
                    let t64 = total as u64;
                    launch!(
                        self, "binary_f32", Self::cfg(total), "Gemm's C";
                        cb, cb, &mut out, &t64, p
                    );
                    *beta
                } else {
                    0.0
                };
                let op = |t: bool| {
                    if t {
                        cublasOperation_t::CUBLAS_OP_T
                    } else {
                        cublasOperation_t::CUBLAS_OP_N
                    }
                };
                // Row-major Y = A'B' is column-major Y^T = B'^T A'^T.
                let cfg = GemmConfig {
                    transa: op(*trans_b),
                    transb: op(*trans_a),
                    m: *n,
                    n: *m,
                    k: *k,
                    alpha: *alpha,
                    lda: if *trans_b { *k } else { *n },
                    ldb: if *trans_a { *m } else { *k },
                    beta: beta_run,
                    ldc: *n,
                };
                // SAFETY: the shapes above match the buffers.
                unsafe { self.blas.gemm(cfg, bb, ab, &mut out) }.map_err(dbg_err("cuBLAS Gemm"))?;
                live.insert(y.clone(), Rc::new(out));
            }
            Step::Pool {
                x,
                y,
                planes,
                h,
                w,
                win,
                is_max,
                count_include_pad,
            } => {
                read!(hx, x);
                let xb = buf!(hx, x);
                let total = *planes as usize * (win.oh * win.ow) as usize;
                let mut out = self.alloc(total)?;
                let ints = [
                    *planes,
                    *h,
                    *w,
                    win.oh,
                    win.ow,
                    win.kh,
                    win.kw,
                    win.sh,
                    win.sw,
                    win.ph,
                    win.pw,
                    win.phe,
                    win.pwe,
                    win.dh,
                    win.dw,
                    i32::from(*is_max),
                    i32::from(*count_include_pad),
                ];
                launch!(
                    self, "pool2d_f32", Self::cfg(total), "pooling kernel";
                    xb, &mut out; &ints
                );
                live.insert(y.clone(), Rc::new(out));
            }
            Step::RowMean { x, y, rows, len } => {
                read!(hx, x);
                let xb = buf!(hx, x);
                let mut out = self.alloc(*rows)?;
                let (r64, l64) = (*rows as u64, *len as u64);
                // One warp a row.
                launch!(
                    self, "row_mean_f32", Self::cfg(rows * 32), "mean kernel";
                    xb, &mut out, &r64, &l64
                );
                live.insert(y.clone(), Rc::new(out));
            }
            Step::Softmax {
                x,
                y,
                outer,
                len,
                inner,
            } => {
                read!(hx, x);
                let xb = buf!(hx, x);
                let mut out = self.alloc(outer * len * inner)?;
                let (o, n, i) = (*outer as u64, *len as u64, *inner as u64);
                launch!(
                    self, "softmax_f32", Self::cfg(outer * inner), "softmax kernel";
                    xb, &mut out, &o, &n, &i
                );
                live.insert(y.clone(), Rc::new(out));
            }
            Step::Linear8 {
                x,
                y,
                n,
                scale,
                zero,
                channels,
                inner,
                saturate,
            } => {
                read!(hx, x);
                let xb = buf!(hx, x);
                let sc =
                    konst(scale).ok_or_else(|| TrtError::Gpu(format!("{scale} is missing")))?;
                let zp = konst(zero).ok_or_else(|| TrtError::Gpu(format!("{zero} is missing")))?;
                let mut out = self.alloc(*n)?;
                let (n64, i64_) = (*n as u64, *inner as u64);
                let quantize = i32::from(saturate.is_some());
                let (lo, hi) = saturate.unwrap_or((0.0, 0.0));
                launch!(
                    self, "linear8_f32", Self::cfg(*n), "Q/DQ kernel";
                    xb, &mut out, &n64, sc, zp, channels, &i64_, &quantize, &lo, &hi
                );
                live.insert(y.clone(), Rc::new(out));
            }
            Step::Affine {
                x,
                y,
                n,
                channels,
                inner,
                a,
                b,
            } => {
                read!(hx, x);
                let xb = buf!(hx, x);
                let ab = konst(a).ok_or_else(|| TrtError::Gpu(format!("{a} is missing")))?;
                let bb = konst(b).ok_or_else(|| TrtError::Gpu(format!("{b} is missing")))?;
                let mut out = self.alloc(*n)?;
                let (n64, i64_) = (*n as u64, *inner as u64);
                launch!(
                    self, "affine_channel_f32", Self::cfg(*n), "batch-norm kernel";
                    xb, &mut out, &n64, channels, &i64_, ab, bb
                );
                live.insert(y.clone(), Rc::new(out));
            }
        }
        Ok(())
    }
}

/// A graph initializer, or a value inference folded for this shape.
fn host_const<'a>(g: &'a Graph, shapes: &'a Shapes, name: &str) -> Option<&'a Tensor> {
    g.initializers
        .get(name)
        .or_else(|| shapes.get(name).and_then(|v| v.value.as_ref()))
}

/// Plans `g` for one input shape on the host: every node the device runs
/// becomes a step, nodes that fold to constants are skipped. Errors list
/// every node the executor cannot run, with the reason for each.
fn plan_host(g: &Graph, input: &str, input_shape: &[usize]) -> Result<HostPlan> {
    let mut inputs = HashMap::new();
    inputs.insert(input.to_string(), input_shape.to_vec());
    let shapes = shape::infer(g, &inputs)?;
    let sh = |name: &str| -> Result<&Vec<usize>> {
        shapes
            .get(name)
            .map(|v| &v.shape)
            .ok_or_else(|| TrtError::Gpu(format!("value {name} has no inferred shape")))
    };
    let mut steps = Vec::new();
    let mut shapes_of_steps = Vec::new();
    let mut errors = Vec::new();
    let mut uploads: Vec<(String, Vec<f32>)> = Vec::new();
    // Values computed on the device so far (the rest are constants).
    let mut on_device: std::collections::HashSet<String> = Default::default();
    on_device.insert(input.to_string());
    // Constants read as data that are not initializers (those are
    // uploaded with the executor) go up with the plan.
    let upload = |name: &str, t: &Tensor, uploads: &mut Vec<(String, Vec<f32>)>| {
        if !g.initializers.contains_key(name) && !uploads.iter().any(|(n, _)| n == name) {
            uploads.push((name.to_string(), t.to_f32_vec()));
        }
    };
    for node in &g.nodes {
        // Folded for this shape: nothing runs on the device.
        if node
            .outputs
            .iter()
            .filter(|o| !o.is_empty())
            .all(|o| shapes.get(o.as_str()).is_some_and(|v| v.value.is_some()))
        {
            continue;
        }
        let mut build = || -> Result<Step> {
            let inp = |i: usize| -> Result<String> {
                node.input(i)
                    .map(str::to_string)
                    .ok_or_else(|| unsupported_here(node, format!("input {i} is missing")))
            };
            // Data inputs that are constants go to the device.
            let data: Vec<usize> = match node.op {
                Op::Concat { .. } => (0..node.inputs.len()).collect(),
                _ => data_inputs(&node.op).to_vec(),
            };
            for i in data {
                if let Some(name) = node.input(i) {
                    if !on_device.contains(name) {
                        let t = host_const(g, &shapes, name).ok_or_else(|| {
                            unsupported_here(
                                node,
                                format!("input {name} is neither computed nor constant"),
                            )
                        })?;
                        upload(name, t, &mut uploads);
                    }
                }
            }
            let y = node
                .outputs
                .first()
                .cloned()
                .ok_or_else(|| unsupported_here(node, "no output"))?;
            let ys = sh(&y)?.clone();
            let ny: usize = ys.iter().product();
            let step = match &node.op {
                Op::Relu
                | Op::Sigmoid
                | Op::HardSwish
                | Op::HardSigmoid { .. }
                | Op::Clip { .. } => {
                    let (kind, a, b) = match &node.op {
                        Op::Relu => (0, 0.0, 0.0),
                        Op::Sigmoid => (1, 0.0, 0.0),
                        Op::Clip { min, max } => {
                            let bound = |i: usize, attr: Option<f32>, dflt: f32| -> Result<f32> {
                                match node.input(i).filter(|s| !s.is_empty()) {
                                    Some(name) => host_const(g, &shapes, name)
                                        .map(|t| t.to_f32_vec())
                                        .and_then(|v| v.first().copied())
                                        .ok_or_else(|| {
                                            unsupported_here(node, "clip bounds must be constants")
                                        }),
                                    None => Ok(attr.unwrap_or(dflt)),
                                }
                            };
                            (
                                2,
                                bound(1, *min, f32::NEG_INFINITY)?,
                                bound(2, *max, f32::INFINITY)?,
                            )
                        }
                        Op::HardSigmoid { alpha, beta } => (3, *alpha, *beta),
                        _ => (4, 0.0, 0.0),
                    };
                    Step::Unary {
                        x: inp(0)?,
                        y: y.clone(),
                        n: ny,
                        kind,
                        a,
                        b,
                    }
                }
                Op::Add | Op::Sub | Op::Mul | Op::Div => {
                    let kind = match node.op {
                        Op::Add => 0,
                        Op::Sub => 1,
                        Op::Mul => 2,
                        _ => 3,
                    };
                    let (a, b) = (inp(0)?, inp(1)?);
                    let p = Strided {
                        rank: ys.len() as i32,
                        kind,
                        dims: dims_of(node, &ys)?,
                        sa: broadcast_strides(node, sh(&a)?, &ys)?,
                        sb: broadcast_strides(node, sh(&b)?, &ys)?,
                    };
                    Step::Binary {
                        a,
                        b: Some(b),
                        y: y.clone(),
                        n: ny,
                        p,
                    }
                }
                Op::Expand => {
                    let a = inp(0)?;
                    let p = Strided {
                        rank: ys.len() as i32,
                        kind: 4,
                        dims: dims_of(node, &ys)?,
                        sa: broadcast_strides(node, sh(&a)?, &ys)?,
                        sb: [0; MAX_RANK],
                    };
                    Step::Binary {
                        a,
                        b: None,
                        y: y.clone(),
                        n: ny,
                        p,
                    }
                }
                Op::Transpose { perm } => {
                    let a = inp(0)?;
                    let xs = sh(&a)?.clone();
                    let perm = shape::transpose_perm(node, perm.as_deref(), xs.len())?;
                    let own = strides_of(&xs);
                    let mut sa = [0i64; MAX_RANK];
                    for (d, &p) in perm.iter().enumerate() {
                        sa[d] = own[p];
                    }
                    let p = Strided {
                        rank: ys.len() as i32,
                        kind: 4,
                        dims: dims_of(node, &ys)?,
                        sa,
                        sb: [0; MAX_RANK],
                    };
                    Step::Binary {
                        a,
                        b: None,
                        y: y.clone(),
                        n: ny,
                        p,
                    }
                }
                Op::Reshape { .. }
                | Op::Flatten { .. }
                | Op::Squeeze { .. }
                | Op::Unsqueeze { .. }
                | Op::Identity
                | Op::Dropout => Step::Alias {
                    x: inp(0)?,
                    y: y.clone(),
                },
                Op::Conv(c) => {
                    let (x, w) = (inp(0)?, inp(1)?);
                    let xs = sh(&x)?.clone();
                    let ws = sh(&w)?.clone();
                    let win = window2(node, &shape::conv_window(node, c, &xs, &ws)?)?;
                    let bias = node.input(2).filter(|s| !s.is_empty()).map(str::to_string);
                    let dims = [xs[0] as i32, xs[1] as i32, xs[2] as i32, xs[3] as i32];
                    let m = ws[0] as i32;
                    if c.group == 1 {
                        let direct = win.kh == 1
                            && win.kw == 1
                            && win.sh == 1
                            && win.sw == 1
                            && win.ph == 0
                            && win.pw == 0
                            && win.phe == 0
                            && win.pwe == 0;
                        Step::ConvGemm {
                            x,
                            w,
                            bias,
                            y: y.clone(),
                            dims,
                            m,
                            win,
                            direct,
                        }
                    } else {
                        Step::ConvGrouped {
                            x,
                            w,
                            bias,
                            y: y.clone(),
                            dims,
                            m,
                            groups: c.group as i32,
                            win,
                        }
                    }
                }
                Op::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => {
                    let (a, b) = (inp(0)?, inp(1)?);
                    let (as_, bs) = (sh(&a)?.clone(), sh(&b)?.clone());
                    if as_.len() != 2 || bs.len() != 2 {
                        return Err(unsupported_here(node, "Gemm needs 2-D operands"));
                    }
                    let (m, k) = if *trans_a {
                        (as_[1], as_[0])
                    } else {
                        (as_[0], as_[1])
                    };
                    let n = if *trans_b { bs[0] } else { bs[1] };
                    let c = match node.input(2).filter(|s| !s.is_empty()) {
                        Some(cn) if *beta != 0.0 => {
                            let p = Strided {
                                rank: 2,
                                kind: 4,
                                dims: dims_of(node, &ys)?,
                                sa: broadcast_strides(node, sh(cn)?, &ys)?,
                                sb: [0; MAX_RANK],
                            };
                            Some((cn.to_string(), p))
                        }
                        _ => None,
                    };
                    Step::Gemm {
                        a,
                        b,
                        c,
                        y: y.clone(),
                        m: m as i32,
                        n: n as i32,
                        k: k as i32,
                        alpha: *alpha,
                        beta: *beta,
                        trans_a: *trans_a,
                        trans_b: *trans_b,
                    }
                }
                Op::MatMul => {
                    let (a, b) = (inp(0)?, inp(1)?);
                    let (as_, bs) = (sh(&a)?.clone(), sh(&b)?.clone());
                    if bs.len() != 2 || as_.is_empty() {
                        return Err(unsupported_here(
                            node,
                            format!("MatMul of {as_:?} by {bs:?}: the GPU executor needs a 2-D right operand"),
                        ));
                    }
                    let k = *as_.last().unwrap_or(&0);
                    let m: usize = as_[..as_.len() - 1].iter().product();
                    Step::Gemm {
                        a,
                        b,
                        c: None,
                        y: y.clone(),
                        m: m as i32,
                        n: bs[1] as i32,
                        k: k as i32,
                        alpha: 1.0,
                        beta: 0.0,
                        trans_a: false,
                        trans_b: false,
                    }
                }
                Op::MaxPool(p) | Op::AveragePool(p) => {
                    let x = inp(0)?;
                    let xs = sh(&x)?.clone();
                    let win = window2(node, &shape::pool_window(node, p, &xs)?)?;
                    Step::Pool {
                        x,
                        y: y.clone(),
                        planes: (xs[0] * xs[1]) as i32,
                        h: xs[2] as i32,
                        w: xs[3] as i32,
                        win,
                        is_max: matches!(node.op, Op::MaxPool(_)),
                        count_include_pad: p.count_include_pad,
                    }
                }
                Op::GlobalAveragePool => {
                    let x = inp(0)?;
                    let xs = sh(&x)?.clone();
                    if xs.len() < 3 {
                        return Err(unsupported_here(
                            node,
                            format!("input {xs:?} has no spatial axes"),
                        ));
                    }
                    Step::RowMean {
                        x,
                        y: y.clone(),
                        rows: xs[0] * xs[1],
                        len: xs[2..].iter().product(),
                    }
                }
                Op::ReduceMean { .. } => {
                    let x = inp(0)?;
                    let xs = sh(&x)?.clone();
                    let axes = shape::reduce_axes(node, &shapes, xs.len())?;
                    // Trailing axes only: a mean over contiguous rows.
                    let first = xs.len() - axes.len();
                    if axes.is_empty() || axes.iter().copied().ne(first..xs.len()) {
                        return Err(unsupported_here(
                            node,
                            format!("ReduceMean over axes {axes:?} of {xs:?}: the GPU executor reduces trailing axes"),
                        ));
                    }
                    Step::RowMean {
                        x,
                        y: y.clone(),
                        rows: xs[..first].iter().product(),
                        len: xs[first..].iter().product(),
                    }
                }
                Op::Softmax { axis } => {
                    let x = inp(0)?;
                    let xs = sh(&x)?.clone();
                    let a = shape::norm_axis(node, *axis, xs.len())?;
                    Step::Softmax {
                        x,
                        y: y.clone(),
                        outer: xs[..a].iter().product(),
                        len: xs[a],
                        inner: xs[a + 1..].iter().product(),
                    }
                }
                Op::BatchNormalization { epsilon } => {
                    let x = inp(0)?;
                    let xs = sh(&x)?.clone();
                    let p = |i: usize| -> Result<Vec<f32>> {
                        let name = inp(i)?;
                        host_const(g, &shapes, &name)
                            .map(Tensor::to_f32_vec)
                            .ok_or_else(|| {
                                unsupported_here(node, "batch-norm parameters must be constants")
                            })
                    };
                    let (gamma, beta, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
                    let c = xs.get(1).copied().unwrap_or(1);
                    if [&gamma, &beta, &mean, &var].iter().any(|v| v.len() != c) {
                        return Err(unsupported_here(
                            node,
                            format!("parameters do not have {c} channels"),
                        ));
                    }
                    let a: Vec<f32> = (0..c)
                        .map(|i| gamma[i] / (var[i] + epsilon).sqrt())
                        .collect();
                    let b: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * a[i]).collect();
                    let (an, bn) = (format!("{y}#scale"), format!("{y}#shift"));
                    upload(
                        &an,
                        &Tensor::F32(
                            ArrayD::from_shape_vec(IxDyn(&[c]), a)
                                .map_err(|e| TrtError::Gpu(e.to_string()))?,
                        ),
                        &mut uploads,
                    );
                    upload(
                        &bn,
                        &Tensor::F32(
                            ArrayD::from_shape_vec(IxDyn(&[c]), b)
                                .map_err(|e| TrtError::Gpu(e.to_string()))?,
                        ),
                        &mut uploads,
                    );
                    Step::Affine {
                        x,
                        y: y.clone(),
                        n: ny,
                        channels: c as i32,
                        inner: xs.get(2..).map_or(1, |s| s.iter().product()),
                        a: an,
                        b: bn,
                    }
                }
                Op::QuantizeLinear { axis } | Op::DequantizeLinear { axis } => {
                    let x = inp(0)?;
                    let xs = sh(&x)?.clone();
                    let scale_name = inp(1)?;
                    let scale = host_const(g, &shapes, &scale_name)
                        .ok_or_else(|| unsupported_here(node, "the scale must be a constant"))?
                        .clone();
                    let zero = node
                        .input(2)
                        .filter(|s| !s.is_empty())
                        .map(|z| {
                            host_const(g, &shapes, z).cloned().ok_or_else(|| {
                                unsupported_here(node, "the zero point must be a constant")
                            })
                        })
                        .transpose()?;
                    let channels = scale.len();
                    let (channels, inner) = if channels <= 1 {
                        (1, xs.iter().product::<usize>().max(1))
                    } else {
                        let a = shape::norm_axis(node, *axis, xs.len())?;
                        if xs[a] != channels {
                            return Err(unsupported_here(
                                node,
                                format!("{channels} scales for axis {a} of {xs:?}"),
                            ));
                        }
                        (channels, xs[a + 1..].iter().product())
                    };
                    let zeros = zero
                        .as_ref()
                        .map(Tensor::to_f32_vec)
                        .unwrap_or_else(|| vec![0.0; channels]);
                    if zeros.len() != channels && zeros.len() != 1 {
                        return Err(unsupported_here(
                            node,
                            "zero points and scales differ in count",
                        ));
                    }
                    let zeros = if zeros.len() == channels {
                        zeros
                    } else {
                        vec![zeros[0]; channels]
                    };
                    let (sn, zn) = (format!("{y}#scale"), format!("{y}#zero"));
                    let vec1 = |v: Vec<f32>| -> Result<Tensor> {
                        Ok(Tensor::F32(
                            ArrayD::from_shape_vec(IxDyn(&[v.len()]), v)
                                .map_err(|e| TrtError::Gpu(e.to_string()))?,
                        ))
                    };
                    upload(&sn, &vec1(scale.to_f32_vec())?, &mut uploads);
                    upload(&zn, &vec1(zeros)?, &mut uploads);
                    // QuantizeLinear saturates to its zero point's type
                    // (int8 when absent).
                    let saturate = match (&node.op, zero.as_ref().map(Tensor::dtype)) {
                        (Op::DequantizeLinear { .. }, _) => None,
                        (_, Some(qint8_graph::DataType::Uint8)) => Some((0.0, 255.0)),
                        (_, Some(qint8_graph::DataType::Int8) | None) => Some((-128.0, 127.0)),
                        (_, Some(other)) => {
                            return Err(unsupported_here(
                                node,
                                format!("zero point of type {other:?}; the GPU executor quantizes to int8 and uint8"),
                            ))
                        }
                    };
                    Step::Linear8 {
                        x,
                        y: y.clone(),
                        n: ny,
                        scale: sn,
                        zero: zn,
                        channels: channels as i32,
                        inner,
                        saturate,
                    }
                }
                Op::Concat { axis } => {
                    let a = shape::norm_axis(node, *axis, ys.len())?;
                    let ostr = strides_of(&ys);
                    let mut sa = [0i64; MAX_RANK];
                    sa[..ys.len()].copy_from_slice(&ostr);
                    let mut at = 0usize;
                    let mut parts = Vec::new();
                    for name in node.inputs.iter().filter(|s| !s.is_empty()) {
                        let xs = sh(name)?.clone();
                        let nx: usize = xs.iter().product();
                        let p = Strided {
                            rank: xs.len() as i32,
                            kind: 4,
                            dims: dims_of(node, &xs)?,
                            sa,
                            sb: [0; MAX_RANK],
                        };
                        parts.push((name.clone(), nx, at * ostr[a] as usize, p));
                        at += xs[a];
                    }
                    Step::Concat {
                        parts,
                        y: y.clone(),
                        n: ny,
                    }
                }
                other => {
                    return Err(unsupported_here(
                        node,
                        format!(
                        "{} runs on the GPU only when it folds to a constant for the input shape",
                        other.op_type()
                    ),
                    ))
                }
            };
            Ok(step)
        };
        match build() {
            Ok(step) => {
                let y = step_output(&step);
                shapes_of_steps.push(shapes.get(y).map(|v| v.shape.clone()).unwrap_or_default());
                steps.push(step);
            }
            Err(e) => errors.push(e.to_string()),
        }
        // Later nodes plan on as if it ran, so one error lists them all.
        for o in node.outputs.iter().filter(|o| !o.is_empty()) {
            on_device.insert(o.clone());
        }
    }
    if !errors.is_empty() {
        return Err(TrtError::Gpu(format!(
            "the GPU executor cannot run {} node(s): {}",
            errors.len(),
            errors
                .iter()
                .map(|e| e.trim_start_matches("GPU: "))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    // When each value is last read: free it after that step.
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        for r in reads(s) {
            last.insert(r.to_string(), i);
        }
    }
    let outputs: Vec<(String, Vec<usize>)> = g
        .outputs
        .iter()
        .map(|o| Ok((o.name.clone(), sh(&o.name)?.clone())))
        .collect::<Result<_>>()?;
    let mut frees = vec![Vec::new(); steps.len()];
    for (name, i) in last {
        if !outputs.iter().any(|(o, _)| *o == name) {
            frees[i].push(name);
        }
    }
    let mut host_outputs = HashMap::new();
    for (o, _) in &outputs {
        if !on_device.contains(o) {
            let t = host_const(g, &shapes, o).ok_or_else(|| {
                TrtError::Gpu(format!("output {o} is neither computed nor constant"))
            })?;
            host_outputs.insert(o.clone(), t.to_f32_vec());
        }
    }
    Ok(HostPlan {
        input_shape: input_shape.to_vec(),
        steps,
        frees,
        uploads,
        outputs,
        host_outputs,
        shapes: shapes_of_steps,
    })
}

/// Receives observed tensors during a run.
type Sink<'a> = dyn FnMut(&str, &[usize], &[f32]) -> Result<()> + 'a;

/// What a run watches: tensors copied to a sink, or statistics computed on
/// the device.
enum Watch<'a> {
    Data(&'a std::collections::BTreeSet<String>, &'a mut Sink<'a>),
    Stats(
        &'a BTreeMap<String, StatRequest>,
        &'a mut Vec<(String, DeviceStats)>,
    ),
}

/// One tensor's statistics, still on the device: the summary words of
/// `stats_f32` and the histogram's counts and clipped count.
struct DeviceStats {
    summary: CudaSlice<u32>,
    histogram: Option<(CudaSlice<u64>, CudaSlice<u64>)>,
}

/// A statistic [`CudaExecutor::run_stats`] computes on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatRequest {
    /// The largest `|x|`.
    AbsMax,
    /// A histogram of `|x|` over `[0, amax]` in `bins` bins, binned by
    /// the rule of qint8-math's `Histogram::add`.
    AbsHistogram {
        /// Number of bins.
        bins: usize,
        /// Upper end of the range (values above count in the last bin).
        amax: f32,
    },
}

/// What [`CudaExecutor::run_stats`] found for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorStats {
    /// The largest `|x|`.
    AbsMax(f32),
    /// Bin counts, values above the range, and the smallest and largest
    /// value (0 for an empty tensor).
    AbsHistogram {
        /// Counts per bin.
        counts: Vec<u64>,
        /// Values above the range's end.
        clipped: u64,
        /// Smallest value.
        min: f32,
        /// Largest value.
        max: f32,
    },
}

/// The value a step produces.
fn step_output(step: &Step) -> &str {
    match step {
        Step::Unary { y, .. }
        | Step::Binary { y, .. }
        | Step::Alias { y, .. }
        | Step::ConvGemm { y, .. }
        | Step::ConvGrouped { y, .. }
        | Step::Gemm { y, .. }
        | Step::Pool { y, .. }
        | Step::RowMean { y, .. }
        | Step::Softmax { y, .. }
        | Step::Linear8 { y, .. }
        | Step::Affine { y, .. }
        | Step::Concat { y, .. } => y,
    }
}

/// Calibration's forward passes on the GPU: statistics stay on the host.
impl qint8_calibration::BatchRunner for CudaExecutor {
    fn run_observed(
        &mut self,
        input: ArrayViewD<'_, f32>,
        wanted: &std::collections::BTreeSet<String>,
        see: &mut qint8_calibration::TensorSink<'_>,
    ) -> std::result::Result<(), String> {
        match CudaExecutor::run_observed(self, input, wanted, see) {
            Ok(_) => Ok(()),
            Err(Ok(m)) => Err(m),
            Err(Err(e)) => Err(e.to_string()),
        }
    }

    fn computes_statistics(&self) -> bool {
        true
    }

    fn abs_max(
        &mut self,
        input: ArrayViewD<'_, f32>,
        wanted: &std::collections::BTreeSet<String>,
    ) -> std::result::Result<BTreeMap<String, f32>, String> {
        let requests = wanted
            .iter()
            .map(|n| (n.clone(), StatRequest::AbsMax))
            .collect();
        let found = self
            .run_stats(input, &requests)
            .map_err(|e| e.to_string())?;
        Ok(found
            .into_iter()
            .filter_map(|(n, s)| match s {
                TensorStats::AbsMax(m) => Some((n, m)),
                TensorStats::AbsHistogram { .. } => None,
            })
            .collect())
    }

    fn abs_histograms(
        &mut self,
        input: ArrayViewD<'_, f32>,
        ranges: &BTreeMap<String, f32>,
        bins: usize,
    ) -> std::result::Result<BTreeMap<String, qint8_math::histogram::Histogram>, String> {
        let requests = ranges
            .iter()
            .map(|(n, &amax)| (n.clone(), StatRequest::AbsHistogram { bins, amax }))
            .collect();
        let found = self
            .run_stats(input, &requests)
            .map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        for (n, s) in found {
            if let (
                TensorStats::AbsHistogram {
                    counts,
                    clipped,
                    min,
                    max,
                },
                Some(&amax),
            ) = (s, ranges.get(&n))
            {
                let h = qint8_math::histogram::Histogram::from_abs_counts(
                    amax, counts, clipped, min, max,
                )
                .map_err(|e| format!("tensor `{n}`: {e}"))?;
                out.insert(n, h);
            }
        }
        Ok(out)
    }
}

/// A convolution's device and geometry: input dims, output channels and
/// the window (kernel, strides, pads, dilations; the output size follows).
type ConvKey = (usize, [i32; 4], i32, [i32; 8]);

/// Per-step scratch of a run: the im2col buffer, and the step's cuDNN
/// setup with the workspace it needs.
struct Scratch<'a> {
    col: Option<&'a mut CudaSlice<f32>>,
    cudnn: Option<&'a CudnnConv>,
    workspace: Option<&'a mut CudaSlice<u8>>,
}

/// cuDNN's setup for a convolution step, with its workspace size in bytes;
/// `None` for other steps, for asymmetric padding (cuDNN pads both sides
/// alike) and wherever cuDNN declines, which leaves the step to the
/// built-in kernels.
fn cudnn_conv(h: &Arc<Cudnn>, step: &Step) -> Option<(CudnnConv, usize)> {
    use cudarc::cudnn::sys::{cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t};
    // Grouped convolutions stay on the direct kernel, which ran
    // EfficientNet-B0 faster on the H200 than cuDNN's grouped FP32
    // algorithms (docs/results.md, "GPU execution"); 1x1 ones with stride 1
    // are one cuBLAS product of the input as it is, with nothing to unroll.
    let (dims, m, groups, win) = match step {
        Step::ConvGemm {
            dims,
            m,
            win,
            direct: false,
            ..
        } => (*dims, *m, 1, *win),
        _ => return None,
    };
    if win.ph != win.phe || win.pw != win.pwe {
        return None;
    }
    let [n, c, _, _] = dims;
    let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let x = h.create_4d_tensor::<f32>(nchw, dims).ok()?;
    let w = h
        .create_4d_filter::<f32>(nchw, [m, c / groups, win.kh, win.kw])
        .ok()?;
    let y = h
        .create_4d_tensor::<f32>(nchw, [n, m, win.oh, win.ow])
        .ok()?;
    let mut conv = h
        .create_conv2d::<f32>(
            [win.ph, win.pw],
            [win.sh, win.sw],
            [win.dh, win.dw],
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .ok()?;
    // Plain FP32 multiply-adds: no TF32 tensor cores.
    conv.set_math_type(cudnnMathType_t::CUDNN_FMA_MATH).ok()?;
    conv.set_group_count(groups).ok()?;
    let fwd = ConvForward {
        conv: &conv,
        x: &x,
        w: &w,
        y: &y,
    };
    let algo = fwd.pick_algorithm().ok()?;
    let bytes = fwd.get_workspace_size(algo).ok()?;
    Some((
        CudnnConv {
            x,
            w,
            y,
            conv,
            algo,
        },
        bytes,
    ))
}

/// Elements of the im2col buffer a step needs without cuDNN (0 for steps
/// that need none: 1x1 convolutions with stride 1 and no padding read their
/// input as it is).
fn im2col_len(step: &Step) -> usize {
    match step {
        Step::ConvGemm {
            dims,
            win,
            direct: false,
            ..
        } => {
            let [n, c, ..] = dims.map(|v| v as usize);
            n * c * (win.kh * win.kw * win.oh * win.ow) as usize
        }
        _ => 0,
    }
}

/// The values a step reads.
fn reads(s: &Step) -> Vec<&str> {
    match s {
        Step::Unary { x, .. }
        | Step::Alias { x, .. }
        | Step::Pool { x, .. }
        | Step::RowMean { x, .. }
        | Step::Softmax { x, .. }
        | Step::Linear8 { x, .. }
        | Step::Affine { x, .. } => vec![x],
        Step::Binary { a, b, .. } => std::iter::once(a.as_str()).chain(b.as_deref()).collect(),
        Step::ConvGemm { x, w, bias, .. } | Step::ConvGrouped { x, w, bias, .. } => {
            std::iter::once(x.as_str())
                .chain([w.as_str()])
                .chain(bias.as_deref())
                .collect()
        }
        Step::Gemm { a, b, c, .. } => std::iter::once(a.as_str())
            .chain([b.as_str()])
            .chain(c.as_ref().map(|(n, _)| n.as_str()))
            .collect(),
        Step::Concat { parts, .. } => parts.iter().map(|(n, ..)| n.as_str()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use qint8_graph::{ConvAttrs, ValueInfo};

    use super::*;

    fn fixture_graph(name: &str) -> Graph {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models")
            .join(format!("{name}.onnx"));
        let mut g = qint8_graph::onnx::load(p).unwrap().graph;
        qint8_graph::passes::simplify(&mut g).unwrap();
        g
    }

    fn f32s(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|i| i as f32 * 0.01).collect())
                .unwrap(),
        )
    }

    #[test]
    fn every_fixture_plans_without_a_gpu() {
        for m in ["resnet50", "vgg16_bn", "efficientnet_b0"] {
            let g = fixture_graph(m);
            let plan = plan_host(&g, &g.inputs[0].name, &[4, 1, 32, 32]).unwrap();
            let convs = g
                .nodes
                .iter()
                .filter(|n| matches!(n.op, Op::Conv(_)))
                .count();
            let planned = plan
                .steps
                .iter()
                .filter(|s| matches!(s, Step::ConvGemm { .. } | Step::ConvGrouped { .. }))
                .count();
            assert_eq!(planned, convs, "{m}");
            assert_eq!(plan.outputs[0].1, vec![4, 10], "{m}");
            // Every computed value but the outputs is freed exactly once.
            let freed: usize = plan.frees.iter().map(Vec::len).sum();
            let mut read: Vec<&str> = plan.steps.iter().flat_map(reads).collect();
            read.sort_unstable();
            read.dedup();
            assert_eq!(freed, read.len(), "{m}");
        }
    }

    #[test]
    fn per_channel_dequantization_plans_its_channels() {
        let mut init = BTreeMap::new();
        init.insert(
            "wq".to_string(),
            Tensor::I8(ndarray::ArrayD::zeros(IxDyn(&[4, 2, 3, 3]))),
        );
        init.insert("ws".to_string(), f32s(&[4]));
        let g = Graph {
            name: "dq".into(),
            inputs: vec![ValueInfo::f32("x", &[1, 2, 5, 5])],
            outputs: vec![ValueInfo::f32("y", &[1, 4, 3, 3])],
            nodes: vec![
                Node::new(
                    "dq",
                    Op::DequantizeLinear { axis: 0 },
                    &["wq", "ws"],
                    &["w"],
                ),
                Node::new(
                    "c",
                    Op::Conv(ConvAttrs {
                        group: 1,
                        ..Default::default()
                    }),
                    &["x", "w"],
                    &["y"],
                ),
            ],
            initializers: init,
            value_info: vec![],
        };
        let plan = plan_host(&g, "x", &[1, 2, 5, 5]).unwrap();
        match &plan.steps[0] {
            Step::Linear8 {
                channels,
                inner,
                n,
                saturate: None,
                ..
            } => {
                assert_eq!((*channels, *inner, *n), (4, 18, 72));
            }
            other => panic!("{other:?}"),
        }
        // The int8 weights go up as data with the executor, the scales and
        // zero points with the plan.
        assert!(plan
            .uploads
            .iter()
            .any(|(n, v)| n == "w#scale" && v.len() == 4));
        assert!(plan
            .uploads
            .iter()
            .any(|(n, v)| n == "w#zero" && v == &vec![0.0; 4]));
    }

    #[test]
    fn every_node_it_cannot_run_is_named() {
        let mut init = BTreeMap::new();
        init.insert("w3".to_string(), f32s(&[2, 1, 3, 3, 3]));
        init.insert("idx".to_string(), Tensor::vec_i64(&[0]));
        let g = Graph {
            name: "bad".into(),
            inputs: vec![ValueInfo::f32("x", &[1, 1, 4, 4, 4])],
            outputs: vec![
                ValueInfo::f32("y", &[1, 2, 2, 2, 2]),
                ValueInfo::f32("z", &[1, 4, 4, 4]),
            ],
            nodes: vec![
                Node::new(
                    "conv3d",
                    Op::Conv(ConvAttrs {
                        group: 1,
                        ..Default::default()
                    }),
                    &["x", "w3"],
                    &["y"],
                ),
                Node::new("pick", Op::Gather { axis: 1 }, &["x", "idx"], &["z"]),
            ],
            initializers: init,
            value_info: vec![],
        };
        let e = plan_host(&g, "x", &[1, 1, 4, 4, 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot run 2 node(s)"), "{e}");
        assert!(e.contains("conv3d (Conv): 3 spatial axes"), "{e}");
        assert!(e.contains("pick (Gather)"), "{e}");
    }

    #[test]
    fn broadcast_strides_follow_numpy() {
        let n = Node::new("a", Op::Add, &["p", "q"], &["r"]);
        let s = broadcast_strides(&n, &[3, 1], &[2, 3, 4]).unwrap();
        assert_eq!(&s[..3], &[0, 1, 0]);
        let s = broadcast_strides(&n, &[2, 3, 4], &[2, 3, 4]).unwrap();
        assert_eq!(&s[..3], &[12, 4, 1]);
        assert!(broadcast_strides(&n, &[3], &[2, 4]).is_err());
        assert!(broadcast_strides(&n, &[1, 2, 3, 4], &[2, 3, 4]).is_err());
    }
}
