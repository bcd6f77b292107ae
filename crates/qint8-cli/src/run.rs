//! `qint8 run`: one NPY tensor in, the first output out.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use qint8_calibration::dataset::npy::{read_npy_f32, write_npy_f32};
use qint8_graph::{Dim, ValueInfo};
use qint8_runtime::{Session, SessionOptions};

use crate::cli::RunArgs;
use crate::format;
use crate::inspect::load_model;

/// Whether a concrete shape fits a declared one (symbolic dimensions match anything).
pub(crate) fn fits(declared: &[Dim], got: &[usize]) -> bool {
    declared.len() == got.len()
        && declared.iter().zip(got).all(|(d, &g)| match d {
            Dim::Fixed(n) => *n == g,
            Dim::Symbolic(_) => true,
        })
}

/// Errors unless `got` fits the declared shape of `input`.
pub(crate) fn check_input_shape(input: &ValueInfo, got: &[usize], what: &str) -> Result<()> {
    if let Some(dims) = &input.shape {
        if !fits(dims, got) {
            bail!(
                "{what} has shape {}, which does not fit model input {}: expected {}, got {}",
                format::usize_dims(got),
                input.name,
                format::dims_text(dims),
                format::usize_dims(got)
            );
        }
    }
    Ok(())
}

/// Runs `qint8 run`.
pub(crate) fn main(args: &RunArgs, threads: usize) -> Result<()> {
    let model = load_model(&args.model)?;
    let x = read_npy_f32(&args.input)
        .with_context(|| format!("reading input tensor {}", args.input.display()))?;
    let g = &model.graph;
    let Some(input) = g.inputs.first() else {
        bail!("{}: the model has no inputs", args.model.display());
    };
    if g.inputs.len() > 1 {
        let names: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
        bail!(
            "{}: the model has {} inputs ({}); qint8 run feeds exactly one",
            args.model.display(),
            names.len(),
            names.join(", ")
        );
    }
    check_input_shape(input, x.shape(), &args.input.display().to_string())?;
    let session = Session::new(
        &model,
        SessionOptions {
            threads,
            ..Default::default()
        },
    )
    .with_context(|| format!("preparing {}", args.model.display()))?;
    let start = Instant::now();
    let outputs = session
        .run(&[(input.name.as_str(), x.view())])
        .with_context(|| {
            format!(
                "running {} on {}",
                args.model.display(),
                args.input.display()
            )
        })?;
    let seconds = start.elapsed().as_secs_f64();
    let Some(y) = outputs.first() else {
        bail!("{}: the model has no outputs", args.model.display());
    };
    write_npy_f32(&args.output, y)
        .with_context(|| format!("writing output tensor {}", args.output.display()))?;
    let out_name = session.output_names().first().map(|s| s.to_string());
    crate::print_stdout(&format!(
        "wrote {}: {} {} float32 ({:.3} s, {} threads)\n",
        args.output.display(),
        out_name.unwrap_or_default(),
        format::usize_dims(y.shape()),
        seconds,
        session.threads()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_dims_fit_anything() {
        let d = [Dim::Symbolic("batch".into()), Dim::Fixed(3)];
        assert!(fits(&d, &[7, 3]));
        assert!(!fits(&d, &[7, 4]));
        assert!(!fits(&d, &[7, 3, 1]));
    }
}
