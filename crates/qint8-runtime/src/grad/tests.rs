use std::collections::{BTreeMap, HashMap};

use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use qint8_graph::zoo::{build, ZooConfig};
use qint8_graph::{ConvAttrs, Graph, Node, Op, PoolAttrs, Tensor, ValueInfo};

use super::*;
use crate::{Session, SessionOptions};

use crate::kernels::test_values as values;

fn conv_case() -> impl Strategy<Value = ConvGeom> {
    (
        1usize..4,
        prop_oneof![Just(1usize), Just(2), Just(3)],
        1usize..4,
        1usize..4,
        1usize..12,
        1usize..24,
        (1usize..4, 1usize..4),
        (1usize..3, 1usize..3),
        (1usize..3, 1usize..3),
        (0usize..3, 0usize..3),
        any::<bool>(),
    )
        .prop_filter_map(
            "the window must fit",
            |(n, group, cin_g, cout_g, ih, iw, (kh, kw), stride, dilation, pad, dw)| {
                let (cin_g, cout_g) = if dw { (1, 1) } else { (cin_g, cout_g) };
                let eh = (kh - 1) * dilation.0 + 1;
                let ew = (kw - 1) * dilation.1 + 1;
                if ih + 2 * pad.0 < eh || iw + 2 * pad.1 < ew {
                    return None;
                }
                Some(ConvGeom {
                    n,
                    cin: cin_g * group,
                    ih,
                    iw,
                    cout: cout_g * group,
                    group,
                    kh,
                    kw,
                    stride,
                    dilation,
                    pad,
                    oh: (ih + 2 * pad.0 - eh) / stride.0 + 1,
                    ow: (iw + 2 * pad.1 - ew) / stride.1 + 1,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Depthwise, pointwise, per-image and batched GEMM paths all equal
    /// the seven-deep loop.
    #[test]
    fn conv_input_grad_matches_reference(c in conv_case(), seed in any::<u64>()) {
        let w = values(c.cout * c.cin / c.group * c.kh * c.kw, seed);
        let g = values(c.n * c.cout * c.oh * c.ow, seed ^ 9);
        let len = c.n * c.cin * c.ih * c.iw;
        let (mut fast, mut slow) = (vec![f32::NAN; len], vec![0.0; len]);
        conv_input_grad(&c, &w, &g, &mut fast);
        conv_input_grad_reference(&c, &w, &g, &mut slow);
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{c:?} at {i}: {a} vs {b}");
        }
    }

    /// A convolution's input gradient as forward convolutions (one per
    /// phase of the stride) equals the seven-deep loop; depthwise ones,
    /// and those a phase of which would need negative padding, are refused.
    #[test]
    fn input_grad_matches_reference(
        c in conv_case(),
        seed in any::<u64>(),
        many_images in any::<bool>(),
    ) {
        let w = values(c.cout * c.cin / c.group * c.kh * c.kw, seed);
        let g = values(c.n * c.cout * c.oh * c.ow, seed ^ 9);
        let len = c.n * c.cin * c.ih * c.iw;
        let Some(conv) = InputGrad::new(&c, &w, many_images) else {
            let negative = |k: usize, s: usize, d: usize, pad: usize, len: usize| {
                (0..s.min(len)).any(|p| phase_taps(k, s, d, pad, p).is_none())
            };
            prop_assert!((c.cin == c.group && c.cout == c.group)
                || negative(c.kh, c.stride.0, c.dilation.0, c.pad.0, c.ih)
                || negative(c.kw, c.stride.1, c.dilation.1, c.pad.1, c.iw));
            return Ok(());
        };
        let (mut fast, mut slow) = (vec![f32::NAN; len], vec![0.0; len]);
        let mut scratch = vec![0.0; conv.scratch_len()];
        conv.run(&g, &mut fast, &mut scratch);
        conv_input_grad_reference(&c, &w, &g, &mut slow);
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{c:?} at {i}: {a} vs {b}");
        }
    }
}

/// A 64-channel 3x3 input gradient on 4x4 planes (one Winograd tile) goes
/// on Winograd only when prepared for many images, as a session's forward
/// convolution does.
#[test]
fn input_grads_for_many_images_put_one_tile_planes_on_winograd() {
    let c = ConvGeom {
        n: 4,
        cin: 64,
        ih: 4,
        iw: 4,
        cout: 64,
        group: 1,
        kh: 3,
        kw: 3,
        stride: (1, 1),
        dilation: (1, 1),
        pad: (1, 1),
        oh: 4,
        ow: 4,
    };
    let w = values(c.cout * c.cin * 9, 3);
    let on_winograd = |many: bool| {
        let grad = InputGrad::new(&c, &w, many).unwrap();
        let conv = grad.phases[0].conv.as_ref().unwrap();
        conv.winograd.is_some()
    };
    assert!(!on_winograd(false));
    assert!(on_winograd(true));
}

/// Which phases of a kernel axis the taps reach, and how: a 3x3 window of
/// stride 2 and padding 1 (ResNet's downsampling) reaches even positions
/// with its middle tap and odd ones with its outer two; a 1x1 window of
/// stride 2 reaches only even ones; padding past the window is refused.
#[test]
fn phase_taps_split_the_kernel_by_position() {
    assert_eq!(phase_taps(3, 2, 1, 1, 0), Some((vec![1], 1, 0)));
    assert_eq!(phase_taps(3, 2, 1, 1, 1), Some((vec![2, 0], 1, 0)));
    assert_eq!(phase_taps(1, 2, 1, 0, 0), Some((vec![0], 1, 0)));
    assert_eq!(phase_taps(1, 2, 1, 0, 1), Some((vec![], 1, 0)));
    // Stride 1: every tap, reversed, with the transposed padding.
    assert_eq!(phase_taps(3, 1, 2, 1, 0), Some((vec![2, 1, 0], 2, 3)));
    assert_eq!(phase_taps(1, 2, 1, 1, 1), None);
    assert_eq!(phase_taps(3, 1, 1, 3, 0), None);
}

/// A session on `graph` without fusion or simplification, on one thread:
/// every value the backward pass reads stays a value of its own.
fn unfused_session(graph: &Graph) -> Session {
    Session::from_graph(
        graph.clone(),
        SessionOptions {
            threads: 1,
            simplify: false,
            fuse: false,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The gradient of `sum(r * f(x))` with respect to `x`, by central
/// differences along `dir`, against `<grad, dir>` from [`backward`].
/// A session on `graph` without fusion, and the gradients of `<r, y>` for
/// `y` the graph's output on `x` and `r` fixed pseudo-random weights, at
/// the graph input and `wanted_extra` (each checked to be visited once,
/// at its value's size).
fn gradients(
    graph: &Graph,
    x: &ArrayD<f32>,
    wanted_extra: &[&str],
) -> (Session, Vec<f32>, BTreeMap<String, Vec<f32>>) {
    let session = unfused_session(graph);
    let input = graph.inputs[0].name.clone();
    let output = graph.outputs[0].name.clone();
    let mut rec: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    session
        .run_observed(
            &[(&input, x.view())],
            &mut |name: &str, shape: &[usize], d: &[f32]| {
                rec.insert(name.to_string(), (shape.to_vec(), d.to_vec()));
                Ok(())
            },
        )
        .unwrap();
    let xs = x.shape().to_vec();
    let xd = x.as_slice().unwrap().to_vec();
    let mut vals: Values<'_> = rec
        .iter()
        .map(|(k, (s, d))| (k.clone(), Value { shape: s, data: d }))
        .collect();
    vals.insert(
        input.clone(),
        Value {
            shape: &xs,
            data: &xd,
        },
    );
    let out_len = rec[&output].1.len();
    let r = values(out_len, 77);
    let mut wanted = vec![input.as_str()];
    wanted.extend_from_slice(wanted_extra);
    let mut got: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    backward(graph, &vals, &output, &r, &wanted, &mut |name, g| {
        got.insert(name.to_string(), g.to_vec());
        Ok(())
    })
    .unwrap();
    assert_eq!(
        got.len(),
        wanted.len(),
        "every wanted value is visited once"
    );
    for (name, g) in &got {
        let len = match vals.get(name.as_str()) {
            Some(v) => v.data.len(),
            None => graph.initializers[name].len(),
        };
        assert_eq!(g.len(), len, "{name}: gradient size");
    }
    (session, r, got)
}

fn check_directional(graph: &Graph, x: &ArrayD<f32>, wanted_extra: &[&str]) {
    let (session, r, got) = gradients(graph, x, wanted_extra);
    let input = graph.inputs[0].name.clone();
    let xs = x.shape().to_vec();
    let xd = x.as_slice().unwrap().to_vec();
    let dir = values(xd.len(), 5);
    let f = |eps: f32| -> f64 {
        let xp: Vec<f32> = xd.iter().zip(&dir).map(|(a, d)| a + eps * d).collect();
        let xp = ArrayD::from_shape_vec(IxDyn(&xs), xp).unwrap();
        let y = session.run(&[(&input, xp.view())]).unwrap().remove(0);
        y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    assert_central_difference(f, &got[&input], &dir, "the input");
}

/// `<grad, dir>` against the central difference of `f` (the function along
/// `dir`) at 0.
fn assert_central_difference(f: impl Fn(f32) -> f64, grad: &[f32], dir: &[f32], what: &str) {
    // Small: random-weight networks have many ReLU kinks near any input.
    let eps = 1e-3;
    let numeric = (f(eps) - f(-eps)) / (2.0 * eps as f64);
    let analytic: f64 = grad
        .iter()
        .zip(dir)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    assert!(
        (numeric - analytic).abs() <= 0.03 * numeric.abs().max(analytic.abs()) + 1e-3,
        "{what}: numeric {numeric}, backward {analytic}"
    );
}

fn zoo_graph(cfg: ZooConfig, simplify: bool) -> Graph {
    let model = build(&cfg.with_in_channels(2).with_classes(7)).unwrap();
    let mut g = model.graph;
    if simplify {
        qint8_graph::passes::simplify(&mut g).unwrap();
    }
    g
}

fn input_for(graph: &Graph, n: usize, seed: u64) -> ArrayD<f32> {
    let mut s = graph.inputs[0].concrete_shape(n).unwrap();
    s[0] = n;
    let len = s.iter().product();
    ArrayD::from_shape_vec(IxDyn(&s), values(len, seed)).unwrap()
}

#[test]
fn backward_matches_finite_differences_on_resnet50() {
    // Conv, Relu, MaxPool, Add, GlobalAveragePool, Flatten, Gemm; with
    // BatchNormalization left in the graph.
    let cfg = ZooConfig::resnet50()
        .with_width_mult(0.125)
        .with_resolution(32, 32);
    let g = zoo_graph(cfg.clone(), true);
    check_directional(&g, &input_for(&g, 2, 3), &[]);
    let g = zoo_graph(cfg, false);
    assert!(g
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::BatchNormalization { .. })));
    check_directional(&g, &input_for(&g, 2, 4), &[]);
}

#[test]
fn backward_matches_finite_differences_on_efficientnet_b0() {
    // Depthwise and strided convolutions, SiLU as Sigmoid * Mul, the
    // squeeze-and-excitation gate broadcast over the plane.
    let g = zoo_graph(
        ZooConfig::efficientnet_b0()
            .with_width_mult(0.25)
            .with_resolution(32, 32),
        true,
    );
    let mid: Vec<&str> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_)))
        .map(|n| n.outputs[0].as_str())
        .take(6)
        .collect();
    check_directional(&g, &input_for(&g, 2, 6), &mid);
    // Weights and biases: plain, strided, depthwise and 1x1 convolutions
    // (BatchNormalization folded into them), and the classifier's B and C.
    let mut names: Vec<&str> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_) | Op::Gemm { .. }))
        .flat_map(|n| n.inputs.iter().skip(1).map(String::as_str))
        .filter(|i| g.initializers.contains_key(*i))
        .collect();
    // The first convolutions (stem, depthwise, SE, projection), a strided
    // depthwise one further on, and the classifier.
    let strided = g
        .nodes
        .iter()
        .find(|n| matches!(&n.op, Op::Conv(c) if c.group > 1 && c.strides.iter().any(|&s| s > 1)))
        .and_then(|n| n.input(1))
        .unwrap();
    let classifier: Vec<&str> = names.iter().rev().take(2).copied().collect();
    names.truncate(10);
    names.push(strided);
    names.extend(classifier);
    check_weight_directional(&g, &input_for(&g, 2, 6), &names);
}

