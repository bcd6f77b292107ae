//! Full-size zoo models (224x224, ImageNet widths) built by qint8, saved as
//! ONNX, run by onnxruntime and by qint8 on the same random input.
//! Skipped, with a note, when onnxruntime is not installed; CI installs it.

use qint8_graph::zoo::{self, ZooConfig};
use qint8_suite::relative_max_error;

fn check(cfg: ZooConfig, batch: usize) {
    let name = cfg.arch.name();
    let dir = std::env::temp_dir().join(format!("qint8-zoo-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = zoo::build(&cfg).unwrap();
    let path = dir.join(format!("{name}.onnx"));
    qint8_graph::onnx::save(&model, &path).unwrap();
    let (h, w) = cfg.resolution;
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, cfg.in_channels, h, w]), |ix| {
        let k = ((ix[0] * 131 + ix[1] * 71 + ix[2] * 31 + ix[3] * 7) % 997) as f32;
        k / 498.5 - 1.0
    });
    let expect = qint8_suite::onnxruntime_output(&path, &x, &dir, name).unwrap();
    let got = [qint8_suite::qint8_output(&model, "input", x.view()).unwrap()];
    assert_eq!(got[0].shape(), expect.shape());
    let err = relative_max_error(expect.as_slice().unwrap(), got[0].as_slice().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err <= 1e-4, "{name}: relative max error {err}");
    eprintln!("{name}: relative max error {err:.2e}");
}

#[test]
fn full_size_zoo_models_match_onnxruntime() {
    if !qint8_suite::onnxruntime_available() {
        eprintln!("note: python3 onnxruntime not importable; zoo parity skipped");
        return;
    }
    check(ZooConfig::resnet50(), 2);
    check(ZooConfig::efficientnet_b0(), 2);
    check(ZooConfig::vgg16(), 1);
    check(ZooConfig::vgg16_bn(), 1);
}
