//! Command-line arguments (clap derive).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use qint8_calibration::Smoothing;

/// Quantize, run and evaluate neural networks in INT8 on the CPU.
#[derive(Debug, Parser)]
#[command(name = "qint8", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Worker threads [default: the number of available cores].
    #[arg(long, global = true, value_name = "N", value_parser = positive_usize)]
    pub(crate) threads: Option<usize>,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show a model's metadata, inputs/outputs, operators, sizes and memory plan.
    Inspect(InspectArgs),
    /// Run a model on one NPY tensor and write its first output as NPY.
    Run(RunArgs),
    /// Measure top-1/top-5 accuracy and throughput on labeled images (IDX, image folder or NPY).
    Eval(EvalArgs),
    /// Write a model-zoo network (torchvision topology, seeded random weights) as ONNX.
    Zoo(ZooArgs),
    /// Calibrate on images and write an explicitly quantized (QDQ) ONNX model.
    Quantize(QuantizeArgs),
    /// Check an ONNX file against TensorRT's explicit-quantization rules.
    CheckTrt(CheckTrtArgs),
    /// Calibrate with every method at both weight granularities and compare
    /// the QDQ models' top-1/top-5, calibration time and file size with FP32.
    Compare(CompareArgs),
    /// Calibrate with every method and write a report directory: report.md
    /// with accuracy per method, activation histograms with each method's
    /// threshold, per-layer SQNR of INT8 vs FP32, latency and memory (SVG plots).
    Report(ReportArgs),
    /// Measure every Conv/Gemm/MatMul node: top-1 and output error with it
    /// alone quantized and with it alone in float (first order, a few
    /// evaluations in all; --exact for real evaluations); ranked table and
    /// SVG chart.
    Sensitivity(SensitivityArgs),
    /// Keep the fewest nodes in float that bring the top-1 drop within
    /// --max-drop (verified by evaluation) and write that QDQ model.
    MixedPrecision(MixedPrecisionArgs),
    /// Quantization-aware training: calibrate, then fine-tune the weights
    /// with INT8 simulated (straight-through gradients, ranges fixed) on
    /// labeled images, and write the QDQ model.
    Qat(QatArgs),
    /// The whole job on the shipped fixture models: calibrate with every
    /// method, evaluate FP32 and INT8, measure size, speed and memory, print
    /// the target table and write a report directory.
    Demo(DemoArgs),
}

/// Arguments of `qint8 report`.
#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// Model, data, methods and preprocessing, as in `qint8 compare`.
    #[command(flatten)]
    pub(crate) study: StudyArgs,
    /// The report directory (created if needed; report.md and SVG plots).
    #[arg(long, short, value_name = "DIR")]
    pub(crate) output: PathBuf,
}

