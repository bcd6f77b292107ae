//! NPY files, NumPy's single-array format (versions 1.0, 2.0 and 3.0).
//!
//! Layout: the magic `\x93NUMPY`, a major and minor version byte, the header
//! length (`u16` little-endian in 1.0, `u32` in 2.0 and 3.0), then a Python
//! dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded with
//! spaces and a newline, then the raw elements.
//!
//! Reading accepts `bool`, `u1`/`u2`/`u4`/`u8`, `i1`/`i2`/`i4`/`i8` and
//! `f2`/`f4`/`f8` in either byte order, C or Fortran order (Fortran data is
//! returned in standard row-major layout). Writing produces version 1.0
//! `<f4` in C order, the way `numpy.save` does, and replaces the target
//! atomically.
//!
//! Reference: <https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn, ShapeBuilder};

use crate::dataset::idx::MEMORY;
use crate::error::{io_error, CalibError, Result};

/// The six magic bytes every NPY file starts with.
pub const NPY_MAGIC: [u8; 6] = *b"\x93NUMPY";

/// The element kind and width of an NPY dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NpyElem {
    /// `b1`: one byte, 0 or nonzero.
    Bool,
    /// `u1`.
    U8,
    /// `u2`.
    U16,
    /// `u4`.
    U32,
    /// `u8`.
    U64,
    /// `i1`.
    I8,
    /// `i2`.
    I16,
    /// `i4`.
    I32,
    /// `i8`.
    I64,
    /// `f2`: IEEE half precision.
    F16,
    /// `f4`.
    F32,
    /// `f8`.
    F64,
}

impl NpyElem {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F16 | Self::F32 | Self::F64)
    }

    fn code(self) -> &'static str {
        match self {
            Self::Bool => "b1",
            Self::U8 => "u1",
            Self::U16 => "u2",
            Self::U32 => "u4",
            Self::U64 => "u8",
            Self::I8 => "i1",
            Self::I16 => "i2",
            Self::I32 => "i4",
            Self::I64 => "i8",
            Self::F16 => "f2",
            Self::F32 => "f4",
            Self::F64 => "f8",
        }
    }
}

/// An NPY dtype: element kind plus byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NpyDtype {
    /// Element kind and width.
    pub elem: NpyElem,
    /// Whether multi-byte elements are stored big-endian.
    pub big_endian: bool,
}

impl NpyDtype {
    /// Little-endian `f32`, the dtype this crate writes.
    pub const F32_LE: Self = Self {
        elem: NpyElem::F32,
        big_endian: false,
    };

    /// Parses a `descr` string such as `<f4`, `|u1` or `>i8`.
    ///
    /// `=` (native order) is the order of the machine running this code.
    /// Returns `None` for anything else (structured dtypes, objects, strings,
    /// complex numbers, dates).
    pub fn parse(descr: &str) -> Option<Self> {
        let mut chars = descr.chars();
        let order = chars.next()?;
        let big_endian = match order {
            '<' | '|' => false,
            '>' => true,
            '=' => cfg!(target_endian = "big"),
            _ => return None,
        };
        let elem = match chars.as_str() {
            "b1" | "?" => NpyElem::Bool,
            "u1" => NpyElem::U8,
            "u2" => NpyElem::U16,
            "u4" => NpyElem::U32,
            "u8" => NpyElem::U64,
            "i1" => NpyElem::I8,
            "i2" => NpyElem::I16,
            "i4" => NpyElem::I32,
            "i8" => NpyElem::I64,
            "f2" => NpyElem::F16,
            "f4" => NpyElem::F32,
            "f8" => NpyElem::F64,
            _ => return None,
        };
        Some(Self { elem, big_endian })
    }

    /// The `descr` string NumPy writes for this dtype (`<f4`, `|u1`, ...).
    pub fn descr(self) -> String {
        let order = if self.elem.size() == 1 {
            '|'
        } else if self.big_endian {
            '>'
        } else {
            '<'
        };
        format!("{order}{}", self.elem.code())
    }
}

