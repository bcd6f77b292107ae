//! Calibration data for qint8.
//!
//! The streaming [`calibrate`] turns a graph and representative data into a
//! [`QuantPlan`](qint8_graph::QuantPlan) (see [`calibrator`]). Below it, the
//! data layer that calibration and evaluation share:
//!
//! - [`dataset::idx`]: IDX files (MNIST, Fashion-MNIST), transparently
//!   gunzipped, with [`labels_path_for`](dataset::labels_path_for) to find
//!   the labels beside an images file.
//! - [`dataset::folder`]: image folders in torchvision's `ImageFolder`
//!   layout (`root/<class>/<image>`, JPEG and PNG), labels from the sorted
//!   class folders, images decoded (RGB or grayscale) batch by batch.
//! - [`dataset::npy`]: `.npy` arrays (versions 1.0–3.0) read as `f32` or
//!   `i64`, written as `<f4` atomically; a float `[N, C, H, W]` file is a
//!   dataset of already preprocessed inputs, with labels from an integer
//!   `[N]` file.
//! - [`dataset::preprocess`]: torchvision's `Resize` (Pillow's antialiased
//!   bilinear, bit for bit, see [`dataset::transform`]) and `CenterCrop`,
//!   zero padding and per-channel normalization from `u8` pixels to NCHW
//!   `f32`; [`Preprocess::imagenet`] is the usual ImageNet evaluation
//!   transform.
//! - [`ImageDataset`]: items from any of these sources + optional labels +
//!   preprocessing, in batches; [`ImageDataset::take`] keeps the first N
//!   items and [`ImageDataset::sample`] a seeded random N
//!   ([`dataset::sample`]).
//!
//! Malformed files (truncated, wrong magic, absurd dimensions, corrupt gzip,
//! unsupported element types, corrupt images) give a [`CalibError`] naming
//! the file, never a panic.
//!
//! ```
//! use qint8_calibration::dataset::idx::{encode_idx, IdxArray, IdxData};
//! use qint8_calibration::prelude::*;
//!
//! // Write a tiny MNIST-style pair of files: four 2x2 images and their labels.
//! let dir = std::env::temp_dir().join(format!("qint8-calib-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let images = IdxArray { dims: vec![4, 2, 2], data: IdxData::U8((0..16).map(|x| x * 17).collect()) };
//! let labels = IdxArray { dims: vec![4], data: IdxData::U8(vec![3, 1, 4, 1]) };
//! let images_path = dir.join("eval-images-idx3-ubyte");
//! std::fs::write(&images_path, encode_idx(&images)?)?;
//! std::fs::write(dir.join("eval-labels-idx1-ubyte"), encode_idx(&labels)?)?;
//!
//! // Pad by 1 and normalize as for MNIST; labels are found automatically.
//! let pre = Preprocess::normalize(vec![0.1307], vec![0.3081]).with_pad(1);
//! let ds = ImageDataset::from_idx_auto(&images_path, pre)?;
//! assert_eq!((ds.len(), ds.input_shape()), (4, [1, 4, 4]));
//!
//! for batch in ds.batches(3) {
//!     let batch = batch?;
//!     assert_eq!(batch.inputs.shape()[1..], [1, 4, 4]);
//!     // Padded pixels are normalized zeros.
//!     assert!((batch.inputs[[0, 0, 0, 0]] - (0.0 - 0.1307) / 0.3081).abs() < 1e-6);
//! }
//! assert_eq!(ds.batch(2, 2)?.labels, Some(vec![4, 1]));
//!
//! // NPY round trip of the first batch.
//! let npy = dir.join("batch.npy");
//! write_npy_f32(&npy, &ds.batch(0, 2)?.inputs)?;
//! assert_eq!(read_npy_f32(&npy)?.shape(), &[2, 1, 4, 4]);
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod calibrator;
pub mod dataset;
pub mod error;
pub mod refine;
pub mod smooth;

pub use calibrator::{
    activation_params, calibrate, calibrate_on, calibrate_owned, match_node_patterns,
    weight_params, BatchRunner, CalibConfig, Calibrated, Progress, RunnerFactory, TensorSink,
};
pub use dataset::{Batch, ColorMode, ImageDataset, Images, Preprocess};
pub use error::{CalibError, Result};
pub use smooth::Smoothing;

/// The commonly used items in one import.
pub mod prelude {
    pub use crate::dataset::{
        labels_path_for, read_idx, read_idx_images, read_idx_labels, read_npy_f32, read_npy_i64,
        sample_indices, write_npy_f32, Batch, ColorMode, ImageDataset, ImageFolder, Images,
        Preprocess,
    };
    pub use crate::error::{CalibError, Result};
}
