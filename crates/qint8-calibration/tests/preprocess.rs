//! Preprocessing values computed by hand, and the dataset's batching rules.

use qint8_calibration::dataset::preprocess::convert_nhwc_u8;
use qint8_calibration::prelude::*;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + b.abs())
}

#[test]
fn pad_two_on_a_two_by_two_image() {
    // Pixels 0, 255 / 51, 102 -> scaled 0, 1 / 0.2, 0.4.
    let images = Images::new(1, 2, 2, 1, vec![0, 255, 51, 102]).unwrap();
    let pre = Preprocess {
        pad: 2,
        mean: vec![0.5],
        std: vec![0.25],
        ..Preprocess::default()
    };
    let ds = ImageDataset::new(images, None, pre).unwrap();
    assert_eq!(ds.input_shape(), [1, 6, 6]);
    let b = ds.batch(0, 1).unwrap();
    assert_eq!(b.inputs.shape(), &[1, 1, 6, 6]);
    assert_eq!(b.labels, None);
    // Padding is a zero pixel normalized: (0 - 0.5) / 0.25 = -2.
    let p = -2.0;
    #[rustfmt::skip]
    let expect = [
        p, p, p, p, p, p,
        p, p, p, p, p, p,
        p, p, -2.0, 2.0, p, p,
        p, p, -1.2, -0.4, p, p,
        p, p, p, p, p, p,
        p, p, p, p, p, p,
    ];
    for (i, (&got, &want)) in b.inputs.iter().zip(expect.iter()).enumerate() {
        assert!(close(got, want), "pixel {i}: {got} vs {want}");
    }
}

#[test]
fn padding_uses_each_channels_mean() {
    // A 1x1 RGB image (10, 20, 30), pad 1, per-channel mean/std, scale 1.
    let images = Images::new(1, 1, 1, 3, vec![10, 20, 30]).unwrap();
    let pre = Preprocess {
        pad: 1,
        mean: vec![1.0, 2.0, 3.0],
        std: vec![1.0, 2.0, 4.0],
        scale: 1.0,
        ..Preprocess::default()
    };
    let ds = ImageDataset::new(images, Some(vec![5]), pre).unwrap();
    let b = ds.batch(0, 1).unwrap();
    assert_eq!(b.inputs.shape(), &[1, 3, 3, 3]);
    assert_eq!(b.labels, Some(vec![5]));
    let x = &b.inputs;
    for (c, (pad, centre)) in [(-1.0, 9.0), (-1.0, 9.0), (-0.75, 6.75)].iter().enumerate() {
        assert!(close(x[[0, c, 0, 0]], *pad), "channel {c} pad");
        assert!(close(x[[0, c, 2, 1]], *pad), "channel {c} pad");
        assert!(close(x[[0, c, 1, 1]], *centre), "channel {c} centre");
    }
}

#[test]
fn nhwc_to_nchw_layout() {
    // Two 2x2 images with 2 channels; channel 1 = channel 0 + 100.
    let mut px = Vec::new();
    for n in 0..2u8 {
        for i in 0..4u8 {
            let v = n * 10 + i;
            px.extend_from_slice(&[v, v + 100]);
        }
    }
    let images = Images::new(2, 2, 2, 2, px).unwrap();
    let pre = Preprocess {
        scale: 1.0,
        ..Preprocess::default()
    };
    let ds = ImageDataset::new(images, None, pre).unwrap();
    let b = ds.batch(0, 2).unwrap();
    let v: Vec<f32> = b.inputs.iter().copied().collect();
    assert_eq!(
        v,
        vec![
            0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0, //
            10.0, 11.0, 12.0, 13.0, 110.0, 111.0, 112.0, 113.0
        ]
    );
}

#[test]
fn mean_std_broadcast_and_validation() {
    let rgb = || Images::new(1, 1, 1, 3, vec![0, 0, 0]).unwrap();
    // Length 1 broadcasts.
    assert!(ImageDataset::new(rgb(), None, Preprocess::normalize(vec![0.5], vec![0.5])).is_ok());
    // Length must otherwise equal C.
    let e = ImageDataset::new(
        rgb(),
        None,
        Preprocess::normalize(vec![0.1, 0.2], vec![1.0]),
    )
    .unwrap_err();
    assert!(
        matches!(e, CalibError::BadPreprocess { field: "mean", .. }),
        "{e}"
    );
    let e = ImageDataset::new(
        rgb(),
        None,
        Preprocess::normalize(vec![0.0], vec![1.0, 1.0, 0.0]),
    )
    .unwrap_err();
    assert!(
        matches!(e, CalibError::BadPreprocess { field: "std", .. }),
        "{e}"
    );
    let e = ImageDataset::new(
        rgb(),
        None,
        Preprocess::normalize(vec![0.0], vec![f32::INFINITY]),
    )
    .unwrap_err();
    assert!(
        matches!(e, CalibError::BadPreprocess { field: "std", .. }),
        "{e}"
    );
    let e = ImageDataset::new(
        rgb(),
        None,
        Preprocess::normalize(vec![f32::NAN], vec![1.0]),
    )
    .unwrap_err();
    assert!(
        matches!(e, CalibError::BadPreprocess { field: "mean", .. }),
        "{e}"
    );
}

