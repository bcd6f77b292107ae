//! A Gemm on a flattened Expand of a 1x1 map (VGG's classifier at inputs of
//! 32x32) runs on the map with its weights summed over the copies: the
//! same outputs, to float rounding, as the product over every copy.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn};
use qint8_graph::{ConvAttrs, Graph, Node, Op, Tensor, ValueInfo};
use qint8_runtime::{Session, SessionOptions};

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

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), values(n, seed)).unwrap())
}

/// `x: [n, 3, 4, 4]` through a 3x3 convolution to 4 channels, global
/// average pooling, an Expand to `[n, 4, 3, 3]` and a Flatten (`fl`):
/// initializers and nodes, for a Gemm to follow.
fn expanded_map(n: usize, seed: u64) -> (BTreeMap<String, Tensor>, Vec<Node>) {
    let mut init = BTreeMap::new();
    init.insert("w".to_string(), tensor(&[4, 3, 3, 3], seed));
    init.insert("shape".to_string(), Tensor::vec_i64(&[n as i64, 4, 3, 3]));
    let conv = ConvAttrs {
        kernel_shape: None,
        strides: vec![1, 1],
        pads: vec![1, 1, 1, 1],
        dilations: vec![1, 1],
        group: 1,
        auto_pad: Default::default(),
    };
    let nodes = vec![
        Node::new("c", Op::Conv(conv), &["x", "w"], &["c"]),
        Node::new("gp", Op::GlobalAveragePool, &["c"], &["gp"]),
        Node::new("ex", Op::Expand, &["gp", "shape"], &["ex"]),
        Node::new("fl", Op::Flatten { axis: 1 }, &["ex"], &["fl"]),
    ];
    (init, nodes)
}

/// A graph of `nodes` on input `x: [n, 3, 4, 4]` with output `y: [n, out]`.
fn graph(
    name: &str,
    n: usize,
    out: usize,
    init: BTreeMap<String, Tensor>,
    nodes: Vec<Node>,
) -> Graph {
    Graph {
        name: name.into(),
        inputs: vec![ValueInfo::f32("x", &[n, 3, 4, 4])],
        outputs: vec![ValueInfo::f32("y", &[n, out])],
        nodes,
        initializers: init,
        value_info: vec![],
    }
}

#[test]
fn gemm_on_an_expanded_map_matches_the_product_over_every_copy() {
    for trans_b in [true, false] {
        let (n, c, copies, out) = (2usize, 4usize, 9usize, 5usize);
        let (mut init, mut nodes) = expanded_map(n, 1);
        let b_shape = match trans_b {
            true => [out, c * copies],
            false => [c * copies, out],
        };
        init.insert("b".to_string(), tensor(&b_shape, 2));
        init.insert("bias".to_string(), tensor(&[out], 3));
        nodes.push(Node::new(
            "g",
            Op::Gemm {
                alpha: 0.6,
                beta: 0.5,
                trans_a: false,
                trans_b,
            },
            &["fl", "b", "bias"],
            &["y"],
        ));
        let graph = graph("expanded", n, out, init.clone(), nodes);
        let session = Session::from_graph(graph, SessionOptions::default()).unwrap();
        let x = ArrayD::from_shape_vec(IxDyn(&[n, 3, 4, 4]), values(n * 48, 4)).unwrap();
        let mut flat = Vec::new();
        let y = session
            .run_observed(
                &[("x", x.view())],
                &mut |name: &str, _: &[usize], d: &[f32]| {
                    if name == "fl" || name == "ex" {
                        flat = d.to_vec();
                    }
                    Ok(())
                },
            )
            .unwrap()
            .remove(0);
        assert_eq!(
            flat.len(),
            n * c * copies,
            "the expanded copies are observed"
        );
        let (Tensor::F32(b), Tensor::F32(bias)) = (&init["b"], &init["bias"]) else {
            unreachable!()
        };
        let (b, bias) = (b.as_slice().unwrap(), bias.as_slice().unwrap());
        let k = c * copies;
        for s in 0..n {
            for o in 0..out {
                let dot: f64 = (0..k)
                    .map(|r| {
                        let w = if trans_b {
                            b[o * k + r]
                        } else {
                            b[r * out + o]
                        };
                        flat[s * k + r] as f64 * w as f64
                    })
                    .sum();
                let want = 0.6 * dot + 0.5 * bias[o] as f64;
                let got = y[[s, o]] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "trans_b {trans_b}, image {s}, output {o}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn quantized_gemm_on_an_expanded_map_matches_the_float_simulation() {
    // The same Gemm in a QDQ graph: the input fake-quantized per tensor,
    // int8 weights per output. With integer kernels the plan reads every
    // 9th fake-quantized value and runs the summed dequantized weights in
    // float; the float simulation (integer kernels off) runs the product
    // over every copy.
    let (n, out, k) = (3usize, 5usize, 36usize);
    let (mut init, mut nodes) = expanded_map(n, 5);
    let w8: Vec<i8> = values(out * k, 6)
        .iter()
        .map(|v| (v * 127.0) as i8)
        .collect();
    init.insert(
        "w8".to_string(),
        Tensor::I8(ArrayD::from_shape_vec(IxDyn(&[out, k]), w8).unwrap()),
    );
    let scales: Vec<f32> = (0..out).map(|o| 0.01 + 0.002 * o as f32).collect();
    init.insert(
        "ws".to_string(),
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[out]), scales).unwrap()),
    );
    init.insert(
        "wz".to_string(),
        Tensor::I8(ArrayD::from_elem(IxDyn(&[out]), 0)),
    );
    init.insert("xs".to_string(), Tensor::scalar_f32(0.02));
    init.insert(
        "xz".to_string(),
        Tensor::I8(ArrayD::from_elem(IxDyn(&[]), 0)),
    );
    init.insert("bias".to_string(), tensor(&[out], 7));
    nodes.extend([
        Node::new(
            "q",
            Op::QuantizeLinear { axis: 1 },
            &["fl", "xs", "xz"],
            &["q"],
        ),
        Node::new(
            "dq",
            Op::DequantizeLinear { axis: 1 },
            &["q", "xs", "xz"],
            &["a"],
        ),
        Node::new(
            "wdq",
            Op::DequantizeLinear { axis: 0 },
            &["w8", "ws", "wz"],
            &["wf"],
        ),
        Node::new(
            "g",
            Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            },
            &["a", "wf", "bias"],
            &["y"],
        ),
    ]);
    let graph = graph("expanded_qdq", n, out, init, nodes);
    let x = ArrayD::from_shape_vec(IxDyn(&[n, 3, 4, 4]), values(n * 48, 8)).unwrap();
    let run = |integer: bool| {
        let opts = SessionOptions {
            integer,
            ..Default::default()
        };
        Session::from_graph(graph.clone(), opts)
            .unwrap()
            .run(&[("x", x.view())])
            .unwrap()
            .remove(0)
    };
    let (int, sim) = (run(true), run(false));
    for (a, b) in int.iter().zip(sim.iter()) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}
