//! Per-tensor error of one model's activations against another's: SQNR and
//! cosine similarity of, say, the INT8 (QDQ) model's dequantized
//! activations against the FP32 model's, accumulated over a dataset.

use std::collections::{BTreeMap, HashMap};

use qint8_calibration::ImageDataset;
use qint8_graph::{Graph, Op};
use qint8_runtime::Session;

use crate::{EvalError, Result};

/// The error of one tensor of a test model against a reference tensor,
/// over every value of every image.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerError {
    /// The reference tensor.
    pub tensor: String,
    /// The test model's tensor it was compared with.
    pub compared: String,
    /// `10 log10(sum x^2 / sum (x - y)^2)` (infinite when equal).
    pub sqnr_db: f64,
    /// `<x, y> / (|x| |y|)` (1 when both are zero).
    pub cosine: f64,
    /// Largest `|x - y|`.
    pub max_abs: f32,
    /// Values compared.
    pub values: u64,
}

/// Sums that SQNR and cosine need, over any number of slices.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    xx: f64,
    yy: f64,
    xy: f64,
    ee: f64,
    max_abs: f32,
    n: u64,
}

impl Sums {
    fn add(&mut self, x: &[f32], y: &[f32]) {
        for (&a, &b) in x.iter().zip(y) {
            let (p, q) = (a as f64, b as f64);
            self.xx += p * p;
            self.yy += q * q;
            self.xy += p * q;
            self.ee += (p - q) * (p - q);
            self.max_abs = self.max_abs.max((a - b).abs());
        }
        self.n += x.len() as u64;
    }

    // The same conventions as qint8_math::metrics::{sqnr_db, cosine_similarity}.
    fn sqnr_db(&self) -> f64 {
        if self.ee == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.xx / self.ee).log10()
        }
    }

    fn cosine(&self) -> f64 {
        match (self.xx == 0.0, self.yy == 0.0) {
            (true, true) => 1.0,
            (true, false) | (false, true) => 0.0,
            _ => self.xy / (self.xx.sqrt() * self.yy.sqrt()),
        }
    }
}

/// In a QDQ graph, the dequantized value of each quantized activation:
/// `x -> DequantizeLinear(QuantizeLinear(x))` output, by `x`.
pub fn qdq_outputs(graph: &Graph) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for q in &graph.nodes {
        if !matches!(q.op, Op::QuantizeLinear { .. })
            || graph.initializers.contains_key(&q.inputs[0])
        {
            continue;
        }
        for c in graph.consumers(&q.outputs[0]) {
            let dq = &graph.nodes[c];
            if matches!(dq.op, Op::DequantizeLinear { .. }) {
                out.insert(q.inputs[0].clone(), dq.outputs[0].clone());
                break;
            }
        }
    }
    out
}

/// Runs `reference` and `test` (each on its graph's first input) on every
/// image of `data` in batches of `batch` and compares, for each `(r, t)` of
/// `pairs`, tensor `r` of `reference` with tensor `t` of `test`. Pairs
/// whose tensors either session never produces (fused away, or not in the
/// graph) are left out of the result, which keeps the order of `pairs`.
pub fn activation_errors(
    reference: &Session,
    test: &Session,
    pairs: &[(String, String)],
    data: &ImageDataset,
    batch: usize,
) -> Result<Vec<LayerError>> {
    if batch == 0 {
        return Err(EvalError::Invalid("batch size is 0".into()));
    }
    let input = |s: &Session| {
        s.input_names()
            .first()
            .map(|n| n.to_string())
            .ok_or_else(|| EvalError::Invalid("a model has no inputs".into()))
    };
    let (ri, ti) = (input(reference)?, input(test)?);
    let wanted: HashMap<&str, Vec<usize>> =
        pairs
            .iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, (r, _))| {
                m.entry(r.as_str()).or_default().push(i);
                m
            });
    let by_test: HashMap<&str, Vec<usize>> =
        pairs
            .iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, (_, t))| {
                m.entry(t.as_str()).or_default().push(i);
                m
            });
    let mut sums = vec![Sums::default(); pairs.len()];
    let mut mismatch: Option<String> = None;
    for b in data.batches(batch) {
        let b = b?;
        let mut kept: HashMap<String, Vec<f32>> = HashMap::new();
        let mut keep =
            |name: &str, _shape: &[usize], x: &[f32]| -> std::result::Result<(), String> {
                if wanted.contains_key(name) {
                    kept.insert(name.to_string(), x.to_vec());
                }
                Ok(())
            };
        reference.run_observed(&[(ri.as_str(), b.inputs.view())], &mut keep)?;
        let mut compare =
            |name: &str, _shape: &[usize], y: &[f32]| -> std::result::Result<(), String> {
                for &i in by_test.get(name).into_iter().flatten() {
                    if let Some(x) = kept.get(pairs[i].0.as_str()) {
                        if x.len() == y.len() {
                            sums[i].add(x, y);
                        } else if mismatch.is_none() {
                            mismatch = Some(format!(
                                "`{}` has {} values but `{}` {}",
                                pairs[i].0,
                                x.len(),
                                name,
                                y.len()
                            ));
                        }
                    }
                }
                Ok(())
            };
        test.run_observed(&[(ti.as_str(), b.inputs.view())], &mut compare)?;
        if let Some(m) = mismatch.take() {
            return Err(EvalError::Invalid(format!("cannot compare tensors: {m}")));
        }
    }
    Ok(pairs
        .iter()
        .zip(&sums)
        .filter(|(_, s)| s.n > 0)
        .map(|((r, t), s)| LayerError {
            tensor: r.clone(),
            compared: t.clone(),
            sqnr_db: s.sqnr_db(),
            cosine: s.cosine(),
            max_abs: s.max_abs,
            values: s.n,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulated_sums_match_the_slice_metrics() {
        let x: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = x.iter().map(|v| (v * 16.0).round() / 16.0).collect();
        let mut s = Sums::default();
        s.add(&x[..40], &y[..40]);
        s.add(&x[40..], &y[40..]);
        let sqnr = qint8_math::metrics::sqnr_db(&x, &y).unwrap();
        let cos = qint8_math::metrics::cosine_similarity(&x, &y).unwrap();
        assert!((s.sqnr_db() - sqnr).abs() < 1e-9);
        assert!((s.cosine() - cos).abs() < 1e-12);
        assert_eq!(s.n, 100);
        let mut z = Sums::default();
        z.add(&[0.0, 0.0], &[0.0, 0.0]);
        assert_eq!((z.sqnr_db(), z.cosine()), (f64::INFINITY, 1.0));
    }
}
