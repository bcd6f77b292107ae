use super::*;
use proptest::prelude::*;
use qint8_graph::proto::{
    AttributeProto, OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto,
};

fn f32_raw(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn f32_typed(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: v.to_vec(),
        ..Default::default()
    }
}

fn i8_typed(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: INT8,
        int32_data: v.iter().map(|&x| i32::from(x)).collect(),
        ..Default::default()
    }
}

fn u8_raw(name: &str, dims: &[i64], v: &[u8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 2,
        raw_data: v.to_vec().into(),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn int_attr_proto(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: qint8_graph::proto::attribute_type::INT,
        i,
        ..Default::default()
    }
}

fn float_input(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| qint8_graph::proto::Dimension {
                            value: Some(qint8_graph::proto::DimensionValue::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// x -> Q -> DQ -> Conv(weight: DQ(int8 w, per-channel scale, axis 0), float bias) -> y,
/// what a QDQ export for TensorRT looks like.
fn clean() -> ModelProto {
    let mut dq_w = node(
        "DequantizeLinear",
        "dq_w",
        &["w", "w_scale", "w_zp"],
        &["w_dq"],
    );
    dq_w.attribute.push(int_attr_proto("axis", 0));
    let graph = GraphProto {
        name: "g".into(),
        node: vec![
            node("QuantizeLinear", "q_x", &["x", "x_scale", "x_zp"], &["x_q"]),
            node(
                "DequantizeLinear",
                "dq_x",
                &["x_q", "x_scale", "x_zp"],
                &["x_dq"],
            ),
            dq_w,
            node("Conv", "conv", &["x_dq", "w_dq", "b"], &["y"]),
        ],
        initializer: vec![
            f32_raw("x_scale", &[], &[0.02]),
            i8_typed("x_zp", &[], &[0]),
            i8_typed(
                "w",
                &[4, 3, 1, 1],
                &[1, -2, 3, 4, -5, 6, 7, 8, -9, 10, 11, 127],
            ),
            f32_raw("w_scale", &[4], &[0.1, 0.2, 0.3, 0.4]),
            i8_typed("w_zp", &[4], &[0; 4]),
            f32_typed("b", &[4], &[0.0, 1.0, -1.0, 0.5]),
        ],
        input: vec![float_input("x", &[1, 3, 8, 8])],
        output: vec![float_input("y", &[1, 4, 8, 8])],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

fn graph(m: &mut ModelProto) -> &mut GraphProto {
    m.graph.as_mut().unwrap()
}

fn init<'m>(m: &'m mut ModelProto, name: &str) -> &'m mut TensorProto {
    graph(m)
        .initializer
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap()
}

fn set_init(m: &mut ModelProto, t: TensorProto) {
    let name = t.name.clone();
    *init(m, &name) = t;
}

fn remove_init(m: &mut ModelProto, name: &str) {
    graph(m).initializer.retain(|t| t.name != name);
}

fn node_mut<'m>(m: &'m mut ModelProto, name: &str) -> &'m mut NodeProto {
    graph(m).node.iter_mut().find(|n| n.name == name).unwrap()
}

fn set_axis(m: &mut ModelProto, name: &str, axis: Option<i64>) {
    let n = node_mut(m, name);
    n.attribute.retain(|a| a.name != "axis");
    if let Some(a) = axis {
        n.attribute.push(int_attr_proto("axis", a));
    }
}

/// (node, rule) of each violation, in report order.
fn found(v: &[Violation]) -> Vec<(&str, Rule)> {
    v.iter().map(|v| (v.node.as_str(), v.rule)).collect()
}

#[test]
fn clean_qdq_conv_has_no_violations() {
    assert_eq!(check_model(&clean()), vec![]);
}

#[test]
fn constants_from_constant_nodes_and_typed_fields_are_read() {
    let mut m = clean();
    remove_init(&mut m, "x_scale");
    remove_init(&mut m, "x_zp");
    set_init(&mut m, f32_typed("w_scale", &[4], &[0.1, 0.2, 0.3, 0.4]));
    let mut scale = node("Constant", "c_scale", &[], &["x_scale"]);
    scale.attribute.push(AttributeProto {
        name: "value_float".into(),
        r#type: qint8_graph::proto::attribute_type::FLOAT,
        f: 0.05,
        ..Default::default()
    });
    let mut zp = node("Constant", "c_zp", &[], &["x_zp"]);
    zp.attribute.push(AttributeProto {
        name: "value".into(),
        r#type: qint8_graph::proto::attribute_type::TENSOR,
        t: Some(i8_typed("", &[], &[0])),
        ..Default::default()
    });
    graph(&mut m).node.splice(0..0, [scale, zp]);
    assert_eq!(check_model(&m), vec![]);

    // `value_int` makes an INT64 zero point.
    let zp = node_mut(&mut m, "c_zp");
    zp.attribute = vec![int_attr_proto("value_int", 0)];
    assert_eq!(
        found(&check_model(&m)),
        [
            ("q_x", Rule::ZeroPointNotInt8),
            ("dq_x", Rule::ZeroPointNotInt8)
        ]
    );
}

#[test]
fn opset_below_13_or_missing() {
    for (domain, version) in [("", 12), ("ai.onnx", 10)] {
        let mut m = clean();
        m.opset_import = vec![OperatorSetIdProto {
            domain: domain.into(),
            version,
        }];
        let v = check_model(&m);
        assert_eq!(found(&v), [("", Rule::OpsetTooOld)]);
        assert!(v[0].detail.contains(&version.to_string()), "{}", v[0]);
        assert!(
            v[0].to_string().starts_with("error[opset-too-old] model: "),
            "{}",
            v[0]
        );
    }
    let mut m = clean();
    m.opset_import = vec![OperatorSetIdProto {
        domain: "com.microsoft".into(),
        version: 1,
    }];
    assert_eq!(found(&check_model(&m)), [("", Rule::OpsetTooOld)]);
    // Other domains' versions do not matter.
    m.opset_import.push(OperatorSetIdProto {
        domain: String::new(),
        version: 17,
    });
    assert_eq!(check_model(&m), vec![]);
}

#[test]
fn integer_operators_in_any_domain() {
    for (k, op) in INTEGER_OPS.iter().enumerate() {
        let mut m = clean();
        let mut n = node(op, "qop", &["x"], &["z"]);
        if k % 2 == 1 {
            n.domain = "com.microsoft".into();
        }
        graph(&mut m).node.push(n);
        let v = check_model(&m);
        assert_eq!(found(&v), [("qop", Rule::IntegerOperator)], "{op}");
        assert_eq!(v[0].op, *op);
    }
}

#[test]
fn non_zero_zero_points() {
    let mut m = clean();
    set_init(&mut m, i8_typed("x_zp", &[], &[3]));
    set_init(&mut m, i8_typed("w_zp", &[4], &[0, 0, -1, 0]));
    let v = check_model(&m);
    assert_eq!(
        found(&v),
        [
            ("q_x", Rule::ZeroPointNotZero),
            ("dq_x", Rule::ZeroPointNotZero),
            ("dq_w", Rule::ZeroPointNotZero),
        ]
    );
    assert!(
        v[2].detail.contains("1 of 4") && v[2].detail.contains("element 2 = -1"),
        "{}",
        v[2]
    );
}

#[test]
fn uint8_zero_points() {
    let mut m = clean();
    set_init(&mut m, u8_raw("x_zp", &[], &[0]));
    let v = check_model(&m);
    assert_eq!(
        found(&v),
        [
            ("q_x", Rule::ZeroPointNotInt8),
            ("dq_x", Rule::ZeroPointNotInt8)
        ]
    );
    assert!(v[0].detail.contains("UINT8"), "{}", v[0]);

    set_init(&mut m, u8_raw("x_zp", &[], &[128]));
    assert_eq!(
        found(&check_model(&m)),
        [
            ("q_x", Rule::ZeroPointNotInt8),
            ("q_x", Rule::ZeroPointNotZero),
            ("dq_x", Rule::ZeroPointNotInt8),
            ("dq_x", Rule::ZeroPointNotZero),
        ]
    );
}

#[test]
fn missing_zero_point_on_quantize_defaults_to_uint8() {
    let mut m = clean();
    node_mut(&mut m, "q_x").input.truncate(2);
    // An empty name is an omitted optional input too.
    node_mut(&mut m, "dq_x").input[2] = String::new();
    let v = check_model(&m);
    assert_eq!(found(&v), [("q_x", Rule::ZeroPointNotInt8)]);
    assert_eq!(v[0].detail, "zero point missing: defaults to uint8");

    // Opset 21's output_dtype can make it int8.
    node_mut(&mut m, "q_x")
        .attribute
        .push(int_attr_proto("output_dtype", 3));
    assert_eq!(check_model(&m), vec![]);
    node_mut(&mut m, "q_x").attribute = vec![int_attr_proto("output_dtype", 2)];
    assert_eq!(found(&check_model(&m)), [("q_x", Rule::ZeroPointNotInt8)]);
}

#[test]
fn missing_zero_point_on_dequantize_follows_its_input() {
    let mut m = clean();
    node_mut(&mut m, "dq_w").input.truncate(2);
    assert_eq!(check_model(&m), vec![], "int8 weights need no zero point");

    set_init(&mut m, u8_raw("w", &[4, 3, 1, 1], &[0; 12]));
    let v = check_model(&m);
    assert_eq!(found(&v), [("dq_w", Rule::ZeroPointNotInt8)]);
    assert!(
        v[0].detail.contains("\"w\"") && v[0].detail.contains("UINT8"),
        "{}",
        v[0]
    );

    // A graph input's declared type counts too.
    let mut m = clean();
    let dq = node_mut(&mut m, "dq_x");
    dq.input = vec!["x".into(), "x_scale".into()];
    assert_eq!(found(&check_model(&m)), [("dq_x", Rule::ZeroPointNotInt8)]);
}

#[test]
fn zero_point_computed_at_run_time() {
    let mut m = clean();
    remove_init(&mut m, "x_zp");
    let v = check_model(&m);
    assert_eq!(
        found(&v),
        [
            ("q_x", Rule::ZeroPointNotZero),
            ("dq_x", Rule::ZeroPointNotZero)
        ]
    );
    assert!(v[0].detail.contains("run time"), "{}", v[0]);
}

#[test]
fn scale_not_constant_or_missing() {
    let mut m = clean();
    remove_init(&mut m, "x_scale");
    graph(&mut m).input.push(float_input("x_scale", &[]));
    assert_eq!(
        found(&check_model(&m)),
        [
            ("q_x", Rule::ScaleNotConstant),
            ("dq_x", Rule::ScaleNotConstant)
        ]
    );

    let mut m = clean();
    node_mut(&mut m, "dq_x").input = vec!["x_q".into(), String::new(), "x_zp".into()];
    let v = check_model(&m);
    assert_eq!(found(&v), [("dq_x", Rule::ScaleNotConstant)]);
    assert!(v[0].detail.contains("missing"), "{}", v[0]);
}

#[test]
fn invalid_scale_values_and_types() {
    let mut m = clean();
    set_init(
        &mut m,
        f32_raw("w_scale", &[4], &[0.1, -0.2, f32::NAN, f32::INFINITY]),
    );
    let v = check_model(&m);
    assert_eq!(found(&v), [("dq_w", Rule::ScaleInvalid)]);
    assert!(
        v[0].detail.contains("3 of 4") && v[0].detail.contains("element 1 = -0.2"),
        "{}",
        v[0]
    );

    for bad in [0.0f32, -0.0, f32::NEG_INFINITY] {
        let mut m = clean();
        set_init(&mut m, f32_raw("x_scale", &[], &[bad]));
        assert_eq!(
            found(&check_model(&m)),
            [("q_x", Rule::ScaleInvalid), ("dq_x", Rule::ScaleInvalid)],
            "{bad}"
        );
    }

    let mut m = clean();
    set_init(&mut m, i8_typed("x_scale", &[], &[1]));
    let v = check_model(&m);
    assert_eq!(
        found(&v),
        [("q_x", Rule::ScaleInvalid), ("dq_x", Rule::ScaleInvalid)]
    );
    assert!(v[0].detail.contains("INT8"), "{}", v[0]);

    let mut m = clean();
    set_init(&mut m, f32_raw("x_scale", &[0], &[]));
    let v = check_model(&m);
    assert!(
        v[0].rule == Rule::ScaleInvalid && v[0].detail.contains("no elements"),
        "{}",
        v[0]
    );
}

#[test]
fn half_and_double_precision_scales() {
    let half = |bits: &[u16], raw: bool| {
        let mut t = TensorProto {
            name: "x_scale".into(),
            data_type: 10,
            ..Default::default()
        };
        if raw {
            t.raw_data = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        } else {
            t.int32_data = bits.iter().map(|&b| i32::from(b)).collect();
        }
        t
    };
    for (bits, raw, ok) in [
        (0x3c00, true, true),   // 1.0
        (0x0001, false, true),  // smallest subnormal
        (0x0000, true, false),  // 0
        (0xbc00, false, false), // -1
        (0x7c00, true, false),  // inf
        (0x7e00, false, false), // NaN
    ] {
        let mut m = clean();
        set_init(&mut m, half(&[bits], raw));
        assert_eq!(check_model(&m).is_empty(), ok, "{bits:#06x}");
    }

    let mut m = clean();
    set_init(
        &mut m,
        TensorProto {
            name: "x_scale".into(),
            data_type: 16,
            int32_data: vec![0x3f80], // bfloat16 1.0
            ..Default::default()
        },
    );
    assert_eq!(check_model(&m), vec![]);
    set_init(
        &mut m,
        TensorProto {
            name: "x_scale".into(),
            data_type: 11,
            double_data: vec![-1e-3],
            ..Default::default()
        },
    );
    assert_eq!(
        found(&check_model(&m)),
        [("q_x", Rule::ScaleInvalid), ("dq_x", Rule::ScaleInvalid)]
    );

    assert_eq!(f16_to_f64(0x3c00), 1.0);
    assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
    assert_eq!(f16_to_f64(0x7bff), 65504.0);
    assert_eq!(f16_to_f64(0xc000), -2.0);
    assert_eq!(f16_to_f64(0xfc00), f64::NEG_INFINITY);
    assert!(f16_to_f64(0x7c01).is_nan());
}

#[test]
fn conv_weight_axis() {
    for (axis, ok) in [
        (None, false), // default axis 1
        (Some(1), false),
        (Some(2), false),
        (Some(0), true),
        (Some(-4), true), // rank 4: axis 0
        (Some(-3), false),
    ] {
        let mut m = clean();
        set_axis(&mut m, "dq_w", axis);
        let v = check_model(&m);
        if ok {
            assert_eq!(v, vec![], "{axis:?}");
        } else {
            assert_eq!(found(&v), [("dq_w", Rule::WeightAxis)], "{axis:?}");
            assert!(
                v[0].detail.contains("axis 0") && v[0].detail.contains("\"conv\""),
                "{}",
                v[0]
            );
        }
    }
    // A per-tensor weight scale has no axis to check.
    let mut m = clean();
    set_init(&mut m, f32_raw("w_scale", &[], &[0.1]));
    set_init(&mut m, i8_typed("w_zp", &[], &[0]));
    set_axis(&mut m, "dq_w", None);
    assert_eq!(check_model(&m), vec![]);
}

#[test]
fn conv_transpose_weight_axis() {
    let mut m = clean();
    node_mut(&mut m, "conv").op_type = "ConvTranspose".into();
    let v = check_model(&m);
    assert_eq!(found(&v), [("dq_w", Rule::WeightAxis)]);
    assert!(
        v[0].detail.contains("ConvTranspose") && v[0].detail.contains("axis 1"),
        "{}",
        v[0]
    );
    set_axis(&mut m, "dq_w", Some(1));
    assert_eq!(check_model(&m), vec![]);
    set_axis(&mut m, "dq_w", None);
    assert_eq!(check_model(&m), vec![]);
}

#[test]
fn weight_axis_of_quantize_before_dequantize() {
    // Float weights fake-quantized in the graph: Q(w_f) -> DQ -> Conv.
    let mut m = clean();
    graph(&mut m)
        .initializer
        .push(f32_raw("w_f", &[4, 3, 1, 1], &[0.5; 12]));
    let mut q_w = node("QuantizeLinear", "q_w", &["w_f", "w_scale", "w_zp"], &["w"]);
    q_w.attribute.push(int_attr_proto("axis", 1));
    remove_init(&mut m, "w");
    graph(&mut m).node.insert(2, q_w);
    assert_eq!(found(&check_model(&m)), [("q_w", Rule::WeightAxis)]);
}

#[test]
fn shared_weight_is_reported_once() {
    let mut m = clean();
    set_axis(&mut m, "dq_w", None);
    graph(&mut m)
        .node
        .push(node("Conv", "conv2", &["x_dq", "w_dq"], &["y2"]));
    assert_eq!(found(&check_model(&m)), [("dq_w", Rule::WeightAxis)]);
}

#[test]
fn unquantized_inputs_are_warnings() {
    let mut m = clean();
    node_mut(&mut m, "conv").input[1] = "w_float".into();
    graph(&mut m)
        .initializer
        .push(f32_raw("w_float", &[4, 3, 1, 1], &[0.5; 12]));
    graph(&mut m).input.push(float_input("a", &[2, 4]));
    graph(&mut m)
        .initializer
        .push(f32_raw("bmat", &[4, 2], &[1.0; 8]));
    graph(&mut m)
        .node
        .push(node("MatMul", "", &["a", "bmat"], &["mm"]));
    graph(&mut m)
        .node
        .push(node("Gemm", "gemm", &["x_dq", "bmat"], &["gm"]));
    let v = check_model(&m);
    assert_eq!(
        found(&v),
        [
            ("conv", Rule::UnquantizedInput),
            ("<node 4>", Rule::UnquantizedInput),
            ("<node 4>", Rule::UnquantizedInput),
            ("gemm", Rule::UnquantizedInput),
        ]
    );
    assert!(v.iter().all(|v| v.rule.is_warning()));
    assert!(v[0].detail.contains("input 1 (\"w_float\")"), "{}", v[0]);
    assert!(v[1].detail.starts_with("input 0") && v[2].detail.starts_with("input 1"));
    assert!(
        v[0].to_string()
            .starts_with("warning[unquantized-input] conv (Conv): "),
        "{}",
        v[0]
    );
    assert!(!Rule::WeightAxis.is_warning());
}

#[test]
fn every_violation_is_reported() {
    let mut m = clean();
    m.opset_import[0].version = 11;
    set_init(&mut m, i8_typed("x_zp", &[], &[5]));
    set_init(&mut m, f32_raw("w_scale", &[4], &[0.1, 0.2, -0.3, 0.4]));
    set_axis(&mut m, "dq_w", None);
    graph(&mut m)
        .node
        .push(node("QLinearConv", "qconv", &["x"], &["z"]));
    graph(&mut m)
        .node
        .push(node("MatMul", "mm", &["x", "y"], &["o"]));
    let v = check_model(&m);
    assert_eq!(
        found(&v),
        [
            ("", Rule::OpsetTooOld),
            ("q_x", Rule::ZeroPointNotZero),
            ("dq_x", Rule::ZeroPointNotZero),
            ("dq_w", Rule::ScaleInvalid),
            ("dq_w", Rule::WeightAxis),
            ("qconv", Rule::IntegerOperator),
            ("mm", Rule::UnquantizedInput),
            ("mm", Rule::UnquantizedInput),
        ]
    );
}

#[test]
fn unreadable_constants_are_reported() {
    let mut m = clean();
    let t = init(&mut m, "w_scale");
    t.raw_data.clear();
    t.data_location = 1;
    t.external_data = vec![StringStringEntryProto {
        key: "location".into(),
        value: "weights.bin".into(),
    }];
    let v = check_model(&m);
    assert_eq!(found(&v), [("dq_w", Rule::UnreadableConstant)]);
    assert!(v[0].detail.contains("check_file"), "{}", v[0]);

    let mut m = clean();
    set_init(&mut m, f32_typed("w_scale", &[4], &[0.1, 0.2]));
    let v = check_model(&m);
    assert_eq!(found(&v), [("dq_w", Rule::UnreadableConstant)]);
    assert!(v[0].detail.contains("4 elements, data has 2"), "{}", v[0]);

    let mut m = clean();
    set_init(&mut m, f32_raw("x_scale", &[-1], &[]));
    assert!(check_model(&m)
        .iter()
        .all(|v| v.rule == Rule::UnreadableConstant));

    let mut m = clean();
    remove_init(&mut m, "x_zp");
    let mut c = node("Constant", "c", &[], &["x_zp"]);
    c.attribute.push(AttributeProto {
        name: "value_strings".into(),
        ..Default::default()
    });
    graph(&mut m).node.insert(0, c);
    let v = check_model(&m);
    assert_eq!(
        found(&v),
        [
            ("q_x", Rule::UnreadableConstant),
            ("dq_x", Rule::UnreadableConstant)
        ]
    );
    node_mut(&mut m, "c").attribute = vec![AttributeProto {
        name: "value".into(),
        ..Default::default()
    }];
    assert_eq!(check_model(&m).len(), 2);
}

#[test]
fn model_without_graph() {
    let m = ModelProto {
        opset_import: clean().opset_import,
        ..Default::default()
    };
    assert_eq!(found(&check_model(&m)), [("", Rule::NoGraph)]);
}

#[test]
fn check_file_reads_models_and_external_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, clean().encode_to_vec()).unwrap();
    assert_eq!(check_file(&path).unwrap(), vec![]);

    // Per-channel scales stored after 8 bytes of other data in weights.bin.
    let external = |scales: &[f32], location: &str| {
        let mut bytes = vec![0u8; 8];
        bytes.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
        std::fs::write(dir.path().join("weights.bin"), bytes).unwrap();
        let mut m = clean();
        let t = init(&mut m, "w_scale");
        t.raw_data.clear();
        t.data_location = 1;
        t.external_data = [("location", location), ("offset", "8"), ("length", "16")]
            .iter()
            .map(|&(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v.into(),
            })
            .collect();
        std::fs::write(&path, m.encode_to_vec()).unwrap();
        check_file(&path).unwrap()
    };
    assert_eq!(external(&[0.1, 0.2, 0.3, 0.4], "weights.bin"), vec![]);
    assert_eq!(
        found(&external(&[0.1, 0.0, 0.3, 0.4], "weights.bin")),
        [("dq_w", Rule::ScaleInvalid)]
    );
    let v = external(&[0.1, 0.2, 0.3], "weights.bin");
    assert_eq!(found(&v), [("dq_w", Rule::UnreadableConstant)]);
    assert!(v[0].detail.contains("12 bytes into the 16"), "{}", v[0]);
    let v = external(&[0.1, 0.2, 0.3, 0.4], "../weights.bin");
    assert_eq!(found(&v), [("dq_w", Rule::UnreadableConstant)]);
    assert!(
        v[0].detail.contains("inside the model's folder"),
        "{}",
        v[0]
    );
}

#[test]
fn check_file_errors_on_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.onnx");

    let e = check_file(&path).unwrap_err();
    assert!(
        matches!(&e, TrtError::Io { path: p, .. } if p == &path),
        "{e}"
    );

    let bytes = clean().encode_to_vec();
    for cut in [bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = check_file(&path).unwrap_err();
        assert!(matches!(e, TrtError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("bad.onnx"), "{e}");
    }
    for garbage in [&[0xffu8; 16][..], b"", b"hello, this is not an ONNX model"] {
        std::fs::write(&path, garbage).unwrap();
        let e = check_file(&path).unwrap_err();
        assert!(matches!(e, TrtError::Decode { .. }), "{garbage:?}: {e}");
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = ModelProto::decode(bytes.as_slice()) {
            let _ = check_model(&m);
        }
    }

    #[test]
    fn corrupted_models_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = clean().encode_to_vec();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(m) = ModelProto::decode(bytes.as_slice()) {
            let _ = check_model(&m);
        }
    }
}
