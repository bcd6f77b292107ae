//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading, writing or batching
/// calibration data.
///
/// Variants carry what a user needs to find the problem: the file path, the
/// byte offset, and expected vs found sizes. Data that did not come from a
/// file (for example [`IdxArray::from_bytes`](crate::dataset::idx::IdxArray::from_bytes))
/// is reported with the path `<memory>`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalibError {
    /// A file does not exist.
    #[error("file not found: {}", path.display())]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// An operating-system I/O error other than "not found".
    #[error("I/O error while {action} {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What was being done ("opening", "reading", "writing", ...).
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A gzip-compressed file is corrupt or truncated.
    #[error(
        "corrupt gzip data in {} (after {offset} decompressed bytes): {source}",
        path.display()
    )]
    Gzip {
        /// The compressed file.
        path: PathBuf,
        /// Number of decompressed bytes read successfully before the failure.
        offset: u64,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// The file ends inside its header.
    #[error(
        "{}: truncated {format} header: needed {expected} bytes, the file has {got}",
        path.display()
    )]
    TruncatedHeader {
        /// The file.
        path: PathBuf,
        /// The format being read ("IDX" or "NPY").
        format: &'static str,
        /// Bytes the header needs (as far as known).
        expected: u64,
        /// Bytes available.
        got: u64,
    },
    /// The file does not start with the magic bytes of its format.
    #[error("{}: not an {format} file: expected magic {expected}, found {got}", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The format being read ("IDX" or "NPY").
        format: &'static str,
        /// The magic the format requires.
        expected: String,
        /// The bytes found, in hex.
        got: String,
    },
    /// The IDX type byte names an element type this crate does not read.
    #[error(
        "{}: unsupported IDX element type 0x{code:02X} (supported: 0x08 u8, 0x09 i8, \
         0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64)",
        path.display()
    )]
    UnsupportedIdxType {
        /// The file.
        path: PathBuf,
        /// The type byte (third byte of the file).
        code: u8,
    },
    /// The NPY `descr` names a dtype this crate does not read.
    #[error(
        "{}: unsupported NPY dtype {dtype} (supported: bool, u1/u2/u4/u8, i1/i2/i4/i8, \
         f2/f4/f8, either byte order)",
        path.display()
    )]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The `descr` as written in the header.
        dtype: String,
    },
    /// The element type is readable but not as the requested type
    /// (for example floats read as integer labels).
    #[error("{}: element type {got} cannot be read as {expected}", path.display())]
    DtypeMismatch {
        /// The file.
        path: PathBuf,
        /// What the caller asked for.
        expected: &'static str,
        /// The element type in the file.
        got: String,
    },
    /// The dimensions in a header are unusable: zero rank where one is
    /// needed, a size that overflows, or more data than the file can hold.
    #[error("{}: invalid dimensions {dims:?}: {reason}", path.display())]
    BadDims {
        /// The file.
        path: PathBuf,
        /// The dimensions as written in the header.
        dims: Vec<u64>,
        /// Why they are rejected.
        reason: String,
    },
    /// The array has the wrong rank or shape for what was asked.
    #[error("{}: expected {expected}, got shape {got:?}", path.display())]
    BadShape {
        /// The file.
        path: PathBuf,
        /// What was expected, in words (for example "3 or 4 dims (N, H, W[, C])").
        expected: &'static str,
        /// The shape found.
        got: Vec<usize>,
    },
    /// The data after the header is shorter than the header's shape needs.
    #[error(
        "{}: truncated data (or wrong dims): shape {dims:?} needs {expected} bytes from \
         offset {offset}, found {got}",
        path.display()
    )]
    TruncatedData {
        /// The file.
        path: PathBuf,
        /// Byte offset where the data starts (in the decompressed stream for gzip).
        offset: u64,
        /// The shape from the header.
        dims: Vec<usize>,
        /// Data bytes the shape needs.
        expected: u64,
        /// Data bytes present.
        got: u64,
    },
    /// The file holds more bytes than the header's shape describes.
    #[error(
        "{}: {extra} unexpected bytes after the data: shape {dims:?} needs {expected} bytes \
         from offset {offset}",
        path.display()
    )]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Byte offset where the data starts.
        offset: u64,
        /// The shape from the header.
        dims: Vec<usize>,
        /// Data bytes the shape needs.
        expected: u64,
        /// Bytes beyond that.
        extra: u64,
    },
    /// The NPY header dictionary could not be parsed or lacks a key.
    #[error("{}: invalid NPY header at byte {offset}: {reason}", path.display())]
    NpyHeader {
        /// The file.
        path: PathBuf,
        /// Byte offset in the file where parsing failed.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A value does not fit the requested element type.
    #[error("{}: value {value} at index {index} does not fit in {target}", path.display())]
    ValueOutOfRange {
        /// The file.
        path: PathBuf,
        /// Flat index of the value (in file order).
        index: usize,
        /// The value, formatted.
        value: String,
        /// The requested type.
        target: &'static str,
    },
    /// Two things that must have the same length do not.
    #[error("length mismatch in {what}: expected {expected}, got {got}")]
    LengthMismatch {
        /// Which buffers.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// Images and labels disagree in count.
    #[error("{labels} labels for {images} images")]
    LabelCountMismatch {
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A dataset holds no items.
    #[error("empty dataset: {what}")]
    EmptyDataset {
        /// Which dataset, in words (often its path).
        what: String,
    },
    /// A preprocessing parameter is invalid for the data.
    #[error("invalid preprocessing {field}: {reason}")]
    BadPreprocess {
        /// The field ("mean", "std", "scale", "pad").
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An image file could not be decoded (corrupt, truncated, not a
    /// supported format, or without pixels).
    #[error("{}: cannot decode image: {reason}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// An image of a folder has a size other than the dataset's (only
    /// possible without a crop, where every image must come out of the
    /// resize with the size of the first).
    #[error(
        "{}: image is {}x{} after resizing, but the dataset's images are {}x{} \
         (the first image's size); set a crop size to batch images of different sizes",
        path.display(), got[0], got[1], expected[0], expected[1]
    )]
    ImageSizeMismatch {
        /// The image file.
        path: PathBuf,
        /// Expected height and width.
        expected: [usize; 2],
        /// Height and width of this image.
        got: [usize; 2],
    },
    /// A batch was requested outside the dataset.
    #[error("batch of {count} items at {start} is out of range for a dataset of {len} items")]
    BatchOutOfRange {
        /// First item requested.
        start: usize,
        /// Number of items requested.
        count: usize,
        /// Number of items in the dataset.
        len: usize,
    },
    /// A batch size of zero was requested.
    #[error("batch size must be at least 1")]
    ZeroBatchSize,
    /// Calibration cannot proceed (empty set, non-finite data, ...).
    #[error("calibration: {0}")]
    Invalid(String),
    /// The model failed to load, simplify or run.
    #[error(transparent)]
    Runtime(#[from] qint8_runtime::RuntimeError),
    /// The graph or plan is invalid.
    #[error(transparent)]
    Graph(#[from] qint8_graph::GraphError),
    /// Range or parameter computation failed.
    #[error(transparent)]
    Math(#[from] qint8_math::MathError),
}

/// Result alias for this crate.
pub type Result<T, E = CalibError> = std::result::Result<T, E>;

/// Maps an I/O error to [`CalibError::NotFound`] or [`CalibError::Io`].
pub(crate) fn io_error(
    path: &std::path::Path,
    action: &'static str,
    e: std::io::Error,
) -> CalibError {
    if e.kind() == std::io::ErrorKind::NotFound {
        CalibError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        CalibError::Io {
            path: path.to_path_buf(),
            action,
            source: e,
        }
    }
}