/// How `sensitivity` and `mixed-precision` calibrate and evaluate.
#[derive(Debug, Args)]
pub(crate) struct AnalysisArgs {
    /// The FP32 ONNX model; its first output must be [batch, classes] logits.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Calibration data and method, as in `qint8 quantize`.
    #[command(flatten)]
    pub(crate) cal: CalibrationArgs,
    /// Labeled evaluation images, as `qint8 eval --data` reads them.
    #[arg(long, value_name = "DATA")]
    pub(crate) data: PathBuf,
    /// Labels of --data, as in `qint8 eval`.
    #[arg(long, value_name = "LABELS")]
    pub(crate) labels: Option<PathBuf>,
    /// Score against the FP32 model's own predictions instead of labels,
    /// for data that has none: every top-1 then reads as agreement with
    /// FP32 (FP32 itself scores 100%), and --max-drop bounds the share of
    /// predictions quantization may change. Costs one FP32 evaluation of
    /// the sensitivity images (and, for mixed-precision, of --data).
    #[arg(long, conflicts_with = "labels")]
    pub(crate) fp32_labels: bool,
    /// Labeled images to measure sensitivity (and choose float nodes) on,
    /// read like --data [default: --data itself]; keeps the choice off the
    /// images the result is verified on.
    #[arg(long, value_name = "DATA")]
    pub(crate) sensitivity_data: Option<PathBuf>,
    /// Measure sensitivity on N images of --sensitivity-data: the first N,
    /// or N chosen at random with --sensitivity-seed.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = positive_usize)]
    pub(crate) sensitivity_images: usize,
    /// Choose the sensitivity images at random with this seed.
    #[arg(long, value_name = "S")]
    pub(crate) sensitivity_seed: Option<u64>,
    /// For a QDQ MODEL that stores its weights as integers: the FP32 model
    /// it was quantized from. Its weights replace the dequantized ones
    /// wherever they round to the file's integers, so the reference is the
    /// FP32 network and the weights' rounding is measured too.
    #[arg(long, value_name = "FP32.onnx")]
    pub(crate) fp32: Option<PathBuf>,
    /// Image preprocessing.
    #[command(flatten)]
    pub(crate) pre: PreprocessArgs,
    /// Images per batch (the linearized analysis holds every activation
    /// of one batch in memory and takes fewer images per batch where that
    /// would pass 512 MiB).
    #[arg(long, value_name = "B", default_value_t = 64, value_parser = positive_usize)]
    pub(crate) batch: usize,
    /// Measure every node with real evaluations of the whole network (2N + 1
    /// evaluations) instead of the default first-order estimate from one
    /// recorded FP32 pass and one backward pass (a few evaluations in all).
    #[arg(long)]
    pub(crate) exact: bool,
    /// Print exactly one JSON object (and no progress) instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `qint8 sensitivity`.
#[derive(Debug, Args)]
pub(crate) struct SensitivityArgs {
    /// Model, calibration, data.
    #[command(flatten)]
    pub(crate) common: AnalysisArgs,
    /// Where to write the SVG bar chart of the most sensitive nodes
    /// [default: MODEL-STEM-sensitivity.svg in the current directory].
    #[arg(long, value_name = "FILE.svg")]
    pub(crate) chart: Option<PathBuf>,
    /// Also measure each node quantized alone with only its weights
    /// quantized, and tell its weights' share of the damage from its
    /// activations' (one more run of every node for the first-order
    /// analysis, two more evaluations per node with --exact).
    #[arg(long)]
    pub(crate) split: bool,
}

/// Arguments of `qint8 mixed-precision`.
#[derive(Debug, Args)]
pub(crate) struct MixedPrecisionArgs {
    /// Model, calibration, data (the budget is verified on all of --data).
    #[command(flatten)]
    pub(crate) common: AnalysisArgs,
    /// Largest top-1 drop allowed, in percentage points (0.1: at most 0.1%
    /// lost). Without it: the best top-1 reachable with --max-float nodes.
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    pub(crate) max_drop: Option<f64>,
    /// Keep at most K nodes in float besides those of --keep-float
    /// [default: a tenth of the Conv/Gemm/MatMul nodes analyzed, at least
    /// 1]. After the first, each node costs one evaluation of the
    /// sensitivity images per remaining node.
    #[arg(long, value_name = "K")]
    pub(crate) max_float: Option<usize>,
    /// Each round after the first tries only the N remaining nodes the
    /// sensitivity analysis ranks highest, N evaluations of the
    /// sensitivity images instead of one per remaining node [default: all
    /// of them]. For large models; the search may then need more nodes.
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) candidates: Option<usize>,
    /// Where to write the QDQ model (atomically).
    #[arg(long, short, value_name = "OUT.onnx")]
    pub(crate) output: PathBuf,
    /// Where to write the SVG curve of top-1 against nodes in float
    /// [default: OUT with .svg for .onnx].
    #[arg(long, value_name = "FILE.svg")]
    pub(crate) chart: Option<PathBuf>,
    /// Also write the chosen quantization plan as JSON (float nodes as
    /// `float` precision).
    #[arg(long, value_name = "PLAN.json")]
    pub(crate) plan: Option<PathBuf>,
}

/// Arguments of `qint8 demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// The fixtures folder [default: fixtures/ of the current directory or
    /// of the repository the binary was built in].
    #[arg(long, value_name = "DIR")]
    pub(crate) fixtures: Option<PathBuf>,
    /// The report directory.
    #[arg(long, short, value_name = "DIR", default_value = "qint8-demo-report")]
    pub(crate) output: PathBuf,
    /// Calibration images per model (the first N of the fixture's 1000).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = positive_usize)]
    pub(crate) calib_size: usize,
    /// Evaluate on the first N of the fixture's 2000 evaluation images
    /// [default: all].
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) limit: Option<usize>,
    /// Methods to run, comma-separated [default: entropy, minmax,
    /// percentile, mse, moving-average, auto].
    #[arg(long, value_name = "M[,M..]", value_enum, value_delimiter = ',')]
    pub(crate) methods: Option<Vec<Method>>,
}

