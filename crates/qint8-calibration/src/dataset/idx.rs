//! IDX files, the format of MNIST and Fashion-MNIST.
//!
//! Layout (all integers big-endian): the magic `0x00 0x00 <type> <ndims>`,
//! then `ndims` `u32` dimensions, then the elements in row-major order.
//! Element types: `0x08` u8, `0x09` i8, `0x0B` i16, `0x0C` i32, `0x0D` f32,
//! `0x0E` f64. Files starting with the gzip magic `1f 8b` are decompressed on
//! the fly (`t10k-images-idx3-ubyte.gz` reads like its uncompressed twin).
//!
//! Sizes from the header are checked against the data actually present
//! before anything is allocated from them.
//!
//! Reference: <http://yann.lecun.com/exdb/mnist/> (section "file formats").

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::dataset::Images;
use crate::error::{io_error, CalibError, Result};

/// The path used in errors for data that did not come from a file.
pub(crate) const MEMORY: &str = "<memory>";

/// Largest ratio deflate can reach (about 1032:1), plus slack; a gzip file of
/// `n` bytes cannot decompress to more than `n * MAX_GZIP_RATIO` bytes.
const MAX_GZIP_RATIO: u64 = 1040;

/// Element type of an IDX file (third byte of the magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdxType {
    /// `0x08`: unsigned byte.
    U8,
    /// `0x09`: signed byte.
    I8,
    /// `0x0B`: big-endian `i16`.
    I16,
    /// `0x0C`: big-endian `i32`.
    I32,
    /// `0x0D`: big-endian IEEE `f32`.
    F32,
    /// `0x0E`: big-endian IEEE `f64`.
    F64,
}

impl IdxType {
    /// The type for an IDX type byte, or `None` for an unknown byte.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x08 => Self::U8,
            0x09 => Self::I8,
            0x0B => Self::I16,
            0x0C => Self::I32,
            0x0D => Self::F32,
            0x0E => Self::F64,
            _ => return None,
        })
    }

    /// The IDX type byte of this type.
    pub fn code(self) -> u8 {
        match self {
            Self::U8 => 0x08,
            Self::I8 => 0x09,
            Self::I16 => 0x0B,
            Self::I32 => 0x0C,
            Self::F32 => 0x0D,
            Self::F64 => 0x0E,
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 => 2,
            Self::I32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    /// The Rust name of the element type (`"u8"`, `"f32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::I16 => "i16",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::F64 => "f64",
        }
    }
}

impl std::fmt::Display for IdxType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The elements of an IDX file, in its own type, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum IdxData {
    /// Type `0x08`.
    U8(Vec<u8>),
    /// Type `0x09`.
    I8(Vec<i8>),
    /// Type `0x0B`.
    I16(Vec<i16>),
    /// Type `0x0C`.
    I32(Vec<i32>),
    /// Type `0x0D`.
    F32(Vec<f32>),
    /// Type `0x0E`.
    F64(Vec<f64>),
}

