//! `qint8 zoo`: write a model-zoo network as ONNX.

use anyhow::{anyhow, Context, Result};
use qint8_graph::zoo::{self, Arch, ZooConfig};

use crate::cli::ZooArgs;

/// Builds the configured network and saves it.
pub(crate) fn main(args: &ZooArgs) -> Result<()> {
    let arch: Arch = args
        .arch
        .parse()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("unknown architecture {:?}", args.arch))?;
    let cfg = ZooConfig::new(arch)
        .with_width_mult(args.width)
        .with_resolution(args.resolution, args.resolution)
        .with_in_channels(args.channels)
        .with_classes(args.classes)
        .with_seed(args.seed);
    let model = zoo::build(&cfg).with_context(|| format!("building {arch}"))?;
    qint8_graph::onnx::save(&model, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "{arch}: {} nodes, {} parameters -> {}",
        model.graph.nodes.len(),
        model.graph.parameter_count(),
        args.output.display()
    );
    Ok(())
}
