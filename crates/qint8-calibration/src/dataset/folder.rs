//! Image folders in torchvision's `ImageFolder` layout, and image decoding.
//!
//! `ROOT/<class>/<file>`: the class folders, sorted by name, give the
//! labels `0..K-1`; every `.jpg`, `.jpeg` or `.png` file (extension in any
//! case) below a class folder, subfolders included, is an item of that
//! class; files are ordered by path. Hidden files and folders (names
//! starting with `.`) and files with other extensions are skipped. As in
//! torchvision, a class folder without images is an error (its label
//! would be unused), and files directly in `ROOT` are ignored when there
//! are class folders. A folder holding images but no subfolders is read as
//! one unlabeled set (enough for calibration).
//!
//! Unlike torchvision, hidden folders (`.ipynb_checkpoints`, ...) are not
//! classes, so labels can differ from torchvision's when such folders
//! exist.
//!
//! [`decode_image`] turns a file into `u8` pixels with the `image` crate
//! (the format is sniffed from the content, not the extension): RGB with
//! alpha dropped, as PIL's `convert("RGB")` does, or grayscale with PIL's
//! ITU-R 601-2 weights (`convert("L")`), both bit-exact. PNG pixels are
//! exactly Pillow's. JPEG decoders differ in their IDCT and chroma
//! upsampling: on a worst-case (random noise) JPEG, pixels decoded here
//! (zune-jpeg) differed from Pillow's (libjpeg-turbo) by 0.5 levels on
//! average and up to 18 on a few pixels; natural images differ far less.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{io_error, CalibError, Result};

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Deepest folder nesting followed below a class folder (guards against
/// symbolic-link loops).
const MAX_DEPTH: usize = 32;

/// The channels image files are decoded to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ColorMode {
    /// Three channels, red, green, blue (alpha dropped). The default.
    #[default]
    Rgb,
    /// One channel, `L = R * 299/1000 + G * 587/1000 + B * 114/1000` as
    /// PIL computes it (grayscale files are read as they are).
    Gray,
}

impl ColorMode {
    /// Number of channels: 3 or 1.
    pub fn channels(self) -> usize {
        match self {
            Self::Rgb => 3,
            Self::Gray => 1,
        }
    }
}

/// The files and labels of an image folder, as listed by
/// [`ImageFolder::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Option<Vec<usize>>,
}

