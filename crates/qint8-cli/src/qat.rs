//! `qint8 qat`: calibrate, fine-tune with INT8 simulated, write the QDQ model.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use qint8_calibration::{calibrate, ImageDataset};
use qint8_eval::Evaluator;
use qint8_graph::quant::insert_qdq;
use qint8_graph::{Graph, Model, QuantPlan, WeightStorage};
use qint8_qat::{train_validated, train_with_epochs, QatConfig, QatError, Validation};
use serde_json::json;

use crate::cli::QatArgs;
use crate::inspect::load_model;

/// Top-1 (0 to 1) of `graph` quantized by `plan` (or in float) on `data`.
fn top1(
    model: &Model,
    graph: &Graph,
    plan: Option<&QuantPlan>,
    data: &ImageDataset,
    name: &str,
    threads: usize,
) -> Result<f64> {
    let graph = match plan {
        Some(p) => insert_qdq(graph, p, WeightStorage::Int8)?,
        None => graph.clone(),
    };
    let m = model.with_graph(graph, model.opset.max(13));
    let e = Evaluator::new(&m, name, threads)?;
    let a = e
        .evaluate(data, 64, &mut |_| {})
        .with_context(|| format!("evaluating {name}"))?;
    Ok(a.score.top1_fraction())
}

pub(crate) fn main(args: &QatArgs, threads: usize) -> Result<()> {
    let start = Instant::now();
    let config = QatConfig {
        epochs: args.epochs,
        batch: args.train_batch,
        lr: args.lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        seed: args.train_seed,
        threads,
        learn_ranges: args.learn_ranges,
    };
    // Settings out of range fail before any calibration.
    config.validate()?;
    if args.patience.is_some() && args.val.is_none() && args.val_images.is_none() {
        anyhow::bail!("--patience needs validation images: give --val or --val-images");
    }
    let model = load_model(&args.model)?;
    let calib = crate::data::open_calibration(&args.cal.calib, &args.pre, &model)?.dataset;
    let mut train_set =
        crate::data::open_labeled(&args.train, args.train_labels.as_deref(), &args.pre)?.dataset;
    let mut val_set = match &args.val {
        Some(p) => Some(
            crate::data::open_labeled(p, args.val_labels.as_deref(), &args.pre)
                .context("reading --val")?
                .dataset,
        ),
        None => None,
    };
    if let Some(n) = args.val_images {
        let total = train_set.len();
        let (held, rest) = train_set
            .split(n, args.train_seed)
            .with_context(|| format!("--val-images {n} of the {total} --train images"))?;
        val_set = Some(held);
        train_set = rest;
    }
    if let Some(n) = args.train_images {
        train_set = train_set.sample(n, args.train_seed)?;
    }
    let eval = match &args.data {
        Some(p) => Some(crate::data::open_labeled(p, args.labels.as_deref(), &args.pre)?.dataset),
        None => None,
    };
    if let Some(input) = model.graph.inputs.first() {
        for (what, d) in [
            ("--train", Some(&train_set)),
            ("--val", val_set.as_ref()),
            ("--data", eval.as_ref()),
        ] {
            if let Some(d) = d {
                let [c, h, w] = d.input_shape();
                crate::run::check_input_shape(input, &[1, c, h, w], what)?;
            }
        }
    }
    let cfg = args.cal.config(32, threads)?;
    let calibrated = calibrate(&model.graph, &calib, &cfg, &mut |_| {})
        .with_context(|| format!("calibrating {}", args.model.display()))?;
    let show = !args.json && std::io::stderr().is_terminal();
    let train_start = Instant::now();
    // With --data, the model is scored after every epoch; the kept
    // epoch's score is the written model's.
    let mut per_epoch: Vec<f64> = Vec::new();
    let validation = val_set.as_ref().map(|data| Validation {
        data,
        patience: args.patience,
    });
    let mut show_progress = |p: &qint8_qat::Progress| {
        if show {
            eprint!(
                "\rtraining: epoch {}/{} step {}/{} loss {:.4}",
                p.epoch, args.epochs, p.step, p.steps, p.loss
            );
            if p.step == p.steps {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    };
    let mut score_epoch = |e: &qint8_qat::EpochStats, graph: &Graph, plan: &QuantPlan| {
        if let Some(d) = &eval {
            let name = format!("INT8 after epoch {}", e.epoch);
            let t = top1(&model, graph, Some(plan), d, &name, threads)
                .map_err(|err| QatError::Data(format!("{err:#}")))?;
            per_epoch.push(t);
        }
        Ok(())
    };
    let (g, p) = (&calibrated.graph, &calibrated.plan);
    let trained = match &validation {
        Some(v) => train_validated(
            g,
            p,
            &train_set,
            v,
            &config,
            &mut show_progress,
            &mut score_epoch,
        ),
        None => train_with_epochs(
            g,
            p,
            &train_set,
            &config,
            &mut show_progress,
            &mut score_epoch,
        ),
    }
    .with_context(|| format!("training {}", args.model.display()))?;
    let train_seconds = train_start.elapsed().as_secs_f64();
    let storage = crate::quantize::weight_storage(args.float_weights);
    let out = model.with_graph(
        insert_qdq(&trained.graph, &trained.plan, storage)?,
        model.opset.max(13),
    );
    qint8_graph::onnx::save(&out, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if let Some(p) = &args.plan {
        if let Err(e) = trained.plan.save(p) {
            // No half-finished set of outputs.
            let _ = std::fs::remove_file(&args.output);
            return Err(anyhow::Error::new(e).context(format!("writing {}", p.display())));
        }
    }
    let scores = match &eval {
        Some(d) => {
            let fp32 = top1(&model, &calibrated.graph, None, d, "FP32", threads)?;
            let before = top1(
                &model,
                &calibrated.graph,
                Some(&calibrated.plan),
                d,
                "INT8 as calibrated",
                threads,
            )?;
            // The written model: the kept epoch's, or the calibrated one.
            let after = match trained.kept_epoch {
                0 => before,
                k => per_epoch.get(k - 1).copied().unwrap_or(f64::NAN),
            };
            Some((fp32, before, after))
        }
        None => None,
    };
    let epochs: Vec<_> = trained
        .epochs
        .iter()
        .map(|e| {
            json!({
                "epoch": e.epoch,
                "loss": e.loss,
                "train_top1": e.top1 * 100.0,
                "data_top1": per_epoch.get(e.epoch - 1).map(|t| t * 100.0),
                "validation_top1": e.validation.map(|v| v.top1 * 100.0),
                "validation_loss": e.validation.map(|v| v.loss),
                "seconds": e.seconds,
            })
        })
        .collect();
    if args.json {
        let summary = json!({
            "model": args.model.display().to_string(),
            "output": args.output.display().to_string(),
            "method": trained.plan.method,
            "calibration_images": calib.len(),
            "training_images": train_set.len(),
            "epochs": epochs,
            "validation_images": val_set.as_ref().map(ImageDataset::len),
            "calibrated_validation_top1": trained.calibrated_validation.map(|v| v.top1 * 100.0),
            "calibrated_validation_loss": trained.calibrated_validation.map(|v| v.loss),
            "kept_epoch": trained.kept_epoch,
            "training_seconds": train_seconds,
            "total_seconds": start.elapsed().as_secs_f64(),
            "evaluation_images": eval.as_ref().map(ImageDataset::len),
            "fp32_top1": scores.map(|s| s.0 * 100.0),
            "int8_calibrated_top1": scores.map(|s| s.1 * 100.0),
            "int8_trained_top1": scores.map(|s| s.2 * 100.0),
        });
        println!("{summary}");
        return Ok(());
    }
    println!(
        "{} -> {}: trained {} epoch(s) on {} images in {:.1} s ({} activations, {} weights quantized, {})",
        args.model.display(),
        args.output.display(),
        trained.epochs.len(),
        train_set.len(),
        train_seconds,
        trained.plan.activations.len(),
        trained.plan.weights.len(),
        trained.plan.method,
    );
    let on_val = |v: &qint8_qat::ValidationScore| {
        format!(", on --val {:.2}% (loss {:.4})", v.top1 * 100.0, v.loss)
    };
    if let Some(v) = &trained.calibrated_validation {
        println!("  as calibrated{}", on_val(v));
    }
    for e in &trained.epochs {
        let mut scored = e.validation.as_ref().map(on_val).unwrap_or_default();
        if let Some(t) = per_epoch.get(e.epoch - 1) {
            scored += &format!(", on --data {:.2}%", t * 100.0);
        }
        println!(
            "  epoch {}: loss {:.4}, top-1 while training {:.2}%{scored} ({:.1} s)",
            e.epoch,
            e.loss,
            e.top1 * 100.0,
            e.seconds
        );
    }
    if let Some(n) = val_set.as_ref().map(ImageDataset::len) {
        if trained.epochs.len() < args.epochs {
            println!(
                "  stopped after epoch {}: {} epoch(s) without a better score on --val",
                trained.epochs.len(),
                args.patience.unwrap_or_default()
            );
        }
        match trained.kept_epoch {
            0 => println!(
                "wrote the calibrated model: no epoch beat it on the {n} validation images"
            ),
            k => println!("wrote the model of epoch {k}, the best on the {n} validation images"),
        }
    }
    if let (Some((fp32, before, after)), Some(d)) = (scores, &eval) {
        println!("top-1 on {} images of --data:", d.len());
        let written = match trained.kept_epoch {
            0 => "INT8 written (as calibrated)".to_string(),
            k if k < trained.epochs.len() => format!("INT8 trained (epoch {k})"),
            _ => "INT8 trained".to_string(),
        };
        let width = written.len().max(18);
        println!("  {:<width$}  {:6.2}%", "FP32", fp32 * 100.0);
        for (label, t) in [("INT8 as calibrated", before), (written.as_str(), after)] {
            println!(
                "  {label:<width$}  {:6.2}%  (drop {:.2} points)",
                t * 100.0,
                (fp32 - t) * 100.0
            );
        }
    }
    Ok(())
}
