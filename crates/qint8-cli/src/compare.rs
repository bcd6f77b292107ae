//! `qint8 compare`: every calibration method at both weight granularities
//! in one table — top-1/top-5 of each QDQ model (run in INT8),
//! its drop from FP32, the calibration time and the exported file size.
//!
//! Activation thresholds are found on the float graph, so they mostly do
//! not depend on the weight granularity: each method calibrates once (per
//! channel, exactly as `qint8 quantize --per-channel` does) and its
//! per-tensor row swaps in per-tensor weight parameters from the
//! calibrator's [`weight_params`] (they depend only on the weights). Two
//! steps do weigh the weights' rounding: smoothing's choice of factors and
//! `auto`'s choice of thresholds. Where either applies (the model has
//! smoothing sites, or the method is auto), the per-tensor row calibrates
//! again with per-tensor weights. Either way both
//! rows hold what `qint8 quantize` would write for them.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use prost::Message;
use qint8_calibration::{calibrate, calibrate_on, weight_params, CalibConfig, Progress};
use qint8_graph::quant::{insert_qdq, QuantPlan, WeightStorage};
use qint8_graph::Model;
use qint8_runtime::SessionOptions;
use serde_json::json;

use crate::cli::{ActivationType, CompareArgs, EntropyVariantArg, Method, Placement};
use crate::data::{
    input_description, label_with_predictions, open_calibration, open_scored, FP32_LABELS_HINT,
};
use crate::eval::{Score, Scorer};
use crate::format::{self, Align, Table};
use crate::inspect::load_model;
use crate::quantize::method_config;

/// Every method, in the order `compare` runs them by default.
const ALL_METHODS: [Method; 5] = [
    Method::Entropy,
    Method::Minmax,
    Method::Percentile,
    Method::Mse,
    Method::MovingAverage,
];

/// Images `--method auto` scores on (`qint8 quantize`'s default); auto is
/// run only when `--methods` names it.
pub(crate) const REFINE_IMAGES: usize = 256;

/// Constant of the moving-average method (`qint8 quantize`'s default).
pub(crate) const AVERAGING_CONSTANT: f32 = 0.01;

/// The command-line name of a method (`moving-average`).
pub(crate) fn method_name(m: Method) -> &'static str {
    match m {
        Method::Entropy => "entropy",
        Method::Minmax => "minmax",
        Method::Percentile => "percentile",
        Method::Mse => "mse",
        Method::MovingAverage => "moving-average",
        Method::Auto => "auto",
    }
}

