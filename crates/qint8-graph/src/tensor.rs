//! Tensors held by a graph (initializers, constants) and their element types.

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use crate::error::{GraphError, Result};

/// ONNX element types qint8 handles (values of `TensorProto.DataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// `FLOAT` (1).
    Float,
    /// `UINT8` (2).
    Uint8,
    /// `INT8` (3).
    Int8,
    /// `INT32` (6).
    Int32,
    /// `INT64` (7).
    Int64,
    /// `BOOL` (9).
    Bool,
}

impl DataType {
    /// From the ONNX enum value.
    pub fn from_onnx(v: i32) -> Option<DataType> {
        Some(match v {
            1 => DataType::Float,
            2 => DataType::Uint8,
            3 => DataType::Int8,
            6 => DataType::Int32,
            7 => DataType::Int64,
            9 => DataType::Bool,
            _ => return None,
        })
    }

    /// The ONNX enum value.
    pub fn to_onnx(self) -> i32 {
        match self {
            DataType::Float => 1,
            DataType::Uint8 => 2,
            DataType::Int8 => 3,
            DataType::Int32 => 6,
            DataType::Int64 => 7,
            DataType::Bool => 9,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Float | DataType::Int32 => 4,
            DataType::Int64 => 8,
            DataType::Uint8 | DataType::Int8 | DataType::Bool => 1,
        }
    }

    /// ONNX name of an element type number, for error messages.
    pub fn onnx_name(v: i32) -> &'static str {
        match v {
            0 => "UNDEFINED",
            1 => "FLOAT",
            2 => "UINT8",
            3 => "INT8",
            4 => "UINT16",
            5 => "INT16",
            6 => "INT32",
            7 => "INT64",
            8 => "STRING",
            9 => "BOOL",
            10 => "FLOAT16",
            11 => "DOUBLE",
            12 => "UINT32",
            13 => "UINT64",
            16 => "BFLOAT16",
            _ => "unknown",
        }
    }
}

/// A dense tensor of one of the supported element types.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// f32.
    F32(ArrayD<f32>),
    /// u8.
    U8(ArrayD<u8>),
    /// i8.
    I8(ArrayD<i8>),
    /// i32.
    I32(ArrayD<i32>),
    /// i64.
    I64(ArrayD<i64>),
    /// bool.
    Bool(ArrayD<bool>),
}

macro_rules! each {
    ($t:expr, $a:ident => $e:expr) => {
        match $t {
            Tensor::F32($a) => $e,
            Tensor::U8($a) => $e,
            Tensor::I8($a) => $e,
            Tensor::I32($a) => $e,
            Tensor::I64($a) => $e,
            Tensor::Bool($a) => $e,
        }
    };
}

impl Tensor {
    /// Element type.
    pub fn dtype(&self) -> DataType {
        match self {
            Tensor::F32(_) => DataType::Float,
            Tensor::U8(_) => DataType::Uint8,
            Tensor::I8(_) => DataType::Int8,
            Tensor::I32(_) => DataType::Int32,
            Tensor::I64(_) => DataType::Int64,
            Tensor::Bool(_) => DataType::Bool,
        }
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        each!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each!(self, a => a.len())
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the data in bytes.
    pub fn byte_size(&self) -> usize {
        self.len() * self.dtype().size()
    }

    /// A scalar f32 tensor.
    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// A 1-D i64 tensor.
    pub fn vec_i64(v: &[i64]) -> Tensor {
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap_or_default())
    }

