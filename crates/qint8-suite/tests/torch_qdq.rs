//! A QDQ model as PyTorch's TorchScript exporter writes it
//! (`fixtures/make_torch_qdq.py`: scales as Constant nodes, float weights
//! through QuantizeLinear/DequantizeLinear, BatchNorm after each
//! convolution): qint8 runs it as onnxruntime does, and reads it back as a
//! float graph and a plan that compute the same.

use qint8_calibration::dataset::npy::read_npy_f32;
use qint8_graph::quant::{float_from_qdq, insert_qdq, WeightStorage};
use qint8_graph::Model;
use qint8_suite::{fixtures, qint8_output_with};

/// The largest difference between `a` and `b` over the largest magnitude
/// of `b`.
fn relative(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

#[test]
fn a_pytorch_qdq_model_runs_and_reads_back_as_it_computes() {
    let dir = fixtures().join("models/torch_qdq");
    let qdq = qint8_graph::onnx::load(dir.join("qdq.onnx")).unwrap();
    let fp32 = qint8_graph::onnx::load(dir.join("fp32.onnx")).unwrap();
    let x = read_npy_f32(dir.join("input.npy")).unwrap();
    let reference = read_npy_f32(dir.join("qdq.logits.npy")).unwrap();
    let run = |m: &Model| qint8_output_with(m, "input", x.view(), true).unwrap();

    // The file as it is, against onnxruntime's outputs.
    let ours = run(&qdq);
    assert!(
        relative(&ours, &reference) < 1e-4,
        "{}",
        relative(&ours, &reference)
    );

    // Read back: three quantized convolution inputs, three weights.
    let (float_graph, plan) = float_from_qdq(&qdq.graph).unwrap();
    assert_eq!(plan.activations.len(), 3, "{:?}", plan.activations.keys());
    assert_eq!(plan.weights.len(), 3, "{:?}", plan.weights.keys());
    // The residual Add reads the block's input directly, which the second
    // convolution reads through its pair: the Add is kept in float.
    let float_nodes: Vec<&str> = plan.precision.keys().map(String::as_str).collect();
    assert_eq!(float_nodes, ["/Add"], "{float_nodes:?}");
    // Written again (int8 weights this time), the same outputs.
    let again = Model {
        graph: insert_qdq(&float_graph, &plan, WeightStorage::Int8).unwrap(),
        ..qdq.clone()
    };
    let d = relative(&run(&again), &reference);
    assert!(d < 1e-4, "{d}");
    // The float graph is the FP32 network (BatchNorm folded there).
    let float = Model {
        graph: float_graph,
        ..qdq.clone()
    };
    let d = relative(&run(&float), &run(&fp32));
    assert!(d < 1e-4, "{d}");
    // And differs from the quantized one: the pairs are gone.
    assert!(relative(&run(&float), &reference) > 1e-4);
}
