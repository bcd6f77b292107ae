//! Image folders, NPY datasets and seeded sampling, on files generated here.

use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use ndarray::Array4;
use qint8_calibration::dataset::sample::sample_indices;
use qint8_calibration::prelude::*;

/// A constant-colour RGB image of `w x h` saved as `path` (format from the
/// extension).
fn save_rgb(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(w, h, Rgb(rgb)).save(path).unwrap();
}

/// A gradient RGB image saved in `format`, whatever the extension.
fn save_gradient(path: &Path, w: u32, h: u32, format: ImageFormat) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    img.save_with_format(path, format).unwrap();
}

/// Three classes (`ant`, `bee`, `cat`) with PNG and JPEG files of
/// different sizes and aspect ratios, plus files that must be skipped.
/// Returns the files in the expected order with their labels.
fn make_folder(root: &Path) -> Vec<(PathBuf, usize)> {
    let files = [
        ("ant/a1.png", 40, 30, 0),
        ("ant/a2.JPG", 64, 48, 0),
        ("ant/nested/a3.png", 30, 50, 0),
        ("bee/b1.jpeg", 33, 33, 1),
        ("bee/b2.png", 100, 20, 1),
        ("cat/c1.PNG", 20, 90, 2),
        ("cat/c2.jpg", 45, 61, 2),
    ];
    let mut out = Vec::new();
    for (name, w, h, label) in files {
        let p = root.join(name);
        let lower = name.to_ascii_lowercase();
        let format = if lower.ends_with(".png") {
            ImageFormat::Png
        } else {
            ImageFormat::Jpeg
        };
        save_gradient(&p, w, h, format);
        out.push((p, label));
    }
    // Skipped: other extensions, hidden files and folders, loose files.
    std::fs::write(root.join("ant/notes.txt"), "not an image").unwrap();
    save_rgb(&root.join("bee/.hidden.png"), 5, 5, [1, 2, 3]);
    save_rgb(&root.join(".cache/x.png"), 5, 5, [1, 2, 3]);
    save_rgb(&root.join("loose.png"), 5, 5, [1, 2, 3]);
    out
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + b.abs())
}

#[test]
fn folder_labels_order_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let expected = make_folder(dir.path());
    let pre = Preprocess::imagenet().with_resize(32).with_crop(24);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre.clone()).unwrap();
    assert_eq!(ds.len(), expected.len());
    assert_eq!(ds.class_names().unwrap(), &["ant", "bee", "cat"]);
    let labels: Vec<usize> = expected.iter().map(|(_, l)| *l).collect();
    assert_eq!(ds.labels().unwrap(), labels.as_slice());
    let files: Vec<PathBuf> = expected.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(ds.files().unwrap(), files.as_slice());
    assert!(ds.images().is_none());
    assert_eq!(ds.input_shape(), [3, 24, 24]);

    let batches: Vec<Batch> = ds.batches(3).collect::<Result<_>>().unwrap();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].inputs.shape(), &[3, 3, 24, 24]);
    assert_eq!(batches[2].inputs.shape(), &[1, 3, 24, 24]);
    assert_eq!(batches[1].labels, Some(vec![1, 1, 2]));
    // Normalized values of [0, 255] pixels stay within the ImageNet range.
    for b in &batches {
        assert!(b
            .inputs
            .iter()
            .all(|x| x.is_finite() && (-2.2..=2.7).contains(x)));
    }

    // Grayscale: one channel, padding adds to the size.
    let gray = ImageDataset::from_folder(
        dir.path(),
        ColorMode::Gray,
        Preprocess::default()
            .with_resize(32)
            .with_crop(32)
            .with_pad(2),
    )
    .unwrap();
    assert_eq!(gray.input_shape(), [1, 36, 36]);
    assert_eq!(gray.batch(0, 7).unwrap().inputs.shape(), &[7, 1, 36, 36]);

    // Batches of a folder are deterministic.
    let again = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre).unwrap();
    assert_eq!(again.batch(2, 4).unwrap(), ds.batch(2, 4).unwrap());
}

