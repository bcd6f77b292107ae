//! Every fixture model (both PyTorch exporters) loads, simplifies and infers.

use std::collections::HashMap;
use std::path::PathBuf;

use qint8_graph::{onnx, passes, shape};

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models")
}

#[test]
fn fixtures_load_and_infer() {
    for name in ["resnet50", "vgg16_bn", "efficientnet_b0"] {
        for suffix in ["", "_dynamo"] {
            let path = models_dir().join(format!("{name}{suffix}.onnx"));
            let mut m = onnx::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(m.graph.inputs.len(), 1, "{name}{suffix}");
            let params = m.graph.parameter_count();
            passes::simplify(&mut m.graph).unwrap();
            assert!(m.graph.parameter_count() <= params);
            let input = m.graph.inputs[0].name.clone();
            let shapes =
                shape::infer(&m.graph, &HashMap::from([(input, vec![3, 1, 32, 32])])).unwrap();
            let out = &shapes[&m.graph.outputs[0].name];
            assert_eq!(out.shape, vec![3, 10], "{name}{suffix}");
            let ops = m.graph.op_counts();
            for gone in [
                "Identity",
                "Dropout",
                "Shape",
                "Gather",
                "ConstantOfShape",
                "Equal",
                "Where",
            ] {
                assert!(
                    !ops.contains_key(gone),
                    "{name}{suffix} still has {gone}: {ops:?}"
                );
            }
        }
    }
}
