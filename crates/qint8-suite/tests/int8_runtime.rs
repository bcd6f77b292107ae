//! A QDQ export run on the integer kernels against the same file simulated
//! in float: which convolutions take the integer path, that the two agree,
//! and that observers still see every dequantized activation.

use std::collections::HashSet;

use qint8_calibration::{calibrate, CalibConfig};
use qint8_eval::layers::qdq_outputs;
use qint8_graph::quant::{insert_qdq, WeightStorage};
use qint8_runtime::kernels::int8;
use qint8_runtime::{Session, SessionOptions};
use qint8_suite::{fixture_dataset, fixtures, relative_max_error};

/// A fixture model calibrated (defaults) on `images` calibration images.
fn calibrated(model: &str, images: usize) -> qint8_calibration::Calibrated {
    let model = qint8_graph::onnx::load(fixtures().join(format!("models/{model}.onnx"))).unwrap();
    let calib = fixture_dataset("calib-images-idx3-ubyte", images);
    let cfg = CalibConfig {
        threads: 2,
        ..Default::default()
    };
    calibrate(&model.graph, &calib, &cfg, &mut |_| {}).unwrap()
}

/// A session of `g` on two threads, with or without the integer kernels.
fn session(g: &qint8_graph::Graph, integer: bool) -> Session {
    let opts = SessionOptions {
        threads: 2,
        integer,
        ..Default::default()
    };
    Session::from_graph(g.clone(), opts).unwrap()
}

#[test]
fn integer_convolutions_match_the_float_simulation() {
    let c = calibrated("resnet50", 200);
    let eval = fixture_dataset("eval-images-idx3-ubyte", 64);
    let x = eval.batch(0, 64).unwrap().inputs;
    for storage in [WeightStorage::Int8, WeightStorage::FloatQdq] {
        let g = insert_qdq(&c.graph, &c.plan, storage).unwrap();
        let (int, sim) = (session(&g, true), session(&g, false));
        let input = int.input_names()[0].to_string();
        let shape = x.shape().to_vec();
        let count = |s: &Session, kind: &str| {
            s.plan(&[(input.as_str(), &shape)])
                .unwrap()
                .steps()
                .iter()
                .filter(|(_, op)| *op == kind)
                .count()
        };
        // Every quantized convolution but the one-channel stem, and the
        // classifier.
        let on = usize::from(int8::available());
        assert_eq!(count(&int, "Conv(int8)"), 52 * on, "{storage:?}");
        assert_eq!(count(&int, "Gemm(int8)"), on, "{storage:?}");
        assert_eq!(count(&sim, "Conv(int8)") + count(&sim, "Gemm(int8)"), 0);
        if !int8::available() {
            eprintln!("note: no AVX-512 VNNI here; the integer kernels are not used");
        }
        // Fake-quant steps whose every reader is an integer convolution
        // (which quantizes their input itself, as input or residual) are
        // dropped: of ResNet-50's 54, the stem input's remains, and the
        // four downsampling outputs', whose Add runs on its own (in this
        // graph's order the block's last convolution comes first, so the
        // Add is not fused into it).
        let fq = |s: &Session| count(s, "FakeQuant");
        assert_eq!(fq(&sim), 54, "{storage:?}");
        assert_eq!(fq(&int), if on == 1 { 5 } else { 54 }, "{storage:?}");
        let a = int.run(&[(input.as_str(), x.view())]).unwrap().remove(0);
        let b = sim.run(&[(input.as_str(), x.view())]).unwrap().remove(0);
        // Without fusions every fake-quant step runs: the same bits.
        let unfused = Session::from_graph(
            g.clone(),
            SessionOptions {
                threads: 2,
                fuse: false,
                ..Default::default()
            },
        )
        .unwrap();
        let u = unfused
            .run(&[(input.as_str(), x.view())])
            .unwrap()
            .remove(0);
        assert!(
            a.iter()
                .zip(u.iter())
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{storage:?}: fused and unfused integer runs differ"
        );
        let err = relative_max_error(b.as_slice().unwrap(), a.as_slice().unwrap());
        eprintln!("{storage:?}: relative max error {err:.2e}");
        // Float rounding can move a value across a rounding step of a
        // later quantizer; the logits stay close all the same.
        assert!(err < 0.05, "{storage:?}: {err}");

        // An observed run keeps every DequantizeLinear output.
        let mut seen = HashSet::new();
        let mut record = |name: &str, _: &[usize], _: &[f32]| -> Result<(), String> {
            seen.insert(name.to_string());
            Ok(())
        };
        int.run_observed(&[(input.as_str(), x.view())], &mut record)
            .unwrap();
        let dq = qdq_outputs(&g);
        assert_eq!(dq.len(), c.plan.activations.len());
        for d in dq.values() {
            assert!(seen.contains(d), "{storage:?}: {d} not observed");
        }
    }
}

/// EfficientNet-B0's depthwise convolutions on their integer kernel: which
/// take it (planes of 32 or more positions; the smaller ones keep the
/// float kernel, channels in the lanes), that their input fake-quant steps
/// go, and that the run stays close to the float simulation.
#[test]
fn depthwise_convolutions_take_the_integer_kernel() {
    let c = calibrated("efficientnet_b0", 100);
    let g = insert_qdq(&c.graph, &c.plan, WeightStorage::Int8).unwrap();
    let (int, sim) = (session(&g, true), session(&g, false));
    let input = int.input_names()[0].to_string();
    let x = fixture_dataset("eval-images-idx3-ubyte", 32)
        .batch(0, 32)
        .unwrap()
        .inputs;
    let shape = x.shape().to_vec();
    let steps = |s: &Session| -> Vec<&'static str> {
        let plan = s.plan(&[(input.as_str(), &shape)]).unwrap();
        plan.steps().iter().map(|(_, k)| *k).collect()
    };
    let count = |s: &[&str], kind: &str| s.iter().filter(|k| **k == kind).count();
    let (si, ss) = (steps(&int), steps(&sim));
    // 16 depthwise convolutions: on 32x32 images the first three blocks'
    // (16x16 and two 8x8 planes) have 32 or more positions per plane; the
    // thirteen on 4x4, 2x2 and 1x1 planes do not.
    let on = usize::from(int8::depthwise_available());
    assert_eq!(count(&ss, "Conv(depthwise)"), 16);
    assert_eq!(count(&si, "Conv(int8 depthwise)"), 3 * on);
    assert_eq!(count(&si, "Conv(depthwise)"), 16 - 3 * on);
    // Each integer depthwise convolution quantizes its own input.
    assert!(count(&ss, "FakeQuant") >= count(&si, "FakeQuant") + 3 * on);
    if on == 0 {
        eprintln!("note: no AVX-512 VNNI and VBMI here; depthwise convolutions run in float");
    }
    let a = int.run(&[(input.as_str(), x.view())]).unwrap().remove(0);
    let b = sim.run(&[(input.as_str(), x.view())]).unwrap().remove(0);
    let err = relative_max_error(b.as_slice().unwrap(), a.as_slice().unwrap());
    eprintln!("relative max error {err:.2e}");
    assert!(err < 0.05, "{err}");
}
