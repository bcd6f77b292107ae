//! IDX reading: round trips (plain and gzip), labels lookup, real fixtures,
//! and malformed files that must give errors, not panics.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use qint8_calibration::dataset::idx::{
    encode_idx, labels_path_candidates, IdxArray, IdxData, IdxType,
};
use qint8_calibration::prelude::*;

fn header(code: u8, dims: &[u32]) -> Vec<u8> {
    let mut v = vec![0, 0, code, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// 3 images of 2x4 with distinct pixels, and their labels.
fn sample() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..24u8).map(|x| x.wrapping_mul(11)).collect();
    let mut images = header(0x08, &[3, 2, 4]);
    images.extend_from_slice(&pixels);
    let mut labels = header(0x08, &[3]);
    labels.extend_from_slice(&[7, 0, 9]);
    (images, labels, pixels)
}

#[test]
fn plain_and_gzip_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (images, labels, pixels) = sample();
    for (suffix, enc) in [("", false), (".gz", true)] {
        let (ib, lb) = if enc {
            (gzip(&images), gzip(&labels))
        } else {
            (images.clone(), labels.clone())
        };
        let ip = write(dir.path(), &format!("x-images-idx3-ubyte{suffix}"), &ib);
        write(dir.path(), &format!("x-labels-idx1-ubyte{suffix}"), &lb);

        let arr = read_idx(&ip).unwrap();
        assert_eq!(arr.dims, vec![3, 2, 4]);
        assert_eq!(arr.data, IdxData::U8(pixels.clone()));

        let imgs = read_idx_images(&ip).unwrap();
        assert_eq!(
            (imgs.len(), imgs.height(), imgs.width(), imgs.channels()),
            (3, 2, 4, 1)
        );
        assert_eq!(imgs.image(1).unwrap(), &pixels[8..16]);
        assert_eq!(imgs.image(3), None);

        let lp = labels_path_for(&ip).unwrap();
        assert_eq!(read_idx_labels(&lp).unwrap(), vec![7, 0, 9]);
        std::fs::remove_file(&ip).unwrap();
        std::fs::remove_file(&lp).unwrap();
    }
}

#[test]
fn every_element_type_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let arrays = [
        IdxData::U8(vec![0, 1, 255, 128, 7, 9]),
        IdxData::I8(vec![-128, -1, 0, 1, 127, 5]),
        IdxData::I16(vec![-32768, -2, 0, 300, 32767, 1]),
        IdxData::I32(vec![i32::MIN, -70000, 0, 1, 70000, i32::MAX]),
        IdxData::F32(vec![-1.5, 0.0, 1.0, 3.25, f32::MAX, 1e-30]),
        IdxData::F64(vec![-1.5, 0.0, 1.0, 3.25, 1e300, 1e-30]),
    ];
    for data in arrays {
        let a = IdxArray {
            dims: vec![2, 3],
            data,
        };
        let bytes = encode_idx(&a).unwrap();
        assert_eq!(bytes[2], a.elem_type().code());
        for gz in [false, true] {
            let p = write(
                dir.path(),
                "a.idx",
                &if gz { gzip(&bytes) } else { bytes.clone() },
            );
            let back = read_idx(&p).unwrap();
            assert_eq!(back, a, "type {} gz {gz}", a.elem_type());
        }
        let f = a.to_f32();
        assert_eq!(f.len(), 6);
        assert_eq!(a.to_array_f32().unwrap().shape(), &[2, 3]);
        let ints = a.to_i64();
        assert_eq!(
            ints.is_some(),
            !matches!(a.elem_type(), IdxType::F32 | IdxType::F64)
        );
    }
}

#[test]
fn big_endian_values_are_decoded() {
    let mut b = header(0x0C, &[2]);
    b.extend_from_slice(&[0x00, 0x00, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFE]);
    let a = IdxArray::from_bytes(&b).unwrap();
    assert_eq!(a.data, IdxData::I32(vec![256, -2]));
    let mut b = header(0x0D, &[1]);
    b.extend_from_slice(&1.5f32.to_be_bytes());
    assert_eq!(
        IdxArray::from_bytes(&gzip(&b)).unwrap().data,
        IdxData::F32(vec![1.5])
    );
}

#[test]
fn four_dim_images_are_channels_last() {
    let mut b = header(0x08, &[2, 1, 2, 3]);
    b.extend(0..12u8);
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "rgb-images-idx3-ubyte", &b);
    let imgs = read_idx_images(&p).unwrap();
    assert_eq!(
        (imgs.len(), imgs.height(), imgs.width(), imgs.channels()),
        (2, 1, 2, 3)
    );
    assert_eq!(imgs.image(1).unwrap(), &[6, 7, 8, 9, 10, 11]);
    assert_eq!(imgs.view().unwrap()[[1, 0, 1, 2]], 11);
}