impl IdxData {
    /// The element type.
    pub fn elem_type(&self) -> IdxType {
        match self {
            Self::U8(_) => IdxType::U8,
            Self::I8(_) => IdxType::I8,
            Self::I16(_) => IdxType::I16,
            Self::I32(_) => IdxType::I32,
            Self::F32(_) => IdxType::F32,
            Self::F64(_) => IdxType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An array read from an IDX file.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    /// The dimensions from the header (outermost first).
    pub dims: Vec<usize>,
    /// The elements; `data.len()` is the product of `dims`.
    pub data: IdxData,
}

impl IdxArray {
    /// Parses an IDX file held in memory (gzip-compressed or not).
    ///
    /// Errors name the path `<memory>`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let path = Path::new(MEMORY);
        if bytes.starts_with(&GZIP_MAGIC) {
            let len = bytes.len() as u64;
            parse_stream(MultiGzDecoder::new(bytes), path, Source::Gzip { len })
        } else {
            let len = bytes.len() as u64;
            parse_stream(bytes, path, Source::Raw { len })
        }
    }

    /// The element type.
    pub fn elem_type(&self) -> IdxType {
        self.data.elem_type()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there are no elements (some dimension is zero).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The elements converted to `f32` (exact for all types but `i32` beyond
    /// 2^24 and `f64`, which are rounded).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            IdxData::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            IdxData::I8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            IdxData::I16(v) => v.iter().map(|&x| f32::from(x)).collect(),
            IdxData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            IdxData::F32(v) => v.clone(),
            IdxData::F64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The elements converted to `i64`, or `None` for the float types.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        Some(match &self.data {
            IdxData::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            IdxData::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            IdxData::I16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            IdxData::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            IdxData::F32(_) | IdxData::F64(_) => return None,
        })
    }

    /// The array as an `f32` ndarray with shape `dims`.
    pub fn to_array_f32(&self) -> Result<ndarray::ArrayD<f32>> {
        let data = self.to_f32();
        let got = data.len();
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.dims), data).map_err(|_| {
            CalibError::LengthMismatch {
                what: "IDX elements vs. product of dims",
                expected: self.dims.iter().product(),
                got,
            }
        })
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Where the bytes come from, for size checks.
#[derive(Clone, Copy)]
enum Source {
    /// Uncompressed, `len` bytes in total.
    Raw { len: u64 },
    /// Gzip-compressed, `len` compressed bytes in total.
    Gzip { len: u64 },
}

impl Source {
    fn is_gzip(self) -> bool {
        matches!(self, Source::Gzip { .. })
    }
}

/// Opens `path`, returning a reader over its (decompressed) contents.
fn open(path: &Path) -> Result<(Box<dyn Read>, Source)> {
    let mut file = File::open(path).map_err(|e| io_error(path, "opening", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_error(path, "reading metadata of", e))?
        .len();
    let mut prefix = [0u8; 2];
    let n = read_full(&mut file, &mut prefix).map_err(|e| io_error(path, "reading", e))?;
    let head = Cursor::new(prefix[..n].to_vec());
    let chained = head.chain(file);
    if n == 2 && prefix == GZIP_MAGIC {
        let reader = MultiGzDecoder::new(io::BufReader::new(chained));
        Ok((Box::new(reader), Source::Gzip { len }))
    } else {
        Ok((Box::new(io::BufReader::new(chained)), Source::Raw { len }))
    }
}

/// Reads until `buf` is full or the end of the stream; returns bytes read.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads an IDX file (optionally gzip-compressed) into an [`IdxArray`].
///
/// Errors: [`CalibError::NotFound`], [`CalibError::TruncatedHeader`],
/// [`CalibError::BadMagic`], [`CalibError::UnsupportedIdxType`],
/// [`CalibError::BadDims`], [`CalibError::TruncatedData`],
/// [`CalibError::TrailingData`], [`CalibError::Gzip`].
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let (reader, source) = open(path)?;
    parse_stream(reader, path, source)
}

/// Reads an IDX file of `u8` images: dims `(N, H, W)` (one channel) or
/// `(N, H, W, C)` (channels last).
pub fn read_idx_images(path: impl AsRef<Path>) -> Result<Images> {
    let path = path.as_ref();
    let arr = read_idx(path)?;
    images_from_idx(arr, path)
}

/// Reads an IDX file of `u8` labels: dims `(N)`.
pub fn read_idx_labels(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let arr = read_idx(path)?;
    labels_from_idx(arr, path)
}

pub(crate) fn images_from_idx(arr: IdxArray, path: &Path) -> Result<Images> {
    let IdxArray { dims, data } = arr;
    let (n, h, w, c) = match dims[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] => (n, h, w, c),
        _ => {
            return Err(CalibError::BadShape {
                path: path.to_path_buf(),
                expected: "3 or 4 dims (N, H, W[, C]) for images",
                got: dims,
            })
        }
    };
    match data {
        IdxData::U8(pixels) => Images::new(n, h, w, c, pixels),
        other => Err(CalibError::DtypeMismatch {
            path: path.to_path_buf(),
            expected: "u8 images",
            got: other.elem_type().to_string(),
        }),
    }
}

pub(crate) fn labels_from_idx(arr: IdxArray, path: &Path) -> Result<Vec<u8>> {
    let IdxArray { dims, data } = arr;
    if dims.len() != 1 {
        return Err(CalibError::BadShape {
            path: path.to_path_buf(),
            expected: "1 dim (N) for labels",
            got: dims,
        });
    }
    match data {
        IdxData::U8(labels) => Ok(labels),
        other => Err(CalibError::DtypeMismatch {
            path: path.to_path_buf(),
            expected: "u8 labels",
            got: other.elem_type().to_string(),
        }),
    }
}

/// Maps a read error: gzip decoding errors become [`CalibError::Gzip`].
fn read_err(path: &Path, source: Source, offset: u64, e: io::Error) -> CalibError {
    if source.is_gzip() {
        CalibError::Gzip {
            path: path.to_path_buf(),
            offset,
            source: e,
        }
    } else {
        io_error(path, "reading", e)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_stream<R: Read>(mut r: R, path: &Path, source: Source) -> Result<IdxArray> {
    let trunc_header = |expected: u64, got: u64| CalibError::TruncatedHeader {
        path: path.to_path_buf(),
        format: "IDX",
        expected,
        got,
    };

    let mut magic = [0u8; 4];
    let n = read_full(&mut r, &mut magic).map_err(|e| read_err(path, source, 0, e))?;
    if n < 4 {
        // Report a wrong magic in the bytes we have before the truncation.
        if magic[..n.min(2)].iter().any(|&b| b != 0) {
            return Err(CalibError::BadMagic {
                path: path.to_path_buf(),
                format: "IDX",
                expected: "00 00 <type> <ndims>".into(),
                got: hex(&magic[..n]),
            });
        }
        return Err(trunc_header(4, n as u64));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(CalibError::BadMagic {
            path: path.to_path_buf(),
            format: "IDX",
            expected: "00 00 <type> <ndims>".into(),
            got: hex(&magic),
        });
    }
    let elem = IdxType::from_code(magic[2]).ok_or_else(|| CalibError::UnsupportedIdxType {
        path: path.to_path_buf(),
        code: magic[2],
    })?;
    let ndims = usize::from(magic[3]);
    if ndims == 0 {
        return Err(CalibError::BadDims {
            path: path.to_path_buf(),
            dims: Vec::new(),
            reason: "an IDX file needs at least one dimension".into(),
        });
    }
    let header_len = 4 + 4 * ndims as u64;
    let mut dim_bytes = vec![0u8; 4 * ndims]; // at most 1020 bytes
    let n = read_full(&mut r, &mut dim_bytes).map_err(|e| read_err(path, source, 4, e))?;
    if n < dim_bytes.len() {
        return Err(trunc_header(header_len, 4 + n as u64));
    }
    let raw_dims: Vec<u64> = dim_bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let bad_dims = |reason: String| CalibError::BadDims {
        path: path.to_path_buf(),
        dims: raw_dims.clone(),
        reason,
    };

    // Element count and byte size, checked for overflow.
    let count = raw_dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad_dims("the element count overflows 64 bits".into()))?;
    let expected = count
        .checked_mul(elem.size() as u64)
        .ok_or_else(|| bad_dims("the byte size overflows 64 bits".into()))?;
    let expected_usize = usize::try_from(expected).map_err(|_| {
        bad_dims(format!(
            "{expected} bytes do not fit in memory on this platform"
        ))
    })?;
    let dims: Vec<usize> = raw_dims.iter().map(|&d| d as usize).collect();

    let bytes = match source {
        Source::Raw { len } => {
            let available = len.saturating_sub(header_len);
            if expected > available {
                return Err(CalibError::TruncatedData {
                    path: path.to_path_buf(),
                    offset: header_len,
                    dims,
                    expected,
                    got: available,
                });
            }
            if expected < available {
                return Err(CalibError::TrailingData {
                    path: path.to_path_buf(),
                    offset: header_len,
                    dims,
                    expected,
                    extra: available - expected,
                });
            }
            // `expected` is now bounded by the file size.
            let mut buf = vec![0u8; expected_usize];
            let got =
                read_full(&mut r, &mut buf).map_err(|e| read_err(path, source, header_len, e))?;
            if got < expected_usize {
                // The file shrank while we read it.
                return Err(CalibError::TruncatedData {
                    path: path.to_path_buf(),
                    offset: header_len,
                    dims,
                    expected,
                    got: got as u64,
                });
            }
            buf
        }
        Source::Gzip { len } => {
            let max = len.saturating_mul(MAX_GZIP_RATIO);
            if expected > max {
                return Err(bad_dims(format!(
                    "they need {expected} data bytes, but a gzip file of {len} bytes \
                     decompresses to at most about {max}"
                )));
            }
            // Grow as data actually arrives; start from a modest guess.
            let initial = expected.min(len.saturating_mul(8)).min(1 << 28) as usize;
            let mut buf = Vec::with_capacity(initial);
            // One byte more than needed, to detect trailing data and to make
            // the decoder reach the end of the stream and check its CRC.
            (&mut r)
                .take(expected.saturating_add(1))
                .read_to_end(&mut buf)
                .map_err(|e| read_err(path, source, header_len + buf.len() as u64, e))?;
            let got = buf.len() as u64;
            if got < expected {
                return Err(CalibError::TruncatedData {
                    path: path.to_path_buf(),
                    offset: header_len,
                    dims,
                    expected,
                    got,
                });
            }
            if got > expected {
                let rest = io::copy(&mut r, &mut io::sink())
                    .map_err(|e| read_err(path, source, header_len + got, e))?;
                return Err(CalibError::TrailingData {
                    path: path.to_path_buf(),
                    offset: header_len,
                    dims,
                    expected,
                    extra: 1 + rest,
                });
            }
            buf
        }
    };

    let data = decode(elem, bytes);
    Ok(IdxArray { dims, data })
}

fn decode(elem: IdxType, bytes: Vec<u8>) -> IdxData {
    match elem {
        IdxType::U8 => IdxData::U8(bytes),
        IdxType::I8 => IdxData::I8(bytes.iter().map(|&b| b as i8).collect()),
        IdxType::I16 => IdxData::I16(
            bytes
                .chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect(),
        ),
        IdxType::I32 => IdxData::I32(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        IdxType::F32 => IdxData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        IdxType::F64 => IdxData::F64(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
    }
}

/// Encodes an array as uncompressed IDX bytes (header + big-endian data).
///
/// Fails with [`CalibError::BadDims`] if there are more than 255 dims or a
/// dim exceeds `u32::MAX`, and with [`CalibError::LengthMismatch`] if the
/// data length is not the product of the dims.
pub fn encode_idx(array: &IdxArray) -> Result<Vec<u8>> {
    let path = Path::new(MEMORY);
    let raw_dims: Vec<u64> = array.dims.iter().map(|&d| d as u64).collect();
    if array.dims.is_empty() || array.dims.len() > 255 {
        return Err(CalibError::BadDims {
            path: path.to_path_buf(),
            dims: raw_dims,
            reason: "an IDX file has 1 to 255 dimensions".into(),
        });
    }
    if array.dims.iter().any(|&d| u32::try_from(d).is_err()) {
        return Err(CalibError::BadDims {
            path: path.to_path_buf(),
            dims: raw_dims,
            reason: "IDX dimensions must fit in u32".into(),
        });
    }
    let expected = array
        .dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if expected != Some(array.len()) {
        return Err(CalibError::LengthMismatch {
            what: "IDX elements vs. product of dims",
            expected: expected.unwrap_or(usize::MAX),
            got: array.len(),
        });
    }
    let elem = array.elem_type();
    let mut out = Vec::with_capacity(4 + 4 * array.dims.len() + array.len() * elem.size());
    out.extend_from_slice(&[0, 0, elem.code(), array.dims.len() as u8]);
    for &d in &array.dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    match &array.data {
        IdxData::U8(v) => out.extend_from_slice(v),
        IdxData::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        IdxData::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
        IdxData::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
        IdxData::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
        IdxData::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
    }
    Ok(out)
}

/// The candidate labels files for an images file, most likely first.
///
/// `<prefix>-images-idx3-ubyte[.gz]` maps to `<prefix>-labels-idx1-ubyte`
/// with the same `.gz` suffix first, then with it toggled. The dotted
/// spelling `<prefix>-images.idx3-ubyte` of some MNIST mirrors is handled
/// too. Returns an empty list when the name does not follow the convention.
pub fn labels_path_candidates(images_path: impl AsRef<Path>) -> Vec<PathBuf> {
    let images_path = images_path.as_ref();
    let Some(name) = images_path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s, true),
        None => (name, false),
    };
    let base = [
        ("-images-idx3-ubyte", "-labels-idx1-ubyte"),
        ("-images.idx3-ubyte", "-labels.idx1-ubyte"),
        ("_images_idx3_ubyte", "_labels_idx1_ubyte"),
    ]
    .iter()
    .find_map(|(from, to)| {
        stem.strip_suffix(from)
            .map(|prefix| format!("{prefix}{to}"))
    });
    let Some(base) = base else {
        return Vec::new();
    };
    let with_gz = format!("{base}.gz");
    let names = if gz { [with_gz, base] } else { [base, with_gz] };
    names
        .into_iter()
        .map(|n| images_path.with_file_name(n))
        .collect()
}

/// Finds the labels file beside an images file: the first of
/// [`labels_path_candidates`] that exists.
///
/// `t10k-images-idx3-ubyte.gz` finds `t10k-labels-idx1-ubyte.gz` (or, failing
/// that, `t10k-labels-idx1-ubyte`); `eval-images-idx3-ubyte` finds
/// `eval-labels-idx1-ubyte`.
pub fn labels_path_for(images_path: impl AsRef<Path>) -> Option<PathBuf> {
    labels_path_candidates(images_path)
        .into_iter()
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(code: u8, dims: &[u32]) -> Vec<u8> {
        let mut v = vec![0, 0, code, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn types_round_trip_codes() {
        for t in [
            IdxType::U8,
            IdxType::I8,
            IdxType::I16,
            IdxType::I32,
            IdxType::F32,
            IdxType::F64,
        ] {
            assert_eq!(IdxType::from_code(t.code()), Some(t));
        }
        assert_eq!(IdxType::from_code(0x0A), None);
    }

    #[test]
    fn reads_i16_big_endian() {
        let mut b = header(0x0B, &[3]);
        for x in [1i16, -2, 300] {
            b.extend_from_slice(&x.to_be_bytes());
        }
        let a = IdxArray::from_bytes(&b).unwrap();
        assert_eq!(a.data, IdxData::I16(vec![1, -2, 300]));
        assert_eq!(a.to_i64(), Some(vec![1, -2, 300]));
        assert_eq!(a.to_f32(), vec![1.0, -2.0, 300.0]);
    }

    #[test]
    fn zero_rank_is_rejected() {
        let e = IdxArray::from_bytes(&[0, 0, 8, 0]).unwrap_err();
        assert!(matches!(e, CalibError::BadDims { .. }), "{e}");
    }

    #[test]
    fn candidates_toggle_gz() {
        let c = labels_path_candidates("/d/train-images-idx3-ubyte.gz");
        assert_eq!(
            c,
            vec![
                PathBuf::from("/d/train-labels-idx1-ubyte.gz"),
                PathBuf::from("/d/train-labels-idx1-ubyte")
            ]
        );
        assert!(labels_path_candidates("/d/foo.npy").is_empty());
    }
}
