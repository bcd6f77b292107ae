//! `qint8 inspect`: what a model is made of and what running it costs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;
use qint8_graph::proto::{ModelProto, TensorProto};
use qint8_graph::{Model, ValueInfo};
use qint8_runtime::{PlanStats, Session, SessionOptions};
use serde_json::json;

use crate::cli::InspectArgs;
use crate::format::{self, Align, Table};

/// A model file and the files it depends on.
#[derive(Debug, Clone)]
pub(crate) struct LoadedModel {
    /// The model.
    pub(crate) model: Model,
    /// Size of the `.onnx` file in bytes.
    pub(crate) file_bytes: u64,
    /// External data files the model references, with their sizes.
    pub(crate) external: Vec<(PathBuf, u64)>,
}

/// Loads a model, reporting failures with the file's name.
pub(crate) fn load_model(path: &Path) -> Result<Model> {
    qint8_graph::onnx::load(path).with_context(|| format!("loading model {}", path.display()))
}

/// Loads a model and measures its files (the `.onnx` file and every
/// external data file its tensors reference).
pub(crate) fn load_model_with_files(path: &Path) -> Result<LoadedModel> {
    let context = || format!("loading model {}", path.display());
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading {}", path.display()))
        .with_context(context)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let model = qint8_graph::onnx::decode_model(&bytes, &dir, path).with_context(context)?;
    // The model decoded above, so the protobuf decodes too; external files
    // that do not follow the convention are skipped rather than fatal.
    let mut locations = BTreeSet::new();
    if let Ok(proto) = ModelProto::decode(bytes.as_slice()) {
        if let Some(g) = &proto.graph {
            let attr_tensors = g
                .node
                .iter()
                .flat_map(|n| n.attribute.iter())
                .filter_map(|a| a.t.as_ref());
            for t in g.initializer.iter().chain(attr_tensors) {
                if let Some(loc) = external_location(t) {
                    locations.insert(loc);
                }
            }
        }
    }
    let external = locations
        .into_iter()
        .map(|loc| {
            let p = dir.join(loc);
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, size)
        })
        .collect();
    Ok(LoadedModel {
        model,
        file_bytes: bytes.len() as u64,
        external,
    })
}

fn external_location(t: &TensorProto) -> Option<String> {
    t.external_data
        .iter()
        .find(|e| e.key == "location")
        .map(|e| e.value.clone())
}

/// Compiles the plan for batch 1 (every symbolic dimension set to 1).
fn plan_stats(model: &Model, threads: usize) -> Result<PlanStats> {
    let session = Session::new(
        model,
        SessionOptions {
            threads,
            ..Default::default()
        },
    )?;
    let shapes: Vec<(String, Vec<usize>)> = session
        .graph()
        .inputs
        .iter()
        .map(|v| {
            v.concrete_shape(1)
                .map(|s| (v.name.clone(), s))
                .with_context(|| format!("input {} has no declared shape", v.name))
        })
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &[usize])> = shapes
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    Ok(session.plan(&refs)?.stats())
}

/// Operator counts, most frequent first (ties by name).
fn sorted_op_counts(model: &Model) -> Vec<(&'static str, usize)> {
    let mut v: Vec<_> = model.graph.op_counts().into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v
}

fn io_table(values: &[ValueInfo]) -> String {
    let mut t = Table::new(&[
        ("name", Align::Left),
        ("dtype", Align::Left),
        ("shape", Align::Left),
    ]);
    for v in values {
        t.row(vec![
            v.name.clone(),
            format::dtype(v.dtype),
            format::shape(v),
        ]);
    }
    t.render(2)
}

fn io_json(values: &[ValueInfo]) -> serde_json::Value {
    values
        .iter()
        .map(|v| json!({ "name": v.name, "dtype": format::dtype(v.dtype), "shape": format::shape_json(v) }))
        .collect()
}