fn f32_tensor(shape: &[usize], seed: u64) -> Tensor {
    let len = shape.iter().product();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), values(len, seed)).unwrap())
}

/// A stride-1 convolution padded by 1 on every side (3x3: same size).
fn same_padded_conv() -> ConvAttrs {
    ConvAttrs {
        kernel_shape: None,
        strides: vec![1, 1],
        pads: vec![1, 1, 1, 1],
        dilations: vec![1, 1],
        group: 1,
        auto_pad: Default::default(),
    }
}

#[test]
fn backward_matches_finite_differences_on_the_other_rules() {
    // The remaining rules on one small graph: strided padded AveragePool
    // (with and without the padding counted), Clip, HardSwish, HardSigmoid,
    // Sub, broadcast Div and Add, Concat, Expand, ReduceMean (axes as an
    // attribute and as an input), Reshape, MatMul, a Gemm with transposed B,
    // Transpose and Softmax.
    let pool = |k: usize, s: usize, p: usize, inc: bool| PoolAttrs {
        kernel_shape: vec![k, k],
        strides: vec![s, s],
        pads: vec![p, p, p, p],
        dilations: vec![1, 1],
        ceil_mode: false,
        count_include_pad: inc,
        auto_pad: Default::default(),
    };
    let mut init = BTreeMap::new();
    init.insert("w".to_string(), f32_tensor(&[4, 3, 3, 3], 1));
    init.insert(
        "d".to_string(),
        Tensor::F32(ArrayD::from_elem(IxDyn(&[1, 4, 1, 1]), 1.7)),
    );
    init.insert("e".to_string(), f32_tensor(&[4, 1, 1], 2));
    init.insert("shape".to_string(), Tensor::vec_i64(&[2, 8, 3, 3]));
    init.insert("flat".to_string(), Tensor::vec_i64(&[2, 72]));
    init.insert("axes".to_string(), Tensor::vec_i64(&[-1, 2]));
    init.insert("m".to_string(), f32_tensor(&[72, 6], 3));
    init.insert("b".to_string(), f32_tensor(&[5, 6], 4));
    let conv = same_padded_conv();
    let nodes = vec![
        Node::new("c", Op::Conv(conv), &["x", "w"], &["c"]),
        Node::new("ap", Op::AveragePool(pool(3, 2, 1, true)), &["c"], &["ap"]),
        Node::new(
            "ap2",
            Op::AveragePool(pool(3, 2, 1, false)),
            &["c"],
            &["ap2"],
        ),
        Node::new(
            "cl",
            Op::Clip {
                min: Some(-0.3),
                max: Some(0.4),
            },
            &["ap"],
            &["cl"],
        ),
        Node::new("hs", Op::HardSwish, &["ap"], &["hs"]),
        Node::new(
            "hg",
            Op::HardSigmoid {
                alpha: 0.3,
                beta: 0.5,
            },
            &["ap2"],
            &["hg"],
        ),
        Node::new("sub", Op::Sub, &["hs", "cl"], &["sub"]),
        Node::new("div", Op::Div, &["sub", "d"], &["div"]),
        Node::new("mul", Op::Mul, &["div", "hg"], &["mul"]),
        Node::new("add", Op::Add, &["mul", "e"], &["add"]),
        Node::new("cat", Op::Concat { axis: 1 }, &["add", "hg"], &["cat"]),
        Node::new("gp", Op::GlobalAveragePool, &["cat"], &["gp"]),
        Node::new("ex", Op::Expand, &["gp", "shape"], &["ex"]),
        Node::new("s2", Op::Add, &["ex", "cat"], &["s2"]),
        Node::new(
            "rm",
            Op::ReduceMean {
                axes: Some(vec![1]),
                keepdims: true,
                noop_with_empty_axes: false,
            },
            &["s2"],
            &["rm"],
        ),
        Node::new(
            "rm2",
            Op::ReduceMean {
                axes: None,
                keepdims: true,
                noop_with_empty_axes: false,
            },
            &["s2", "axes"],
            &["rm2"],
        ),
        Node::new("s3", Op::Add, &["s2", "rm"], &["s3"]),
        Node::new("s4", Op::Sub, &["s3", "rm2"], &["s4"]),
        Node::new(
            "r",
            Op::Reshape { allowzero: false },
            &["s4", "flat"],
            &["r"],
        ),
        Node::new("mm", Op::MatMul, &["r", "m"], &["mm"]),
        Node::new(
            "gemm",
            Op::Gemm {
                alpha: 0.7,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            },
            &["mm", "b"],
            &["z"],
        ),
        // Softmax over the batch axis, between two transposes.
        Node::new(
            "t",
            Op::Transpose {
                perm: Some(vec![1, 0]),
            },
            &["z"],
            &["t"],
        ),
        Node::new("sm", Op::Softmax { axis: 0 }, &["t"], &["st"]),
        Node::new("t2", Op::Transpose { perm: None }, &["st"], &["y"]),
    ];
    let graph = Graph {
        name: "rules".into(),
        inputs: vec![ValueInfo::f32("x", &[2, 3, 5, 5])],
        outputs: vec![ValueInfo::f32("y", &[2, 5])],
        nodes,
        initializers: init,
        value_info: vec![],
    };
    check_directional(&graph, &input_for(&graph, 2, 8), &["ap2"]);
}

