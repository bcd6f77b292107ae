//! Quantization plans, TensorRT and onnxruntime placement, QDQ rewriting.

use std::collections::{BTreeMap, BTreeSet};

use ndarray::{ArrayD, IxDyn};
use qint8_graph::quant::{
    float_from_qdq, insert_qdq, ort_placement, placement, plan_from_qdq, restore_float_weights,
    trt_placement, Precision, QuantPlan, WeightStorage,
};
use qint8_graph::{ConvAttrs, Graph, Node, Op, PlacementPolicy, PoolAttrs, Tensor, ValueInfo};
use qint8_math::{QuantDtype, QuantParams};

fn conv(name: &str, x: &str, w: &str, y: &str) -> Node {
    Node::new(
        name,
        Op::Conv(ConvAttrs {
            group: 1,
            ..Default::default()
        }),
        &[x, w],
        &[y],
    )
}

fn weight(cout: usize, cin: usize, seed: f32) -> Tensor {
    let n = cout * cin * 9;
    Tensor::F32(
        ArrayD::from_shape_vec(
            IxDyn(&[cout, cin, 3, 3]),
            (0..n)
                .map(|i| ((i as f32 * 0.37 + seed).sin()) * (1.0 + (i / (cin * 9)) as f32))
                .collect(),
        )
        .unwrap(),
    )
}

/// x -> conv a -> relu -> conv b -> add(b, relu) -> relu -> out: a residual block.
fn block() -> Graph {
    let mut g = Graph {
        name: "block".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 4, 8, 8])],
        outputs: vec![ValueInfo::f32("out", &[1, 4, 8, 8])],
        nodes: vec![
            conv("a", "x", "wa", "ya"),
            Node::new("r1", Op::Relu, &["ya"], &["ra"]),
            conv("b", "ra", "wb", "yb"),
            Node::new("add", Op::Add, &["yb", "ra"], &["s"]),
            Node::new("r2", Op::Relu, &["s"], &["out"]),
        ],
        ..Default::default()
    };
    g.initializers.insert("wa".into(), weight(4, 4, 0.1));
    g.initializers.insert("wb".into(), weight(4, 4, 0.7));
    g
}

fn plan_for(g: &Graph) -> QuantPlan {
    let p = trt_placement(g, &BTreeSet::new());
    let mut plan = QuantPlan::new("test");
    for a in &p.activations {
        plan.activations.insert(
            a.clone(),
            QuantParams::symmetric(2.0, QuantDtype::Int8, false).unwrap(),
        );
    }
    for (w, &axis) in &p.weights {
        let amax: Vec<f32> = (0..4).map(|c| 1.0 + c as f32).collect();
        plan.weights.insert(
            w.clone(),
            QuantParams::symmetric_per_channel(&amax, axis, QuantDtype::Int8, true).unwrap(),
        );
    }
    plan
}

