//! ONNX file I/O: protobuf decoding/encoding, tensors (inline, typed fields
//! and external data files), and conversion to and from the IR.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use prost::Message;

use crate::error::{invalid, GraphError, Result, UnsupportedOp};
use crate::ir::{Dim, Graph, Model, Node, ValueInfo};
use crate::ops::Op;
use crate::proto::*;
use crate::tensor::{tensor_err, DataType, Tensor};

/// Oldest default-domain opset accepted (attribute layouts before it differ).
pub const MIN_OPSET: i64 = 7;
/// Newest default-domain opset whose semantics qint8 implements.
pub const MAX_OPSET: i64 = 22;

/// Loads an ONNX model from a file. Weights stored in external data files
/// are read relative to the model's directory.
pub fn load(path: impl AsRef<Path>) -> Result<Model> {
    let path = path.as_ref();
    let bytes = read_file(path).map_err(|source| GraphError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    decode_owned(bytes, &dir, path)
}

/// The bytes of `path`: on Linux mapped read-only with every page mapped
/// up front (`MAP_POPULATE`), else (or where mapping fails) read. Reading
/// a 4.4 MB model took 3.4-3.7 ms, nearly all of it faulting in the fresh
/// buffer's pages; mapping the page cache takes about 0.4 ms. The model
/// copies every tensor out while decoding, so the mapping ends with
/// [`load`].
fn read_file(path: &Path) -> std::io::Result<prost::bytes::Bytes> {
    #[cfg(target_os = "linux")]
    if let Some(map) = mapped::Mapping::new(path)? {
        return Ok(prost::bytes::Bytes::from_owner(map));
    }
    std::fs::read(path).map(prost::bytes::Bytes::from)
}

#[cfg(target_os = "linux")]
mod mapped {
    use std::os::fd::AsRawFd;
    use std::path::Path;

    /// A read-only private mapping of a whole file, unmapped on drop.
    pub(super) struct Mapping {
        ptr: *mut libc::c_void,
        len: usize,
    }

    // SAFETY: the mapping is read-only and owned by this value alone.
    unsafe impl Send for Mapping {}
    // SAFETY: as above; shared access only reads.
    unsafe impl Sync for Mapping {}

    impl Mapping {
        /// Maps `path`, or `None` where it cannot be mapped (empty, not a
        /// regular file, or `mmap` refused): the caller reads it instead.
        pub(super) fn new(path: &Path) -> std::io::Result<Option<Mapping>> {
            let file = std::fs::File::open(path)?;
            let meta = file.metadata()?;
            let Ok(len) = usize::try_from(meta.len()) else {
                return Ok(None);
            };
            if !meta.is_file() || len == 0 {
                return Ok(None);
            }
            // SAFETY: a fresh read-only private mapping of an open file;
            // the result is checked before use. (A file truncated by
            // another process while mapped would fault on access, as with
            // any mapped read.)
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_POPULATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Ok(None);
            }
            Ok(Some(Mapping { ptr, len }))
        }
    }

    impl AsRef<[u8]> for Mapping {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: `ptr` maps `len` readable bytes until drop.
            unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: `ptr` and `len` are the mapping made in `new`.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// Decodes a model from bytes; `dir` resolves external data, `path` is used in messages.
pub fn decode_model(bytes: &[u8], dir: &Path, path: &Path) -> Result<Model> {
    decode_owned(prost::bytes::Bytes::copy_from_slice(bytes), dir, path)
}

/// [`decode_model`] from a buffer the tensors' raw data can share instead
/// of each copying its part (those copies were a tenth of the fixed cost
/// of `qint8 quantize` on the VGG-16-BN fixture).
fn decode_owned(bytes: prost::bytes::Bytes, dir: &Path, path: &Path) -> Result<Model> {
    let proto = ModelProto::decode(bytes).map_err(|e| GraphError::Decode {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    model_from_proto(proto, dir)
}

/// Saves a model with every tensor inline, atomically: the file is written
/// beside its destination and renamed into place, so a failure never leaves
/// a partial file.
pub fn save(model: &Model, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = model_to_proto(model).encode_to_vec();
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` whole or not at all
/// ([`crate::atomic::write_atomically`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic::write_atomically(path, |w| w.write_all(bytes)).map_err(|e| GraphError::Io {
        path: e.path,
        source: e.source,
    })
}

/// Reads external data files once each.
struct ExternalData {
    dir: PathBuf,
    files: HashMap<PathBuf, Vec<u8>>,
}

impl ExternalData {
    fn read(&mut self, tensor: &str, entries: &[StringStringEntryProto]) -> Result<Vec<u8>> {
        let get = |k: &str| {
            entries
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.as_str())
        };
        let location = get("location")
            .ok_or_else(|| tensor_err(tensor, "external data without a location"))?;
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(tensor_err(
                tensor,
                format!("external data location {location:?} must be a relative path inside the model's directory"),
            ));
        }
        let full = self.dir.join(rel);
        if !self.files.contains_key(&full) {
            let data = std::fs::read(&full).map_err(|source| GraphError::Io {
                path: full.clone(),
                source,
            })?;
            self.files.insert(full.clone(), data);
        }
        let data = &self.files[&full];
        let parse = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        tensor_err(tensor, format!("external data {k} {v:?} is not a number"))
                    })
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let length = parse("length")?.unwrap_or(data.len().saturating_sub(offset));
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                tensor_err(
                    tensor,
                    format!(
                        "external data [{offset}, {offset}+{length}) is past the end of {} ({} bytes)",
                        full.display(),
                        data.len()
                    ),
                )
            })?;
        Ok(data[offset..end].to_vec())
    }
}

/// Converts a `TensorProto` to a tensor (`dir` resolves external data; `None` forbids it).
pub fn tensor_from_proto(t: &TensorProto, dir: Option<&Path>) -> Result<Tensor> {
    let mut ext = dir.map(|d| ExternalData {
        dir: d.to_path_buf(),
        files: HashMap::new(),
    });
    tensor_from_proto_ext(t, ext.as_mut())
}

fn tensor_from_proto_ext(t: &TensorProto, ext: Option<&mut ExternalData>) -> Result<Tensor> {
    let name = t.name.as_str();
    let dtype = DataType::from_onnx(t.data_type).ok_or_else(|| {
        tensor_err(
            name,
            format!(
                "unsupported element type {} ({})",
                DataType::onnx_name(t.data_type),
                t.data_type
            ),
        )
    })?;
    let shape = t
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| tensor_err(name, format!("negative dimension {d}")))
        })
        .collect::<Result<Vec<_>>>()?;
    if t.data_location == 1 || !t.external_data.is_empty() {
        let ext = ext.ok_or_else(|| tensor_err(name, "external data is not allowed here"))?;
        let bytes = ext.read(name, &t.external_data)?;
        return Tensor::from_le_bytes(name, dtype, &shape, &bytes);
    }
    if !t.raw_data.is_empty() {
        return Tensor::from_le_bytes(name, dtype, &shape, &t.raw_data);
    }
    // Typed fields.
    let n: usize = shape.iter().product();
    let check = |got: usize| -> Result<()> {
        if got != n {
            Err(tensor_err(
                name,
                format!("shape {shape:?} holds {n} elements, data has {got}"),
            ))
        } else {
            Ok(())
        }
    };
    let dim = ndarray::IxDyn(&shape);
    let mk = |e: ndarray::ShapeError| tensor_err(name, e.to_string());
    Ok(match dtype {
        DataType::Float => {
            check(t.float_data.len())?;
            Tensor::F32(ndarray::ArrayD::from_shape_vec(dim, t.float_data.clone()).map_err(mk)?)
        }
        DataType::Int64 => {
            check(t.int64_data.len())?;
            Tensor::I64(ndarray::ArrayD::from_shape_vec(dim, t.int64_data.clone()).map_err(mk)?)
        }
        DataType::Int32 => {
            check(t.int32_data.len())?;
            Tensor::I32(ndarray::ArrayD::from_shape_vec(dim, t.int32_data.clone()).map_err(mk)?)
        }
        DataType::Int8 => {
            check(t.int32_data.len())?;
            Tensor::I8(
                ndarray::ArrayD::from_shape_vec(
                    dim,
                    t.int32_data.iter().map(|&v| v as i8).collect(),
                )
                .map_err(mk)?,
            )
        }
        DataType::Uint8 => {
            check(t.int32_data.len())?;
            Tensor::U8(
                ndarray::ArrayD::from_shape_vec(
                    dim,
                    t.int32_data.iter().map(|&v| v as u8).collect(),
                )
                .map_err(mk)?,
            )
        }
        DataType::Bool => {
            check(t.int32_data.len())?;
            Tensor::Bool(
                ndarray::ArrayD::from_shape_vec(
                    dim,
                    t.int32_data.iter().map(|&v| v != 0).collect(),
                )
                .map_err(mk)?,
            )
        }
    })
}

/// Converts a tensor to a `TensorProto` with inline `raw_data`.
pub fn tensor_to_proto(name: &str, t: &Tensor) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: t.dtype().to_onnx(),
        raw_data: t.to_le_bytes().into(),
        ..Default::default()
    }
}

fn value_info_from_proto(v: &ValueInfoProto) -> Result<ValueInfo> {
    let tt = v
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| invalid(format!("value {} is not a tensor", v.name)))?;
    let dtype = DataType::from_onnx(tt.elem_type).ok_or_else(|| {
        invalid(format!(
            "value {} has unsupported element type {}",
            v.name,
            DataType::onnx_name(tt.elem_type)
        ))
    })?;
    let shape = tt.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(DimensionValue::DimValue(n)) if *n >= 0 => Dim::Fixed(*n as usize),
                Some(DimensionValue::DimParam(p)) => Dim::Symbolic(p.clone()),
                _ => Dim::Symbolic(String::new()),
            })
            .collect()
    });
    Ok(ValueInfo {
        name: v.name.clone(),
        dtype,
        shape,
    })
}

fn value_info_to_proto(v: &ValueInfo) -> ValueInfoProto {
    ValueInfoProto {
        name: v.name.clone(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: v.dtype.to_onnx(),
                shape: v.shape.as_ref().map(|s| TensorShapeProto {
                    dim: s
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::Fixed(n) => DimensionValue::DimValue(*n as i64),
                                Dim::Symbolic(p) => DimensionValue::DimParam(p.clone()),
                            }),
                            denotation: String::new(),
                        })
                        .collect(),
                }),
            }),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

fn model_from_proto(proto: ModelProto, dir: &Path) -> Result<Model> {
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| invalid("the model imports no opset of the default ONNX domain"))?;
    let g = proto
        .graph
        .ok_or_else(|| invalid("the model has no graph"))?;
    let mut ext = ExternalData {
        dir: dir.to_path_buf(),
        files: HashMap::new(),
    };
    let mut initializers = BTreeMap::new();
    for t in &g.initializer {
        if t.name.is_empty() {
            return Err(invalid("an initializer has no name"));
        }
        initializers.insert(t.name.clone(), tensor_from_proto_ext(t, Some(&mut ext))?);
    }
    let inputs = g
        .input
        .iter()
        .filter(|v| !initializers.contains_key(&v.name))
        .map(value_info_from_proto)
        .collect::<Result<Vec<_>>>()?;
    let outputs = g
        .output
        .iter()
        .map(value_info_from_proto)
        .collect::<Result<Vec<_>>>()?;
    // value_info entries of unsupported types are hints only: skip them.
    let value_info = g
        .value_info
        .iter()
        .filter_map(|v| value_info_from_proto(v).ok())
        .collect();

    let mut unsupported = Vec::new();
    let mut nodes = Vec::with_capacity(g.node.len());
    let mut used_names = std::collections::HashSet::new();
    for (k, n) in g.node.iter().enumerate() {
        let mut name = if n.name.is_empty() {
            format!("{}_{k}", n.op_type)
        } else {
            n.name.clone()
        };
        if !used_names.insert(name.clone()) {
            name = format!("{name}_{k}");
            used_names.insert(name.clone());
        }
        let reason = if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            Some(format!("domain {:?} is not supported", n.domain))
        } else if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
            Some(format!(
                "opset {opset} is outside {MIN_OPSET}..={MAX_OPSET}"
            ))
        } else {
            None
        };
        let op = match reason {
            Some(r) => {
                unsupported.push(UnsupportedOp {
                    node: name,
                    op_type: op_label(n),
                    reason: r,
                });
                continue;
            }
            None => Op::from_proto(n, opset)?,
        };
        match op {
            Some(op) => nodes.push(Node {
                name,
                op,
                inputs: n.input.clone(),
                outputs: n.output.clone(),
            }),
            None => unsupported.push(UnsupportedOp {
                node: name,
                op_type: op_label(n),
                reason: "operator not supported".into(),
            }),
        }
    }
    if !unsupported.is_empty() {
        return Err(GraphError::Unsupported(unsupported));
    }
    let graph = Graph {
        name: g.name,
        inputs,
        outputs,
        nodes,
        initializers,
        value_info,
    };
    graph.validate()?;
    Ok(Model {
        graph,
        opset,
        ir_version: proto.ir_version,
        producer_name: proto.producer_name,
        producer_version: proto.producer_version,
    })
}

fn op_label(n: &NodeProto) -> String {
    if n.domain.is_empty() || n.domain == "ai.onnx" {
        n.op_type.clone()
    } else {
        format!("{}::{}", n.domain, n.op_type)
    }
}

/// Converts a model to its protobuf form (all tensors inline).
pub fn model_to_proto(m: &Model) -> ModelProto {
    let g = &m.graph;
    let mut input: Vec<ValueInfoProto> = g.inputs.iter().map(value_info_to_proto).collect();
    // IR < 4 requires initializers to be listed as inputs.
    if m.ir_version < 4 {
        for (name, t) in &g.initializers {
            input.push(value_info_to_proto(&ValueInfo {
                name: name.clone(),
                dtype: t.dtype(),
                shape: Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect()),
            }));
        }
    }
    ModelProto {
        ir_version: m.ir_version,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: m.opset,
        }],
        producer_name: m.producer_name.clone(),
        producer_version: m.producer_version.clone(),
        graph: Some(GraphProto {
            node: g
                .nodes
                .iter()
                .map(|n| NodeProto {
                    input: n.inputs.clone(),
                    output: n.outputs.clone(),
                    name: n.name.clone(),
                    op_type: n.op.op_type().to_string(),
                    attribute: n.op.to_attributes(),
                    ..Default::default()
                })
                .collect(),
            name: g.name.clone(),
            initializer: g
                .initializers
                .iter()
                .map(|(k, t)| tensor_to_proto(k, t))
                .collect(),
            input,
            output: g.outputs.iter().map(value_info_to_proto).collect(),
            value_info: g.value_info.iter().map(value_info_to_proto).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
