//! The facade's QAT pipeline: quantize, train, evaluate and save, on the
//! EfficientNet-B0 fixture quantized the weak way.

use std::path::PathBuf;

use qint8::prelude::*;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

#[test]
fn trained_model_scores_higher_and_saves_its_trained_weights() -> qint8::Result<()> {
    let model = qint8::graph::onnx::load(fixture("models/efficientnet_b0.onnx"))?;
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    let data = |file: &str, n: usize| -> qint8::Result<ImageDataset> {
        Ok(ImageDataset::from_idx_auto(fixture(&format!("data/{file}")), pre.clone())?.take(n)?)
    };
    let config = PtqConfig {
        method: RangeMethod::Max,
        per_channel: false,
        threads: 2,
        ..PtqConfig::default()
    };
    let quantized = ptq::quantize(&model, &data("calib-images-idx3-ubyte", 32)?, &config)?;
    let trained = qat::train(
        &quantized,
        &data("calib-images-idx3-ubyte", 512)?,
        &QatConfig {
            threads: 2,
            ..QatConfig::default()
        },
    )?;
    let eval = data("eval-images-idx3-ubyte", 500)?;
    let before = quantized.evaluate(&eval, 64, 2)?.score.top1;
    let after = trained.evaluate(&eval, 64, 2)?.score.top1;
    assert!(after >= before + 25, "{before} -> {after} of 500");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trained.onnx");
    trained.save_qdq(&file)?;
    let saved = ptq::evaluate(&qint8::graph::onnx::load(&file)?, &eval, 64, 2)?;
    assert_eq!(saved.score.top1, after);
    // With held-out images the better of the calibrated model and the
    // trained one comes back; here training wins.
    let (val, train) = data("calib-images-idx3-ubyte", 712)?.split(200, 1)?;
    let (chosen, epoch) = qat::train_validated(
        &quantized,
        &train,
        &qat::Validation {
            data: &val,
            patience: None,
        },
        &QatConfig {
            threads: 2,
            ..QatConfig::default()
        },
    )?;
    assert_eq!(epoch, 1);
    let chosen_top1 = chosen.evaluate(&eval, 64, 2)?.score.top1;
    assert!(
        chosen_top1 >= before + 25,
        "{before} -> {chosen_top1} of 500"
    );
    Ok(())
}