#[test]
fn backward_matches_finite_differences_on_transformer_rules() {
    // LayerNormalization, products of two activations (attention), a scale
    // computed from shapes (never recorded: the plan folds it), Softmax,
    // Erf, exact and tanh GELU, Sqrt, Pow, Slice with a step, Pad, Gather,
    // and a Concat with a constant expanded to the batch, as ViT's class
    // token is.
    let mut init = BTreeMap::new();
    init.insert("g".to_string(), f32_tensor(&[8], 1));
    init.insert("bias".to_string(), f32_tensor(&[8], 2));
    init.insert("wq".to_string(), f32_tensor(&[8, 8], 3));
    init.insert("wk".to_string(), f32_tensor(&[8, 8], 4));
    init.insert("one".to_string(), Tensor::scalar_f32(1.0));
    init.insert("e".to_string(), Tensor::scalar_f32(1.5));
    init.insert("st".to_string(), Tensor::vec_i64(&[5, 1]));
    init.insert("en".to_string(), Tensor::vec_i64(&[0, 8]));
    init.insert("ax".to_string(), Tensor::vec_i64(&[1, 2]));
    init.insert("sp".to_string(), Tensor::vec_i64(&[-2, 3]));
    init.insert("pads".to_string(), Tensor::vec_i64(&[0, 1, 0, 0, 2, 1]));
    init.insert("idx".to_string(), Tensor::vec_i64(&[4, 0, 4]));
    init.insert("cls".to_string(), f32_tensor(&[1, 1, 4], 5));
    init.insert("dim".to_string(), Tensor::vec_i64(&[-1]));
    init.insert("flat".to_string(), Tensor::vec_i64(&[2, -1]));
    let n = |name: &str, op: Op, i: &[&str]| Node::new(name, op, i, &[name]);
    // The expand target is [batch, 1, 4]: Shape(x)[0], then 1 and 4.
    init.insert("one4".to_string(), Tensor::vec_i64(&[1, 4]));
    init.insert("sizes".to_string(), Tensor::vec_i64(&[3, 5]));
    let nodes = vec![
        n(
            "ln",
            Op::LayerNormalization {
                axis: -1,
                epsilon: 1e-5,
            },
            &["x", "g", "bias"],
        ),
        n("q", Op::MatMul, &["ln", "wq"]),
        n("k", Op::MatMul, &["ln", "wk"]),
        n(
            "kt",
            Op::Transpose {
                perm: Some(vec![0, 2, 1]),
            },
            &["k"],
        ),
        n("s", Op::MatMul, &["q", "kt"]),
        n(
            "shp",
            Op::Shape {
                start: 0,
                end: None,
            },
            &["q"],
        ),
        n("d", Op::Gather { axis: 0 }, &["shp", "dim"]),
        n("df", Op::Cast { to: 1 }, &["d"]),
        n("sd", Op::Sqrt, &["df"]),
        n("inv", Op::Div, &["one", "sd"]),
        n("sc", Op::Mul, &["s", "inv"]),
        n("p", Op::Softmax { axis: -1 }, &["sc"]),
        n("o", Op::MatMul, &["p", "ln"]),
        n("er", Op::Erf, &["o"]),
        n("ge", Op::Gelu { tanh: false }, &["o"]),
        n("gt", Op::Gelu { tanh: true }, &["er"]),
        n("o2", Op::Mul, &["o", "o"]),
        n("o3", Op::Add, &["o2", "one"]),
        n("sq", Op::Sqrt, &["o3"]),
        n("pw", Op::Pow, &["sq", "e"]),
        n("a1", Op::Add, &["ge", "gt"]),
        n("a0", Op::Add, &["a1", "pw"]),
        // A Split whose second part only is read further on.
        Node::new(
            "sp2",
            Op::Split {
                axis: 2,
                split: None,
            },
            &["a0", "sizes"],
            &["h0", "h1"],
        ),
        n("a2", Op::Concat { axis: 2 }, &["h1", "a0"]),
        n(
            "sl",
            Op::Slice {
                starts: None,
                ends: None,
                axes: None,
            },
            &["a2", "st", "en", "ax", "sp"],
        ),
        n(
            "pd",
            Op::Pad {
                mode: qint8_graph::PadMode::Reflect,
                pads: None,
                value: 0.0,
            },
            &["sl", "pads"],
        ),
        n("ga", Op::Gather { axis: 1 }, &["pd", "idx"]),
        n(
            "shp2",
            Op::Shape {
                start: 0,
                end: Some(1),
            },
            &["x"],
        ),
        n("tgt", Op::Concat { axis: 0 }, &["shp2", "one4"]),
        n("ex", Op::Expand, &["cls", "tgt"]),
        n("cat", Op::Concat { axis: 1 }, &["ex", "ga"]),
        n("y", Op::Reshape { allowzero: false }, &["cat", "flat"]),
    ];
    let graph = Graph {
        name: "transformer".into(),
        inputs: vec![ValueInfo::f32("x", &[2, 6, 8])],
        outputs: vec![ValueInfo::f32("y", &[2, 16])],
        nodes,
        initializers: init,
        value_info: vec![],
    };
    check_directional(&graph, &input_for(&graph, 2, 9), &["o"]);
}

