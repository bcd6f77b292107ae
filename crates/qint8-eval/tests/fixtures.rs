//! Evaluation on the ResNet-50 fixture: accuracy on the eval slice (the
//! value onnxruntime gives, checked in the CLI suite), and activation errors
//! of a quantized copy against FP32.

use std::path::PathBuf;

use qint8_calibration::{calibrate, CalibConfig, ImageDataset, Preprocess};
use qint8_eval::layers::qdq_outputs;
use qint8_eval::perf::{latencies, latency};
use qint8_eval::{activation_errors, model_bytes, Evaluator};
use qint8_graph::quant::{insert_qdq, WeightStorage};
use qint8_graph::Model;
use qint8_runtime::{Session, SessionOptions};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn data(file: &str, n: usize) -> ImageDataset {
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    ImageDataset::from_idx_auto(fixture(&format!("data/{file}")), pre)
        .unwrap()
        .take(n)
        .unwrap()
}

#[test]
fn resnet50_accuracy_errors_size_and_latency() {
    let model = qint8_graph::onnx::load(fixture("models/resnet50.onnx")).unwrap();
    let eval = data("eval-images-idx3-ubyte", 2000);
    let fp32 = Evaluator::new(&model, "resnet50", 2).unwrap();
    let mut seen = 0;
    let a = fp32.evaluate(&eval, 64, &mut |n| seen = n).unwrap();
    // onnxruntime: 0.9250 on this slice (crates/qint8-cli/tests/cli.rs).
    assert_eq!((a.score.n, a.score.top1, seen), (2000, 1850, 2000));
    assert_eq!((a.classes, a.predictions.len()), (10, 2000));

    let c = calibrate(
        &model.graph,
        &data("calib-images-idx3-ubyte", 256),
        &CalibConfig::default(),
        &mut |_| {},
    )
    .unwrap();
    let qdq = Model {
        graph: insert_qdq(&c.graph, &c.plan, WeightStorage::Int8).unwrap(),
        opset: 13,
        ..model.clone()
    };
    assert!(model_bytes(&qdq) * 3 < model_bytes(&model));
    let int8 = Evaluator::new(&qdq, "resnet50 int8", 2).unwrap();
    let b = int8.evaluate(&eval, 64, &mut |_| {}).unwrap();
    assert!(a.agreement(&b) >= 1950, "{}", a.agreement(&b));

    // FP32's predictions need no labels; scored against them, the INT8
    // model's top-1 is its agreement with FP32 (and FP32's own is 100%).
    let unlabeled = ImageDataset::from_idx(
        fixture("data/eval-images-idx3-ubyte"),
        None,
        Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2),
    )
    .unwrap()
    .take(2000)
    .unwrap();
    assert!(fp32.evaluate(&unlabeled, 64, &mut |_| {}).is_err());
    let mut told = 0;
    let predicted = fp32.predict(&unlabeled, 48, &mut |n| told = n).unwrap();
    assert_eq!(
        (predicted.as_slice(), told),
        (a.predictions.as_slice(), 2000)
    );
    let against_fp32 = eval.clone().with_labels(predicted).unwrap();
    let b_fp32 = int8.evaluate(&against_fp32, 64, &mut |_| {}).unwrap();
    assert_eq!(b_fp32.score.top1, a.agreement(&b));
    let a_fp32 = fp32.evaluate(&against_fp32, 64, &mut |_| {}).unwrap();
    assert_eq!(a_fp32.score.top1, 2000);

    let reference = Session::from_graph(
        c.graph.clone(),
        SessionOptions {
            fuse: false,
            ..Default::default()
        },
    )
    .unwrap();
    let dq = qdq_outputs(&qdq.graph);
    assert_eq!(dq.len(), c.plan.activations.len());
    let pairs: Vec<(String, String)> = dq.into_iter().collect();
    let small = data("eval-images-idx3-ubyte", 64);
    let errors = activation_errors(&reference, int8.session(), &pairs, &small, 32).unwrap();
    assert!(
        errors.len() >= pairs.len() - 1,
        "{} of {}",
        errors.len(),
        pairs.len()
    );
    for e in &errors {
        // int8 keeps every activation well above noise, never exact.
        assert!(e.sqnr_db > 10.0 && e.sqnr_db.is_finite(), "{e:?}");
        assert!(e.cosine > 0.95 && e.values > 0, "{e:?}");
    }
    // The same session against itself is exact.
    let same: Vec<(String, String)> = pairs.iter().map(|(r, _)| (r.clone(), r.clone())).collect();
    let exact = activation_errors(&reference, &reference, &same, &small, 32).unwrap();
    assert!(exact
        .iter()
        .all(|e| e.sqnr_db == f64::INFINITY && e.max_abs == 0.0));

    let l = latency(fp32.session(), &[1, 1, 32, 32], 2, 5).unwrap();
    assert_eq!((l.batch, l.runs), (1, 5));
    assert!(l.min_s <= l.median_s && l.images_per_s > 0.0 && l.runtime_bytes > 0);
    assert!(latency(fp32.session(), &[0, 1, 32, 32], 0, 1).is_err());
    let both = latencies(&[fp32.session(), int8.session()], &[4, 1, 32, 32], 1, 3).unwrap();
    assert_eq!(both.len(), 2);
    assert!(both
        .iter()
        .all(|l| l.batch == 4 && l.runs == 3 && l.median_s > 0.0));
}