#[test]
fn constant_png_gives_exact_normalized_values() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = [10u8, 128, 250];
    // 90x40: resized to 72x32 (shorter side 32), cropped to 24x24.
    save_rgb(&dir.path().join("only/img.png"), 90, 40, rgb);
    let pre = Preprocess::imagenet().with_resize(32).with_crop(24);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre.clone()).unwrap();
    let b = ds.batch(0, 1).unwrap();
    assert_eq!(b.inputs.shape(), &[1, 3, 24, 24]);
    assert_eq!(b.labels, Some(vec![0]));
    for (c, &v) in rgb.iter().enumerate() {
        // The formula of Preprocess, in f32, as the lookup table computes it.
        let want = (f32::from(v) * pre.scale - pre.mean[c]) / pre.std[c];
        let plane = b.inputs.index_axis(ndarray::Axis(1), c);
        assert!(
            plane.iter().all(|&x| x == want),
            "channel {c}: {plane:?} vs {want}"
        );
    }

    // Grayscale with PIL's weights: L(10, 128, 250) = 107; pad 1 is a
    // normalized zero.
    let pre = Preprocess::normalize(vec![0.5], vec![0.25])
        .with_resize(8)
        .with_crop(8)
        .with_pad(1);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Gray, pre).unwrap();
    let b = ds.batch(0, 1).unwrap();
    assert_eq!(b.inputs.shape(), &[1, 1, 10, 10]);
    let l = (10 * 19595 + 128 * 38470 + 250 * 7471 + 0x8000) >> 16;
    assert_eq!(l, 107);
    assert!(close(
        b.inputs[[0, 0, 5, 5]],
        (l as f32 / 255.0 - 0.5) / 0.25
    ));
    assert!(close(b.inputs[[0, 0, 0, 3]], -2.0));
    assert!(close(b.inputs[[0, 0, 9, 9]], -2.0));
}

#[test]
fn resize_keeps_aspect_and_crop_takes_the_centre() {
    // A 60x20 PNG: a white band over columns 15..45, black elsewhere.
    // Resize(10) gives 30x10; CenterCrop(10) keeps columns 10..20, whose
    // filter window (source columns 18..42) is all white.
    let dir = tempfile::tempdir().unwrap();
    let img = RgbImage::from_fn(60, 20, |x, _| {
        if (15..45).contains(&x) {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 0, 0])
        }
    });
    let p = dir.path().join("k/bars.png");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    img.save(&p).unwrap();
    let pre = Preprocess::default().with_resize(10).with_crop(10);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Gray, pre).unwrap();
    let b = ds.batch(0, 1).unwrap();
    assert!(b.inputs.iter().all(|&x| x == 1.0), "{:?}", b.inputs);
    // Without the crop the whole 30x10 image comes out: dark edges.
    let pre = Preprocess::default().with_resize(10);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Gray, pre).unwrap();
    assert_eq!(ds.input_shape(), [1, 10, 30]);
    let b = ds.batch(0, 1).unwrap();
    assert_eq!(b.inputs[[0, 0, 5, 0]], 0.0);
    assert_eq!(b.inputs[[0, 0, 5, 15]], 1.0);
}

#[test]
fn in_memory_images_can_be_resized_and_cropped() {
    // Two 4x6 grayscale images of constant 51 and 204.
    let mut px = vec![51u8; 24];
    px.extend(vec![204u8; 24]);
    let images = Images::new(2, 4, 6, 1, px).unwrap();
    let pre = Preprocess::default()
        .with_resize(2)
        .with_crop(2)
        .with_pad(1);
    let ds = ImageDataset::new(images, Some(vec![3, 4]), pre).unwrap();
    assert_eq!(ds.input_shape(), [1, 4, 4]);
    let b = ds.batch(0, 2).unwrap();
    assert!(close(b.inputs[[0, 0, 1, 1]], 0.2));
    assert!(close(b.inputs[[1, 0, 2, 2]], 0.8));
    assert_eq!(b.inputs[[1, 0, 0, 0]], 0.0);
}

