//! Calibration and evaluation data: file formats, preprocessing, batching.
//!
//! - [`idx`]: IDX files (MNIST, Fashion-MNIST), gzip-compressed or not.
//! - [`npy`]: NumPy `.npy` arrays, read as `f32`/`i64`, written as `<f4`.
//! - [`preprocess`]: padding and per-channel normalization of `u8` images.
//! - [`Images`] holds `u8` images channels-last; [`ImageDataset`] adds
//!   optional labels and a [`Preprocess`], and yields NCHW `f32` [`Batch`]es.

pub mod idx;
pub mod npy;
pub mod preprocess;

use std::path::Path;

use ndarray::{Array4, ArrayD};

pub use idx::{
    labels_path_candidates, labels_path_for, read_idx, read_idx_images, read_idx_labels, IdxArray,
    IdxData, IdxType,
};
pub use npy::{read_npy_f32, read_npy_i64, write_npy_f32};
pub use preprocess::Preprocess;

use crate::dataset::preprocess::convert_nhwc_u8;
use crate::error::{CalibError, Result};

/// A stack of `u8` images of one size, stored `N x H x W x C` (channels
/// last, as IDX files and decoded image files hold them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    count: usize,
    height: usize,
    width: usize,
    channels: usize,
    data: Vec<u8>,
}

impl Images {
    /// Wraps `data` holding `count` images of `height x width x channels`
    /// bytes each.
    ///
    /// Errors with [`CalibError::LengthMismatch`] when `data.len()` is not
    /// `count * height * width * channels`, or [`CalibError::BadPreprocess`]
    /// with field `"channels"` when `channels` is zero.
    pub fn new(
        count: usize,
        height: usize,
        width: usize,
        channels: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        if channels == 0 {
            return Err(CalibError::BadPreprocess {
                field: "channels",
                reason: "images have zero channels".into(),
            });
        }
        let expected = count
            .checked_mul(height)
            .and_then(|x| x.checked_mul(width))
            .and_then(|x| x.checked_mul(channels));
        if expected != Some(data.len()) {
            return Err(CalibError::LengthMismatch {
                what: "image bytes vs. count*height*width*channels",
                expected: expected.unwrap_or(usize::MAX),
                got: data.len(),
            });
        }
        Ok(Self {
            count,
            height,
            width,
            channels,
            data,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Image height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Image width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Channels per pixel (1 for grayscale).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Bytes per image (`height * width * channels`).
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// All pixels, `N x H x W x C` row-major.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// The pixels of image `index` (`H x W x C`), or `None` past the end.
    pub fn image(&self, index: usize) -> Option<&[u8]> {
        if index >= self.count {
            return None;
        }
        let n = self.image_len();
        self.data.get(index * n..(index + 1) * n)
    }

    /// Keeps only the first `limit` images (no-op if there are fewer).
    pub fn truncate(&mut self, limit: usize) {
        if limit < self.count {
            self.count = limit;
            self.data.truncate(limit * self.image_len());
        }
    }

    /// The pixels as an `N x H x W x C` view.
    ///
    /// The length was checked in [`Images::new`], so this only fails if that
    /// invariant is broken.
    pub fn view(&self) -> Result<ndarray::ArrayView4<'_, u8>> {
        let shape = (self.count, self.height, self.width, self.channels);
        ndarray::ArrayView4::from_shape(shape, &self.data).map_err(|_| CalibError::LengthMismatch {
            what: "image bytes vs. count*height*width*channels",
            expected: self.count * self.image_len(),
            got: self.data.len(),
        })
    }

    /// Consumes the images, returning `(count, height, width, channels, data)`.
    pub fn into_raw(self) -> (usize, usize, usize, usize, Vec<u8>) {
        (
            self.count,
            self.height,
            self.width,
            self.channels,
            self.data,
        )
    }
}

/// One batch of preprocessed inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Index of the batch's first item in the dataset.
    pub start: usize,
    /// Inputs, `N x C x H x W` (`H` and `W` including padding).
    pub inputs: ArrayD<f32>,
    /// The items' labels, when the dataset has labels.
    pub labels: Option<Vec<usize>>,
}

impl Batch {
    /// Number of items in the batch.
    pub fn len(&self) -> usize {
        self.inputs.shape().first().copied().unwrap_or(0)
    }

