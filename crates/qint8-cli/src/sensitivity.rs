//! `qint8 sensitivity` and `qint8 mixed-precision`: which layer hurts, and
//! the fewest float layers for an accuracy budget.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qint8_analysis::report::{write_atomic, z_text};
use qint8_analysis::sensitivity::{
    analyze, mixed_precision, with_float_nodes, Method, Outcome, Sensitivity,
};
use qint8_analysis::svg::{Chart, Series, PALETTE};
use qint8_calibration::{calibrate, match_node_patterns, ImageDataset};
use qint8_graph::quant::{
    float_from_qdq, insert_qdq, restore_float_weights, Precision, QuantPlan, RestoredWeights,
    WeightStorage,
};
use qint8_graph::{Graph, Model, Op};
use serde_json::json;

use crate::cli::{AnalysisArgs, MixedPrecisionArgs, SensitivityArgs};
use crate::compare::status;
use crate::data::{label_with_predictions, open_calibration, open_scored, FP32_LABELS_HINT};
use crate::format::{Align, Table};
use crate::inspect::load_model;

/// A QDQ model's reference.
struct Imported {
    /// Integer initializers the file dequantizes (weights and biases).
    integer: usize,
    /// With --fp32: the nodes given their FP32 weights back, and those
    /// that keep the file's (with the reason).
    restored: Option<RestoredWeights>,
}

/// Everything both commands start from.
struct Prepared {
    model: Model,
    /// The float graph the plan names tensors of: the calibrated one, or
    /// the one a QDQ model encodes.
    graph: Graph,
    plan: QuantPlan,
    /// For a QDQ model, what the reference computes with.
    imported: Option<Imported>,
    /// All evaluation images (with --fp32-labels, labeled only for
    /// `mixed-precision`, which scores them).
    eval: ImageDataset,
    /// The sensitivity subset.
    subset: ImageDataset,
    show: bool,
}

/// `verify`: whether the evaluation images are scored (`mixed-precision`).
fn prepare(a: &AnalysisArgs, threads: usize, verify: bool) -> Result<Prepared> {
    let model = load_model(&a.model)?;
    let qdq = model.graph.nodes.iter().any(|n| {
        matches!(
            n.op,
            Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. }
        )
    });
    if !qdq && a.fp32.is_some() {
        bail!(
            "--fp32 names the FP32 model of a QDQ model; {} is not quantized",
            a.model.display()
        );
    }
    if qdq && a.cal.calib.calib.is_some() {
        bail!(
            "{} is quantized already (it has QuantizeLinear/DequantizeLinear nodes): its own quantization is analyzed, so leave out --calib",
            a.model.display()
        );
    }
    let calib = match qdq {
        true => None,
        false => Some(open_calibration(&a.cal.calib, &a.pre, &model)?.dataset),
    };
    // With --fp32-labels, labels come from FP32 once the graph is known.
    let open = |path: &Path, labels: Option<&Path>| -> Result<ImageDataset> {
        Ok(open_scored(path, labels, &a.pre, None, a.fp32_labels, FP32_LABELS_HINT)?.dataset)
    };
    let eval = open(&a.data, a.labels.as_deref())?;
    if eval.is_empty() {
        bail!("{}: no images to evaluate", a.data.display());
    }
    let pool = match &a.sensitivity_data {
        Some(d) => open(d, None)?,
        None => eval.clone(),
    };
    let n = a.sensitivity_images.min(pool.len());
    let subset = match a.sensitivity_seed {
        Some(seed) => pool.sample(n, seed)?,
        None => pool.take(n)?,
    };
    let show = !a.json && std::io::stderr().is_terminal();
    let Some(calib) = calib else {
        let (graph, plan, imported) = read_quantized(a, &model)?;
        return Prepared {
            model,
            graph,
            plan,
            imported: Some(imported),
            eval,
            subset,
            show,
        }
        .labeled(a, threads, verify);
    };
    let cfg = a.cal.config(a.batch, threads)?;
    let calibrated = calibrate(&model.graph, &calib, &cfg, &mut |p| {
        status(
            show,
            &format!(
                "calibrating: pass {}/{} {}/{}",
                p.pass, p.passes, p.done, p.total
            ),
        )
    })
    .with_context(|| format!("calibrating {}", a.model.display()))?;
    Prepared {
        model,
        graph: calibrated.graph,
        plan: calibrated.plan,
        imported: None,
        eval,
        subset,
        show,
    }
    .labeled(a, threads, verify)
}

