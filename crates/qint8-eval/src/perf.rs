//! Size, latency and runtime memory of a model as qint8's runtime runs it.

use std::time::Instant;

use ndarray::ArrayD;
use prost::Message;
use qint8_graph::Model;
use qint8_runtime::Session;

use crate::{EvalError, Result};

/// Bytes of the model serialized as an ONNX file (weights inline).
pub fn model_bytes(model: &Model) -> usize {
    qint8_graph::onnx::model_to_proto(model).encoded_len()
}

/// Timing of repeated runs of one input shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Images per run.
    pub batch: usize,
    /// Runs timed (after the warm-up).
    pub runs: usize,
    /// Median seconds per run.
    pub median_s: f64,
    /// Fastest run, seconds.
    pub min_s: f64,
    /// Images per second at the median.
    pub images_per_s: f64,
    /// Bytes the compiled plan holds: constants (packed weights, biases)
    /// plus the activation arena and kernel scratch.
    pub runtime_bytes: usize,
}

/// Times `runs` runs of `session` on a constant input of `shape` (batch
/// first) after `warmup` untimed runs.
pub fn latency(session: &Session, shape: &[usize], warmup: usize, runs: usize) -> Result<Latency> {
    if runs == 0 || shape.is_empty() || shape[0] == 0 {
        return Err(EvalError::Invalid(
            "latency needs at least one run of at least one image".into(),
        ));
    }
    let input = session
        .input_names()
        .first()
        .map(|n| n.to_string())
        .ok_or_else(|| EvalError::Invalid("the model has no inputs".into()))?;
    let plan = session.plan(&[(input.as_str(), shape)])?;
    let stats = plan.stats();
    // A fixed, non-trivial input: zeros would make some kernels' work
    // (ReLU, max pooling) unrepresentative.
    let n: usize = shape.iter().product();
    let x = ArrayD::from_shape_vec(
        shape.to_vec(),
        (0..n).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect(),
    )
    .map_err(|e| EvalError::Invalid(format!("input shape {shape:?}: {e}")))?;
    for _ in 0..warmup {
        session.run(&[(input.as_str(), x.view())])?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        session.run(&[(input.as_str(), x.view())])?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    Ok(Latency {
        batch: shape[0],
        runs,
        median_s,
        min_s: times[0],
        images_per_s: shape[0] as f64 / median_s.max(1e-12),
        runtime_bytes: stats.constant_bytes + stats.peak_activation_bytes(),
    })
}
