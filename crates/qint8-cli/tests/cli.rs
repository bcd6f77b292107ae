//! End-to-end tests of the `qint8` binary on the repository's fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prost::Message;
use qint8_calibration::dataset::npy::{read_npy_f32, write_npy_f32};
use qint8_graph::proto::{
    Dimension, DimensionValue, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn eval_images() -> PathBuf {
    fixtures().join("data/eval-images-idx3-ubyte")
}

fn qint8(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qint8"))
        .args(args)
        .output()
        .expect("spawn qint8")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Succeeded; returns stdout.
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Failed with exit code 1 and a message, without panicking; returns stderr.
fn fails(o: Output) -> String {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout:\n{}\nstderr:\n{err}",
        stdout(&o)
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Stdout holding exactly one JSON object.
fn json(out: &str) -> Value {
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let v: Value = serde_json::from_str(out.trim()).expect("valid JSON");
    assert!(v.is_object());
    v
}

#[test]
fn inspect_resnet50_shows_ops_params_and_plan() {
    let m = model("resnet50.onnx");
    let text = ok(qint8(&["inspect", s(&m), "--threads", "1"]));
    for needle in [
        "opset              17",
        "IR version         8",
        "pytorch 2.11.0",
        "input  float  [batch, 1, 32, 32]",
        "logits  float  [batch, 10]",
        "Conv                  53",
        "Relu                  49",
        "GlobalAveragePool      1",
        "total                122",
        // The ONNX file's parameters (BatchNorm folded into the convolutions).
        "833,674",
        "3,358,973 B",
        "peak activation",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    let v = json(&ok(qint8(&["inspect", s(&m), "--json", "--threads", "1"])));
    assert_eq!(v["opset"], 17);
    assert_eq!(v["ir_version"], 8);
    assert_eq!(v["nodes"], 122);
    assert_eq!(v["op_counts"]["Conv"], 53);
    assert_eq!(v["op_counts"]["Add"], 16);
    assert_eq!(v["parameters"], 833_674);
    assert_eq!(v["file_bytes"], 3_358_973);
    assert_eq!(v["total_file_bytes"], 3_358_973);
    assert_eq!(v["external_data"].as_array().unwrap().len(), 0);
    assert_eq!(
        v["inputs"][0]["shape"],
        serde_json::json!(["batch", 1, 32, 32])
    );
    assert_eq!(v["inputs"][0]["dtype"], "float");
    assert!(v["initializer_bytes"].as_u64().unwrap() >= 4 * 833_674);
    assert!(v["plan"]["steps"].as_u64().unwrap() > 0);
    assert!(v["plan"]["peak_activation_bytes"].as_u64().unwrap() > 0);
    assert!(v["plan_error"].is_null());
}

#[test]
fn inspect_vgg16_dynamo_counts_external_data() {
    let m = model("vgg16_bn_dynamo.onnx");
    let text = ok(qint8(&["inspect", s(&m), "--threads", "1"]));
    for needle in [
        "opset              20",
        "vgg16_bn_dynamo.onnx.data 4,456,448 B",
        "1,101,858",
        "Conv        13",
        "Relu        15",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let v = json(&ok(qint8(&["inspect", s(&m), "--json", "--threads", "1"])));
    assert_eq!(v["parameters"], 1_101_858);
    assert_eq!(v["op_counts"]["Conv"], 13);
    assert_eq!(v["op_counts"]["Gemm"], 3);
    let ext = v["external_data"].as_array().unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0]["bytes"], 4_456_448);
    assert!(ext[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("vgg16_bn_dynamo.onnx.data"));
    assert_eq!(v["file_bytes"], 46_449);
    assert_eq!(v["total_file_bytes"], 46_449 + 4_456_448);
}

#[test]
fn run_resnet50_reproduces_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.npy");
    let refs = fixtures().join("models/reference");
    let input = refs.join("input_random_4x1x32x32.npy");
    let text = ok(qint8(&[
        "run",
        s(&model("resnet50.onnx")),
        "--input",
        s(&input),
        "--output",
        s(&out),
        "--threads",
        "1",
    ]));
    assert!(text.contains("[4, 10]"), "{text}");
    let got = read_npy_f32(&out).unwrap();
    let want = read_npy_f32(refs.join("resnet50.random.logits.npy")).unwrap();
    assert_eq!(got.shape(), want.shape());
    let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = got
        .iter()
        .zip(want.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        max_err / max_ref < 1e-4,
        "relative max error {}",
        max_err / max_ref
    );
}

fn eval_json(model_name: &str, extra: &[&str]) -> Value {
    let m = model(model_name);
    let images = eval_images();
    let mut args = vec![
        "eval",
        s(&m),
        "--data",
        s(&images),
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = qint8(&args);
    let out = ok(o);
    json(&out)
}

/// Top-1 on the 2000-image eval slice equals onnxruntime's (fixtures/README.md).
fn check_slice_top1(model_name: &str, expected: f64) {
    let v = eval_json(model_name, &["--threads", "1"]);
    assert_eq!(v["n"], 2000);
    let top1 = v["top1"].as_f64().unwrap();
    assert_eq!(
        (top1 * 1e4).round(),
        (expected * 1e4_f64).round(),
        "{model_name}: top-1 {top1}, onnxruntime {expected}"
    );
    let top5 = v["top5"].as_f64().unwrap();
    assert!(top5 >= top1 && top5 <= 1.0);
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["batch"], 64);
    assert_eq!(v["threads"], 1);
    assert_eq!(v["classes"], 10);
}

#[test]
fn eval_resnet50_matches_onnxruntime_top1() {
    check_slice_top1("resnet50.onnx", 0.9250);
}

#[test]
fn eval_vgg16_bn_matches_onnxruntime_top1() {
    check_slice_top1("vgg16_bn.onnx", 0.9350);
}

#[test]
fn eval_efficientnet_b0_matches_onnxruntime_top1() {
    check_slice_top1("efficientnet_b0.onnx", 0.9175);
}

#[test]
fn eval_limit_predictions_and_human_output() {
    let dir = tempfile::tempdir().unwrap();
    let preds = dir.path().join("pred.npy");
    let v = eval_json(
        "resnet50_dynamo.onnx",
        &[
            "--limit",
            "100",
            "--batch",
            "30",
            "--threads",
            "1",
            "--predictions",
            s(&preds),
        ],
    );
    assert_eq!(v["n"], 100);
    assert_eq!(v["batch"], 30);
    let p = read_npy_f32(&preds).unwrap();
    assert_eq!(p.shape(), &[100]);
    assert!(p
        .iter()
        .all(|&x| x.fract() == 0.0 && (0.0..10.0).contains(&x)));
    // The first 8 test images: the README's labels [9, 2, 1, 1, 6, 1, 4, 6]
    // are what the model predicts too (checked against onnxruntime's logits).
    let eval8 =
        read_npy_f32(fixtures().join("models/reference/resnet50_dynamo.eval8.logits.npy")).unwrap();
    for (i, row) in eval8.outer_iter().enumerate() {
        let row: Vec<f32> = row.iter().copied().collect();
        let best = (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        assert_eq!(p[i] as usize, best, "image {i}");
    }

    let m = model("resnet50.onnx");
    let images = eval_images();
    let text = ok(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&images),
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "--limit",
        "64",
        "--threads",
        "1",
    ]));
    for needle in [
        "top-1",
        "top-5",
        "images/s",
        "64 images of 1x32x32 (pad 2), 10 classes",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn missing_model_file_is_an_error() {
    let err = fails(qint8(&["inspect", "/nonexistent/model.onnx"]));
    assert!(err.contains("/nonexistent/model.onnx"), "{err}");
    let err = fails(qint8(&[
        "eval",
        "/nonexistent/model.onnx",
        "--data",
        s(&eval_images()),
    ]));
    assert!(err.contains("/nonexistent/model.onnx"), "{err}");
    // The file and the cause, each named once.
    assert_eq!(err.matches("/nonexistent/model.onnx").count(), 1, "{err}");
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
}

#[test]
fn corrupt_models_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf \xff\xfe\x00\x01 at all").unwrap();
    let err = fails(qint8(&["inspect", s(&garbage)]));
    assert!(err.contains("garbage.onnx"), "{err}");

    let full = std::fs::read(model("resnet50.onnx")).unwrap();
    for cut in [full.len() / 2, 1000, 7] {
        let truncated = dir.path().join(format!("truncated{cut}.onnx"));
        std::fs::write(&truncated, &full[..cut]).unwrap();
        let err = fails(qint8(&["inspect", s(&truncated)]));
        assert!(err.contains("truncated"), "{err}");
        let input = fixtures().join("models/reference/input_random_4x1x32x32.npy");
        let out = dir.path().join("y.npy");
        fails(qint8(&[
            "run",
            s(&truncated),
            "--input",
            s(&input),
            "--output",
            s(&out),
        ]));
        assert!(!out.exists());
    }

    // An external-data model without its .data file.
    let lonely = dir.path().join("vgg16_bn_dynamo.onnx");
    std::fs::copy(model("vgg16_bn_dynamo.onnx"), &lonely).unwrap();
    let err = fails(qint8(&["inspect", s(&lonely)]));
    assert!(err.contains("vgg16_bn_dynamo.onnx"), "{err}");
}

#[test]
fn missing_labels_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("lonely-images-idx3-ubyte");
    std::fs::copy(eval_images(), &images).unwrap();
    let m = model("resnet50.onnx");
    let err = fails(qint8(&["eval", s(&m), "--data", s(&images), "--pad", "2"]));
    assert!(err.contains("no labels file"), "{err}");
    assert!(err.contains("lonely-labels-idx1-ubyte"), "{err}");
    assert!(err.contains("--labels"), "{err}");
    assert!(err.contains("--reference"), "{err}");

    let missing = dir.path().join("missing-labels-idx1-ubyte");
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&images),
        "--labels",
        s(&missing),
        "--pad",
        "2",
    ]));
    assert!(err.contains("missing-labels-idx1-ubyte"), "{err}");

    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&dir.path().join("absent-images-idx3-ubyte")),
    ]));
    assert!(err.contains("images file"), "{err}");
    assert!(err.contains("absent-images-idx3-ubyte"), "{err}");

    // With --labels pointing at the real file, it works.
    let labels = fixtures().join("data/eval-labels-idx1-ubyte");
    let v = json(&ok(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&images),
        "--labels",
        s(&labels),
        "--pad",
        "2",
        "--limit",
        "10",
        "--json",
        "--threads",
        "1",
    ])));
    assert_eq!(v["n"], 10);
}