/// The parsed header of an NPY file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Format version `(major, minor)`: `(1, 0)`, `(2, 0)` or `(3, 0)`.
    pub version: (u8, u8),
    /// The element type.
    pub dtype: NpyDtype,
    /// Whether the data is stored column-major.
    pub fortran_order: bool,
    /// The array's shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Byte offset of the first element.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Number of elements (product of `shape`; 1 for a scalar).
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads and parses only the header of an NPY file.
pub fn read_npy_header(path: impl AsRef<Path>) -> Result<NpyHeader> {
    use std::io::Read;
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| io_error(path, "opening", e))?;
    // Headers are small; 1 MiB bounds any sane v2/v3 header.
    let mut bytes = Vec::new();
    file.take(1 << 20)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, "reading", e))?;
    parse_header(&bytes, path)
}

/// Reads an NPY file and converts its elements to `f32`.
///
/// Integers wider than 24 bits and `f8` values are rounded to the nearest
/// `f32`. Fortran-ordered data is returned in standard (row-major) layout.
pub fn read_npy_f32(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| io_error(path, "reading", e))?;
    decode_f32(&bytes, path)
}

/// Reads an NPY file of integers (or bools) as `i64`.
///
/// Float dtypes give [`CalibError::DtypeMismatch`]; `u8` values above
/// `i64::MAX` give [`CalibError::ValueOutOfRange`].
pub fn read_npy_i64(path: impl AsRef<Path>) -> Result<ArrayD<i64>> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| io_error(path, "reading", e))?;
    decode_i64(&bytes, path)
}

/// Parses NPY bytes held in memory as `f32` (see [`read_npy_f32`]).
pub fn npy_f32_from_bytes(bytes: &[u8]) -> Result<ArrayD<f32>> {
    decode_f32(bytes, Path::new(MEMORY))
}

/// Parses NPY bytes held in memory as `i64` (see [`read_npy_i64`]).
pub fn npy_i64_from_bytes(bytes: &[u8]) -> Result<ArrayD<i64>> {
    decode_i64(bytes, Path::new(MEMORY))
}

/// Encodes an array as NPY version 1.0, `<f4`, C order, exactly as
/// `numpy.save` lays it out (header padded to a multiple of 64 bytes).
///
/// Elements are written in logical row-major order whatever the array's
/// memory layout. Headers too long for version 1.0 (arrays of very high
/// rank) switch to version 2.0.
pub fn encode_npy_f32<S, D>(array: &ArrayBase<S, D>) -> Vec<u8>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    let mut out = npy_f32_header(array.shape());
    out.reserve(array.len() * 4);
    match array.as_slice() {
        Some(s) => s
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        None => array
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out
}

/// Writes an array to `path` as NPY version 1.0, `<f4`, C order.
///
/// The file is written to a temporary file in the same directory and renamed
/// over `path` once complete, so `path` never holds a partial array: it keeps
/// its old contents (or stays absent) if anything fails.
pub fn write_npy_f32<S, D>(path: impl AsRef<Path>, array: &ArrayBase<S, D>) -> Result<()>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    let path = path.as_ref();
    let header = npy_f32_header(array.shape());
    write_atomically(path, |w| {
        w.write_all(&header)?;
        let mut buf = Vec::with_capacity(64 * 1024);
        let flush = |buf: &mut Vec<u8>, w: &mut BufWriter<File>| -> std::io::Result<()> {
            w.write_all(buf)?;
            buf.clear();
            Ok(())
        };
        for x in array.iter() {
            buf.extend_from_slice(&x.to_le_bytes());
            if buf.len() >= 64 * 1024 {
                flush(&mut buf, w)?;
            }
        }
        flush(&mut buf, w)
    })
}

/// Writes through `body` whole or not at all
/// ([`qint8_graph::atomic::write_atomically`]).
fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    // Io, not NotFound: a missing folder is not a missing input file.
    qint8_graph::atomic::write_atomically(path, body).map_err(|e| CalibError::Io {
        path: e.path,
        action: e.action,
        source: e.source,
    })
}

/// The full NPY preamble (magic, version, length, padded dict) for `<f4`.
fn npy_f32_header(shape: &[usize]) -> Vec<u8> {
    let shape_str = match shape {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_str}, }}",
        NpyDtype::F32_LE.descr()
    );
    // Version 1.0 has a 10-byte preamble and a u16 header length; 2.0 has
    // 12 bytes and a u32.
    let padded = |preamble: usize| (preamble + dict.len() + 1).div_ceil(64) * 64; // + '\n'
    let (version, preamble) = if padded(10) - 10 <= usize::from(u16::MAX) {
        (1u8, 10usize)
    } else {
        (2u8, 12usize)
    };
    let total = padded(preamble);
    let header_len = total - preamble;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&NPY_MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// Parses the preamble and header dict; `bytes` may hold just the header.
