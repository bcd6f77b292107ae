//! Quantization-aware training: fine-tune a calibrated model with INT8
//! simulated, then export it as [`ptq`](crate::ptq) exports.
//!
//! ```no_run
//! use qint8::prelude::*;
//!
//! # fn main() -> qint8::Result<()> {
//! let model = qint8::graph::onnx::load("model.onnx")?;
//! let pre = Preprocess::imagenet();
//! let calib = ImageDataset::from_folder("calib/", ColorMode::Rgb, pre.clone())?.take(1000)?;
//! let train = ImageDataset::from_folder("train/", ColorMode::Rgb, pre)?;
//! let quantized = ptq::quantize(&model, &calib, &PtqConfig::default())?;
//! let trained = qat::train(&quantized, &train, &QatConfig { epochs: 2, ..QatConfig::default() })?;
//! trained.save_qdq("model.int8.onnx")?;
//! # Ok(())
//! # }
//! ```

use crate::ptq::QuantizedModel;
use crate::Result;
use qint8_calibration::ImageDataset;

pub use qint8_qat::{
    validation_score, EpochStats, Progress, QatConfig, QatError, Trained, Validation,
    ValidationScore,
};

/// Fine-tunes `quantized`'s weights on the labeled images of `data` with
/// its quantization simulated ([`qint8_qat::train`]) and returns the model
/// with the trained weights and their scales (activation ranges as
/// calibrated), ready for [`QuantizedModel::save_qdq`]. A TensorRT cache
/// from it ([`QuantizedModel::trt_cache`]) still holds the calibrated
/// ranges.
pub fn train(
    quantized: &QuantizedModel,
    data: &ImageDataset,
    config: &QatConfig,
) -> Result<QuantizedModel> {
    let trained = qint8_qat::train(
        quantized.graph(),
        quantized.plan(),
        data,
        config,
        &mut |_| {},
    )?;
    let mut out = quantized.clone();
    out.calibrated.graph = trained.graph;
    out.calibrated.plan = trained.plan;
    Ok(out)
}

/// [`train`] with held-out labeled images that choose the model returned:
/// the best-scoring of the model as it came and each epoch's
/// ([`qint8_qat::train_validated`]), with early stopping by
/// [`Validation::patience`]. Also returns that model's epoch: 0 when no
/// epoch beat `quantized`, which is then returned as it came.
pub fn train_validated(
    quantized: &QuantizedModel,
    data: &ImageDataset,
    validation: &Validation<'_>,
    config: &QatConfig,
) -> Result<(QuantizedModel, usize)> {
    let trained = qint8_qat::train_validated(
        quantized.graph(),
        quantized.plan(),
        data,
        validation,
        config,
        &mut |_| {},
        &mut |_, _, _| Ok(()),
    )?;
    let mut out = quantized.clone();
    out.calibrated.graph = trained.graph;
    out.calibrated.plan = trained.plan;
    Ok((out, trained.kept_epoch))
}