impl Prepared {
    /// With --fp32-labels, the sensitivity images and, with `verify`, the
    /// evaluation images labeled with the predictions of the FP32
    /// reference the analysis compares against (the float graph, as
    /// calibrated or as the QDQ file encodes it); as they are otherwise.
    /// (`sensitivity` evaluates only the sensitivity images.)
    fn labeled(mut self, a: &AnalysisArgs, threads: usize, verify: bool) -> Result<Self> {
        if !a.fp32_labels {
            return Ok(self);
        }
        let reference = self.model.with_graph(self.graph.clone(), self.model.opset);
        let show = self.show;
        // Each set moves through the labeling (no copy of its images).
        let label = |data: ImageDataset, what: &str| {
            let n = data.len();
            label_with_predictions(
                &reference,
                "the FP32 reference",
                data,
                &format!("the {what}"),
                a.batch,
                threads,
                &mut |done| status(show, &format!("fp32 labels of the {what}: {done}/{n}")),
            )
        };
        self.subset = label(self.subset, "sensitivity images")?;
        if verify {
            self.eval = label(self.eval, "data")?;
        }
        Ok(self)
    }
}

/// With --fp32-labels, a line saying what top-1 means (empty otherwise).
fn labels_line(a: &AnalysisArgs) -> &'static str {
    match a.fp32_labels {
        true => "top-1 is scored against FP32's predictions (--fp32-labels): it is agreement with FP32\n",
        false => "",
    }
}

/// What the top-1 figures count, for the JSON.
fn scored_against(a: &AnalysisArgs) -> &'static str {
    match a.fp32_labels {
        true => "fp32 predictions",
        false => "labels",
    }
}

/// A QDQ model's float graph and plan (with --keep-float applied), and
/// with --fp32 its FP32 weights put back.
fn read_quantized(a: &AnalysisArgs, model: &Model) -> Result<(Graph, QuantPlan, Imported)> {
    let (mut graph, plan) = float_from_qdq(&model.graph)
        .with_context(|| format!("reading the quantization of {}", a.model.display()))?;
    // --keep-float among the nodes the file quantizes.
    let patterns: BTreeSet<String> = a.cal.keep_float.iter().cloned().collect();
    let quantized: Vec<&str> = graph
        .nodes
        .iter()
        .filter(|n| plan.precision_of(&n.name) == Precision::Int8)
        .filter(|n| {
            n.inputs
                .iter()
                .any(|i| plan.activations.contains_key(i) || plan.weights.contains_key(i))
        })
        .map(|n| n.name.as_str())
        .collect();
    let kept = match_node_patterns(&quantized, &patterns, "")
        .with_context(|| format!("--keep-float on {}", a.model.display()))?;
    let plan = with_float_nodes(&graph, &plan, kept.iter().map(String::as_str));
    let restored = match &a.fp32 {
        Some(path) => {
            let mut fp32 = load_model(path)?.graph;
            qint8_graph::passes::simplify(&mut fp32)
                .with_context(|| format!("simplifying {}", path.display()))?;
            let r = restore_float_weights(&mut graph, &plan, &fp32)?;
            if r.restored.is_empty() {
                bail!(
                    "no weight of {} rounds to {}'s integers: is it the model that was quantized? (first node: {})",
                    path.display(),
                    a.model.display(),
                    r.kept
                        .first()
                        .map(|(n, why)| format!("{n}: {why}"))
                        .unwrap_or_else(|| "none has a quantized weight".into())
                );
            }
            Some(r)
        }
        None => None,
    };
    let integer = model
        .graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::DequantizeLinear { .. }))
        .filter_map(|n| n.input(0).and_then(|x| model.graph.initializers.get(x)))
        .filter(|t| t.as_f32().is_none())
        .count();
    Ok((graph, plan, Imported { integer, restored }))
}

/// For a QDQ model, a line saying where the quantization came from and
/// what the reference is (empty for a calibrated one).
fn imported_line(p: &Prepared) -> String {
    let Some(im) = &p.imported else {
        return String::new();
    };
    match (&im.restored, im.integer) {
        (None, 0) => "quantization read from the file; its weights are stored in float, so the reference is the FP32 network\n".into(),
        (None, n) => format!(
            "quantization read from the file; it stores {n} weights or biases as integers, so the reference (\"fp32\") computes with them dequantized and their rounding is not measured (--fp32 gives the FP32 weights back)\n"
        ),
        (Some(r), _) => {
            let mut line = format!(
                "quantization read from the file; the FP32 weights of {} nodes from --fp32",
                r.restored.len()
            );
            match r.kept.len() {
                0 => line.push('\n'),
                k => {
                    line.push_str(&format!(
                        "; {k} keep the file's dequantized weights, the reference computing with them:\n"
                    ));
                    for (n, why) in &r.kept {
                        line.push_str(&format!("  {n}: {why}\n"));
                    }
                }
            }
            line
        }
    }
}