#[test]
fn corrupt_and_missing_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    save_rgb(&dir.path().join("a/1.png"), 8, 8, [9, 9, 9]);
    save_rgb(&dir.path().join("a/3.png"), 8, 8, [9, 9, 9]);
    let bad = dir.path().join("a/2.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n this is not really a png").unwrap();
    let pre = Preprocess::default().with_resize(8).with_crop(8);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre.clone()).unwrap();
    assert_eq!(ds.len(), 3);
    assert!(ds.batch(0, 1).is_ok());
    let e = ds.batch(0, 3).unwrap_err();
    assert!(
        matches!(e, CalibError::Decode { ref path, .. } if path == &bad),
        "{e}"
    );
    assert!(e.to_string().contains("2.png"), "{e}");
    let results: Vec<_> = ds.batches(2).collect();
    assert!(results[0].is_err());

    // Text with an image extension: also a decode error naming the file.
    let txt = dir.path().join("a/0.jpg");
    std::fs::write(&txt, "hello").unwrap();
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Gray, pre.clone()).unwrap();
    let e = ds.batch(0, 1).unwrap_err();
    assert!(e.to_string().contains("0.jpg"), "{e}");
    // Without a crop the first image's header is read up front.
    let e =
        ImageDataset::from_folder(dir.path(), ColorMode::Gray, Preprocess::default()).unwrap_err();
    assert!(e.to_string().contains("0.jpg"), "{e}");

    // Images are decoded lazily: a file removed after listing fails its batch.
    std::fs::remove_file(&txt).unwrap();
    std::fs::remove_file(&bad).unwrap();
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Gray, pre).unwrap();
    assert_eq!(ds.len(), 2);
    let gone = dir.path().join("a/3.png");
    std::fs::remove_file(&gone).unwrap();
    assert!(ds.batch(0, 1).is_ok());
    let e = ds.batch(1, 1).unwrap_err();
    assert!(
        matches!(e, CalibError::NotFound { ref path } if path == &gone),
        "{e}"
    );
}

#[test]
fn images_of_different_sizes_need_a_crop() {
    let dir = tempfile::tempdir().unwrap();
    save_rgb(&dir.path().join("c/a.png"), 10, 10, [0, 0, 0]);
    save_rgb(&dir.path().join("c/b.png"), 12, 10, [0, 0, 0]);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, Preprocess::default()).unwrap();
    assert_eq!(ds.input_shape(), [3, 10, 10]);
    assert!(ds.batch(0, 1).is_ok());
    let e = ds.batch(0, 2).unwrap_err();
    match &e {
        CalibError::ImageSizeMismatch {
            path,
            expected,
            got,
        } => {
            assert!(path.ends_with("c/b.png"), "{e}");
            assert_eq!((*expected, *got), ([10, 10], [10, 12]));
        }
        other => panic!("unexpected {other}"),
    }
    // A crop makes them batchable.
    let pre = Preprocess::default().with_crop(10);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre).unwrap();
    assert_eq!(ds.batch(0, 2).unwrap().inputs.shape(), &[2, 3, 10, 10]);
}

#[test]
fn empty_and_invalid_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pre = Preprocess::imagenet();
    let empty = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre.clone()).unwrap_err();
    assert!(matches!(empty, CalibError::EmptyDataset { .. }), "{empty}");
    assert!(empty.to_string().contains("no class folders"), "{empty}");

    // Class folders with nothing usable in them.
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::write(dir.path().join("a/readme.txt"), "x").unwrap();
    let e = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre.clone()).unwrap_err();
    assert!(matches!(e, CalibError::EmptyDataset { .. }), "{e}");
    assert!(e.to_string().contains("no images"), "{e}");

    // One class with images, one without: the empty class is named.
    save_rgb(&dir.path().join("b/x.png"), 4, 4, [0, 0, 0]);
    let e = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre.clone()).unwrap_err();
    assert!(e.to_string().contains(": a"), "{e}");

    let missing = dir.path().join("nope");
    let e = ImageDataset::from_folder(&missing, ColorMode::Rgb, pre.clone()).unwrap_err();
    assert!(
        matches!(e, CalibError::NotFound { ref path } if path == &missing),
        "{e}"
    );
    let e = ImageDataset::from_folder(dir.path().join("b/x.png"), ColorMode::Rgb, pre.clone())
        .unwrap_err();
    assert!(e.to_string().contains("x.png"), "{e}");

    // Crop larger than resize, zero sizes, wrong mean length.
    std::fs::remove_dir_all(dir.path().join("a")).unwrap();
    let bad = Preprocess::default().with_resize(16).with_crop(32);
    let e = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, bad).unwrap_err();
    assert!(
        matches!(e, CalibError::BadPreprocess { field: "crop", .. }),
        "{e}"
    );
    let bad = Preprocess::default().with_resize(0);
    assert!(ImageDataset::from_folder(dir.path(), ColorMode::Rgb, bad).is_err());
    let e =
        ImageDataset::from_folder(dir.path(), ColorMode::Gray, Preprocess::imagenet()).unwrap_err();
    assert!(
        matches!(e, CalibError::BadPreprocess { field: "mean", .. }),
        "{e}"
    );
}