#[test]
fn wrong_input_shapes_name_expected_and_got() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    write_npy_f32(&x, &ndarray::Array2::<f32>::zeros((2, 3))).unwrap();
    let out = dir.path().join("y.npy");
    let m = model("resnet50.onnx");
    let err = fails(qint8(&[
        "run",
        s(&m),
        "--input",
        s(&x),
        "--output",
        s(&out),
    ]));
    assert!(err.contains("x.npy"), "{err}");
    assert!(err.contains("expected [batch, 1, 32, 32]"), "{err}");
    assert!(err.contains("got [2, 3]"), "{err}");
    assert!(!out.exists());

    // Eval without the padding the model needs: 28x28 instead of 32x32.
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&eval_images()),
        "--limit",
        "4",
    ]));
    assert!(err.contains("expected [batch, 1, 32, 32]"), "{err}");
    assert!(err.contains("got [4, 1, 28, 28]"), "{err}");

    // Calibration without it fails before calibrating, and writes nothing.
    let q = dir.path().join("q.onnx");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let err = fails(qint8(&[
        "quantize",
        s(&m),
        "--calib",
        s(&calib),
        "-o",
        s(&q),
    ]));
    assert!(err.contains("calib-images-idx3-ubyte, pad 0"), "{err}");
    assert!(err.contains("expected [batch, 1, 32, 32]"), "{err}");
    assert!(!q.exists());

    // Not an NPY file.
    let bad = dir.path().join("bad.npy");
    std::fs::write(&bad, b"nope").unwrap();
    let err = fails(qint8(&[
        "run",
        s(&m),
        "--input",
        s(&bad),
        "--output",
        s(&out),
    ]));
    assert!(err.contains("bad.npy"), "{err}");
}

fn value_info(name: &str, dims: &[DimensionValue]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(d.clone()),
                            denotation: String::new(),
                        })
                        .collect(),
                }),
            }),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

/// A model `x -> op_types[0] -> ... -> y` on `[batch, 1, 32, 32]` tensors.
fn tiny_model(path: &Path, op_types: &[&str]) {
    let dims = [
        DimensionValue::DimParam("batch".into()),
        DimensionValue::DimValue(1),
        DimensionValue::DimValue(32),
        DimensionValue::DimValue(32),
    ];
    let n = op_types.len();
    let node = op_types
        .iter()
        .enumerate()
        .map(|(i, op)| NodeProto {
            input: vec![if i == 0 { "x".into() } else { format!("t{i}") }],
            output: vec![if i + 1 == n {
                "y".into()
            } else {
                format!("t{}", i + 1)
            }],
            name: format!("node{i}"),
            op_type: op.to_string(),
            ..Default::default()
        })
        .collect();
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        producer_name: "qint8-cli tests".into(),
        graph: Some(GraphProto {
            node,
            name: "tiny".into(),
            input: vec![value_info("x", &dims)],
            output: vec![value_info("y", &dims)],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, proto.encode_to_vec()).unwrap();
}

#[test]
fn unsupported_ops_are_all_listed() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("exotic.onnx");
    tiny_model(&m, &["Relu", "FancyOpA", "FancyOpB"]);
    let err = fails(qint8(&["inspect", s(&m)]));
    assert!(err.contains("exotic.onnx"), "{err}");
    assert!(err.contains("FancyOpA"), "{err}");
    assert!(err.contains("FancyOpB"), "{err}");
}

#[test]
fn eval_needs_batch_by_classes_output() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("relu.onnx");
    tiny_model(&m, &["Relu"]);
    // The model itself is fine.
    let v = json(&ok(qint8(&["inspect", s(&m), "--json"])));
    assert_eq!(v["op_counts"]["Relu"], 1);
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&eval_images()),
        "--pad",
        "2",
        "--limit",
        "4",
    ]));
    assert!(err.contains("[batch, classes]"), "{err}");
    assert!(err.contains("[batch, 1, 32, 32]"), "{err}");
}