#[test]
fn trailing_broadcast_finds_gate_blocks() {
    assert_eq!(trailing_broadcast(&[2, 3, 4, 5], &[2, 3, 1, 1]), Some(20));
    assert_eq!(trailing_broadcast(&[2, 3, 4, 5], &[3, 1, 1]), None);
    assert_eq!(trailing_broadcast(&[2, 3, 4, 5], &[2, 3, 4, 1]), Some(5));
    assert_eq!(trailing_broadcast(&[2, 3, 4, 5], &[1, 1, 1, 1]), Some(120));
    assert_eq!(trailing_broadcast(&[1, 3, 4, 5], &[3, 1, 1]), Some(20));
    assert_eq!(trailing_broadcast(&[2, 3], &[2, 3]), None);
}

/// A recorded value of `shape` holding `data`.
fn value_of<'a>(shape: &'a [usize], data: &'a [f32]) -> Value<'a> {
    Value { shape, data }
}

#[test]
fn broadcast_product_gradients_match_the_general_path() {
    // The gate fast path against the generic odometer.
    let (out, small) = ([2usize, 3, 4, 5], [2usize, 3, 1, 1]);
    let a = values(120, 1);
    let b = values(6, 2);
    let g = values(120, 3);
    let (va, vb) = (value_of(&out, &a), value_of(&small, &b));
    let (ga, gb) = binary_grad(&Op::Mul, va, vb, &out, &g, true, true);
    let (sa, sb) = (bstrides(&out, &out), bstrides(&out, &small));
    let (mut ra, mut rb) = (vec![0.0f32; 120], vec![0.0f32; 6]);
    for_each_bcast(&out, &sa, &sb, |o, ia, ib| {
        ra[ia] += g[o] * b[ib];
        rb[ib] += g[o] * a[ia];
    });
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
    assert!(close(&ga.unwrap(), &ra) && close(&gb.unwrap(), &rb));
    // The gate on the left (`scale * x`): the same gradients, swapped.
    let (gs, gx) = binary_grad(&Op::Mul, vb, va, &out, &g, true, true);
    assert!(close(&gx.unwrap(), &ra) && close(&gs.unwrap(), &rb));
    let (gs, gx) = binary_grad(&Op::Mul, vb, va, &out, &g, false, true);
    assert!(gs.is_none() && close(&gx.unwrap(), &ra));
    // Division takes the same path.
    let (ga, gb) = binary_grad(&Op::Div, va, vb, &out, &g, true, true);
    for_each_bcast(&out, &sa, &sb, |o, ia, ib| {
        ra[ia] = g[o] / b[ib];
    });
    let mut rb = vec![0.0f32; 6];
    for_each_bcast(&out, &sa, &sb, |o, ia, ib| {
        rb[ib] += -g[o] * a[ia] / (b[ib] * b[ib])
    });
    assert!(close(&ga.unwrap(), &ra) && close(&gb.unwrap(), &rb));
}

