//! The GPU executor (feature `cuda`) against qint8's CPU runtime, on the
//! fixture models, their QDQ exports and random convolution geometries.
//!
//! Without NVRTC the kernel-compilation test is skipped; without a GPU the
//! executor tests are. Each says so on stderr, so a run shows what it
//! covered.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use qint8_calibration::{
    calibrate, calibrate_on, BatchRunner, CalibConfig, ImageDataset, Preprocess,
};
use qint8_graph::quant::{insert_qdq, WeightStorage};
use qint8_graph::{AutoPad, ConvAttrs, Graph, Node, Op, PoolAttrs, Tensor, ValueInfo};
use qint8_math::search::RangeMethod;
use qint8_runtime::{Session, SessionOptions};
use qint8_trt::cuda::{compile_kernels, probe, CudaExecutor, CudaOptions, KERNEL_NAMES};

/// Both ways convolutions run: cuDNN wherever it can, and the built-in
/// kernels.
const OPTIONS: [CudaOptions; 2] = [
    CudaOptions {
        cudnn: true,
        tune: false,
    },
    CudaOptions {
        cudnn: false,
        tune: false,
    },
];

/// With cuDNN on and loaded, it must have run some convolutions; off, none.
fn check_path(exe: &CudaExecutor, opts: CudaOptions) {
    let n = exe.cudnn_convolutions();
    match (opts.cudnn, exe.convolutions()) {
        (true, "cuDNN") => assert!(n > 0, "cuDNN ran no convolution"),
        _ => assert_eq!(n, 0),
    }
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn dataset(file: &str, n: usize) -> ImageDataset {
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    ImageDataset::from_idx(fixture(file), None, pre)
        .unwrap()
        .take(n)
        .unwrap()
}

/// Whether a GPU is there; prints why not.
fn gpu(test: &str) -> bool {
    match probe() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            false
        }
    }
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn array(shape: &[usize], seed: u64) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), values(shape.iter().product(), seed)).unwrap()
}

/// Largest difference relative to the largest magnitude of `want`.
fn relative_error(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn argmaxes(logits: &ArrayD<f32>) -> Vec<usize> {
    let classes = logits.shape()[1];
    logits
        .as_slice()
        .unwrap()
        .chunks(classes)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0
        })
        .collect()
}

#[test]
fn kernels_compile_with_nvrtc() {
    let ptx = match compile_kernels(None) {
        Ok(p) => p,
        Err(e) if e.to_string().contains("cannot load NVRTC") => {
            eprintln!("kernels_compile_with_nvrtc: skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    for k in KERNEL_NAMES {
        assert!(
            ptx.contains(&format!(".entry {k}")),
            "kernel {k} is missing from the PTX"
        );
    }
    // And every kernel of the source is one the executor loads.
    assert_eq!(ptx.matches(".entry ").count(), KERNEL_NAMES.len());
    // A second executor takes the compiled PTX as it is.
    assert_eq!(compile_kernels(None).unwrap(), ptx);
}

#[test]
fn probe_finds_a_device_or_names_what_is_missing() {
    match probe() {
        Ok(d) => {
            assert!(!d.name.is_empty());
            assert!(d.memory > 0);
            assert!(d.compute_capability.0 >= 3);
        }
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.contains("CUDA is not available") || m.contains("CUDA device"),
                "{m}"
            );
        }
    }
}

#[test]
fn fixtures_run_on_the_gpu_as_on_the_cpu() {
    if !gpu("fixtures_run_on_the_gpu_as_on_the_cpu") {
        return;
    }
    let data = dataset("data/eval-images-idx3-ubyte", 96);
    for m in ["resnet50", "vgg16_bn", "efficientnet_b0"] {
        let model = qint8_graph::onnx::load(fixture(&format!("models/{m}.onnx"))).unwrap();
        let input = model.graph.inputs[0].name.clone();
        let cpu = Session::new(&model, SessionOptions::default()).unwrap();
        for opts in OPTIONS {
            let mut exe = CudaExecutor::with_options(&model.graph, opts).unwrap();
            let how = exe.convolutions();
            // 64 and a short last batch of 32: two plans.
            for b in data.batches(64) {
                let b = b.unwrap();
                let want = cpu.run(&[(&input, b.inputs.view())]).unwrap().remove(0);
                let got = exe.run(b.inputs.view()).unwrap().remove(0);
                let err = relative_error(&got, &want);
                assert!(err < 1e-4, "{m} ({how}): relative error {err}");
                assert_eq!(argmaxes(&got), argmaxes(&want), "{m} ({how})");
                check_path(&exe, opts);
            }
        }
    }
}

