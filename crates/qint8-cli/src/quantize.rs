//! `qint8 quantize`: calibrate, place Q/DQ, write the QDQ model.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qint8_calibration::{calibrate_on, calibrate_owned, CalibConfig, Progress};
use qint8_graph::quant::{insert_qdq_owned, WeightStorage};
use qint8_math::search::{EntropyVariant, RangeMethod};
use qint8_trt::CalibrationCache;
use serde_json::json;

use crate::cli::{CalibrationArgs, EntropyVariantArg, Method, Placement, QuantizeArgs};
use crate::inspect::load_model;

/// The range method a command line asks for (moving-average min-max is
/// max calibration with [`CalibConfig::moving_average`] set).
pub(crate) fn range_method(
    method: Method,
    percentile: f64,
    variant: EntropyVariantArg,
) -> Result<RangeMethod> {
    Ok(match method {
        Method::Entropy | Method::Auto => RangeMethod::Entropy {
            variant: match variant {
                EntropyVariantArg::SpikeAware => EntropyVariant::SpikeAware,
                EntropyVariantArg::Modelopt => EntropyVariant::Modelopt,
                EntropyVariantArg::Gtc2017 => EntropyVariant::Gtc2017,
            },
            start_bin: 128,
            levels: 128,
        },
        Method::Minmax | Method::MovingAverage => RangeMethod::Max,
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
    if args.trt_cache.is_some() && !args.cal.keep_float.is_empty() {
        // The cache describes every tensor of the unmodified model.
        bail!("--keep-float applies to the QDQ model: a TensorRT calibration cache cannot keep layers in float (set their precision in TensorRT instead)");
    }
    if args.trt_cache.is_some() && args.cal.activations == crate::cli::ActivationType::Uint8 {
        bail!("--activations uint8 is for onnxruntime: TensorRT's calibration cache holds symmetric int8 ranges only");
    }
    let mut model = load_model(&args.model)?;
    let opened = crate::data::open_calibration(&args.cal.calib, &args.pre, &model)?;
    let data_format = opened.kind.name();
    let data = opened.dataset;
    let cfg = CalibConfig {
        all_ranges: args.trt_cache.is_some(),
        ..args.cal.config(args.batch, threads)?
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
                "\rcalibrating: pass {}/{} [{}{}] {}/{} {}",
                p.pass,
                p.passes,
                "#".repeat(filled),
                "-".repeat(width - filled),
                p.done,
                p.total,
                if p.pass == 3 { "trials" } else { "images" }
            );
            if p.done == p.total && p.pass == p.passes {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    };
    let calib_start = Instant::now();
    // The output is built from the calibrated graph: the model's own is
    // not needed again.
    let graph = std::mem::take(&mut model.graph);
    let calibrated = match crate::gpu::calibration_runner(&args.device)? {
        Some(make) => calibrate_on(&graph, &data, &cfg, make, &mut progress),
        None => calibrate_owned(graph, &data, &cfg, &mut progress),
    }
    .with_context(|| format!("calibrating {}", args.model.display()))?;
    let calib_seconds = calib_start.elapsed().as_secs_f64();
    let graph = insert_qdq_owned(
        calibrated.graph,
        &calibrated.plan,
        weight_storage(args.float_weights),
    )?;
    // Per-channel QuantizeLinear/DequantizeLinear need opset 13.
    let out = model.with_graph(graph, model.opset.max(13));
    let cache = match &args.trt_cache {
        Some(_) => Some(
            CalibrationCache::from_amax(
                &args.trt_version,
                if args.cal.method == Method::Minmax {
                    "MinMaxCalibration"
                } else {
                    "EntropyCalibration2"
                },
                calibrated.ranges.iter().map(|(n, &a)| (n.clone(), a)),
            )
            .context("building the TensorRT calibration cache")?,
        ),
        None => None,
    };
    // Each file is written atomically; when a later one fails the earlier
    // ones are removed, so a failed run leaves no output behind.
    let mut written: Vec<&std::path::Path> = Vec::new();
    let result = (|| -> Result<()> {
        qint8_graph::onnx::save(&out, &args.output)
            .with_context(|| format!("writing {}", args.output.display()))?;
        written.push(&args.output);
        if let Some(p) = &args.plan {
            calibrated
                .plan
                .save(p)
                .with_context(|| format!("writing {}", p.display()))?;
            written.push(p);
        }
        if let (Some(p), Some(cache)) = (&args.trt_cache, &cache) {
            cache
                .write(p)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for p in written {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    let size = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    let float_nodes: Vec<&String> = calibrated.plan.precision.keys().collect();
    let summary = json!({
        "model": args.model.display().to_string(),
        "output": args.output.display().to_string(),
        "method": calibrated.plan.method,
        "per_channel": cfg.per_channel,
        "calibration_images": data.len(),
        "calibration_data_format": data_format,
        "calibration_seed": args.cal.calib.calib_seed,
        "activations": calibrated.plan.activations.len(),
        "activation_type": cfg.activation_dtype.name(),
        "smoothed": calibrated.smoothed.len(),
        "weights": calibrated.plan.weights.len(),
        "float_nodes": float_nodes,
        "calibration_seconds": calib_seconds,
        "total_seconds": start.elapsed().as_secs_f64(),
        "output_bytes": size,
        "trt_cache": args.trt_cache.as_ref().map(|p| p.display().to_string()),
        "trt_cache_tensors": cache.as_ref().map(|c| c.entries.len()),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} -> {}: {} activations ({} smoothed) and {} weights quantized ({}), calibrated on {} images in {:.2} s; {} bytes",
            args.model.display(),
            args.output.display(),
            calibrated.plan.activations.len(),
            calibrated.smoothed.len(),
            calibrated.plan.weights.len(),
            calibrated.plan.method,
            data.len(),
            calib_seconds,
            size
        );
        if cfg.activation_dtype == qint8_math::QuantDtype::Uint8 {
            println!("activations uint8 (asymmetric): for onnxruntime; TensorRT takes int8 only");
        }
        if !float_nodes.is_empty() {
            println!("kept in float ({}):", float_nodes.len());
            for n in &float_nodes {
                println!("  {n}");
            }
        }
    }
    Ok(())
}

/// How `--float-weights` stores quantized weights.
pub(crate) fn weight_storage(float_weights: bool) -> WeightStorage {
    match float_weights {
        true => WeightStorage::FloatQdq,
        false => WeightStorage::Int8,
    }
}

/// The calibrator's settings for `method`: its range search, and the
/// moving-average constant or the refinement images where `method` uses
/// them; everything else at its default.
pub(crate) fn method_config(
    method: Method,
    percentile: f64,
    variant: EntropyVariantArg,
    averaging_constant: f32,
    refine_images: usize,
) -> Result<CalibConfig> {
    Ok(CalibConfig {
        method: range_method(method, percentile, variant)?,
        moving_average: (method == Method::MovingAverage).then_some(averaging_constant),
        refine: (method == Method::Auto).then_some(refine_images),
        ..Default::default()
    })
}

impl CalibrationArgs {
    /// The calibrator's configuration these flags describe.
    pub(crate) fn config(&self, batch: usize, threads: usize) -> Result<CalibConfig> {
        Ok(CalibConfig {
            smooth: self.smooth.smoothing(),
            per_channel: !self.per_tensor,
            float_nodes: self.keep_float.iter().cloned().collect(),
            placement: match self.placement {
                Placement::Trt => qint8_graph::PlacementPolicy::TensorRt,
                Placement::Ort => qint8_graph::PlacementPolicy::OnnxRuntime,
            },
            batch,
            threads,
            activation_dtype: self.activations.dtype(),
            ..method_config(
                self.method,
                self.percentile,
                self.entropy_variant,
                self.averaging_constant,
                self.refine_images,
            )?
        })
    }
}
