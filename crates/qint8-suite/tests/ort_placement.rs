//! onnxruntime's Q/DQ placement end to end on the fixtures: calibrate with
//! [`PlacementPolicy::OnnxRuntime`], write the QDQ model, compare qint8's
//! simulated INT8 with onnxruntime running the same file (with and without
//! its graph optimizations), and compare the planned tensors with what
//! onnxruntime's own `quantize_static` quantizes on the same float graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use qint8_calibration::dataset::npy::write_npy_f32;
use qint8_calibration::{calibrate, CalibConfig};
use qint8_graph::quant::{float_from_qdq, insert_qdq, ort_placement, placement, WeightStorage};
use qint8_graph::{Model, PlacementPolicy};
use qint8_suite::{fixture_dataset, fixtures, onnxruntime_available, top1_agreement};

/// Quantizes the float model `src` with onnxruntime's `quantize_static`
/// (QDQ, default op types, per channel, symmetric int8 activations and
/// weights; calibrated on the NPY batch `x`), writes the result to `dst`
/// and returns what it quantized: activations with their scale, weights
/// with their axis (`None`: per tensor), int32 biases, and activations
/// that use another tensor's scale initializer.
fn onnxruntime_quantize(src: &Path, dst: &Path, x: &Path) -> Result<serde_json::Value, String> {
    let script = r#"
import sys, json, numpy as np, onnx
from onnx import numpy_helper
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationDataReader
from onnxruntime.quantization.quant_utils import QUANT_INPUT_SUFFIX, DEQUANT_OUTPUT_SUFFIX
src, dst, x = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
class Reader(CalibrationDataReader):
    def __init__(self):
        g = onnx.load(src).graph
        inits = {i.name for i in g.initializer}
        self.name = [i.name for i in g.input if i.name not in inits][0]
        self.batches = iter([x[i:i + 8] for i in range(0, len(x), 8)])
    def get_next(self):
        b = next(self.batches, None)
        return None if b is None else {self.name: b}
quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": True})
m = onnx.load(dst)
inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
acts, shared, weights, biases = {}, {}, {}, []
for n in m.graph.node:
    if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
        t = n.input[0]
        if t.endswith(QUANT_INPUT_SUFFIX):
            t = t[: -len(QUANT_INPUT_SUFFIX)]
        acts[t] = float(inits[n.input[1]])
        if n.input[1] != t + "_scale":
            shared[t] = n.input[1][: -len("_scale")]
    elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        if inits[n.input[0]].dtype == np.int32:
            biases.append(n.output[0])
        else:
            w = n.output[0]
            if w.endswith(DEQUANT_OUTPUT_SUFFIX):
                w = w[: -len(DEQUANT_OUTPUT_SUFFIX)]
            weights[w] = axis
print(json.dumps({"activations": acts, "shared": shared, "weights": weights, "biases": biases}))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(src)
        .arg(dst)
        .arg(x)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("quantize_static summary: {e}"))
}