#[test]
fn qdq_exports_run_on_the_gpu_as_on_the_cpu() {
    if !gpu("qdq_exports_run_on_the_gpu_as_on_the_cpu") {
        return;
    }
    let calib = dataset("data/calib-images-idx3-ubyte", 64);
    let data = dataset("data/eval-images-idx3-ubyte", 256);
    for (m, per_channel, storage) in [
        ("resnet50", true, WeightStorage::Int8),
        ("vgg16_bn", true, WeightStorage::FloatQdq),
        ("efficientnet_b0", false, WeightStorage::Int8),
    ] {
        let graph = qint8_graph::onnx::load(fixture(&format!("models/{m}.onnx")))
            .unwrap()
            .graph;
        let cfg = CalibConfig {
            method: RangeMethod::entropy(),
            per_channel,
            ..Default::default()
        };
        let c = calibrate(&graph, &calib, &cfg, &mut |_| {}).unwrap();
        let qdq = insert_qdq(&c.graph, &c.plan, storage).unwrap();
        let input = qdq.inputs[0].name.clone();
        let cpu = Session::from_graph(qdq.clone(), SessionOptions::default()).unwrap();
        let mut exe = CudaExecutor::new(&qdq).unwrap();
        let (mut same, mut n, mut worst) = (0usize, 0usize, 0.0f32);
        for b in data.batches(128) {
            let b = b.unwrap();
            let want = cpu.run(&[(&input, b.inputs.view())]).unwrap().remove(0);
            let got = exe.run(b.inputs.view()).unwrap().remove(0);
            worst = worst.max(relative_error(&got, &want));
            let (g, w) = (argmaxes(&got), argmaxes(&want));
            same += g.iter().zip(&w).filter(|(a, b)| a == b).count();
            n += g.len();
        }
        // Q/DQ rounds in float on the GPU and on integers on the CPU: an
        // activation a hair from a rounding boundary can land one step
        // apart, so the logits agree closely but not bit for bit.
        eprintln!("{m}: {same}/{n} top-1 agree, worst relative logit error {worst}");
        assert!(same * 100 >= n * 99, "{m}: only {same} of {n} agree");
        assert!(worst < 0.05, "{m}: relative error {worst}");
    }
}

fn conv(kernel: usize, stride: usize, pad: [usize; 4], dilation: usize, group: usize) -> Op {
    Op::Conv(ConvAttrs {
        kernel_shape: Some(vec![kernel, kernel]),
        strides: vec![stride, stride],
        pads: pad.to_vec(),
        dilations: vec![dilation, dilation],
        group,
        auto_pad: AutoPad::NotSet,
    })
}

