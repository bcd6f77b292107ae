//! The streaming calibrator on a fixture model and on synthetic graphs.

use std::path::PathBuf;

use qint8_calibration::{calibrate, CalibConfig, ImageDataset, Images, Preprocess, Progress};
use qint8_graph::{ConvAttrs, Graph, Node, Op, Tensor, ValueInfo};
use qint8_math::search::RangeMethod;
use qint8_math::QuantDtype;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn calib_set(n: usize) -> ImageDataset {
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    ImageDataset::from_idx(fixture("data/calib-images-idx3-ubyte"), None, pre)
        .unwrap()
        .take(n)
        .unwrap()
}

fn resnet() -> Graph {
    qint8_graph::onnx::load(fixture("models/resnet50.onnx"))
        .unwrap()
        .graph
}

#[test]
fn plans_do_not_depend_on_the_batch_size() {
    let data = calib_set(48);
    let g = resnet();
    let run = |batch| {
        let cfg = CalibConfig {
            batch,
            threads: 2,
            ..Default::default()
        };
        calibrate(&g, &data, &cfg, &mut |_| {}).unwrap().plan
    };
    // 5: ten batches, whole ones on the two workers at once; 7: seven,
    // the last one cut into sub-batches; 48: one, cut into sub-batches.
    let (a, b, c) = (run(5), run(7), run(48));
    assert!(!a.activations.is_empty() && !a.weights.is_empty());
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn progress_counts_both_passes_and_max_needs_one() {
    let data = calib_set(20);
    let g = resnet();
    for (method, passes) in [(RangeMethod::entropy(), 2u8), (RangeMethod::Max, 1)] {
        let mut seen: Vec<Progress> = Vec::new();
        let cfg = CalibConfig {
            method,
            batch: 8,
            ..Default::default()
        };
        let c = calibrate(&g, &data, &cfg, &mut |p| seen.push(p)).unwrap();
        let last = seen.last().copied().unwrap();
        assert_eq!(
            (last.pass, last.passes, last.done, last.total),
            (passes, passes, 20, 20)
        );
        // Thresholds never exceed the largest value seen (the max plan).
        if method == RangeMethod::Max {
            assert!(c.plan.method.starts_with("max"));
        }
    }
}

#[test]
fn entropy_thresholds_stay_inside_the_observed_range_and_inputs_are_not_clipped() {
    let data = calib_set(32);
    let g = resnet();
    let cfg = |method| CalibConfig {
        method,
        batch: 16,
        ..Default::default()
    };
    let max = calibrate(&g, &data, &cfg(RangeMethod::Max), &mut |_| {})
        .unwrap()
        .plan;
    let ent = calibrate(&g, &data, &cfg(RangeMethod::entropy()), &mut |_| {})
        .unwrap()
        .plan;
    for (name, p) in &ent.activations {
        let (s, m) = (p.scales()[0], max.activations[name].scales()[0]);
        assert!(s <= m * (1.0 + 1e-6), "{name}: {s} > {m}");
    }
    // The input keeps its full range (largest |x| of the normalized images).
    let input = &g.inputs[0].name;
    assert_eq!(ent.activations[input], max.activations[input]);
    let expected = (1.0f32 - 0.2860) / 0.3530 / 127.0;
    assert!((max.activations[input].scales()[0] - expected).abs() < 1e-6);
}

/// uint8 activations take the int8 run's thresholds and keep the part of
/// `[-t, t]` each tensor occupies: all 256 levels on `[0, t]` after a Relu,
/// the images' own minimum for the input; min-max then needs the histogram
/// pass for the signed ranges.
#[test]
fn uint8_ranges_are_the_occupied_part_of_the_symmetric_range() {
    let data = calib_set(64);
    let g = resnet();
    for (method, uint8_passes) in [(RangeMethod::entropy(), 2u8), (RangeMethod::Max, 2)] {
        let run = |dtype| {
            let mut passes = 0;
            let cfg = CalibConfig {
                method,
                activation_dtype: dtype,
                threads: 2,
                ..Default::default()
            };
            let c = calibrate(&g, &data, &cfg, &mut |p| passes = passes.max(p.passes)).unwrap();
            (c, passes)
        };
        let (int8, _) = run(QuantDtype::Int8);
        let (uint8, passes) = run(QuantDtype::Uint8);
        assert_eq!(passes, uint8_passes);
        assert_eq!(int8.plan.weights, uint8.plan.weights);
        let mut relus = 0;
        for (name, p) in &uint8.plan.activations {
            let u = p.channels()[0];
            let t = int8.plan.activations[name].channels()[0].scale * 127.0;
            assert_eq!((u.qmin, u.qmax), (0, 255), "{name}");
            let (lo, hi) = u.real_range();
            assert!(lo <= 0.0 && hi >= 0.0, "{name}: [{lo}, {hi}]");
            // Within the threshold, up to the zero point's rounding.
            assert!(
                -lo <= t + u.scale && hi <= t + u.scale,
                "{name}: [{lo}, {hi}] vs {t}"
            );
            if let Some((min, max)) = uint8.histograms.get(name).and_then(|h| h.min_max()) {
                // Exactly the rule, on the histogram pass's signed range.
                let expected =
                    qint8_calibration::activation_params(t, Some((min, max)), QuantDtype::Uint8)
                        .unwrap();
                assert!(
                    (expected.channels()[0].scale - u.scale).abs() <= 1e-6 * u.scale
                        && expected.channels()[0].zero_point == u.zero_point,
                    "{name}: {expected:?} vs {u:?}"
                );
            }
            if name.contains("relu") {
                relus += 1;
                assert_eq!(u.zero_point, 0, "{name}");
                assert!(
                    (u.scale * 255.0 - t).abs() <= 1e-5 * t,
                    "{name}: {u:?} vs {t}"
                );
            }
        }
        assert!(relus >= 16, "{relus} Relu outputs");
        // The normalized images reach (0 - 0.2860) / 0.3530 below zero.
        let input = uint8.plan.activations[&g.inputs[0].name].channels()[0];
        let (lo, hi) = input.real_range();
        assert!((lo + 0.2860 / 0.3530).abs() <= input.scale, "{input:?}");
        assert!(
            (hi - (1.0 - 0.2860) / 0.3530).abs() <= input.scale,
            "{input:?}"
        );
    }
}

/// x -> Div(x, x) -> Conv: a zero pixel in the third image makes 0/0.
#[test]
fn non_finite_activations_are_errors_naming_the_tensor_and_batch() {
    let mut g = Graph {
        name: "inf".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 1, 4, 4])],
        outputs: vec![ValueInfo::f32("y", &[1, 1, 2, 2])],
        nodes: vec![
            Node::new("div", Op::Div, &["x", "x"], &["d"]),
            Node::new(
                "conv",
                Op::Conv(ConvAttrs {
                    group: 1,
                    ..Default::default()
                }),
                &["d", "w"],
                &["y"],
            ),
        ],
        ..Default::default()
    };
    g.initializers.insert(
        "w".into(),
        Tensor::F32(ndarray::ArrayD::from_elem(
            ndarray::IxDyn(&[1, 1, 3, 3]),
            0.5,
        )),
    );
    // Batches of one on two workers: batches 0 and 1 run at once, each
    // whole on its worker, and batch 2 alone, cut into sub-batches.
    for bad in [1usize, 2] {
        let mut pixels: Vec<u8> = (0..48).map(|i| (i * 5 + 5) as u8).collect();
        pixels[bad * 16 + 7] = 0;
        let images = Images::new(3, 4, 4, 1, pixels).unwrap();
        let data = ImageDataset::new(images, None, Preprocess::default()).unwrap();
        let cfg = CalibConfig {
            batch: 1,
            threads: 2,
            ..Default::default()
        };
        let e = calibrate(&g, &data, &cfg, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("`d`"), "{e}");
        let want = format!("batch {bad} (images {bad}..{})", bad + 1);
        assert!(e.contains(&want), "{e}");
    }
    // A weight holding NaN is named with the value's index in the whole
    // tensor (here in the second output channel's block).
    let mut w = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 1, 3, 3]), 0.5f32);
    w[[1, 0, 1, 2]] = f32::NAN;
    g.initializers.insert("w".into(), Tensor::F32(w));
    g.outputs = vec![ValueInfo::f32("y", &[1, 2, 2, 2])];
    g.nodes.remove(0);
    g.nodes[0].inputs[0] = "x".into();
    let images = Images::new(2, 4, 4, 1, vec![9; 32]).unwrap();
    let data = ImageDataset::new(images, None, Preprocess::default()).unwrap();
    let cfg = CalibConfig {
        batch: 1,
        ..Default::default()
    };
    let e = calibrate(&g, &data, &cfg, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("weight `w` holds a non-finite value at index 14"),
        "{e}"
    );
}