    /// Whether the batch holds no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Images with optional labels and the preprocessing that turns them into
/// model inputs.
///
/// Never empty; images and labels always agree in count.
///
/// ```
/// use qint8_calibration::dataset::{ImageDataset, Images, Preprocess};
///
/// // Three 2x2 grayscale images.
/// let images = Images::new(3, 2, 2, 1, (0..12).collect())?;
/// let ds = ImageDataset::new(images, Some(vec![0, 1, 2]), Preprocess::default().with_pad(1))?;
/// assert_eq!(ds.input_shape(), [1, 4, 4]);
/// let sizes: Vec<usize> = ds.batches(2).map(|b| b.map(|b| b.len())).collect::<Result<_, _>>()?;
/// assert_eq!(sizes, vec![2, 1]);
/// # Ok::<(), qint8_calibration::CalibError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ImageDataset {
    images: Images,
    labels: Option<Vec<usize>>,
    preprocess: Preprocess,
    tables: Vec<[f32; 256]>,
    /// (C, H + 2 pad, W + 2 pad).
    shape: [usize; 3],
}

impl ImageDataset {
    /// Builds a dataset, validating it.
    ///
    /// Errors: [`CalibError::EmptyDataset`] with no images,
    /// [`CalibError::LabelCountMismatch`] when labels are given for a
    /// different number of items, [`CalibError::BadPreprocess`] when the
    /// preprocessing does not fit the images' channels.
    pub fn new(images: Images, labels: Option<Vec<usize>>, preprocess: Preprocess) -> Result<Self> {
        if images.is_empty() {
            return Err(CalibError::EmptyDataset {
                what: "no images".into(),
            });
        }
        if let Some(l) = &labels {
            if l.len() != images.len() {
                return Err(CalibError::LabelCountMismatch {
                    images: images.len(),
                    labels: l.len(),
                });
            }
        }
        let tables = preprocess.lookup_tables(images.channels())?;
        let (h, w) = preprocess.output_hw(images.height(), images.width());
        // Reject sizes whose batch-of-one would overflow.
        h.checked_mul(w)
            .and_then(|x| x.checked_mul(images.channels()))
            .ok_or_else(|| CalibError::BadPreprocess {
                field: "pad",
                reason: format!("padded image size {h}x{w} overflows"),
            })?;
        Ok(Self {
            shape: [images.channels(), h, w],
            images,
            labels,
            preprocess,
            tables,
        })
    }

    /// Reads IDX images and, when `labels_path` is given, their labels.
    ///
    /// An images file holding zero images gives [`CalibError::EmptyDataset`]
    /// naming the file.
    pub fn from_idx(
        images_path: impl AsRef<Path>,
        labels_path: Option<&Path>,
        preprocess: Preprocess,
    ) -> Result<Self> {
        let images_path = images_path.as_ref();
        let images = read_idx_images(images_path)?;
        if images.is_empty() {
            return Err(CalibError::EmptyDataset {
                what: format!("{} holds no images", images_path.display()),
            });
        }
        let labels = match labels_path {
            Some(p) => Some(read_idx_labels(p)?.into_iter().map(usize::from).collect()),
            None => None,
        };
        Self::new(images, labels, preprocess)
    }

    /// Reads IDX images and the labels file found beside them by
    /// [`labels_path_for`], if any (no labels otherwise).
    pub fn from_idx_auto(images_path: impl AsRef<Path>, preprocess: Preprocess) -> Result<Self> {
        let images_path = images_path.as_ref();
        let labels = labels_path_for(images_path);
        Self::from_idx(images_path, labels.as_deref(), preprocess)
    }

    /// Number of items (at least 1).
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Always `false`: datasets are never empty.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Shape of one model input: `[C, H + 2 pad, W + 2 pad]`.
    pub fn input_shape(&self) -> [usize; 3] {
        self.shape
    }

    /// The raw images.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// The labels, if any.
    pub fn labels(&self) -> Option<&[usize]> {
        self.labels.as_deref()
    }

