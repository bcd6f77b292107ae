//! `qint8`: the command-line tool of the qint8 workspace.
//!
//! Subcommands:
//!
//! - `qint8 inspect MODEL [--json]`: producer, opset, IR version, inputs and
//!   outputs (symbolic dimensions by name), operator counts, parameters,
//!   initializer bytes, file sizes (the `.onnx` file plus every external
//!   data file it references), node count, and the compiled plan's steps and
//!   peak activation memory at batch 1 (every symbolic dimension set to 1).
//! - `qint8 run MODEL --input X.npy --output Y.npy`: feeds one float32 NPY
//!   tensor to the model's first input and writes its first output as
//!   float32 NPY (atomically).
//! - `qint8 eval MODEL --data DATA [--labels LABELS] [--mean M[,M..]]
//!   [--std S[,S..]] [--pad N] [--resize N] [--crop N] [--imagenet]
//!   [--grayscale] [--batch B] [--limit N] [--json]`: top-1 and top-5
//!   accuracy and throughput. DATA is told apart by its path: a folder is
//!   an image folder in torchvision's ImageFolder layout
//!   (`ROOT/<class>/*.jpg|*.jpeg|*.png`, labels from the sorted class
//!   folders, RGB or with `--grayscale` one channel, decoded batch by
//!   batch); a `.npy` file holds float32 inputs `[N, C, H, W]` already
//!   preprocessed, with labels from `--labels LABELS.npy` (int64 `[N]`);
//!   anything else is an IDX image file (optionally gzipped) whose labels
//!   default to the `*-labels-idx1-ubyte[.gz]` file beside it.
//!   Preprocessing of images: `--resize N` (shorter side, aspect kept,
//!   Pillow's antialiased bilinear as torchvision uses it), `--crop N`
//!   (centre), zero padding of `--pad` pixels on each side in pixel space,
//!   then `(pixel / 255 - mean) / std` per channel; `--imagenet` sets
//!   resize 256, crop 224 and ImageNet's mean/std, each unless given.
//!   Predictions are the lowest index among equal maximal logits (as
//!   `numpy.argmax`); a label's rank counts the logits above it plus the
//!   equal ones at lower indices, and it is a top-k hit when that rank is
//!   below k, so top-5 is 1.0 for models with 5 classes or fewer.
//!   `images_per_s` is measured over the inference loop only (batch
//!   preprocessing, execution and scoring; model loading and data reading
//!   excluded); `total_seconds` covers the whole command. The option
//!   `--predictions FILE.npy` (listed by `--help`, not by `-h`) writes the
//!   predicted class of every image as a float32 NPY vector, for
//!   comparisons with other runtimes (`scripts/eval_vs_onnxruntime.py`).
//! - `qint8 zoo ARCH -o OUT.onnx [--width W] [--resolution R] [--channels C]
//!   [--classes K] [--seed S]`: writes ResNet-50, VGG-16(-BN) or
//!   EfficientNet-B0 with torchvision's topology and seeded random weights.
//!
//! - `qint8 quantize MODEL --calib DATA [--calib-size N] [--calib-seed S]
//!   [--method entropy|minmax|percentile|mse] [--percentile P]
//!   [--per-channel | --per-tensor] [--float-weights] [preprocessing flags
//!   as in eval] -o OUT.onnx [--plan PLAN.json] [--json]`: calibrates on
//!   the first N images of DATA (IDX, image folder or NPY, as in eval;
//!   labels are not needed), or on N chosen at random with `--calib-seed`
//!   (two streamed passes: ranges, then histograms over fixed
//!   ranges), places Q/DQ by TensorRT's rules and writes a QDQ model (opset
//!   at least 13, int8 symmetric, weights per output channel as int8
//!   initializers unless `--float-weights`). `qint8 eval` scores the result.
//!
//! - `qint8 check-trt MODEL [--strict]`: lists every violation of
//!   TensorRT's explicit-quantization rules (opset below 13, integer or
//!   QLinear operators, non-int8 or non-zero zero points, bad scales,
//!   per-channel weight axes) and warnings (unquantized inputs of
//!   Conv/Gemm/MatMul); exits with status 1 when there is a violation
//!   (or, with `--strict`, a warning), 0 otherwise.
//!
//! - `qint8 compare MODEL --calib DATA --data DATA [--labels LABELS]
//!   [--calib-size N] [--calib-seed S] [--limit N] [--methods M[,M..]]
//!   [--percentile P] [--placement trt|ort] [preprocessing flags as in
//!   eval] [--batch B] [--json]`: for each calibration method (entropy,
//!   minmax, percentile, mse, moving-average) and weight granularity
//!   (per-channel, per-tensor), calibrates, builds the QDQ model (int8
//!   weights) and scores it as eval does; prints top-1, top-5, the top-1
//!   drop from FP32 in percentage points, the calibration time and the
//!   size of the ONNX file it would write. Activation ranges mostly do not
//!   depend on the weight granularity, so each method calibrates once and
//!   both of its rows report that calibration's time; where the model has
//!   smoothing sites or the method is auto, the per-tensor row calibrates
//!   again with per-tensor weights, as `qint8 quantize --per-tensor` does.
//!
//! The global `--threads N` sets the worker threads (default: the number of
//! available cores). Errors are printed with their causes to stderr and
//! exit with status 1; usage errors exit with status 2.

