//! Opening the data of `qint8 eval` and `qint8 quantize`: an IDX images
//! file (optionally gzipped), an image folder (`ROOT/<class>/<image>`, JPEG
//! and PNG) or a float32 NPY file of preprocessed inputs `[N, C, H, W]`,
//! told apart by the path (a folder, a `.npy` name, anything else is IDX).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qint8_calibration::dataset::idx::{labels_path_candidates, labels_path_for};
use qint8_calibration::{ColorMode, ImageDataset, Preprocess};
use qint8_eval::Evaluator;
use qint8_graph::Model;

use crate::cli::PreprocessArgs;
use crate::run::check_input_shape;

/// The kinds of data the commands read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataKind {
    /// An IDX images file (uint8), gzipped or not.
    Idx,
    /// An image folder in torchvision's ImageFolder layout.
    Folder,
    /// A float32 NPY file of preprocessed inputs.
    Npy,
}

impl DataKind {
    /// The kind of the data at `path`: a folder, a `.npy` file, or IDX.
    ///
    /// Errors when `path` does not exist.
    pub(crate) fn of(path: &Path) -> Result<Self> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "images file, image folder or NPY file {} not found",
                path.display()
            ),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("opening {}", path.display())))
            }
        };
        Ok(if meta.is_dir() {
            Self::Folder
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
        {
            Self::Npy
        } else {
            Self::Idx
        })
    }

    /// Lower-case name, as JSON output reports it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Idx => "idx",
            Self::Folder => "folder",
            Self::Npy => "npy",
        }
    }
}

/// A dataset and where it came from.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The items.
    pub(crate) dataset: ImageDataset,
    /// What the path held.
    pub(crate) kind: DataKind,
    /// Where the labels came from, in words (a path, or the class folders),
    /// when labels were read.
    pub(crate) labels: Option<String>,
}

impl Opened {
    /// The preprocessing in words for human output: `pad 2` for IDX data
    /// that is only padded (as before folders existed), `resize 256, crop
    /// 224, pad 0` when images are resized or cropped, `used as stored`
    /// for NPY.
    pub(crate) fn preprocessing_text(&self) -> String {
        let p = self.dataset.preprocess();
        if self.kind == DataKind::Npy {
            return "used as stored".into();
        }
        let mut parts = Vec::new();
        if let Some(r) = p.resize {
            parts.push(format!("resize {r}"));
        }
        if let Some(c) = p.crop {
            parts.push(format!("crop {c}"));
        }
        parts.push(format!("pad {}", p.pad));
        parts.join(", ")
    }
}

/// Rejects preprocessing flags that do not apply to `kind`.
fn check_flags(kind: DataKind, path: &Path, pre: &PreprocessArgs) -> Result<()> {
    match kind {
        DataKind::Npy => {
            let mut given = Vec::new();
            if pre.mean.is_some() {
                given.push("--mean");
            }
            if pre.std.is_some() {
                given.push("--std");
            }
            if pre.pad != 0 {
                given.push("--pad");
            }
            if pre.resize.is_some() {
                given.push("--resize");
            }
            if pre.crop.is_some() {
                given.push("--crop");
            }
            if pre.imagenet {
                given.push("--imagenet");
            }
            if pre.grayscale {
                given.push("--grayscale");
            }
            if !given.is_empty() {
                bail!(
                    "{}: NPY inputs are model inputs already and are used as stored; {} \
                     apply to images (IDX files and image folders) only",
                    path.display(),
                    given.join(", ")
                );
            }
        }
        DataKind::Idx if pre.grayscale => bail!(
            "{}: --grayscale applies to image folders; IDX images keep the channels they have",
            path.display()
        ),
        _ => {}
    }
    Ok(())
}

/// Opens `path` for calibration: images without labels.
pub(crate) fn open_unlabeled(path: &Path, pre: &PreprocessArgs) -> Result<Opened> {
    let kind = DataKind::of(path)?;
    check_flags(kind, path, pre)?;
    let preprocess = pre.preprocess();
    let dataset = match kind {
        DataKind::Idx => ImageDataset::from_idx(path, None, preprocess)
            .with_context(|| format!("reading images {}", path.display()))?,
        DataKind::Folder => ImageDataset::from_folder(path, color(pre), preprocess)
            .with_context(|| format!("reading image folder {}", path.display()))?,
        DataKind::Npy => ImageDataset::from_npy(path, None, Preprocess::default())
            .with_context(|| format!("reading inputs {}", path.display()))?,
    };
    Ok(Opened {
        dataset,
        kind,
        labels: None,
    })
}

