//! Every supported operator, including the ones the fixtures do not use,
//! against onnxruntime: small graphs built with the IR, saved as ONNX, run
//! by both on the same random input. Skipped, with a note, without onnxruntime.

use ndarray::{ArrayD, IxDyn};
use qint8_graph::ops::{AutoPad, ConvAttrs, PoolAttrs};
use qint8_graph::{Graph, Model, Node, Op, Tensor, ValueInfo};
use qint8_suite::relative_max_error;

fn values(shape: &[usize], seed: u64, scale: f32) -> ArrayD<f32> {
    let mut s = seed | 1;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    })
}

fn f32_init(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    Tensor::F32(values(shape, seed, scale))
}

/// One case: a graph from input "x" to output "y".
struct Case {
    name: &'static str,
    input: Vec<usize>,
    output: Vec<usize>,
    nodes: Vec<Node>,
    inits: Vec<(&'static str, Tensor)>,
    opset: i64,
}

fn case(
    name: &'static str,
    input: &[usize],
    output: &[usize],
    nodes: Vec<Node>,
    inits: Vec<(&'static str, Tensor)>,
) -> Case {
    Case {
        name,
        input: input.to_vec(),
        output: output.to_vec(),
        nodes,
        inits,
        opset: 17,
    }
}

fn pool(k: usize, s: usize, p: usize, ceil: bool, include_pad: bool) -> PoolAttrs {
    PoolAttrs {
        kernel_shape: vec![k, k],
        strides: vec![s, s],
        pads: vec![p; 4],
        ceil_mode: ceil,
        count_include_pad: include_pad,
        ..Default::default()
    }
}

fn cases() -> Vec<Case> {
    let x4 = [2, 4, 9, 9];
    let scale_u8 = Tensor::scalar_f32(0.02);
    let zp_u8 = Tensor::U8(ndarray::arr0(128u8).into_dyn());
    let ch_scales = Tensor::F32(ndarray::arr1(&[0.01f32, 0.02, 0.005, 0.03]).into_dyn());
    let ch_zps = Tensor::I8(ndarray::arr1(&[0i8, 0, 0, 0]).into_dyn());
    let wq = Tensor::I8(ArrayD::from_shape_fn(IxDyn(&[6, 4, 3, 3]), |ix| {
        ((ix[0] * 37 + ix[1] * 11 + ix[2] * 5 + ix[3]) % 255) as i8
    }));
    let wscales =
        Tensor::F32(ndarray::Array1::from_iter((0..6).map(|i| 0.001 * (i + 1) as f32)).into_dyn());
    let wzps = Tensor::I8(ArrayD::zeros(IxDyn(&[6])));
    vec![
        case(
            "qdq_uint8_per_tensor",
            &x4,
            &x4,
            vec![
                Node::new(
                    "q",
                    Op::QuantizeLinear { axis: 1 },
                    &["x", "s", "z"],
                    &["q"],
                ),
                Node::new(
                    "dq",
                    Op::DequantizeLinear { axis: 1 },
                    &["q", "s", "z"],
                    &["y"],
                ),
            ],
            vec![("s", scale_u8), ("z", zp_u8)],
        ),
        case(
            "qdq_int8_per_channel_axis1",
            &x4,
            &x4,
            vec![
                Node::new(
                    "q",
                    Op::QuantizeLinear { axis: 1 },
                    &["x", "s", "z"],
                    &["q"],
                ),
                Node::new(
                    "dq",
                    Op::DequantizeLinear { axis: 1 },
                    &["q", "s", "z"],
                    &["y"],
                ),
            ],
            vec![("s", ch_scales), ("z", ch_zps)],
        ),
        case(
            "int8_weights_dq_conv",
            &x4,
            &[2, 6, 9, 9],
            vec![
                Node::new(
                    "dqw",
                    Op::DequantizeLinear { axis: 0 },
                    &["wq", "ws", "wz"],
                    &["w"],
                ),
                Node::new(
                    "conv",
                    Op::Conv(ConvAttrs {
                        pads: vec![1; 4],
                        group: 1,
                        ..Default::default()
                    }),
                    &["x", "w"],
                    &["y"],
                ),
            ],
            vec![("wq", wq), ("ws", wscales), ("wz", wzps)],
        ),
        case(
            "conv_groups_same_upper_stride2",
            &[2, 4, 12, 11],
            &[2, 6, 6, 6],
            vec![Node::new(
                "conv",
                Op::Conv(ConvAttrs {
                    strides: vec![2, 2],
                    group: 2,
                    auto_pad: AutoPad::SameUpper,
                    ..Default::default()
                }),
                &["x", "w", "b"],
                &["y"],
            )],
            vec![
                ("w", f32_init(&[6, 2, 3, 3], 3, 0.5)),
                ("b", f32_init(&[6], 4, 0.5)),
            ],
        ),
        case(
            "conv_dilation2_asymmetric_pads",
            &[2, 4, 12, 11],
            &[2, 6, 11, 11],
            vec![Node::new(
                "conv",
                Op::Conv(ConvAttrs {
                    dilations: vec![2, 2],
                    pads: vec![2, 1, 1, 3],
                    group: 1,
                    ..Default::default()
                }),
                &["x", "w", "b"],
                &["y"],
            )],
            vec![
                ("w", f32_init(&[6, 4, 3, 3], 13, 0.5)),
                ("b", f32_init(&[6], 14, 0.5)),
            ],
        ),
        case(
            "conv1d",
            &[2, 4, 20],
            &[2, 3, 20],
            vec![Node::new(
                "conv",
                Op::Conv(ConvAttrs {
                    pads: vec![2, 2],
                    group: 1,
                    ..Default::default()
                }),
                &["x", "w"],
                &["y"],
            )],
            vec![("w", f32_init(&[3, 4, 5], 5, 0.5))],
        ),
        case(
            "activations",
            &x4,
            &x4,
            vec![
                Node::new(
                    "hs",
                    Op::HardSigmoid {
                        alpha: 0.3,
                        beta: 0.4,
                    },
                    &["x"],
                    &["a"],
                ),
                Node::new("hw", Op::HardSwish, &["x"], &["b"]),
                Node::new(
                    "clip",
                    Op::Clip {
                        min: None,
                        max: None,
                    },
                    &["x", "lo", "hi"],
                    &["c"],
                ),
                Node::new("sig", Op::Sigmoid, &["x"], &["d"]),
                Node::new("add1", Op::Add, &["a", "b"], &["e"]),
                Node::new("sub", Op::Sub, &["e", "c"], &["f"]),
                Node::new("div", Op::Div, &["f", "two"], &["g"]),
                Node::new("mul", Op::Mul, &["g", "d"], &["h"]),
                Node::new("relu", Op::Relu, &["h"], &["y"]),
            ],
            vec![
                ("lo", Tensor::scalar_f32(-0.5)),
                ("hi", Tensor::scalar_f32(0.7)),
                ("two", f32_init(&[1, 4, 1, 1], 6, 2.0)),
            ],
        ),
        case(
            "pools",
            &[2, 3, 11, 10],
            &[2, 3, 6, 5],
            vec![
                Node::new(
                    "avg_ex",
                    Op::AveragePool(pool(3, 2, 1, false, false)),
                    &["x"],
                    &["a"],
                ),
                Node::new(
                    "avg_in",
                    Op::AveragePool(pool(3, 2, 1, false, true)),
                    &["x"],
                    &["b"],
                ),
                Node::new(
                    "max_ceil",
                    Op::MaxPool(pool(2, 2, 0, true, false)),
                    &["x"],
                    &["c"],
                ),
                Node::new("s1", Op::Add, &["a", "b"], &["d"]),
                Node::new("s2", Op::Add, &["d", "c"], &["y"]),
            ],
            vec![],
        ),
        case(
            "softmax_transpose_concat_reshape",
            &[2, 4, 3, 5],
            &[2, 40, 3],
            vec![
                Node::new("sm", Op::Softmax { axis: 1 }, &["x"], &["a"]),
                Node::new(
                    "tr",
                    Op::Transpose {
                        perm: Some(vec![0, 3, 1, 2]),
                    },
                    &["a"],
                    &["b"],
                ),
                Node::new("cat", Op::Concat { axis: 1 }, &["b", "b"], &["c"]),
                Node::new(
                    "rs",
                    Op::Reshape { allowzero: false },
                    &["c", "shape"],
                    &["y"],
                ),
            ],
            vec![("shape", Tensor::vec_i64(&[0, -1, 3]))],
        ),
        case(
            "squeeze_unsqueeze_flatten_gather",
            &[2, 1, 6, 5],
            &[2, 30],
            vec![
                Node::new("sq", Op::Squeeze { axes: None }, &["x", "ax1"], &["a"]),
                Node::new("un", Op::Unsqueeze { axes: None }, &["a", "ax3"], &["b"]),
                Node::new("ga", Op::Gather { axis: 1 }, &["b", "idx"], &["c"]),
                Node::new("fl", Op::Flatten { axis: 1 }, &["c"], &["y"]),
            ],
            vec![
                ("ax1", Tensor::vec_i64(&[1])),
                ("ax3", Tensor::vec_i64(&[3])),
                ("idx", Tensor::vec_i64(&[5, 0, -1, 2, 3, 1])),
            ],
        ),
        case(
            "matmul_gemm_reducemean",
            &[3, 8, 6],
            &[3, 5],
            vec![
                Node::new("mm", Op::MatMul, &["x", "w"], &["a"]),
                Node::new(
                    "rm",
                    Op::ReduceMean {
                        axes: Some(vec![1]),
                        keepdims: false,
                        noop_with_empty_axes: false,
                    },
                    &["a"],
                    &["b"],
                ),
                Node::new(
                    "gemm",
                    Op::Gemm {
                        alpha: 0.5,
                        beta: 2.0,
                        trans_a: false,
                        trans_b: true,
                    },
                    &["b", "g", "c"],
                    &["y"],
                ),
            ],
            vec![
                ("w", f32_init(&[6, 7], 7, 1.0)),
                ("g", f32_init(&[5, 7], 8, 1.0)),
                ("c", f32_init(&[5], 9, 1.0)),
            ],
        ),
        // alpha 1 with transB runs on the packed kernel (any batch size,
        // A plain or transposed); a bias that differs by row does not.
        case(
            "gemm_packed",
            &[11, 37],
            &[11, 53],
            vec![Node::new(
                "gemm",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                },
                &["x", "g", "c"],
                &["y"],
            )],
            vec![
                ("g", f32_init(&[53, 37], 10, 1.0)),
                ("c", f32_init(&[53], 11, 1.0)),
            ],
        ),
        case(
            "gemm_packed_trans_a",
            &[37, 3],
            &[3, 20],
            vec![Node::new(
                "gemm",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: true,
                    trans_b: true,
                },
                &["x", "g"],
                &["y"],
            )],
            vec![("g", f32_init(&[20, 37], 12, 1.0))],
        ),
        case(
            "gemm_row_bias",
            &[4, 9],
            &[4, 6],
            vec![Node::new(
                "gemm",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                },
                &["x", "g", "c"],
                &["y"],
            )],
            vec![
                ("g", f32_init(&[6, 9], 13, 1.0)),
                ("c", f32_init(&[4, 6], 14, 1.0)),
            ],
        ),
        case(
            "global_average_pool",
            &x4,
            &[2, 4, 1, 1],
            vec![Node::new("gap", Op::GlobalAveragePool, &["x"], &["y"])],
            vec![],
        ),
        // Steps forward and backward, clamped and negative bounds, an
        // omitted axis; then attribute-form slices as Split lowers to.
        case(
            "slice_steps",
            &[2, 6, 7, 5],
            &[2, 3, 3, 2],
            vec![Node::new(
                "sl",
                Op::Slice {
                    starts: None,
                    ends: None,
                    axes: None,
                },
                &["x", "st", "en", "ax", "sp"],
                &["y"],
            )],
            vec![
                ("st", Tensor::vec_i64(&[-1, 1, i64::MAX])),
                ("en", Tensor::vec_i64(&[-100, 100, 0])),
                ("ax", Tensor::vec_i64(&[1, 2, -1])),
                ("sp", Tensor::vec_i64(&[-2, 2, -3])),
            ],
        ),
        case(
            "split_sizes_and_equal",
            &[2, 6, 4, 3],
            &[2, 6, 4, 3],
            vec![
                Node::new(
                    "s1",
                    Op::Split {
                        axis: 1,
                        split: None,
                    },
                    &["x", "sizes"],
                    &["a", "b"],
                ),
                Node::new(
                    "s2",
                    Op::Split {
                        axis: -1,
                        split: None,
                    },
                    &["a"],
                    &["c", "d", "e"],
                ),
                Node::new("cat", Op::Concat { axis: -1 }, &["e", "c", "d"], &["f"]),
                Node::new("cat2", Op::Concat { axis: 1 }, &["b", "f"], &["y"]),
            ],
            vec![("sizes", Tensor::vec_i64(&[2, 4]))],
        ),
        case(
            "erf_sqrt_pow_mod",
            &x4,
            &x4,
            vec![
                Node::new("erf", Op::Erf, &["x"], &["a"]),
                Node::new("sq", Op::Mul, &["x", "x"], &["b"]),
                Node::new("sqrt", Op::Sqrt, &["b"], &["c"]),
                Node::new("pow", Op::Pow, &["c", "e"], &["d"]),
                Node::new("mod", Op::Mod { fmod: true }, &["x", "m"], &["f"]),
                Node::new("s1", Op::Add, &["a", "d"], &["g"]),
                Node::new("y", Op::Add, &["g", "f"], &["y"]),
            ],
            vec![
                ("e", Tensor::scalar_f32(1.7)),
                ("m", Tensor::scalar_f32(0.75)),
            ],
        ),
        case(
            "layer_norm_last_two_axes",
            &[2, 3, 5, 8],
            &[2, 3, 5, 8],
            vec![Node::new(
                "ln",
                Op::LayerNormalization {
                    axis: -2,
                    epsilon: 1e-5,
                },
                &["x", "g", "b"],
                &["y"],
            )],
            vec![
                ("g", f32_init(&[5, 8], 20, 1.0)),
                ("b", f32_init(&[8], 21, 1.0)),
            ],
        ),
        case(
            "pad_constant_reflect_edge",
            &[2, 3, 5, 6],
            &[2, 3, 11, 8],
            vec![
                Node::new(
                    "p1",
                    Op::Pad {
                        mode: qint8_graph::PadMode::Constant,
                        pads: None,
                        value: 0.0,
                    },
                    &["x", "p1s", "fill"],
                    &["a"],
                ),
                Node::new(
                    "p2",
                    Op::Pad {
                        mode: qint8_graph::PadMode::Reflect,
                        pads: None,
                        value: 0.0,
                    },
                    &["a", "p2s"],
                    &["b"],
                ),
                Node::new(
                    "p3",
                    Op::Pad {
                        mode: qint8_graph::PadMode::Edge,
                        pads: None,
                        value: 0.0,
                    },
                    &["b", "p3s"],
                    &["y"],
                ),
            ],
            vec![
                ("p1s", Tensor::vec_i64(&[0, 0, 1, 2, 0, 0, 2, -1])),
                ("fill", Tensor::scalar_f32(0.5)),
                ("p2s", Tensor::vec_i64(&[0, 0, 2, 0, 0, 0, 1, 0])),
                ("p3s", Tensor::vec_i64(&[0, 0, 0, 1, 0, 0, 0, 1])),
            ],
        ),
        // Not, Range, Mod and ScatterND as swin's mask subgraph uses them,
        // folded from constants, then a runtime scatter into the input.
        case(
            "scatter_range_not",
            &[4, 5],
            &[4, 5],
            vec![
                Node::new("r", Op::Range, &["r0", "r1", "r2"], &["ra"]),
                Node::new("md", Op::Mod { fmod: false }, &["ra", "three"], &["rm"]),
                Node::new("eq", Op::Equal, &["rm", "zero"], &["rb"]),
                Node::new("nt", Op::Not, &["rb"], &["rn"]),
                Node::new("cf", Op::Cast { to: 1 }, &["rn"], &["rf"]),
                Node::new("sc", Op::ScatterND, &["x", "idx", "upd"], &["a"]),
                Node::new("y", Op::Add, &["a", "rf"], &["y"]),
            ],
            vec![
                ("r0", Tensor::I64(ndarray::arr0(-3i64).into_dyn())),
                ("r1", Tensor::I64(ndarray::arr0(7i64).into_dyn())),
                ("r2", Tensor::I64(ndarray::arr0(2i64).into_dyn())),
                ("three", Tensor::I64(ndarray::arr0(3i64).into_dyn())),
                ("zero", Tensor::I64(ndarray::arr0(0i64).into_dyn())),
                ("idx", Tensor::I64(ndarray::arr2(&[[2i64], [0]]).into_dyn())),
                ("upd", f32_init(&[2, 5], 22, 1.0)),
            ],
        ),
        Case {
            opset: 20,
            ..case(
                "gelu_exact_and_tanh",
                &x4,
                &x4,
                vec![
                    Node::new("g1", Op::Gelu { tanh: false }, &["x"], &["a"]),
                    Node::new("g2", Op::Gelu { tanh: true }, &["x"], &["b"]),
                    Node::new("y", Op::Add, &["a", "b"], &["y"]),
                ],
                vec![],
            )
        },
    ]
}

