//! The model zoo: torchvision parameter counts, shapes at several
//! resolutions and widths, BN folding, determinism, ONNX round trips, the
//! committed fixtures' structure, and (when installed) onnxruntime.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use qint8_graph::zoo::{self, Arch, ParamKind, ZooConfig};
use qint8_graph::{onnx, passes, shape, Graph, Model, Op, Tensor};

/// Parameters as PyTorch counts them: every float initializer except the
/// BatchNorm running statistics (inputs 3 and 4 of BatchNormalization).
fn trainable_count(g: &Graph) -> usize {
    let stats: HashSet<&str> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNormalization { .. }))
        .flat_map(|n| n.inputs[3..5].iter().map(String::as_str))
        .collect();
    g.initializers
        .iter()
        .filter(|(k, _)| !stats.contains(k.as_str()))
        .map(|(_, t)| t.len())
        .sum()
}

fn count_op(g: &Graph, op: &str) -> usize {
    g.op_counts().get(op).copied().unwrap_or(0)
}

fn small(arch: Arch) -> ZooConfig {
    let (h, w) = match arch {
        Arch::Vgg16 { .. } => (224, 224),
        _ => (64, 64),
    };
    ZooConfig::new(arch)
        .with_width_mult(0.25)
        .with_resolution(h, w)
        .with_in_channels(1)
        .with_classes(10)
}

fn infer_logits(g: &Graph, batch: usize, c: usize, h: usize, w: usize) -> Vec<usize> {
    let shapes = shape::infer(
        g,
        &HashMap::from([("input".to_string(), vec![batch, c, h, w])]),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", g.name));
    shapes["logits"].shape.clone()
}

/// A temporary directory removed on drop (also when a test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("qint8_zoo_{tag}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn torchvision_parameter_counts() {
    let expected = [
        (ZooConfig::resnet50(), 25_557_032),
        (ZooConfig::vgg16(), 138_357_544),
        (ZooConfig::vgg16_bn(), 138_365_992),
        (ZooConfig::efficientnet_b0(), 5_288_548),
    ];
    for (cfg, n) in &expected {
        assert_eq!(
            zoo::trainable_parameter_count(cfg).unwrap(),
            *n,
            "{}",
            cfg.arch
        );
    }
    // Materialize the two smaller ones at full size and count their initializers.
    for (cfg, n) in [&expected[0], &expected[3]] {
        let m = zoo::build(cfg).unwrap();
        assert_eq!(trainable_count(&m.graph), *n, "{}", cfg.arch);
        let specs = zoo::param_specs(cfg).unwrap();
        assert_eq!(
            m.graph.parameter_count(),
            specs.iter().map(|p| p.len()).sum::<usize>()
        );
        assert_eq!(
            infer_logits(&m.graph, 1, 3, 224, 224),
            vec![1, 1000],
            "{}",
            cfg.arch
        );
    }
}

#[test]
fn fixture_widths_match_torch_counts() {
    // fixtures/models/MODEL_CARD.md: the torch parameter counts of the committed
    // fixture models (1x32x32 inputs, 10 classes).
    let resnet = ZooConfig::resnet50()
        .with_width_mult(12.0 / 64.0)
        .with_resolution(32, 32)
        .with_in_channels(1)
        .with_classes(10);
    assert_eq!(zoo::trainable_parameter_count(&resnet).unwrap(), 838_654);
    let eff = ZooConfig::efficientnet_b0()
        .with_width_mult(0.5)
        .with_resolution(32, 32)
        .with_in_channels(1)
        .with_classes(10);
    assert_eq!(zoo::trainable_parameter_count(&eff).unwrap(), 1_077_644);
}

/// VGG-16's count in closed form: 13 3x3 convolutions with bias (+ BN
/// scale/shift), Linear(c*49, h), Linear(h, h), Linear(h, classes).
fn vgg_count(width: f64, in_ch: usize, classes: usize, bn: bool) -> usize {
    let s = |c: f64| ((c * width).round() as usize).max(1);
    let cfg = [
        64., 64., 128., 128., 256., 256., 256., 512., 512., 512., 512., 512., 512.,
    ];
    let mut cin = in_ch;
    let mut n = 0;
    for c in cfg {
        let c = s(c);
        n += c * cin * 9 + c + if bn { 2 * c } else { 0 };
        cin = c;
    }
    let h = s(4096.);
    n + (cin * 49 * h + h) + (h * h + h) + (h * classes + classes)
}