#[test]
fn repeating_operand_gradients_equal_the_general_path() {
    // A per-channel constant on a gate ([1, 3, 1, 1] on [4, 3, 1, 1]) and a
    // row repeated down a matrix ([5] on [2, 3, 5]), on either side of a
    // product and as a divisor: the general path's sums, bit for bit.
    for (out, small) in [
        (vec![4usize, 3, 1, 1], vec![1usize, 3, 1, 1]),
        (vec![2, 3, 5], vec![5]),
    ] {
        let (n, k) = (
            out.iter().product::<usize>(),
            small.iter().product::<usize>(),
        );
        assert_eq!(leading_broadcast(&out, &small), Some(k));
        let (a, b, g) = (values(n, 4), values(k, 5), values(n, 6));
        let (va, vb) = (value_of(&out, &a), value_of(&small, &b));
        let (sa, sb) = (bstrides(&out, &out), bstrides(&out, &small));
        for div in [false, true] {
            let (mut ra, mut rb) = (vec![0.0f32; n], vec![0.0f32; k]);
            for_each_bcast(&out, &sa, &sb, |o, ia, ib| {
                let (x, y) = (a[ia], b[ib]);
                ra[ia] += if div { g[o] / y } else { g[o] * y };
                rb[ib] += if div { -g[o] * x / (y * y) } else { g[o] * x };
            });
            let op = if div { Op::Div } else { Op::Mul };
            let (ga, gb) = binary_grad(&op, va, vb, &out, &g, true, true);
            assert_eq!(
                (ga.unwrap(), gb.unwrap()),
                (ra.clone(), rb.clone()),
                "{out:?} {div}"
            );
            if !div {
                let (gb, ga) = binary_grad(&op, vb, va, &out, &g, false, true);
                assert!(gb.is_none());
                assert_eq!(ga.unwrap(), ra, "{out:?} swapped");
            }
        }
    }
    // Not repeating: same shape, a trailing broadcast, a middle axis.
    assert_eq!(leading_broadcast(&[2, 3], &[2, 3]), None);
    assert_eq!(leading_broadcast(&[2, 3, 4], &[2, 1, 1]), None);
    assert_eq!(leading_broadcast(&[2, 3, 4], &[3, 1]), None);
}

#[test]
fn unbroadcast_sums_over_broadcast_axes() {
    let g: Vec<f32> = (0..12).map(|v| v as f32).collect();
    // [2, 3, 2] -> [3, 1]
    let r = unbroadcast(&g, &[2, 3, 2], &[3, 1]);
    assert_eq!(
        r,
        vec![0. + 1. + 6. + 7., 2. + 3. + 8. + 9., 4. + 5. + 10. + 11.]
    );
    // -> scalar
    assert_eq!(unbroadcast(&g, &[2, 3, 2], &[]), vec![66.0]);
}

#[test]
fn unsupported_operators_are_all_named() {
    let graph = Graph {
        name: "g".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 4])],
        outputs: vec![ValueInfo::f32("y", &[1, 4])],
        nodes: vec![
            Node::new("a", Op::Where, &["m", "x", "x"], &["a"]),
            Node::new("b", Op::Relu, &["a"], &["b"]),
            Node::new("c", Op::ScatterND, &["b", "i", "u"], &["y"]),
        ],
        initializers: BTreeMap::new(),
        value_info: vec![],
    };
    assert_eq!(unsupported(&graph, &["x"], "y"), vec!["ScatterND", "Where"]);
    // Operators before the wanted values do not count.
    assert_eq!(unsupported(&graph, &["b"], "y"), vec!["ScatterND"]);
    let x = [0.0f32; 4];
    let vals: Values<'_> = [(
        "x".to_string(),
        Value {
            shape: &[1, 4],
            data: &x,
        },
    )]
    .into();
    let err = backward(&graph, &vals, "y", &x, &["x"], &mut |_, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("ScatterND, Where"), "{err}");
}

#[test]
fn inconsistent_values_are_errors() {
    let graph = Graph {
        name: "g".into(),
        inputs: vec![ValueInfo::f32("x", &[1, 4])],
        outputs: vec![ValueInfo::f32("y", &[1, 4])],
        nodes: vec![Node::new("a", Op::Relu, &["x"], &["y"])],
        initializers: BTreeMap::new(),
        value_info: vec![],
    };
    let x = [1.0f32, -1.0, 2.0, 0.5];
    let short = [1.0f32, 0.0, 2.0];
    // Both values declared [1, 4].
    let recorded = |xd: &'static [f32], yd: &'static [f32]| -> Values<'static> {
        [("x", xd), ("y", yd)]
            .into_iter()
            .map(|(n, data)| {
                (
                    n.to_string(),
                    Value {
                        shape: &[1, 4],
                        data,
                    },
                )
            })
            .collect()
    };
    let vals = recorded(&[1.0, -1.0, 2.0, 0.5], &[1.0, 0.0, 2.0]);
    let err = backward(&graph, &vals, "y", &x, &["x"], &mut |_, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("value y has 3 elements"), "{err}");
    // A seed of the wrong size.
    let vals = recorded(&[1.0, -1.0, 2.0, 0.5], &[1.0, -1.0, 2.0, 0.5]);
    let err = backward(&graph, &vals, "y", &short, &["x"], &mut |_, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("seed has 3 values"), "{err}");
    // And the right one: ReLU passes the positive entries.
    let mut got = Vec::new();
    backward(&graph, &vals, "y", &[1.0; 4], &["x"], &mut |_, g| {
        got = g.to_vec();
        Ok(())
    })
    .unwrap();
    assert_eq!(got, vec![1.0, 0.0, 1.0, 1.0]);
}

