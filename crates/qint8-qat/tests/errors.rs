//! Bad settings and bad data are errors that say what is wrong, before any
//! training.

use std::path::PathBuf;

use ndarray::Array4;
use qint8_calibration::{calibrate, CalibConfig, ImageDataset};
use qint8_qat::{train, train_with_epochs, QatConfig, QatError};

fn small_model() -> (qint8_graph::Graph, qint8_graph::QuantPlan) {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/vgg16_bn.onnx");
    let model = qint8_graph::onnx::load(path).unwrap();
    let images = Array4::from_elem((4, 1, 32, 32), 0.5f32);
    let calib = ImageDataset::from_array(images, None).unwrap();
    let c = calibrate(&model.graph, &calib, &CalibConfig::default(), &mut |_| {}).unwrap();
    (c.graph, c.plan)
}

fn data(labels: Option<Vec<usize>>, n: usize) -> ImageDataset {
    let images = Array4::from_shape_fn((n, 1, 32, 32), |(i, _, y, x)| {
        ((i + y * x) % 7) as f32 / 7.0
    });
    ImageDataset::from_array(images, labels).unwrap()
}

#[test]
fn settings_and_data_are_checked() {
    let (graph, plan) = small_model();
    let ok = QatConfig {
        threads: 1,
        ..QatConfig::default()
    };
    let labeled = data(Some(vec![0, 1, 2, 3]), 4);
    for (config, what) in [
        (QatConfig { epochs: 0, ..ok }, "epochs"),
        (QatConfig { batch: 0, ..ok }, "batch"),
        (QatConfig { lr: f32::NAN, ..ok }, "learning rate"),
        (QatConfig { lr: -1.0, ..ok }, "learning rate"),
        (
            QatConfig {
                momentum: 1.0,
                ..ok
            },
            "momentum",
        ),
        (
            QatConfig {
                weight_decay: -0.1,
                ..ok
            },
            "weight decay",
        ),
    ] {
        let e = train(&graph, &plan, &labeled, &config, &mut |_| {}).unwrap_err();
        assert!(matches!(e, QatError::Config(_)), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
    let e = train(&graph, &plan, &data(None, 4), &ok, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("no labels"), "{e}");
    let e = train(
        &graph,
        &plan,
        &data(Some(vec![0, 1, 10, 3]), 4),
        &ok,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, QatError::Data(_)) && e.to_string().contains("label 10"),
        "{e}"
    );
    // A learning rate that blows the weights up is reported as divergence,
    // not returned as a model.
    let e = train(
        &graph,
        &plan,
        &labeled,
        &QatConfig {
            lr: 1e30,
            epochs: 3,
            batch: 2,
            ..ok
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, QatError::Diverged { .. }) && e.to_string().contains("lower the learning rate"),
        "{e}"
    );
}

#[test]
fn epoch_end_sees_every_epoch_and_can_stop_training() {
    let (graph, plan) = small_model();
    let labeled = data(Some(vec![0, 1, 2, 3]), 4);
    let config = QatConfig {
        threads: 1,
        epochs: 3,
        batch: 2,
        ..QatConfig::default()
    };
    let mut seen: Vec<(usize, qint8_graph::QuantPlan)> = Vec::new();
    let t = train_with_epochs(
        &graph,
        &plan,
        &labeled,
        &config,
        &mut |_| {},
        &mut |e, _, p| {
            seen.push((e.epoch, p.clone()));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(seen[2].1, t.plan);
    assert_ne!(seen[0].1.weights, seen[2].1.weights, "the weights train");
    // An error from the callback ends training with that error.
    let e = train_with_epochs(
        &graph,
        &plan,
        &labeled,
        &config,
        &mut |_| {},
        &mut |e, _, _| match e.epoch {
            2 => Err(QatError::Data("stop here".into())),
            _ => Ok(()),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("stop here"), "{e}");
}
