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
    let mut out = latencies(&[session], shape, warmup, runs)?;
    Ok(out.remove(0))
}

/// [`latency`] of several sessions with their runs interleaved (A B A B
/// ...), so that drift in the machine's speed affects each alike; for
/// comparing two models, as FP32 against INT8.
pub fn latencies(
    sessions: &[&Session],
    shape: &[usize],
    warmup: usize,
    runs: usize,
) -> Result<Vec<Latency>> {
    if runs == 0 || shape.is_empty() || shape[0] == 0 {
        return Err(EvalError::Invalid(
            "latency needs at least one run of at least one image".into(),
        ));
    }
    // A fixed, non-trivial input: zeros would make some kernels' work
    // (ReLU, max pooling) unrepresentative.
    let n: usize = shape.iter().product();
    let x = ArrayD::from_shape_vec(
        shape.to_vec(),
        (0..n).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect(),
    )
    .map_err(|e| EvalError::Invalid(format!("input shape {shape:?}: {e}")))?;
    let mut prepared = Vec::with_capacity(sessions.len());
    for s in sessions {
        let input = s
            .input_names()
            .first()
            .map(|n| n.to_string())
            .ok_or_else(|| EvalError::Invalid("the model has no inputs".into()))?;
        let stats = s.plan(&[(input.as_str(), shape)])?.stats();
        prepared.push((input, stats));
    }
    for _ in 0..warmup {
        for (s, (input, _)) in sessions.iter().zip(&prepared) {
            s.run(&[(input.as_str(), x.view())])?;
        }
    }
    let mut times = vec![Vec::with_capacity(runs); sessions.len()];
    for _ in 0..runs {
        for ((s, (input, _)), t) in sessions.iter().zip(&prepared).zip(times.iter_mut()) {
            let start = Instant::now();
            s.run(&[(input.as_str(), x.view())])?;
            t.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .into_iter()
        .zip(&prepared)
        .map(|(mut t, (_, stats))| {
            t.sort_by(f64::total_cmp);
            let median_s = t[t.len() / 2];
            Latency {
                batch: shape[0],
                runs,
                median_s,
                min_s: t[0],
                images_per_s: shape[0] as f64 / median_s.max(1e-12),
                runtime_bytes: stats.constant_bytes + stats.peak_activation_bytes(),
            }
        })
        .collect())
}