mod check_trt;
mod cli;
mod compare;
mod data;
mod eval;
mod format;
mod gpu;
mod inspect;
mod qat;
mod quantize;
mod report;
mod run;
mod sensitivity;
mod zoo;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(default_threads);
    let result = match &cli.command {
        Command::Inspect(args) => inspect::main(args, threads),
        Command::Run(args) => run::main(args, threads),
        Command::Eval(args) => eval::main(args, threads),
        Command::Zoo(args) => zoo::main(args),
        Command::Quantize(args) => quantize::main(args, threads),
        Command::CheckTrt(args) => check_trt::main(args),
        Command::Compare(args) => compare::main(args, threads),
        Command::Report(args) => report::report_main(args, threads),
        Command::Demo(args) => report::demo_main(args, threads),
        Command::Sensitivity(args) => sensitivity::sensitivity_main(args, threads),
        Command::MixedPrecision(args) => sensitivity::mixed_precision_main(args, threads),
        Command::Qat(args) => qat::main(args, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each said once. Library errors
/// name their file and carry their cause both in their text and as their
/// source, and the commands' context names the file too, so the plain
/// chain reads `writing x.onnx: x.onnx: No such file (os error 2): No such
/// file (os error 2)`. A cause whose text the line already holds is left
/// out, and a cause that begins by naming what the line ends with
/// (`x.onnx: ...` after `writing x.onnx`) drops that name.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let mut c = cause.to_string();
        while let Some((head, rest)) = c.split_once(": ") {
            if head.is_empty() || !text.ends_with(head) {
                break;
            }
            c = rest.to_string();
        }
        if c.is_empty() || text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

/// Number of available cores (1 when it cannot be determined).
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Writes `text` to stdout; a closed pipe (`qint8 inspect m.onnx | head`)
/// is not an error.
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn error_text_says_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        // A library error that names its file and holds its cause twice,
        // under a context that names the file again.
        #[derive(Debug)]
        struct Named(std::io::Error);
        impl std::fmt::Display for Named {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "out/x.onnx: {}", self.0)
            }
        }
        impl std::error::Error for Named {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Named(io())).context("writing out/x.onnx");
        assert_eq!(error_text(&e), "writing out/x.onnx: No such file");
        // Causes that add something are all kept, in order.
        let e = anyhow::Error::new(io())
            .context("reading calib.npy")
            .context("calibrating m.onnx");
        assert_eq!(
            error_text(&e),
            "calibrating m.onnx: reading calib.npy: No such file"
        );
        // A name the line holds but does not end with stays.
        let e = anyhow::Error::new(Named(io())).context("writing out/x.onnx (opset 17)");
        assert_eq!(
            error_text(&e),
            "writing out/x.onnx (opset 17): out/x.onnx: No such file"
        );
        let e = anyhow::anyhow!("plain");
        assert_eq!(error_text(&e), "plain");
    }
}