/// Checks that onnxruntime's own `quantize_static` marks exactly the
/// tensors [`ort_placement`] plans on the simplified graph of fixture `file`.
fn same_tensors_as_quantize_static(file: &str, dir: &Path) {
    let model = qint8_graph::onnx::load(fixtures().join("models").join(file)).unwrap();
    // The graph the calibrator plans on: BatchNorm folded, Identity removed.
    let opts = qint8_runtime::SessionOptions {
        threads: 2,
        fuse: false,
        ..Default::default()
    };
    let session = qint8_runtime::Session::from_graph(model.graph.clone(), opts).unwrap();
    let graph = session.graph().clone();
    let p = ort_placement(&graph, &BTreeSet::new());
    let float = dir.join("float.onnx");
    let simplified = Model {
        graph,
        ..model.clone()
    };
    qint8_graph::onnx::save(&simplified, &float).unwrap();
    let calib = fixture_dataset("calib-images-idx3-ubyte", 32);
    let x = dir.join("calib.npy");
    write_npy_f32(&x, &calib.batch(0, calib.len()).unwrap().inputs).unwrap();
    let ort = onnxruntime_quantize(&float, &dir.join("ort_qdq.onnx"), &x).unwrap();

    let acts: BTreeMap<String, f64> = ort["activations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    let ort_acts: BTreeSet<String> = acts.keys().cloned().collect();
    assert_eq!(p.activations, ort_acts, "activations");
    let ort_weights: BTreeMap<String, usize> = ort["weights"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as usize))
        .collect();
    assert_eq!(p.weights, ort_weights, "weights");
    // Every tensor planned to share parameters has, in onnxruntime's model,
    // the same scale as the tensor it maps to (through a shared scale
    // initializer for max pool / flatten outputs, through the adjusted range
    // for Relu inputs); every onnxruntime scale sharing is planned.
    for (k, v) in &p.shared {
        assert_eq!(acts[k], acts[v], "scale of {k} vs {v}");
    }
    for (k, v) in ort["shared"].as_object().unwrap() {
        assert_eq!(p.shared.get(k).map(String::as_str), v.as_str(), "{k}");
    }
    // Biases are int32 in onnxruntime's model and float in qint8's.
    let biases = ort["biases"].as_array().unwrap().len();
    eprintln!(
        "{file}: {} activations ({} sharing), {} weights, as quantize_static; it also has {biases} int32 biases",
        p.activations.len(),
        p.shared.len(),
        p.weights.len()
    );

    // The file onnxruntime wrote (int32 biases included) runs in qint8 as
    // simulated INT8, agreeing with onnxruntime, and imports as a plan with
    // onnxruntime's activation scales.
    let ort_file = dir.join("ort_qdq.onnx");
    let ort_model = qint8_graph::onnx::load(&ort_file).unwrap();
    let eval = fixture_dataset("eval-images-idx3-ubyte", 500);
    let batch = eval.batch(0, eval.len()).unwrap();
    let a = top1_agreement(&ort_model, &ort_file, &batch, dir).unwrap();
    eprintln!("{file}: onnxruntime's own QDQ file in qint8: {a:?}");
    assert!(a.unoptimized * 1000 >= a.images * 995, "{a:?}");
    let imported = qint8_graph::quant::plan_from_qdq(&ort_model.graph).unwrap();
    // (A graph output onnxruntime quantizes keeps its name on the
    // DequantizeLinear; the QuantizeLinear reads a renamed tensor.)
    let outputs: BTreeSet<&str> = ort_model
        .graph
        .outputs
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    for (name, &scale) in acts.iter().filter(|(n, _)| !outputs.contains(n.as_str())) {
        let got = imported
            .activations
            .get(name)
            .map(|q| q.channels()[0].scale as f64);
        assert_eq!(got, Some(scale as f32 as f64), "{name}");
    }

    // Read as a float graph and a plan (what `qint8 sensitivity` analyzes)
    // and written again, it still agrees with onnxruntime running
    // onnxruntime's file: only the int32 biases' rounding is left out.
    let (float_graph, plan) = float_from_qdq(&ort_model.graph).unwrap();
    assert_eq!(plan.weights.len(), p.weights.len());
    // The float graph is the network (with onnxruntime's rounded weights):
    // onnxruntime drops a Relu ahead of a pair whose range starts at 0, and
    // the float graph has it back. Its predictions are FP32's.
    let top1 = |m: &Model| -> Vec<usize> {
        let input = &m.graph.inputs[0].name;
        let y = qint8_suite::qint8_output_with(m, input, batch.inputs.view(), false).unwrap();
        y.as_slice()
            .unwrap()
            .chunks(y.shape()[1])
            .map(qint8_suite::argmax)
            .collect()
    };
    let reference = top1(&model);
    let float_model = Model {
        graph: float_graph.clone(),
        ..ort_model.clone()
    };
    let same = reference
        .iter()
        .zip(top1(&float_model))
        .filter(|(a, b)| **a == *b)
        .count();
    eprintln!(
        "{file}: the float graph of onnxruntime's file agrees with FP32 on {same} / {}",
        reference.len()
    );
    assert!(same * 100 >= reference.len() * 98, "{same}");
    let again = Model {
        graph: insert_qdq(&float_graph, &plan, WeightStorage::Int8).unwrap(),
        ..ort_model.clone()
    };
    let again_file = dir.join("ort_qdq_again.onnx");
    qint8_graph::onnx::save(&again, &again_file).unwrap();
    let b = top1_agreement(&again, &ort_file, &batch, dir).unwrap();
    eprintln!("{file}: onnxruntime's file read as a plan and written again: {b:?}");
    assert!(b.unoptimized * 1000 >= b.images * 995, "{b:?}");
}