/// Opens `path` with labels: IDX labels from `labels` or beside the
/// images, folder labels from the class folders, NPY labels from `labels`.
pub(crate) fn open_labeled(
    path: &Path,
    labels: Option<&Path>,
    pre: &PreprocessArgs,
) -> Result<Opened> {
    let kind = DataKind::of(path)?;
    check_flags(kind, path, pre)?;
    let preprocess = pre.preprocess();
    let (dataset, source) =
        match kind {
            DataKind::Idx => {
                let labels_path = match labels {
                    Some(p) => p.to_path_buf(),
                    None => find_labels(path)?,
                };
                let ds = ImageDataset::from_idx(path, Some(&labels_path), preprocess)
                    .with_context(|| {
                        format!(
                            "reading images {} with labels {}",
                            path.display(),
                            labels_path.display()
                        )
                    })?;
                (ds, labels_path.display().to_string())
            }
            DataKind::Folder => {
                if let Some(l) = labels {
                    bail!(
                        "--labels {}: an image folder's labels are its class folders, so --labels \
                     applies to IDX and NPY data only",
                        l.display()
                    );
                }
                let ds = ImageDataset::from_folder(path, color(pre), preprocess)
                    .with_context(|| format!("reading image folder {}", path.display()))?;
                let Some(classes) = ds.class_names() else {
                    bail!(
                        "{}: the images are not in class folders (ROOT/<class>/<image>), so they \
                     have no labels",
                        path.display()
                    );
                };
                let source = format!(
                    "class folders of {} ({} classes)",
                    path.display(),
                    classes.len()
                );
                (ds, source)
            }
            DataKind::Npy => {
                let Some(l) = labels else {
                    bail!(
                        "{}: NPY inputs need --labels LABELS.npy (int64 class indices, shape [N])",
                        path.display()
                    );
                };
                let ds = ImageDataset::from_npy(path, Some(l), Preprocess::default())
                    .with_context(|| {
                        format!(
                            "reading inputs {} with labels {}",
                            path.display(),
                            l.display()
                        )
                    })?;
                (ds, l.display().to_string())
            }
        };
    Ok(Opened {
        dataset,
        kind,
        labels: Some(source),
    })
}

/// The colour mode of image folders.
fn color(pre: &PreprocessArgs) -> ColorMode {
    if pre.grayscale {
        ColorMode::Gray
    } else {
        ColorMode::Rgb
    }
}

/// The labels file beside `images`, or an error listing where it was sought.
pub(crate) fn find_labels(images: &Path) -> Result<PathBuf> {
    if let Some(p) = labels_path_for(images) {
        return Ok(p);
    }
    let tried: Vec<String> = labels_path_candidates(images)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if tried.is_empty() {
        bail!(
            "no labels file for {}: its name does not end in -images-idx3-ubyte[.gz], so pass --labels",
            images.display()
        );
    }
    bail!(
        "no labels file for {}: none of {} exists; pass --labels",
        images.display(),
        tried.join(", ")
    )
}

/// The calibration set `args` name, preprocessed by `pre`: the first
/// `--calib-size` images, or that many chosen with `--calib-seed`. Its
/// images must fit `model`'s declared input (checked before any
/// calibration runs, so that a missing `--pad` is named as such and not as
/// a pooling window deep in the network).
pub(crate) fn open_calibration(
    args: &crate::cli::CalibDataArgs,
    pre: &PreprocessArgs,
    model: &qint8_graph::Model,
) -> Result<Opened> {
    let calib = args.required();
    let mut opened = open_unlabeled(calib, pre)?;
    opened.dataset = match args.calib_seed {
        Some(seed) => opened.dataset.sample(args.calib_size, seed)?,
        None => opened.dataset.take(args.calib_size)?,
    };
    if opened.dataset.is_empty() {
        anyhow::bail!("{}: no calibration images", calib.display());
    }
    if let Some(input) = model.graph.inputs.first() {
        let [c, h, w] = opened.dataset.input_shape();
        // The batch as declared where it is fixed (calibration picks its
        // own), else all the images.
        let batch = match input.shape.as_deref() {
            Some([qint8_graph::Dim::Fixed(b), ..]) => *b,
            _ => opened.dataset.len(),
        };
        crate::run::check_input_shape(
            input,
            &[batch, c, h, w],
            &input_description(calib, &opened.preprocessing_text(), opened.kind, c),
        )?;
    }
    Ok(opened)
}