#[test]
fn reduced_configs() {
    for arch in Arch::ALL {
        let cfg = small(arch);
        let m = zoo::build(&cfg).unwrap();
        let g = &m.graph;
        let specs = zoo::param_specs(&cfg).unwrap();
        // The dry run describes exactly the materialized initializers.
        assert_eq!(specs.len(), g.initializers.len(), "{arch}");
        for p in &specs {
            let t = &g.initializers[&p.name];
            assert_eq!(t.shape(), p.shape.as_slice(), "{}", p.name);
        }
        let trainable = zoo::trainable_parameter_count(&cfg).unwrap();
        assert_eq!(trainable_count(g), trainable, "{arch}");
        if let Arch::Vgg16 { batch_norm } = arch {
            assert_eq!(trainable, vgg_count(0.25, 1, 10, batch_norm), "{arch}");
        }
        // BN statistics are the only non-trainable initializers.
        let stats = specs.iter().filter(|p| !p.kind.is_trainable()).count();
        assert_eq!(stats, 2 * count_op(g, "BatchNormalization"), "{arch}");
        assert!(specs
            .iter()
            .filter(|p| matches!(p.kind, ParamKind::BnMean | ParamKind::BnVar))
            .all(|p| p.name.ends_with(".running_mean") || p.name.ends_with(".running_var")));
    }
    assert_eq!(vgg_count(1.0, 3, 1000, false), 138_357_544);
    assert_eq!(vgg_count(1.0, 3, 1000, true), 138_365_992);
}

