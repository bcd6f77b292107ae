//! NPY reading and writing: round trips, byte-exact NumPy compatibility,
//! other versions, dtypes and orders, and malformed files.

use std::path::{Path, PathBuf};

use ndarray::{arr2, Array, ArrayD, IxDyn, ShapeBuilder};
use qint8_calibration::dataset::npy::{
    encode_npy_f32, npy_f32_from_bytes, npy_i64_from_bytes, read_npy_header, NpyDtype, NpyElem,
};
use qint8_calibration::prelude::*;

/// NPY bytes with a header dict written exactly as NumPy does: the dict,
/// spaces, and a newline, so that the preamble + header is a multiple of 64.
fn npy_bytes(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let preamble = if version == 1 { 10 } else { 12 };
    let total = (preamble + dict.len() + 1).div_ceil(64) * 64;
    let header_len = total - preamble;
    let mut b = b"\x93NUMPY".to_vec();
    b.extend_from_slice(&[version, 0]);
    if version == 1 {
        b.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        b.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    b.extend_from_slice(dict.as_bytes());
    b.resize(total - 1, b' ');
    b.push(b'\n');
    b.extend_from_slice(data);
    b
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn reads_numpy_written_file() {
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    let bytes = npy_bytes(1, dict, &le_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
    assert_eq!((bytes.len() - 24) % 64, 0);
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.npy", &bytes);
    let a = read_npy_f32(&p).unwrap();
    assert_eq!(a, arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, -6.5]]).into_dyn());
    let h = read_npy_header(&p).unwrap();
    assert_eq!(h.version, (1, 0));
    assert_eq!(h.dtype, NpyDtype::F32_LE);
    assert!(!h.fortran_order);
    assert_eq!(h.shape, vec![2, 3]);
    assert_eq!(h.data_offset, 128);

    // Our writer produces the same bytes as NumPy for this array.
    assert_eq!(encode_npy_f32(&a), bytes);
}

#[test]
fn write_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let shapes: [&[usize]; 5] = [&[], &[5], &[2, 3], &[2, 3, 4, 5], &[0, 3]];
    for shape in shapes {
        let n: usize = shape.iter().product();
        let a =
            ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|i| i as f32 * 0.5 - 3.0).collect())
                .unwrap();
        let p = dir.path().join("rt.npy");
        write_npy_f32(&p, &a).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let header_total = bytes.len() - 4 * n;
        assert_eq!(header_total % 64, 0, "shape {shape:?}");
        assert_eq!(read_npy_f32(&p).unwrap(), a, "shape {shape:?}");
    }
    // Non-contiguous input is written in logical order.
    let a = Array::from_shape_vec((2, 3), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let t = a.t();
    let p = dir.path().join("t.npy");
    write_npy_f32(&p, &t).unwrap();
    assert_eq!(read_npy_f32(&p).unwrap(), t.to_owned().into_dyn());
    // Special values survive.
    let s = ndarray::arr1(&[f32::INFINITY, f32::NEG_INFINITY, -0.0, f32::MIN_POSITIVE]);
    write_npy_f32(&p, &s).unwrap();
    let back = read_npy_f32(&p).unwrap();
    for (x, y) in s.iter().zip(back.iter()) {
        assert_eq!(x.to_bits(), y.to_bits());
    }
}

#[test]
fn atomic_write_leaves_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    let a = arr2(&[[1.0f32, 2.0]]);
    std::fs::write(&p, b"old contents").unwrap();
    write_npy_f32(&p, &a).unwrap();
    assert_eq!(read_npy_f32(&p).unwrap(), a.clone().into_dyn());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("a.npy")]);

    // Renaming onto a directory fails: error, and no temporary left behind.
    let sub = dir.path().join("sub.npy");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("keep"), b"x").unwrap();
    assert!(write_npy_f32(&sub, &a).is_err());
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a.npy", "sub.npy"]);

    // Missing directory: error naming the path, nothing created.
    let e = write_npy_f32(dir.path().join("no/such/dir/x.npy"), &a).unwrap_err();
    assert!(e.to_string().contains("no/such/dir"), "{e}");
}