#[test]
fn reduce_mean_without_kept_axes_matches_finite_differences() {
    // ReduceMean over the middle axis without keepdims, then a Gemm.
    let mut init = BTreeMap::new();
    init.insert("w".to_string(), f32_tensor(&[4, 5], 3));
    let graph = Graph {
        name: "rm".into(),
        inputs: vec![ValueInfo::f32("x", &[2, 3, 4])],
        outputs: vec![ValueInfo::f32("y", &[2, 5])],
        nodes: vec![
            Node::new(
                "rm",
                Op::ReduceMean {
                    axes: Some(vec![1]),
                    keepdims: false,
                    noop_with_empty_axes: false,
                },
                &["x"],
                &["m"],
            ),
            Node::new(
                "g",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: false,
                },
                &["m", "w"],
                &["y"],
            ),
        ],
        initializers: init,
        value_info: vec![],
    };
    check_directional(&graph, &input_for(&graph, 2, 4), &[]);
}

#[test]
fn gemm_with_transposed_operands_matches_finite_differences() {
    // y = 0.8 * op(x) op(w) + 0.6 * c with x stored [K, M] under trans_a
    // and c broadcast over the rows: gradients into x, w and c.
    for (ta, tb) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut init = BTreeMap::new();
        init.insert(
            "w".to_string(),
            f32_tensor(if tb { &[5, 4] } else { &[4, 5] }, 7),
        );
        init.insert("c".to_string(), f32_tensor(&[5], 5));
        let x: &[usize] = if ta { &[4, 3] } else { &[3, 4] };
        let graph = Graph {
            name: "gemm".into(),
            inputs: vec![ValueInfo::f32("x", x)],
            outputs: vec![ValueInfo::f32("y", &[3, 5])],
            nodes: vec![
                Node::new("r", Op::Relu, &["x"], &["r"]),
                Node::new(
                    "g",
                    Op::Gemm {
                        alpha: 0.8,
                        beta: 0.6,
                        trans_a: ta,
                        trans_b: tb,
                    },
                    &["r", "w", "c"],
                    &["y"],
                ),
            ],
            initializers: init,
            value_info: vec![],
        };
        let x = input_for(&graph, x[0], 6);
        check_directional(&graph, &x, &["r"]);
        check_weight_directional(&graph, &x, &["w", "c"]);
    }
}

#[test]
fn gemm_on_an_expanded_map_takes_the_summed_weights() {
    // VGG's classifier at small inputs: a 1x1 map expanded to 3x3,
    // flattened, into a Gemm. The gradient goes straight to the 1x1 map
    // with the weights summed over the 9 copies; wanting the flattened
    // value too turns that off, so the two must agree.
    for tb in [true, false] {
        let mut init = BTreeMap::new();
        init.insert("w".to_string(), f32_tensor(&[4, 3, 3, 3], 1));
        init.insert("shape".to_string(), Tensor::vec_i64(&[2, 4, 3, 3]));
        init.insert(
            "b".to_string(),
            f32_tensor(if tb { &[5, 36] } else { &[36, 5] }, 4),
        );
        let conv = same_padded_conv();
        let graph = Graph {
            name: "expanded".into(),
            inputs: vec![ValueInfo::f32("x", &[2, 3, 4, 4])],
            outputs: vec![ValueInfo::f32("y", &[2, 5])],
            nodes: vec![
                Node::new("c", Op::Conv(conv), &["x", "w"], &["c"]),
                Node::new("gp", Op::GlobalAveragePool, &["c"], &["gp"]),
                Node::new("ex", Op::Expand, &["gp", "shape"], &["ex"]),
                Node::new("fl", Op::Flatten { axis: 1 }, &["ex"], &["fl"]),
                Node::new(
                    "g",
                    Op::Gemm {
                        alpha: 0.6,
                        beta: 1.0,
                        trans_a: false,
                        trans_b: tb,
                    },
                    &["fl", "b"],
                    &["y"],
                ),
            ],
            initializers: init,
            value_info: vec![],
        };
        let wanted: Vec<&str> = vec![graph.inputs[0].name.as_str(), "gp"];
        let (nodes, live) = path(&graph, &wanted, "y");
        let want: HashSet<&str> = wanted.iter().copied().collect();
        assert_eq!(expanded_gemms(&graph, &nodes, &want, &live).len(), 1);
        let x = input_for(&graph, 2, 3);
        check_directional(&graph, &x, &["gp"]);
        let folded = gradients(&graph, &x, &["gp"]).2;
        let general = gradients(&graph, &x, &["gp", "fl"]).2;
        for name in ["gp", "x"] {
            for (a, b) in folded[name].iter().zip(&general[name]) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
        }
    }
}