/// Runs `qint8 inspect`.
///
/// A model that loads but whose batch-1 plan does not compile is still
/// described (the plan section shows the error), then the command fails.
pub(crate) fn main(args: &InspectArgs, threads: usize) -> Result<()> {
    let loaded = load_model_with_files(&args.model)?;
    let model = &loaded.model;
    let g = &model.graph;
    let plan = plan_stats(model, threads);
    let total_file_bytes = loaded.file_bytes + loaded.external.iter().map(|e| e.1).sum::<u64>();
    let ops = sorted_op_counts(model);

    let text = if args.json {
        let plan_json = match &plan {
            Ok(s) => json!({
                "batch": 1,
                "steps": s.steps,
                "peak_activation_bytes": s.peak_activation_bytes(),
                "arena_bytes": s.arena_bytes,
                "scratch_bytes": s.scratch_bytes,
                "unshared_bytes": s.unshared_bytes,
                "constant_bytes": s.constant_bytes,
            }),
            Err(_) => serde_json::Value::Null,
        };
        let op_counts: serde_json::Map<String, serde_json::Value> = ops
            .iter()
            .map(|(op, n)| (op.to_string(), json!(n)))
            .collect();
        let v = json!({
            "model": args.model.display().to_string(),
            "producer_name": model.producer_name,
            "producer_version": model.producer_version,
            "opset": model.opset,
            "ir_version": model.ir_version,
            "inputs": io_json(&g.inputs),
            "outputs": io_json(&g.outputs),
            "nodes": g.nodes.len(),
            "op_counts": op_counts,
            "parameters": g.parameter_count(),
            "initializer_bytes": g.initializer_bytes(),
            "file_bytes": loaded.file_bytes,
            "external_data": loaded.external.iter().map(|(p, n)| json!({ "path": p.display().to_string(), "bytes": n })).collect::<Vec<_>>(),
            "total_file_bytes": total_file_bytes,
            "plan": plan_json,
            "plan_error": plan.as_ref().err().map(|e| format!("{e:#}")),
        });
        format!("{v}\n")
    } else {
        let producer = format!("{} {}", model.producer_name, model.producer_version);
        let mut pairs = vec![
            ("model", args.model.display().to_string()),
            ("producer", producer.trim().to_string()),
            ("opset", model.opset.to_string()),
            ("IR version", model.ir_version.to_string()),
            ("file size", format::bytes(loaded.file_bytes as usize)),
        ];
        for (p, n) in &loaded.external {
            pairs.push((
                "external data",
                format!("{} {}", p.display(), format::bytes(*n as usize)),
            ));
        }
        if !loaded.external.is_empty() {
            pairs.push(("total on disk", format::bytes(total_file_bytes as usize)));
        }
        pairs.extend([
            ("nodes", format::group(g.nodes.len())),
            ("parameters", format::group(g.parameter_count())),
            ("initializer bytes", format::bytes(g.initializer_bytes())),
        ]);
        let mut s = format::key_values(&pairs);
        s.push_str("\ninputs\n");
        s.push_str(&io_table(&g.inputs));
        s.push_str("\noutputs\n");
        s.push_str(&io_table(&g.outputs));
        s.push_str("\noperators\n");
        let mut t = Table::new(&[("op", Align::Left), ("count", Align::Right)]);
        for (op, n) in &ops {
            t.row(vec![op.to_string(), format::group(*n)]);
        }
        t.row(vec!["total".into(), format::group(g.nodes.len())]);
        s.push_str(&t.render(2));
        s.push_str("\nplan at batch 1 (symbolic dimensions = 1)\n");
        match &plan {
            Ok(p) => {
                let kv = format::key_values(&[
                    ("steps", format::group(p.steps)),
                    ("peak activation", format::bytes(p.peak_activation_bytes())),
                    ("  arena", format::bytes(p.arena_bytes)),
                    ("  scratch", format::bytes(p.scratch_bytes)),
                    ("  without reuse", format::bytes(p.unshared_bytes)),
                    ("constants", format::bytes(p.constant_bytes)),
                ]);
                for line in kv.lines() {
                    s.push_str("  ");
                    s.push_str(line);
                    s.push('\n');
                }
            }
            Err(e) => s.push_str(&format!("  not compiled: {e:#}\n")),
        }
        s
    };
    crate::print_stdout(&text)?;
    plan.map(|_| ()).with_context(|| {
        format!(
            "{}: compiling the plan for batch 1 failed",
            args.model.display()
        )
    })
}
