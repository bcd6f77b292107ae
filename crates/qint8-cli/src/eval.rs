//! `qint8 eval`: top-1/top-5 accuracy and throughput on labeled images: an
//! IDX file, an image folder or preprocessed NPY inputs (see [`crate::data`]).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::Array1;
use qint8_calibration::dataset::npy::write_npy_f32;
use qint8_calibration::ImageDataset;
use qint8_graph::Model;
use qint8_runtime::{Session, SessionOptions};
use serde_json::json;

use crate::cli::EvalArgs;
use crate::data::{input_description, label_with_predictions, open_scored, DataKind};
use crate::format;
use crate::inspect::load_model;
use crate::run::check_input_shape;

pub(crate) use qint8_eval::accuracy::{argmax, Score};

/// A model prepared to score labeled images: its runtime session (QDQ
/// models run on integer kernels, or simulated in float) with plans compiled for the batch sizes a
/// dataset needs, and the names of its image input and logits output.
pub(crate) struct Scorer {
    /// The session that runs the model.
    pub(crate) session: Session,
    /// The GPU executor that runs the batches instead of `session`
    /// (`--device cuda`).
    #[cfg(feature = "cuda")]
    gpu: Option<std::cell::RefCell<qint8_trt::cuda::CudaExecutor>>,
    /// The model's only input.
    input: String,
    /// The model's first output: `[batch, classes]` logits.
    output: String,
    /// The model as messages name it.
    name: String,
    /// The command as messages name it (`qint8 eval`).
    command: &'static str,
}

impl Scorer {
    /// Checks that `model` takes `dataset`'s images (one input that fits a
    /// batch; `data` names the data in that message) and yields `[batch,
    /// classes]` logits, then creates its session (with `opts`) and, with
    /// `compile`, compiles the plans of a full batch of `batch` images and
    /// of the remainder before any timing, as other runtimes do when they
    /// create a session (not needed when the GPU runs the batches). `name`
    /// and `command` name the model and the command in messages.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        model: &Model,
        name: &str,
        command: &'static str,
        dataset: &ImageDataset,
        batch: usize,
        opts: SessionOptions,
        data: &str,
        compile: bool,
    ) -> Result<Self> {
        let n = dataset.len();
        let [c, h, w] = dataset.input_shape();
        let g = &model.graph;
        let Some(input) = g.inputs.first() else {
            bail!("{name}: the model has no inputs");
        };
        if g.inputs.len() > 1 {
            bail!(
                "{name}: the model has {} inputs; {command} feeds exactly one (images)",
                g.inputs.len()
            );
        }
        let first_batch = batch.min(n);
        check_input_shape(input, &[first_batch, c, h, w], data)?;
        let Some(output) = g.outputs.first() else {
            bail!("{name}: the model has no outputs");
        };
        if let Some(dims) = &output.shape {
            if dims.len() != 2 {
                bail!(
                    "{name}: output {} has shape {}; {command} needs [batch, classes] logits",
                    output.name,
                    format::dims_text(dims)
                );
            }
        }
        let session = Session::new(model, opts).with_context(|| format!("preparing {name}"))?;
        let mut sizes = if compile {
            vec![first_batch]
        } else {
            Vec::new()
        };
        if compile && !n.is_multiple_of(batch) && n > batch {
            sizes.push(n % batch);
        }
        for b in sizes {
            session
                .plan(&[(input.name.as_str(), &[b, c, h, w])])
                .with_context(|| {
                    format!(
                        "compiling {name} for input shape {}",
                        format::usize_dims(&[b, c, h, w])
                    )
                })?;
        }
        Ok(Self {
            session,
            #[cfg(feature = "cuda")]
            gpu: None,
            input: input.name.clone(),
            output: output.name.clone(),
            name: name.to_string(),
            command,
        })
    }

    /// Runs the batches on GPU 0 instead of the CPU session; returns the
    /// device's name.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_gpu(&mut self, model: &Model) -> Result<String> {
        let exe = qint8_trt::cuda::CudaExecutor::new(&model.graph)
            .with_context(|| format!("preparing {} on the GPU", self.name))?;
        let name = format!("{} ({})", exe.device().name, exe.convolutions());
        self.gpu = Some(std::cell::RefCell::new(exe));
        Ok(name)
    }

    /// Without the `cuda` feature there is no GPU executor.
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn on_gpu(&mut self, _model: &Model) -> Result<String> {
        Err(crate::gpu::unavailable())
    }

    /// One batch's outputs, on the GPU when [`Scorer::on_gpu`] chose it.
    fn run_batch(&self, inputs: ndarray::ArrayViewD<'_, f32>) -> Result<Vec<ndarray::ArrayD<f32>>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Ok(g.borrow_mut().run(inputs)?);
        }
        Ok(self.session.run(&[(self.input.as_str(), inputs)])?)
    }

    /// Scores every image of `dataset` in batches of `batch`: returns the
    /// hits and the number of classes. `data` and `labels` name the images
    /// and their labels in messages; the predicted class of each image is
    /// pushed to `predictions` when given, and `progress` is told the
    /// number of images done after each batch.
    pub(crate) fn score(
        &self,
        dataset: &ImageDataset,
        batch: usize,
        data: &Path,
        labels: &str,
        mut predictions: Option<&mut Vec<usize>>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(Score, usize)> {
        let (name, command) = (&self.name, self.command);
        let mut score = Score::default();
        let mut classes = 0;
        for batch in dataset.batches(batch) {
            let batch = batch.with_context(|| format!("reading {}", data.display()))?;
            let outputs = self.run_batch(batch.inputs.view()).with_context(|| {
                format!(
                    "running {name} on images {}..{}",
                    batch.start,
                    batch.start + batch.len()
                )
            })?;
            let Some(logits) = outputs.first() else {
                bail!("{name}: the model produced no outputs");
            };
            let shape = logits.shape();
            if shape.len() != 2 || shape[0] != batch.len() || shape[1] == 0 {
                bail!(
                    "{name}: output {} has shape {} for a batch of {}; {command} needs [batch, classes] logits",
                    self.output,
                    format::usize_dims(shape),
                    batch.len()
                );
            }
            classes = shape[1];
            let batch_labels = batch
                .labels
                .as_deref()
                .context("the dataset has no labels")?;
            let logits = logits
                .as_standard_layout()
                .into_dimensionality::<ndarray::Ix2>()
                .context("logits are not two-dimensional")?;
            for (i, (row, &label)) in logits.outer_iter().zip(batch_labels).enumerate() {
                let row = row.as_slice().context("logits row is not contiguous")?;
                if label >= classes {
                    bail!(
                        "{labels}: image {} has label {label}, but the model has only {classes} classes",
                        batch.start + i
                    );
                }
                score.add(row, label);
                if let Some(p) = predictions.as_deref_mut() {
                    p.push(argmax(row));
                }
            }
            progress(score.n);
        }
        Ok((score, classes))
    }
}