/// Moving-average min-max: the first batch sets the range, later batches
/// move it by c * (batch max - range).
#[test]
fn moving_average_max_follows_batches() {
    let g = Graph {
        name: "relu".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 1, 2, 2])],
        outputs: vec![ValueInfo::f32("y", &[1, 1, 1, 1])],
        nodes: vec![
            Node::new("relu", Op::Relu, &["x"], &["r"]),
            Node::new(
                "conv",
                Op::Conv(ConvAttrs {
                    group: 1,
                    ..Default::default()
                }),
                &["r", "w"],
                &["y"],
            ),
        ],
        initializers: [(
            "w".to_string(),
            Tensor::F32(ndarray::ArrayD::from_elem(
                ndarray::IxDyn(&[1, 1, 2, 2]),
                1.0,
            )),
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    // Image maxima 51/255 = 0.2, then 255/255 = 1.0, then 102/255 = 0.4.
    let pixels = [[51u8, 0, 0, 0], [255, 0, 0, 0], [102, 0, 0, 0]].concat();
    let data = ImageDataset::new(
        Images::new(3, 2, 2, 1, pixels).unwrap(),
        None,
        Preprocess::default(),
    )
    .unwrap();
    let cfg = CalibConfig {
        batch: 1,
        moving_average: Some(0.5),
        ..Default::default()
    };
    let mut passes = 0;
    let c = calibrate(&g, &data, &cfg, &mut |p| passes = passes.max(p.passes)).unwrap();
    assert_eq!(passes, 1);
    // 0.2 -> 0.2 + 0.5 * (1.0 - 0.2) = 0.6 -> 0.6 + 0.5 * (0.4 - 0.6) = 0.5.
    let scale = c.plan.activations["r"].channels()[0].scale;
    assert!((scale * 127.0 - 0.5).abs() < 1e-6, "{scale}");
    assert!(c.plan.method.starts_with("moving_average_max"));
    // uint8: the moving averages of the minimum (0) and maximum.
    let u = calibrate(
        &g,
        &data,
        &CalibConfig {
            activation_dtype: QuantDtype::Uint8,
            ..cfg.clone()
        },
        &mut |_| {},
    )
    .unwrap();
    let r = u.plan.activations["r"].channels()[0];
    assert_eq!((r.zero_point, r.qmin, r.qmax), (0, 0, 255));
    assert!((r.scale * 255.0 - 0.5).abs() < 1e-6, "{r:?}");
    let bad = CalibConfig {
        moving_average: Some(1.5),
        ..cfg
    };
    assert!(calibrate(&g, &data, &bad, &mut |_| {}).is_err());
}

/// `refine` (the `auto` method) only keeps changes that lower the output
/// error on its images, picks every threshold from the candidates or the
/// start, and reports a third pass.
#[test]
fn refined_thresholds_never_raise_the_output_error() {
    use qint8_calibration::refine::choose_thresholds;
    use qint8_math::params::{QuantDtype, QuantParams};
    use std::collections::BTreeMap;

    let model = qint8_graph::zoo::build(
        &qint8_graph::zoo::ZooConfig::resnet50()
            .with_width_mult(0.0625)
            .with_resolution(32, 32)
            .with_in_channels(1)
            .with_classes(10),
    )
    .unwrap();
    let data = calib_set(48);
    let base_cfg = CalibConfig {
        batch: 16,
        threads: 2,
        ..Default::default()
    };
    let base = calibrate(&model.graph, &data, &base_cfg, &mut |_| {}).unwrap();

    // Candidates: each threshold halved and doubled.
    let candidates: BTreeMap<String, Vec<f32>> = base
        .plan
        .activations
        .iter()
        .map(|(n, p)| {
            let a = p.channels()[0].scale * 127.0;
            (n.clone(), vec![a * 0.5, a * 2.0])
        })
        .collect();
    let batches: Vec<_> = data.batches(16).take(2).map(Result::unwrap).collect();
    let mut plan = base.plan.clone();
    let mut trials = 0;
    let (best, start) = choose_thresholds(
        &base.graph,
        &mut plan,
        &candidates,
        &|_, t| Ok(QuantParams::symmetric(t, QuantDtype::Int8, false)?),
        &BTreeMap::new(),
        &batches,
        2,
        &mut |done, total| {
            assert!(done <= total);
            trials = total;
        },
    )
    .unwrap();
    assert!(best <= start && start > 0.0, "{best} vs {start}");
    assert_eq!(trials, 2 * candidates.len());
    for (n, p) in &plan.activations {
        let a = p.channels()[0].scale * 127.0;
        let a0 = base.plan.activations[n].channels()[0].scale * 127.0;
        let ok = [a0, a0 * 0.5, a0 * 2.0]
            .iter()
            .any(|c| (c - a).abs() <= 1e-6 * c.abs());
        assert!(ok, "{n}: {a} not among {a0} x 0.5/1/2");
    }

    // Through calibrate: a third pass and the method recorded.
    let cfg = CalibConfig {
        refine: Some(16),
        ..base_cfg
    };
    let mut last = None;
    let refined = calibrate(&model.graph, &data, &cfg, &mut |p| last = Some(p)).unwrap();
    let last = last.unwrap();
    assert_eq!((last.pass, last.passes, last.done), (3, 3, last.total));
    assert!(
        refined.plan.method.starts_with("auto(entropy"),
        "{}",
        refined.plan.method
    );
    // The ranges (what a TensorRT cache is written from) follow the choice.
    for (n, p) in &refined.plan.activations {
        let from_range = refined.ranges[n] / 127.0;
        let scale = p.channels()[0].scale;
        assert!(
            (from_range - scale).abs() <= 1e-6 * scale,
            "{n}: {from_range} vs {scale}"
        );
    }
}

#[test]
fn float_nodes_match_by_glob_and_their_inputs_stay_unquantized() {
    let data = calib_set(8);
    let g = resnet();
    let cfg = CalibConfig {
        method: RangeMethod::Max,
        float_nodes: ["/conv1/Conv", "/layer4/*"]
            .map(String::from)
            .into_iter()
            .collect(),
        batch: 8,
        threads: 2,
        ..Default::default()
    };
    let c = calibrate(&g, &data, &cfg, &mut |_| {}).unwrap();
    let float: Vec<&str> = c.plan.precision.keys().map(String::as_str).collect();
    // Every Conv of layer4 and its three residual Adds, and the first
    // convolution; no Relu (nothing of theirs is quantized).
    let layer4 = |op: &str| {
        c.graph
            .nodes
            .iter()
            .filter(|n| n.name.starts_with("/layer4/") && n.op.op_type() == op)
            .count()
    };
    assert_eq!(float.len(), 1 + layer4("Conv") + layer4("Add"), "{float:?}");
    assert!(float.contains(&"/conv1/Conv") && float.iter().all(|n| !n.ends_with("Relu")));
    // The graph input feeds only the first convolution, so no pair remains
    // for it; nor for any weight of a float convolution.
    assert!(!c.plan.activations.contains_key(&c.graph.inputs[0].name));
    for n in c
        .graph
        .nodes
        .iter()
        .filter(|n| float.contains(&n.name.as_str()))
    {
        assert!(
            n.inputs
                .iter()
                .skip(1)
                .all(|w| !c.plan.weights.contains_key(w)),
            "{}",
            n.name
        );
    }
    // The rest is quantized as without float nodes.
    let all = calibrate(
        &g,
        &data,
        &CalibConfig {
            float_nodes: Default::default(),
            ..cfg.clone()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(c.plan.weights.len() < all.plan.weights.len());
    for (name, p) in &c.plan.weights {
        assert_eq!(Some(p), all.plan.weights.get(name), "{name}");
    }

    // Patterns that match no quantized node are named, all of them.
    let bad = CalibConfig {
        float_nodes: ["/conv1/Conv", "/nope*", "/relu/Relu"]
            .map(String::from)
            .into_iter()
            .collect(),
        ..cfg
    };
    let e = calibrate(&g, &data, &bad, &mut |_| {})
        .unwrap_err()
        .to_string();
    let named = e.split(" match ").next().unwrap();
    assert!(
        named.contains("`/nope*`") && named.contains("`/relu/Relu`") && !named.contains("conv1"),
        "{e}"
    );
}

/// Attention probabilities (Softmax outputs, which TensorRT placement
/// quantizes as MatMul inputs) keep their observed maximum under every
/// histogram method, while the other activations are clipped as the method
/// says: on the ViT fixture entropy's thresholds for them were 0.15-0.5.
#[test]
fn softmax_outputs_keep_their_full_range() {
    let data = calib_set(64);
    let g = qint8_graph::onnx::load(fixture("models/zoo/vit.onnx"))
        .unwrap()
        .graph;
    let probs: Vec<String> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Softmax { .. }))
        .map(|n| n.outputs[0].clone())
        .collect();
    assert_eq!(probs.len(), 4);
    let plan = |method| {
        let cfg = CalibConfig {
            method,
            threads: 2,
            ..Default::default()
        };
        calibrate(&g, &data, &cfg, &mut |_| {}).unwrap().plan
    };
    let (max, entropy) = (plan(RangeMethod::Max), plan(RangeMethod::entropy()));
    let amax = |p: &qint8_graph::QuantPlan, t: &str| p.activations[t].channels()[0].scale * 127.0;
    for t in &probs {
        let m = amax(&max, t);
        assert!(m > 0.5 && m <= 1.0 + 1e-6, "{t}: {m}");
        assert_eq!(amax(&entropy, t), m, "{t}");
    }
    let clipped = entropy
        .activations
        .keys()
        .filter(|t| !probs.contains(t) && amax(&entropy, t) < 0.95 * amax(&max, t))
        .count();
    assert!(clipped >= 10, "{clipped} activations clipped by entropy");
}
