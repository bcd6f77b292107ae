//! Library code never panics on bad models: fixture files (FP32 and QDQ)
//! with seeded random damage (attribute values, shortened or non-finite
//! initializers, renamed or emptied inputs, other operator types, removed
//! nodes, input dimensions) are loaded, run and calibrated. Each step may
//! fail with an error; none may panic.

use std::panic::{catch_unwind, AssertUnwindSafe};

use prost::Message;
use qint8_calibration::{calibrate, CalibConfig};
use qint8_graph::proto::{attribute_type, DimensionValue, ModelProto};
use qint8_runtime::{Session, SessionOptions};
use qint8_suite::{fixture_dataset, fixtures};

/// xorshift64: reproducible damage without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTS: [i64; 7] = [-3, -1, 0, 1, 2, 100, i32::MAX as i64];
const FLOATS: [f32; 5] = [f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30];
const OPS: [&str; 10] = [
    "Relu",
    "Add",
    "Conv",
    "Gemm",
    "Reshape",
    "Concat",
    "MaxPool",
    "Flatten",
    "Transpose",
    "Softmax",
];

/// Applies one kind of damage to `m`; returns what it did.
fn damage(m: &mut ModelProto, rng: &mut Rng) -> String {
    let Some(g) = m.graph.as_mut() else {
        return "no graph".into();
    };
    let n = rng.below(g.node.len());
    match rng.below(7) {
        0 => {
            let node = &mut g.node[n];
            let k = rng.below(node.attribute.len());
            let Some(a) = node.attribute.get_mut(k) else {
                return "no attribute".into();
            };
            match a.r#type {
                attribute_type::INTS if !a.ints.is_empty() => {
                    let i = rng.below(a.ints.len());
                    a.ints[i] = INTS[rng.below(INTS.len())];
                }
                attribute_type::INT => a.i = INTS[rng.below(INTS.len())],
                attribute_type::FLOAT => a.f = FLOATS[rng.below(FLOATS.len())],
                _ => {}
            }
            format!("attribute {}.{}", node.name, a.name)
        }
        1 => {
            let k = rng.below(g.initializer.len());
            let Some(t) = g.initializer.get_mut(k) else {
                return "no initializer".into();
            };
            let len = t.raw_data.len();
            if len > 4 {
                let keep = rng.below(len / 4) * 4;
                t.raw_data = t.raw_data.slice(..keep);
            }
            t.float_data.truncate(rng.below(t.float_data.len()));
            format!("initializer {} shortened", t.name)
        }
        2 => {
            let k = rng.below(g.initializer.len());
            let Some(t) = g.initializer.get_mut(k) else {
                return "no initializer".into();
            };
            // A float32 tensor's raw bytes: one value made NaN.
            if t.data_type == 1 && t.raw_data.len() >= 4 {
                let mut b = t.raw_data.to_vec();
                let i = rng.below(b.len() / 4) * 4;
                b[i..i + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                t.raw_data = b.into();
            }
            format!("initializer {} with NaN", t.name)
        }
        3 => {
            let node = &mut g.node[n];
            let i = rng.below(node.input.len());
            let what = ["", "nonexistent", "input"][rng.below(3)].to_string();
            if let Some(x) = node.input.get_mut(i) {
                *x = what;
            }
            format!("input {i} of {}", node.name)
        }
        4 => {
            g.node[n].op_type = OPS[rng.below(OPS.len())].into();
            format!("{} is now {}", g.node[n].name, g.node[n].op_type)
        }
        5 => {
            let node = g.node.remove(n);
            format!("{} removed", node.name)
        }
        _ => {
            let dims = g
                .input
                .first_mut()
                .and_then(|i| i.r#type.as_mut())
                .and_then(|t| t.tensor_type.as_mut())
                .and_then(|t| t.shape.as_mut());
            if let Some(s) = dims {
                let i = 1 + rng.below(s.dim.len().saturating_sub(1));
                if let Some(d) = s.dim.get_mut(i) {
                    d.value = Some(DimensionValue::DimValue([0, 1, 3, 1000][rng.below(4)]));
                }
            }
            "input dimension".into()
        }
    }
}

#[test]
fn damaged_models_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let calib = fixture_dataset("calib-images-idx3-ubyte", 4);
    let x = calib.batch(0, 2).unwrap().inputs;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut loaded = 0;
    let files = [
        fixtures().join("models/efficientnet_b0.onnx"),
        fixtures().join("models/resnet50.onnx"),
    ];
    for (f, file) in files.iter().enumerate() {
        let base = qint8_graph::onnx::model_to_proto(&qint8_graph::onnx::load(file).unwrap());
        // The same model as a QDQ file, so Q/DQ nodes are damaged too.
        let qdq = {
            let m = qint8_graph::onnx::load(file).unwrap();
            let c = calibrate(&m.graph, &calib, &CalibConfig::default(), &mut |_| {}).unwrap();
            let g = qint8_graph::quant::insert_qdq(
                &c.graph,
                &c.plan,
                qint8_graph::quant::WeightStorage::Int8,
            )
            .unwrap();
            qint8_graph::onnx::model_to_proto(&m.with_graph(g, 13))
        };
        for trial in 0..24 {
            let mut m = if trial % 2 == 0 {
                base.clone()
            } else {
                qdq.clone()
            };
            let what: Vec<String> = (0..1 + rng.below(2))
                .map(|_| damage(&mut m, &mut rng))
                .collect();
            let bytes = m.encode_to_vec();
            let path = dir.path().join(format!("m{f}_{trial}.onnx"));
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let Ok(model) = qint8_graph::onnx::decode_model(&bytes, dir.path(), &path) else {
                    return false;
                };
                if let Ok(s) = Session::new(
                    &model,
                    SessionOptions {
                        threads: 1,
                        ..Default::default()
                    },
                ) {
                    let name = model.graph.inputs.first().map(|i| i.name.clone());
                    if let Some(name) = name {
                        let _ = s.run(&[(name.as_str(), x.view().into_dyn())]);
                    }
                }
                let cfg = CalibConfig {
                    threads: 1,
                    ..Default::default()
                };
                let _ = calibrate(&model.graph, &calib, &cfg, &mut |_| {});
                true
            }));
            match outcome {
                Ok(l) => loaded += usize::from(l),
                Err(_) => panic!("{}: {what:?} panicked", path.display()),
            }
        }
    }
    // Much of the damage leaves a decodable file, which the runtime and the
    // calibrator then saw (measured: 25 of 48).
    assert!(loaded >= 15, "only {loaded} of 48 damaged files decoded");
}