/// The JSON fields that say where the quantization came from.
fn imported_json(p: &Prepared) -> serde_json::Value {
    let im = p.imported.as_ref();
    json!({
        "quantization": if im.is_some() { "read from the file" } else { "calibrated" },
        "integer_initializers": im.map(|i| i.integer),
        "fp32_weights": im.and_then(|i| i.restored.as_ref()).map(|r| json!({
            "restored": r.restored,
            "kept": r.kept.iter().map(|(n, why)| json!({"node": n, "why": why})).collect::<Vec<_>>(),
        })),
    })
}

/// The nodes --keep-float put in float, and how many of them are
/// Conv/Gemm/MatMul nodes (the kind the analyses count).
fn kept_float(p: &Prepared) -> (Vec<String>, usize) {
    let g = &p.graph;
    let kept: Vec<String> = p.plan.precision.keys().cloned().collect();
    let counted = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_) | Op::Gemm { .. } | Op::MatMul))
        .filter(|n| kept.contains(&n.name))
        .count();
    (kept, counted)
}

fn measure(p: &Prepared, a: &AnalysisArgs, split: bool, threads: usize) -> Result<Sensitivity> {
    let show = p.show;
    let (method, unit) = if a.exact {
        (Method::Exact, "configurations")
    } else {
        (Method::Linearized, "images")
    };
    Ok(analyze(
        &p.model,
        &p.graph,
        &p.plan,
        &p.subset,
        method,
        a.batch,
        threads,
        split,
        &mut |done, total| status(show, &format!("sensitivity: {done}/{total} {unit}")),
    )?)
}