/// Arguments of `qint8 compare`.
#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Model, data, methods and preprocessing.
    #[command(flatten)]
    pub(crate) study: StudyArgs,
    /// Where to calibrate and evaluate: `cpu`, or `cuda` (GPU 0; needs a
    /// qint8 built with `--features cuda`). On the GPU, Q/DQ pairs run in
    /// float, as onnxruntime runs them with its optimizations off;
    /// --fp32-labels' labeling pass stays on the CPU.
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub(crate) device: String,
    /// Print exactly one JSON object (and no progress) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What `compare` and `report` calibrate and evaluate.
#[derive(Debug, Args)]
pub(crate) struct StudyArgs {
    /// The FP32 ONNX model; its first output must be [batch, classes] logits.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Calibration images and how many of them.
    #[command(flatten)]
    pub(crate) calib: CalibDataArgs,
    /// Smoothing of gated activations.
    #[command(flatten)]
    pub(crate) smooth: SmoothArgs,
    /// Labeled evaluation images, as `qint8 eval --data` reads them.
    #[arg(long, value_name = "DATA")]
    pub(crate) data: PathBuf,
    /// Labels of --data, as in `qint8 eval`.
    #[arg(long, value_name = "LABELS")]
    pub(crate) labels: Option<PathBuf>,
    /// Score against the FP32 model's own predictions instead of labels,
    /// for data that has none: every top-1 then reads as agreement with
    /// FP32 (FP32 itself scores 100%). Costs one FP32 evaluation.
    #[arg(long, conflicts_with = "labels")]
    pub(crate) fp32_labels: bool,
    /// Evaluate only the first N images of --data.
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) limit: Option<usize>,
    /// Calibration methods, in this order [default: entropy (spike-aware),
    /// minmax, percentile, mse, moving-average (constant 0.01)].
    #[arg(long, value_name = "M[,M..]", value_enum, value_delimiter = ',')]
    pub(crate) methods: Option<Vec<Method>>,
    /// Percentile for the percentile method.
    #[arg(long, default_value_t = 99.99)]
    pub(crate) percentile: f64,
    /// Which tensors get Q/DQ, as in `qint8 quantize`.
    #[arg(long, value_enum, default_value_t = Placement::Trt)]
    pub(crate) placement: Placement,
    /// Activations' type, as in `qint8 quantize`.
    #[arg(long, value_enum, default_value_t = ActivationType::Int8)]
    pub(crate) activations: ActivationType,
    /// Image preprocessing (calibration and evaluation images alike).
    #[command(flatten)]
    pub(crate) pre: PreprocessArgs,
    /// Images per batch, in calibration (moving-average depends on it) and
    /// evaluation.
    #[arg(long, value_name = "B", default_value_t = 32, value_parser = positive_usize)]
    pub(crate) batch: usize,
}

/// Arguments of `qint8 check-trt`.
#[derive(Debug, Args)]
pub(crate) struct CheckTrtArgs {
    /// The ONNX model (external data is read from its directory).
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Also fail on warnings (inputs of Conv/Gemm/MatMul left unquantized).
    #[arg(long)]
    pub(crate) strict: bool,
}

/// Calibration methods of `qint8 quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Method {
    /// KL-divergence minimization (TensorRT's entropy calibrator, modelopt convention).
    Entropy,
    /// Largest absolute value.
    Minmax,
    /// A percentile of |x| (see --percentile).
    Percentile,
    /// Mean squared error minimization.
    Mse,
    /// Moving average of each batch's largest absolute value (see
    /// --averaging-constant); depends on batch size and order.
    MovingAverage,
    /// Per activation, whichever of the other methods' thresholds (and
    /// 0.7x/1.4x entropy's) gives the smallest output error against FP32 on
    /// --refine-images calibration images; slower (one run per candidate).
    Auto,
}

/// Forms of the entropy search (`--entropy-variant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum EntropyVariantArg {
    /// modelopt's form with point masses (constant backgrounds) kept out of the comparison.
    SpikeAware,
    /// pytorch-quantization / TensorRT Model Optimizer convention.
    Modelopt,
    /// Literally as on the GTC 2017 slides.
    Gtc2017,
}

