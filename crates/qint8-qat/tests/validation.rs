//! Training with held-out images: the model returned is the best-scoring
//! one of the calibrated model and every epoch's, it scores what its epoch
//! recorded, and patience stops training.

use std::path::PathBuf;

use qint8_calibration::{calibrate, CalibConfig, Calibrated, ImageDataset, Preprocess};
use qint8_math::search::RangeMethod;
use qint8_qat::{
    train_validated, validation_score, QatConfig, QatError, Trained, Validation, ValidationScore,
};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn data(file: &str) -> ImageDataset {
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    ImageDataset::from_idx_auto(fixture(&format!("data/{file}")), pre).unwrap()
}

fn calibrated(model: &str, config: &CalibConfig) -> Calibrated {
    let model = qint8_graph::onnx::load(fixture(&format!("models/{model}"))).unwrap();
    let calib = data("calib-images-idx3-ubyte").take(64).unwrap();
    calibrate(&model.graph, &calib, config, &mut |_| {}).unwrap()
}

/// The epoch (0: the calibrated model) whose score beats every other.
fn best_of(t: &Trained) -> usize {
    let mut best = (0, t.calibrated_validation.unwrap());
    for e in &t.epochs {
        let s = e.validation.unwrap();
        if s.beats(&best.1) {
            best = (e.epoch, s);
        }
    }
    best.0
}

fn score_of(t: &Trained, epoch: usize) -> ValidationScore {
    match epoch {
        0 => t.calibrated_validation.unwrap(),
        k => t.epochs[k - 1].validation.unwrap(),
    }
}

#[test]
fn the_best_scoring_epoch_is_returned() {
    // The weak configuration: training gains points, so an epoch wins.
    let c = calibrated(
        "efficientnet_b0.onnx",
        &CalibConfig {
            method: RangeMethod::Max,
            per_channel: false,
            ..CalibConfig::default()
        },
    );
    let (val, train) = data("calib-images-idx3-ubyte").split(300, 3).unwrap();
    let train = train.take(256).unwrap();
    let config = QatConfig {
        epochs: 3,
        threads: 2,
        ..QatConfig::default()
    };
    let mut seen = Vec::new();
    let t = train_validated(
        &c.graph,
        &c.plan,
        &train,
        &Validation {
            data: &val,
            patience: None,
        },
        &config,
        &mut |_| {},
        &mut |e, g, p| {
            // What each epoch records is that epoch's model's score.
            let again = validation_score(g, p, &val, 2)?;
            assert_eq!(Some(again), e.validation, "epoch {}", e.epoch);
            seen.push(e.epoch);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seen, [1, 2, 3]);
    assert_eq!(t.epochs.len(), 3);
    assert!(t.kept_epoch >= 1, "{:?}", t.epochs);
    assert_eq!(t.kept_epoch, best_of(&t));
    let kept = score_of(&t, t.kept_epoch);
    assert!(
        kept.top1 > t.calibrated_validation.unwrap().top1 + 0.03,
        "{kept:?} vs {:?}",
        t.calibrated_validation
    );
    // The returned model is the kept epoch's: it scores what was recorded.
    assert_eq!(validation_score(&t.graph, &t.plan, &val, 2).unwrap(), kept);
    assert_eq!(
        validation_score(&c.graph, &c.plan, &val, 2).unwrap(),
        t.calibrated_validation.unwrap()
    );
}

#[test]
fn the_calibrated_model_is_kept_when_training_hurts_and_patience_stops() {
    // A good configuration and a rate thirty times the default: the first
    // epoch scores far below the calibrated model (measured 96.5% -> 66%).
    let c = calibrated("resnet50.onnx", &CalibConfig::default());
    let (val, train) = data("calib-images-idx3-ubyte").split(200, 0).unwrap();
    let train = train.take(256).unwrap();
    let config = QatConfig {
        epochs: 3,
        lr: 0.03,
        threads: 2,
        ..QatConfig::default()
    };
    let run = |patience| {
        train_validated(
            &c.graph,
            &c.plan,
            &train,
            &Validation {
                data: &val,
                patience,
            },
            &config,
            &mut |_| {},
            &mut |_, _, _| Ok(()),
        )
        .unwrap()
    };
    let t = run(Some(1));
    assert_eq!(t.epochs.len(), 1, "patience 1 stops after one worse epoch");
    assert_eq!(t.kept_epoch, 0);
    assert!(
        t.epochs[0].validation.unwrap().top1 < t.calibrated_validation.unwrap().top1 - 0.1,
        "{:?}",
        t.epochs
    );
    // The model as it came, unchanged.
    assert_eq!(t.plan, c.plan);
    assert_eq!(t.graph, c.graph);
    // Without patience every epoch runs, and the best of all is kept.
    let t = run(None);
    assert_eq!(t.epochs.len(), 3);
    assert_eq!(t.kept_epoch, best_of(&t));
}

#[test]
fn validation_settings_are_checked() {
    let c = calibrated("vgg16_bn.onnx", &CalibConfig::default());
    let train = data("calib-images-idx3-ubyte").take(8).unwrap();
    let config = QatConfig {
        threads: 1,
        ..QatConfig::default()
    };
    let run = |val: &ImageDataset, patience| {
        train_validated(
            &c.graph,
            &c.plan,
            &train,
            &Validation {
                data: val,
                patience,
            },
            &config,
            &mut |_| {},
            &mut |_, _, _| Ok(()),
        )
        .unwrap_err()
    };
    let e = run(&train, Some(0));
    assert!(
        matches!(e, QatError::Config(_)) && e.to_string().contains("patience"),
        "{e}"
    );
    let images = ndarray::Array4::from_elem((4, 1, 32, 32), 0.5f32);
    let unlabeled = ImageDataset::from_array(images.clone(), None).unwrap();
    let e = run(&unlabeled, None);
    assert!(e.to_string().contains("no labels"), "{e}");
    let small = ndarray::Array4::from_elem((4, 1, 28, 28), 0.5f32);
    let other = ImageDataset::from_array(small, Some(vec![0; 4])).unwrap();
    let e = run(&other, None);
    assert!(e.to_string().contains("[1, 28, 28]"), "{e}");
    let wrong = ImageDataset::from_array(images, Some(vec![0, 1, 10, 2])).unwrap();
    let e = run(&wrong, None);
    assert!(e.to_string().contains("label 10"), "{e}");
}
