//! `qint8 check-trt`: TensorRT's explicit-quantization rules on any ONNX file.

use anyhow::{bail, Context, Result};

use crate::cli::CheckTrtArgs;

pub(crate) fn main(args: &CheckTrtArgs) -> Result<()> {
    let found = qint8_trt::check_file(&args.model)
        .with_context(|| format!("checking {}", args.model.display()))?;
    let errors = found.iter().filter(|v| !v.rule.is_warning()).count();
    let warnings = found.len() - errors;
    let mut text = String::new();
    for v in &found {
        text.push_str(&format!("{v}\n"));
    }
    text.push_str(&format!(
        "{}: {errors} violation(s), {warnings} warning(s)\n",
        args.model.display()
    ));
    crate::print_stdout(&text)?;
    if errors > 0 || (args.strict && warnings > 0) {
        bail!(
            "{} does not follow TensorRT's explicit-quantization rules",
            args.model.display()
        );
    }
    Ok(())
}