#[test]
fn tensorrt_placement_quantizes_conv_inputs_and_the_residual() {
    let g = block();
    let p = trt_placement(&g, &BTreeSet::new());
    // Conv inputs x and ra; the Add's residual input is ra (yb comes from a conv).
    assert_eq!(
        p.activations,
        ["ra", "x"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(p.weights.get("wa"), Some(&0));
    assert_eq!(p.weights.get("wb"), Some(&0));
    // Outputs of convolutions are not quantized.
    assert!(!p.activations.contains("ya") && !p.activations.contains("yb"));
    // A node kept in float contributes nothing, and the Add after it has no
    // INT8 convolution to fuse into, so its residual ra stays float too.
    let p = trt_placement(&g, &["b".to_string()].into_iter().collect());
    assert!(!p.weights.contains_key("wb"));
    assert_eq!(p.activations, ["x"].iter().map(|s| s.to_string()).collect());
}

#[test]
fn tensorrt_placement_fuses_the_add_into_the_quantized_one_of_two_convolutions() {
    // Add(ya, yb) with both inputs from convolutions: the second is the
    // residual, unless its producer is the one that stays quantized.
    let mut g = block();
    g.nodes[3] = Node::new("add", Op::Add, &["ya", "yb"], &["s"]);
    let all = trt_placement(&g, &BTreeSet::new());
    assert!(all.activations.contains("yb") && !all.activations.contains("ya"));
    let a_float = trt_placement(&g, &["a".to_string()].into_iter().collect());
    assert!(a_float.activations.contains("ya") && !a_float.activations.contains("yb"));
    let both = trt_placement(
        &g,
        &["a".to_string(), "b".to_string()].into_iter().collect(),
    );
    assert!(both.activations.is_empty());
}

#[test]
fn qdq_rewrite_shares_one_pair_per_tensor_and_stores_int8_weights() {
    let g = block();
    let plan = plan_for(&g);
    let q = insert_qdq(&g, &plan, WeightStorage::Int8).unwrap();
    let count = |op: &str| q.nodes.iter().filter(|n| n.op.op_type() == op).count();
    // Two activations (x, ra: one pair each, shared by b and add) and two weights.
    assert_eq!(count("QuantizeLinear"), 2);
    assert_eq!(count("DequantizeLinear"), 4);
    // Both consumers of ra read the same dequantized value.
    let b = q.nodes.iter().find(|n| n.name == "b").unwrap();
    let add = q.nodes.iter().find(|n| n.name == "add").unwrap();
    assert_eq!(b.inputs[0], add.inputs[1]);
    assert!(b.inputs[0].ends_with("_dequantized"));
    // Float weights are gone, int8 ones with per-channel scales remain.
    assert!(!q.initializers.contains_key("wa"));
    let int8: Vec<_> = q
        .initializers
        .values()
        .filter(|t| matches!(t, Tensor::I8(a) if a.len() == 144))
        .collect();
    assert_eq!(int8.len(), 2);
    // Channel c of wa was quantized with scale (1 + c) / 127.
    let Some(Tensor::I8(wq)) = q.initializers.get("wa_quantized") else {
        panic!("no wa_quantized")
    };
    let wa = g.initializers["wa"].as_f32().unwrap();
    for (i, (&v, &w)) in wq.iter().zip(wa.iter()).enumerate() {
        let s = (1 + i / 36) as f32 / 127.0;
        assert_eq!(
            v as f32,
            (w / s).round_ties_even().clamp(-127.0, 127.0),
            "element {i}"
        );
    }
    q.validate().unwrap();
}

#[test]
fn float_weight_storage_quantizes_in_the_graph() {
    let g = block();
    let q = insert_qdq(&g, &plan_for(&g), WeightStorage::FloatQdq).unwrap();
    assert!(q.initializers.contains_key("wa"));
    assert_eq!(
        q.nodes
            .iter()
            .filter(|n| n.op.op_type() == "QuantizeLinear")
            .count(),
        4
    );
}

#[test]
fn float_nodes_read_the_float_tensor() {
    let g = block();
    let mut plan = plan_for(&g);
    plan.precision.insert("add".into(), Precision::Float);
    let q = insert_qdq(&g, &plan, WeightStorage::Int8).unwrap();
    let add = q.nodes.iter().find(|n| n.name == "add").unwrap();
    assert_eq!(add.inputs[1], "ra");
}

#[test]
fn import_recovers_the_plan_of_a_qdq_graph() {
    let g = block();
    let plan = plan_for(&g);
    for storage in [WeightStorage::Int8, WeightStorage::FloatQdq] {
        let q = insert_qdq(&g, &plan, storage).unwrap();
        let back = plan_from_qdq(&q).unwrap();
        assert_eq!(back.activations, plan.activations);
        let weights: Vec<_> = back.weights.values().cloned().collect();
        let expected: Vec<_> = plan
            .weights
            .values()
            .map(|p| {
                // Imported weights carry the full int8 range: ONNX has no narrow-range flag.
                let ch = p
                    .channels()
                    .iter()
                    .map(|c| {
                        qint8_math::ChannelParams::new(c.scale, 0, QuantDtype::Int8, false).unwrap()
                    })
                    .collect();
                QuantParams::per_channel(ch, 0).unwrap()
            })
            .collect();
        assert_eq!(weights, expected, "{storage:?}");
    }
}

#[test]
fn a_qdq_graph_reads_back_as_its_float_graph_and_plan() {
    let g = block();
    let mut plan = plan_for(&g);
    // b in float: it reads ra directly, the Add reads it through its pair.
    plan.precision.insert("b".into(), Precision::Float);
    for storage in [WeightStorage::Int8, WeightStorage::FloatQdq] {
        let q = insert_qdq(&g, &plan, storage).unwrap();
        let (f, back) = float_from_qdq(&q).unwrap();
        let ops = |g: &Graph| -> Vec<(String, &'static str)> {
            g.nodes
                .iter()
                .map(|n| (n.name.clone(), n.op.op_type()))
                .collect()
        };
        assert_eq!(ops(&f), ops(&g), "{storage:?}");
        assert_eq!(back.activations, plan.activations, "{storage:?}");
        assert_eq!(
            back.precision,
            BTreeMap::from([("b".to_string(), Precision::Float)])
        );
        // a's weight: quantized as planned, its values those the QDQ graph
        // computes with (int8 storage: dequantized, under the
        // DequantizeLinear's output name).
        let a = f.nodes.iter().find(|n| n.name == "a").unwrap();
        assert_eq!(a.inputs[0], "x");
        let w = &a.inputs[1];
        let got = back.weights[w.as_str()].scales();
        assert_eq!(got, plan.weights["wa"].scales(), "{storage:?}");
        let values = f.initializers[w.as_str()].to_f32_vec();
        let original = g.initializers["wa"].to_f32_vec();
        let fake =
            qint8_math::quant::fake_quant(&original, &[4, 4, 3, 3], &plan.weights["wa"]).unwrap();
        match storage {
            WeightStorage::Int8 => assert_eq!(values, fake),
            WeightStorage::FloatQdq => assert_eq!(values, original),
        }
        // b's weight is read in float only: no longer planned.
        assert!(back.weights.len() == 1, "{:?}", back.weights.keys());
        // Written again, the same pairs.
        let again = insert_qdq(&f, &back, WeightStorage::Int8).unwrap();
        assert_eq!(
            plan_from_qdq(&again).unwrap().activations,
            plan_from_qdq(&q).unwrap().activations
        );
        assert!(!f.nodes.iter().any(|n| n.op.op_type().ends_with("Linear")));
    }
}

#[test]
fn a_pair_whose_range_starts_at_zero_reads_back_through_a_relu() {
    // x quantized to uint8 with zero point 0: the pair sets negative inputs
    // to 0, so the float graph reads x through a Relu.
    let g = block();
    let mut plan = plan_for(&g);
    let floor = qint8_math::ChannelParams::new(0.02, 0, QuantDtype::Uint8, false).unwrap();
    plan.activations
        .insert("x".into(), QuantParams::per_tensor(floor));
    let q = insert_qdq(&g, &plan, WeightStorage::Int8).unwrap();
    let (f, back) = float_from_qdq(&q).unwrap();
    let relu = f.nodes.iter().find(|n| n.inputs == ["x"]).unwrap();
    assert_eq!(relu.op.op_type(), "Relu");
    let a = f.nodes.iter().find(|n| n.name == "a").unwrap();
    assert_eq!(a.inputs[0], relu.outputs[0]);
    assert_eq!(back.activations[&relu.outputs[0]], plan.activations["x"]);
    assert!(!back.activations.contains_key("x"));
    // Symmetric ranges (qint8's own) add none.
    let (f, _) =
        float_from_qdq(&insert_qdq(&g, &plan_for(&g), WeightStorage::Int8).unwrap()).unwrap();
    assert_eq!(f.nodes.len(), g.nodes.len());
}

#[test]
fn fp32_weights_come_back_where_they_round_to_the_file() {
    let g = block();
    let plan = plan_for(&g);
    let q = insert_qdq(&g, &plan, WeightStorage::Int8).unwrap();
    let (mut f, back) = float_from_qdq(&q).unwrap();
    let mut fp32 = g.clone();
    // b's FP32 weight moved by a step and more: it no longer rounds there.
    if let Some(Tensor::F32(w)) = fp32.initializers.get_mut("wb") {
        w.iter_mut().take(3).for_each(|v| *v += 1.0);
    }
    let r = restore_float_weights(&mut f, &back, &fp32).unwrap();
    assert_eq!(r.restored, ["a"]);
    assert_eq!(r.kept.len(), 1);
    assert_eq!(r.kept[0].0, "b");
    assert!(r.kept[0].1.contains("3 of the 144"), "{:?}", r.kept);
    let a = f.nodes.iter().find(|n| n.name == "a").unwrap();
    assert_eq!(f.initializers[&a.inputs[1]], g.initializers["wa"]);
    let b = f.nodes.iter().find(|n| n.name == "b").unwrap();
    let fake = qint8_math::quant::fake_quant(
        &g.initializers["wb"].to_f32_vec(),
        &[4, 4, 3, 3],
        &plan.weights["wb"],
    )
    .unwrap();
    assert_eq!(f.initializers[&b.inputs[1]].to_f32_vec(), fake);
    // Another graph: nothing of it fits.
    let (mut f, back) = float_from_qdq(&q).unwrap();
    let mut other = g.clone();
    other.nodes.iter_mut().for_each(|n| n.name.push('x'));
    let r = restore_float_weights(&mut f, &back, &other).unwrap();
    assert!(r.restored.is_empty() && r.kept.len() == 2, "{r:?}");
}

#[test]
fn scales_from_constant_nodes_read_as_initializers() {
    let g = block();
    let plan = plan_for(&g);
    let mut q = insert_qdq(&g, &plan, WeightStorage::Int8).unwrap();
    // Every scale and zero point of the pair on ra from a Constant node.
    let dq = q
        .nodes
        .iter()
        .find(|n| n.op.op_type() == "DequantizeLinear" && n.inputs[0] == "ra_quantized")
        .unwrap()
        .clone();
    for name in &dq.inputs[1..] {
        let t = q.initializers.remove(name).unwrap();
        q.nodes.insert(
            0,
            Node::new(format!("{name}_const"), Op::Constant(t), &[], &[name]),
        );
    }
    let (f, back) = float_from_qdq(&q).unwrap();
    assert_eq!(back.activations, plan.activations);
    assert!(!f.nodes.iter().any(|n| n.op.op_type() == "Constant"));
}

#[test]
fn what_a_plan_cannot_hold_is_named() {
    let g = block();
    let plan = plan_for(&g);
    let q = insert_qdq(&g, &plan, WeightStorage::Int8).unwrap();
    let fails = |q: &Graph| float_from_qdq(q).unwrap_err().to_string();
    // b reads its weight through a pair and ra directly.
    let mut mixed = q.clone();
    let b = mixed.nodes.iter_mut().find(|n| n.name == "b").unwrap();
    b.inputs[0] = "ra".into();
    let e = fails(&mixed);
    assert!(e.contains("b: reads") && e.contains("in float"), "{e}");
    // A QuantizeLinear read by something else than a DequantizeLinear.
    let mut raw = q.clone();
    raw.nodes
        .push(Node::new("peek", Op::Relu, &["ra_quantized"], &["p"]));
    let e = fails(&raw);
    assert!(e.contains("read by peek"), "{e}");
    // The two halves of a pair disagree.
    let mut odd = q.clone();
    odd.initializers.insert(
        "other_scale".into(),
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.5)),
    );
    let dq = odd
        .nodes
        .iter_mut()
        .find(|n| n.op.op_type() == "DequantizeLinear" && n.inputs[0] == "ra_quantized")
        .unwrap();
    dq.inputs[1] = "other_scale".into();
    let e = fails(&odd);
    assert!(e.contains("different parameters"), "{e}");
}

