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
    let mut engine = Engine::new(&model, &args.device, threads)
        .with_context(|| format!("preparing {}", args.model.display()))?;
    let context = || {
        format!(
            "running {} on {}",
            args.model.display(),
            args.input.display()
        )
    };
    if args.repeat > 1 {
        engine
            .run(input.name.as_str(), x.view())
            .with_context(context)?;
    }
    let mut times = Vec::with_capacity(args.repeat);
    let mut outputs = Vec::new();
    for _ in 0..args.repeat {
        let start = Instant::now();
        outputs = engine
            .run(input.name.as_str(), x.view())
            .with_context(context)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let Some(y) = outputs.first() else {
        bail!("{}: the model has no outputs", args.model.display());
    };
    write_npy_f32(&args.output, y)
        .with_context(|| format!("writing output tensor {}", args.output.display()))?;
    let out_name = model.graph.outputs.first().map(|v| v.name.clone());
    let timing = match args.repeat {
        1 => format!("{seconds:.3} s"),
        n => format!("median {:.3} ms of {n} runs", seconds * 1e3),
    };
    crate::print_stdout(&format!(
        "wrote {}: {} {} float32 ({timing}, {})\n",
        args.output.display(),
        out_name.unwrap_or_default(),
        format::usize_dims(y.shape()),
        engine.describe()
    ))
}

/// What runs the model: the CPU session, or the GPU executor.
enum Engine {
    Cpu(Box<Session>),
    #[cfg(feature = "cuda")]
    Gpu(Box<qint8_trt::cuda::CudaExecutor>),
}

impl Engine {
    fn new(model: &qint8_graph::Model, device: &str, threads: usize) -> Result<Self> {
        if device == "cuda" {
            #[cfg(feature = "cuda")]
            return Ok(Engine::Gpu(Box::new(qint8_trt::cuda::CudaExecutor::new(
                &model.graph,
            )?)));
            #[cfg(not(feature = "cuda"))]
            return Err(crate::gpu::unavailable());
        }
        Ok(Engine::Cpu(Box::new(Session::new(
            model,
            SessionOptions {
                threads,
                ..Default::default()
            },
        )?)))
    }

    fn run(
        &mut self,
        input: &str,
        x: ndarray::ArrayViewD<'_, f32>,
    ) -> Result<Vec<ndarray::ArrayD<f32>>> {
        Ok(match self {
            Engine::Cpu(s) => s.run(&[(input, x)])?,
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => g.run(x)?,
        })
    }

    fn describe(&self) -> String {
        match self {
            Engine::Cpu(s) => format!("{} threads", s.threads()),
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => format!("{} ({})", g.device().name, g.convolutions()),
        }
    }
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