/// [`maxpool_grad`] written window by window, over [`Pool2d::taps`].
fn maxpool_grad_reference(p: &Pool2d, x: &[f32], g: &[f32], gx: &mut [f32]) {
    let (ip, op) = (p.ih * p.iw, p.oh * p.ow);
    for ((xs, gs), gxs) in x
        .chunks_exact(ip)
        .zip(g.chunks_exact(op))
        .zip(gx.chunks_exact_mut(ip))
    {
        for oy in 0..p.oh {
            for ox in 0..p.ow {
                let mut best: Option<usize> = None;
                for pos in p.taps(oy, ox).map(|(iy, ix)| iy * p.iw + ix) {
                    if best.is_none_or(|b| xs[pos] > xs[b] || xs[pos].is_nan()) {
                        best = Some(pos);
                    }
                }
                if let Some(b) = best {
                    gxs[b] += gs[oy * p.ow + ox];
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// The tap lists give the same windows, ties and NaNs as the
    /// window-by-window loop.
    #[test]
    fn maxpool_grad_matches_reference(
        planes in 1usize..4,
        (ih, iw) in (1usize..10, 1usize..10),
        k in (1usize..4, 1usize..4),
        stride in (1usize..3, 1usize..3),
        dilation in (1usize..3, 1usize..3),
        pad in (0usize..2, 0usize..2),
        nan in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let eh = (k.0 - 1) * dilation.0 + 1;
        let ew = (k.1 - 1) * dilation.1 + 1;
        prop_assume!(ih + 2 * pad.0 >= eh && iw + 2 * pad.1 >= ew && pad.0 < eh && pad.1 < ew);
        let p = Pool2d {
            ih,
            iw,
            oh: (ih + 2 * pad.0 - eh) / stride.0 + 1,
            ow: (iw + 2 * pad.1 - ew) / stride.1 + 1,
            k,
            stride,
            dilation,
            pad,
            pad_end: pad,
            count_include_pad: false,
        };
        maxpool_matches(&p, planes, nan, seed)?;
    }

    /// The 2x2, stride-2 path (its own loop), odd sizes and ties included.
    #[test]
    fn maxpool2_grad_matches_reference(
        planes in 1usize..4,
        (ih, iw) in (2usize..12, 2usize..12),
        nan in any::<bool>(),
        // ceil_mode (or SAME padding) on odd sizes: the last window is cut
        // by end padding and takes the general rule.
        ceil in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let (oh, ow) = if ceil { (ih.div_ceil(2), iw.div_ceil(2)) } else { (ih / 2, iw / 2) };
        let p = Pool2d {
            ih,
            iw,
            oh,
            ow,
            k: (2, 2),
            stride: (2, 2),
            dilation: (1, 1),
            pad: (0, 0),
            pad_end: ((2 * oh).saturating_sub(ih), (2 * ow).saturating_sub(iw)),
            count_include_pad: false,
        };
        maxpool_matches(&p, planes, nan, seed)?;
    }

    /// The 3x3, stride-2 path (padded key planes), with and without
    /// padding, ceil_mode's cut last windows, ties and NaN.
    #[test]
    fn maxpool3s2_grad_matches_reference(
        planes in 1usize..4,
        (ih, iw) in (1usize..20, 1usize..20),
        pad in (0usize..2, 0usize..2),
        nan in any::<bool>(),
        ceil in any::<bool>(),
        seed in any::<u64>(),
    ) {
        prop_assume!(ih + 2 * pad.0 >= 3 && iw + 2 * pad.1 >= 3);
        let out = |len: usize, pad: usize| {
            let span = len + 2 * pad - 3;
            // ceil_mode keeps a last window only if it starts inside the
            // input or its left padding.
            match ceil && span % 2 == 1 && span / 2 * 2 + 2 < len + pad {
                true => span / 2 + 2,
                false => span / 2 + 1,
            }
        };
        let (oh, ow) = (out(ih, pad.0), out(iw, pad.1));
        let p = Pool2d {
            ih,
            iw,
            oh,
            ow,
            k: (3, 3),
            stride: (2, 2),
            dilation: (1, 1),
            pad,
            pad_end: (
                (2 * (oh - 1) + 3).saturating_sub(ih + pad.0),
                (2 * (ow - 1) + 3).saturating_sub(iw + pad.1),
            ),
            count_include_pad: false,
        };
        maxpool_matches(&p, planes, nan, seed)?;
    }
}

/// `maxpool_grad` equals the reference on `planes` planes of coarse values
/// (so windows hold ties), one of them NaN when `nan`.
fn maxpool_matches(p: &Pool2d, planes: usize, nan: bool, seed: u64) -> Result<(), TestCaseError> {
    let mut x: Vec<f32> = values(planes * p.ih * p.iw, seed)
        .into_iter()
        .map(|v| (v * 3.0).round())
        .collect();
    if nan {
        let at = seed as usize % x.len();
        x[at] = f32::NAN;
    }
    let g = values(planes * p.oh * p.ow, seed ^ 5);
    let (mut fast, mut slow) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    maxpool_grad(p, &x, &g, &mut fast);
    maxpool_grad_reference(p, &x, &g, &mut slow);
    prop_assert_eq!(fast, slow);
    Ok(())
}

#[test]
fn prepared_input_gradients_are_those_a_run_prepares() {
    let g = zoo_graph(
        ZooConfig::resnet50()
            .with_width_mult(0.125)
            .with_resolution(32, 32),
        true,
    );
    let x = input_for(&g, 2, 9);
    let session = unfused_session(&g);
    let input = g.inputs[0].name.clone();
    let output = g.outputs[0].name.clone();
    let rec = session.record_here(&[(&input, x.view())]).unwrap();
    let r = values(rec.get(&output).unwrap().1.len(), 77);
    let mut vals: Values<'_> = rec
        .iter()
        .map(|(k, shape, data)| (k.to_string(), Value { shape, data }))
        .collect();
    vals.insert(
        input.clone(),
        Value {
            shape: x.shape(),
            data: x.as_slice().unwrap(),
        },
    );
    // Every convolution's output, as the sensitivity analysis asks.
    let wanted: Vec<&str> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_)))
        .map(|n| n.outputs[0].as_str())
        .collect();
    let run = |b: &Backward<'_>| {
        let mut got: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        b.run(&vals, &r, &mut |name, gr| {
            got.insert(name.to_string(), gr.to_vec());
            Ok(())
        })
        .unwrap();
        got
    };
    let keys = |b: &Backward<'_>| {
        let cache = b.transposed.lock().unwrap();
        cache
            .iter()
            .map(|(k, v)| (*k, v.is_some()))
            .collect::<std::collections::HashSet<_>>()
    };
    let lazy = Backward::new(&g, &wanted, &output).unwrap();
    let lazy_grads = run(&lazy);
    let shapes: HashMap<String, Vec<usize>> =
        qint8_graph::shape::infer(&g, &HashMap::from([(input.clone(), x.shape().to_vec())]))
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.shape))
            .collect();
    let ready = Backward::new(&g, &wanted, &output).unwrap();
    ready.prepare(&shapes).unwrap();
    let prepared = keys(&ready);
    assert!(
        prepared.len() > 10,
        "{} convolutions prepared",
        prepared.len()
    );
    assert_eq!(
        prepared,
        keys(&lazy),
        "the same convolutions and geometries"
    );
    assert_eq!(run(&ready), lazy_grads);
    assert_eq!(keys(&ready), prepared, "the run prepared nothing more");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// The weight gradient's GEMM path (and its depthwise direct loop)
    /// equals the seven-deep loop.
    #[test]
    fn conv_weight_grad_matches_reference(c in conv_case(), seed in any::<u64>()) {
        let x = values(c.n * c.cin * c.ih * c.iw, seed);
        let g = values(c.n * c.cout * c.oh * c.ow, seed ^ 5);
        let len = c.cout * c.cin / c.group * c.kh * c.kw;
        let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        conv_weight_grad(&c, &x, &g, &mut fast);
        conv_weight_grad_reference(&c, &x, &g, &mut slow);
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{c:?} at {i}: {a} vs {b}");
        }
    }
}

