//! The linearized sensitivity analysis against the exact one.
//!
//! On a network that is linear from every quantized node to its two logits
//! (convolutions, a residual Add, average pooling, a Gemm), the
//! first-order margin change is the real one, so both methods must agree on
//! every node's quantized-alone top-1 and divergences.

use std::collections::BTreeMap;

use ndarray::{Array4, ArrayD, IxDyn};
use qint8_analysis::sensitivity::{
    analyze, logit_error, mixed_precision, quantizable_nodes, with_float_nodes, Method, Sensitivity,
};
use qint8_calibration::{calibrate, CalibConfig, ImageDataset};
use qint8_graph::quant::{insert_qdq, Precision, WeightStorage};
use qint8_graph::{ConvAttrs, Graph, Model, Node, Op, Tensor, ValueInfo};
use qint8_math::search::RangeMethod;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let len = shape.iter().product();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), values(len, seed)).unwrap())
}

fn conv(pad: usize) -> Op {
    Op::Conv(ConvAttrs {
        kernel_shape: None,
        strides: vec![1, 1],
        pads: vec![pad; 4],
        dilations: vec![1, 1],
        group: 1,
        auto_pad: Default::default(),
    })
}

fn linear_model() -> Model {
    let mut init = BTreeMap::new();
    init.insert("w1".to_string(), tensor(&[6, 1, 3, 3], 1));
    init.insert("w2".to_string(), tensor(&[6, 6, 1, 1], 2));
    init.insert("w3".to_string(), tensor(&[2, 6], 3));
    init.insert("b3".to_string(), tensor(&[2], 4));
    let graph = Graph {
        name: "linear".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 1, 8, 8])],
        outputs: vec![ValueInfo::f32("y", &[1, 2])],
        nodes: vec![
            Node::new("c1", conv(1), &["x", "w1"], &["a"]),
            Node::new("c2", conv(0), &["a", "w2"], &["b"]),
            // a is c2's quantized input and the residual TensorRT would
            // fuse into c2: its pair belongs to c2 in both analyses.
            Node::new("add", Op::Add, &["b", "a"], &["s"]),
            Node::new("gap", Op::GlobalAveragePool, &["s"], &["p"]),
            Node::new("flat", Op::Flatten { axis: 1 }, &["p"], &["f"]),
            Node::new(
                "fc",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                },
                &["f", "w3", "b3"],
                &["y"],
            ),
        ],
        initializers: init,
        value_info: vec![],
    };
    let mut graph = graph;
    graph.inputs[0].shape = Some(vec![
        qint8_graph::Dim::Symbolic("batch".into()),
        qint8_graph::Dim::Fixed(1),
        qint8_graph::Dim::Fixed(8),
        qint8_graph::Dim::Fixed(8),
    ]);
    Model::new(graph, 17)
}

fn images(n: usize, seed: u64) -> ImageDataset {
    let (x, labels) = far_images(n, seed);
    ImageDataset::from_array(x, Some(labels)).unwrap()
}

fn far_images(n: usize, seed: u64) -> (Array4<f32>, Vec<usize>) {
    // Of 2n random images the n farthest from FP32's decision boundary, so
    // that the nodes' summed margin changes stay below the margins (where
    // the estimate is used unscaled).
    let all = Array4::from_shape_vec((2 * n, 1, 8, 8), values(2 * n * 64, seed)).unwrap();
    let model = linear_model();
    let s = qint8_runtime::Session::new(&model, Default::default()).unwrap();
    let y = s.run(&[("x", all.view().into_dyn())]).unwrap().remove(0);
    let rows: Vec<&[f32]> = y.as_slice().unwrap().chunks_exact(2).collect();
    let mut order: Vec<usize> = (0..2 * n).collect();
    order.sort_by(|&a, &b| {
        let m = |r: &[f32]| (r[1] - r[0]).abs();
        m(rows[b]).total_cmp(&m(rows[a]))
    });
    order.truncate(n);
    let x = all.select(ndarray::Axis(0), &order);
    // Labels: the FP32 prediction flipped for every third image, so top-1
    // is neither 0 nor 1.
    let labels = order
        .iter()
        .enumerate()
        .map(|(i, &k)| usize::from(rows[k][1] > rows[k][0]) ^ usize::from(i % 3 == 0))
        .collect();
    (x, labels)
}