fn parse_header(bytes: &[u8], path: &Path) -> Result<NpyHeader> {
    let truncated = |expected: u64| CalibError::TruncatedHeader {
        path: path.to_path_buf(),
        format: "NPY",
        expected,
        got: bytes.len() as u64,
    };
    let magic_len = bytes.len().min(NPY_MAGIC.len());
    if bytes[..magic_len] != NPY_MAGIC[..magic_len] {
        return Err(CalibError::BadMagic {
            path: path.to_path_buf(),
            format: "NPY",
            expected: "93 4e 55 4d 50 59 (\\x93NUMPY)".into(),
            got: bytes[..magic_len]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
        });
    }
    if bytes.len() < 8 {
        return Err(truncated(10));
    }
    let version = (bytes[6], bytes[7]);
    let (header_len, preamble) = match version.0 {
        1 => {
            if bytes.len() < 10 {
                return Err(truncated(10));
            }
            (u64::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10u64)
        }
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(truncated(12));
            }
            let l = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (u64::from(l), 12u64)
        }
        _ => {
            return Err(CalibError::NpyHeader {
                path: path.to_path_buf(),
                offset: 6,
                reason: format!(
                    "unsupported format version {}.{} (supported: 1.0, 2.0, 3.0)",
                    version.0, version.1
                ),
            })
        }
    };
    let end = preamble + header_len;
    if (bytes.len() as u64) < end {
        return Err(truncated(end));
    }
    // `end` is now bounded by bytes.len().
    let raw = &bytes[preamble as usize..end as usize];
    // 1.0 and 2.0 headers are latin-1, 3.0 headers UTF-8.
    let text: String = if version.0 == 3 {
        match std::str::from_utf8(raw) {
            Ok(s) => s.to_string(),
            Err(e) => {
                return Err(CalibError::NpyHeader {
                    path: path.to_path_buf(),
                    offset: preamble + e.valid_up_to() as u64,
                    reason: "header of a version 3.0 file is not UTF-8".into(),
                })
            }
        }
    } else {
        raw.iter().map(|&b| char::from(b)).collect()
    };
    let dict = lit::parse(&text).map_err(|(pos, reason)| CalibError::NpyHeader {
        path: path.to_path_buf(),
        offset: preamble + byte_offset(&text, pos),
        reason,
    })?;
    let header_err = |reason: String| CalibError::NpyHeader {
        path: path.to_path_buf(),
        offset: preamble,
        reason,
    };
    let lit::Lit::Dict(entries) = dict else {
        return Err(header_err("the header is not a dict".into()));
    };
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| matches!(k, lit::Lit::Str(s) if s == key))
            .map(|(_, v)| v)
    };
    let descr = match get("descr") {
        Some(lit::Lit::Str(s)) => s.clone(),
        Some(other) => {
            return Err(CalibError::UnsupportedDtype {
                path: path.to_path_buf(),
                dtype: other.to_string(),
            })
        }
        None => return Err(header_err("missing key 'descr'".into())),
    };
    let fortran_order = match get("fortran_order") {
        Some(lit::Lit::Bool(b)) => *b,
        Some(other) => {
            return Err(header_err(format!(
                "'fortran_order' must be True or False, got {other}"
            )))
        }
        None => return Err(header_err("missing key 'fortran_order'".into())),
    };
    let shape_lit = match get("shape") {
        Some(lit::Lit::Tuple(items)) => items,
        Some(other) => return Err(header_err(format!("'shape' must be a tuple, got {other}"))),
        None => return Err(header_err("missing key 'shape'".into())),
    };
    let mut raw_shape = Vec::with_capacity(shape_lit.len());
    for item in shape_lit {
        match item {
            lit::Lit::Int(v) if *v >= 0 => match u64::try_from(*v) {
                Ok(d) => raw_shape.push(d),
                Err(_) => return Err(header_err(format!("'shape' entry {v} is too large"))),
            },
            other => {
                return Err(header_err(format!(
                    "'shape' entries must be non-negative integers, got {other}"
                )))
            }
        }
    }
    let dtype = NpyDtype::parse(&descr).ok_or_else(|| CalibError::UnsupportedDtype {
        path: path.to_path_buf(),
        dtype: descr.clone(),
    })?;
    let bad_dims = |reason: String| CalibError::BadDims {
        path: path.to_path_buf(),
        dims: raw_shape.clone(),
        reason,
    };
    let mut shape = Vec::with_capacity(raw_shape.len());
    for &d in &raw_shape {
        shape.push(usize::try_from(d).map_err(|_| bad_dims("dimension exceeds usize".into()))?);
    }
    raw_shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.elem.size() as u64))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad_dims("the byte size overflows".into()))?;
    Ok(NpyHeader {
        version,
        dtype,
        fortran_order,
        shape,
        data_offset: end as usize,
    })
}