    /// The f32 data, if this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// Integer elements widened to i64 (for shape-like tensors).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            Tensor::I64(a) => a.iter().copied().collect(),
            Tensor::I32(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::U8(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::I8(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::Bool(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::F32(_) => return None,
        })
    }

    /// Elements converted to f32 (integers exactly where representable).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            // A contiguous array copies as one slice; ndarray's element
            // iterator costs several times more on large weights.
            Tensor::F32(a) => a
                .as_slice()
                .map_or_else(|| a.iter().copied().collect(), <[f32]>::to_vec),
            Tensor::U8(a) => converted(a, |v| v as f32),
            Tensor::I8(a) => converted(a, |v| v as f32),
            Tensor::I32(a) => converted(a, |v| v as f32),
            Tensor::I64(a) => converted(a, |v| v as f32),
            Tensor::Bool(a) => converted(a, |v| v as u8 as f32),
        }
    }

    /// Little-endian raw bytes, as ONNX `raw_data` stores them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Tensor::F32(a) => le_bytes(a, f32::to_le_bytes),
            Tensor::U8(a) => le_bytes(a, |v| [v]),
            Tensor::I8(a) => le_bytes(a, i8::to_le_bytes),
            Tensor::I32(a) => le_bytes(a, i32::to_le_bytes),
            Tensor::I64(a) => le_bytes(a, i64::to_le_bytes),
            Tensor::Bool(a) => le_bytes(a, |v| [v as u8]),
        }
    }

    /// Builds a tensor from little-endian bytes.
    pub fn from_le_bytes(
        name: &str,
        dtype: DataType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Tensor> {
        let n: usize = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tensor_err(name, format!("shape {shape:?} overflows")))?;
        let expect = n
            .checked_mul(dtype.size())
            .ok_or_else(|| tensor_err(name, format!("shape {shape:?} overflows")))?;
        if bytes.len() != expect {
            return Err(tensor_err(
                name,
                format!(
                    "shape {shape:?} of {dtype:?} needs {expect} bytes, data has {}",
                    bytes.len()
                ),
            ));
        }
        let dim = IxDyn(shape);
        let mk = |e: ndarray::ShapeError| tensor_err(name, e.to_string());
        Ok(match dtype {
            DataType::Float => Tensor::F32(
                ArrayD::from_shape_vec(
                    dim,
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
                .map_err(mk)?,
            ),
            DataType::Uint8 => Tensor::U8(ArrayD::from_shape_vec(dim, bytes.to_vec()).map_err(mk)?),
            DataType::Int8 => Tensor::I8(
                ArrayD::from_shape_vec(dim, bytes.iter().map(|&b| b as i8).collect())
                    .map_err(mk)?,
            ),
            DataType::Int32 => Tensor::I32(
                ArrayD::from_shape_vec(
                    dim,
                    bytes
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
                .map_err(mk)?,
            ),
            DataType::Int64 => Tensor::I64(
                ArrayD::from_shape_vec(
                    dim,
                    bytes
                        .chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                )
                .map_err(mk)?,
            ),
            DataType::Bool => Tensor::Bool(
                ArrayD::from_shape_vec(dim, bytes.iter().map(|&b| b != 0).collect()).map_err(mk)?,
            ),
        })
    }
}

pub(crate) fn tensor_err(name: &str, detail: impl Into<String>) -> GraphError {
    GraphError::Tensor {
        name: name.to_string(),
        detail: detail.into(),
    }
}

/// `a`'s elements in logical order, each as `N` bytes. A contiguous array
/// is read as one slice: ndarray's element iterator costs several times
/// more on large initializers.
fn le_bytes<T: Copy, const N: usize>(a: &ArrayD<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = vec![0u8; a.len() * N];
    match a.as_slice() {
        Some(s) => out
            .chunks_exact_mut(N)
            .zip(s)
            .for_each(|(o, &v)| o.copy_from_slice(&f(v))),
        None => out
            .chunks_exact_mut(N)
            .zip(a.iter())
            .for_each(|(o, &v)| o.copy_from_slice(&f(v))),
    }
    out
}

/// Every element of `a` through `f`, in logical order: a contiguous
/// array as one slice (which vectorizes), any other element by element.
fn converted<T: Copy>(a: &ArrayD<T>, f: impl Fn(T) -> f32) -> Vec<f32> {
    match a.as_slice() {
        Some(s) => s.iter().map(|&v| f(v)).collect(),
        None => a.iter().map(|&v| f(v)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::Tensor;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn to_f32_vec_reads_logical_order_whatever_the_layout() {
        let a =
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(
            Tensor::F32(a.clone()).to_f32_vec(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        // A transposed (column-major) array has no standard-layout slice.
        let t = a.clone().reversed_axes();
        assert!(t.as_slice().is_none());
        assert_eq!(
            Tensor::F32(t.clone()).to_f32_vec(),
            [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
        // Integer tensors too, through their slice or element by element.
        let i = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0i8, -1, 2, -3, 4, -5]).unwrap();
        assert_eq!(
            Tensor::I8(i.clone()).to_f32_vec(),
            [0.0, -1.0, 2.0, -3.0, 4.0, -5.0]
        );
        assert_eq!(
            Tensor::I8(i.reversed_axes()).to_f32_vec(),
            [0.0, -3.0, -1.0, 4.0, 2.0, -5.0]
        );
        let bytes = |t: &ArrayD<f32>| Tensor::F32(t.clone()).to_le_bytes();
        assert_eq!(bytes(&a)[4..8], 1.0f32.to_le_bytes());
        assert_eq!(bytes(&t)[4..8], 3.0f32.to_le_bytes());
        assert_eq!(bytes(&t).len(), 24);
        let i = ArrayD::from_shape_vec(IxDyn(&[2]), vec![-2i64, 7]).unwrap();
        assert_eq!(Tensor::I64(i).to_le_bytes()[8..], 7i64.to_le_bytes());
    }
}
