//! Choosing each activation's threshold by the error it causes at the
//! model's outputs (`--method auto`).
//!
//! Every histogram method optimizes a proxy on one tensor at a time. Some
//! tensors need the clipping another method would give: on the
//! EfficientNet-B0 fixture the SE-gated inputs of the projection
//! convolutions, whose channels' ranges differ up to 250x under one scale,
//! lose most under entropy, while taking percentile's wider range wherever
//! it exceeds entropy's costs 5 points. This stage starts from the plan of the chosen method and
//! visits the planned activations in graph order; for each it tries the
//! candidate thresholds the histograms already give (entropy, percentile,
//! MSE, max, and the current threshold scaled by 0.7 and 1.4), runs the QDQ
//! graph on a few calibration images, and keeps the candidate with the
//! smallest mean squared error of the outputs against FP32. Each kept
//! change lowers that error, so the result never scores worse than the
//! starting plan on these images. Cost: one evaluation per candidate.

use std::collections::BTreeMap;

use ndarray::ArrayD;
use qint8_graph::quant::{insert_qdq, QuantPlan, WeightStorage};
use qint8_graph::Graph;
use qint8_math::params::QuantParams;
use qint8_runtime::{Session, SessionOptions};

use crate::dataset::Batch;
use crate::error::{CalibError, Result};

/// Factors applied to the starting threshold to make two more candidates.
pub const SCALE_CANDIDATES: [f32; 2] = [0.7, 1.4];

/// Replaces, tensor by tensor in graph order, each activation threshold of
/// `plan` by the candidate in `candidates` (thresholds, turned into
/// parameters by `params(tensor, threshold)`) that gives the smallest
/// output error on `batches`, and returns the final error and the starting
/// one. `shared` maps tensors that reuse another's parameters; they follow
/// it. `progress(done, total)` counts evaluations.
#[allow(clippy::too_many_arguments)]
pub fn choose_thresholds(
    graph: &Graph,
    plan: &mut QuantPlan,
    candidates: &BTreeMap<String, Vec<f32>>,
    params: &dyn Fn(&str, f32) -> Result<QuantParams>,
    shared: &BTreeMap<String, String>,
    batches: &[Batch],
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(f64, f64)> {
    let input = graph
        .inputs
        .first()
        .map(|v| v.name.clone())
        .ok_or_else(|| CalibError::Invalid("the graph has no input".into()))?;
    let opts = SessionOptions {
        threads,
        simplify: false,
        ..Default::default()
    };
    let run = |g: Graph| -> Result<Vec<Vec<ArrayD<f32>>>> {
        let session = Session::from_graph(g, opts)?;
        batches
            .iter()
            .map(|b| Ok(session.run(&[(input.as_str(), b.inputs.view())])?))
            .collect()
    };
    let reference = run(graph.clone())?;
    let error = |plan: &QuantPlan| -> Result<f64> {
        let outputs = run(insert_qdq(graph, plan, WeightStorage::Int8)?)?;
        let (mut sum, mut count) = (0.0f64, 0usize);
        for (ours, theirs) in outputs.iter().zip(&reference) {
            for (a, b) in ours.iter().zip(theirs) {
                for (x, y) in a.iter().zip(b.iter()) {
                    sum += f64::from(x - y).powi(2);
                    count += 1;
                }
            }
        }
        Ok(sum / count.max(1) as f64)
    };
    // Graph order: by the index of the producing node.
    let position = |name: &str| graph.producer(name).unwrap_or(0);
    let mut order: Vec<&String> = candidates
        .keys()
        .filter(|n| plan.activations.contains_key(*n) && !shared.contains_key(*n))
        .collect();
    order.sort_by_key(|n| position(n));
    let total: usize = order.iter().map(|n| candidates[*n].len()).sum();
    let mut done = 0;
    progress(done, total);
    let start = error(plan)?;
    let mut best = start;
    for name in order {
        let kept = plan.activations[name].clone();
        let mut choice = kept.clone();
        for &amax in &candidates[name] {
            done += 1;
            let p = params(name, amax)?;
            if p == kept {
                progress(done, total);
                continue;
            }
            set(plan, shared, name, &p);
            let e = error(plan)?;
            if e < best {
                best = e;
                choice = p;
            }
            progress(done, total);
        }
        set(plan, shared, name, &choice);
    }
    Ok((best, start))
}

/// Gives `name`, and every tensor sharing its parameters, the parameters `p`.
fn set(plan: &mut QuantPlan, shared: &BTreeMap<String, String>, name: &str, p: &QuantParams) {
    plan.activations.insert(name.to_string(), p.clone());
    for (k, v) in shared {
        if v == name {
            plan.activations.insert(k.clone(), p.clone());
        }
    }
}
