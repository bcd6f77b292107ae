//! Command-line arguments (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Measure top-1/top-5 accuracy and throughput on an IDX image dataset.
    Eval(EvalArgs),
    /// Write a model-zoo network (torchvision topology, seeded random weights) as ONNX.
    Zoo(ZooArgs),
    /// Calibrate on images and write an explicitly quantized (QDQ) ONNX model.
    Quantize(QuantizeArgs),
    /// Check an ONNX file against TensorRT's explicit-quantization rules.
    CheckTrt(CheckTrtArgs),
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
}

/// Arguments of `qint8 quantize`.
#[derive(Debug, Args)]
pub(crate) struct QuantizeArgs {
    /// The FP32 ONNX model.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// IDX calibration images (uint8; may be gzipped).
    #[arg(long, value_name = "IMAGES")]
    pub(crate) calib: PathBuf,
    /// Calibrate on the first N images.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = positive_usize)]
    pub(crate) calib_size: usize,
    /// How activation ranges are chosen.
    #[arg(long, value_enum, default_value_t = Method::Entropy)]
    pub(crate) method: Method,
    /// Percentile for --method percentile.
    #[arg(long, default_value_t = 99.99)]
    pub(crate) percentile: f64,
    /// One weight scale per output channel (the default).
    #[arg(long, conflicts_with = "per_tensor")]
    pub(crate) per_channel: bool,
    /// One weight scale per weight tensor.
    #[arg(long)]
    pub(crate) per_tensor: bool,
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
    /// Print one JSON summary instead of text (and no progress).
    #[arg(long)]
    pub(crate) json: bool,
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
}

/// Preprocessing of IDX images, shared by every command that reads them.
#[derive(Debug, Args)]
pub(crate) struct PreprocessArgs {
    /// Mean subtracted after scaling pixels to [0, 1]: one value, or one per channel.
    #[arg(
        long,
        value_name = "M[,M..]",
        value_delimiter = ',',
        default_value = "0",
        allow_hyphen_values = true
    )]
    pub(crate) mean: Vec<f32>,
    /// Divisor applied after subtracting the mean: one value, or one per channel.
    #[arg(
        long,
        value_name = "S[,S..]",
        value_delimiter = ',',
        default_value = "1",
        allow_hyphen_values = true
    )]
    pub(crate) std: Vec<f32>,
    /// Zero pixels added on each side, in pixel space, before normalizing.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) pad: usize,
}

impl PreprocessArgs {
    /// The preprocessing these flags describe.
    pub(crate) fn preprocess(&self) -> qint8_calibration::Preprocess {
        qint8_calibration::Preprocess::normalize(self.mean.clone(), self.std.clone())
            .with_pad(self.pad)
    }
}

/// Arguments of `qint8 eval`.
#[derive(Debug, Args)]
pub(crate) struct EvalArgs {
    /// The ONNX model; its first output must be [batch, classes] logits.
    #[arg(value_name = "MODEL")]
    pub(crate) model: PathBuf,
    /// IDX images file (uint8, N x H x W or N x H x W x C; may be gzipped).
    #[arg(long, value_name = "IMAGES")]
    pub(crate) data: PathBuf,
    /// IDX labels file [default: the `*-labels-idx1-ubyte[.gz]` beside IMAGES].
    #[arg(long, value_name = "LABELS")]
    pub(crate) labels: Option<PathBuf>,
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
        assert_eq!(a.pre.mean, vec![-0.5, 0.1, 0.2]);
        assert_eq!(a.pre.std, vec![2.0]);
        assert_eq!((a.pre.pad, a.batch, a.limit), (0, 64, None));
    }
}