/// Runs `qint8 sensitivity`.
pub(crate) fn sensitivity_main(args: &SensitivityArgs, threads: usize) -> Result<()> {
    let a = &args.common;
    let p = prepare(a, threads, false)?;
    let s = measure(&p, a, args.split, threads)?;
    if p.show {
        eprint!("\r{}\r", " ".repeat(78));
    }
    let order = s.ranking();
    let stem = a
        .model
        .file_stem()
        .map(|x| x.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let chart_path = args
        .chart
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{stem}-sensitivity.svg")));
    let on = s.measured_on();
    let chart = s.chart(&stem, 25);
    write_atomic(&chart_path, &chart.to_svg())?;
    let ratio = s.seconds / s.eval_seconds.max(1e-9);
    let (kept, kept_counted) = kept_float(&p);
    if a.json {
        let nodes: Vec<serde_json::Value> = order
            .iter()
            .enumerate()
            .map(|(rank, &i)| {
                let n = &s.nodes[i];
                json!({
                    "rank": rank + 1,
                    "node": n.node,
                    "op": n.op,
                    "float_alone": outcome_json(&n.float),
                    "quantized_alone": outcome_json(&n.alone),
                    "output_sqnr_db": n.output_sqnr_db,
                    "top_set_z": n.top_set_z,
                    "split": n.split.map(|x| json!({
                        "weights": outcome_json(&x.weights),
                        "activations": outcome_json(&x.activations),
                    })),
                })
            })
            .collect();
        let v = json!({
            "model": a.model.display().to_string(),
            "method": p.plan.method,
            "source": imported_json(&p),
            "analysis": if a.exact { "exact" } else { "linearized" },
            "measured_on": on,
            "images": s.images,
            "scored_against": scored_against(a),
            "fp32_top1": s.fp32_top1,
            "int8": outcome_json(&s.int8),
            "seconds": s.seconds,
            "eval_seconds": s.eval_seconds,
            "chart": chart_path.display().to_string(),
            "kept_float": kept,
            "nodes": nodes,
        });
        return crate::print_stdout(&format!("{v}\n"));
    }
    let mut columns = vec![
        ("rank", Align::Right),
        ("node", Align::Left),
        ("op", Align::Left),
        ("alone int8: JS", Align::Right),
        ("± s.e.", Align::Right),
        ("KL", Align::Right),
        ("SQNR dB", Align::Right),
        ("drop pp", Align::Right),
        ("alone float: top-1 %", Align::Right),
        ("recovered pp", Align::Right),
        ("node output SQNR dB", Align::Right),
        ("top-k apart, z", Align::Right),
    ];
    if args.split {
        columns.extend([
            ("weights only: JS", Align::Right),
            ("activations only: JS", Align::Right),
        ]);
    }
    let mut t = Table::new(&columns);
    for (rank, &i) in order.iter().enumerate() {
        let n = &s.nodes[i];
        let mut row = vec![
            (rank + 1).to_string(),
            n.node.clone(),
            n.op.to_string(),
            format!("{:.2e}", n.alone.js),
            format!("{:.1e}", n.alone.js_stderr),
            format!("{:.2e}", n.alone.kl),
            format!("{:.1}", n.alone.sqnr_db),
            format!("{:.2}", (s.fp32_top1 - n.alone.top1) * 100.0),
            format!("{:.2}", n.float.top1 * 100.0),
            format!("{:+.2}", (n.float.top1 - s.int8.top1) * 100.0),
            n.output_sqnr_db
                .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            n.top_set_z.map_or_else(|| "-".into(), z_text),
        ];
        if args.split {
            let js =
                |o: Option<&Outcome>| o.map_or_else(|| "-".into(), |o| format!("{:.2e}", o.js));
            row.push(js(n.split.as_ref().map(|x| &x.weights)));
            row.push(js(n.split.as_ref().map(|x| &x.activations)));
        }
        t.row(row);
    }
    let how = match s.method {
        Method::Linearized => "first-order estimates (one recorded FP32 pass, one backward pass of the top-2 margin); SQNR and divergences of that margin".to_string(),
        Method::Exact => format!("{} real evaluations; SQNR and divergences of the logits", 1 + 2 * s.nodes.len()),
    };
    // Conv/Gemm/MatMul nodes, as the analysis counts (a QDQ model's float
    // Adds are not).
    let kept_line = match kept_counted {
        0 => String::new(),
        k => format!(" (and {k} kept in float by --keep-float or the file, not analyzed)"),
    };
    let text = format!(
        "{}{}{} ({}), {} images: fp32 top-1 {:.2}%, int8 {:.2}% ({on} SQNR {:.1} dB, KL {:.2e}, JS {:.2e})\n\
         {} nodes{kept_line}, {how}\n\
         analysis {:.1} s = {:.1}x one evaluation of the quantized model on these images ({:.2} s)\n\n{}\n{}\nchart: {}\n",
        imported_line(&p),
        labels_line(a),
        a.model.display(),
        p.plan.method,
        s.images,
        s.fp32_top1 * 100.0,
        s.int8.top1 * 100.0,
        s.int8.sqnr_db,
        s.int8.kl,
        s.int8.js,
        s.nodes.len(),
        s.seconds,
        ratio,
        s.eval_seconds,
        t.render(0),
        resolved_note(&s),
        chart_path.display()
    );
    crate::print_stdout(&text)
}

/// The table's `z` column explained, and which top sets of up to 10
/// nodes these images resolve.
fn resolved_note(s: &Sensitivity) -> String {
    format!(
        "top-k apart, z: the smallest paired difference in JS, image by image, between a node ranked k or higher and one ranked below, in standard errors.\n{}",
        s.resolved_text(2.0, 10)
    )
}

/// One configuration's figures in the JSON.
fn outcome_json(o: &Outcome) -> serde_json::Value {
    json!({"top1": o.top1, "sqnr_db": o.sqnr_db, "kl": o.kl, "js": o.js, "js_stderr": o.js_stderr})
}

/// Runs `qint8 mixed-precision`.
pub(crate) fn mixed_precision_main(args: &MixedPrecisionArgs, threads: usize) -> Result<()> {
    let start = Instant::now();
    let a = &args.common;
    if let Some(d) = args.max_drop {
        if !(d.is_finite() && d >= 0.0) {
            bail!("--max-drop must be a number of points >= 0, got {d}");
        }
    }
    let p = prepare(a, threads, true)?;
    let s = measure(&p, a, false, threads)?;
    let show = p.show;
    let n = p.eval.len();
    // Curves count every Conv/Gemm/MatMul node in float, --keep-float's too.
    let (kept, kept_counted) = kept_float(&p);
    let m = mixed_precision(
        &p.model,
        &p.graph,
        &p.plan,
        &s,
        &p.subset,
        &p.eval,
        args.max_drop.map(|d| d / 100.0),
        args.max_float.unwrap_or((s.nodes.len() / 10).max(1)),
        args.candidates,
        a.batch,
        threads,
        &mut |c| {
            status(
                show,
                &format!(
                    "verifying: {} nodes in float: top-1 {:.2}% on {n} images",
                    c.float_nodes + kept_counted,
                    c.top1 * 100.0
                ),
            )
        },
    )?;
    if show {
        eprint!("\r{}\r", " ".repeat(78));
    }
    let graph = insert_qdq(&p.graph, &m.plan, WeightStorage::Int8)?;
    let out = p.model.with_graph(graph, p.model.opset.max(13));
    let chart_path = args
        .chart
        .clone()
        .unwrap_or_else(|| args.output.with_extension("svg"));
    let chart = Chart {
        title: format!("top-1 against nodes kept in float ({n} images)"),
        x_label: "nodes in float (most sensitive first)".into(),
        y_label: "top-1 %".into(),
        series: vec![Series {
            name: "int8 with k nodes in float".into(),
            points: m
                .curve
                .iter()
                .map(|c| ((c.float_nodes + kept_counted) as f64, c.top1 * 100.0))
                .collect(),
            color: PALETTE[0].into(),
            filled: false,
        }],
        reference: Some(("fp32".into(), m.fp32_top1 * 100.0)),
        ..Default::default()
    };
    // Every file of the run or none.
    qint8_graph::onnx::save(&out, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if let Err(e) = write_atomic(&chart_path, &chart.to_svg()) {
        let _ = std::fs::remove_file(&args.output);
        return Err(e.into());
    }
    if let Some(path) = &args.plan {
        if let Err(e) = m.plan.save(path) {
            let _ = std::fs::remove_file(&args.output);
            let _ = std::fs::remove_file(&chart_path);
            return Err(anyhow::Error::from(e).context(format!("writing {}", path.display())));
        }
    }
    let quantizable = s.nodes.len() + kept_counted;
    if a.json {
        let v = json!({
            "model": a.model.display().to_string(),
            "output": args.output.display().to_string(),
            "chart": chart_path.display().to_string(),
            "method": p.plan.method,
            "source": imported_json(&p),
            "images": n,
            "sensitivity_images": s.images,
            "scored_against": scored_against(a),
            "fp32_top1": m.fp32_top1,
            "top1": m.top1,
            "drop_pp": (m.fp32_top1 - m.top1) * 100.0,
            "max_drop_pp": args.max_drop,
            "met": m.met,
            "float_nodes": m.float_nodes,
            "float_residual_adds": m.float_adds.concat(),
            "kept_float": kept,
            "quantizable_nodes": quantizable,
            "curve": m.curve.iter().map(|c| json!({"float_nodes": c.float_nodes + kept_counted, "top1": c.top1})).collect::<Vec<_>>(),
            "search_order": m.order,
            "candidates": args.candidates,
            "seconds": start.elapsed().as_secs_f64(),
        });
        return crate::print_stdout(&format!("{v}\n"));
    }
    let mut t = Table::new(&[
        ("nodes in float", Align::Right),
        ("top-1 %", Align::Right),
        ("drop pp", Align::Right),
    ]);
    for c in &m.curve {
        t.row(vec![
            (c.float_nodes + kept_counted).to_string(),
            format!("{:.2}", c.top1 * 100.0),
            format!("{:.2}", (m.fp32_top1 - c.top1) * 100.0),
        ]);
    }
    let budget = match args.max_drop {
        Some(d) => format!("budget {d} pp: {}", if m.met { "met" } else { "NOT met" }),
        None => "best reachable".into(),
    };
    let by_flag = match kept_counted {
        0 => String::new(),
        k => format!(" ({k} of them by --keep-float)"),
    };
    let mut text = format!(
        "{}{}{} -> {}: {} of {} Conv/Gemm/MatMul nodes in float{by_flag}; verified top-1 {:.2}% vs fp32 {:.2}% on {n} images (drop {:.2} pp; {budget})\n",
        imported_line(&p),
        labels_line(a),
        a.model.display(),
        args.output.display(),
        m.float_nodes.len() + kept_counted,
        quantizable,
        m.top1 * 100.0,
        m.fp32_top1 * 100.0,
        (m.fp32_top1 - m.top1) * 100.0,
    );
    for k in &kept {
        text.push_str(&format!("  float (--keep-float): {k}\n"));
    }
    for (f, adds) in m.float_nodes.iter().zip(&m.float_adds) {
        text.push_str(&format!("  float: {f}\n"));
        for add in adds {
            text.push_str(&format!("    and the residual Add it fuses: {add}\n"));
        }
    }
    text.push_str(&format!(
        "\n{}\nchart: {}\n",
        t.render(0),
        chart_path.display()
    ));
    crate::print_stdout(&text)
}