#[test]
fn plans_round_trip_through_json_and_reject_what_does_not_fit() {
    let g = block();
    let plan = plan_for(&g);
    let back = QuantPlan::from_json(&plan.to_json().unwrap()).unwrap();
    assert_eq!(back, plan);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    plan.save(&path).unwrap();
    assert_eq!(QuantPlan::load(&path).unwrap(), plan);
    assert!(QuantPlan::from_json("{ not json").is_err());
    let mut bad = plan.clone();
    bad.activations.insert(
        "nope".into(),
        QuantParams::symmetric(1.0, QuantDtype::Int8, false).unwrap(),
    );
    bad.weights.insert(
        "wa".into(),
        QuantParams::symmetric_per_channel(&[1.0; 3], 0, QuantDtype::Int8, true).unwrap(),
    );
    bad.precision.insert("ghost".into(), Precision::Float);
    let e = bad.validate(&g).unwrap_err().to_string();
    assert!(
        e.contains("`nope`") && e.contains("`wa`") && e.contains("`ghost`"),
        "{e}"
    );
    assert!(insert_qdq(&g, &bad, WeightStorage::Int8).is_err());
}

// ---- onnxruntime's QDQ placement ----

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn shares(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn f32_tensor(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::F32(
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..n).map(|i| (i as f32 * 0.3).cos()).collect(),
        )
        .unwrap(),
    )
}

