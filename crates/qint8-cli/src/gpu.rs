//! `--device cuda`: what the commands share for running on the GPU.

use anyhow::Result;
use qint8_calibration::RunnerFactory;

/// The error for `--device cuda` in a qint8 built without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub(crate) fn unavailable() -> anyhow::Error {
    anyhow::anyhow!(
        "--device cuda: this qint8 was built without GPU support; rebuild it with \
         `cargo build --release --features cuda`"
    )
}

/// Makes the GPU executor that runs calibration's forward passes.
#[cfg(feature = "cuda")]
fn executor(
    g: &qint8_graph::Graph,
) -> std::result::Result<Box<dyn qint8_calibration::BatchRunner>, String> {
    qint8_trt::cuda::CudaExecutor::new(g)
        .map(|e| Box::new(e) as Box<dyn qint8_calibration::BatchRunner>)
        .map_err(|e| e.to_string())
}

/// The runner factory for `--device`: `None` for the CPU.
pub(crate) fn calibration_runner(device: &str) -> Result<Option<&'static RunnerFactory<'static>>> {
    if device != "cuda" {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return Ok(Some(&executor));
    #[cfg(not(feature = "cuda"))]
    Err(unavailable())
}
