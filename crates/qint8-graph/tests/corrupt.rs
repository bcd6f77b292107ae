//! Malformed ONNX files give errors, never panics.

use std::path::PathBuf;

use qint8_graph::{onnx, GraphError};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/resnet50.onnx")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qint8-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn missing_file_names_the_path() {
    let err = onnx::load("/nonexistent/model.onnx").unwrap_err();
    assert!(matches!(err, GraphError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/model.onnx"));
}

/// `load` (which maps the file on Linux) decodes what decoding the bytes
/// read into memory gives; an empty file and a directory are errors.
#[test]
fn loading_a_file_matches_decoding_its_bytes() {
    let path = fixture();
    let bytes = std::fs::read(&path).unwrap();
    let dir = path.parent().unwrap();
    let read = onnx::decode_model(&bytes, dir, &path).unwrap();
    let loaded = onnx::load(&path).unwrap();
    assert_eq!(loaded.graph, read.graph);
    assert_eq!(loaded.opset, read.opset);
    let empty = tmp("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    assert!(onnx::load(&empty).is_err());
    let err = onnx::load(dir).unwrap_err();
    assert!(matches!(err, GraphError::Io { .. }), "{err}");
}

#[test]
fn truncated_and_garbage_files_are_errors() {
    let bytes = std::fs::read(fixture()).unwrap();
    // Truncations at many points, including inside the weights.
    for cut in [
        1,
        10,
        100,
        1000,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 7,
    ] {
        let p = tmp(&format!("cut{cut}.onnx"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(onnx::load(&p).is_err(), "truncated at {cut} loaded");
    }
    // Random garbage and flipped bytes.
    let mut s = 0x1234_5678_9abc_def0u64;
    for trial in 0..50 {
        let mut b = bytes.clone();
        for _ in 0..20 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let i = (s as usize) % b.len();
            b[i] = (s >> 32) as u8;
        }
        let p = tmp(&format!("flip{trial}.onnx"));
        std::fs::write(&p, &b).unwrap();
        // Either an error or (if only weight bytes changed) a valid model.
        let _ = onnx::load(&p);
    }
    let p = tmp("garbage.onnx");
    std::fs::write(&p, b"this is not a protobuf at all \xff\xff\xff\xff").unwrap();
    assert!(onnx::load(&p).is_err());
}

#[test]
fn missing_external_data_is_an_error() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models/resnet50_dynamo.onnx");
    let p = tmp("lonely_dynamo.onnx");
    std::fs::copy(&src, &p).unwrap();
    let err = onnx::load(&p).unwrap_err();
    assert!(err.to_string().contains(".onnx.data"), "{err}");
    // A short external data file.
    let data = std::fs::read(src.with_extension("onnx.data")).unwrap();
    std::fs::write(
        p.with_file_name("resnet50_dynamo.onnx.data"),
        &data[..data.len() / 2],
    )
    .unwrap();
    std::fs::copy(&src, p.with_file_name("resnet50_dynamo.onnx")).unwrap();
    let err = onnx::load(p.with_file_name("resnet50_dynamo.onnx")).unwrap_err();
    assert!(matches!(err, GraphError::Tensor { .. }), "{err}");
}

#[test]
fn unsupported_ops_are_all_listed() {
    let mut m = onnx::load(fixture()).unwrap();
    let mut proto = onnx::model_to_proto(&m);
    let g = proto.graph.as_mut().unwrap();
    g.node[0].op_type = "FancyConv".into();
    g.node[3].op_type = "MysteryOp".into();
    g.node[5].domain = "com.example".into();
    let p = tmp("unsupported.onnx");
    std::fs::write(&p, prost::Message::encode_to_vec(&proto)).unwrap();
    let err = onnx::load(&p).unwrap_err();
    let GraphError::Unsupported(list) = &err else {
        panic!("expected Unsupported, got {err}");
    };
    assert_eq!(list.len(), 3, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("FancyConv") && msg.contains("MysteryOp") && msg.contains("com.example"),
        "{msg}"
    );
    m.graph.nodes.clear();
}

#[test]
fn unsupported_ops_are_grouped_by_type() {
    let m = onnx::load(fixture()).unwrap();
    let mut proto = onnx::model_to_proto(&m);
    let g = proto.graph.as_mut().unwrap();
    for k in [1, 4, 6, 8, 10] {
        g.node[k].op_type = "MysteryOp".into();
    }
    g.node[2].op_type = "OtherOp".into();
    let p = tmp("unsupported_grouped.onnx");
    std::fs::write(&p, prost::Message::encode_to_vec(&proto)).unwrap();
    let msg = onnx::load(&p).unwrap_err().to_string();
    assert!(
        msg.starts_with("unsupported operators (6 nodes): "),
        "{msg}"
    );
    // One entry per type, in order of first use, three names and a count.
    assert_eq!(msg.matches("MysteryOp").count(), 1, "{msg}");
    assert!(
        msg.contains("MysteryOp: operator not supported (5 nodes: "),
        "{msg}"
    );
    assert!(
        msg.contains(" and 2 more); OtherOp: operator not supported (1 node: "),
        "{msg}"
    );
    assert!(
        msg.contains(&proto.graph.as_ref().unwrap().node[1].name),
        "{msg}"
    );
}

#[test]
fn save_roundtrip_is_identical() {
    let m = onnx::load(fixture()).unwrap();
    let p = tmp("roundtrip.onnx");
    onnx::save(&m, &p).unwrap();
    let back = onnx::load(&p).unwrap();
    assert_eq!(m.graph, back.graph);
    // Saving into a missing directory fails without leaving files behind.
    assert!(onnx::save(&m, "/nonexistent-dir/x.onnx").is_err());
}