fn i64_tensor(values: &[i64]) -> Tensor {
    Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).unwrap())
}

/// x -> conv (bias) -> relu -> max pool -> reshape -> gemm (bias) -> logits.
fn classifier(trans_b: bool) -> Graph {
    let pool = PoolAttrs {
        kernel_shape: vec![2, 2],
        strides: vec![2, 2],
        ..Default::default()
    };
    let mut g = Graph {
        name: "classifier".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 2, 8, 8])],
        outputs: vec![ValueInfo::f32("logits", &[1, 5])],
        nodes: vec![
            Node::new(
                "c1",
                Op::Conv(ConvAttrs {
                    group: 1,
                    ..Default::default()
                }),
                &["x", "w1", "b1"],
                &["y1"],
            ),
            Node::new("relu", Op::Relu, &["y1"], &["r1"]),
            Node::new("pool", Op::MaxPool(pool), &["r1"], &["p"]),
            Node::new(
                "flat",
                Op::Reshape { allowzero: false },
                &["p", "shape"],
                &["f"],
            ),
            Node::new(
                "fc",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b,
                },
                &["f", "wg", "bg"],
                &["logits"],
            ),
        ],
        ..Default::default()
    };
    g.initializers.insert("w1".into(), weight(4, 2, 0.3));
    g.initializers.insert("b1".into(), f32_tensor(&[4]));
    g.initializers.insert("shape".into(), i64_tensor(&[1, 36]));
    let wg = if trans_b { [5, 36] } else { [36, 5] };
    g.initializers.insert("wg".into(), f32_tensor(&wg));
    g.initializers.insert("bg".into(), f32_tensor(&[5]));
    g
}

