//! Calibration from a folder of images (`ROOT/CLASS/*.png|*.jpg`, as
//! torchvision's `ImageFolder`), decoded batch by batch.
//!
//! ```text
//! cargo run --release -p qint8 --example calibrate_image_folder [ROOT]
//! ```
//!
//! Without ROOT the example first writes 200 of the fixture's Fashion-MNIST
//! calibration images as PNG files, one folder per class, into a temporary
//! directory, and calibrates the ResNet-50 fixture from there. With ROOT
//! and your own model, use `Preprocess::imagenet()` (resize 256, crop 224,
//! ImageNet mean/std) and `ColorMode::Rgb`.

use std::path::{Path, PathBuf};

use qint8::prelude::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Writes the first `n` fixture calibration images as `root/<label>/<i>.png`.
fn write_folder(root: &Path, n: usize) -> qint8::Result<()> {
    let ds = ImageDataset::from_idx_auto(
        fixtures().join("data/calib-images-idx3-ubyte"),
        Preprocess::default(),
    )?;
    let images = ds.images().expect("IDX images are held in memory");
    let labels = qint8::calibration::dataset::read_idx_labels(
        fixtures().join("data/calib-labels-idx1-ubyte"),
    )?;
    for (i, &label) in labels.iter().enumerate().take(n) {
        let dir = root.join(format!("class{label}"));
        std::fs::create_dir_all(&dir).map_err(|e| {
            qint8::calibration::CalibError::Invalid(format!("{}: {e}", dir.display()))
        })?;
        let pixels = images.image(i).expect("index within the set").to_vec();
        let img = image::GrayImage::from_raw(28, 28, pixels).expect("28x28 pixels");
        img.save(dir.join(format!("{i}.png")))
            .map_err(|e| qint8::calibration::CalibError::Invalid(format!("writing PNG: {e}")))?;
    }
    Ok(())
}

fn main() -> qint8::Result<()> {
    let mut written = None;
    let root = match std::env::args().nth(1) {
        Some(r) => PathBuf::from(r),
        None => {
            let tmp =
                std::env::temp_dir().join(format!("qint8-folder-example-{}", std::process::id()));
            write_folder(&tmp, 200)?;
            written = Some(tmp.clone());
            tmp
        }
    };
    // Fashion-MNIST preprocessing for the fixture model.
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    let calib = ImageDataset::from_folder(&root, ColorMode::Gray, pre)?;
    println!(
        "{} images of shape {:?} in {}",
        calib.len(),
        calib.input_shape(),
        root.display()
    );

    let model = qint8::graph::onnx::load(fixtures().join("models/resnet50.onnx"))?;
    let config = PtqConfig {
        batch: 25,
        ..Default::default()
    };
    let quantized = ptq::quantize(&model, &calib, &config)?;
    let plan = quantized.plan();
    println!(
        "{}: {} activation ranges, {} weight tensors",
        plan.method,
        plan.activations.len(),
        plan.weights.len()
    );
    for (name, p) in plan.activations.iter().take(5) {
        println!("  {name}: scale {:.6}", p.channels()[0].scale);
    }
    if let Some(dir) = written {
        std::fs::remove_dir_all(dir).ok();
    }
    Ok(())
}