/// Q/DQ placement policies of `qint8 quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Placement {
    /// TensorRT's rules: inputs of Conv/Gemm/MatMul and residual Add inputs.
    Trt,
    /// onnxruntime's QDQ quantizer: inputs and outputs of every supported op.
    Ort,
}

/// Smoothing of gated activations, shared by `quantize` and `compare`.
#[derive(Debug, Args)]
pub(crate) struct SmoothArgs {
    /// Smoothing of per-channel gated activations (squeeze-and-excitation
    /// outputs feeding a convolution): their channels' range differences
    /// move into the convolution's weights by factors amax^alpha /
    /// wmax^(1-alpha), an exact rewrite that adds one Mul on each gate.
    /// "auto" picks alpha per site by estimated output error; a number
    /// (0 to 1) uses that alpha everywhere. Off with --trt-cache and
    /// --method moving-average.
    #[arg(long, value_name = "auto|ALPHA", default_value = "auto", value_parser = parse_smoothing)]
    pub(crate) smooth: Smoothing,
    /// Keep the graph as it is (no smoothing).
    #[arg(long)]
    pub(crate) no_smooth: bool,
}

impl SmoothArgs {
    /// The smoothing to calibrate with, `None` when off.
    pub(crate) fn smoothing(&self) -> Option<Smoothing> {
        (!self.no_smooth).then_some(self.smooth)
    }
}

fn parse_smoothing(s: &str) -> Result<Smoothing, String> {
    if s == "auto" {
        return Ok(Smoothing::Auto);
    }
    match s.parse::<f32>() {
        Ok(a) if (0.0..=1.0).contains(&a) => Ok(Smoothing::Alpha(a)),
        _ => Err(format!("expected auto or a number in [0, 1], got {s}")),
    }
}

/// Which calibration images, shared by `quantize` and `compare`.
#[derive(Debug, Args)]
pub(crate) struct CalibDataArgs {
    /// Calibration images: an IDX file (uint8; may be gzipped), an image
    /// folder (ROOT/CLASS/*.jpg|*.png, or images directly in ROOT), or a
    /// float32 NPY of shape N x C x H x W, inputs already preprocessed.
    /// Required, except for `sensitivity` and `mixed-precision` of a model
    /// that is quantized already (QDQ), whose own quantization they analyze.
    #[arg(long, value_name = "DATA")]
    pub(crate) calib: Option<PathBuf>,
    /// Calibrate on N images: the first N, or N chosen at random with --calib-seed.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = positive_usize)]
    pub(crate) calib_size: usize,
    /// Calibrate on --calib-size images chosen uniformly at random with this
    /// seed (the same seed picks the same images) instead of the first N.
    #[arg(long, value_name = "S")]
    pub(crate) calib_seed: Option<u64>,
}

impl CalibDataArgs {
    /// The calibration data. Without --calib this exits with a usage error
    /// (status 2), as a missing required argument does.
    pub(crate) fn required(&self) -> &Path {
        match &self.calib {
            Some(p) => p,
            None => {
                use clap::CommandFactory;
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "the following required argument was not provided: --calib <DATA>",
                    )
                    .exit()
            }
        }
    }
}

/// Arguments of `qint8 quantize`.
#[derive(Debug, Args)]
pub(crate) struct QuantizeArgs {
    /// The FP32 ONNX model.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Calibration data and method.
    #[command(flatten)]
    pub(crate) cal: CalibrationArgs,
    /// Store weights as float through QuantizeLinear/DequantizeLinear
    /// (modelopt style) instead of int8 initializers.
    #[arg(long)]
    pub(crate) float_weights: bool,
    /// Image preprocessing.
    #[command(flatten)]
    pub(crate) pre: PreprocessArgs,
    /// Images per calibration batch.
    #[arg(long, value_name = "B", default_value_t = 32, value_parser = positive_usize)]
    pub(crate) batch: usize,
    /// Where to write the QDQ model (atomically).
    #[arg(long, short, value_name = "OUT.onnx")]
    pub(crate) output: PathBuf,
    /// Also write the quantization plan as JSON.
    #[arg(long, value_name = "PLAN.json")]
    pub(crate) plan: Option<PathBuf>,
    /// Also write a TensorRT calibration cache (legacy implicit
    /// quantization) with a range for every float tensor of the model.
    /// The cache goes with the unmodified model, so this turns --smooth off.
    #[arg(long, value_name = "CACHE")]
    pub(crate) trt_cache: Option<PathBuf>,
    /// TensorRT version written in the cache header (TensorRT's
    /// major*1000+minor*100+patch form up to 8.x, e.g. 8601 for 8.6.1; the
    /// cache is only read by the version it names).
    #[arg(long, value_name = "V", default_value = "8601")]
    pub(crate) trt_version: String,
    /// Print one JSON summary instead of text (and no progress).
    #[arg(long)]
    pub(crate) json: bool,
    /// Where calibration's forward passes run: `cpu`, or `cuda` (GPU 0;
    /// needs a qint8 built with `--features cuda`). The statistics are
    /// gathered on the CPU either way.
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub(crate) device: String,
}