#[test]
fn ort_placement_quantizes_inputs_and_outputs_and_shares_through_relu_pool_and_reshape() {
    let g = classifier(true);
    let p = ort_placement(&g, &BTreeSet::new());
    // Inputs and outputs of every quantized op, graph output included.
    assert_eq!(p.activations, names(&["f", "logits", "p", "r1", "x", "y1"]));
    // The conv output takes the Relu output's range; pool and reshape
    // outputs reuse their input's parameters, resolved to the owner.
    assert_eq!(p.shared, shares(&[("f", "r1"), ("p", "r1"), ("y1", "r1")]));
    // Per-channel weights: conv axis 0, transposed Gemm weight axis 0;
    // biases (int32 in onnxruntime) and the int64 shape stay as they are.
    assert_eq!(
        p.weights,
        [("w1".to_string(), 0), ("wg".to_string(), 0)]
            .into_iter()
            .collect()
    );
    // A plain [k, n] Gemm weight is per channel on axis 1.
    let p = ort_placement(&classifier(false), &BTreeSet::new());
    assert_eq!(p.weights.get("wg"), Some(&1));
}

#[test]
fn ort_placement_of_a_residual_block_quantizes_both_add_inputs() {
    let g = block();
    let p = ort_placement(&g, &BTreeSet::new());
    assert_eq!(p.activations, names(&["out", "ra", "s", "x", "ya", "yb"]));
    // Relu inputs with one consumer take the Relu output's parameters; the
    // second conv's output feeds the Add, not a Relu, and keeps its own.
    assert_eq!(p.shared, shares(&[("s", "out"), ("ya", "ra")]));
    assert_eq!(p.weights.len(), 2);
    // Unlike TensorRT's rules, conv outputs are quantized.
    let trt = trt_placement(&g, &BTreeSet::new());
    assert!(!trt.activations.contains("ya") && trt.shared.is_empty());
}

#[test]
fn ort_placement_gives_sigmoid_mul_pool_and_concat_their_own_ranges() {
    // conv -> SiLU (sigmoid, mul) -> squeeze-excite (global pool, conv,
    // sigmoid, mul) -> concat with the input.
    let mut g = Graph {
        name: "se".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 4, 8, 8])],
        outputs: vec![ValueInfo::f32("cat", &[1, 8, 6, 6])],
        nodes: vec![
            conv("c1", "x", "w1", "y"),
            Node::new("sig", Op::Sigmoid, &["y"], &["sg"]),
            Node::new("silu", Op::Mul, &["y", "sg"], &["m"]),
            Node::new("gap", Op::GlobalAveragePool, &["m"], &["gp"]),
            Node::new(
                "c2",
                Op::Conv(ConvAttrs {
                    group: 1,
                    ..Default::default()
                }),
                &["gp", "w2"],
                &["c2y"],
            ),
            Node::new("gate", Op::Sigmoid, &["c2y"], &["s2"]),
            Node::new("scale", Op::Mul, &["m", "s2"], &["o"]),
            Node::new("cat", Op::Concat { axis: 1 }, &["o", "x"], &["cat"]),
        ],
        ..Default::default()
    };
    g.initializers.insert("w1".into(), weight(4, 4, 0.2));
    g.initializers
        .insert("w2".into(), f32_tensor(&[4, 4, 1, 1]));
    let p = ort_placement(&g, &BTreeSet::new());
    assert_eq!(
        p.activations,
        names(&["c2y", "cat", "gp", "m", "o", "s2", "sg", "x", "y"])
    );
    assert!(p.shared.is_empty(), "{:?}", p.shared);
    assert_eq!(p.weights.get("w1"), Some(&0));
    assert_eq!(p.weights.get("w2"), Some(&0));
}