/// Agreement of top-1 predictions between qint8's simulation and
/// onnxruntime (optimized, unoptimized) on the first 1000 eval images, and
/// qint8's top-1, for fixture `file` calibrated with `policy`.
fn agreement(file: &str, policy: PlacementPolicy, dir: &Path) -> (usize, usize, usize) {
    let model = qint8_graph::onnx::load(fixtures().join("models").join(file)).unwrap();
    let calib = fixture_dataset("calib-images-idx3-ubyte", 300);
    let cfg = CalibConfig {
        threads: 2,
        placement: policy,
        ..Default::default()
    };
    let c = calibrate(&model.graph, &calib, &cfg, &mut |_| {}).unwrap();
    let p = placement(&c.graph, policy, &BTreeSet::new());
    assert_eq!(
        c.plan.activations.keys().cloned().collect::<BTreeSet<_>>(),
        p.activations
    );
    // Tensors sharing parameters got those of the tensor they map to.
    for (k, v) in &p.shared {
        assert_eq!(c.plan.activations[k], c.plan.activations[v], "{k} -> {v}");
    }

    let q = Model {
        graph: insert_qdq(&c.graph, &c.plan, WeightStorage::Int8).unwrap(),
        opset: model.opset.max(13),
        ..model.clone()
    };
    let path = dir.join(file.replace(".onnx", &format!("_{policy:?}.onnx")));
    qint8_graph::onnx::save(&q, &path).unwrap();
    let eval = fixture_dataset("eval-images-idx3-ubyte", 1000);
    let batch = eval.batch(0, eval.len()).unwrap();
    let a = top1_agreement(&q, &path, &batch, dir).unwrap();
    let (same, right) = ([a.optimized, a.unoptimized], a.ours_right);
    eprintln!(
        "{file}, {policy:?} placement ({} activations): top-1 agrees on {} / 1000 (ORT optimized), {} / 1000 (ORT_DISABLE_ALL); qint8 top-1 {right} / 1000",
        p.activations.len(), same[0], same[1]
    );
    (same[0], same[1], right)
}

#[test]
fn resnet50_with_onnxruntime_placement_matches_onnxruntime() {
    if !onnxruntime_available() {
        eprintln!("skipped: python3 with onnxruntime and numpy is not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (optimized, unoptimized, right) =
        agreement("resnet50.onnx", PlacementPolicy::OnnxRuntime, dir.path());
    assert!(optimized >= 980, "optimized: {optimized} of 1000 agree");
    assert!(
        unoptimized >= 990,
        "unoptimized: {unoptimized} of 1000 agree"
    );
    // FP32 top-1 on this slice is 92.5%.
    assert!(right >= 910, "int8 top-1 {right}/1000");
}

#[test]
fn planned_tensors_are_those_quantize_static_quantizes() {
    if !onnxruntime_available() {
        eprintln!("skipped: python3 with onnxruntime and numpy is not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for file in ["resnet50.onnx", "efficientnet_b0.onnx"] {
        same_tensors_as_quantize_static(file, dir.path());
    }
}