#[test]
fn versions_two_and_three() {
    let data = le_f32(&[1.0, 2.0]);
    let v2 = npy_bytes(
        2,
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
        &data,
    );
    assert_eq!(
        npy_f32_from_bytes(&v2).unwrap().as_slice().unwrap(),
        &[1.0, 2.0]
    );
    // 3.0 allows UTF-8 in the header (here in an extra key).
    let v3 = npy_bytes(
        3,
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'note': 'µ', }",
        &data,
    );
    assert_eq!(
        npy_f32_from_bytes(&v3).unwrap().as_slice().unwrap(),
        &[1.0, 2.0]
    );
    // Key order does not matter; double quotes and Python 2 longs are fine.
    let odd = npy_bytes(
        1,
        "{\"shape\": (1L, 2L), \"fortran_order\": False, \"descr\": \"<f4\"}",
        &data,
    );
    assert_eq!(npy_f32_from_bytes(&odd).unwrap().shape(), &[1, 2]);
}

#[test]
fn fortran_order_is_transposed_to_standard_layout() {
    // Logical [[1, 2, 3], [4, 5, 6]] stored column-major.
    let bytes = npy_bytes(
        1,
        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
        &le_f32(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]),
    );
    let a = npy_f32_from_bytes(&bytes).unwrap();
    assert!(a.is_standard_layout());
    assert_eq!(a, arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn());
    // Same for i64 and 3-D.
    let vals: Vec<u8> = (0..24i64).flat_map(|x| x.to_le_bytes()).collect();
    let bytes = npy_bytes(
        1,
        "{'descr': '<i8', 'fortran_order': True, 'shape': (2, 3, 4), }",
        &vals,
    );
    let a = npy_i64_from_bytes(&bytes).unwrap();
    let expect = Array::from_shape_vec((2, 3, 4).f(), (0..24i64).collect()).unwrap();
    assert_eq!(a, expect.into_dyn());
}

#[test]
fn other_dtypes() {
    let dict = |d: &str| format!("{{'descr': '{d}', 'fortran_order': False, 'shape': (3,), }}");
    let f = |d: &str, data: Vec<u8>| npy_f32_from_bytes(&npy_bytes(1, &dict(d), &data)).unwrap();
    let vals = |a: ArrayD<f32>| a.iter().copied().collect::<Vec<_>>();
    assert_eq!(
        vals(f(
            "<f8",
            [1.5f64, -2.0, 1e10]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        )),
        vec![1.5, -2.0, 1e10]
    );
    assert_eq!(
        vals(f(
            ">f4",
            [1.5f32, -2.0, 3.0]
                .iter()
                .flat_map(|x| x.to_be_bytes())
                .collect()
        )),
        vec![1.5, -2.0, 3.0]
    );
    assert_eq!(
        vals(f(
            "<i8",
            [-1i64, 0, 7].iter().flat_map(|x| x.to_le_bytes()).collect()
        )),
        vec![-1.0, 0.0, 7.0]
    );
    assert_eq!(
        vals(f(
            "<i4",
            [-1i32, 0, 7].iter().flat_map(|x| x.to_le_bytes()).collect()
        )),
        vec![-1.0, 0.0, 7.0]
    );
    assert_eq!(vals(f("|u1", vec![0, 128, 255])), vec![0.0, 128.0, 255.0]);
    assert_eq!(vals(f("|i1", vec![0, 128, 255])), vec![0.0, -128.0, -1.0]);
    assert_eq!(vals(f("|b1", vec![0, 1, 1])), vec![0.0, 1.0, 1.0]);
    assert_eq!(
        vals(f(
            "<f2",
            [0x3c00u16, 0xc000, 0x3800]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        )),
        vec![1.0, -2.0, 0.5]
    );

    let i = |d: &str, data: Vec<u8>| npy_i64_from_bytes(&npy_bytes(1, &dict(d), &data));
    assert_eq!(
        i(
            "<i8",
            [i64::MIN, 0, i64::MAX]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        )
        .unwrap()
        .as_slice()
        .unwrap(),
        &[i64::MIN, 0, i64::MAX]
    );
    assert_eq!(
        i("|u1", vec![3, 1, 4]).unwrap().as_slice().unwrap(),
        &[3, 1, 4]
    );
    assert_eq!(
        i(
            ">i4",
            [-5i32, 6, 7].iter().flat_map(|x| x.to_be_bytes()).collect()
        )
        .unwrap()
        .as_slice()
        .unwrap(),
        &[-5, 6, 7]
    );
    let e = i("<f4", le_f32(&[1.0, 2.0, 3.0])).unwrap_err();
    assert!(matches!(e, CalibError::DtypeMismatch { .. }), "{e}");
    let e = i(
        "<u8",
        [1u64, u64::MAX, 2]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    )
    .unwrap_err();
    assert!(
        matches!(e, CalibError::ValueOutOfRange { index: 1, .. }),
        "{e}"
    );

    assert_eq!(NpyDtype::parse("<i2").unwrap().elem, NpyElem::I16);
}