#[test]
fn usage_errors_exit_with_status_2() {
    for args in [
        &["eval"][..],
        &["frobnicate"],
        &["eval", "m.onnx", "--data", "d", "--batch", "0"],
        &["inspect", "m.onnx", "--threads", "zero"],
        &["run", "m.onnx", "--input", "x.npy"],
    ] {
        let o = qint8(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = qint8(&["--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    for sub in ["inspect", "run", "eval", "--threads"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[test]
fn zoo_writes_a_runnable_model() {
    let dir = std::env::temp_dir().join(format!("qint8-cli-zoo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("effnet.onnx");
    let status = Command::new(env!("CARGO_BIN_EXE_qint8"))
        .args([
            "zoo",
            "efficientnet_b0",
            "--width",
            "0.25",
            "--resolution",
            "64",
            "--channels",
            "1",
            "--classes",
            "7",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let model = qint8_graph::onnx::load(&out).unwrap();
    assert_eq!(model.graph.outputs[0].concrete_shape(2), Some(vec![2, 7]));
    let bad = Command::new(env!("CARGO_BIN_EXE_qint8"))
        .args(["zoo", "alexnet", "-o"])
        .arg(dir.join("x.onnx"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("alexnet"));
    assert!(!dir.join("x.onnx").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quantize_writes_a_qdq_model_that_eval_scores_and_check_trt_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let plan = dir.path().join("plan.json");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let summary = json(&ok(qint8(&[
        "quantize",
        s(&model("resnet50.onnx")),
        "--calib",
        s(&calib),
        "--calib-size",
        "64",
        "--method",
        "minmax",
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "-o",
        s(&out),
        "--plan",
        s(&plan),
        "--json",
    ])));
    assert_eq!(summary["calibration_images"], 64);
    assert_eq!(summary["method"], "max");
    // Weights as int8: well under half the FP32 file.
    let fp32 = std::fs::metadata(model("resnet50.onnx")).unwrap().len();
    assert!(summary["output_bytes"].as_u64().unwrap() < fp32 / 2);
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(plan["activations"].as_object().unwrap().len(), 54);
    let report = ok(qint8(&["check-trt", s(&out), "--strict"]));
    assert!(report.contains("0 violation(s), 0 warning(s)"), "{report}");
    let scored = json(&ok(qint8(&[
        "eval",
        s(&out),
        "--data",
        s(&eval_images()),
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "--limit",
        "500",
        "--json",
    ])));
    assert!(scored["top1"].as_f64().unwrap() > 0.9, "{scored}");
}

/// `--activations uint8` writes uint8 zero points (for onnxruntime), which
/// the checker refuses for TensorRT; a TensorRT cache cannot hold them.
#[test]
fn quantize_uint8_activations_for_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("u8.onnx");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let pre = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"];
    let mut args = vec!["quantize", "--calib-size", "64", "--activations", "uint8"];
    let m = model("resnet50.onnx");
    args.extend([s(&m), "--calib", s(&calib), "-o", s(&out)]);
    args.extend(pre);
    let mut json = args.clone();
    json.push("--json");
    let v: serde_json::Value = serde_json::from_str(&ok(qint8(&json))).unwrap();
    assert_eq!(v["activation_type"], "uint8", "{v}");
    let plan =
        qint8_graph::quant::plan_from_qdq(&qint8_graph::onnx::load(&out).unwrap().graph).unwrap();
    assert!(plan.activations.values().all(|p| p.qrange() == (0, 255)));
    let err = fails(qint8(&["check-trt", s(&out)]));
    assert!(err.contains("does not follow TensorRT"), "{err}");
    let images = eval_images();
    let mut eval = vec!["eval", s(&out), "--data", s(&images), "--limit", "500"];
    eval.extend(pre);
    eval.push("--json");
    let scored: serde_json::Value = serde_json::from_str(&ok(qint8(&eval))).unwrap();
    assert!(scored["top1"].as_f64().unwrap() > 0.9, "{scored}");
    std::fs::remove_file(&out).unwrap();
    let cache = dir.path().join("u8.cache");
    args.extend(["--trt-cache", s(&cache)]);
    let err = fails(qint8(&args));
    assert!(err.contains("uint8"), "{err}");
    assert!(!out.exists() && !cache.exists());
}

#[test]
fn check_trt_fails_on_a_float_model_only_when_strict() {
    let fp32 = model("resnet50.onnx");
    let report = ok(qint8(&["check-trt", s(&fp32)]));
    assert!(report.contains("0 violation(s)"), "{report}");
    let err = fails(qint8(&["check-trt", s(&fp32), "--strict"]));
    assert!(err.contains("does not follow TensorRT"), "{err}");
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"\x08\x01\x12garbage").unwrap();
    fails(qint8(&["check-trt", s(garbage.path())]));
}

/// The first `n` eval images as an image folder `root/<digit>/<i>.png`,
/// alternately saved as grayscale and as RGB PNGs (equal channels, so
/// `--grayscale` gets the IDX pixels back exactly). Returns the labels.
fn eval_images_as_folder(root: &Path, n: usize) -> Vec<u8> {
    use qint8_calibration::dataset::{read_idx_images, read_idx_labels};
    let images = read_idx_images(eval_images()).unwrap();
    let labels = read_idx_labels(fixtures().join("data/eval-labels-idx1-ubyte")).unwrap();
    let (h, w) = (images.height() as u32, images.width() as u32);
    for (i, label) in labels.iter().enumerate().take(n) {
        let px = images.image(i).unwrap().to_vec();
        let dir = root.join(label.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        // Zero-padded names keep the folder's path order equal to the IDX order.
        let path = dir.join(format!("{i:05}.png"));
        if i % 2 == 0 {
            image::GrayImage::from_raw(w, h, px)
                .unwrap()
                .save(&path)
                .unwrap();
        } else {
            let rgb: Vec<u8> = px.iter().flat_map(|&v| [v, v, v]).collect();
            image::RgbImage::from_raw(w, h, rgb)
                .unwrap()
                .save(&path)
                .unwrap();
        }
    }
    labels[..n].to_vec()
}

/// Writes `values` as a little-endian int64 NPY vector.
fn write_npy_i64(path: &Path, values: &[i64]) {
    let mut header = format!(
        "{{'descr': '<i8', 'fortran_order': False, 'shape': ({},), }}",
        values.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn eval_on_an_image_folder_matches_the_idx_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    let labels = eval_images_as_folder(&root, 120);
    // All ten classes are present, so folder order gives the digits as labels.
    let mut seen = labels.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..10).collect::<Vec<u8>>());

    let m = model("resnet50.onnx");
    let reference = eval_json("resnet50.onnx", &["--limit", "120", "--threads", "1"]);
    // Same pixels, same padding: the same predictions, image for image.
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            s(&m),
            "--data",
            s(&root),
            "--mean",
            "0.2860",
            "--std",
            "0.3530",
            "--threads",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&ok(qint8(&args)))
    };
    let v = run(&["--grayscale", "--pad", "2"]);
    assert_eq!(v["n"], 120);
    assert_eq!(v["format"], "folder");
    assert_eq!(
        v["correct_top1"], reference["correct_top1"],
        "{v}\n{reference}"
    );
    assert_eq!(v["correct_top5"], reference["correct_top5"]);
    assert!(v["labels"].as_str().unwrap().contains("10 classes"), "{v}");
    assert_eq!(v["input_shape"], serde_json::json!([1, 32, 32]));

    // Resized and cropped to the model's 32x32 instead of padded.
    let v = run(&[
        "--grayscale",
        "--resize",
        "32",
        "--crop",
        "32",
        "--limit",
        "50",
    ]);
    assert_eq!(v["n"], 50);
    assert_eq!(
        (v["resize"].as_u64(), v["crop"].as_u64()),
        (Some(32), Some(32))
    );
    assert_eq!(v["pad"], 0);
    let top1 = v["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1), "{v}");

    // RGB decoding gives 3 channels, which the model rejects with a hint.
    let err = fails(qint8(&["eval", s(&m), "--data", s(&root), "--pad", "2"]));
    assert!(err.contains("[batch, 1, 32, 32]"), "{err}");
    assert!(err.contains("--grayscale"), "{err}");
    // Folder labels come from the class folders only.
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&root),
        "--grayscale",
        "--labels",
        s(&fixtures().join("data/eval-labels-idx1-ubyte")),
    ]));
    assert!(err.contains("class folders"), "{err}");
    // A corrupt image is named.
    std::fs::write(root.join("0/zz-broken.png"), b"not a png").unwrap();
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&root),
        "--grayscale",
        "--pad",
        "2",
    ]));
    assert!(err.contains("zz-broken.png"), "{err}");
    // An empty folder is explained.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = fails(qint8(&["eval", s(&m), "--data", s(&empty)]));
    assert!(err.contains("no class folders"), "{err}");
}

#[test]
fn eval_on_npy_inputs_matches_the_idx_file() {
    use qint8_calibration::{ImageDataset, Preprocess};
    let dir = tempfile::tempdir().unwrap();
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    let labels_idx = fixtures().join("data/eval-labels-idx1-ubyte");
    let ds = ImageDataset::from_idx(eval_images(), Some(&labels_idx), pre)
        .unwrap()
        .take(100)
        .unwrap();
    let batch = ds.batch(0, 100).unwrap();
    let x = dir.path().join("x.npy");
    write_npy_f32(&x, &batch.inputs).unwrap();
    let y = dir.path().join("y.npy");
    let labels: Vec<i64> = batch.labels.unwrap().iter().map(|&l| l as i64).collect();
    write_npy_i64(&y, &labels);

    let m = model("resnet50.onnx");
    let reference = eval_json("resnet50.onnx", &["--limit", "100", "--threads", "1"]);
    let v = json(&ok(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&x),
        "--labels",
        s(&y),
        "--batch",
        "32",
        "--threads",
        "1",
        "--json",
    ])));
    assert_eq!(v["n"], 100);
    assert_eq!(v["format"], "npy");
    assert_eq!(
        v["correct_top1"], reference["correct_top1"],
        "{v}\n{reference}"
    );
    assert_eq!(v["correct_top5"], reference["correct_top5"]);
    assert!(v["mean"].is_null(), "{v}");

    // Labels are required; preprocessing flags are refused; shapes are checked.
    let err = fails(qint8(&["eval", s(&m), "--data", s(&x)]));
    assert!(err.contains("--labels"), "{err}");
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&x),
        "--labels",
        s(&y),
        "--pad",
        "2",
    ]));
    assert!(err.contains("--pad") && err.contains("x.npy"), "{err}");
    let short = dir.path().join("short.npy");
    write_npy_i64(&short, &labels[..10]);
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&x),
        "--labels",
        s(&short),
    ]));
    assert!(
        err.contains("short.npy") && err.contains("10 labels for 100 images"),
        "{err}"
    );
    let flat = dir.path().join("flat.npy");
    write_npy_f32(&flat, &ndarray::Array2::<f32>::zeros((4, 1024))).unwrap();
    let err = fails(qint8(&[
        "eval",
        s(&m),
        "--data",
        s(&flat),
        "--labels",
        s(&y),
    ]));
    assert!(
        err.contains("flat.npy") && err.contains("[4, 1024]"),
        "{err}"
    );
}

#[test]
fn quantize_with_a_calibration_seed_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let m = model("resnet50.onnx");
    let quantize = |data: &Path, seed: Option<&str>, name: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{name}.onnx"));
        let plan = dir.path().join(format!("{name}.json"));
        let mut args = vec![
            "quantize",
            s(&m),
            "--calib",
            s(data),
            "--calib-size",
            "24",
            "--method",
            "minmax",
            "--mean",
            "0.2860",
            "--std",
            "0.3530",
            "-o",
            s(&out),
            "--plan",
            s(&plan),
            "--json",
        ];
        if let Some(seed) = seed {
            args.extend_from_slice(&["--calib-seed", seed]);
        }
        args.extend_from_slice(extra);
        let summary = json(&ok(qint8(&args)));
        let plan: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
        (summary, plan["activations"].clone())
    };
    let (a, plan_a) = quantize(&calib, Some("3"), "a", &["--pad", "2"]);
    assert_eq!(a["calibration_images"], 24);
    assert_eq!(a["calibration_seed"], 3);
    assert_eq!(a["calibration_data_format"], "idx");
    let (_, plan_b) = quantize(&calib, Some("3"), "b", &["--pad", "2"]);
    assert_eq!(plan_a, plan_b, "the same seed must pick the same images");
    let (_, plan_c) = quantize(&calib, Some("4"), "c", &["--pad", "2"]);
    assert_ne!(plan_a, plan_c, "another seed picks other images");
    let (first, plan_first) = quantize(&calib, None, "first", &["--pad", "2"]);
    assert!(first["calibration_seed"].is_null());
    assert_ne!(plan_a, plan_first);

    // An image folder calibrates too (labels are not needed).
    let root = dir.path().join("folder");
    eval_images_as_folder(&root, 40);
    let (f, _) = quantize(&root, Some("1"), "f", &["--grayscale", "--pad", "2"]);
    assert_eq!(f["calibration_images"], 24);
    assert_eq!(f["calibration_data_format"], "folder");
}

