//! Quantization-aware training end to end: the EfficientNet-B0 fixture
//! quantized the weak way (min-max, per-tensor weights, 32 calibration
//! images), trained, exported as QDQ, checked against TensorRT's rules and
//! run by onnxruntime, which must predict as qint8 does on the 2000 eval
//! images (with its graph optimizations off; see `qdq_parity.rs` for why).

use qint8_calibration::{calibrate, CalibConfig};
use qint8_graph::quant::{insert_qdq, WeightStorage};
use qint8_graph::Model;
use qint8_math::search::RangeMethod;
use qint8_qat::{train, QatConfig};
use qint8_suite::{fixture_dataset, fixtures, onnxruntime_available, top1_agreement};

#[test]
fn trained_weak_configuration_exports_a_file_onnxruntime_agrees_with() {
    if !onnxruntime_available() {
        eprintln!("skipped: python3 with onnxruntime and numpy is not available");
        return;
    }
    let model = qint8_graph::onnx::load(fixtures().join("models/efficientnet_b0.onnx")).unwrap();
    let cfg = CalibConfig {
        method: RangeMethod::Max,
        per_channel: false,
        threads: 2,
        ..Default::default()
    };
    let c = calibrate(
        &model.graph,
        &fixture_dataset("calib-images-idx3-ubyte", 32),
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    let t = train(
        &c.graph,
        &c.plan,
        &fixture_dataset("calib-images-idx3-ubyte", 512),
        &QatConfig {
            threads: 2,
            ..QatConfig::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let eval = fixture_dataset("eval-images-idx3-ubyte", 2000);
    let batch = eval.batch(0, eval.len()).unwrap();
    let mut right = Vec::new();
    for (graph, plan) in [(&c.graph, &c.plan), (&t.graph, &t.plan)] {
        let q = Model {
            graph: insert_qdq(graph, plan, WeightStorage::Int8).unwrap(),
            opset: model.opset.max(13),
            ..model.clone()
        };
        let file = dir.path().join("qat.onnx");
        qint8_graph::onnx::save(&q, &file).unwrap();
        let violations: Vec<_> = qint8_trt::check_file(&file)
            .unwrap()
            .into_iter()
            .filter(|v| !v.rule.is_warning())
            .collect();
        assert!(violations.is_empty(), "{violations:?}");
        let a = top1_agreement(&q, &file, &batch, dir.path()).unwrap();
        eprintln!("{a:?}");
        assert!(a.unoptimized * 1000 >= a.images * 995, "{a:?}");
        right.push(a.ours_right);
    }
    // Calibrated: about 81% of these images; trained: about 90%.
    assert!(right[1] >= right[0] + 120, "top-1 hits {right:?}");
}