/// Whether `name` is hidden (starts with a dot).
fn hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`].
fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Entries of `dir` that are not hidden: `(name, path, is_dir)`, following
/// symbolic links.
fn entries(dir: &Path) -> Result<Vec<(OsString, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, "listing", e))? {
        let entry = entry.map_err(|e| io_error(dir, "listing", e))?;
        let name = entry.file_name();
        if hidden(&name) {
            continue;
        }
        let path = entry.path();
        // Follow links; a dangling link is neither a file nor a folder.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() || meta.is_file() {
            out.push((name, path, meta.is_dir()));
        }
    }
    Ok(out)
}

/// Image files below `dir`, recursively, appended to `out`.
fn collect_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    for (_, path, is_dir) in entries(dir)? {
        if is_dir {
            if depth < MAX_DEPTH {
                collect_images(&path, depth + 1, out)?;
            }
        } else if is_image_name(&path) {
            out.push(path);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Lists `root`: its class folders and their image files (see the
    /// [module docs](self) for the rules).
    ///
    /// Errors: [`CalibError::NotFound`] when `root` does not exist,
    /// [`CalibError::Io`] when it is not a readable folder, and
    /// [`CalibError::EmptyDataset`] naming `root` when it holds no images
    /// or some class folder holds none (the classes are listed).
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let meta = std::fs::metadata(root).map_err(|e| io_error(root, "opening", e))?;
        if !meta.is_dir() {
            return Err(CalibError::Io {
                path: root.to_path_buf(),
                action: "listing",
                source: std::io::Error::other("not a folder"),
            });
        }
        let mut dirs = Vec::new();
        let mut loose = Vec::new();
        for (name, path, is_dir) in entries(root)? {
            if is_dir {
                dirs.push((name, path));
            } else if is_image_name(&path) {
                loose.push(path);
            }
        }
        let extensions = IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", ");
        if dirs.is_empty() {
            if loose.is_empty() {
                return Err(CalibError::EmptyDataset {
                    what: format!(
                        "{} holds no class folders and no images ({extensions})",
                        root.display()
                    ),
                });
            }
            loose.sort();
            return Ok(Self {
                root: root.to_path_buf(),
                classes: Vec::new(),
                files: loose,
                labels: None,
            });
        }
        // Python sorts str by code point, which is UTF-8 byte order.
        dirs.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut classes = Vec::with_capacity(dirs.len());
        let mut empty = Vec::new();
        for (label, (name, path)) in dirs.iter().enumerate() {
            let class = name.to_string_lossy().into_owned();
            let mut found = Vec::new();
            collect_images(path, 1, &mut found)?;
            if found.is_empty() {
                empty.push(class.clone());
            }
            found.sort();
            labels.extend(std::iter::repeat_n(label, found.len()));
            files.extend(found);
            classes.push(class);
        }
        if files.is_empty() {
            return Err(CalibError::EmptyDataset {
                what: format!(
                    "no images ({extensions}) in the {} class folder(s) of {}",
                    classes.len(),
                    root.display()
                ),
            });
        }
        if !empty.is_empty() {
            return Err(CalibError::EmptyDataset {
                what: format!(
                    "class folder(s) without images ({extensions}) in {}: {}",
                    root.display(),
                    empty.join(", ")
                ),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            files,
            labels: Some(labels),
        })
    }

    /// The folder scanned.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names (folder names, sorted); empty for an unlabeled folder.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The image files, ordered by class, then path.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The label (class index) of every file, or `None` for a folder of
    /// images without class folders.
    pub fn labels(&self) -> Option<&[usize]> {
        self.labels.as_deref()
    }

    /// Consumes the listing: `(files, labels, classes)`.
    pub fn into_parts(self) -> (Vec<PathBuf>, Option<Vec<usize>>, Vec<String>) {
        (self.files, self.labels, self.classes)
    }
}

/// Maps an `image` crate error on `path` to [`CalibError`].
fn image_error(path: &Path, e: image::ImageError) -> CalibError {
    match e {
        image::ImageError::IoError(e) => io_error(path, "reading", e),
        other => CalibError::Decode {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

/// Height and width of the image in `path`, from its header only.
///
/// Errors name the file: [`CalibError::NotFound`], [`CalibError::Io`], or
/// [`CalibError::Decode`] when it is not a readable PNG or JPEG image.
pub fn image_dimensions(path: &Path) -> Result<(usize, usize)> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| io_error(path, "opening", e))?
        .with_guessed_format()
        .map_err(|e| io_error(path, "reading", e))?;
    let (w, h) = reader.into_dimensions().map_err(|e| image_error(path, e))?;
    Ok((h as usize, w as usize))
}

/// Decodes the image in `path` to `u8` pixels `H x W x C` (`C` from
/// `color`), returning `(pixels, height, width)`.
///
/// Errors name the file: [`CalibError::NotFound`], [`CalibError::Io`], or
/// [`CalibError::Decode`] for corrupt, truncated or unsupported files and
/// images without pixels.
pub fn decode_image(path: &Path, color: ColorMode) -> Result<(Vec<u8>, usize, usize)> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| io_error(path, "opening", e))?
        .with_guessed_format()
        .map_err(|e| io_error(path, "reading", e))?;
    let img = reader.decode().map_err(|e| image_error(path, e))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(CalibError::Decode {
            path: path.to_path_buf(),
            reason: format!("the image has no pixels ({w}x{h})"),
        });
    }
    let pixels = match color {
        ColorMode::Rgb => img.into_rgb8().into_raw(),
        ColorMode::Gray => match img {
            image::DynamicImage::ImageLuma8(b) => b.into_raw(),
            image::DynamicImage::ImageLumaA8(_)
            | image::DynamicImage::ImageLuma16(_)
            | image::DynamicImage::ImageLumaA16(_) => img.into_luma8().into_raw(),
            other => other
                .into_rgb8()
                .into_raw()
                .chunks_exact(3)
                .map(|p| pil_luma(p[0], p[1], p[2]))
                .collect(),
        },
    };
    Ok((pixels, h, w))
}

/// PIL's RGB to L conversion (`L24` in `Convert.c`): ITU-R 601-2 weights in
/// 16-bit fixed point, rounded.
fn pil_luma(r: u8, g: u8, b: u8) -> u8 {
    let l = (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16;
    l.min(255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_and_hidden_names() {
        assert!(is_image_name(Path::new("a/b.JPG")));
        assert!(is_image_name(Path::new("b.jpeg")));
        assert!(is_image_name(Path::new("b.Png")));
        assert!(!is_image_name(Path::new("b.gif")));
        assert!(!is_image_name(Path::new("png")));
        assert!(hidden(std::ffi::OsStr::new(".x.png")));
        assert!(!hidden(std::ffi::OsStr::new("x.png")));
    }

    #[test]
    fn luma_matches_pil() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)).
        assert_eq!(pil_luma(255, 255, 255), 255);
        assert_eq!(pil_luma(0, 0, 0), 0);
        assert_eq!(pil_luma(255, 0, 0), 76);
        assert_eq!(pil_luma(0, 255, 0), 150);
        assert_eq!(pil_luma(0, 0, 255), 29);
        assert_eq!(pil_luma(10, 200, 30), 124);
    }
}