#[test]
fn labels_path_for_cases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Same suffix as the images file.
    write(d, "t10k-labels-idx1-ubyte.gz", b"");
    write(d, "eval-labels-idx1-ubyte", b"");
    assert_eq!(
        labels_path_for(d.join("t10k-images-idx3-ubyte.gz")),
        Some(d.join("t10k-labels-idx1-ubyte.gz"))
    );
    assert_eq!(
        labels_path_for(d.join("eval-images-idx3-ubyte")),
        Some(d.join("eval-labels-idx1-ubyte"))
    );
    // Toggled suffix when the same-suffix file is absent.
    assert_eq!(
        labels_path_for(d.join("t10k-images-idx3-ubyte")),
        Some(d.join("t10k-labels-idx1-ubyte.gz"))
    );
    assert_eq!(
        labels_path_for(d.join("eval-images-idx3-ubyte.gz")),
        Some(d.join("eval-labels-idx1-ubyte"))
    );
    // Both exist: the same suffix wins.
    write(d, "t10k-labels-idx1-ubyte", b"");
    assert_eq!(
        labels_path_for(d.join("t10k-images-idx3-ubyte")),
        Some(d.join("t10k-labels-idx1-ubyte"))
    );
    // Dotted MNIST mirror spelling.
    write(d, "train-labels.idx1-ubyte", b"");
    assert_eq!(
        labels_path_for(d.join("train-images.idx3-ubyte")),
        Some(d.join("train-labels.idx1-ubyte"))
    );
    // Missing or unconventional names.
    assert_eq!(labels_path_for(d.join("calib-images-idx3-ubyte")), None);
    assert_eq!(labels_path_for(d.join("images.bin")), None);
    assert_eq!(labels_path_for(d.join("eval-labels-idx1-ubyte")), None);
    assert_eq!(
        labels_path_candidates("/x/y-images-idx3-ubyte"),
        vec![
            PathBuf::from("/x/y-labels-idx1-ubyte"),
            PathBuf::from("/x/y-labels-idx1-ubyte.gz")
        ]
    );
}

fn read_err(bytes: &[u8]) -> CalibError {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad-images-idx3-ubyte", bytes);
    let e = read_idx(&p).unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert!(
        msg.contains("bad-images-idx3-ubyte"),
        "error should name the file: {msg}"
    );
    // The in-memory parser agrees.
    let e2 = IdxArray::from_bytes(bytes).unwrap_err();
    assert_eq!(
        std::mem::discriminant(&e),
        std::mem::discriminant(&e2),
        "{e} vs {e2}"
    );
    e
}

#[test]
fn missing_file_names_the_path() {
    let e = read_idx("/nonexistent/dir/t10k-images-idx3-ubyte").unwrap_err();
    assert!(matches!(e, CalibError::NotFound { .. }), "{e}");
    assert!(e
        .to_string()
        .contains("/nonexistent/dir/t10k-images-idx3-ubyte"));
}

#[test]
fn truncated_headers() {
    for bytes in [&[][..], &[0], &[0, 0, 8], &[0, 0, 8, 3, 0, 0, 0, 2, 0, 0]] {
        let e = read_err(bytes);
        assert!(matches!(e, CalibError::TruncatedHeader { .. }), "{e}");
        assert!(e.to_string().contains("truncated IDX header"), "{e}");
    }
    // Same inside a gzip stream.
    let e = read_err(&gzip(&[0, 0, 8, 3, 0, 0]));
    assert!(matches!(e, CalibError::TruncatedHeader { .. }), "{e}");
}

