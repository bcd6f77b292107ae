//! Calibration and evaluation data: file formats, preprocessing, batching.
//!
//! - [`idx`]: IDX files (MNIST, Fashion-MNIST), gzip-compressed or not.
//! - [`folder`]: image folders in torchvision's `ImageFolder` layout
//!   (`root/<class>/<image>`, JPEG and PNG), and image decoding.
//! - [`npy`]: NumPy `.npy` arrays, read as `f32`/`i64`, written as `<f4`;
//!   a float `[N, C, H, W]` file is a dataset of preprocessed inputs.
//! - [`preprocess`]: resize, center crop, padding and per-channel
//!   normalization of `u8` images; [`transform`] holds the resize (Pillow's
//!   antialiased bilinear, bit for bit) and crop.
//! - [`sample`]: seeded choice of random subsets.
//! - [`Images`] holds `u8` images channels-last; [`ImageDataset`] adds
//!   optional labels and a [`Preprocess`] to in-memory images, image
//!   folders (decoded lazily, batch by batch) or preprocessed tensors, and
//!   yields NCHW `f32` [`Batch`]es.

pub mod folder;
pub mod idx;
pub mod npy;
pub mod preprocess;
pub mod sample;
pub mod transform;

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD};

pub use folder::{ColorMode, ImageFolder};
pub use idx::{
    labels_path_candidates, labels_path_for, read_idx, read_idx_images, read_idx_labels, IdxArray,
    IdxData, IdxType,
};
pub use npy::{read_npy_f32, read_npy_i64, write_npy_f32};
pub use preprocess::Preprocess;
pub use sample::sample_indices;

use rayon::prelude::*;

use crate::dataset::folder::{decode_image, image_dimensions};
use crate::dataset::preprocess::convert_nhwc_u8;
use crate::dataset::transform::{center_crop, resize_bilinear, resized_hw};
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

/// Where the items of an [`ImageDataset`] come from.
#[derive(Debug, Clone)]
enum Source {
    /// `u8` images in memory (IDX files, [`Images`]).
    Memory(Images),
    /// Image files, decoded when a batch asks for them.
    Files {
        /// The files, in dataset order.
        files: Vec<PathBuf>,
        /// What they are decoded to.
        color: ColorMode,
    },
    /// Model inputs already preprocessed (NPY), `count x C x H x W`.
    Tensor {
        /// The values, row-major.
        data: Vec<f32>,
        /// Number of items.
        count: usize,
    },
}

/// Items (images, or already preprocessed tensors) with optional labels and
/// the preprocessing that turns them into model inputs, in NCHW `f32`
/// batches.
///
/// Sources:
///
/// - `u8` images in memory: [`new`](Self::new), or IDX files with
///   [`from_idx`](Self::from_idx) / [`from_idx_auto`](Self::from_idx_auto);
/// - image folders (torchvision `ImageFolder` layout, JPEG and PNG):
///   [`from_folder`](Self::from_folder). Files are decoded when a batch
///   asks for them (in parallel), so memory does not grow with the number
///   of images;
/// - already preprocessed `f32` tensors `[N, C, H, W]`:
///   [`from_npy`](Self::from_npy) and [`from_array`](Self::from_array).
///
/// Every source supports [`take`](Self::take) (the first N items),
/// [`sample`](Self::sample) (N items chosen at random with a seed) and
/// [`select`](Self::select).
///
/// Never empty; items and labels always agree in count.
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
///
/// // Two of the three, chosen with seed 7 (the same two every time).
/// let subset = ds.clone().sample(2, 7)?;
/// assert_eq!(subset.len(), 2);
/// assert_eq!(subset.labels(), ds.sample(2, 7)?.labels());
/// # Ok::<(), qint8_calibration::CalibError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ImageDataset {
    source: Source,
    labels: Option<Vec<usize>>,
    classes: Option<Vec<String>>,
    preprocess: Preprocess,
    tables: Vec<[f32; 256]>,
    /// Height and width of `u8` images after resize and crop, before padding.
    pixel_hw: [usize; 2],
    /// (C, H, W) of one model input.
    shape: [usize; 3],
}