/// The labeled evaluation set (`--data`, `--labels`), its first `limit`
/// images when given.
pub(crate) fn open_evaluation(
    data: &Path,
    labels: Option<&Path>,
    pre: &PreprocessArgs,
    limit: Option<usize>,
) -> Result<Opened> {
    let mut opened = open_labeled(data, labels, pre)?;
    if let Some(limit) = limit {
        opened.dataset = opened.dataset.take(limit)?;
    }
    Ok(opened)
}

/// The evaluation set to score: with `unlabeled`, `data` without labels
/// (for [`label_with_predictions`] to label; `labels` then says
/// [`FP32_LABELS`]), else as [`open_evaluation`] opens it, where an error
/// about missing labels for images that do open also gives `hint` (the
/// flag that scores without labels).
pub(crate) fn open_scored(
    data: &Path,
    labels: Option<&Path>,
    pre: &PreprocessArgs,
    limit: Option<usize>,
    unlabeled: bool,
    hint: &str,
) -> Result<Opened> {
    if unlabeled {
        let mut opened = open_unlabeled(data, pre)?;
        if let Some(limit) = limit {
            opened.dataset = opened.dataset.take(limit)?;
        }
        opened.labels = Some(FP32_LABELS.into());
        return Ok(opened);
    }
    match open_evaluation(data, labels, pre, limit) {
        Ok(o) => Ok(o),
        // The images open; only their labels are missing.
        Err(e) if labels.is_none() && open_unlabeled(data, pre).is_ok() => {
            bail!("{e:#}; or, for data without labels, {hint}")
        }
        Err(e) => Err(e),
    }
}

/// [`open_scored`]'s hint for the commands that take `--fp32-labels`.
pub(crate) const FP32_LABELS_HINT: &str = "--fp32-labels scores against FP32's predictions";

/// Where the labels come from with `--fp32-labels`, in words.
pub(crate) const FP32_LABELS: &str = "FP32's predictions (--fp32-labels)";

/// `data` labeled with `reference`'s top-1 predictions, so that another
/// model's top-1 on it is its agreement with `reference` (one evaluation of
/// `reference`, which `name` names in errors, as `what` names the data;
/// `progress` is told the images done).
pub(crate) fn label_with_predictions(
    reference: &Model,
    name: &str,
    data: ImageDataset,
    what: &str,
    batch: usize,
    threads: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<ImageDataset> {
    // Images that do not fit the model are named as such before it runs.
    if let Some(input) = reference.graph.inputs.first() {
        let [c, h, w] = data.input_shape();
        check_input_shape(input, &[batch.min(data.len()), c, h, w], what)
            .with_context(|| format!("labeling the images with the predictions of {name}"))?;
    }
    let e = Evaluator::new(reference, name, threads)?;
    let predicted = e
        .predict(&data, batch, progress)
        .with_context(|| format!("labeling the images with the predictions of {name}"))?;
    Ok(data.with_labels(predicted)?)
}

/// How errors about the model input name the data: the path, its
/// preprocessing, and for RGB folders the hint that `--grayscale` exists.
pub(crate) fn input_description(
    data: &Path,
    prep_text: &str,
    kind: DataKind,
    channels: usize,
) -> String {
    format!(
        "the data ({}, {}{})",
        data.display(),
        prep_text,
        if kind == DataKind::Folder && channels == 3 {
            "; --grayscale makes 1-channel inputs"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_path() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DataKind::of(dir.path()).unwrap(), DataKind::Folder);
        let npy = dir.path().join("x.NPY");
        std::fs::write(&npy, b"").unwrap();
        assert_eq!(DataKind::of(&npy).unwrap(), DataKind::Npy);
        let idx = dir.path().join("t10k-images-idx3-ubyte.gz");
        std::fs::write(&idx, b"").unwrap();
        assert_eq!(DataKind::of(&idx).unwrap(), DataKind::Idx);
        let e = DataKind::of(&dir.path().join("absent")).unwrap_err();
        assert!(format!("{e:#}").contains("absent"));
    }

    #[test]
    fn missing_labels_are_explained() {
        let dir = std::env::temp_dir();
        let e = find_labels(&dir.join("nowhere-images-idx3-ubyte")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("nowhere-labels-idx1-ubyte"), "{msg}");
        let e = find_labels(&dir.join("data.bin")).unwrap_err();
        assert!(format!("{e:#}").contains("--labels"));
    }
}