/// `--trt-cache` writes a TensorRT cache with a range for every float
/// tensor (more than the planned ones); moving-average min-max calibrates
/// in one pass and records its constant.
#[test]
fn quantize_writes_a_trt_cache_and_supports_moving_average() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let cache = dir.path().join("calib.cache");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let m = model("resnet50.onnx");
    let common = [
        "--calib-size",
        "32",
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "--json",
    ];
    let mut args = vec![
        "quantize",
        s(&m),
        "--calib",
        s(&calib),
        "--method",
        "moving-average",
        "--averaging-constant",
        "0.1",
        "--batch",
        "8",
        "-o",
        s(&out),
        "--trt-cache",
        s(&cache),
    ];
    args.extend_from_slice(&common);
    let summary = json(&ok(qint8(&args)));
    assert_eq!(summary["method"], "moving_average_max(0.1)");
    let planned = summary["activations"].as_u64().unwrap();
    let text = std::fs::read_to_string(&cache).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("TRT-8601-EntropyCalibration2"));
    let entries: Vec<&str> = lines.collect();
    assert_eq!(
        entries.len() as u64,
        summary["trt_cache_tensors"].as_u64().unwrap()
    );
    assert!(
        entries.len() as u64 > planned,
        "{} vs {planned}",
        entries.len()
    );
    // The model input is in the cache with a positive scale.
    let input = entries
        .iter()
        .find(|l| l.starts_with("input: "))
        .expect("input range");
    let bits = u32::from_str_radix(input.trim_start_matches("input: "), 16).unwrap();
    assert!(f32::from_bits(bits) > 0.0);

    // The cache goes last: when it cannot be written the model already
    // written is removed again.
    let bad_out = dir.path().join("bad.onnx");
    let bad_cache = dir.path().join("no-such-dir/bad.cache");
    let mut args = vec![
        "quantize",
        s(&m),
        "--calib",
        s(&calib),
        "--method",
        "minmax",
        "-o",
        s(&bad_out),
        "--trt-cache",
        s(&bad_cache),
    ];
    args.extend_from_slice(&common);
    let err = fails(qint8(&args));
    assert!(err.contains("cache"), "{err}");
    assert!(!bad_out.exists() && !bad_cache.exists());
}

/// Calibration images of the wrong size (28x28 without --pad 2 for a
/// 32x32 model) are an error naming both shapes, and nothing is written.
#[test]
fn quantize_rejects_images_of_the_wrong_shape_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let err = fails(qint8(&[
        "quantize",
        s(&model("resnet50.onnx")),
        "--calib",
        s(&calib),
        "--calib-size",
        "8",
        "-o",
        s(&out),
    ]));
    assert!(
        err.contains("[8, 1, 28, 28]") && err.contains("32, 32]"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `--keep-float` leaves the named nodes (globs allowed) without Q/DQ on
/// their inputs, reports them, and names patterns that match nothing.
#[test]
fn quantize_keeps_named_nodes_in_float() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let run = |keep: &str| {
        qint8(&[
            "quantize",
            s(&model("resnet50.onnx")),
            "--calib",
            s(&calib_images()),
            "--calib-size",
            "16",
            "--pad",
            "2",
            "--keep-float",
            keep,
            "--json",
            "-o",
            s(&out),
        ])
    };
    let summary = json(&ok(run("/conv1/Conv,*/fc/*")));
    assert_eq!(
        summary["float_nodes"],
        serde_json::json!(["/conv1/Conv", "/fc/Gemm"])
    );
    let bytes = std::fs::read(&out).unwrap();
    let g = ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
    let dq: Vec<&str> = g
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    let reads_dq = |name: &str| {
        let n = g.node.iter().find(|n| n.name == name).unwrap();
        n.input.iter().any(|i| dq.contains(&i.as_str()))
    };
    assert!(!reads_dq("/conv1/Conv") && !reads_dq("/fc/Gemm"));
    assert!(reads_dq("/layer1/layer1.0/conv1/Conv"));
    ok(qint8(&["check-trt", s(&out)]));
    std::fs::remove_file(&out).unwrap();
    let err = fails(run("/conv1/Conv,/relu/Relu"));
    assert!(
        err.contains("`/relu/Relu` matches no node with quantized inputs"),
        "{err}"
    );
    assert!(!out.exists());
}

fn calib_images() -> PathBuf {
    fixtures().join("data/calib-images-idx3-ubyte")
}

/// `qint8 compare` on resnet50 with the fixtures' preprocessing.
fn compare(extra: &[&str]) -> Output {
    compare_on("resnet50.onnx", extra)
}

/// `qint8 compare` on a fixture model with the fixtures' preprocessing.
fn compare_on(fixture: &str, extra: &[&str]) -> Output {
    let m = model(fixture);
    let calib = calib_images();
    let images = eval_images();
    let mut args = vec![
        "compare",
        s(&m),
        "--calib",
        s(&calib),
        "--data",
        s(&images),
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
    ];
    args.extend_from_slice(extra);
    qint8(&args)
}

#[test]
fn compare_reports_every_method_and_granularity() {
    let v = json(&ok(compare(&[
        "--calib-size",
        "64",
        "--limit",
        "200",
        "--methods",
        "minmax,entropy,minmax",
        "--json",
    ])));
    assert_eq!(v["n"], 200);
    assert_eq!(v["calibration_images"], 64);
    let fp32 = v["fp32_top1"].as_f64().unwrap();
    assert!(fp32 > 0.85, "{v}");
    let fp32_bytes = v["fp32_file_bytes"].as_u64().unwrap();
    let rows = v["rows"].as_array().unwrap();
    let keys: Vec<(&str, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap(),
                r["per_channel"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("minmax", true),
            ("minmax", false),
            ("entropy", true),
            ("entropy", false)
        ]
    );
    for r in rows {
        let top1 = r["top1"].as_f64().unwrap();
        let top5 = r["top5"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1) && top5 >= top1, "{r}");
        let drop = r["drop_pp"].as_f64().unwrap();
        assert!((drop - (fp32 - top1) * 100.0).abs() < 1e-9, "{r}");
        if r["per_channel"] == true {
            assert!(drop.abs() <= 3.0, "per-channel INT8 far from FP32: {r}");
        }
        let bytes = r["file_bytes"].as_u64().unwrap();
        // int8 weights: well under half the FP32 file.
        assert!(bytes > 0 && bytes < fp32_bytes / 2, "{r}");
        assert!(r["calibration_seconds"].as_f64().unwrap() >= 0.0, "{r}");
    }
    // A method's two rows share one calibration, and per-tensor weights
    // take fewer scales.
    assert_eq!(
        rows[2]["calibration_seconds"],
        rows[3]["calibration_seconds"]
    );
    assert!(rows[3]["file_bytes"].as_u64() < rows[2]["file_bytes"].as_u64());

    // The per-tensor entropy row is what `qint8 quantize --per-tensor` writes
    // and `qint8 eval` scores.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let calib = calib_images();
    let q = json(&ok(qint8(&[
        "quantize",
        s(&model("resnet50.onnx")),
        "--calib",
        s(&calib),
        "--calib-size",
        "64",
        "--method",
        "entropy",
        "--per-tensor",
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "-o",
        s(&out),
        "--json",
    ])));
    assert_eq!(q["output_bytes"], rows[3]["file_bytes"]);
    assert_eq!(q["method"], rows[3]["calibration_method"]);
    let e = json(&ok(qint8(&[
        "eval",
        s(&out),
        "--data",
        s(&eval_images()),
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "--limit",
        "200",
        "--json",
    ])));
    assert_eq!(e["top1"], rows[3]["top1"]);
    assert_eq!(e["top5"], rows[3]["top5"]);
}

/// `qint8 quantize` of a fixture with the fixtures' preprocessing, then
/// `qint8 eval` of the result on `limit` evaluation images: (quantize's
/// JSON, eval's JSON).
fn quantize_and_eval(
    fixture: &str,
    extra: &[&str],
    limit: &str,
) -> (serde_json::Value, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let (m, calib, images) = (model(fixture), calib_images(), eval_images());
    let pre = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"];
    let mut args = vec![
        "quantize",
        s(&m),
        "--calib",
        s(&calib),
        "-o",
        s(&out),
        "--json",
    ];
    args.extend_from_slice(&pre);
    args.extend_from_slice(extra);
    let q = json(&ok(qint8(&args)));
    let mut args = vec![
        "eval",
        s(&out),
        "--data",
        s(&images),
        "--limit",
        limit,
        "--json",
    ];
    args.extend_from_slice(&pre);
    (q, json(&ok(qint8(&args))))
}

#[test]
fn compare_calibrates_per_tensor_rows_again_where_smoothing_weighs_the_weights() {
    // EfficientNet-B0's gated activations are smoothed, and the factors
    // depend on the weights' granularity: the per-tensor row must still be
    // what `qint8 quantize --per-tensor` writes.
    // Every calibration image and all 2000 evaluation images: fewer did
    // not tell the two choices apart.
    let v = json(&ok(compare_on(
        "efficientnet_b0.onnx",
        &["--methods", "minmax", "--json"],
    )));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows[1]["per_channel"], false, "{v}");
    for (row, flag) in [(&rows[0], "--per-channel"), (&rows[1], "--per-tensor")] {
        let (q, e) = quantize_and_eval(
            "efficientnet_b0.onnx",
            &["--method", "minmax", flag],
            "2000",
        );
        assert_eq!(q["output_bytes"], row["file_bytes"], "{flag}");
        assert_eq!(
            (&e["top1"], &e["top5"]),
            (&row["top1"], &row["top5"]),
            "{flag}"
        );
    }
}