#[test]
fn a_flat_folder_is_an_unlabeled_set() {
    let dir = tempfile::tempdir().unwrap();
    save_rgb(&dir.path().join("b.png"), 6, 6, [1, 1, 1]);
    save_rgb(&dir.path().join("a.png"), 6, 6, [1, 1, 1]);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, Preprocess::default()).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.labels(), None);
    assert_eq!(ds.class_names(), None);
    assert!(ds.files().unwrap()[0].ends_with("a.png"));
    assert_eq!(ds.batch(0, 2).unwrap().labels, None);
}

#[test]
fn labels_can_be_given_afterwards_one_per_item() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let pre = Preprocess::imagenet().with_resize(16).with_crop(16);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre).unwrap();
    assert!(ds.class_names().is_some());
    let n = ds.len();
    let e = ds.clone().with_labels(vec![0; n + 1]).unwrap_err();
    assert!(
        matches!(e, CalibError::LabelCountMismatch { images, labels } if images == n && labels == n + 1),
        "{e}"
    );
    let given: Vec<usize> = (0..n).map(|i| 7 + i).collect();
    let l = ds.with_labels(given.clone()).unwrap();
    assert_eq!(l.labels(), Some(given.as_slice()));
    // The folders' names no longer name these labels.
    assert_eq!(l.class_names(), None);
    assert_eq!(l.batch(1, 2).unwrap().labels, Some(given[1..3].to_vec()));
    // They travel with their images.
    assert_eq!(l.select(&[2, 0]).unwrap().labels(), Some(&[9, 7][..]));
}

/// Fifty 1x1 grayscale images whose pixel and label are their index.
fn indexed(n: u8) -> ImageDataset {
    let images = Images::new(n.into(), 1, 1, 1, (0..n).collect()).unwrap();
    let pre = Preprocess {
        scale: 1.0,
        ..Preprocess::default()
    };
    ImageDataset::new(images, Some((0..n.into()).collect()), pre).unwrap()
}

#[test]
fn sample_is_seeded_distinct_and_in_range() {
    let ds = indexed(50);
    let a = ds.clone().sample(10, 1).unwrap();
    let b = ds.clone().sample(10, 1).unwrap();
    let c = ds.clone().sample(10, 2).unwrap();
    assert_eq!(a.len(), 10);
    assert_eq!(a.labels(), b.labels());
    assert_ne!(a.labels(), c.labels());
    for s in [&a, &c] {
        let l = s.labels().unwrap();
        assert!(l.windows(2).all(|w| w[0] < w[1]), "{l:?}");
        assert!(l.iter().all(|&i| i < 50));
        // The images travel with their labels.
        let px = s.batch(0, 10).unwrap().inputs;
        let px: Vec<usize> = px.iter().map(|&x| x as usize).collect();
        assert_eq!(px, l);
    }
    assert_eq!(a.labels().unwrap(), sample_indices(50, 10, 1).as_slice());
    // More than there are: everything, in order; zero: an error.
    let all = ds.clone().sample(80, 5).unwrap();
    assert_eq!(
        all.labels().unwrap(),
        (0..50).collect::<Vec<_>>().as_slice()
    );
    assert!(matches!(
        ds.clone().sample(0, 5),
        Err(CalibError::EmptyDataset { .. })
    ));
    // take is still the first N.
    assert_eq!(ds.clone().take(3).unwrap().labels(), Some(&[0, 1, 2][..]));
    // select keeps the given order and checks the range.
    let s = ds.clone().select(&[7, 3, 7]).unwrap();
    assert_eq!(s.labels(), Some(&[7, 3, 7][..]));
    assert!(matches!(
        ds.clone().select(&[1, 50]),
        Err(CalibError::BatchOutOfRange { start: 50, .. })
    ));
    assert!(ds.clone().select(&[]).is_err());
    // split: the sample's items and the rest, disjoint, both in order.
    let (held, rest) = ds.clone().split(10, 1).unwrap();
    assert_eq!(held.labels(), a.labels());
    let rest = rest.labels().unwrap();
    assert_eq!(rest.len(), 40);
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:?}");
    assert!(rest.iter().all(|i| !a.labels().unwrap().contains(i)));
    let px: Vec<usize> = ds
        .clone()
        .split(10, 1)
        .unwrap()
        .1
        .batch(0, 40)
        .unwrap()
        .inputs
        .iter()
        .map(|&x| x as usize)
        .collect();
    assert_eq!(px, rest);
    for n in [0, 50, 60] {
        assert!(
            matches!(ds.clone().split(n, 1), Err(CalibError::EmptyDataset { .. })),
            "{n}"
        );
    }
}