#[test]
fn ort_placement_skips_unlisted_ops_integer_tensors_and_constant_operands() {
    // x - mean -> reshape -> matmul -> * k -> reshape(shape of itself) ->
    // hardswish -> softmax.
    let mut g = Graph {
        name: "mixed".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 4])],
        outputs: vec![ValueInfo::f32("sm", &[1, 3])],
        nodes: vec![
            Node::new("sub", Op::Sub, &["x", "mean"], &["d"]),
            Node::new(
                "r0",
                Op::Reshape { allowzero: false },
                &["d", "shape"],
                &["rd"],
            ),
            Node::new("mm", Op::MatMul, &["rd", "wm"], &["mm"]),
            Node::new("mk", Op::Mul, &["mm", "k"], &["mk"]),
            Node::new(
                "shape_of",
                Op::Shape {
                    start: 0,
                    end: None,
                },
                &["mk"],
                &["sh"],
            ),
            Node::new("g", Op::Gather { axis: 0 }, &["sh", "idx"], &["g"]),
            Node::new(
                "u",
                Op::Unsqueeze {
                    axes: Some(vec![0]),
                },
                &["g"],
                &["gu"],
            ),
            Node::new("c", Op::Concat { axis: 0 }, &["gu", "minus1"], &["ns"]),
            Node::new(
                "r1",
                Op::Reshape { allowzero: false },
                &["mk", "ns"],
                &["rk"],
            ),
            Node::new("hs", Op::HardSwish, &["rk"], &["hs"]),
            Node::new("sm", Op::Softmax { axis: -1 }, &["hs"], &["sm"]),
        ],
        ..Default::default()
    };
    g.initializers.insert("mean".into(), f32_tensor(&[4]));
    g.initializers.insert("shape".into(), i64_tensor(&[1, 4]));
    g.initializers.insert("wm".into(), f32_tensor(&[4, 3]));
    g.initializers.insert("k".into(), f32_tensor(&[]));
    g.initializers.insert("idx".into(), i64_tensor(&[0]));
    g.initializers.insert("minus1".into(), i64_tensor(&[-1]));
    let p = ort_placement(&g, &BTreeSet::new());
    // Sub and HardSwish are not quantized, so neither is `d` nor the
    // reshape of it; the int64 shape chain (Shape, Gather, Concat) has no
    // float tensor; the reshape of `mk` shares its parameters.
    assert_eq!(p.activations, names(&["hs", "mk", "mm", "rd", "rk", "sm"]));
    assert_eq!(p.shared, shares(&[("rk", "mk")]));
    // A constant MatMul operand is per channel on axis 1; the scalar
    // multiplier (per tensor in onnxruntime) and `mean` stay float.
    assert_eq!(p.weights, [("wm".to_string(), 1)].into_iter().collect());
}

#[test]
fn ort_placement_skips_float_nodes_and_placement_dispatches() {
    let g = block();
    let float = names(&["a"]);
    let p = ort_placement(&g, &float);
    // Nothing marks x or ya, so the first Relu is not quantized either.
    assert_eq!(p.activations, names(&["out", "ra", "s", "yb"]));
    assert_eq!(p.shared, shares(&[("s", "out")]));
    assert_eq!(p.weights.keys().collect::<Vec<_>>(), ["wb"]);
    assert_eq!(
        placement(&g, PlacementPolicy::OnnxRuntime, &float),
        ort_placement(&g, &float)
    );
    assert_eq!(
        placement(&g, PlacementPolicy::TensorRt, &float),
        trt_placement(&g, &float)
    );
    assert_eq!(PlacementPolicy::default(), PlacementPolicy::TensorRt);
}