#[test]
fn wrong_magic_and_types() {
    let e = read_err(b"P5\n28 28\n255\n");
    assert!(matches!(e, CalibError::BadMagic { .. }), "{e}");
    let e = read_err(&[0, 0, 0x0A, 1, 0, 0, 0, 1, 5]);
    assert!(
        matches!(e, CalibError::UnsupportedIdxType { code: 0x0A, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("unsupported IDX element type 0x0A"),
        "{e}"
    );
    let e = read_err(&[0, 0, 8, 0]);
    assert!(matches!(e, CalibError::BadDims { .. }), "{e}");
}

#[test]
fn giant_dims() {
    // Product fits in u64 but is far beyond the file: reported as truncated
    // with expected vs found bytes, before any allocation.
    let mut b = header(0x08, &[u32::MAX, u32::MAX]);
    b.extend_from_slice(&[1, 2, 3]);
    let e = read_err(&b);
    match &e {
        CalibError::TruncatedData { expected, got, .. } => {
            assert_eq!(*expected, u64::from(u32::MAX) * u64::from(u32::MAX));
            assert_eq!(*got, 3);
        }
        other => panic!("unexpected {other}"),
    }
    // Product overflows u64.
    let e = read_err(&header(0x0E, &[u32::MAX, u32::MAX, u32::MAX]));
    assert!(matches!(e, CalibError::BadDims { .. }), "{e}");
    // Gzip: more than a small gzip file can possibly decompress to.
    let e = read_err(&gzip(&header(0x08, &[60000, 28, 28])));
    assert!(matches!(e, CalibError::BadDims { .. }), "{e}");
}

#[test]
fn truncated_and_trailing_data() {
    let (images, _, _) = sample();
    let cut = &images[..images.len() - 5];
    for bytes in [cut.to_vec(), gzip(cut)] {
        let e = read_err(&bytes);
        match &e {
            CalibError::TruncatedData {
                expected,
                got,
                offset,
                ..
            } => {
                assert_eq!((*expected, *got, *offset), (24, 19, 16));
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.to_string().contains("needs 24 bytes"), "{e}");
    }
    let mut long = images.clone();
    long.extend_from_slice(&[0; 7]);
    for bytes in [long.clone(), gzip(&long)] {
        let e = read_err(&bytes);
        assert!(
            matches!(e, CalibError::TrailingData { extra: 7, .. }),
            "{e}"
        );
    }
}

#[test]
fn corrupt_gzip() {
    let (images, _, _) = sample();
    let gz = gzip(&images);
    // Not deflate data at all after the magic.
    let e = read_err(&[0x1f, 0x8b, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
    assert!(
        matches!(
            e,
            CalibError::Gzip { .. } | CalibError::TruncatedHeader { .. }
        ),
        "{e}"
    );
    // Cut in the middle of the deflate stream.
    let e = read_err(&gz[..gz.len() / 2]);
    assert!(
        matches!(
            e,
            CalibError::Gzip { .. }
                | CalibError::TruncatedData { .. }
                | CalibError::TruncatedHeader { .. }
        ),
        "{e}"
    );
    // Bad CRC in the trailer.
    let mut bad_crc = gz.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0xff;
    let e = read_err(&bad_crc);
    assert!(matches!(e, CalibError::Gzip { .. }), "{e}");
    // Only the gzip magic.
    let e = read_err(&[0x1f, 0x8b]);
    assert!(
        matches!(
            e,
            CalibError::Gzip { .. } | CalibError::TruncatedHeader { .. }
        ),
        "{e}"
    );
}

#[test]
fn wrong_shapes_and_types_for_images_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let mut two_d = header(0x08, &[2, 2]);
    two_d.extend_from_slice(&[1, 2, 3, 4]);
    let p = write(dir.path(), "a", &two_d);
    assert!(matches!(
        read_idx_images(&p).unwrap_err(),
        CalibError::BadShape { .. }
    ));
    assert!(matches!(
        read_idx_labels(&p).unwrap_err(),
        CalibError::BadShape { .. }
    ));
    let mut floats = header(0x0D, &[1, 1, 1]);
    floats.extend_from_slice(&0.5f32.to_be_bytes());
    let p = write(dir.path(), "b", &floats);
    let e = read_idx_images(&p).unwrap_err();
    assert!(matches!(e, CalibError::DtypeMismatch { .. }), "{e}");
}

#[test]
fn garbage_never_panics() {
    // A deterministic sweep of short byte strings with IDX-like prefixes.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..2000 {
        let len = (next() % 40) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && b.len() >= 4 {
            b[0] = 0;
            b[1] = 0;
            b[2] = [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E][(next() % 6) as usize];
            b[3] = (next() % 4) as u8;
        }
        let _ = IdxArray::from_bytes(&b);
        let _ = IdxArray::from_bytes(&gzip(&b));
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data")
}

#[test]
fn reads_fixture_slice() {
    let images = fixtures().join("eval-images-idx3-ubyte");
    if !images.exists() {
        println!("skipping: {} not found", images.display());
        return;
    }
    let labels = labels_path_for(&images).expect("labels beside the fixture");
    assert_eq!(labels.file_name().unwrap(), "eval-labels-idx1-ubyte");
    let imgs = read_idx_images(&images).unwrap();
    assert_eq!(
        (imgs.len(), imgs.height(), imgs.width(), imgs.channels()),
        (2000, 28, 28, 1)
    );
    let lab = read_idx_labels(&labels).unwrap();
    assert_eq!(lab.len(), 2000);
    assert!(lab.iter().all(|&l| l < 10));

    let ds = ImageDataset::from_idx_auto(&images, Preprocess::default()).unwrap();
    assert_eq!(ds.len(), 2000);
    assert_eq!(ds.input_shape(), [1, 28, 28]);
    let b = ds.batch(1990, 10).unwrap();
    assert_eq!(b.inputs.shape(), &[10, 1, 28, 28]);
    assert!(b.inputs.iter().all(|&x| (0.0..=1.0).contains(&x)));
    assert_eq!(b.labels.as_deref().unwrap().len(), 10);
}

#[test]
fn reads_fashion_mnist_if_present() {
    let images = Path::new("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz");
    if !images.exists() {
        println!("skipping: {} not found", images.display());
        return;
    }
    let ds = ImageDataset::from_idx_auto(images, Preprocess::default().with_pad(2)).unwrap();
    assert_eq!(ds.len(), 10000);
    assert_eq!(ds.input_shape(), [1, 32, 32]);
    let labels = ds
        .labels()
        .expect("t10k-labels-idx1-ubyte.gz beside the images");
    assert!(labels.iter().all(|&l| l < 10));
    // Fashion-MNIST's test set is balanced: 1000 per class.
    let mut counts = [0usize; 10];
    labels.iter().for_each(|&l| counts[l] += 1);
    assert_eq!(counts, [1000; 10]);
    let n: usize = ds.batches(256).map(|b| b.unwrap().len()).sum();
    assert_eq!(n, 10000);
}