/// Byte offset of the `pos`-th char of `text` (header chars are one byte in
/// 1.0/2.0, may be more in 3.0).
fn byte_offset(text: &str, pos: usize) -> u64 {
    text.char_indices().nth(pos).map_or(text.len(), |(i, _)| i) as u64
}

/// Parses the header and checks the data size; returns the header and the
/// data bytes.
fn split<'a>(bytes: &'a [u8], path: &Path) -> Result<(NpyHeader, &'a [u8])> {
    let header = parse_header(bytes, path)?;
    let data = &bytes[header.data_offset..];
    // parse_header checked this product for overflow.
    let expected = header.len() * header.dtype.elem.size();
    let offset = header.data_offset as u64;
    if data.len() < expected {
        return Err(CalibError::TruncatedData {
            path: path.to_path_buf(),
            offset,
            dims: header.shape.clone(),
            expected: expected as u64,
            got: data.len() as u64,
        });
    }
    if data.len() > expected {
        return Err(CalibError::TrailingData {
            path: path.to_path_buf(),
            offset,
            dims: header.shape.clone(),
            expected: expected as u64,
            extra: (data.len() - expected) as u64,
        });
    }
    Ok((header, data))
}

/// Reads element `N` bytes at a time in the file's byte order.
fn chunks<const N: usize>(data: &[u8], big_endian: bool) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(move |c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        if big_endian {
            a.reverse();
        }
        a // now little-endian
    })
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        0 => sign * (mant as f32) * (1.0 / 16_777_216.0), // 2^-24
        0x1f => {
            let bits = (u32::from(h & 0x8000) << 16) | 0x7f80_0000 | (mant << 13);
            f32::from_bits(bits)
        }
        _ => {
            let bits = (u32::from(h & 0x8000) << 16) | ((exp + 112) << 23) | (mant << 13);
            f32::from_bits(bits)
        }
    }
}

fn to_f32_vec(h: &NpyHeader, data: &[u8]) -> Vec<f32> {
    let be = h.dtype.big_endian;
    match h.dtype.elem {
        NpyElem::Bool => data.iter().map(|&b| f32::from(u8::from(b != 0))).collect(),
        NpyElem::U8 => data.iter().map(|&b| f32::from(b)).collect(),
        NpyElem::I8 => data.iter().map(|&b| f32::from(b as i8)).collect(),
        NpyElem::U16 => chunks::<2>(data, be)
            .map(|a| f32::from(u16::from_le_bytes(a)))
            .collect(),
        NpyElem::I16 => chunks::<2>(data, be)
            .map(|a| f32::from(i16::from_le_bytes(a)))
            .collect(),
        NpyElem::F16 => chunks::<2>(data, be)
            .map(|a| f16_to_f32(u16::from_le_bytes(a)))
            .collect(),
        NpyElem::U32 => chunks::<4>(data, be)
            .map(|a| u32::from_le_bytes(a) as f32)
            .collect(),
        NpyElem::I32 => chunks::<4>(data, be)
            .map(|a| i32::from_le_bytes(a) as f32)
            .collect(),
        NpyElem::F32 => chunks::<4>(data, be).map(f32::from_le_bytes).collect(),
        NpyElem::U64 => chunks::<8>(data, be)
            .map(|a| u64::from_le_bytes(a) as f32)
            .collect(),
        NpyElem::I64 => chunks::<8>(data, be)
            .map(|a| i64::from_le_bytes(a) as f32)
            .collect(),
        NpyElem::F64 => chunks::<8>(data, be)
            .map(|a| f64::from_le_bytes(a) as f32)
            .collect(),
    }
}