#[test]
fn dataset_rules() {
    let imgs = |n: usize| Images::new(n, 2, 2, 1, vec![7; n * 4]).unwrap();
    let e = ImageDataset::new(imgs(0), None, Preprocess::default()).unwrap_err();
    assert!(matches!(e, CalibError::EmptyDataset { .. }), "{e}");
    let e = ImageDataset::new(imgs(3), Some(vec![1, 2]), Preprocess::default()).unwrap_err();
    assert!(
        matches!(
            e,
            CalibError::LabelCountMismatch {
                images: 3,
                labels: 2
            }
        ),
        "{e}"
    );
    assert!(Images::new(2, 2, 2, 1, vec![0; 7]).is_err());
    assert!(Images::new(1, 1, 1, 0, vec![]).is_err());
    assert!(Images::new(usize::MAX, 2, 2, 1, vec![]).is_err());

    let ds = ImageDataset::new(imgs(5), Some(vec![0, 1, 2, 3, 4]), Preprocess::default()).unwrap();
    assert_eq!(ds.len(), 5);
    assert!(!ds.is_empty());
    assert!(matches!(ds.batch(0, 0), Err(CalibError::ZeroBatchSize)));
    assert!(matches!(
        ds.batch(4, 2),
        Err(CalibError::BatchOutOfRange { .. })
    ));
    assert!(matches!(
        ds.batch(usize::MAX, 2),
        Err(CalibError::BatchOutOfRange { .. })
    ));
    assert_eq!(ds.batch(3, 2).unwrap().labels, Some(vec![3, 4]));

    // batches: sizes, starts, labels, exact size.
    let it = ds.batches(2);
    assert_eq!(it.len(), 3);
    let batches: Vec<Batch> = it.collect::<Result<_, _>>().unwrap();
    assert_eq!(
        batches
            .iter()
            .map(|b| (b.start, b.len()))
            .collect::<Vec<_>>(),
        vec![(0, 2), (2, 2), (4, 1)]
    );
    assert_eq!(batches[2].labels, Some(vec![4]));
    assert_eq!(batches[1].inputs.shape(), &[2, 1, 2, 2]);
    let mut zero = ds.batches(0);
    assert!(matches!(zero.next(), Some(Err(CalibError::ZeroBatchSize))));
    assert!(zero.next().is_none());
    assert_eq!(ds.batches(100).count(), 1);

    // batch_into reuses a buffer and checks its length.
    let mut buf = vec![0.0; 2 * 4];
    ds.batch_into(1, 2, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| close(x, 7.0 / 255.0)));
    assert!(matches!(
        ds.batch_into(1, 1, &mut buf),
        Err(CalibError::LengthMismatch { .. })
    ));

    // take
    let small = ds.clone().take(2).unwrap();
    assert_eq!(small.len(), 2);
    assert_eq!(small.labels(), Some(&[0, 1][..]));
    assert_eq!(small.images().map(|i| i.as_bytes().len()), Some(8));
    assert_eq!(ds.clone().take(50).unwrap().len(), 5);
    assert!(matches!(ds.take(0), Err(CalibError::EmptyDataset { .. })));
}

#[test]
fn preprocess_serde() {
    let p = Preprocess::default();
    assert_eq!(
        (p.pad, p.mean.clone(), p.std.clone()),
        (0, vec![0.0], vec![1.0])
    );
    assert!(close(p.scale, 1.0 / 255.0));
    let json = serde_json::to_string(&p).unwrap();
    let back: Preprocess = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
    // Missing fields take their defaults.
    let partial: Preprocess =
        serde_json::from_str(r#"{"pad": 2, "mean": [0.1307], "std": [0.3081]}"#).unwrap();
    assert_eq!(partial.pad, 2);
    assert_eq!(partial.scale, p.scale);
    assert!(serde_json::from_str::<Preprocess>(r#"{"padding": 2}"#).is_err());
}

#[test]
fn lookup_matches_direct_formula() {
    // The table path must equal the formula (x * scale - mean) / std exactly.
    let pre = Preprocess {
        pad: 1,
        mean: vec![0.1307],
        std: vec![0.3081],
        ..Preprocess::default()
    };
    let px: Vec<u8> = (0..=255).collect();
    let t = pre.lookup_tables(1).unwrap();
    let mut out = vec![0.0; 18 * 18];
    convert_nhwc_u8(&px, 1, 16, 16, 1, 1, &t, &mut out).unwrap();
    for y in 0..16 {
        for x in 0..16 {
            let v = px[y * 16 + x] as f32;
            let want = (v * pre.scale - 0.1307) / 0.3081;
            assert_eq!(out[(y + 1) * 18 + x + 1], want);
        }
    }
}

#[test]
fn ten_thousand_images_convert_quickly() {
    // 10k 28x28 images padded to 32x32; a generous bound that only catches
    // pathological slowness (per-pixel allocation and the like).
    let n = 10_000;
    let px: Vec<u8> = (0..n * 784).map(|i| (i * 31 % 251) as u8).collect();
    let images = Images::new(n, 28, 28, 1, px).unwrap();
    let ds = ImageDataset::new(images, None, Preprocess::default().with_pad(2)).unwrap();
    let t = std::time::Instant::now();
    let mut sum = 0.0f64;
    for b in ds.batches(500) {
        let b = b.unwrap();
        sum += f64::from(b.inputs[[0, 0, 5, 5]]);
    }
    let dt = t.elapsed();
    println!("10k images in {dt:?} (checksum {sum})");
    assert!(dt.as_secs_f64() < 10.0, "{dt:?}");
}