/// `methods` without repeats, in first-seen order; every method when `None`.
pub(crate) fn methods_to_run(methods: Option<&[Method]>) -> Vec<Method> {
    let mut out = Vec::new();
    for &m in methods.unwrap_or(&ALL_METHODS) {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// Top-1 and top-5 as fractions of the images scored.
fn fractions(score: Score) -> (f64, f64) {
    let n = score.n.max(1) as f64;
    (score.top1 as f64 / n, score.top5 as f64 / n)
}

/// One QDQ model's results.
struct Row {
    /// The method's command-line name.
    method: &'static str,
    /// The method as the plan names it (`entropy(spike_aware)`, ...).
    plan_method: String,
    /// Weights per output channel (else per tensor).
    per_channel: bool,
    /// Hits.
    score: Score,
    /// Seconds of the activation calibration (shared by both rows unless
    /// the per-tensor row calibrated on its own).
    calibration_seconds: f64,
    /// Bytes of the ONNX file `qint8 quantize` would write.
    file_bytes: usize,
}

/// A one-line progress display on stderr (when `show`), overwritten in place.
pub(crate) fn status(show: bool, text: &str) {
    if show {
        eprint!("\r{text:<78}");
        let _ = std::io::stderr().flush();
    }
}

/// Runs `qint8 compare`.
pub(crate) fn main(args: &CompareArgs, threads: usize) -> Result<()> {
    let total_start = Instant::now();
    let methods = methods_to_run(args.study.methods.as_deref());
    // Bad options fail before any work.
    let range_methods: Vec<(Method, CalibConfig)> = methods
        .iter()
        .map(|&m| {
            let cfg = method_config(
                m,
                args.study.percentile,
                EntropyVariantArg::SpikeAware,
                AVERAGING_CONSTANT,
                REFINE_IMAGES,
            )?;
            Ok((m, cfg))
        })
        .collect::<Result<_>>()?;
    let placement = match args.study.placement {
        Placement::Trt => qint8_graph::PlacementPolicy::TensorRt,
        Placement::Ort => qint8_graph::PlacementPolicy::OnnxRuntime,
    };
    // Without GPU support this fails here, before any work.
    let runner = crate::gpu::calibration_runner(&args.device)?;
    let model_name = args.study.model.display().to_string();
    let model = load_model(&args.study.model)?;

    let opened = open_calibration(&args.study.calib, &args.study.pre, &model)?;
    let calib_kind = opened.kind;
    let calib_prep = opened.preprocessing_text();
    let calib = opened.dataset;

    let opened = open_scored(
        &args.study.data,
        args.study.labels.as_deref(),
        &args.study.pre,
        args.study.limit,
        args.study.fp32_labels,
        FP32_LABELS_HINT,
    )?;
    let kind = opened.kind;
    let prep_text = opened.preprocessing_text();
    let labels_source = opened.labels.clone().unwrap_or_default();
    let mut dataset = opened.dataset;
    let n = dataset.len();
    if n == 0 {
        bail!("{}: no images to evaluate", args.study.data.display());
    }
    let [c, _, _] = dataset.input_shape();
    let data_text = input_description(&args.study.data, &prep_text, kind, c);

    let show = !args.json && std::io::stderr().is_terminal();
    if args.study.fp32_labels {
        dataset = label_with_predictions(
            &model,
            &model_name,
            dataset,
            &data_text,
            args.study.batch,
            threads,
            &mut |done| status(show, &format!("fp32 labels: {done}/{n} images")),
        )?;
    }
    let steps = 1 + 2 * range_methods.len();
    // The GPU's name, once a model has run there.
    let device = std::cell::RefCell::new("cpu".to_string());
    // Scores `m` on the evaluation images, with progress (`what` prefixes it).
    let evaluate = |m: &Model, name: &str, what: &str| -> Result<(Score, usize, usize)> {
        let mut scorer = Scorer::new(
            m,
            name,
            "qint8 compare",
            &dataset,
            args.study.batch,
            SessionOptions {
                threads,
                ..Default::default()
            },
            &data_text,
            runner.is_none(),
        )?;
        if runner.is_some() {
            *device.borrow_mut() = scorer.on_gpu(m)?;
        }
        let (score, classes) = scorer.score(
            &dataset,
            args.study.batch,
            &args.study.data,
            &labels_source,
            None,
            &mut |done| status(show, &format!("{what}: eval {done}/{n} images")),
        )?;
        Ok((score, classes, scorer.session.threads()))
    };

    let (fp32, classes, session_threads) =
        evaluate(&model, &model_name, &format!("[1/{steps}] fp32"))?;
    let (fp32_top1, fp32_top5) = fractions(fp32);
    let fp32_bytes = qint8_graph::onnx::model_to_proto(&model).encoded_len();

    let opset = model.opset.max(13);
    let mut rows = Vec::new();
    for (i, (method, method_cfg)) in range_methods.iter().enumerate() {
        let name = method_name(*method);
        let run_calibration = |per_channel: bool, step: usize| {
            let cfg = CalibConfig {
                placement,
                activation_dtype: args.study.activations.dtype(),
                smooth: args.study.smooth.smoothing(),
                batch: args.study.batch,
                threads,
                per_channel,
                ..method_cfg.clone()
            };
            let calib_start = Instant::now();
            let mut progress = |p: Progress| {
                status(
                    show,
                    &format!(
                        "[{step}/{steps}] {name}: calibrating, pass {}/{}: {}/{} {}",
                        p.pass,
                        p.passes,
                        p.done,
                        p.total,
                        if p.pass == 3 { "trials" } else { "images" }
                    ),
                )
            };
            let calibrated = match runner {
                Some(make) => calibrate_on(&model.graph, &calib, &cfg, make, &mut progress),
                None => calibrate(&model.graph, &calib, &cfg, &mut progress),
            }
            .with_context(|| format!("calibrating {model_name} with {name}"))?;
            anyhow::Ok((calibrated, calib_start.elapsed().as_secs_f64()))
        };
        let (shared, shared_seconds) = run_calibration(true, 2 + 2 * i)?;
        // Smoothing and auto's refinement weigh the weights' rounding.
        let own_per_tensor = !shared.smoothing_sites.is_empty() || method_cfg.refine.is_some();
        for per_channel in [true, false] {
            let granularity = if per_channel {
                "per-channel"
            } else {
                "per-tensor"
            };
            let k = 2 + 2 * i + usize::from(!per_channel);
            let own = if !per_channel && own_per_tensor {
                Some(run_calibration(false, k)?)
            } else {
                None
            };
            let (calibrated, calibration_seconds) = match &own {
                Some((c, t)) => (c, *t),
                None => (&shared, shared_seconds),
            };
            let plan = if per_channel || own.is_some() {
                calibrated.plan.clone()
            } else {
                // Same tensors and thresholds, one scale per weight tensor.
                let axes = calibrated
                    .plan
                    .weights
                    .iter()
                    .map(|(n, p)| (n.clone(), p.axis().unwrap_or(0)))
                    .collect();
                QuantPlan {
                    weights: weight_params(&calibrated.graph, &axes, false)?,
                    ..calibrated.plan.clone()
                }
            };
            let graph = insert_qdq(&calibrated.graph, &plan, WeightStorage::Int8)
                .with_context(|| format!("building the {name} {granularity} QDQ model"))?;
            // Per-channel QuantizeLinear/DequantizeLinear need opset 13.
            let qdq = model.with_graph(graph, opset);
            let file_bytes = qint8_graph::onnx::model_to_proto(&qdq).encoded_len();
            let qdq_name = format!("{model_name} ({name}, {granularity} QDQ)");
            let (score, _, _) = evaluate(
                &qdq,
                &qdq_name,
                &format!("[{k}/{steps}] {name} {granularity}"),
            )?;
            rows.push(Row {
                method: name,
                plan_method: plan.method.clone(),
                per_channel,
                score,
                calibration_seconds,
                file_bytes,
            });
        }
    }
    if show {
        eprint!("\r{}\r", " ".repeat(78));
    }
    let drop_pp = |s: Score| (fp32_top1 - fractions(s).0) * 100.0;

    let text = if args.json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (top1, top5) = fractions(r.score);
                json!({
                    "method": r.method,
                    "calibration_method": r.plan_method,
                    "per_channel": r.per_channel,
                    "top1": top1,
                    "top5": top5,
                    "correct_top1": r.score.top1,
                    "correct_top5": r.score.top5,
                    "drop_pp": drop_pp(r.score),
                    "calibration_seconds": r.calibration_seconds,
                    "file_bytes": r.file_bytes,
                })
            })
            .collect();
        let v = json!({
            "model": model_name,
            "calib": args.study.calib.required().display().to_string(),
            "calibration_data_format": calib_kind.name(),
            "calibration_images": calib.len(),
            "calibration_seed": args.study.calib.calib_seed,
            "data": args.study.data.display().to_string(),
            "format": kind.name(),
            "labels": labels_source,
            "n": n,
            "classes": classes,
            "placement": match args.study.placement {
                Placement::Trt => "trt",
                Placement::Ort => "ort",
            },
            "percentile": args.study.percentile,
            "activations": args.study.activations.dtype().name(),
            "batch": args.study.batch,
            "threads": session_threads,
            "device": *device.borrow(),
            "fp32_top1": fp32_top1,
            "fp32_top5": fp32_top5,
            "fp32_file_bytes": fp32_bytes,
            "rows": rows,
            "total_seconds": total_start.elapsed().as_secs_f64(),
        });
        format!("{v}\n")
    } else {
        let mut table = Table::new(&[
            ("method", Align::Left),
            ("weights", Align::Left),
            ("top-1 %", Align::Right),
            ("top-5 %", Align::Right),
            ("drop (pp)", Align::Right),
            ("calib (s)", Align::Right),
            ("file size", Align::Left),
        ]);
        table.row(vec![
            "fp32".into(),
            "float".into(),
            format!("{:.2}", fp32_top1 * 100.0),
            format!("{:.2}", fp32_top5 * 100.0),
            "-".into(),
            "-".into(),
            format::bytes(fp32_bytes),
        ]);
        for r in &rows {
            let (top1, top5) = fractions(r.score);
            table.row(vec![
                r.method.into(),
                if r.per_channel {
                    "per-channel"
                } else {
                    "per-tensor"
                }
                .into(),
                format!("{:.2}", top1 * 100.0),
                format!("{:.2}", top5 * 100.0),
                format!("{:.2}", drop_pp(r.score)),
                format!("{:.2}", r.calibration_seconds),
                format::bytes(r.file_bytes),
            ]);
        }
        let calib_choice = match args.study.calib.calib_seed {
            Some(seed) => format!("chosen with seed {seed}"),
            None => "the first ones".into(),
        };
        let mut out = format::key_values(&[
            ("model", model_name.clone()),
            ("device", device.borrow().clone()),
            (
                "calibration",
                format!(
                    "{} images of {} ({calib_prep}), {calib_choice}",
                    format::group(calib.len()),
                    args.study.calib.required().display()
                ),
            ),
            (
                "evaluation",
                format!(
                    "{} images of {} ({prep_text}), {classes} classes, labels {labels_source}",
                    format::group(n),
                    args.study.data.display()
                ),
            ),
            (
                "quantization",
                format!(
                    "QDQ, {} activations, int8 weights, {} placement; each method calibrates once \
                     for both weight granularities, again for per-tensor where smoothing or auto \
                     weighs the weights' rounding",
                    match args.study.activations {
                        ActivationType::Int8 => "int8",
                        ActivationType::Uint8 => "uint8 (asymmetric)",
                    },
                    match args.study.placement {
                        Placement::Trt => "TensorRT",
                        Placement::Ort => "onnxruntime",
                    }
                ),
            ),
        ]);
        out.push('\n');
        out.push_str(&table.render(0));
        out.push_str(&format!(
            "\ntotal time {:.1} s, {session_threads} threads\n",
            total_start.elapsed().as_secs_f64()
        ));
        out
    };
    crate::print_stdout(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_keep_order_without_repeats() {
        assert_eq!(methods_to_run(None), ALL_METHODS.to_vec());
        assert_eq!(
            methods_to_run(Some(&[Method::Mse, Method::Minmax, Method::Mse])),
            vec![Method::Mse, Method::Minmax]
        );
        let names: Vec<&str> = ALL_METHODS.iter().map(|&m| method_name(m)).collect();
        assert_eq!(
            names,
            ["entropy", "minmax", "percentile", "mse", "moving-average"]
        );
    }

    #[test]
    fn method_names_are_the_command_line_names() {
        use clap::ValueEnum;
        for m in ALL_METHODS {
            let v = m.to_possible_value().expect("not skipped");
            assert_eq!(v.get_name(), method_name(m));
        }
    }
}