/// Checks that `labels`, when given, number `len`.
fn check_labels(len: usize, labels: Option<&[usize]>) -> Result<()> {
    match labels {
        Some(l) if l.len() != len => Err(CalibError::LabelCountMismatch {
            images: len,
            labels: l.len(),
        }),
        _ => Ok(()),
    }
}

/// Pixel size after resize and crop, and the input shape `[C, H, W]` after
/// padding, for `u8` images of `height x width x channels`; errors when a
/// size is zero where resizing needs it, or overflows.
fn u8_input_shape(
    preprocess: &Preprocess,
    height: usize,
    width: usize,
    channels: usize,
) -> Result<([usize; 2], [usize; 3])> {
    let (h, w) = preprocess
        .resized_cropped_hw(height, width)
        .ok_or_else(|| CalibError::BadPreprocess {
            field: "resize",
            reason: format!("cannot resize images of {height}x{width}"),
        })?;
    let overflow = || CalibError::BadPreprocess {
        field: "pad",
        reason: format!(
            "padded image size {h}x{w} with pad {} overflows",
            preprocess.pad
        ),
    };
    let extra = preprocess.pad.checked_mul(2).ok_or_else(overflow)?;
    let hp = h.checked_add(extra).ok_or_else(overflow)?;
    let wp = w.checked_add(extra).ok_or_else(overflow)?;
    // Reject sizes whose batch-of-one would overflow.
    hp.checked_mul(wp)
        .and_then(|x| x.checked_mul(channels))
        .ok_or_else(overflow)?;
    Ok(([h, w], [channels, hp, wp]))
}

