//! `qint8 eval`: top-1/top-5 accuracy and throughput on an IDX dataset.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::Array1;
use qint8_calibration::dataset::idx::{labels_path_candidates, labels_path_for};
use qint8_calibration::dataset::npy::write_npy_f32;
use qint8_calibration::ImageDataset;
use qint8_runtime::{Session, SessionOptions};
use serde_json::json;

use crate::cli::EvalArgs;
use crate::format;
use crate::inspect::load_model;
use crate::run::check_input_shape;

/// Whether `a` ranks above `b`: larger, with NaN above every number (as
/// `numpy.argmax` treats NaN).
fn above(a: f32, b: f32) -> bool {
    if a.is_nan() {
        !b.is_nan()
    } else {
        !b.is_nan() && a > b
    }
}

/// Whether `a` and `b` rank equal (both NaN, or numerically equal).
fn level(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a == b
}

/// Index of the largest logit; the lowest index wins ties (as `numpy.argmax`).
pub(crate) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate().skip(1) {
        if above(x, row[best]) {
            best = i;
        }
    }
    best
}

/// Rank of class `label` in `row` sorted best first with ties broken by
/// lower index: logits above it plus equal logits at lower indices. The
/// label is a top-k hit when its rank is below k, so a top-1 hit is exactly
/// `argmax(row) == label`, and every label is a top-k hit when there are at
/// most k classes.
pub(crate) fn rank_of(row: &[f32], label: usize) -> usize {
    let x = row[label];
    row.iter()
        .enumerate()
        .filter(|&(j, &y)| above(y, x) || (j < label && level(y, x)))
        .count()
}

/// Counts of correct predictions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Score {
    /// Images seen.
    pub(crate) n: usize,
    /// Top-1 hits.
    pub(crate) top1: usize,
    /// Top-5 hits.
    pub(crate) top5: usize,
}