#[test]
fn graph_conventions() {
    for arch in Arch::ALL {
        let m = zoo::build(&small(arch).with_classes(7)).unwrap();
        assert_eq!(m.opset, 17);
        let g = &m.graph;
        g.validate().unwrap();
        assert_eq!(g.name, arch.name());
        assert_eq!(g.inputs.len(), 1);
        assert_eq!(g.inputs[0].name, "input");
        assert_eq!(g.outputs.len(), 1);
        assert_eq!(g.outputs[0].name, "logits");
        assert_eq!(
            g.outputs[0].shape.as_ref().unwrap()[0],
            qint8_graph::Dim::Symbolic("batch".into())
        );
        // Every initializer is used, every Conv/Gemm weight is named `<node>.weight`.
        let used: HashSet<&str> = g
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().map(String::as_str))
            .collect();
        assert!(
            g.initializers.keys().all(|k| used.contains(k.as_str())),
            "{arch}"
        );
        for n in &g.nodes {
            match &n.op {
                Op::Conv(c) => {
                    assert_eq!(n.inputs[1], format!("{}.weight", n.name));
                    let w = g.initializers[&n.inputs[1]].shape();
                    let k = c.kernel_shape.as_ref().unwrap();
                    assert_eq!(&w[2..], k.as_slice(), "{}", n.name);
                    assert_eq!(c.pads, vec![(k[0] - 1) / 2; 4], "{}", n.name);
                    assert_eq!(c.strides.len(), 2);
                    assert!(c.group >= 1);
                    // torchvision: a conv followed by BN has no bias.
                    let next = g.consumers(&n.outputs[0]);
                    let feeds_bn = next
                        .iter()
                        .any(|&i| matches!(g.nodes[i].op, Op::BatchNormalization { .. }));
                    assert_eq!(
                        n.inputs.len() == 3,
                        !feeds_bn || matches!(arch, Arch::Vgg16 { .. }),
                        "{}",
                        n.name
                    );
                }
                Op::Gemm { trans_b, .. } => {
                    assert!(trans_b);
                    assert_eq!(n.inputs[1], format!("{}.weight", n.name));
                }
                Op::BatchNormalization { epsilon } => {
                    assert_eq!(*epsilon, 1e-5);
                    assert_eq!(n.inputs[4], format!("{}.running_var", n.name));
                }
                _ => {}
            }
        }
        let ops = g.op_counts();
        match arch {
            Arch::ResNet50 => {
                assert_eq!(ops["Conv"], 53);
                assert_eq!(ops["BatchNormalization"], 53);
                assert_eq!(ops["Add"], 16);
                assert_eq!(ops["Relu"], 49);
                assert_eq!(ops["MaxPool"], 1);
                assert_eq!(ops["Gemm"], 1);
                assert!(g.nodes.iter().any(|n| n.name == "layer4.2.relu_2"));
                assert!(g
                    .initializers
                    .contains_key("layer3.0.downsample.1.running_mean"));
            }
            Arch::Vgg16 { batch_norm } => {
                assert_eq!(ops["Conv"], 13);
                assert_eq!(
                    ops.get("BatchNormalization").copied().unwrap_or(0),
                    if batch_norm { 13 } else { 0 }
                );
                assert_eq!(ops["MaxPool"], 5);
                assert_eq!(ops["Gemm"], 3);
                assert_eq!(ops["Dropout"], 2);
                assert_eq!(ops["Relu"], 15);
                let last_pool = if batch_norm {
                    "features.43"
                } else {
                    "features.30"
                };
                assert!(g
                    .nodes
                    .iter()
                    .any(|n| n.name == last_pool && matches!(n.op, Op::MaxPool(_))));
                assert!(g.initializers.contains_key("classifier.6.weight"));
            }
            Arch::EfficientNetB0 => {
                // 1 stem + 16 blocks (15 with expansion) x (dw, fc1, fc2, project) + 15 expand + head.
                assert_eq!(ops["Conv"], 1 + 16 * 4 + 15 + 1);
                assert_eq!(ops["BatchNormalization"], 1 + 16 * 2 + 15 + 1);
                assert_eq!(ops["GlobalAveragePool"], 17);
                // 9 residual Adds at width 1; at width 0.25 stage 1 maps 8 to 8
                // channels with stride 1, so (as in torchvision) it gets one too.
                assert_eq!(ops["Add"], 10);
                assert_eq!(ops["Dropout"], 1);
                // Every Conv weight of a depthwise conv has one input channel per group.
                let dw = g
                    .nodes
                    .iter()
                    .filter(|n| matches!(&n.op, Op::Conv(c) if c.group > 1))
                    .count();
                assert_eq!(dw, 16);
                assert!(g.initializers.contains_key("features.2.0.block.2.fc1.bias"));
                assert!(g.initializers.contains_key("features.8.1.running_var"));
            }
        }
    }
}

#[test]
fn output_shapes_at_resolutions_and_widths() {
    let cases: &[(Arch, &[(usize, usize)])] = &[
        (Arch::ResNet50, &[(224, 224), (96, 96), (97, 130), (32, 32)]),
        (
            Arch::EfficientNetB0,
            &[(224, 224), (96, 96), (101, 64), (32, 32)],
        ),
        (
            Arch::Vgg16 { batch_norm: false },
            &[(224, 224), (448, 448), (230, 470)],
        ),
        (Arch::Vgg16 { batch_norm: true }, &[(224, 224), (448, 224)]),
    ];
    for &(arch, sizes) in cases {
        for &(h, w) in sizes {
            for (width, c, classes) in [(0.125, 3, 1000), (0.3, 1, 10), (0.2, 2, 5)] {
                let cfg = ZooConfig::new(arch)
                    .with_width_mult(width)
                    .with_resolution(h, w)
                    .with_in_channels(c)
                    .with_classes(classes);
                let m = zoo::build(&cfg).unwrap();
                m.graph.validate().unwrap();
                assert_eq!(
                    infer_logits(&m.graph, 2, c, h, w),
                    vec![2, classes],
                    "{arch} {h}x{w} w{width}"
                );
            }
        }
    }
    // A fixed batch size is declared and used.
    let m = zoo::build(&small(Arch::ResNet50).with_batch(Some(3))).unwrap();
    assert_eq!(
        m.graph.inputs[0].concrete_shape(0),
        Some(vec![3, 1, 64, 64])
    );
    let shapes = shape::infer(&m.graph, &HashMap::new()).unwrap();
    assert_eq!(shapes["logits"].shape, vec![3, 10]);
    // VGG pools 14x14 feature maps with an exact 2x2 AveragePool.
    let m =
        zoo::build(&small(Arch::Vgg16 { batch_norm: false }).with_resolution(448, 224)).unwrap();
    let pool = m.graph.nodes.iter().find(|n| n.name == "avgpool").unwrap();
    match &pool.op {
        Op::AveragePool(p) => {
            assert_eq!(p.kernel_shape, vec![2, 1]);
            assert_eq!(p.strides, vec![2, 1]);
        }
        other => panic!("avgpool is {other:?}"),
    }
    // At 224 the feature map is already 7x7: no pooling node.
    let m = zoo::build(&small(Arch::Vgg16 { batch_norm: false })).unwrap();
    assert_eq!(count_op(&m.graph, "AveragePool"), 0);
}