/// Arguments of `qint8 qat`.
#[derive(Debug, Args)]
pub(crate) struct QatArgs {
    /// The FP32 ONNX model; its first output must be [batch, classes] logits.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Calibration data and method, as in `qint8 quantize` (the ranges
    /// training keeps).
    #[command(flatten)]
    pub(crate) cal: CalibrationArgs,
    /// Labeled training images, read like `qint8 eval --data`.
    #[arg(long, value_name = "DATA")]
    pub(crate) train: PathBuf,
    /// Labels of --train, as in `qint8 eval`.
    #[arg(long, value_name = "LABELS")]
    pub(crate) train_labels: Option<PathBuf>,
    /// Train on N images of --train: the first N, or N chosen at random
    /// with --train-seed [default: all].
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) train_images: Option<usize>,
    /// Seed of the image order (and of --train-images' choice).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub(crate) train_seed: u64,
    /// Passes over the training images.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive_usize)]
    pub(crate) epochs: usize,
    /// Peak learning rate (a cosine schedule to zero); about 1% of the rate
    /// the model was trained with.
    #[arg(long, value_name = "LR", default_value_t = 1e-3)]
    pub(crate) lr: f32,
    /// SGD momentum.
    #[arg(long, value_name = "M", default_value_t = 0.9)]
    pub(crate) momentum: f32,
    /// L2 weight decay on the weights.
    #[arg(long, value_name = "WD", default_value_t = 0.0)]
    pub(crate) weight_decay: f32,
    /// Images per training step.
    #[arg(long, value_name = "B", default_value_t = 32, value_parser = positive_usize)]
    pub(crate) train_batch: usize,
    /// Also learn each activation's range (its step size, LSQ), starting
    /// from the calibrated one; the written file carries the learned ranges.
    #[arg(long)]
    pub(crate) learn_ranges: bool,
    /// Labeled images that choose the model written: it is scored on them
    /// (as exported, INT8) before training and after every epoch, and the
    /// best of those models is written, the calibrated one if no epoch
    /// beats it. Read like `qint8 eval --data`; keep them out of --train
    /// and --data.
    #[arg(long, value_name = "DATA", conflicts_with = "val_images")]
    pub(crate) val: Option<PathBuf>,
    /// Labels of --val.
    #[arg(long, value_name = "LABELS", requires = "val")]
    pub(crate) val_labels: Option<PathBuf>,
    /// Hold out N images of --train, chosen at random with --train-seed,
    /// as the validation images of --val; training (and --train-images'
    /// choice) uses the rest.
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) val_images: Option<usize>,
    /// Stop once this many epochs in a row have not beaten the best
    /// validation score (needs --val or --val-images).
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) patience: Option<usize>,
    /// Labeled images to score the model on before and after training
    /// (FP32, INT8 as calibrated, INT8 trained), read like `qint8 eval --data`.
    #[arg(long, value_name = "DATA")]
    pub(crate) data: Option<PathBuf>,
    /// Labels of --data.
    #[arg(long, value_name = "LABELS")]
    pub(crate) labels: Option<PathBuf>,
    /// Image preprocessing (calibration, training, --val and --data alike).
    #[command(flatten)]
    pub(crate) pre: PreprocessArgs,
    /// Store weights as float through QuantizeLinear/DequantizeLinear
    /// (modelopt style) instead of int8 initializers.
    #[arg(long)]
    pub(crate) float_weights: bool,
    /// Where to write the QDQ model (atomically).
    #[arg(long, short, value_name = "OUT.onnx")]
    pub(crate) output: PathBuf,
    /// Also write the trained model's quantization plan as JSON.
    #[arg(long, value_name = "PLAN.json")]
    pub(crate) plan: Option<PathBuf>,
    /// Print one JSON summary instead of text (and no progress).
    #[arg(long)]
    pub(crate) json: bool,
}