/// Random convolution, pooling and element-wise geometries, each a small
/// graph run on both devices.
#[test]
fn random_geometries_match_the_cpu() {
    if !gpu("random_geometries_match_the_cpu") {
        return;
    }
    let mut s = 12345u64;
    let mut next = |k: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % k) as usize
    };
    for case in 0..60u64 {
        let n = 1 + next(3);
        let group = [1, 1, 2, 4][next(4)];
        let depthwise = next(4) == 0;
        let c = if depthwise { 8 } else { group * (1 + next(4)) };
        let m = if depthwise {
            c * (1 + next(2))
        } else {
            group * (1 + next(5))
        };
        let group = if depthwise { c } else { group };
        let k = 1 + next(5);
        let stride = 1 + next(2);
        let dilation = 1 + next(2);
        let pad = [next(3), next(3), next(3), next(3)];
        let (h, w) = (k * dilation + 3 + next(9), k * dilation + 5 + next(9));
        let pool = PoolAttrs {
            kernel_shape: vec![2, 3],
            strides: vec![2, 1],
            pads: vec![1, 0, 0, 1],
            dilations: vec![],
            ceil_mode: next(2) == 0,
            count_include_pad: next(2) == 0,
            auto_pad: AutoPad::NotSet,
        };
        let mut init = BTreeMap::new();
        init.insert(
            "w".to_string(),
            Tensor::F32(array(&[m, c / group, k, k], case + 1)),
        );
        init.insert("b".to_string(), Tensor::F32(array(&[m], case + 2)));
        init.insert("g".to_string(), Tensor::F32(array(&[1, m, 1, 1], case + 3)));
        let last = if next(2) == 0 {
            Op::MaxPool(pool)
        } else {
            Op::AveragePool(pool)
        };
        let graph = Graph {
            name: format!("case{case}"),
            inputs: vec![ValueInfo::f32("x", &[n, c, h, w])],
            outputs: vec![ValueInfo::f32("y", &[n, m, 1, 1])],
            nodes: vec![
                Node::new(
                    "conv",
                    conv(k, stride, pad, dilation, group),
                    &["x", "w", "b"],
                    &["c"],
                ),
                Node::new("sig", Op::Sigmoid, &["c"], &["s"]),
                Node::new("mul", Op::Mul, &["c", "s"], &["silu"]),
                Node::new("gate", Op::Mul, &["g", "silu"], &["gated"]),
                Node::new("pool", last, &["gated"], &["p"]),
                Node::new("relu", Op::Relu, &["p"], &["r"]),
                Node::new("gap", Op::GlobalAveragePool, &["r"], &["y"]),
            ],
            initializers: init,
            value_info: vec![],
        };
        let x = array(&[n, c, h, w], case + 4);
        let cpu = Session::from_graph(graph.clone(), SessionOptions::default()).unwrap();
        let want = cpu.run(&[("x", x.view())]).unwrap().remove(0);
        for opts in OPTIONS {
            let mut exe = CudaExecutor::with_options(&graph, opts).unwrap();
            let got = exe.run(x.view()).unwrap().remove(0);
            let err = relative_error(&got, &want);
            assert!(
                err < 1e-5,
                "case {case} ({}): relative error {err}",
                exe.convolutions()
            );
        }
    }
}

#[test]
fn gemm_transposes_and_broadcast_bias_match_the_cpu() {
    if !gpu("gemm_transposes_and_broadcast_bias_match_the_cpu") {
        return;
    }
    for (i, (trans_a, trans_b, bias_shape)) in [
        (false, false, vec![7]),
        (true, false, vec![1, 7]),
        (false, true, vec![5, 1]),
        (true, true, vec![5, 7]),
    ]
    .into_iter()
    .enumerate()
    {
        let (m, k, n) = (5usize, 11usize, 7usize);
        let a_shape = if trans_a { [k, m] } else { [m, k] };
        let b_shape = if trans_b { [n, k] } else { [k, n] };
        let mut init = BTreeMap::new();
        init.insert("b".to_string(), Tensor::F32(array(&b_shape, 10 + i as u64)));
        init.insert(
            "c".to_string(),
            Tensor::F32(array(&bias_shape, 20 + i as u64)),
        );
        let graph = Graph {
            name: "gemm".into(),
            inputs: vec![ValueInfo::f32("a", &a_shape)],
            outputs: vec![ValueInfo::f32("y", &[m, n])],
            nodes: vec![Node::new(
                "g",
                Op::Gemm {
                    alpha: 0.75,
                    beta: 1.5,
                    trans_a,
                    trans_b,
                },
                &["a", "b", "c"],
                &["y"],
            )],
            initializers: init,
            value_info: vec![],
        };
        let a = array(&a_shape, 30 + i as u64);
        let cpu = Session::from_graph(graph.clone(), SessionOptions::default()).unwrap();
        let want = cpu.run(&[("a", a.view())]).unwrap().remove(0);
        let got = CudaExecutor::new(&graph)
            .unwrap()
            .run(a.view())
            .unwrap()
            .remove(0);
        let err = relative_error(&got, &want);
        assert!(err < 1e-5, "transA {trans_a} transB {trans_b}: {err}");
    }
}