/// Runs `qint8 eval`.
pub(crate) fn main(args: &EvalArgs, threads: usize) -> Result<()> {
    let total_start = Instant::now();
    let model = load_model(&args.model)?;
    if !args.data.exists() {
        bail!("images file {} not found", args.data.display());
    }
    let labels_path = match &args.labels {
        Some(p) => p.clone(),
        None => find_labels(&args.data)?,
    };
    let preprocess = args.pre.preprocess();
    let mut dataset = ImageDataset::from_idx(&args.data, Some(&labels_path), preprocess)
        .with_context(|| {
            format!(
                "reading images {} with labels {}",
                args.data.display(),
                labels_path.display()
            )
        })?;
    if let Some(limit) = args.limit {
        dataset = dataset.take(limit)?;
    }
    let n = dataset.len();
    let [c, h, w] = dataset.input_shape();

    let g = &model.graph;
    let Some(input) = g.inputs.first() else {
        bail!("{}: the model has no inputs", args.model.display());
    };
    if g.inputs.len() > 1 {
        bail!(
            "{}: the model has {} inputs; qint8 eval feeds exactly one (images)",
            args.model.display(),
            g.inputs.len()
        );
    }
    let input_name = input.name.clone();
    let first_batch = args.batch.min(n);
    check_input_shape(
        input,
        &[first_batch, c, h, w],
        &format!(
            "the data ({} with --pad {})",
            args.data.display(),
            args.pre.pad
        ),
    )?;
    let Some(output) = g.outputs.first() else {
        bail!("{}: the model has no outputs", args.model.display());
    };
    if let Some(dims) = &output.shape {
        if dims.len() != 2 {
            bail!(
                "{}: output {} has shape {}; qint8 eval needs [batch, classes] logits",
                args.model.display(),
                output.name,
                format::dims_text(dims)
            );
        }
    }
    let output_name = output.name.clone();

    let session = Session::new(
        &model,
        SessionOptions {
            threads,
            ..Default::default()
        },
    )
    .with_context(|| format!("preparing {}", args.model.display()))?;
    // Compile the plans (full batch and remainder) before timing, as other
    // runtimes do when they create a session.
    let mut sizes = vec![first_batch];
    if !n.is_multiple_of(args.batch) && n > args.batch {
        sizes.push(n % args.batch);
    }
    for b in sizes {
        session
            .plan(&[(input_name.as_str(), &[b, c, h, w])])
            .with_context(|| {
                format!(
                    "compiling {} for input shape {}",
                    args.model.display(),
                    format::usize_dims(&[b, c, h, w])
                )
            })?;
    }

    let progress = !args.json && std::io::stderr().is_terminal();
    let mut score = Score::default();
    let mut predictions = Vec::with_capacity(if args.predictions.is_some() { n } else { 0 });
    let mut classes = 0;
    let loop_start = Instant::now();
    for batch in dataset.batches(args.batch) {
        let batch = batch.with_context(|| format!("reading {}", args.data.display()))?;
        let outputs = session
            .run(&[(input_name.as_str(), batch.inputs.view())])
            .with_context(|| {
                format!(
                    "running {} on images {}..{}",
                    args.model.display(),
                    batch.start,
                    batch.start + batch.len()
                )
            })?;
        let Some(logits) = outputs.first() else {
            bail!("{}: the model produced no outputs", args.model.display());
        };
        let shape = logits.shape();
        if shape.len() != 2 || shape[0] != batch.len() || shape[1] == 0 {
            bail!(
                "{}: output {} has shape {} for a batch of {}; qint8 eval needs [batch, classes] logits",
                args.model.display(),
                output_name,
                format::usize_dims(shape),
                batch.len()
            );
        }
        classes = shape[1];
        let labels = batch
            .labels
            .as_deref()
            .context("the dataset has no labels")?;
        let logits = logits
            .as_standard_layout()
            .into_dimensionality::<ndarray::Ix2>()
            .context("logits are not two-dimensional")?;
        for (i, (row, &label)) in logits.outer_iter().zip(labels).enumerate() {
            let row = row.as_slice().context("logits row is not contiguous")?;
            if label >= classes {
                bail!(
                    "{}: image {} has label {label}, but the model has only {classes} classes",
                    labels_path.display(),
                    batch.start + i
                );
            }
            let rank = rank_of(row, label);
            score.n += 1;
            score.top1 += usize::from(rank < 1);
            score.top5 += usize::from(rank < 5);
            if args.predictions.is_some() {
                predictions.push(argmax(row));
            }
        }
        if progress {
            eprint!("\reval {}/{} images", score.n, n);
            let _ = std::io::stderr().flush();
        }
    }
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
            "labels": labels_path.display().to_string(),
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
            "pad": args.pre.pad,
            "mean": short_f64(&args.pre.mean),
            "std": short_f64(&args.pre.std),
            "input_shape": [c, h, w],
        });
        format!("{v}\n")
    } else {
        format::key_values(&[
            ("model", args.model.display().to_string()),
            ("images", args.data.display().to_string()),
            ("labels", labels_path.display().to_string()),
            (
                "n",
                format!(
                    "{} images of {c}x{h}x{w} (pad {}), {classes} classes",
                    format::group(score.n),
                    args.pre.pad
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
            ("threads", session.threads().to_string()),
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

/// The labels file beside `images`, or an error listing where it was sought.
fn find_labels(images: &std::path::Path) -> Result<PathBuf> {
    if let Some(p) = labels_path_for(images) {
        return Ok(p);
    }
    let tried: Vec<String> = labels_path_candidates(images)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if tried.is_empty() {
        bail!(
            "no labels file for {}: its name does not end in -images-idx3-ubyte[.gz], so pass --labels",
            images.display()
        );
    }
    bail!(
        "no labels file for {}: none of {} exists; pass --labels",
        images.display(),
        tried.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        assert_eq!(argmax(&[0.0, f32::NAN, 9.0, f32::NAN]), 1);
    }

    #[test]
    fn ranks_break_ties_by_index() {
        let row = [1.0, 3.0, 3.0, 2.0, 0.5];
        assert_eq!(rank_of(&row, 1), 0);
        assert_eq!(rank_of(&row, 2), 1);
        assert_eq!(rank_of(&row, 3), 2);
        assert_eq!(rank_of(&row, 0), 3);
        assert_eq!(rank_of(&row, 4), 4);
        // A top-1 hit is exactly argmax == label.
        for l in 0..row.len() {
            assert_eq!(rank_of(&row, l) == 0, argmax(&row) == l);
        }
    }

    #[test]
    fn few_classes_make_every_label_a_top5_hit() {
        let row = [0.1, 0.9, -3.0];
        assert!((0..3).all(|l| rank_of(&row, l) < 5));
    }

    #[test]
    fn missing_labels_are_explained() {
        let dir = std::env::temp_dir();
        let e = find_labels(&dir.join("nowhere-images-idx3-ubyte")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("nowhere-labels-idx1-ubyte"), "{msg}");
        let e = find_labels(&dir.join("data.bin")).unwrap_err();
        assert!(format!("{e:#}").contains("--labels"));
    }
}