fn to_i64_vec(h: &NpyHeader, data: &[u8], path: &Path) -> Result<Vec<i64>> {
    let be = h.dtype.big_endian;
    Ok(match h.dtype.elem {
        NpyElem::Bool => data.iter().map(|&b| i64::from(b != 0)).collect(),
        NpyElem::U8 => data.iter().map(|&b| i64::from(b)).collect(),
        NpyElem::I8 => data.iter().map(|&b| i64::from(b as i8)).collect(),
        NpyElem::U16 => chunks::<2>(data, be)
            .map(|a| i64::from(u16::from_le_bytes(a)))
            .collect(),
        NpyElem::I16 => chunks::<2>(data, be)
            .map(|a| i64::from(i16::from_le_bytes(a)))
            .collect(),
        NpyElem::U32 => chunks::<4>(data, be)
            .map(|a| i64::from(u32::from_le_bytes(a)))
            .collect(),
        NpyElem::I32 => chunks::<4>(data, be)
            .map(|a| i64::from(i32::from_le_bytes(a)))
            .collect(),
        NpyElem::I64 => chunks::<8>(data, be).map(i64::from_le_bytes).collect(),
        NpyElem::U64 => {
            let mut out = Vec::with_capacity(h.len());
            for (index, a) in chunks::<8>(data, be).enumerate() {
                let v = u64::from_le_bytes(a);
                let v = i64::try_from(v).map_err(|_| CalibError::ValueOutOfRange {
                    path: path.to_path_buf(),
                    index,
                    value: v.to_string(),
                    target: "i64",
                })?;
                out.push(v);
            }
            out
        }
        NpyElem::F16 | NpyElem::F32 | NpyElem::F64 => {
            return Err(CalibError::DtypeMismatch {
                path: path.to_path_buf(),
                expected: "i64 (an integer or bool dtype)",
                got: h.dtype.descr(),
            })
        }
    })
}

/// Builds the array from file-order elements, honoring `fortran_order`.
fn shape_array<T: Clone>(h: &NpyHeader, values: Vec<T>) -> Result<ArrayD<T>> {
    let got = values.len();
    let mismatch = |_| CalibError::LengthMismatch {
        what: "NPY elements vs. product of shape",
        expected: h.len(),
        got,
    };
    if h.fortran_order {
        let a = ArrayD::from_shape_vec(IxDyn(&h.shape).f(), values).map_err(mismatch)?;
        Ok(a.as_standard_layout().into_owned())
    } else {
        ArrayD::from_shape_vec(IxDyn(&h.shape), values).map_err(mismatch)
    }
}

fn decode_f32(bytes: &[u8], path: &Path) -> Result<ArrayD<f32>> {
    let (h, data) = split(bytes, path)?;
    let values = to_f32_vec(&h, data);
    shape_array(&h, values)
}

fn decode_i64(bytes: &[u8], path: &Path) -> Result<ArrayD<i64>> {
    let (h, data) = split(bytes, path)?;
    let values = to_i64_vec(&h, data, path)?;
    shape_array(&h, values)
}

/// A tiny parser for the Python literals NPY headers use: dicts, tuples,
/// lists, strings, integers, `True`, `False` and `None`.
mod lit {
    use std::fmt;

