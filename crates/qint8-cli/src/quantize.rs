//! `qint8 quantize`: calibrate, place Q/DQ, write the QDQ model.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qint8_calibration::{calibrate, CalibConfig, ImageDataset, Progress};
use qint8_graph::quant::{insert_qdq, WeightStorage};
use qint8_graph::Model;
use qint8_math::search::RangeMethod;
use serde_json::json;

use crate::cli::{Method, QuantizeArgs};
use crate::inspect::load_model;

/// The range method a command line asks for.
pub(crate) fn range_method(method: Method, percentile: f64) -> Result<RangeMethod> {
    Ok(match method {
        Method::Entropy => RangeMethod::entropy(),
        Method::Minmax => RangeMethod::Max,
        Method::Mse => RangeMethod::mse(),
        Method::Percentile => {
            if !(percentile > 0.0 && percentile <= 100.0) {
                bail!("--percentile must be in (0, 100], got {percentile}");
            }
            RangeMethod::percentile(percentile)
        }
    })
}

pub(crate) fn main(args: &QuantizeArgs, threads: usize) -> Result<()> {
    let start = Instant::now();
    let model = load_model(&args.model)?;
    let preprocess = args.pre.preprocess();
    let data = ImageDataset::from_idx(&args.calib, None, preprocess)
        .with_context(|| format!("reading calibration images {}", args.calib.display()))?
        .take(args.calib_size)?;
    let cfg = CalibConfig {
        method: range_method(args.method, args.percentile)?,
        per_channel: !args.per_tensor,
        batch: args.batch,
        threads,
        ..Default::default()
    };
    let show = !args.json && std::io::stderr().is_terminal();
    let mut progress = |p: Progress| {
        if show {
            let width = 30;
            let filled = (p.done * width)
                .checked_div(p.total)
                .unwrap_or(width)
                .min(width);
            eprint!(
                "\rcalibrating: pass {}/{} [{}{}] {}/{} images",
                p.pass,
                p.passes,
                "#".repeat(filled),
                "-".repeat(width - filled),
                p.done,
                p.total
            );
            if p.done == p.total && p.pass == p.passes {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    };
    let calib_start = Instant::now();
    let calibrated = calibrate(&model.graph, &data, &cfg, &mut progress)
        .with_context(|| format!("calibrating {}", args.model.display()))?;
    let calib_seconds = calib_start.elapsed().as_secs_f64();
    let storage = if args.float_weights {
        WeightStorage::FloatQdq
    } else {
        WeightStorage::Int8
    };
    let graph = insert_qdq(&calibrated.graph, &calibrated.plan, storage)?;
    // Per-channel QuantizeLinear/DequantizeLinear need opset 13.
    let out = Model {
        graph,
        opset: model.opset.max(13),
        ..model.clone()
    };
    qint8_graph::onnx::save(&out, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if let Some(p) = &args.plan {
        calibrated
            .plan
            .save(p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let size = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    let summary = json!({
        "model": args.model.display().to_string(),
        "output": args.output.display().to_string(),
        "method": calibrated.plan.method,
        "per_channel": cfg.per_channel,
        "calibration_images": data.len(),
        "activations": calibrated.plan.activations.len(),
        "weights": calibrated.plan.weights.len(),
        "calibration_seconds": calib_seconds,
        "total_seconds": start.elapsed().as_secs_f64(),
        "output_bytes": size,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} -> {}: {} activations and {} weights quantized ({}), calibrated on {} images in {:.2} s; {} bytes",
            args.model.display(),
            args.output.display(),
            calibrated.plan.activations.len(),
            calibrated.plan.weights.len(),
            calibrated.plan.method,
            data.len(),
            calib_seconds,
            size
        );
    }
    Ok(())
}