/// The GPU executor as calibration's runner.
fn gpu_runner(g: &Graph) -> Result<Box<dyn BatchRunner>, String> {
    CudaExecutor::new(g)
        .map(|e| Box::new(e) as Box<dyn BatchRunner>)
        .map_err(|e| e.to_string())
}

/// Calibration with its forward passes on the GPU (`--device cuda`) finds
/// the CPU's ranges up to float rounding: the activations differ in their
/// last bits, so a maximum moves by rounding and a histogram method's
/// threshold by at most a bin now and then.
#[test]
fn calibration_on_the_gpu_finds_the_cpu_ranges() {
    if !gpu("calibration_on_the_gpu_finds_the_cpu_ranges") {
        return;
    }
    let calib = dataset("data/calib-images-idx3-ubyte", 256);
    for m in ["resnet50", "vgg16_bn", "efficientnet_b0"] {
        let graph = qint8_graph::onnx::load(fixture(&format!("models/{m}.onnx")))
            .unwrap()
            .graph;
        for method in [RangeMethod::Max, RangeMethod::entropy()] {
            let cfg = CalibConfig {
                method,
                ..Default::default()
            };
            let want = calibrate(&graph, &calib, &cfg, &mut |_| {}).unwrap();
            let got = calibrate_on(&graph, &calib, &cfg, &gpu_runner, &mut |_| {}).unwrap();
            assert_eq!(
                got.ranges.keys().collect::<Vec<_>>(),
                want.ranges.keys().collect::<Vec<_>>()
            );
            let mut rel: Vec<f32> = want
                .ranges
                .iter()
                .map(|(n, &w)| (got.ranges[n] - w).abs() / w.abs().max(1e-12))
                .collect();
            rel.sort_by(f32::total_cmp);
            let close = rel.iter().filter(|&&r| r < 1e-3).count();
            let worst = rel.last().copied().unwrap_or(0.0);
            eprintln!(
                "{m} {method:?}: {close} of {} ranges within 1e-3, worst {worst:.2e}",
                rel.len()
            );
            match method {
                RangeMethod::Max => assert!(worst < 1e-4, "{m}: {worst}"),
                _ => assert!(close * 10 >= rel.len() * 9, "{m}: {close} of {}", rel.len()),
            }
            // Smoothing rescales weights by factors taken from activation
            // statistics, so weights match exactly only without it.
            if want.smoothed.is_empty() {
                assert_eq!(got.plan.weights, want.plan.weights, "{m}");
            }
        }
    }
}

/// With uint8 activations the signed ranges come from the device's
/// histograms (and the input's from the host batch): the parameters match
/// the CPU's up to float rounding.
#[test]
fn uint8_calibration_on_the_gpu_finds_the_cpu_parameters() {
    if !gpu("uint8_calibration_on_the_gpu_finds_the_cpu_parameters") {
        return;
    }
    let calib = dataset("data/calib-images-idx3-ubyte", 256);
    for m in ["resnet50", "efficientnet_b0"] {
        let graph = qint8_graph::onnx::load(fixture(&format!("models/{m}.onnx")))
            .unwrap()
            .graph;
        let cfg = CalibConfig {
            method: RangeMethod::Max,
            activation_dtype: qint8_math::QuantDtype::Uint8,
            ..Default::default()
        };
        let want = calibrate(&graph, &calib, &cfg, &mut |_| {}).unwrap();
        let got = calibrate_on(&graph, &calib, &cfg, &gpu_runner, &mut |_| {}).unwrap();
        assert_eq!(
            got.plan.activations.keys().collect::<Vec<_>>(),
            want.plan.activations.keys().collect::<Vec<_>>()
        );
        for (n, w) in &want.plan.activations {
            let (w, g) = (w.channels()[0], got.plan.activations[n].channels()[0]);
            assert_eq!((g.qmin, g.qmax), (0, 255), "{m} {n}");
            assert!(
                (g.zero_point - w.zero_point).abs() <= 1,
                "{m} {n}: {g:?} vs {w:?}"
            );
            assert!(
                (g.scale - w.scale).abs() <= 1e-4 * w.scale,
                "{m} {n}: {g:?} vs {w:?}"
            );
        }
    }
}
