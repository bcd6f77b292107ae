//! Post-training quantization: calibrate, evaluate, export.
//!
//! [`quantize`] runs the streaming calibrator
//! ([`qint8_calibration::calibrate`]) and returns a [`QuantizedModel`]: the
//! simplified graph (BatchNorm folded; gated activations smoothed) with its
//! [`QuantPlan`]. From it, [`QuantizedModel::to_qdq`] builds the QDQ model
//! that [`QuantizedModel::save_qdq`] writes and
//! [`QuantizedModel::evaluate`] scores in INT8 on the CPU runtime, and
//! [`QuantizedModel::trt_cache`] the TensorRT calibration cache.

use std::path::Path;

use qint8_calibration::{calibrate, Calibrated, ImageDataset};
use qint8_eval::{Accuracy, Evaluator};
use qint8_graph::quant::{insert_qdq, WeightStorage};
use qint8_graph::{Graph, Model, QuantPlan};
use qint8_math::search::RangeMethod;
use qint8_trt::CalibrationCache;

use crate::Result;

/// How to calibrate (the calibrator's configuration): method, weight
/// granularity, placement, batch, threads, smoothing, ...
pub type PtqConfig = qint8_calibration::CalibConfig;

/// A calibrated model: the graph its plan refers to, and the plan.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    /// The FP32 model as loaded (its metadata and opset go into exports).
    pub original: Model,
    /// The calibrator's result: graph, plan, ranges, histograms.
    pub calibrated: Calibrated,
    /// The configuration it was calibrated with.
    pub config: PtqConfig,
}

/// Calibrates `model` on every image of `calib` (see [`ImageDataset::take`]
/// and [`ImageDataset::sample`] for subsets) with `config`. Calibration
/// progress is not reported; use [`qint8_calibration::calibrate`] for that.
pub fn quantize(model: &Model, calib: &ImageDataset, config: &PtqConfig) -> Result<QuantizedModel> {
    let calibrated = calibrate(&model.graph, calib, config, &mut |_| {})?;
    Ok(QuantizedModel {
        original: model.clone(),
        calibrated,
        config: config.clone(),
    })
}

/// Scores `model` (FP32, or a QDQ model in INT8) on the labeled
/// images of `data` in batches of `batch` on `threads` threads (0: all).
pub fn evaluate(
    model: &Model,
    data: &ImageDataset,
    batch: usize,
    threads: usize,
) -> Result<Accuracy> {
    let e = Evaluator::new(model, &model.graph.name, threads)?;
    Ok(e.evaluate(data, batch, &mut |_| {})?)
}

impl QuantizedModel {
    /// The quantization plan (per-tensor activation and per-channel weight
    /// parameters, per-node precision).
    pub fn plan(&self) -> &QuantPlan {
        &self.calibrated.plan
    }

    /// The graph the plan refers to.
    pub fn graph(&self) -> &Graph {
        &self.calibrated.graph
    }

    /// The QDQ model: QuantizeLinear/DequantizeLinear at the plan's
    /// activations, weights stored as `storage` says, opset at least 13.
    pub fn to_qdq(&self, storage: WeightStorage) -> Result<Model> {
        Ok(self.original.with_graph(
            insert_qdq(&self.calibrated.graph, &self.calibrated.plan, storage)?,
            self.original.opset.max(13),
        ))
    }

    /// Writes the QDQ model with int8 weight initializers to `path`
    /// (atomically).
    pub fn save_qdq(&self, path: impl AsRef<Path>) -> Result<()> {
        qint8_graph::onnx::save(&self.to_qdq(WeightStorage::Int8)?, path)?;
        Ok(())
    }

    /// A TensorRT calibration cache of the calibrated ranges with
    /// `version` in its header (`TRT-<version>-EntropyCalibration2`, or
    /// `MinMaxCalibration` for max calibration). It holds the planned
    /// activations; TensorRT's implicit quantization wants every tensor,
    /// which calibrating with [`PtqConfig::all_ranges`] provides (and which
    /// turns smoothing off, since the cache describes the original model).
    pub fn trt_cache(&self, version: &str) -> Result<CalibrationCache> {
        let algorithm = match self.config.method {
            RangeMethod::Max => "MinMaxCalibration",
            _ => "EntropyCalibration2",
        };
        Ok(CalibrationCache::from_amax(
            version,
            algorithm,
            self.calibrated.ranges.iter().map(|(n, &a)| (n.clone(), a)),
        )?)
    }

    /// Writes [`trt_cache`](Self::trt_cache) to `path` (atomically).
    pub fn save_trt_cache(&self, path: impl AsRef<Path>, version: &str) -> Result<()> {
        self.trt_cache(version)?.write(path)?;
        Ok(())
    }

    /// Scores the QDQ model in INT8 (integer convolutions where the CPU has
    /// AVX-512 VNNI, the rest simulated) on the labeled images of
    /// `data` (batches of `batch`, `threads` threads, 0: all).
    pub fn evaluate(&self, data: &ImageDataset, batch: usize, threads: usize) -> Result<Accuracy> {
        evaluate(&self.to_qdq(WeightStorage::Int8)?, data, batch, threads)
    }
}
