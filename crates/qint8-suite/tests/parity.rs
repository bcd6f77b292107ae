//! The runtime matches onnxruntime: on the stored reference outputs of every
//! fixture (both exporters), and live on random inputs when onnxruntime is
//! installed.

use qint8_calibration::dataset::npy::read_npy_f32;
use qint8_runtime::{Session, SessionOptions};
use qint8_suite::{fixtures, relative_max_error};

#[test]
fn fixtures_match_stored_onnxruntime_outputs() {
    let dir = fixtures().join("models/reference");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let entries = index["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 12);
    for e in entries {
        let model_path = fixtures().join("models").join(e["model"].as_str().unwrap());
        let model = qint8_graph::onnx::load(&model_path).unwrap();
        let x = read_npy_f32(dir.join(e["input"].as_str().unwrap())).unwrap();
        let expect = read_npy_f32(dir.join(e["output"].as_str().unwrap())).unwrap();
        let out = [
            qint8_suite::qint8_output(&model, e["input_name"].as_str().unwrap(), x.view()).unwrap(),
        ];
        assert_eq!(out[0].shape(), expect.shape());
        let err = relative_max_error(expect.as_slice().unwrap(), out[0].as_slice().unwrap());
        assert!(err <= 1e-4, "{}: relative max error {err}", e["model"]);
    }
}

/// Live comparison with onnxruntime on fresh random inputs (batch 3) for
/// every fixture. Skipped, with a note, when onnxruntime is not installed;
/// CI installs it.
#[test]
fn fixtures_match_live_onnxruntime() {
    if !qint8_suite::onnxruntime_available() {
        eprintln!("note: python3 onnxruntime not importable; live parity skipped");
        return;
    }
    let dir = std::env::temp_dir().join(format!("qint8-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[3, 1, 32, 32]), |ix| {
        let k = ix[0] * 1024 + ix[2] * 32 + ix[3];
        ((k * 7919) % 1000) as f32 / 250.0 - 2.0
    });
    for model_path in qint8_suite::fixture_models() {
        let expect = qint8_suite::onnxruntime_output(&model_path, &x, &dir, "fixture").unwrap();
        let model = qint8_graph::onnx::load(&model_path).unwrap();
        let got = [qint8_suite::qint8_output(&model, "input", x.view()).unwrap()];
        let err = relative_max_error(expect.as_slice().unwrap(), got[0].as_slice().unwrap());
        assert!(
            err <= 1e-4,
            "{}: relative max error {err}",
            model_path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sub-batches on separate threads give the same logits as one intra-op run,
/// including uneven splits.
#[test]
fn batch_parallel_equals_intra_op() {
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[5, 1, 32, 32]), |ix| {
        ((ix[0] * 31 + ix[2] * 7 + ix[3]) % 17) as f32 / 8.0 - 1.0
    });
    for model_path in qint8_suite::fixture_models() {
        let model = qint8_graph::onnx::load(&model_path).unwrap();
        let split = Session::new(
            &model,
            SessionOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let whole = Session::new(
            &model,
            SessionOptions {
                threads: 2,
                batch_parallel: false,
                ..Default::default()
            },
        )
        .unwrap();
        let a = split.run(&[("input", x.view())]).unwrap();
        let b = whole.run(&[("input", x.view())]).unwrap();
        assert_eq!(a[0].shape(), &[5, 10]);
        let err = relative_max_error(b[0].as_slice().unwrap(), a[0].as_slice().unwrap());
        assert!(err <= 1e-5, "{}: {err}", model_path.display());
    }
}

/// The observer sees the input, every produced tensor once, in execution
/// order, and the graph output with the values `run` returns.
#[test]
fn observer_sees_every_tensor() {
    let model = qint8_graph::onnx::load(fixtures().join("models/resnet50.onnx")).unwrap();
    let session = Session::new(
        &model,
        SessionOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[2, 1, 32, 32]), |ix| {
        (ix[2] as f32 - ix[3] as f32) / 32.0
    });
    let mut seen: Vec<(String, Vec<usize>, f32)> = Vec::new();
    let mut obs = |name: &str, shape: &[usize], data: &[f32]| -> Result<(), String> {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        seen.push((name.to_string(), shape.to_vec(), data.iter().sum()));
        Ok(())
    };
    let out = session
        .run_observed(&[("input", x.view())], &mut obs)
        .unwrap();
    assert_eq!(seen[0].0, "input");
    let names: std::collections::HashSet<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names.len(), seen.len(), "each tensor once");
    // Every Conv/Relu/Add output the plan materializes is observable: at least one per bottleneck.
    assert!(seen.len() > 30, "{} tensors", seen.len());
    let last = seen
        .iter()
        .find(|s| s.0 == "logits")
        .expect("graph output observed");
    assert_eq!(last.1, vec![2, 10]);
    assert!((last.2 - out[0].sum()).abs() <= 1e-4 * out[0].iter().map(|v| v.abs()).sum::<f32>());
    // An observer error stops the run.
    let mut stop = |name: &str, _: &[usize], _: &[f32]| -> Result<(), String> {
        if name == "logits" {
            Err("stop here".into())
        } else {
            Ok(())
        }
    };
    let err = session
        .run_observed(&[("input", x.view())], &mut stop)
        .unwrap_err();
    assert!(err.to_string().contains("stop here"), "{err}");
}