    /// The preprocessing applied to every batch.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Keeps only the first `limit` items (all of them if there are fewer).
    ///
    /// Errors with [`CalibError::EmptyDataset`] when `limit` is zero.
    pub fn take(mut self, limit: usize) -> Result<Self> {
        if limit == 0 {
            return Err(CalibError::EmptyDataset {
                what: "limit of 0 items".into(),
            });
        }
        self.images.truncate(limit);
        if let Some(l) = &mut self.labels {
            l.truncate(limit);
        }
        Ok(self)
    }

    /// Number of floats in a batch of `n` items.
    fn batch_floats(&self, n: usize) -> Result<usize> {
        let [c, h, w] = self.shape;
        n.checked_mul(c * h * w).ok_or(CalibError::BatchOutOfRange {
            start: 0,
            count: n,
            len: self.len(),
        })
    }

    fn check_range(&self, start: usize, n: usize) -> Result<()> {
        let out_of_range = CalibError::BatchOutOfRange {
            start,
            count: n,
            len: self.len(),
        };
        if n == 0 {
            return Err(CalibError::ZeroBatchSize);
        }
        match start.checked_add(n) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(out_of_range),
        }
    }

    /// Preprocesses items `start .. start + n` into `out`, NCHW, which must
    /// hold `n * C * H * W` floats (see [`input_shape`](Self::input_shape)).
    ///
    /// Lets a caller reuse one buffer across batches.
    pub fn batch_into(&self, start: usize, n: usize, out: &mut [f32]) -> Result<()> {
        self.check_range(start, n)?;
        let il = self.images.image_len();
        let src = &self.images.as_bytes()[start * il..(start + n) * il];
        convert_nhwc_u8(
            src,
            n,
            self.images.height(),
            self.images.width(),
            self.images.channels(),
            self.preprocess.pad,
            &self.tables,
            out,
        )
    }

    /// Preprocesses items `start .. start + n` into a new batch.
    ///
    /// Errors with [`CalibError::ZeroBatchSize`] for `n == 0` and
    /// [`CalibError::BatchOutOfRange`] when the range passes the end.
    pub fn batch(&self, start: usize, n: usize) -> Result<Batch> {
        self.check_range(start, n)?;
        let mut data = vec![0f32; self.batch_floats(n)?];
        self.batch_into(start, n, &mut data)?;
        let [c, h, w] = self.shape;
        let inputs = Array4::from_shape_vec((n, c, h, w), data)
            .map_err(|_| CalibError::LengthMismatch {
                what: "batch buffer vs. N*C*H*W",
                expected: n * c * h * w,
                got: 0,
            })?
            .into_dyn();
        let labels = self.labels.as_ref().map(|l| l[start..start + n].to_vec());
        Ok(Batch {
            start,
            inputs,
            labels,
        })
    }

    /// Iterates over the dataset in order, `batch_size` items at a time (the
    /// last batch may be smaller).
    ///
    /// A `batch_size` of zero yields one [`CalibError::ZeroBatchSize`].
    pub fn batches(&self, batch_size: usize) -> Batches<'_> {
        Batches {
            dataset: self,
            batch_size,
            next: 0,
            failed: false,
        }
    }
}

/// Iterator over the batches of an [`ImageDataset`]; see
/// [`ImageDataset::batches`].
#[derive(Debug)]
pub struct Batches<'a> {
    dataset: &'a ImageDataset,
    batch_size: usize,
    next: usize,
    failed: bool,
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next >= self.dataset.len() {
            return None;
        }
        if self.batch_size == 0 {
            self.failed = true;
            return Some(Err(CalibError::ZeroBatchSize));
        }
        let n = self.batch_size.min(self.dataset.len() - self.next);
        let batch = self.dataset.batch(self.next, n);
        if batch.is_err() {
            self.failed = true;
        }
        self.next += n;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.failed {
            return (0, Some(0));
        }
        let left = self.dataset.len().saturating_sub(self.next);
        let n = if self.batch_size == 0 {
            usize::from(left > 0)
        } else {
            left.div_ceil(self.batch_size)
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for Batches<'_> {}

impl std::iter::FusedIterator for Batches<'_> {}