#[test]
fn compare_prints_a_table_with_the_fp32_row() {
    let out = ok(compare(&[
        "--calib-size",
        "16",
        "--limit",
        "50",
        "--methods",
        "percentile",
        "--percentile",
        "99.9",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("method"))
        .unwrap_or_else(|| panic!("no table header:\n{out}"));
    assert!(lines[header].contains("drop (pp)"), "{out}");
    assert!(lines[header + 2].starts_with("fp32"), "{out}");
    assert!(
        lines[header + 3].starts_with("percentile  per-channel"),
        "{out}"
    );
    assert!(
        lines[header + 4].starts_with("percentile  per-tensor"),
        "{out}"
    );
}

#[test]
fn compare_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent-images-idx3-ubyte");
    let m = model("resnet50.onnx");
    let calib = calib_images();
    let err = fails(qint8(&[
        "compare",
        s(&m),
        "--calib",
        s(&calib),
        "--pad",
        "2",
        "--data",
        s(&absent),
        "--json",
    ]));
    assert!(
        err.contains("absent-images-idx3-ubyte") && err.contains("not found"),
        "{err}"
    );
    let err = fails(qint8(&[
        "compare",
        s(&m),
        "--calib",
        s(&absent),
        "--data",
        s(&eval_images()),
    ]));
    assert!(err.contains("not found"), "{err}");

    let o = compare(&["--methods", "minmax,kl"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("'kl'") && err.contains("moving-average"),
        "{err}"
    );
    assert!(o.stdout.is_empty());

    let err = fails(compare(&["--methods", "percentile", "--percentile", "0"]));
    assert!(err.contains("--percentile"), "{err}");
}

/// EfficientNet-B0's squeeze-and-excitation outputs are smoothed by
/// default, not with --no-smooth or --trt-cache; a strength outside [0, 1]
/// is a usage error.
#[test]
fn quantize_smooths_gated_activations_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let cache = dir.path().join("c.cache");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let m = model("efficientnet_b0.onnx");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "quantize",
            s(&m),
            "--calib",
            s(&calib),
            "--calib-size",
            "16",
            "--pad",
            "2",
            "--json",
            "-o",
            s(&out),
        ];
        args.extend_from_slice(extra);
        qint8(&args)
    };
    for (extra, smoothed) in [
        (&[][..], 16),
        (&["--smooth", "0.5"][..], 16),
        (&["--no-smooth"][..], 0),
        (&["--trt-cache", s(&cache)][..], 0),
    ] {
        let summary = json(&ok(run(extra)));
        assert_eq!(summary["smoothed"], smoothed, "{extra:?}");
    }
    let o = run(&["--smooth", "1.5"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("[0, 1]"), "{}", stderr(&o));
}

/// `qint8 demo` (reduced: 64 calibration and 200 evaluation images, two
/// methods) prints the target table for the three fixtures and writes the
/// report directory.
#[test]
fn demo_prints_the_target_table_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = qint8(&[
        "demo",
        "-o",
        s(&out),
        "--calib-size",
        "64",
        "--limit",
        "200",
        "--methods",
        "entropy,minmax",
        "--threads",
        "2",
    ]);
    let text = ok(o);
    assert!(text.starts_with("Target performance"), "{text}");
    for model in ["resnet50", "vgg16_bn", "efficientnet_b0"] {
        for metric in [
            "top-1 drop, entropy (default)",
            "top-1 drop, best method",
            "file size reduction",
            "CPU speedup, batch 1",
            "CPU speedup, batch 32",
            "runtime memory reduction, batch 1",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(model) && l.contains(metric)),
                "{model} {metric}:\n{text}"
            );
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Target performance"));
    let svgs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".svg"))
        .collect();
    // Per model: top-1, three histograms, per-layer SQNR, sensitivity.
    assert_eq!(svgs.len(), 18, "{svgs:?}");
    assert_eq!(md.matches("Which layer hurts (entropy model").count(), 3);
    for n in &svgs {
        assert!(md.contains(&format!("]({n})")), "{n}");
        let svg = std::fs::read_to_string(out.join(n)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{n}"
        );
    }
}

/// `qint8 report` on one model: the chosen methods' rows, their thresholds
/// on the histogram plots, the per-layer table.
#[test]
fn report_writes_one_models_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let m = model("vgg16_bn.onnx");
    let text = ok(qint8(&[
        "report",
        s(&m),
        "--calib",
        s(&calib),
        "--calib-size",
        "64",
        "--data",
        s(&eval_images()),
        "--limit",
        "128",
        "--methods",
        "entropy,percentile",
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "-o",
        s(&out),
    ]));
    assert!(text.contains("report.md (6 plots)"), "{text}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| entropy |") && md.contains("| percentile |"),
        "{md}"
    );
    assert!(!md.contains("| minmax |"));
    assert!(md.contains("Per-layer error of the entropy model"));
    // Which layer hurts, on the 128 evaluation images: the ten most
    // sensitive of VGG-16-BN's 16 nodes, and their chart.
    assert!(
        md.contains("Which layer hurts (entropy model, 128 images"),
        "{md}"
    );
    let rows = md
        .lines()
        .filter(|l| l.starts_with("| ") && (l.contains("` | Conv |") || l.contains("` | Gemm |")))
        .count();
    assert_eq!(rows, 10, "{md}");
    assert!(md.contains("](vgg16_bn-sensitivity.svg)"));
    let hist = std::fs::read_to_string(out.join("vgg16_bn-hist-1.svg")).unwrap();
    assert_eq!(hist.matches("class=\"marker\"").count(), 2, "{hist}");
    assert!(hist.contains(">entropy ") && hist.contains(">percentile "));
    // Bad input: a model file that does not exist, no directory left.
    let bad = dir.path().join("bad");
    let err = fails(qint8(&[
        "report",
        "missing.onnx",
        "--calib",
        s(&calib),
        "--data",
        s(&eval_images()),
        "-o",
        s(&bad),
    ]));
    assert!(err.contains("missing.onnx"), "{err}");
    assert!(!bad.exists());
}

/// A classifier `x [batch, 1, 32, 32] -> Conv -> Where -> global pool ->
/// Gemm -> y [batch, 10]`: it runs and quantizes, but the backward pass has
/// no rule for Where.
fn classifier_with_where(path: &Path) {
    use qint8_graph::{ConvAttrs, Dim, Graph, Model, Node, Op, Tensor, ValueInfo};
    let tensor = |shape: &[usize]| {
        let len: usize = shape.iter().product();
        let v = (0..len)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 20.0)
            .collect();
        Tensor::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).unwrap())
    };
    let mut x = ValueInfo::f32("x", &[1, 1, 32, 32]);
    x.shape = Some(vec![
        Dim::Symbolic("batch".into()),
        Dim::Fixed(1),
        Dim::Fixed(32),
        Dim::Fixed(32),
    ]);
    let mut y = ValueInfo::f32("y", &[1, 10]);
    y.shape = Some(vec![Dim::Symbolic("batch".into()), Dim::Fixed(10)]);
    let conv = Op::Conv(ConvAttrs {
        kernel_shape: None,
        strides: vec![1, 1],
        pads: vec![1; 4],
        dilations: vec![1, 1],
        group: 1,
        auto_pad: Default::default(),
    });
    let gemm = Op::Gemm {
        alpha: 1.0,
        beta: 1.0,
        trans_a: false,
        trans_b: true,
    };
    let graph = Graph {
        name: "where".into(),
        inputs: vec![x],
        outputs: vec![y],
        nodes: vec![
            Node::new("conv", conv, &["x", "w"], &["a"]),
            Node::new("relu", Op::Relu, &["a"], &["r"]),
            Node::new("where", Op::Where, &["keep", "r", "zero"], &["c"]),
            Node::new("gap", Op::GlobalAveragePool, &["c"], &["p"]),
            Node::new("flat", Op::Flatten { axis: 1 }, &["p"], &["f"]),
            Node::new("fc", gemm, &["f", "w2", "b2"], &["y"]),
        ],
        initializers: [
            ("w".to_string(), tensor(&[4, 1, 3, 3])),
            ("w2".to_string(), tensor(&[10, 4])),
            ("b2".to_string(), tensor(&[10])),
            (
                "keep".to_string(),
                Tensor::Bool(ndarray::arr1(&[true]).into_dyn()),
            ),
            ("zero".to_string(), Tensor::scalar_f32(0.0)),
        ]
        .into_iter()
        .collect(),
        value_info: vec![],
    };
    qint8_graph::onnx::save(&Model::new(graph, 17), path).unwrap();
}

/// A model the sensitivity analysis cannot run still gets its report,
/// which says why that part is missing.
#[test]
fn report_without_sensitivity_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("where.onnx");
    classifier_with_where(&m);
    let out = dir.path().join("r");
    let text = ok(qint8(&[
        "report",
        s(&m),
        "--calib",
        s(&fixtures().join("data/calib-images-idx3-ubyte")),
        "--calib-size",
        "32",
        "--data",
        s(&eval_images()),
        "--limit",
        "64",
        "--methods",
        "entropy",
        "--pad",
        "2",
        "-o",
        s(&out),
    ]));
    assert!(text.contains("report.md"), "{text}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| entropy |"), "{md}");
    assert!(md.contains("Which layer hurts: not measured ("), "{md}");
    assert!(md.contains("Where"), "{md}");
    assert!(!out.join("where-sensitivity.svg").exists());
}