/// `model` calibrated per tensor with min-max on images with a few large
/// pixels: ranges wider than the evaluation images need, so every node's
/// rounding shows.
fn calibrated(model: &Model) -> qint8_calibration::Calibrated {
    let cfg = CalibConfig {
        method: RangeMethod::Max,
        per_channel: false,
        smooth: None,
        threads: 1,
        ..Default::default()
    };
    let mut calib = Array4::from_shape_vec((64, 1, 8, 8), values(64 * 64, 9)).unwrap();
    for i in 0..8 {
        calib[[i * 8, 0, i, i]] = 40.0;
    }
    let calib = ImageDataset::from_array(calib, None).unwrap();
    calibrate(&model.graph, &calib, &cfg, &mut |_| {}).unwrap()
}

#[test]
fn linearized_equals_exact_where_the_network_is_linear() {
    let model = linear_model();
    let cal = calibrated(&model);
    let data = images(300, 11);
    let run = |m| {
        analyze(
            &model,
            &cal.graph,
            &cal.plan,
            &data,
            m,
            32,
            2,
            true,
            &mut |_, _| {},
        )
        .unwrap()
    };
    let (lin, exact) = (run(Method::Linearized), run(Method::Exact));
    assert_eq!(lin.method, Method::Linearized);
    assert_eq!(lin.nodes.len(), 3, "two convolutions and the Gemm");
    assert_eq!(lin.fp32_top1, exact.fp32_top1);
    assert_eq!(lin.int8.top1, exact.int8.top1);
    for (l, e) in lin.nodes.iter().zip(&exact.nodes) {
        assert_eq!(l.node, e.node);
        assert!(
            (l.alone.top1 - e.alone.top1).abs() <= 1.0 / 300.0,
            "{}: top-1 {} vs {}",
            l.node,
            l.alone.top1,
            e.alone.top1
        );
        for (a, b, what) in [
            (l.alone.js, e.alone.js, "JS"),
            (l.alone.kl, e.alone.kl, "KL"),
        ] {
            assert!(
                (a - b).abs() <= 0.02 * b.abs() + 1e-12,
                "{}: {what} {a} vs {b}",
                l.node
            );
        }
        // The split: weights alone exact where the network is linear; the
        // activations by difference, off by the product of both errors.
        let (ls, es) = (l.split.unwrap(), e.split.unwrap());
        for (a, b, tol, what) in [
            (ls.weights.js, es.weights.js, 0.02, "weights JS"),
            (ls.activations.js, es.activations.js, 0.05, "activations JS"),
        ] {
            assert!(
                b > 1e-9 && (a - b).abs() <= tol * b,
                "{}: {what} {a} vs {b}",
                l.node
            );
        }
        let sqnr = l
            .output_sqnr_db
            .expect("linearized reports the node's output SQNR");
        assert!(sqnr.is_finite() && sqnr > 0.0, "{sqnr}");
        assert!(e.output_sqnr_db.is_none());
    }
    // Every node's error is far above the tolerance, and the ranking is the same.
    assert!(exact
        .nodes
        .iter()
        .all(|e| e.alone.js > 1e-7 && e.alone.kl > 4e-7));
    assert_eq!(lin.ranking(), exact.ranking());
    // Each ranked above the next by its mean, so every top set's paired z
    // is at least 0; the last node has no rest to stand apart from.
    for s in [&lin, &exact] {
        let order = s.ranking();
        let (last, rest) = order.split_last().unwrap();
        assert!(s.nodes[*last].top_set_z.is_none());
        for &i in rest {
            let z = s.nodes[i].top_set_z.expect("a top set's z");
            assert!(z >= 0.0, "{}: {z}", s.nodes[i].node);
        }
    }
}

/// A short last batch runs padded to the full batch (on the plans already
/// compiled): the padding must not count anywhere.
#[test]
fn a_padded_last_batch_gives_the_results_of_full_batches() {
    let model = linear_model();
    let cal = calibrated(&model);
    let data = images(310, 11);
    let run = |batch| {
        analyze(
            &model,
            &cal.graph,
            &cal.plan,
            &data,
            Method::Linearized,
            batch,
            2,
            true,
            &mut |_, _| {},
        )
        .unwrap()
    };
    // 7 x 40 + 30 (padded to 40: on two workers, sub-batches of 20 real
    // images and of 10 real and 10 padded) against 5 x 62.
    let (padded, full) = (run(40), run(62));
    assert_eq!((padded.images, full.images), (310, 310));
    assert_eq!(padded.fp32_top1, full.fp32_top1);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
    for (p, f) in padded.nodes.iter().zip(&full.nodes) {
        assert_eq!(p.node, f.node);
        let (ps, fs) = (p.split.unwrap(), f.split.unwrap());
        for (a, b) in [
            (&p.alone, &f.alone),
            (&p.float, &f.float),
            (&ps.weights, &fs.weights),
            (&ps.activations, &fs.activations),
        ] {
            assert_eq!(a.top1, b.top1, "{}", p.node);
            for (x, y) in [(a.js, b.js), (a.kl, b.kl), (a.sqnr_db, b.sqnr_db)] {
                assert!(close(x, y), "{}: {x} vs {y}", p.node);
            }
        }
        let (x, y) = (p.output_sqnr_db.unwrap(), f.output_sqnr_db.unwrap());
        assert!(close(x, y), "{}: output SQNR {x} vs {y}", p.node);
    }
}