#[test]
fn sample_works_on_folders_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let expected = make_folder(dir.path());
    let pre = Preprocess::imagenet().with_resize(16).with_crop(16);
    let ds = ImageDataset::from_folder(dir.path(), ColorMode::Rgb, pre).unwrap();
    let all: Vec<PathBuf> = expected.iter().map(|(p, _)| p.clone()).collect();
    let s = ds.clone().sample(3, 11).unwrap();
    let again = ds.clone().sample(3, 11).unwrap();
    assert_eq!(s.files(), again.files());
    let files = s.files().unwrap();
    assert_eq!(files.len(), 3);
    let idx: Vec<usize> = files
        .iter()
        .map(|f| all.iter().position(|p| p == f).unwrap())
        .collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "{idx:?}");
    let labels: Vec<usize> = idx.iter().map(|&i| expected[i].1).collect();
    assert_eq!(s.labels().unwrap(), labels.as_slice());
    assert_eq!(s.class_names(), ds.class_names());
    assert_eq!(
        s.batch(0, 3).unwrap(),
        ds.clone().select(&idx).unwrap().batch(0, 3).unwrap()
    );
    // Some seed picks another subset.
    assert!((0..20).any(|seed| ds.clone().sample(3, seed).unwrap().files() != s.files()));

    let x = Array4::from_shape_fn((20, 2, 3, 3), |(n, c, h, w)| {
        (n * 100 + c * 10 + h * 3 + w) as f32
    });
    let t = ImageDataset::from_array(x, Some((0..20).collect())).unwrap();
    let s = t.sample(5, 3).unwrap();
    let labels = s.labels().unwrap().to_vec();
    assert_eq!(labels, sample_indices(20, 5, 3));
    let b = s.batch(0, 5).unwrap();
    for (i, &n) in labels.iter().enumerate() {
        assert_eq!(b.inputs[[i, 1, 2, 0]], (n * 100 + 10 + 6) as f32);
    }
}

/// Writes `values` as a little-endian int64 NPY vector (version 1.0).
fn write_npy_i64(path: &Path, values: &[i64], shape: &str) {
    let mut header = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn npy_round_trip_with_labels() {
    let dir = tempfile::tempdir().unwrap();
    let x = Array4::from_shape_fn((5, 2, 3, 4), |(n, c, h, w)| {
        n as f32 - 0.5 * c as f32 + 0.01 * (h * 4 + w) as f32
    });
    let xp = dir.path().join("x.npy");
    write_npy_f32(&xp, &x).unwrap();
    let lp = dir.path().join("y.npy");
    write_npy_i64(&lp, &[4, 0, 3, 1, 2], "(5,)");
    // Normalization settings are not applied to tensors.
    let pre = Preprocess::normalize(vec![0.5], vec![2.0]);
    let ds = ImageDataset::from_npy(&xp, Some(&lp), pre).unwrap();
    assert_eq!((ds.len(), ds.input_shape()), (5, [2, 3, 4]));
    assert_eq!(ds.labels(), Some(&[4, 0, 3, 1, 2][..]));
    assert!(ds.images().is_none() && ds.files().is_none());
    let all = ds.batch(0, 5).unwrap();
    assert_eq!(all.inputs, x.clone().into_dyn());
    let b = ds.batches(2).nth(1).unwrap().unwrap();
    assert_eq!(b.start, 2);
    assert_eq!(b.labels, Some(vec![3, 1]));
    assert_eq!(
        b.inputs,
        x.slice(ndarray::s![2..4, .., .., ..]).to_owned().into_dyn()
    );
    let t = ds.take(2).unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t.batch(0, 2).unwrap().labels, Some(vec![4, 0]));

    // Without labels.
    let ds = ImageDataset::from_npy(&xp, None, Preprocess::default()).unwrap();
    assert_eq!(ds.labels(), None);
}