/// `qint8 sensitivity` ranks every Conv/Gemm node of the ResNet-50 fixture
/// and writes its chart; `qint8 mixed-precision` meets a budget it can meet,
/// writes a model that passes check-trt, evaluates to the top-1 it reports,
/// and rejects a negative budget.
#[test]
fn sensitivity_ranks_nodes_and_mixed_precision_meets_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let m = model("resnet50.onnx");
    let chart = dir.path().join("s.svg");
    let common = |extra: &[&str]| {
        let mut v: Vec<String> = vec![
            s(&m).into(),
            "--calib".into(),
            s(&calib).into(),
            "--calib-size".into(),
            "64".into(),
            "--data".into(),
            s(&eval_images()).into(),
            "--sensitivity-images".into(),
            "64".into(),
            "--pad".into(),
            "2".into(),
            "--mean".into(),
            "0.2860".into(),
            "--std".into(),
            "0.3530".into(),
            "--method".into(),
            "minmax".into(),
            "--per-tensor".into(),
            "--json".into(),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let mut args = vec!["sensitivity".to_string()];
    args.extend(common(&["--chart", s(&chart)]));
    let v = json(&ok(qint8(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )));
    let nodes = v["nodes"].as_array().unwrap();
    // ResNet-50: 53 convolutions and the classifier Gemm.
    assert_eq!(nodes.len(), 54);
    assert_eq!(v["analysis"], "linearized");
    assert_eq!(nodes[0]["rank"], 1);
    let js = |i: usize| nodes[i]["quantized_alone"]["js"].as_f64().unwrap();
    assert!(js(0) >= js(1) && js(1) >= js(53));
    let images = v["images"].as_f64().unwrap();
    assert_eq!(images, 64.0);
    assert!(nodes[0]["quantized_alone"]["js_stderr"].as_f64().unwrap() > 0.0);
    assert!(nodes.iter().all(|n| {
        let a = &n["quantized_alone"];
        let (js, se) = (a["js"].as_f64().unwrap(), a["js_stderr"].as_f64().unwrap());
        a["kl"].as_f64().unwrap() >= 0.0
            && (0.0..=std::f64::consts::LN_2).contains(&js)
            // Per-image divergences lie in [0, ln 2] and average to js, so
            // their variance is at most js * (ln 2 - js) (Bhatia-Davis).
            && se >= 0.0
            && se <= (js * (std::f64::consts::LN_2 - js) / (images - 1.0)).sqrt() + 1e-12
            && n["output_sqnr_db"].as_f64().is_some()
    }));
    // Every top set but the whole has a z, at least 0 down a ranking by mean.
    assert!(nodes[..53]
        .iter()
        .all(|n| n["top_set_z"].as_f64().is_some_and(|z| z >= 0.0)));
    assert!(nodes[53]["top_set_z"].is_null());
    // The table says which top sets (of up to 10) these images resolve.
    let text = ok(qint8(
        &args
            .iter()
            .map(String::as_str)
            .filter(|a| *a != "--json")
            .collect::<Vec<_>>(),
    ));
    assert!(text.contains("top-k apart, z"), "{text}");
    let resolved: Vec<String> = nodes[..10]
        .iter()
        .filter(|n| n["top_set_z"].as_f64().unwrap() >= 2.0)
        .map(|n| n["rank"].to_string())
        .collect();
    let told = if resolved.is_empty() {
        "no top set of up to 10 nodes".to_string()
    } else {
        format!("the top {}", resolved.join(", "))
    };
    assert!(
        text.contains(&format!("These images set {told} apart")),
        "{told}\n{text}"
    );
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert_eq!(svg.matches("class=\"bar\"").count(), 25);
    // With their standard errors as error bars.
    assert!(svg.matches("class=\"error\"").count() > 0, "{svg}");
    // Without --split, no split; with it, every node's weights-only and
    // activations-only figures.
    assert!(nodes.iter().all(|n| n["split"].is_null()));
    let mut args = vec!["sensitivity".to_string()];
    args.extend(common(&["--split", "--chart", s(&chart)]));
    let sp = json(&ok(qint8(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )));
    let split_nodes = sp["nodes"].as_array().unwrap();
    assert_eq!(split_nodes.len(), 54);
    for n in split_nodes {
        let (w, a) = (&n["split"]["weights"], &n["split"]["activations"]);
        assert!(
            w["js"].as_f64().unwrap() > 0.0 && a["js"].as_f64().unwrap() > 0.0,
            "{n}"
        );
        assert!(w["top1"].as_f64().is_some() && a["js_stderr"].as_f64().is_some());
    }
    // The same ranking: the split adds figures, it changes none.
    assert_eq!(split_nodes[0]["node"], nodes[0]["node"]);
    assert_eq!(
        split_nodes[0]["quantized_alone"]["js"],
        nodes[0]["quantized_alone"]["js"]
    );
    // The exact analysis (a real evaluation per configuration) puts the
    // same node first.
    let mut args = vec!["sensitivity".to_string()];
    args.extend(common(&["--exact", "--chart", s(&chart)]));
    let e = json(&ok(qint8(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )));
    assert_eq!(e["analysis"], "exact");
    assert_eq!(e["nodes"][0]["node"], nodes[0]["node"], "{e}");
    assert!(e["nodes"][0]["output_sqnr_db"].is_null());

    let out = dir.path().join("mp.onnx");
    let mut args = vec!["mixed-precision".to_string()];
    args.extend(common(&[]));
    args.extend(["--max-drop", "5", "-o", s(&out)].map(String::from));
    let v = json(&ok(qint8(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )));
    assert_eq!(v["met"], true, "{v}");
    let drop = v["drop_pp"].as_f64().unwrap();
    assert!(drop <= 5.0, "{v}");
    let curve = v["curve"].as_array().unwrap();
    assert_eq!(curve.len(), v["float_nodes"].as_array().unwrap().len() + 1);
    assert!(v["float_residual_adds"].is_array(), "{v}");
    assert!(out.with_extension("svg").exists());
    ok(qint8(&["check-trt", s(&out)]));
    let e = eval_json_path(&out);
    assert!(
        (e["top1"].as_f64().unwrap() - v["top1"].as_f64().unwrap()).abs() < 1e-9,
        "{e} {v}"
    );
    // --keep-float: the node is neither analyzed nor chosen, and counts
    // among the float nodes from the curve's first point on.
    let top = nodes[0]["node"].as_str().unwrap();
    let mut args = vec!["sensitivity".to_string()];
    args.extend(common(&["--chart", s(&chart), "--keep-float", top]));
    let k = json(&ok(qint8(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )));
    let analyzed = k["nodes"].as_array().unwrap();
    assert_eq!(analyzed.len(), 53);
    assert!(analyzed.iter().all(|n| n["node"] != top));
    assert_eq!(k["kept_float"], serde_json::json!([top]));
    let plan = dir.path().join("mp.plan.json");
    let mut args = vec!["mixed-precision".to_string()];
    args.extend(common(&[
        "--keep-float",
        top,
        "--max-float",
        "1",
        "--candidates",
        "5",
        "--plan",
        s(&plan),
        "-o",
        s(&out),
    ]));
    let k = json(&ok(qint8(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )));
    // The plan keeps both the kept and the chosen node in float.
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let float: Vec<&str> = written["precision"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| *v == "float")
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(float.contains(&top), "{written}");
    assert!(
        float.contains(&k["float_nodes"][0].as_str().unwrap()),
        "{written}"
    );
    assert_eq!(k["kept_float"], serde_json::json!([top]));
    assert_eq!(k["candidates"], 5);
    assert_eq!(k["quantizable_nodes"], 54);
    let chosen = k["float_nodes"].as_array().unwrap();
    assert!(chosen.len() == 1 && chosen[0] != top, "{k}");
    assert_eq!(k["curve"][0]["float_nodes"], 1);
    assert_eq!(k["curve"][1]["float_nodes"], 2);

    let mut args = vec!["mixed-precision".to_string()];
    args.extend(common(&[]));
    args.extend(["--max-drop", "-1", "-o", s(&dir.path().join("bad.onnx"))].map(String::from));
    let err = fails(qint8(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(err.contains("--max-drop"), "{err}");
    assert!(!dir.path().join("bad.onnx").exists());
    let mut args = vec!["mixed-precision".to_string()];
    args.extend(common(&[]));
    args.extend(["--candidates", "0", "-o", s(&dir.path().join("bad.onnx"))].map(String::from));
    let o = qint8(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--candidates"), "{}", stderr(&o));
    assert!(!dir.path().join("bad.onnx").exists());
}

/// Data without labels: both commands say how to score it against FP32's
/// predictions, and with --fp32-labels they do. The divergences do not
/// depend on labels, so they are the labeled run's, figure for figure;
/// top-1 becomes agreement with FP32, which `qint8 eval`'s predictions of
/// the two models confirm for the file mixed precision writes, as does
/// `eval --reference`. `compare` and `report` take the flag too.
#[test]
fn sensitivity_and_mixed_precision_score_unlabeled_data_against_fp32() {
    let dir = tempfile::tempdir().unwrap();
    // The first 300 evaluation images, with no labels file beside them.
    let n = 300usize;
    let all = std::fs::read(eval_images()).unwrap();
    let mut idx = all[..16].to_vec();
    idx[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    idx.extend_from_slice(&all[16..16 + n * 28 * 28]);
    let unlabeled = dir.path().join("shop-images-idx3-ubyte");
    std::fs::write(&unlabeled, idx).unwrap();
    let m = model("vgg16_bn.onnx");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let pre = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"];
    let run = |command: &str, data: &Path, extra: &[&str]| {
        let mut args = vec![command, s(&m), "--data", s(data), "--calib", s(&calib)];
        args.extend(["--calib-size", "64", "--method", "minmax", "--per-tensor"]);
        args.extend(pre);
        args.extend(extra);
        qint8(&args)
    };
    let chart = ["--chart", "/dev/null"];
    let err = fails(run("sensitivity", &unlabeled, &chart));
    assert!(
        err.contains("no labels file") && err.contains("--fp32-labels"),
        "{err}"
    );
    // --labels and --fp32-labels contradict each other.
    let mut both = chart.to_vec();
    both.extend(["--fp32-labels", "--labels", "x"]);
    assert_eq!(run("sensitivity", &unlabeled, &both).status.code(), Some(2));

    let json_chart = ["--chart", "/dev/null", "--json"];
    let labeled = {
        // The same 300 images, with their labels.
        let mut e = json_chart.to_vec();
        e.extend(["--sensitivity-images", "300"]);
        json(&ok(run("sensitivity", &eval_images(), &e)))
    };
    let mut e = json_chart.to_vec();
    e.push("--fp32-labels");
    let v = json(&ok(run("sensitivity", &unlabeled, &e)));
    assert_eq!(v["scored_against"], "fp32 predictions");
    assert_eq!(labeled["scored_against"], "labels");
    assert_eq!(
        (v["images"].as_u64(), v["fp32_top1"].as_f64()),
        (Some(300), Some(1.0))
    );
    assert!(labeled["fp32_top1"].as_f64().unwrap() < 1.0, "{labeled}");
    let int8 = v["int8"]["top1"].as_f64().unwrap();
    assert!((0.9..1.0).contains(&int8), "{v}");
    let js = |v: &Value| -> std::collections::BTreeMap<String, Value> {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap().to_string(),
                    n["quantized_alone"]["js"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(js(&v).len(), 16);
    assert_eq!(js(&v), js(&labeled));
    let text = ok(run(
        "sensitivity",
        &unlabeled,
        &["--chart", "/dev/null", "--fp32-labels"],
    ));
    // Charts sent to /dev/null went through it: it is still the device.
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let null = std::fs::metadata("/dev/null").unwrap().file_type();
        assert!(null.is_char_device(), "/dev/null was replaced");
    }
    assert!(text.contains("agreement with FP32"), "{text}");

    let out = dir.path().join("mixed.onnx");
    let mut e = vec!["--fp32-labels", "--json", "--max-float", "1", "-o", s(&out)];
    e.extend(["--max-drop", "0"]);
    let mp = json(&ok(run("mixed-precision", &unlabeled, &e)));
    assert_eq!(mp["scored_against"], "fp32 predictions");
    assert_eq!(mp["fp32_top1"].as_f64(), Some(1.0));
    // Agreement of the written file's predictions with FP32's.
    let images = eval_images();
    let predict = |model: &Path, to: &Path| {
        let mut args = vec!["eval", s(model), "--data", s(&images)];
        args.extend(pre);
        args.extend(["--limit", "300", "--json", "--predictions", s(to)]);
        ok(qint8(&args));
        read_npy_f32(to).unwrap()
    };
    let (a, b) = (
        predict(&m, &dir.path().join("fp32.npy")),
        predict(&out, &dir.path().join("mixed.npy")),
    );
    let agree = a.iter().zip(b.iter()).filter(|(x, y)| x == y).count();
    let top1 = mp["top1"].as_f64().unwrap();
    assert!(
        (top1 - agree as f64 / n as f64).abs() < 1e-12,
        "{agree} {mp}"
    );
    // `eval --reference` scores the file against FP32's predictions.
    let mut args = vec![
        "eval",
        s(&out),
        "--data",
        s(&unlabeled),
        "--reference",
        s(&m),
    ];
    args.extend(pre);
    args.push("--json");
    let v = json(&ok(qint8(&args)));
    assert_eq!(
        (v["n"].as_u64(), v["correct_top1"].as_u64()),
        (Some(n as u64), Some(agree as u64))
    );
    assert!(
        v["labels"].as_str().unwrap().starts_with("predictions of"),
        "{v}"
    );

    // compare and report take the flag too.
    let study = |command: &str, extra: &[&str]| {
        let mut args = vec![
            command,
            s(&m),
            "--data",
            s(&unlabeled),
            "--calib",
            s(&calib),
        ];
        args.extend(["--calib-size", "64", "--methods", "minmax"]);
        args.extend(pre);
        args.extend(extra);
        qint8(&args)
    };
    let err = fails(study("compare", &[]));
    assert!(err.contains("--fp32-labels"), "{err}");
    let c = json(&ok(study("compare", &["--fp32-labels", "--json"])));
    assert_eq!(c["fp32_top1"].as_f64(), Some(1.0), "{c}");
    assert!(
        c["labels"].as_str().unwrap().contains("--fp32-labels"),
        "{c}"
    );
    let rows = c["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| (0.9..=1.0).contains(&r["top1"].as_f64().unwrap())));
    let report = dir.path().join("report");
    ok(study("report", &["--fp32-labels", "-o", s(&report)]));
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(
        md.contains("agreement with FP32") && md.contains("| fp32 | 100.00 |"),
        "{md}"
    );
}

/// A model quantized already is analyzed as its file quantizes it: with
/// float weights the analysis is the one of the float model calibrated the
/// same way, figure for figure; with int8 weights it says the reference
/// computes with them; mixed precision writes a file TensorRT accepts.
#[test]
fn sensitivity_and_mixed_precision_read_a_qdq_model() {
    let dir = tempfile::tempdir().unwrap();
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let m = model("vgg16_bn.onnx");
    let pre = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"];
    let data = eval_images();
    let analysis = |model: &Path, extra: &[&str]| {
        let mut args = vec!["sensitivity", s(model), "--data", s(&data)];
        args.extend(["--sensitivity-images", "100", "--chart", "/dev/null"]);
        args.extend(pre);
        args.extend(extra);
        qint8(&args)
    };
    let analysis_json = |model: &Path, extra: &[&str]| {
        let mut extra = extra.to_vec();
        extra.push("--json");
        json(&ok(analysis(model, &extra)))
    };
    let cal = ["--calib", s(&calib), "--calib-size", "100"];
    let float_weights = dir.path().join("f.onnx");
    let int8_weights = dir.path().join("q.onnx");
    for (out, extra) in [
        (&float_weights, &["--float-weights"][..]),
        (&int8_weights, &[]),
    ] {
        let mut args = vec!["quantize", s(&m), "-o", s(out)];
        args.extend(cal);
        args.extend(pre);
        args.extend(extra);
        ok(qint8(&args));
    }
    let from_float = analysis_json(&m, &cal);
    let from_file = analysis_json(&float_weights, &[]);
    assert_eq!(from_float["source"]["quantization"], "calibrated");
    assert_eq!(from_file["source"]["quantization"], "read from the file");
    assert_eq!(from_file["source"]["integer_initializers"], 0);
    for key in ["fp32_top1", "int8", "nodes"] {
        assert_eq!(from_float[key], from_file[key], "{key}");
    }
    let v = analysis_json(&int8_weights, &[]);
    assert_eq!(v["source"]["integer_initializers"], 16);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 16);
    let text = ok(analysis(&int8_weights, &[]));
    assert!(
        text.contains("stores 16 weights or biases as integers"),
        "{text}"
    );
    // With the FP32 model the int8 file was made from, the analysis is
    // the FP32 model's again; --fp32 needs a QDQ model and its own FP32
    // model.
    let restored = analysis_json(&int8_weights, &["--fp32", s(&m)]);
    for key in ["fp32_top1", "int8", "nodes"] {
        assert_eq!(from_float[key], restored[key], "{key}");
    }
    let fw = &restored["source"]["fp32_weights"];
    assert_eq!(fw["restored"].as_array().unwrap().len(), 16, "{fw}");
    assert_eq!(fw["kept"], serde_json::json!([]));
    let mut with_float_model = cal.to_vec();
    with_float_model.extend(["--fp32", s(&m)]);
    let err = fails(analysis(&m, &with_float_model));
    assert!(
        err.contains("--fp32") && err.contains("not quantized"),
        "{err}"
    );
    let err = fails(analysis(
        &int8_weights,
        &["--fp32", s(&model("resnet50.onnx"))],
    ));
    assert!(err.contains("no weight of"), "{err}");
    // --keep-float among the nodes the file quantizes.
    let first = "/features/features.0/Conv";
    let k = analysis_json(&int8_weights, &["--keep-float", first]);
    assert_eq!(k["kept_float"], serde_json::json!([first]));
    assert_eq!(k["nodes"].as_array().unwrap().len(), 15);
    let err = fails(analysis(&int8_weights, &["--keep-float", "/nothing*"]));
    assert!(err.contains("`/nothing*` matches no node"), "{err}");

    // Mixed precision on the file: a QDQ file with one node in float.
    let out = dir.path().join("mp.onnx");
    let mut args = vec!["mixed-precision", s(&int8_weights), "--data", s(&data)];
    args.extend([
        "--sensitivity-images",
        "100",
        "--max-float",
        "1",
        "--json",
        "-o",
        s(&out),
    ]);
    args.extend(pre);
    let k = json(&ok(qint8(&args)));
    assert_eq!(k["float_nodes"].as_array().unwrap().len(), 1, "{k}");
    assert_eq!(k["source"]["quantization"], "read from the file");
    let report = ok(qint8(&["check-trt", s(&out)]));
    assert!(report.contains("0 violation(s)"), "{report}");

    // A quantized model takes no calibration; a float one needs it.
    let err = fails(analysis(&int8_weights, &cal));
    assert!(
        err.contains("quantized already") && err.contains("--calib"),
        "{err}"
    );
    let o = analysis(&m, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--calib"), "{}", stderr(&o));
    let o = qint8(&["quantize", s(&m), "-o", s(&dir.path().join("x.onnx"))]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--calib"), "{}", stderr(&o));
}

/// `qint8 eval --json` of a model file on the fixture eval slice.
fn eval_json_path(model: &Path) -> Value {
    json(&ok(qint8(&[
        "eval",
        s(model),
        "--data",
        s(&eval_images()),
        "--pad",
        "2",
        "--mean",
        "0.2860",
        "--std",
        "0.3530",
        "--json",
    ])))
}

#[test]
fn qat_trains_the_weak_configuration_and_writes_what_it_scored() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("efficientnet_b0.onnx");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let out = dir.path().join("qat.onnx");
    let plan = dir.path().join("qat.json");
    let pre = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"];
    let run = |train: &Path, extra: &[&str]| {
        let mut args = vec!["qat", s(&m), "--calib", s(&calib), "--train", s(train)];
        args.extend(["--calib-size", "32", "--method", "minmax", "--per-tensor"]);
        args.extend(["--train-images", "256", "--data", s(&calib)]);
        args.extend(["-o", s(&out), "--plan", s(&plan)]);
        args.extend(pre);
        args.extend(extra);
        qint8(&args)
    };
    let v: serde_json::Value =
        serde_json::from_str(&ok(run(&calib, &["--json", "--epochs", "2"]))).unwrap();
    let (before, after) = (
        v["int8_calibrated_top1"].as_f64().unwrap(),
        v["int8_trained_top1"].as_f64().unwrap(),
    );
    assert!(after > before + 3.0, "{v}");
    assert_eq!(v["training_images"], 256);
    // Each epoch is scored on --data; the last score is the trained model's.
    let epochs = v["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    assert!(epochs[0]["data_top1"].as_f64().unwrap() > before, "{v}");
    assert_eq!(epochs[1]["data_top1"].as_f64().unwrap(), after);
    // The file scores what the command said it would.
    let mut args = vec!["eval", s(&out), "--data", s(&calib), "--json"];
    args.extend(pre);
    let e: serde_json::Value = serde_json::from_str(&ok(qint8(&args))).unwrap();
    assert!(
        (e["top1"].as_f64().unwrap() * 100.0 - after).abs() < 1e-9,
        "{e} vs {v}"
    );
    let saved = qint8_graph::QuantPlan::load(&plan).unwrap();
    assert_eq!(saved.weights.len(), 82);
    // --learn-ranges trains the activations' scales: the plan differs.
    ok(run(&calib, &["--learn-ranges", "--json"]));
    let learned = qint8_graph::QuantPlan::load(&plan).unwrap();
    let moved = saved
        .activations
        .iter()
        .filter(|(n, p)| learned.activations[*n].scales() != p.scales())
        .count();
    assert!(moved > 0, "no activation scale moved");
    let report = ok(qint8(&["check-trt", s(&out)]));
    assert!(report.contains("0 violation(s)"), "{report}");

    // Training needs labels: images without them are refused, and nothing
    // is written.
    std::fs::remove_file(&out).unwrap();
    let all = std::fs::read(&calib).unwrap();
    let unlabeled = dir.path().join("shop-images-idx3-ubyte");
    std::fs::write(&unlabeled, &all[..16 + 28 * 28 * 1000]).unwrap();
    let err = fails(run(&unlabeled, &[]));
    assert!(err.contains("labels"), "{err}");
    assert!(!out.exists());
    let err = fails(run(&calib, &["--lr=-1"]));
    assert!(err.contains("learning rate"), "{err}");
    assert!(!out.exists());
}

/// With held-out images `qat` writes the best-scoring model: here training
/// at thirty times the default rate hurts, so the calibrated model is
/// written, and `--patience 1` stops after the first epoch.
#[test]
fn qat_with_validation_keeps_the_calibrated_model_when_training_hurts() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("resnet50.onnx");
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let out = dir.path().join("qat.onnx");
    let pre = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"];
    let run = |extra: &[&str]| {
        let mut args = vec!["qat", s(&m), "--calib", s(&calib), "--calib-size", "64"];
        args.extend([
            "--train",
            s(&calib),
            "--train-images",
            "256",
            "--lr",
            "0.03",
        ]);
        args.extend(["--data", s(&calib), "-o", s(&out)]);
        args.extend(pre);
        args.extend(extra);
        qint8(&args)
    };
    let v: serde_json::Value = serde_json::from_str(&ok(run(&[
        "--val-images",
        "200",
        "--epochs",
        "3",
        "--patience",
        "1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["kept_epoch"], 0, "{v}");
    assert_eq!(v["validation_images"], 200);
    assert_eq!(v["training_images"], 256);
    let epochs = v["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 1, "{v}");
    assert!(
        epochs[0]["validation_top1"].as_f64().unwrap()
            < v["calibrated_validation_top1"].as_f64().unwrap() - 10.0,
        "{v}"
    );
    let before = v["int8_calibrated_top1"].as_f64().unwrap();
    assert_eq!(v["int8_trained_top1"].as_f64().unwrap(), before, "{v}");
    // The file is the calibrated model: it scores what calibration did.
    let mut args = vec!["eval", s(&out), "--data", s(&calib), "--json"];
    args.extend(pre);
    let e: serde_json::Value = serde_json::from_str(&ok(qint8(&args))).unwrap();
    assert!((e["top1"].as_f64().unwrap() * 100.0 - before).abs() < 1e-9);
    let text = ok(run(&["--val-images", "200", "--patience", "1"]));
    assert!(text.contains("wrote the calibrated model"), "{text}");
    // Bad settings fail before training and write nothing.
    std::fs::remove_file(&out).unwrap();
    let err = fails(run(&["--patience", "2"]));
    assert!(err.contains("--val"), "{err}");
    let err = fails(run(&["--val-images", "1000"]));
    assert!(err.contains("--val-images 1000"), "{err}");
    let o = run(&["--val-images", "10", "--val", s(&calib)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// `--device cuda` runs on a GPU where qint8 has one (built with the `cuda`
/// feature, on a machine with CUDA); elsewhere each command says why not
/// and writes nothing.
#[test]
fn device_cuda_runs_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let calib = fixtures().join("data/calib-images-idx3-ubyte");
    let (q, y, x) = (
        dir.path().join("q.onnx"),
        dir.path().join("y.npy"),
        dir.path().join("x.npy"),
    );
    let pre = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"];
    let r50 = model("resnet50.onnx");
    let mut quantize = vec!["quantize", s(&r50), "--calib", s(&calib), "-o", s(&q)];
    quantize.extend(pre);
    quantize.extend(["--calib-size", "64", "--device", "cuda"]);
    let images = eval_images();
    let mut eval = vec!["eval", s(&r50), "--data", s(&images), "--limit", "64"];
    eval.extend(pre);
    eval.extend(["--device", "cuda"]);
    write_npy_f32(&x, &ndarray::Array4::<f32>::ones((1, 1, 32, 32))).unwrap();
    let run = vec!["run", s(&r50), "-i", s(&x), "-o", s(&y), "--device", "cuda"];
    let mut compare = vec![
        "compare",
        s(&r50),
        "--calib",
        s(&calib),
        "--calib-size",
        "64",
    ];
    compare.extend(["--data", s(&images), "--limit", "64", "--methods", "minmax"]);
    compare.extend(pre);
    compare.extend(["--device", "cuda", "--json"]);
    for (args, out) in [
        (quantize, Some(&q)),
        (eval, None),
        (run, Some(&y)),
        (compare, None),
    ] {
        let o = qint8(&args);
        if o.status.success() {
            if let Some(p) = out {
                assert!(p.exists(), "{args:?}");
            }
            if args[0] == "compare" {
                // The GPU scored FP32 and both weight granularities.
                let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
                assert_ne!(v["device"], "cpu", "{v}");
                assert_eq!(v["rows"].as_array().unwrap().len(), 2, "{v}");
                assert!(v["fp32_top1"].as_f64().unwrap() > 0.8, "{v}");
            }
        } else {
            let err = fails(o);
            assert!(
                err.contains("built without GPU support") || err.contains("CUDA"),
                "{args:?}: {err}"
            );
            if let Some(p) = out {
                assert!(!p.exists(), "{args:?} left {}", p.display());
            }
        }
    }
}