#[test]
fn linearized_names_operators_without_a_gradient() {
    let mut model = linear_model();
    // A ScatterND (the first image's logits overwritten) between the
    // quantized nodes and the output.
    model.graph.nodes.last_mut().unwrap().outputs[0] = "z".into();
    model
        .graph
        .nodes
        .push(Node::new("sc", Op::ScatterND, &["z", "at", "upd"], &["y"]));
    model.graph.initializers.insert(
        "at".into(),
        Tensor::I64(ndarray::arr2(&[[0i64]]).into_dyn()),
    );
    model.graph.initializers.insert(
        "upd".into(),
        Tensor::F32(ndarray::arr2(&[[0.5f32, -0.5]]).into_dyn()),
    );
    let cfg = CalibConfig {
        method: RangeMethod::Max,
        smooth: None,
        threads: 1,
        ..Default::default()
    };
    let cal = calibrate(&model.graph, &images(32, 9), &cfg, &mut |_| {}).unwrap();
    let err = analyze(
        &model,
        &cal.graph,
        &cal.plan,
        &images(32, 3),
        Method::Linearized,
        16,
        1,
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("ScatterND"), "{err}");
}

#[test]
fn a_float_convolution_takes_the_add_it_would_fuse_along() {
    let model = linear_model();
    let calib = images(16, 5);
    let cfg = CalibConfig {
        method: RangeMethod::Max,
        threads: 1,
        ..Default::default()
    };
    let cal = calibrate(&model.graph, &calib, &cfg, &mut |_| {}).unwrap();
    assert!(cal.plan.activations.contains_key("a") && !cal.plan.activations.contains_key("b"));
    let float = |nodes: &[&str]| {
        let p = with_float_nodes(&cal.graph, &cal.plan, nodes.iter().copied());
        let mut f: Vec<String> = p
            .precision
            .iter()
            .filter(|(_, &v)| v == Precision::Float)
            .map(|(k, _)| k.clone())
            .collect();
        f.sort();
        f
    };
    // c2 would take the Add (b + quantized a) into its INT8 epilogue.
    assert_eq!(float(&["c2"]), ["add", "c2"]);
    // Exported, that Add reads a in float while c1's quantized input stays.
    let plan = with_float_nodes(&cal.graph, &cal.plan, ["c2"]);
    let q = insert_qdq(&cal.graph, &plan, WeightStorage::Int8).unwrap();
    let dq: Vec<&str> = q
        .nodes
        .iter()
        .filter(|n| n.op.op_type() == "DequantizeLinear")
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .collect();
    let reads_dq = |name: &str| {
        let n = q.nodes.iter().find(|n| n.name == name).unwrap();
        n.inputs.iter().any(|i| dq.contains(&i.as_str()))
    };
    assert!(!reads_dq("add") && !reads_dq("c2") && reads_dq("c1"));
    // a keeps its pair for c1's consumers, but c2 is no longer a node to
    // analyze.
    let left: Vec<&str> = quantizable_nodes(&cal.graph, &plan)
        .into_iter()
        .map(|i| cal.graph.nodes[i].name.as_str())
        .collect();
    assert!(plan.activations.contains_key("a"));
    assert_eq!(left, ["c1", "fc"]);
    // c1's output a is quantized itself: no fusion to undo.
    assert_eq!(float(&["c1"]), ["c1"]);
    assert_eq!(float(&["fc"]), ["fc"]);
}

/// Logits of `graph` (under `plan` when given) on `x`, `[n, 2]` flattened.
fn logits(
    graph: &Graph,
    plan: Option<&qint8_graph::quant::QuantPlan>,
    x: &Array4<f32>,
) -> Vec<f32> {
    let g = match plan {
        Some(p) => insert_qdq(graph, p, WeightStorage::Int8).unwrap(),
        None => graph.clone(),
    };
    let s = qint8_runtime::Session::new(&Model::new(g, 17), Default::default()).unwrap();
    let y = s.run(&[("x", x.view().into_dyn())]).unwrap().remove(0);
    y.as_slice().unwrap().to_vec()
}