    /// A Python literal.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Lit {
        Str(String),
        Int(i128),
        Bool(bool),
        None,
        Tuple(Vec<Lit>),
        List(Vec<Lit>),
        Dict(Vec<(Lit, Lit)>),
    }

    impl fmt::Display for Lit {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let seq = |f: &mut fmt::Formatter<'_>, items: &[Lit]| -> fmt::Result {
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                Ok(())
            };
            match self {
                Lit::Str(s) => write!(f, "'{s}'"),
                Lit::Int(v) => write!(f, "{v}"),
                Lit::Bool(true) => f.write_str("True"),
                Lit::Bool(false) => f.write_str("False"),
                Lit::None => f.write_str("None"),
                Lit::Tuple(items) => {
                    f.write_str("(")?;
                    seq(f, items)?;
                    if items.len() == 1 {
                        f.write_str(",")?;
                    }
                    f.write_str(")")
                }
                Lit::List(items) => {
                    f.write_str("[")?;
                    seq(f, items)?;
                    f.write_str("]")
                }
                Lit::Dict(entries) => {
                    f.write_str("{")?;
                    for (i, (k, v)) in entries.iter().enumerate() {
                        if i > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{k}: {v}")?;
                    }
                    f.write_str("}")
                }
            }
        }
    }

    /// Error: char position and reason.
    pub(super) type Error = (usize, String);

    const MAX_DEPTH: usize = 32;

    struct Parser {
        chars: Vec<char>,
        pos: usize,
    }

    /// Parses one literal filling all of `text` (surrounding whitespace allowed).
    pub(super) fn parse(text: &str) -> Result<Lit, Error> {
        let mut p = Parser {
            chars: text.chars().collect(),
            pos: 0,
        };
        let v = p.value(0)?;
        p.skip_ws();
        if p.pos < p.chars.len() {
            return Err((
                p.pos,
                format!("unexpected {:?} after the dict", p.chars[p.pos]),
            ));
        }
        Ok(v)
    }

    impl Parser {
        fn peek(&self) -> Option<char> {
            self.chars.get(self.pos).copied()
        }

        fn skip_ws(&mut self) {
            while self.peek().is_some_and(char::is_whitespace) {
                self.pos += 1;
            }
        }

        fn err<T>(&self, what: impl Into<String>) -> Result<T, Error> {
            Err((self.pos, what.into()))
        }

        fn value(&mut self, depth: usize) -> Result<Lit, Error> {
            if depth > MAX_DEPTH {
                return self.err("literal nested too deeply");
            }
            self.skip_ws();
            match self.peek() {
                None => self.err("unexpected end of header"),
                Some('{') => self.dict(depth),
                Some('(') => self.seq(')', depth).map(|(items, _)| Lit::Tuple(items)),
                Some('[') => self.seq(']', depth).map(|(items, _)| Lit::List(items)),
                Some(q @ ('\'' | '"')) => self.string(q),
                Some(c) if c == '-' || c == '+' || c.is_ascii_digit() => self.int(),
                Some(c) if c.is_ascii_alphabetic() => self.word(),
                Some(c) => self.err(format!("unexpected {c:?}")),
            }
        }

        fn dict(&mut self, depth: usize) -> Result<Lit, Error> {
            self.pos += 1; // '{'
            let mut entries = Vec::new();
            loop {
                self.skip_ws();
                if self.peek() == Some('}') {
                    self.pos += 1;
                    return Ok(Lit::Dict(entries));
                }
                let key = self.value(depth + 1)?;
                self.skip_ws();
                if self.peek() != Some(':') {
                    return self.err("expected ':' after a dict key");
                }
                self.pos += 1;
                let value = self.value(depth + 1)?;
                entries.push((key, value));
                self.skip_ws();
                match self.peek() {
                    Some(',') => self.pos += 1,
                    Some('}') => {}
                    _ => return self.err("expected ',' or '}' in dict"),
                }
            }
        }

        /// Items of a tuple or list; the bool says whether a trailing comma
        /// was present.
        fn seq(&mut self, close: char, depth: usize) -> Result<(Vec<Lit>, bool), Error> {
            self.pos += 1; // '(' or '['
            let mut items = Vec::new();
            let mut trailing = false;
            loop {
                self.skip_ws();
                if self.peek() == Some(close) {
                    self.pos += 1;
                    return Ok((items, trailing));
                }
                items.push(self.value(depth + 1)?);
                trailing = false;
                self.skip_ws();
                match self.peek() {
                    Some(',') => {
                        self.pos += 1;
                        trailing = true;
                    }
                    Some(c) if c == close => {}
                    _ => return self.err(format!("expected ',' or '{close}'")),
                }
            }
        }

        fn string(&mut self, quote: char) -> Result<Lit, Error> {
            let start = self.pos;
            self.pos += 1;
            let mut s = String::new();
            loop {
                match self.peek() {
                    None => return Err((start, "unterminated string".into())),
                    Some('\\') => {
                        self.pos += 1;
                        match self.peek() {
                            None => return Err((start, "unterminated string".into())),
                            Some(c) => s.push(c),
                        }
                        self.pos += 1;
                    }
                    Some(c) if c == quote => {
                        self.pos += 1;
                        return Ok(Lit::Str(s));
                    }
                    Some(c) => {
                        s.push(c);
                        self.pos += 1;
                    }
                }
            }
        }

        fn int(&mut self) -> Result<Lit, Error> {
            let start = self.pos;
            let neg = match self.peek() {
                Some('-') => {
                    self.pos += 1;
                    true
                }
                Some('+') => {
                    self.pos += 1;
                    false
                }
                _ => false,
            };
            let digits_start = self.pos;
            let mut v: i128 = 0;
            while let Some(d) = self.peek().and_then(|c| c.to_digit(10)) {
                v = match v.checked_mul(10).and_then(|v| v.checked_add(i128::from(d))) {
                    Some(v) => v,
                    None => return Err((start, "integer too large".into())),
                };
                self.pos += 1;
            }
            if self.pos == digits_start {
                return Err((start, "expected digits".into()));
            }
            // Python 2 era headers write longs as `3L`.
            if matches!(self.peek(), Some('L' | 'l')) {
                self.pos += 1;
            }
            if self.peek().is_some_and(|c| c.is_alphanumeric() || c == '.') {
                return self.err("only integers are allowed here");
            }
            Ok(Lit::Int(if neg { -v } else { v }))
        }

        fn word(&mut self) -> Result<Lit, Error> {
            let start = self.pos;
            while self
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                self.pos += 1;
            }
            let w: String = self.chars[start..self.pos].iter().collect();
            match w.as_str() {
                "True" => Ok(Lit::Bool(true)),
                "False" => Ok(Lit::Bool(false)),
                "None" => Ok(Lit::None),
                _ => Err((start, format!("unknown name {w:?}"))),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_numpy_header() {
            let v =
                parse("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }   \n").unwrap();
            assert_eq!(
                v,
                Lit::Dict(vec![
                    (Lit::Str("descr".into()), Lit::Str("<f4".into())),
                    (Lit::Str("fortran_order".into()), Lit::Bool(false)),
                    (
                        Lit::Str("shape".into()),
                        Lit::Tuple(vec![Lit::Int(2), Lit::Int(3)])
                    ),
                ])
            );
        }

        #[test]
        fn parses_py2_longs_and_singletons() {
            assert_eq!(parse("(3L,)").unwrap(), Lit::Tuple(vec![Lit::Int(3)]));
            assert_eq!(parse("()").unwrap(), Lit::Tuple(vec![]));
        }

        #[test]
        fn rejects_garbage() {
            assert!(parse("{'a': }").is_err());
            assert!(parse("{'a': 1").is_err());
            assert!(parse("{'a': 1} x").is_err());
            assert!(parse("'abc").is_err());
            assert!(parse("{'a': 1.5}").is_err());
            assert!(parse("{'a': foo}").is_err());
            assert!(parse(&"(".repeat(100)).is_err());
            assert!(parse("99999999999999999999999999999999999999999999").is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_padded_like_numpy() {
        let h = npy_f32_header(&[2, 3]);
        assert_eq!(h.len(), 128); // 10 + 60-char dict + newline, rounded up to 64
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 118); // 128 - 10
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(text.ends_with(" \n"));
        assert!(npy_f32_header(&[5])[10..]
            .starts_with(b"{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }"));
        assert!(npy_f32_header(&[])[10..]
            .starts_with(b"{'descr': '<f4', 'fortran_order': False, 'shape': (), }"));
    }

    #[test]
    fn dtype_descr_round_trips() {
        for d in [
            "<f4", ">f8", "|u1", "|i1", "<i8", ">i2", "<f2", "|b1", "<u8",
        ] {
            assert_eq!(NpyDtype::parse(d).unwrap().descr(), d);
        }
        assert_eq!(NpyDtype::parse("<c8"), None);
        assert_eq!(NpyDtype::parse("O"), None);
        assert_eq!(NpyDtype::parse(""), None);
    }

    #[test]
    fn half_floats() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }
}