/// The gradients of `<r, y>` with respect to the initializers `names`
/// against central differences along a pseudo-random direction in each.
fn check_weight_directional(graph: &Graph, x: &ArrayD<f32>, names: &[&str]) {
    let (_, r, got) = gradients(graph, x, names);
    let input = graph.inputs[0].name.clone();
    for (k, name) in names.iter().enumerate() {
        let w = graph.initializers[*name].as_f32().unwrap().clone();
        let dir = values(w.len(), 11 + k as u64);
        let f = |eps: f32| -> f64 {
            let mut g = graph.clone();
            let moved: Vec<f32> = w.iter().zip(&dir).map(|(a, d)| a + eps * d).collect();
            let moved = ArrayD::from_shape_vec(w.raw_dim(), moved).unwrap();
            g.initializers.insert(name.to_string(), Tensor::F32(moved));
            let y = unfused_session(&g)
                .run(&[(&input, x.view())])
                .unwrap()
                .remove(0);
            y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        assert_central_difference(f, &got[*name], &dir, name);
    }
}

/// `y = DequantizeLinear(QuantizeLinear(x))` on axis 1 of `shape`, both
/// with scale `s` and zero point `z`.
fn qdq_pair(scale: Tensor, zp: Tensor, shape: &[usize]) -> Graph {
    let mut init = BTreeMap::new();
    init.insert("s".to_string(), scale);
    init.insert("z".to_string(), zp);
    let axis = 1;
    Graph {
        name: "qdq".into(),
        inputs: vec![ValueInfo::f32("x", shape)],
        outputs: vec![ValueInfo::f32("y", shape)],
        nodes: vec![
            Node::new("q", Op::QuantizeLinear { axis }, &["x", "s", "z"], &["q"]),
            Node::new(
                "dq",
                Op::DequantizeLinear { axis },
                &["q", "s", "z"],
                &["y"],
            ),
        ],
        initializers: init,
        value_info: vec![],
    }
}

#[test]
fn quantize_dequantize_pass_gradients_straight_through_inside_the_range() {
    // y = DQ(Q(x)) per tensor (scale 0.1, int8) and per channel on axis 1
    // (uint8 zero point 128): the gradient is g where x/s + zp rounds
    // inside [qmin, qmax] and 0 where it saturates.
    for per_channel in [false, true] {
        let (scale, zp) = if per_channel {
            (
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.1, 0.02]).unwrap()),
                Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[2]), vec![128, 128]).unwrap()),
            )
        } else {
            (
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[]), vec![0.1]).unwrap()),
                Tensor::I8(ArrayD::from_shape_vec(IxDyn(&[]), vec![0]).unwrap()),
            )
        };
        let graph = qdq_pair(scale, zp, &[1, 2, 4]);
        // Channel 0 (scale 0.1) holds 1.0, -20.0, 12.7, 12.8; channel 1
        // (0.1 or 0.02) 0.5, -3.0, 2.5, 2.56.
        let xv = vec![1.0, -20.0, 12.7, 12.8, 0.5, -3.0, 2.5, 2.56];
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 2, 4]), xv.clone()).unwrap();
        let (_, r, got) = gradients(&graph, &x, &[]);
        let expect: Vec<f32> = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (s, z, lo, hi) = match (per_channel, i / 4) {
                    (false, _) => (0.1f32, 0.0f32, -128.0f32, 127.0f32),
                    (true, 0) => (0.1, 128.0, 0.0, 255.0),
                    (true, _) => (0.02, 128.0, 0.0, 255.0),
                };
                let q = v / s + z;
                if q >= lo - 0.5 && q <= hi + 0.5 {
                    r[i]
                } else {
                    0.0
                }
            })
            .collect();
        let g = &got["x"];
        assert!(
            expect.iter().filter(|&&e| e == 0.0).count() >= 2,
            "the case saturates somewhere"
        );
        for (i, (a, b)) in g.iter().zip(&expect).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{per_channel} at {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn scale_gradient_of_a_quantize_dequantize_pair_is_the_learned_step_size_one() {
    // y = DQ(Q(x)) with int8 scale 0.1 (zero point 0): d<r, y>/ds is
    // sum r * (round(x/s) - x/s) inside the range (ties to even, as
    // QuantizeLinear rounds) and r * qmin or r * qmax
    // where x saturates.
    let graph = qdq_pair(
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[]), vec![0.1]).unwrap()),
        Tensor::I8(ArrayD::from_shape_vec(IxDyn(&[]), vec![0]).unwrap()),
        &[1, 8],
    );
    let xv = vec![0.123, -0.456, 3.21, -20.0, 12.8, 0.05, -0.049, 7.77];
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 8]), xv.clone()).unwrap();
    let (_, r, got) = gradients(&graph, &x, &["s"]);
    let expect: f64 = xv
        .iter()
        .zip(&r)
        .map(|(&v, &rv)| {
            let t = (v / 0.1f32) as f64;
            let d = if t < -128.5 {
                -128.0
            } else if t > 127.5 {
                127.0
            } else {
                t.round_ties_even() - t
            };
            rv as f64 * d
        })
        .sum();
    let g = got["s"][0] as f64;
    assert!(
        (g - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
        "{g} vs {expect}"
    );
}