#[test]
fn simplify_folds_every_batchnorm_and_dropout() {
    for arch in Arch::ALL {
        let cfg = small(arch);
        let mut m = zoo::build(&cfg).unwrap();
        let g = &mut m.graph;
        let bn = count_op(g, "BatchNormalization");
        let drop = count_op(g, "Dropout");
        assert_eq!(bn > 0, arch != Arch::Vgg16 { batch_norm: false }, "{arch}");
        assert_eq!(drop > 0, arch != Arch::ResNet50, "{arch}");
        passes::simplify(g).unwrap();
        assert_eq!(count_op(g, "BatchNormalization"), 0, "{arch}");
        assert_eq!(count_op(g, "Dropout"), 0, "{arch}");
        let (h, w) = cfg.resolution;
        assert_eq!(infer_logits(g, 2, 1, h, w), vec![2, 10]);
        let ops: Vec<&str> = g.op_counts().keys().copied().collect();
        let expected: &[&str] = match arch {
            Arch::ResNet50 => &[
                "Add",
                "Conv",
                "Flatten",
                "Gemm",
                "GlobalAveragePool",
                "MaxPool",
                "Relu",
            ],
            Arch::Vgg16 { .. } => &["Conv", "Flatten", "Gemm", "MaxPool", "Relu"],
            Arch::EfficientNetB0 => &[
                "Add",
                "Conv",
                "Flatten",
                "Gemm",
                "GlobalAveragePool",
                "Mul",
                "Sigmoid",
            ],
        };
        assert_eq!(ops, expected, "{arch}");
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

/// The op sequence, Conv attributes and weight shapes of a simplified graph.
fn structure(g: &Graph) -> Vec<String> {
    g.nodes
        .iter()
        .map(|n| match &n.op {
            Op::Conv(c) => format!(
                "Conv k{:?} s{:?} p{:?} g{} w{:?}",
                c.kernel_shape,
                c.strides,
                c.pads,
                c.group,
                g.initializers[&n.inputs[1]].shape()
            ),
            Op::Gemm { .. } => format!("Gemm w{:?}", g.initializers[&n.inputs[1]].shape()),
            Op::MaxPool(p) => format!(
                "MaxPool k{:?} s{:?} p{:?}",
                p.kernel_shape, p.strides, p.pads
            ),
            op => op.op_type().to_string(),
        })
        .collect()
}

#[test]
fn matches_committed_torchvision_fixtures() {
    // The fixtures are torchvision models exported by PyTorch (BN folded by
    // the exporter); after our own folding the structures must agree.
    let base = |arch| {
        ZooConfig::new(arch)
            .with_resolution(32, 32)
            .with_in_channels(1)
            .with_classes(10)
    };
    for (file, cfg) in [
        (
            "resnet50.onnx",
            base(Arch::ResNet50).with_width_mult(12.0 / 64.0),
        ),
        (
            "efficientnet_b0.onnx",
            base(Arch::EfficientNetB0).with_width_mult(0.5),
        ),
    ] {
        let mut theirs = onnx::load(fixture(file)).unwrap();
        passes::simplify(&mut theirs.graph).unwrap();
        let mut ours = zoo::build(&cfg).unwrap();
        passes::simplify(&mut ours.graph).unwrap();
        assert_eq!(structure(&ours.graph), structure(&theirs.graph), "{file}");
    }
    // VGG-16-BN fixture: width 1/8 but a 256-wide classifier and 32x32 inputs
    // (its avgpool is an Expand); compare the convolutional features.
    let convs = |g: &Graph| -> Vec<String> {
        structure(g)
            .into_iter()
            .filter(|s| s.starts_with("Conv") || s.starts_with("MaxPool"))
            .collect()
    };
    let mut theirs = onnx::load(fixture("vgg16_bn.onnx")).unwrap();
    passes::simplify(&mut theirs.graph).unwrap();
    let mut ours = zoo::build(
        &ZooConfig::vgg16_bn()
            .with_width_mult(0.125)
            .with_in_channels(1)
            .with_classes(10),
    )
    .unwrap();
    passes::simplify(&mut ours.graph).unwrap();
    assert_eq!(convs(&ours.graph), convs(&theirs.graph));
}

#[test]
fn deterministic_per_seed() {
    for arch in Arch::ALL {
        let cfg = small(arch).with_seed(42);
        let a = zoo::build(&cfg).unwrap();
        let b = zoo::build(&cfg).unwrap();
        assert!(a == b, "{arch}: same seed gave different models");
        let c = zoo::build(&cfg.clone().with_seed(43)).unwrap();
        assert_eq!(a.graph.nodes, c.graph.nodes);
        for (name, t) in &a.graph.initializers {
            assert_ne!(
                t, &c.graph.initializers[name],
                "{arch}: {name} ignores the seed"
            );
        }
        // Each tensor has its own stream: the class count only changes the classifier.
        let d = zoo::build(&cfg.clone().with_classes(11)).unwrap();
        for (name, t) in &a.graph.initializers {
            let last = name.starts_with("fc.")
                || name.starts_with("classifier.6.")
                || name.starts_with("classifier.1.");
            if !last {
                assert_eq!(t, &d.graph.initializers[name], "{arch}: {name}");
            }
        }
    }
}

#[test]
fn initial_values_are_sane() {
    let m = zoo::build(&small(Arch::ResNet50)).unwrap();
    let g = &m.graph;
    let vals = |name: &str| g.initializers[name].to_f32_vec();
    let within = |name: &str, lo: f32, hi: f32| {
        let v = vals(name);
        assert!(v.iter().all(|x| (lo..=hi).contains(x)), "{name}");
        // Not constant.
        assert!(v.iter().any(|&x| x != v[0]), "{name}");
    };
    within("bn1.weight", 0.5, 1.5);
    within("bn1.running_var", 0.5, 1.5);
    within("layer1.0.bn2.running_mean", -1.0, 1.0);
    within("layer1.0.bn2.bias", -1.0, 1.0);
    // Kaiming-like conv weights: a bottleneck's conv2 and conv3 read
    // ReLU(BN(conv)) and get about He-normal's sqrt(2 / fan_in) (the builder
    // scales every conv to its actual input statistics, so not exactly).
    let std_of = |name: &str| {
        let w = vals(name);
        (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt()
    };
    let mut ratios: Vec<f64> = g
        .nodes
        .iter()
        .filter(|n| n.name.ends_with(".conv2") || n.name.ends_with(".conv3"))
        .map(|n| {
            let fan_in = g.initializers[&n.inputs[1]].shape()[1..]
                .iter()
                .product::<usize>() as f64;
            std_of(&n.inputs[1]) / (2.0 / fan_in).sqrt()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    assert_eq!(ratios.len(), 32);
    let median = ratios[16];
    assert!(
        (0.8..1.25).contains(&median),
        "median std / kaiming {median}"
    );
    assert!(ratios[0] > 0.4 && ratios[31] < 2.5, "{ratios:?}");
    let fc = vals("fc.weight");
    let std = (fc.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / fc.len() as f64).sqrt();
    assert!((std - 0.01).abs() < 0.001, "{std}");
    assert!(g
        .initializers
        .values()
        .all(|t| t.to_f32_vec().iter().all(|x| x.is_finite())));
}

#[test]
fn onnx_round_trip() {
    let dir = TempDir::new("roundtrip");
    for arch in Arch::ALL {
        let m = zoo::build(&small(arch).with_resolution(224, 224).with_seed(5)).unwrap();
        let path = dir.0.join(format!("{}.onnx", arch.name()));
        onnx::save(&m, &path).unwrap();
        let back = onnx::load(&path).unwrap();
        assert_eq!(back.graph.nodes, m.graph.nodes, "{arch}");
        assert!(back.graph.initializers == m.graph.initializers, "{arch}");
        assert_eq!(back.graph.inputs, m.graph.inputs, "{arch}");
        assert_eq!(back.graph.outputs, m.graph.outputs, "{arch}");
        assert!(back == m, "{arch}: model metadata differs");
    }
}

#[test]
fn bad_configs_are_errors() {
    let base = small(Arch::ResNet50);
    let bad = [
        ("width 0", base.clone().with_width_mult(0.0)),
        ("width < 0", base.clone().with_width_mult(-1.0)),
        ("width NaN", base.clone().with_width_mult(f64::NAN)),
        ("width inf", base.clone().with_width_mult(f64::INFINITY)),
        ("width huge", base.clone().with_width_mult(1e7)),
        ("width absurd", base.clone().with_width_mult(1e30)),
        ("channels absurd", base.clone().with_in_channels(usize::MAX)),
        ("classes absurd", base.clone().with_classes(usize::MAX)),
        (
            "resolution absurd",
            base.clone().with_resolution(usize::MAX, 64),
        ),
        ("zero height", base.clone().with_resolution(0, 64)),
        ("zero width", base.clone().with_resolution(64, 0)),
        ("too small", base.clone().with_resolution(31, 64)),
        ("no classes", base.clone().with_classes(0)),
        ("no channels", base.clone().with_in_channels(0)),
        ("batch 0", base.clone().with_batch(Some(0))),
        ("vgg 112", ZooConfig::vgg16().with_resolution(112, 112)),
        ("vgg 256", ZooConfig::vgg16().with_resolution(256, 224)),
        ("vgg 64", ZooConfig::vgg16_bn().with_resolution(64, 64)),
        (
            "effnet tiny",
            ZooConfig::efficientnet_b0().with_resolution(16, 16),
        ),
    ];
    for (what, cfg) in bad {
        let e = zoo::build(&cfg)
            .err()
            .unwrap_or_else(|| panic!("{what}: no error"));
        let msg = e.to_string();
        assert!(msg.contains(cfg.arch.name()), "{what}: {msg}");
        assert!(zoo::param_specs(&cfg).is_err(), "{what}");
        if what.starts_with("vgg") {
            assert!(
                msg.contains("multiple of 7") && msg.contains("224..=255"),
                "{msg}"
            );
        }
    }
    assert!("resnet18".parse::<Arch>().is_err());
}

#[test]
fn names_and_serde() {
    for arch in Arch::ALL {
        assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
        assert_eq!(arch.to_string(), arch.name());
    }
    assert_eq!(
        "EfficientNet-B0".parse::<Arch>().unwrap(),
        Arch::EfficientNetB0
    );
    let cfg = ZooConfig::vgg16_bn()
        .with_width_mult(0.5)
        .with_batch(Some(4))
        .with_seed(9);
    let json = serde_json::to_string(&cfg).unwrap();
    let back: ZooConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    // Missing fields take the defaults.
    let partial: ZooConfig =
        serde_json::from_str(r#"{"arch": "efficientnet_b0", "classes": 10}"#).unwrap();
    assert_eq!(partial, ZooConfig::efficientnet_b0().with_classes(10));
    assert_eq!(ZooConfig::default(), ZooConfig::resnet50());
}

// ---------------------------------------------------------------------------
// onnxruntime (skipped when python3 + onnxruntime + numpy are not importable)
// ---------------------------------------------------------------------------

const ORT_SCRIPT: &str = r#"
import json, sys
import numpy as np
import onnxruntime as ort
out = []
for path, c, h, w in zip(*[iter(sys.argv[1:])] * 4):
    c, h, w = int(c), int(h), int(w)
    x = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(["logits"], {"input": x})
    out.append({"path": path, "shape": list(y.shape), "finite": bool(np.isfinite(y).all()),
                "rms": float(np.sqrt(np.mean(np.square(y.astype(np.float64))))),
                "values": y.astype(np.float64).ravel().tolist()})
print(json.dumps(out))
"#;

fn ort_available() -> bool {
    Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

struct OrtResult {
    shape: Vec<usize>,
    finite: bool,
    rms: f64,
    values: Vec<f64>,
}

fn run_ort(models: &[(PathBuf, usize, usize, usize)]) -> Vec<OrtResult> {
    let mut args = vec!["-c".to_string(), ORT_SCRIPT.to_string()];
    for (p, c, h, w) in models {
        args.extend([
            p.display().to_string(),
            c.to_string(),
            h.to_string(),
            w.to_string(),
        ]);
    }
    let o = Command::new("python3").args(&args).output().unwrap();
    assert!(
        o.status.success(),
        "onnxruntime failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| OrtResult {
            shape: r["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
            finite: r["finite"].as_bool().unwrap(),
            rms: r["rms"].as_f64().unwrap(),
            values: r["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_f64().unwrap())
                .collect(),
        })
        .collect()
}

fn save(m: &Model, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    onnx::save(m, &p).unwrap();
    p
}

#[test]
fn onnxruntime_runs_zoo_models() {
    if !ort_available() {
        eprintln!("note: skipping onnxruntime_runs_zoo_models: `python3 -c 'import onnxruntime, numpy'` fails");
        return;
    }
    let dir = TempDir::new("ort");
    let mut models = Vec::new();
    for arch in Arch::ALL {
        let cfg = small(arch).with_classes(10 + models.len());
        let m = zoo::build(&cfg).unwrap();
        let (h, w) = cfg.resolution;
        let plain = save(&m, &dir.0, &format!("{}.onnx", arch.name()));
        let mut folded = m.clone();
        passes::simplify(&mut folded.graph).unwrap();
        let simplified = save(&folded, &dir.0, &format!("{}_simplified.onnx", arch.name()));
        models.push((cfg, plain, simplified, h, w));
    }
    let runs: Vec<_> = models
        .iter()
        .flat_map(|(cfg, p, s, h, w)| {
            [
                (p.clone(), cfg.in_channels, *h, *w),
                (s.clone(), cfg.in_channels, *h, *w),
            ]
        })
        .collect();
    let results = run_ort(&runs);
    for (k, (cfg, ..)) in models.iter().enumerate() {
        let (plain, folded) = (&results[2 * k], &results[2 * k + 1]);
        let arch = cfg.arch;
        assert_eq!(plain.shape, vec![2, cfg.classes], "{arch}");
        assert!(plain.finite, "{arch}");
        assert!(
            plain.rms > 1e-2 && plain.rms < 1e2,
            "{arch}: logits rms {}",
            plain.rms
        );
        // Different inputs give different logits.
        let n = cfg.classes;
        assert!(
            (0..n).any(|i| plain.values[i] != plain.values[n + i]),
            "{arch}"
        );
        // Folding BN and dropping Dropout keeps the outputs.
        assert_eq!(folded.shape, plain.shape);
        let max = plain.values.iter().map(|v| v.abs()).fold(0.0, f64::max);
        for (a, b) in plain.values.iter().zip(&folded.values) {
            assert!(
                (a - b).abs() <= 1e-4 * max.max(1.0),
                "{arch}: {a} vs {b} after simplify"
            );
        }
        eprintln!("{arch}: onnxruntime logits rms {:.4}", plain.rms);
    }
}

#[test]
fn tensors_are_f32() {
    let m = zoo::build(&small(Arch::EfficientNetB0)).unwrap();
    assert!(m
        .graph
        .initializers
        .values()
        .all(|t| matches!(t, Tensor::F32(_))));
}
