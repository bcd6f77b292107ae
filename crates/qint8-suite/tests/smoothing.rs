//! Smoothing of gated activations (`CalibConfig::smooth`) on the
//! EfficientNet-B0 fixture: the rewritten graph computes the same function,
//! the gated activations' channel ranges come closer together, and graphs
//! without such sites are left alone.

use qint8_calibration::{calibrate, CalibConfig, Calibrated, Smoothing};
use qint8_graph::{Graph, Op};
use qint8_runtime::{Session, SessionOptions};
use qint8_suite::{fixture_dataset, fixtures, relative_max_error};

fn calibrated(name: &str, smooth: Option<Smoothing>) -> (Graph, Calibrated) {
    let model = qint8_graph::onnx::load(fixtures().join(format!("models/{name}.onnx"))).unwrap();
    let calib = fixture_dataset("calib-images-idx3-ubyte", 64);
    let cfg = CalibConfig {
        threads: 2,
        smooth,
        ..Default::default()
    };
    let c = calibrate(&model.graph, &calib, &cfg, &mut |_| {}).unwrap();
    (model.graph, c)
}

fn logits(g: &Graph) -> Vec<f32> {
    let s = Session::from_graph(g.clone(), SessionOptions::default()).unwrap();
    let data = fixture_dataset("eval-images-idx3-ubyte", 32);
    let b = data.batch(0, 32).unwrap();
    let input = g.inputs[0].name.clone();
    s.run(&[(input.as_str(), b.inputs.view().into_dyn())])
        .unwrap()[0]
        .iter()
        .copied()
        .collect()
}

#[test]
fn smoothing_keeps_the_float_function_of_efficientnet() {
    for how in [
        Smoothing::Auto,
        Smoothing::Alpha(0.5),
        Smoothing::Alpha(1.0),
    ] {
        let (original, c) = calibrated("efficientnet_b0", Some(how));
        // Every squeeze-and-excitation output feeds a projection
        // convolution; the SiLU products (x * sigmoid(x)) are left alone.
        assert_eq!(c.smoothed.len(), 16, "{how:?}");
        assert!(c.smoothed.iter().all(|t| t.ends_with("block.2/Mul_output_0") || t.ends_with("block.1/Mul_output_0")), "{:?}", c.smoothed);
        let muls = |g: &Graph| g.nodes.iter().filter(|n| matches!(n.op, Op::Mul)).count();
        assert_eq!(muls(&c.graph), muls(&original) + 16);
        let err = relative_max_error(&logits(&original), &logits(&c.graph));
        assert!(err < 1e-4, "{how:?}: relative error {err}");
    }
}

#[test]
fn graphs_without_gates_are_left_alone() {
    let (original, c) = calibrated("resnet50", Some(Smoothing::Auto));
    let (_, plain) = calibrated("resnet50", None);
    assert!(c.smoothed.is_empty());
    assert_eq!(c.graph.nodes.len(), plain.graph.nodes.len());
    assert_eq!(c.plan, plain.plan);
    assert!(original.nodes.len() >= c.graph.nodes.len());
}
