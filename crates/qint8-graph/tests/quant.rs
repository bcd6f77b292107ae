//! Quantization plans, TensorRT placement and QDQ rewriting.

use std::collections::BTreeSet;

use ndarray::{ArrayD, IxDyn};
use qint8_graph::quant::{
    insert_qdq, plan_from_qdq, trt_placement, Precision, QuantPlan, WeightStorage,
};
use qint8_graph::{ConvAttrs, Graph, Node, Op, Tensor, ValueInfo};
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
    // A node kept in float contributes nothing.
    let p = trt_placement(&g, &["b".to_string()].into_iter().collect());
    assert!(!p.weights.contains_key("wb"));
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