/// How to calibrate: the images, the method and its settings, weight
/// granularity, placement, smoothing (shared by `quantize`,
/// `sensitivity` and `mixed-precision`).
#[derive(Debug, Args)]
pub(crate) struct CalibrationArgs {
    /// Calibration images and how many of them.
    #[command(flatten)]
    pub(crate) calib: CalibDataArgs,
    /// Smoothing of gated activations.
    #[command(flatten)]
    pub(crate) smooth: SmoothArgs,
    /// How activation ranges are chosen.
    #[arg(long, value_enum, default_value_t = Method::Entropy)]
    pub(crate) method: Method,
    /// Percentile for --method percentile.
    #[arg(long, default_value_t = 99.99)]
    pub(crate) percentile: f64,
    /// Form of the entropy search for --method entropy.
    #[arg(long, value_enum, default_value_t = EntropyVariantArg::SpikeAware)]
    pub(crate) entropy_variant: EntropyVariantArg,
    /// Calibration images --method auto scores its candidates on.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = positive_usize)]
    pub(crate) refine_images: usize,
    /// Constant c of --method moving-average: range += c * (batch max - range).
    #[arg(long, value_name = "C", default_value_t = 0.01)]
    pub(crate) averaging_constant: f32,
    /// One weight scale per output channel (the default).
    #[arg(long, conflicts_with = "per_tensor")]
    pub(crate) per_channel: bool,
    /// One weight scale per weight tensor.
    #[arg(long)]
    pub(crate) per_tensor: bool,
    /// Which tensors get Q/DQ: TensorRT's placement rules, or everything
    /// onnxruntime's QDQ quantizer would quantize.
    #[arg(long, value_enum, default_value_t = Placement::Trt)]
    pub(crate) placement: Placement,
    /// Keep these nodes in float: their inputs get no Q/DQ (a convolution's
    /// fused residual Add goes along). Node names as `qint8 sensitivity`
    /// prints them; `*` matches any run of characters; comma-separated or
    /// repeated. Each must match a node with quantized inputs. The analyses
    /// leave them out, and mixed precision adds its nodes to them.
    #[arg(long, value_name = "NODE", value_delimiter = ',')]
    pub(crate) keep_float: Vec<String>,
    /// Activations' type: int8, symmetric (what TensorRT requires), or
    /// uint8, asymmetric over the part of the method's symmetric range a
    /// tensor occupies (all 256 levels on [0, t] after a Relu); onnxruntime
    /// runs uint8 activations with int8 weights fastest on x86 CPUs.
    #[arg(long, value_enum, default_value_t = ActivationType::Int8)]
    pub(crate) activations: ActivationType,
}

/// The activations' integer type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ActivationType {
    /// Symmetric int8, zero point 0.
    Int8,
    /// Asymmetric uint8.
    Uint8,
}

impl ActivationType {
    /// The math crate's type.
    pub(crate) fn dtype(self) -> qint8_math::QuantDtype {
        match self {
            ActivationType::Int8 => qint8_math::QuantDtype::Int8,
            ActivationType::Uint8 => qint8_math::QuantDtype::Uint8,
        }
    }
}

