//! Writes a zoo model as ONNX: `zoo_export ARCH OUT.onnx [--width W] [--resolution R] [--classes C] [--channels C]`.
//! ARCH is resnet50, vgg16, vgg16_bn or efficientnet_b0. Used by the
//! comparison scripts to build full-size models without a Python framework.

use qint8_graph::zoo::{self, Arch, ZooConfig};

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: zoo_export ARCH OUT.onnx [--width W] [--resolution R] [--classes C] [--channels C]";
    let arch: Arch = args
        .get(1)
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let out = args.get(2).ok_or(usage)?;
    let mut cfg = ZooConfig::new(arch);
    if let Some(w) = arg::<f64>(&args, "--width") {
        cfg = cfg.with_width_mult(w);
    }
    if let Some(r) = arg::<usize>(&args, "--resolution") {
        cfg = cfg.with_resolution(r, r);
    }
    if let Some(c) = arg::<usize>(&args, "--classes") {
        cfg = cfg.with_classes(c);
    }
    if let Some(c) = arg::<usize>(&args, "--channels") {
        cfg = cfg.with_in_channels(c);
    }
    let model = zoo::build(&cfg)?;
    qint8_graph::onnx::save(&model, out)?;
    eprintln!(
        "{arch}: {} nodes, {} parameters -> {out}",
        model.graph.nodes.len(),
        model.graph.parameter_count()
    );
    Ok(())
}