/// Runs `qint8 eval`.
pub(crate) fn main(args: &EvalArgs, threads: usize) -> Result<()> {
    let total_start = Instant::now();
    let model = load_model(&args.model)?;
    // With --reference, without labels: its predictions label them below.
    let opened = open_scored(
        &args.data,
        args.labels.as_deref(),
        &args.pre,
        args.limit,
        args.reference.is_some(),
        "--reference MODEL.onnx scores against that model's predictions",
    )?;
    let kind = opened.kind;
    let prep_text = opened.preprocessing_text();
    let mut labels_source = opened.labels.clone().unwrap_or_default();
    let mut dataset = opened.dataset;
    if let Some(r) = &args.reference {
        let reference = load_model(r)?;
        let what = input_description(&args.data, &prep_text, kind, dataset.input_shape()[0]);
        dataset = label_with_predictions(
            &reference,
            &r.display().to_string(),
            dataset,
            &what,
            args.batch,
            threads,
            &mut |_| {},
        )
        .with_context(|| format!("--reference {}", r.display()))?;
        labels_source = format!("predictions of {}", r.display());
    }
    let preprocess = dataset.preprocess().clone();
    let n = dataset.len();
    let [c, h, w] = dataset.input_shape();

    let mut scorer = Scorer::new(
        &model,
        &args.model.display().to_string(),
        "qint8 eval",
        &dataset,
        args.batch,
        SessionOptions {
            threads,
            integer: !args.simulated,
            ..Default::default()
        },
        &input_description(&args.data, &prep_text, kind, c),
        args.device != "cuda",
    )?;
    let gpu = match args.device.as_str() {
        "cuda" => Some(scorer.on_gpu(&model)?),
        _ => None,
    };
    let session = &scorer.session;
    // Convolutions and Gemms the plan runs on integer kernels.
    let integer = match gpu {
        Some(_) => 0,
        None => session
            .plan(&[(scorer.input.as_str(), &[args.batch.min(n), c, h, w])])?
            .steps()
            .iter()
            .filter(|(_, op)| op.ends_with("(int8)"))
            .count(),
    };
    let device = gpu.clone().unwrap_or_else(|| "cpu".to_string());

    let progress = !args.json && std::io::stderr().is_terminal();
    let mut predictions = Vec::with_capacity(if args.predictions.is_some() { n } else { 0 });
    let loop_start = Instant::now();
    let (score, classes) = scorer.score(
        &dataset,
        args.batch,
        &args.data,
        &labels_source,
        args.predictions.is_some().then_some(&mut predictions),
        &mut |done| {
            if progress {
                eprint!("\reval {done}/{n} images");
                let _ = std::io::stderr().flush();
            }
        },
    )?;
    let seconds = loop_start.elapsed().as_secs_f64();
    if progress {
        eprint!("\r{}\r", " ".repeat(40));
    }
    if let Some(p) = &args.predictions {
        let v = Array1::from_iter(predictions.iter().map(|&x| x as f32));
        write_npy_f32(p, &v).with_context(|| format!("writing predictions {}", p.display()))?;
    }
    let total_seconds = total_start.elapsed().as_secs_f64();
    let top1 = score.top1 as f64 / score.n as f64;
    let top5 = score.top5 as f64 / score.n as f64;
    let images_per_s = score.n as f64 / seconds.max(1e-9);

    let text = if args.json {
        let v = json!({
            "model": args.model.display().to_string(),
            "data": args.data.display().to_string(),
            "format": kind.name(),
            "labels": labels_source,
            "n": score.n,
            "classes": classes,
            "top1": top1,
            "top5": top5,
            "correct_top1": score.top1,
            "correct_top5": score.top5,
            "images_per_s": images_per_s,
            "seconds": seconds,
            "total_seconds": total_seconds,
            "batch": args.batch,
            "threads": session.threads(),
            "pad": preprocess.pad,
            "mean": (kind != DataKind::Npy).then(|| short_f64(&preprocess.mean)),
            "std": (kind != DataKind::Npy).then(|| short_f64(&preprocess.std)),
            "resize": preprocess.resize,
            "crop": preprocess.crop,
            "input_shape": [c, h, w],
            "int8_nodes": integer,
            "device": device,
        });
        format!("{v}\n")
    } else {
        format::key_values(&[
            ("model", args.model.display().to_string()),
            ("images", args.data.display().to_string()),
            ("labels", labels_source.clone()),
            (
                "n",
                format!(
                    "{} images of {c}x{h}x{w} ({prep_text}), {classes} classes",
                    format::group(score.n),
                ),
            ),
            (
                "top-1",
                format!(
                    "{top1:.4}  ({} / {})",
                    format::group(score.top1),
                    format::group(score.n)
                ),
            ),
            (
                "top-5",
                format!(
                    "{top5:.4}  ({} / {})",
                    format::group(score.top5),
                    format::group(score.n)
                ),
            ),
            (
                "throughput",
                format!("{images_per_s:.1} images/s (inference loop {seconds:.3} s)"),
            ),
            ("total time", format!("{total_seconds:.3} s")),
            ("batch", args.batch.to_string()),
            ("device", device.clone()),
            ("threads", session.threads().to_string()),
            (
                "int8 kernels",
                match integer {
                    0 if gpu.is_some() => "none (the GPU rounds Q/DQ pairs in float)".to_string(),
                    0 if args.simulated => "off (--simulated)".to_string(),
                    0 => "none (no quantized convolution, or no AVX-512 VNNI)".to_string(),
                    k => format!("{k} Conv/Gemm nodes"),
                },
            ),
        ])
    };
    crate::print_stdout(&text)
}

/// `f32` values as the `f64` of their shortest decimal form (`0.286`, not
/// `0.28600001335144043`).
fn short_f64(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|x| x.to_string().parse().unwrap_or(f64::from(*x)))
        .collect()
}