/// Arguments of `qint8 zoo`.
#[derive(Debug, Args)]
pub(crate) struct ZooArgs {
    /// resnet50, vgg16, vgg16_bn or efficientnet_b0.
    #[arg(value_name = "ARCH")]
    pub(crate) arch: String,
    /// Where to write the ONNX file (atomically).
    #[arg(long, short, value_name = "OUT.onnx")]
    pub(crate) output: PathBuf,
    /// Channel width multiplier.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) width: f64,
    /// Input height and width in pixels.
    #[arg(long, default_value_t = 224)]
    pub(crate) resolution: usize,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    pub(crate) channels: usize,
    /// Output classes.
    #[arg(long, default_value_t = 1000)]
    pub(crate) classes: usize,
    /// Seed of the random initialization.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

/// Arguments of `qint8 inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// The ONNX model (external data files are read from its directory).
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `qint8 run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The ONNX model.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Float32 NPY tensor fed to the model's first input.
    #[arg(long, short, value_name = "X.npy")]
    pub(crate) input: PathBuf,
    /// Where to write the model's first output (float32 NPY, written atomically).
    #[arg(long, short, value_name = "Y.npy")]
    pub(crate) output: PathBuf,
    /// Where to run the model: `cpu`, or `cuda` (GPU 0; needs a qint8 built
    /// with `--features cuda`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub(crate) device: String,
    /// Run N times on the same input and report the median time of one run
    /// (after one untimed run when N > 1, which compiles the plan).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive_usize)]
    pub(crate) repeat: usize,
}

/// Preprocessing of images (IDX files and image folders), shared by every
/// command that reads them, applied in the order resize, crop, pad,
/// normalize. NPY inputs are used as stored and take none of these flags.
#[derive(Debug, Args)]
pub(crate) struct PreprocessArgs {
    /// Mean subtracted after scaling pixels to [0, 1]: one value, or one per
    /// channel [default: 0, or ImageNet's with --imagenet].
    #[arg(
        long,
        value_name = "M[,M..]",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub(crate) mean: Option<Vec<f32>>,
    /// Divisor applied after subtracting the mean: one value, or one per
    /// channel [default: 1, or ImageNet's with --imagenet].
    #[arg(
        long,
        value_name = "S[,S..]",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub(crate) std: Option<Vec<f32>>,
    /// Zero pixels added on each side, in pixel space, before normalizing.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) pad: usize,
    /// Resize the shorter side to N pixels, keeping the aspect ratio
    /// (torchvision Resize(N) on PIL images: antialiased bilinear).
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) resize: Option<usize>,
    /// Keep the centred N x N pixels after resizing (torchvision CenterCrop(N)).
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) crop: Option<usize>,
    /// ImageNet evaluation preprocessing: --resize 256 --crop 224 --mean
    /// 0.485,0.456,0.406 --std 0.229,0.224,0.225, each unless given explicitly.
    #[arg(long)]
    pub(crate) imagenet: bool,
    /// Decode image-folder images to one grayscale channel (PIL's "L")
    /// instead of RGB, for 1-channel models.
    #[arg(long)]
    pub(crate) grayscale: bool,
}

impl PreprocessArgs {
    /// The preprocessing these flags describe: explicit flags first, then
    /// ImageNet's values with --imagenet, then the plain defaults.
    pub(crate) fn preprocess(&self) -> qint8_calibration::Preprocess {
        let base = if self.imagenet {
            qint8_calibration::Preprocess::imagenet()
        } else {
            qint8_calibration::Preprocess::default()
        };
        qint8_calibration::Preprocess {
            mean: self.mean.clone().unwrap_or(base.mean),
            std: self.std.clone().unwrap_or(base.std),
            pad: self.pad,
            resize: self.resize.or(base.resize),
            crop: self.crop.or(base.crop),
            ..base
        }
    }
}

/// Arguments of `qint8 eval`.
#[derive(Debug, Args)]
pub(crate) struct EvalArgs {
    /// The ONNX model; its first output must be [batch, classes] logits.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// Images: an IDX file (uint8, N x H x W or N x H x W x C; may be
    /// gzipped), an image folder (ROOT/CLASS/*.jpg|*.png; labels from the
    /// class folders, sorted), or a float32 NPY of shape N x C x H x W, inputs
    /// already preprocessed.
    #[arg(long, value_name = "DATA")]
    pub(crate) data: PathBuf,
    /// Labels: for IDX data an IDX labels file [default: the
    /// `*-labels-idx1-ubyte[.gz]` beside DATA]; for NPY data an int64 NPY of length N
    /// (required). Not for image folders.
    #[arg(long, value_name = "LABELS")]
    pub(crate) labels: Option<PathBuf>,
    /// Score against this model's predictions instead of labels, for data
    /// without labels (for instance the FP32 model a QDQ file was
    /// quantized from): top-1 is then the agreement with it. Costs one
    /// evaluation of it.
    #[arg(long, value_name = "REF.onnx", conflicts_with = "labels")]
    pub(crate) reference: Option<PathBuf>,
    /// Image preprocessing.
    #[command(flatten)]
    pub(crate) pre: PreprocessArgs,
    /// Images per inference batch.
    #[arg(long, value_name = "B", default_value_t = 64, value_parser = positive_usize)]
    pub(crate) batch: usize,
    /// Evaluate only the first N images.
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    pub(crate) limit: Option<usize>,
    /// Print exactly one JSON object (and no progress) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the predicted class (argmax, lowest index on ties) of every
    /// image as a float32 NPY vector of length n, for per-image comparisons
    /// with another runtime (see scripts/eval_vs_onnxruntime.py).
    #[arg(long, value_name = "FILE.npy", hide_short_help = true)]
    pub(crate) predictions: Option<PathBuf>,
    /// Run a QDQ model's quantized convolutions in float on the dequantized
    /// values (simulated INT8, as onnxruntime with its optimizations off)
    /// instead of on the integer kernels the CPU has (AVX-512 VNNI).
    #[arg(long)]
    pub(crate) simulated: bool,
    /// Where to run the model: `cpu`, or `cuda` (GPU 0; needs a qint8 built
    /// with `--features cuda`, the NVIDIA driver and CUDA 13's NVRTC and
    /// cuBLAS). On the GPU Q/DQ pairs round in float, as onnxruntime with its
    /// optimizations off does.
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub(crate) device: String,
}

/// Parses an integer of at least 1.
fn positive_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn positive_usize_rejects_zero_and_garbage() {
        assert_eq!(positive_usize("3"), Ok(3));
        assert!(positive_usize("0").is_err());
        assert!(positive_usize("-1").is_err());
        assert!(positive_usize("x").is_err());
    }

    #[test]
    fn eval_lists_and_negative_means_parse() {
        let cli = Cli::try_parse_from([
            "qint8",
            "eval",
            "m.onnx",
            "--data",
            "d",
            "--mean",
            "-0.5,0.1,0.2",
            "--std",
            "2",
            "--threads",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.threads, Some(3));
        let Command::Eval(a) = cli.command else {
            panic!("not eval")
        };
        assert_eq!(a.pre.mean, Some(vec![-0.5, 0.1, 0.2]));
        assert_eq!(a.pre.std, Some(vec![2.0]));
        assert_eq!((a.pre.pad, a.batch, a.limit), (0, 64, None));
        let p = a.pre.preprocess();
        assert_eq!((p.mean, p.std), (vec![-0.5, 0.1, 0.2], vec![2.0]));
        assert_eq!((p.resize, p.crop), (None, None));
    }

    #[test]
    fn imagenet_defaults_yield_to_explicit_flags() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["qint8", "eval", "m.onnx", "--data", "d"];
            args.extend_from_slice(extra);
            let Command::Eval(a) = Cli::try_parse_from(args).unwrap().command else {
                panic!("not eval")
            };
            a.pre.preprocess()
        };
        let plain = parse(&[]);
        assert_eq!(plain, qint8_calibration::Preprocess::default());
        assert_eq!(
            parse(&["--imagenet"]),
            qint8_calibration::Preprocess::imagenet()
        );
        let p = parse(&["--imagenet", "--crop", "200", "--mean", "0.5", "--pad", "1"]);
        assert_eq!((p.resize, p.crop, p.pad), (Some(256), Some(200), 1));
        assert_eq!((p.mean, p.std), (vec![0.5], vec![0.229, 0.224, 0.225]));
        let p = parse(&["--resize", "40", "--crop", "32", "--grayscale"]);
        assert_eq!((p.resize, p.crop, p.mean), (Some(40), Some(32), vec![0.0]));
        assert!(Cli::try_parse_from(["qint8", "eval", "m", "--data", "d", "--crop", "0"]).is_err());
        let Command::Quantize(q) = Cli::try_parse_from([
            "qint8",
            "quantize",
            "m.onnx",
            "--calib",
            "d",
            "-o",
            "q.onnx",
            "--calib-seed",
            "7",
        ])
        .unwrap()
        .command
        else {
            panic!("not quantize")
        };
        assert_eq!(
            (q.cal.calib.calib_seed, q.cal.calib.calib_size),
            (Some(7), 1000)
        );
    }
}