fn bad(bytes: &[u8]) -> CalibError {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.npy", bytes);
    let e = read_npy_f32(&p).unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert!(msg.contains("bad.npy"), "error should name the file: {msg}");
    e
}

#[test]
fn malformed_files() {
    let good_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    let data = le_f32(&[0.0; 6]);

    let e = bad(b"PK\x03\x04 this is a zip");
    assert!(matches!(e, CalibError::BadMagic { .. }), "{e}");
    let e = bad(b"\x93NUM");
    assert!(matches!(e, CalibError::TruncatedHeader { .. }), "{e}");
    let e = bad(b"");
    assert!(matches!(e, CalibError::TruncatedHeader { .. }), "{e}");
    // Header length pointing past the end of the file.
    let full = npy_bytes(1, good_dict, &data);
    let e = bad(&full[..50]);
    assert!(matches!(e, CalibError::TruncatedHeader { .. }), "{e}");
    let mut huge_len = full.clone();
    huge_len[8] = 0xff;
    huge_len[9] = 0xff;
    let e = bad(&huge_len);
    assert!(matches!(e, CalibError::TruncatedHeader { .. }), "{e}");
    // Unknown version.
    let mut v9 = full.clone();
    v9[6] = 9;
    let e = bad(&v9);
    assert!(matches!(e, CalibError::NpyHeader { .. }), "{e}");

    // Truncated and excess data.
    let e = bad(&full[..full.len() - 3]);
    assert!(
        matches!(
            e,
            CalibError::TruncatedData {
                expected: 24,
                got: 21,
                offset: 128,
                ..
            }
        ),
        "{e}"
    );
    let mut long = full.clone();
    long.extend_from_slice(&[0; 4]);
    let e = bad(&long);
    assert!(
        matches!(e, CalibError::TrailingData { extra: 4, .. }),
        "{e}"
    );

    // Bad header dicts.
    for dict in [
        "{'descr': '<f4', 'fortran_order': False, }",
        "{'descr': '<f4', 'shape': (2, 3), }",
        "{'fortran_order': False, 'shape': (2, 3), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3], }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2.0, 3), }",
        "{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3), }",
        "not a dict",
        "['descr', '<f4']",
        "",
    ] {
        let e = bad(&npy_bytes(1, dict, &data));
        assert!(matches!(e, CalibError::NpyHeader { .. }), "{dict}: {e}");
    }

    // Unsupported dtypes are named.
    for (descr, name) in [
        ("'<c8'", "<c8"),
        ("'|O'", "|O"),
        ("'<U5'", "<U5"),
        ("[('a', '<f4'), ('b', '<i4')]", "('a', '<f4')"),
    ] {
        let dict = format!("{{'descr': {descr}, 'fortran_order': False, 'shape': (2, 3), }}");
        let e = bad(&npy_bytes(1, &dict, &data));
        assert!(matches!(e, CalibError::UnsupportedDtype { .. }), "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }

    // Giant shapes: overflow, and more data than present.
    let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }";
    let e = bad(&npy_bytes(1, dict, &data));
    assert!(matches!(e, CalibError::BadDims { .. }), "{e}");
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }";
    let e = bad(&npy_bytes(1, dict, &data));
    assert!(matches!(e, CalibError::TruncatedData { .. }), "{e}");
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999, ), }";
    let e = bad(&npy_bytes(1, dict, &data));
    assert!(
        matches!(e, CalibError::BadDims { .. } | CalibError::NpyHeader { .. }),
        "{e}"
    );

    // Missing file.
    let e = read_npy_f32("/nonexistent/x.npy").unwrap_err();
    assert!(matches!(e, CalibError::NotFound { .. }), "{e}");
}

#[test]
fn garbage_headers_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"{}()[]',:\" TrueFalseNone0123456789-<f4descrshapefortran_order\n\\L";
    for _ in 0..3000 {
        let len = (next() % 80) as usize;
        let dict: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char)
            .collect();
        let _ = npy_f32_from_bytes(&npy_bytes(1, &dict, &[0; 16]));
        let _ = npy_i64_from_bytes(&npy_bytes(3, &dict, &[0; 16]));
    }
}