#[test]
fn npy_shape_and_value_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let x3 = dir.path().join("three_dims.npy");
    write_npy_f32(&x3, &ndarray::Array3::<f32>::zeros((2, 3, 4))).unwrap();
    let e = ImageDataset::from_npy(&x3, None, Preprocess::default()).unwrap_err();
    assert!(
        matches!(e, CalibError::BadShape { ref got, .. } if got == &[2, 3, 4]),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("three_dims.npy") && msg.contains("[2, 3, 4]"),
        "{msg}"
    );

    let xp = dir.path().join("x.npy");
    write_npy_f32(&xp, &Array4::<f32>::zeros((3, 1, 2, 2))).unwrap();
    // Labels of the wrong shape, then of the wrong count (which names both
    // counts).
    let lp = dir.path().join("two_dims.npy");
    write_npy_i64(&lp, &[0i64, 1, 2], "(3, 1)");
    let e = ImageDataset::from_npy(&xp, Some(&lp), Preprocess::default()).unwrap_err();
    assert!(matches!(e, CalibError::BadShape { .. }), "{e}");
    assert!(e.to_string().contains("two_dims.npy"), "{e}");
    let lp = dir.path().join("short.npy");
    write_npy_i64(&lp, &[0, 1], "(2,)");
    let e = ImageDataset::from_npy(&xp, Some(&lp), Preprocess::default()).unwrap_err();
    assert!(matches!(e, CalibError::LabelCountMismatch { .. }), "{e}");
    assert_eq!(e.to_string(), "2 labels for 3 images");
    let lp = dir.path().join("negative.npy");
    write_npy_i64(&lp, &[0, -1, 2], "(3,)");
    let e = ImageDataset::from_npy(&xp, Some(&lp), Preprocess::default()).unwrap_err();
    assert!(
        matches!(e, CalibError::ValueOutOfRange { index: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("negative.npy"), "{e}");
    // Float labels are refused by the integer reader.
    let e = ImageDataset::from_npy(&xp, Some(&xp), Preprocess::default()).unwrap_err();
    assert!(e.to_string().contains("x.npy"), "{e}");

    // Padding, resizing and cropping apply to images only.
    for (pre, field) in [
        (Preprocess::default().with_pad(2), "pad"),
        (Preprocess::default().with_resize(2), "resize"),
        (Preprocess::default().with_crop(2), "crop"),
    ] {
        let e = ImageDataset::from_npy(&xp, None, pre).unwrap_err();
        assert!(
            matches!(e, CalibError::BadPreprocess { field: f, .. } if f == field),
            "{e}"
        );
        assert!(e.to_string().contains("x.npy"), "{e}");
    }

    // Empty, zero-sized and non-finite inputs.
    let empty = dir.path().join("empty.npy");
    write_npy_f32(&empty, &Array4::<f32>::zeros((0, 1, 2, 2))).unwrap();
    let e = ImageDataset::from_npy(&empty, None, Preprocess::default()).unwrap_err();
    assert!(matches!(e, CalibError::EmptyDataset { .. }), "{e}");
    let flat = dir.path().join("flat.npy");
    write_npy_f32(&flat, &Array4::<f32>::zeros((2, 1, 0, 2))).unwrap();
    let e = ImageDataset::from_npy(&flat, None, Preprocess::default()).unwrap_err();
    assert!(matches!(e, CalibError::BadShape { .. }), "{e}");
    let mut nan = Array4::<f32>::zeros((2, 1, 2, 2));
    nan[[1, 0, 1, 0]] = f32::NAN;
    let nan_path = dir.path().join("nan.npy");
    write_npy_f32(&nan_path, &nan).unwrap();
    let e = ImageDataset::from_npy(&nan_path, None, Preprocess::default()).unwrap_err();
    assert!(
        matches!(e, CalibError::ValueOutOfRange { index: 6, .. }),
        "{e}"
    );
    let e = ImageDataset::from_npy(dir.path().join("absent.npy"), None, Preprocess::default())
        .unwrap_err();
    assert!(matches!(e, CalibError::NotFound { .. }), "{e}");
}