#[test]
fn every_operator_matches_onnxruntime() {
    if !qint8_suite::onnxruntime_available() {
        eprintln!("note: python3 onnxruntime not importable; operator parity skipped");
        return;
    }
    let dir = std::env::temp_dir().join(format!("qint8-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for (i, c) in cases().into_iter().enumerate() {
        let mut g = Graph {
            name: c.name.into(),
            inputs: vec![ValueInfo::f32("x", &c.input)],
            outputs: vec![ValueInfo::f32("y", &c.output)],
            nodes: c.nodes,
            ..Default::default()
        };
        for (k, t) in c.inits {
            g.initializers.insert(k.to_string(), t);
        }
        let model = Model::new(g, c.opset);
        let path = dir.join(format!("{}.onnx", c.name));
        qint8_graph::onnx::save(&model, &path).unwrap();
        let x = values(&c.input, 100 + i as u64, 3.0);
        let expect = match qint8_suite::onnxruntime_output(&path, &x, &dir, c.name) {
            Ok(y) => y,
            Err(e) => {
                failures.push(format!("{}: onnxruntime failed: {e}", c.name));
                continue;
            }
        };
        let got = [qint8_suite::qint8_output(&model, "x", x.view()).unwrap()];
        if got[0].shape() != expect.shape() {
            failures.push(format!(
                "{}: shape {:?} vs {:?}",
                c.name,
                got[0].shape(),
                expect.shape()
            ));
            continue;
        }
        let err = relative_max_error(expect.as_slice().unwrap(), got[0].as_slice().unwrap());
        if err > 1e-4 {
            failures.push(format!("{}: relative max error {err}", c.name));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}