impl ImageDataset {
    /// Builds a dataset of `u8` images in memory, validating it.
    ///
    /// Errors: [`CalibError::EmptyDataset`] with no images,
    /// [`CalibError::LabelCountMismatch`] when labels are given for a
    /// different number of items, [`CalibError::BadPreprocess`] when the
    /// preprocessing does not fit the images' channels or sizes.
    pub fn new(images: Images, labels: Option<Vec<usize>>, preprocess: Preprocess) -> Result<Self> {
        if images.is_empty() {
            return Err(CalibError::EmptyDataset {
                what: "no images".into(),
            });
        }
        check_labels(images.len(), labels.as_deref())?;
        preprocess.check_geometry()?;
        let tables = preprocess.lookup_tables(images.channels())?;
        let (pixel_hw, shape) = u8_input_shape(
            &preprocess,
            images.height(),
            images.width(),
            images.channels(),
        )?;
        Ok(Self {
            source: Source::Memory(images),
            labels,
            classes: None,
            preprocess,
            tables,
            pixel_hw,
            shape,
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

    /// An image folder in torchvision's `ImageFolder` layout
    /// (`root/<class>/<image>`, see [`folder`] for the rules): labels are
    /// the indices of the class folders sorted by name (a folder of images
    /// without class folders gives an unlabeled dataset), images are
    /// decoded to `color` when a batch asks for them.
    ///
    /// Every image must come out of `resize` and `crop` with one size: set
    /// `crop` (as [`Preprocess::imagenet`] does) unless all images have the
    /// same shape. Without `crop`, the size is the first image's and an
    /// image of another size fails its batch with
    /// [`CalibError::ImageSizeMismatch`].
    ///
    /// Errors: those of [`ImageFolder::scan`] (missing folder, no images,
    /// empty class folders), [`CalibError::BadPreprocess`] for invalid
    /// preprocessing, and, without `crop`, those of reading the first
    /// image's header. Corrupt images are found when their batch is read
    /// ([`CalibError::Decode`] naming the file).
    pub fn from_folder(
        root: impl AsRef<Path>,
        color: ColorMode,
        preprocess: Preprocess,
    ) -> Result<Self> {
        let root = root.as_ref();
        preprocess.check_geometry()?;
        let channels = color.channels();
        let tables = preprocess.lookup_tables(channels)?;
        let (files, labels, classes) = ImageFolder::scan(root)?.into_parts();
        let Some(first) = files.first() else {
            return Err(CalibError::EmptyDataset {
                what: format!("{} holds no images", root.display()),
            });
        };
        let (h, w) = match preprocess.crop {
            // Any size gives the crop.
            Some(c) => (c, c),
            None => {
                let (h, w) = image_dimensions(first)?;
                if h == 0 || w == 0 {
                    return Err(CalibError::Decode {
                        path: first.clone(),
                        reason: format!("the image has no pixels ({w}x{h})"),
                    });
                }
                (h, w)
            }
        };
        let (pixel_hw, shape) = u8_input_shape(&preprocess, h, w, channels)?;
        Ok(Self {
            source: Source::Files { files, color },
            labels,
            classes: (!classes.is_empty()).then_some(classes),
            preprocess,
            tables,
            pixel_hw,
            shape,
        })
    }

    /// Model inputs from a float `.npy` file of shape `[N, C, H, W]`, used
    /// as they are (already preprocessed: `mean`, `std` and `scale` of
    /// `preprocess` are not applied), with labels from an integer `.npy`
    /// of shape `[N]` when `labels_path` is given.
    ///
    /// Errors: those of [`read_npy_f32`] / [`read_npy_i64`];
    /// [`CalibError::BadPreprocess`] when `preprocess` pads, resizes or
    /// crops (those apply to images); [`CalibError::BadShape`] naming the
    /// file and its shape when the inputs are not 4-D with nonzero `C`, `H`,
    /// `W`, or the labels are not 1-D; [`CalibError::LabelCountMismatch`]
    /// when they do not hold `N` entries; [`CalibError::EmptyDataset`] for
    /// `N = 0`;
    /// [`CalibError::ValueOutOfRange`] for a non-finite input or a negative
    /// label.
    pub fn from_npy(
        path: impl AsRef<Path>,
        labels_path: Option<&Path>,
        preprocess: Preprocess,
    ) -> Result<Self> {
        let path = path.as_ref();
        let reject = |field: &'static str, what: &str| CalibError::BadPreprocess {
            field,
            reason: format!(
                "{}: NPY inputs are used as they are; {what} applies to images only",
                path.display()
            ),
        };
        if preprocess.pad != 0 {
            return Err(reject("pad", &format!("padding ({})", preprocess.pad)));
        }
        if preprocess.resize.is_some() {
            return Err(reject("resize", "resizing"));
        }
        if preprocess.crop.is_some() {
            return Err(reject("crop", "cropping"));
        }
        let inputs = read_npy_f32(path)?;
        // The inputs' shape first, so that its error is not reported as
        // one of the labels.
        let [n, ..] = tensor_dims(path, inputs.shape())?;
        let labels = match labels_path {
            Some(lp) => Some(read_npy_labels(lp, n)?),
            None => None,
        };
        Self::from_tensor(path, inputs, labels, preprocess)
    }

    /// Model inputs already preprocessed, `[N, C, H, W]`, with optional
    /// labels; used as they are ([`preprocess`](Self::preprocess) reports
    /// the identity: scale 1, mean 0, std 1).
    ///
    /// Errors as [`from_npy`](Self::from_npy), with the path `<memory>`.
    ///
    /// ```
    /// use ndarray::Array4;
    /// use qint8_calibration::ImageDataset;
    ///
    /// let x = Array4::from_shape_fn((5, 1, 2, 2), |(n, _, h, w)| (n * 4 + h * 2 + w) as f32);
    /// let ds = ImageDataset::from_array(x, Some(vec![0, 1, 0, 1, 0]))?;
    /// assert_eq!((ds.len(), ds.input_shape()), (5, [1, 2, 2]));
    /// assert_eq!(ds.batch(1, 1)?.inputs.as_slice().unwrap(), &[4.0, 5.0, 6.0, 7.0]);
    /// # Ok::<(), qint8_calibration::CalibError>(())
    /// ```
    pub fn from_array(inputs: Array4<f32>, labels: Option<Vec<usize>>) -> Result<Self> {
        let identity = Preprocess {
            scale: 1.0,
            ..Preprocess::default()
        };
        Self::from_tensor(Path::new("<memory>"), inputs.into_dyn(), labels, identity)
    }

    /// Shared by [`from_npy`](Self::from_npy) and
    /// [`from_array`](Self::from_array).
    fn from_tensor(
        path: &Path,
        inputs: ArrayD<f32>,
        labels: Option<Vec<usize>>,
        preprocess: Preprocess,
    ) -> Result<Self> {
        let [n, c, h, w] = tensor_dims(path, inputs.shape())?;
        if let Some(l) = &labels {
            if l.len() != n {
                return Err(CalibError::LabelCountMismatch {
                    images: n,
                    labels: l.len(),
                });
            }
        }
        if let Some((i, x)) = inputs.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(CalibError::ValueOutOfRange {
                path: path.to_path_buf(),
                index: i,
                value: x.to_string(),
                target: "a finite model input",
            });
        }
        let data = if inputs.is_standard_layout() {
            let (mut v, offset) = inputs.into_raw_vec_and_offset();
            let offset = offset.unwrap_or(0);
            if offset > 0 {
                v.drain(..offset);
            }
            v.truncate(n * c * h * w);
            v
        } else {
            inputs.iter().copied().collect()
        };
        Ok(Self {
            source: Source::Tensor { data, count: n },
            labels,
            classes: None,
            preprocess,
            tables: Vec::new(),
            pixel_hw: [h, w],
            shape: [c, h, w],
        })
    }

    /// Number of items (at least 1).
    pub fn len(&self) -> usize {
        match &self.source {
            Source::Memory(images) => images.len(),
            Source::Files { files, .. } => files.len(),
            Source::Tensor { count, .. } => *count,
        }
    }

    /// Always `false`: datasets are never empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape of one model input: `[C, H, W]` after resize, crop and
    /// padding (`[C, H + 2 pad, W + 2 pad]` without resize and crop).
    pub fn input_shape(&self) -> [usize; 3] {
        self.shape
    }

    /// The raw `u8` images of an in-memory dataset ([`new`](Self::new),
    /// IDX); `None` for folders and tensors.
    pub fn images(&self) -> Option<&Images> {
        match &self.source {
            Source::Memory(images) => Some(images),
            _ => None,
        }
    }

    /// The image files of a folder dataset, in dataset order; `None` for
    /// other sources.
    pub fn files(&self) -> Option<&[PathBuf]> {
        match &self.source {
            Source::Files { files, .. } => Some(files),
            _ => None,
        }
    }

    /// Class names of a folder dataset (label `i` is `class_names()[i]`);
    /// `None` for other sources and folders without class folders.
    pub fn class_names(&self) -> Option<&[String]> {
        self.classes.as_deref()
    }

    /// The labels, if any.
    pub fn labels(&self) -> Option<&[usize]> {
        self.labels.as_deref()
    }

    /// Replaces the labels with `labels`, one per item in dataset order
    /// (for instance a reference model's predictions, to score another
    /// model against it on data that has no labels). Class folder names
    /// are dropped: the new labels need not index them.
    ///
    /// Errors with [`CalibError::LabelCountMismatch`] when `labels` does not
    /// have one entry per item.
    pub fn with_labels(mut self, labels: Vec<usize>) -> Result<Self> {
        check_labels(self.len(), Some(&labels))?;
        self.labels = Some(labels);
        self.classes = None;
        Ok(self)
    }

    /// The preprocessing applied to every batch (for tensors, what was
    /// given; it is not applied).
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Floats in one model input (`C * H * W`; the constructors checked
    /// that it does not overflow).
    fn item_floats(&self) -> usize {
        let [c, h, w] = self.shape;
        c * h * w
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
        let per = self.item_floats();
        match &mut self.source {
            Source::Memory(images) => images.truncate(limit),
            Source::Files { files, .. } => files.truncate(limit),
            Source::Tensor { data, count } => {
                if limit < *count {
                    *count = limit;
                    data.truncate(limit * per);
                }
            }
        }
        if let Some(l) = &mut self.labels {
            l.truncate(limit);
        }
        Ok(self)
    }

    /// Keeps `n` items chosen uniformly at random without replacement
    /// (all of them if there are fewer), in dataset order. The choice
    /// depends only on `seed`, `n` and the number of items (see
    /// [`sample_indices`]), so a seed names a calibration set.
    ///
    /// Errors with [`CalibError::EmptyDataset`] when `n` is zero.
    pub fn sample(self, n: usize, seed: u64) -> Result<Self> {
        if n == 0 {
            return Err(CalibError::EmptyDataset {
                what: "sample of 0 items".into(),
            });
        }
        if n >= self.len() {
            return Ok(self);
        }
        let indices = sample_indices(self.len(), n, seed);
        self.select(&indices)
    }

    /// Splits off `n` items chosen as [`sample`](Self::sample) chooses them
    /// (the same seed picks the same items) and returns them with the
    /// rest; both keep dataset order and no item is in both. For holding
    /// out validation images from a training set.
    ///
    /// Errors with [`CalibError::EmptyDataset`] when either part would be
    /// empty (`n` zero, or at least the number of items).
    pub fn split(self, n: usize, seed: u64) -> Result<(Self, Self)> {
        let len = self.len();
        if n == 0 || n >= len {
            return Err(CalibError::EmptyDataset {
                what: format!("split of {n} of {len} items leaves one part empty"),
            });
        }
        let picked = sample_indices(len, n, seed);
        let mut taken = vec![false; len];
        for &i in &picked {
            taken[i] = true;
        }
        let rest: Vec<usize> = (0..len).filter(|&i| !taken[i]).collect();
        Ok((self.clone().select(&picked)?, self.select(&rest)?))
    }

    /// Keeps the items at `indices`, in that order (an index may repeat).
    ///
    /// Errors: [`CalibError::EmptyDataset`] when `indices` is empty,
    /// [`CalibError::BatchOutOfRange`] (with `count` 1) for the first index
    /// past the end.
    pub fn select(self, indices: &[usize]) -> Result<Self> {
        if indices.is_empty() {
            return Err(CalibError::EmptyDataset {
                what: "no items selected".into(),
            });
        }
        let len = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(CalibError::BatchOutOfRange {
                start: bad,
                count: 1,
                len,
            });
        }
        let per = self.item_floats();
        let source = match self.source {
            Source::Memory(images) => {
                let mut data = Vec::with_capacity(indices.len() * images.image_len());
                for &i in indices {
                    data.extend_from_slice(images.image(i).unwrap_or_default());
                }
                Source::Memory(Images::new(
                    indices.len(),
                    images.height(),
                    images.width(),
                    images.channels(),
                    data,
                )?)
            }
            Source::Files { files, color } => Source::Files {
                files: indices.iter().map(|&i| files[i].clone()).collect(),
                color,
            },
            Source::Tensor { data, .. } => {
                let mut out = Vec::with_capacity(indices.len() * per);
                for &i in indices {
                    out.extend_from_slice(&data[i * per..(i + 1) * per]);
                }
                Source::Tensor {
                    data: out,
                    count: indices.len(),
                }
            }
        };
        let labels = self.labels.map(|l| indices.iter().map(|&i| l[i]).collect());
        Ok(Self {
            source,
            labels,
            ..self
        })
    }

    /// Number of floats in a batch of `n` items.
    fn batch_floats(&self, n: usize) -> Result<usize> {
        n.checked_mul(self.item_floats())
            .ok_or(CalibError::BatchOutOfRange {
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

    /// Resizes and crops one `u8` image (`H x W x C`) and writes it
    /// normalized and padded into `out` (one input, `C * H * W` floats).
    /// `path` names the image in errors.
    fn finish_image(
        &self,
        pixels: &[u8],
        height: usize,
        width: usize,
        path: &Path,
        out: &mut [f32],
    ) -> Result<()> {
        let c = self.shape[0];
        let (mut h, mut w) = (height, width);
        let mut buf = std::borrow::Cow::Borrowed(pixels);
        if let Some(r) = self.preprocess.resize {
            let (nh, nw) = resized_hw(h, w, r).ok_or_else(|| CalibError::BadPreprocess {
                field: "resize",
                reason: format!("{}: cannot resize {h}x{w} to {r}", path.display()),
            })?;
            if (nh, nw) != (h, w) {
                buf = resize_bilinear(&buf, h, w, c, nh, nw).into();
                (h, w) = (nh, nw);
            }
        }
        if let Some(k) = self.preprocess.crop {
            buf = center_crop(&buf, h, w, c, k, k).into();
            (h, w) = (k, k);
        }
        if [h, w] != self.pixel_hw {
            return Err(CalibError::ImageSizeMismatch {
                path: path.to_path_buf(),
                expected: self.pixel_hw,
                got: [h, w],
            });
        }
        convert_nhwc_u8(&buf, 1, h, w, c, self.preprocess.pad, &self.tables, out)
    }

    /// Preprocesses items `start .. start + n` into `out`, NCHW, which must
    /// hold `n * C * H * W` floats (see [`input_shape`](Self::input_shape)).
    ///
    /// Lets a caller reuse one buffer across batches. Images that need
    /// decoding, resizing or cropping are processed in parallel (rayon);
    /// the first failing item, in order, gives the error (for image files,
    /// [`CalibError::Decode`], [`CalibError::NotFound`], [`CalibError::Io`]
    /// or [`CalibError::ImageSizeMismatch`] naming the file).
    pub fn batch_into(&self, start: usize, n: usize, out: &mut [f32]) -> Result<()> {
        self.check_range(start, n)?;
        let per = self.item_floats();
        let expected = self.batch_floats(n)?;
        if out.len() != expected {
            return Err(CalibError::LengthMismatch {
                what: "output buffer (n*c*h*w)",
                expected,
                got: out.len(),
            });
        }
        if per == 0 {
            return Ok(());
        }
        match &self.source {
            Source::Memory(images) if !self.preprocess.changes_size() => {
                let il = images.image_len();
                let src = &images.as_bytes()[start * il..(start + n) * il];
                convert_nhwc_u8(
                    src,
                    n,
                    images.height(),
                    images.width(),
                    images.channels(),
                    self.preprocess.pad,
                    &self.tables,
                    out,
                )
            }
            Source::Memory(images) => {
                let memory = Path::new("<memory>");
                out.par_chunks_mut(per)
                    .enumerate()
                    .map(|(i, dst)| {
                        let px = images.image(start + i).unwrap_or_default();
                        self.finish_image(px, images.height(), images.width(), memory, dst)
                    })
                    .collect::<Vec<Result<()>>>()
                    .into_iter()
                    .collect()
            }
            Source::Files { files, color } => out
                .par_chunks_mut(per)
                .zip(&files[start..start + n])
                .map(|(dst, path)| {
                    let (px, h, w) = decode_image(path, *color)?;
                    self.finish_image(&px, h, w, path, dst)
                })
                .collect::<Vec<Result<()>>>()
                .into_iter()
                .collect(),
            Source::Tensor { data, .. } => {
                out.copy_from_slice(&data[start * per..(start + n) * per]);
                Ok(())
            }
        }
    }

    /// Preprocesses items `start .. start + n` into a new batch.
    ///
    /// Errors with [`CalibError::ZeroBatchSize`] for `n == 0` and
    /// [`CalibError::BatchOutOfRange`] when the range passes the end, and
    /// those of [`batch_into`](Self::batch_into).
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

/// `[N, C, H, W]` of preprocessed inputs from `path`: 4 dims, `N`, `C`,
/// `H` and `W` at least 1.
fn tensor_dims(path: &Path, shape: &[usize]) -> Result<[usize; 4]> {
    let &[n, c, h, w] = shape else {
        return Err(CalibError::BadShape {
            path: path.to_path_buf(),
            expected: "4 dims (N, C, H, W)",
            got: shape.to_vec(),
        });
    };
    if n == 0 {
        return Err(CalibError::EmptyDataset {
            what: format!("{} holds no items (shape {shape:?})", path.display()),
        });
    }
    if c == 0 || h == 0 || w == 0 {
        return Err(CalibError::BadShape {
            path: path.to_path_buf(),
            expected: "4 dims (N, C, H, W) with C, H and W at least 1",
            got: shape.to_vec(),
        });
    }
    Ok([n, c, h, w])
}

/// Labels from the integer NPY file `path`: shape `[n]`, non-negative.
fn read_npy_labels(path: &Path, n: usize) -> Result<Vec<usize>> {
    let labels = read_npy_i64(path)?;
    if labels.ndim() != 1 {
        return Err(CalibError::BadShape {
            path: path.to_path_buf(),
            expected: "1 dim (one label per input)",
            got: labels.shape().to_vec(),
        });
    }
    if labels.len() != n {
        return Err(CalibError::LabelCountMismatch {
            images: n,
            labels: labels.len(),
        });
    }
    labels
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            usize::try_from(v).map_err(|_| CalibError::ValueOutOfRange {
                path: path.to_path_buf(),
                index: i,
                value: v.to_string(),
                target: "a class index (non-negative)",
            })
        })
        .collect()
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