#[test]
fn mixed_precision_adds_the_node_that_brings_the_outputs_closest_to_fp32() {
    let model = linear_model();
    let cal = calibrated(&model);
    // Selection images far from the decision boundary: no candidate flips a
    // prediction there, so top-1 cannot tell the candidates apart.
    let (xs, labels) = far_images(200, 11);
    let subset = ImageDataset::from_array(xs.clone(), Some(labels)).unwrap();
    // Verification images with FP32's own predictions as labels: the
    // quantized network flips some of those near the boundary, so a budget
    // of 0 points is never met and both rounds run.
    let raw = Array4::from_shape_vec((400, 1, 8, 8), values(400 * 64, 13)).unwrap();
    let fp = logits(&cal.graph, None, &raw);
    let labels = fp
        .chunks_exact(2)
        .map(|r| usize::from(r[1] > r[0]))
        .collect();
    let data = ImageDataset::from_array(raw, Some(labels)).unwrap();
    let sens = analyze(
        &model,
        &cal.graph,
        &cal.plan,
        &subset,
        Method::Linearized,
        32,
        2,
        false,
        &mut |_, _| {},
    )
    .unwrap();
    // A budget of 0 points, `max_float` nodes, `candidates` per round.
    let search = |sens: &Sensitivity, max_float: usize, candidates: Option<usize>| {
        mixed_precision(
            &model,
            &cal.graph,
            &cal.plan,
            sens,
            &subset,
            &data,
            Some(0.0),
            max_float,
            candidates,
            32,
            2,
            &mut |_| {},
        )
    };
    let mp = search(&sens, 2, None).unwrap();
    assert!(!mp.met && mp.order.len() == 2, "{:?}", mp.order);
    // Not met: the verified prefix with the best top-1 (fewest nodes on ties).
    let best = mp
        .curve
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.top1.total_cmp(&b.1.top1).then(b.0.cmp(&a.0)))
        .unwrap();
    assert_eq!(mp.top1, best.1.top1);
    assert_eq!(mp.float_nodes, mp.order[..best.0], "{:?}", mp.curve);
    let first = &mp.order[0];
    let reference = logits(&cal.graph, None, &xs);
    let mut scored: Vec<(f64, usize, String)> = sens
        .nodes
        .iter()
        .filter(|n| &n.node != first)
        .map(|n| {
            let p = with_float_nodes(&cal.graph, &cal.plan, [first.as_str(), n.node.as_str()]);
            let got = logits(&cal.graph, Some(&p), &xs);
            let flips = got
                .chunks_exact(2)
                .zip(reference.chunks_exact(2))
                .filter(|(a, b)| (a[1] > a[0]) != (b[1] > b[0]))
                .count();
            (logit_error(&reference, &got, 2).js, flips, n.node.clone())
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(scored.iter().all(|s| s.1 == 0), "{scored:?}");
    assert!(scored[0].0 < 0.9 * scored[1].0, "{scored:?}");
    assert_eq!(mp.order[1], scored[0].2, "{scored:?}");
    // c2 takes the Add it fuses along; the others fuse none.
    for (n, adds) in mp.float_nodes.iter().zip(&mp.float_adds) {
        let want: &[&str] = if n == "c2" { &["add"] } else { &[] };
        assert_eq!(adds, want, "{n}");
    }
    assert!(mp.order.iter().any(|n| n == "c2"), "{:?}", mp.order);

    // One candidate per round: the search follows the ranking. With the
    // ranking's second and third swapped (the full search's second choice
    // is then the ranking's third), it takes the ranking's order.
    let ranked: Vec<usize> = sens.ranking();
    let mut swapped = sens.clone();
    let (b, c) = (ranked[1], ranked[2]);
    let (jb, jc) = (swapped.nodes[b].alone.js, swapped.nodes[c].alone.js);
    swapped.nodes[b].alone.js = jc;
    swapped.nodes[c].alone.js = jb;
    let ranked: Vec<&str> = swapped
        .ranking()
        .iter()
        .map(|&i| swapped.nodes[i].node.as_str())
        .collect();
    assert_ne!(mp.order[1], ranked[1], "{ranked:?}");
    let one = search(&swapped, 3, Some(1)).unwrap();
    assert_eq!(one.order, ranked[..3], "{:?}", one.curve);
    let zero = search(&sens, 3, Some(0));
    assert!(
        matches!(&zero, Err(e) if e.to_string().contains("at least 1 candidate")),
        "{zero:?}"
    );
}
