//! Quantization reports: `report.md` and its SVG plots in one directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use qint8_eval::LayerError;

use crate::sensitivity::{Method, Sensitivity};
use crate::svg::{Bar, Chart, Marker, Series, PALETTE};
use crate::{AnalysisError, Result};

/// One calibration method's quantized model.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodRow {
    /// Method name (`entropy`, `minmax`, ...).
    pub method: String,
    /// Top-1 of the quantized model, as a fraction.
    pub top1: f64,
    /// Top-5, as a fraction.
    pub top5: f64,
    /// Calibration seconds.
    pub calibration_seconds: f64,
    /// Bytes of the exported QDQ file.
    pub file_bytes: usize,
    /// Half-width (points) of the 95% confidence interval of the drop, when
    /// known ([`qint8_eval::Accuracy::top1_difference_ci95`]).
    pub drop_ci95: Option<f64>,
}

/// The `|x|` histogram of one activation and the threshold each method
/// picks from it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPlot {
    /// The activation.
    pub tensor: String,
    /// Bin counts over `[0, max]`.
    pub counts: Vec<u64>,
    /// Upper end of the histogram's range (the largest `|x|`).
    pub max: f32,
    /// `(method, threshold)` pairs.
    pub thresholds: Vec<(String, f32)>,
}

/// Everything a report says about one model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelReport {
    /// Model name (file stem); names its plot files.
    pub name: String,
    /// Where the model came from (path), for the text.
    pub source: String,
    /// Evaluation images.
    pub eval_images: usize,
    /// Calibration images.
    pub calib_images: usize,
    /// FP32 top-1, as a fraction.
    pub fp32_top1: f64,
    /// Bytes of the FP32 file.
    pub fp32_bytes: usize,
    /// One row per calibration method.
    pub methods: Vec<MethodRow>,
    /// Histograms of representative activations.
    pub histograms: Vec<HistogramPlot>,
    /// Per-layer error of `layers_of`'s INT8 activations against FP32, in
    /// graph order.
    pub layers: Vec<LayerError>,
    /// The method whose model `layers` measures.
    pub layers_of: String,
    /// Extra Markdown placed after the model's heading (measurements the
    /// caller adds, such as latency).
    pub notes: String,
    /// Which layer hurts: the sensitivity analysis of `layers_of`'s plan.
    pub sensitivity: Option<Sensitivity>,
}

/// Rows of the sensitivity table in a report.
const SENSITIVITY_ROWS: usize = 10;

/// Characters safe in a file name (others become `_`).
fn file_stem(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `text` to `path` whole or not at all
/// ([`qint8_graph::atomic::write_atomically`]: a failure never leaves a
/// half-written file, and `/dev/null` stays a device).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    qint8_graph::atomic::write_atomically(path, |w| std::io::Write::write_all(w, text.as_bytes()))
        .map_err(|e| AnalysisError::Io {
            path: e.path.display().to_string(),
            source: e.source,
        })
}

/// Markdown-safe table cell text.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Human-readable bytes.
pub fn bytes_text(b: usize) -> String {
    if b >= 1_000_000 {
        format!("{:.2} MB", b as f64 / 1e6)
    } else if b >= 1_000 {
        format!("{:.1} kB", b as f64 / 1e3)
    } else {
        format!("{b} B")
    }
}

impl ModelReport {
    /// The plots of this model as `(file name, SVG)`.
    pub fn plots(&self) -> Vec<(String, String)> {
        let stem = file_stem(&self.name);
        let mut out = Vec::new();
        if !self.methods.is_empty() {
            let mut bars = vec![Bar {
                label: "fp32".into(),
                value: self.fp32_top1 * 100.0,
                color: "#888888".into(),
            }];
            for (i, m) in self.methods.iter().enumerate() {
                bars.push(Bar {
                    label: m.method.clone(),
                    value: m.top1 * 100.0,
                    color: PALETTE[i % PALETTE.len()].into(),
                });
            }
            // Zoom in on the interesting part: from a little below the worst.
            let lo = bars.iter().map(|b| b.value).fold(f64::INFINITY, f64::min);
            let chart = Chart {
                title: format!(
                    "{}: top-1 per calibration method ({} images)",
                    self.name, self.eval_images
                ),
                x_label: "calibration method".into(),
                y_label: "top-1 %".into(),
                bars,
                reference: Some(("fp32".into(), self.fp32_top1 * 100.0)),
                y_min: Some((lo - 2.0).floor().max(0.0)),
                ..Default::default()
            };
            out.push((format!("{stem}-top1.svg"), chart.to_svg()));
        }
        for (i, h) in self.histograms.iter().enumerate() {
            if h.counts.is_empty() || h.max.is_nan() || h.max <= 0.0 {
                continue;
            }
            // At most 256 columns: sum groups of bins.
            let group = h.counts.len().div_ceil(256);
            let width = h.max as f64 / h.counts.len() as f64;
            let points: Vec<(f64, f64)> = h
                .counts
                .chunks(group)
                .enumerate()
                .map(|(j, c)| ((j * group) as f64 * width, c.iter().sum::<u64>() as f64))
                .collect();
            let markers = h
                .thresholds
                .iter()
                .enumerate()
                .map(|(k, (m, t))| Marker {
                    label: format!("{m} {}", crate::svg::tick_text(*t as f64)),
                    x: *t as f64,
                    color: PALETTE[k % PALETTE.len()].into(),
                })
                .collect();
            let chart = Chart {
                title: format!("{}: |x| of {}", self.name, short(&h.tensor, 60)),
                x_label: "|x|".into(),
                y_label: format!("count per {} bins (log)", group),
                log_y: true,
                series: vec![Series {
                    name: h.tensor.clone(),
                    points,
                    color: "#444444".into(),
                    filled: true,
                }],
                markers,
                ..Default::default()
            };
            out.push((format!("{stem}-hist-{i}.svg"), chart.to_svg()));
        }
        if !self.layers.is_empty() {
            let bars = self
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| Bar {
                    label: format!("{i}"),
                    value: if l.sqnr_db.is_finite() {
                        l.sqnr_db
                    } else {
                        0.0
                    },
                    color: PALETTE[0].into(),
                })
                .collect();
            let chart = Chart {
                title: format!(
                    "{}: SQNR of INT8 ({}) vs FP32 activations",
                    self.name, self.layers_of
                ),
                x_label: "quantized activation, in graph order (index into the table)".into(),
                y_label: "SQNR dB".into(),
                bars,
                ..Default::default()
            };
            out.push((format!("{stem}-sqnr.svg"), chart.to_svg()));
        }
        if let Some(sens) = self.sensitivity.as_ref().filter(|s| !s.nodes.is_empty()) {
            out.push((
                format!("{stem}-sensitivity.svg"),
                sens.chart(&self.name, 25).to_svg(),
            ));
        }
        out
    }

    /// This model's section of `report.md` (plots referenced by file name).
    pub fn markdown(&self) -> String {
        let files: Vec<String> = self.plots().into_iter().map(|(f, _)| f).collect();
        self.markdown_with(&files)
    }

    /// The section, referencing the plot files `files`.
    fn markdown_with(&self, files: &[String]) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "## {}\n", self.name);
        if !self.source.is_empty() {
            let _ = writeln!(
                o,
                "Model `{}`; {} calibration images, {} evaluation images.\n",
                self.source, self.calib_images, self.eval_images
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(o, "{}\n", self.notes.trim_end());
        }
        let _ = writeln!(
            o,
            "| method | top-1 % | top-5 % | drop (pp, 95% CI) | calibration s | file |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        let _ = writeln!(
            o,
            "| fp32 | {:.2} | | | | {} |",
            self.fp32_top1 * 100.0,
            bytes_text(self.fp32_bytes)
        );
        for m in &self.methods {
            let ci = m
                .drop_ci95
                .map(|c| format!(" ± {c:.2}"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "| {} | {:.2} | {:.2} | {:.2}{ci} | {:.2} | {} |",
                cell(&m.method),
                m.top1 * 100.0,
                m.top5 * 100.0,
                (self.fp32_top1 - m.top1) * 100.0,
                m.calibration_seconds,
                bytes_text(m.file_bytes)
            );
        }
        o.push('\n');
        for file in files {
            let _ = writeln!(o, "![{file}]({file})\n");
        }
        if !self.layers.is_empty() {
            let _ = writeln!(o, "Per-layer error of the {} model's dequantized activations against FP32 (lowest SQNR first, at most 15):\n", self.layers_of);
            let _ = writeln!(o, "| # | activation | SQNR dB | cosine |");
            let _ = writeln!(o, "|---|---|---|---|");
            let mut order: Vec<usize> = (0..self.layers.len()).collect();
            order.sort_by(|&a, &b| self.layers[a].sqnr_db.total_cmp(&self.layers[b].sqnr_db));
            for &i in order.iter().take(15) {
                let l = &self.layers[i];
                let _ = writeln!(
                    o,
                    "| {i} | `{}` | {:.1} | {:.5} |",
                    cell(&l.tensor),
                    l.sqnr_db,
                    l.cosine
                );
            }
            o.push('\n');
        }
        if let Some(sens) = &self.sensitivity {
            o.push_str(&self.sensitivity_markdown(sens));
        }
        o
    }

    /// The "which layer hurts" part of the section.
    fn sensitivity_markdown(&self, s: &Sensitivity) -> String {
        let mut o = String::new();
        let how = match s.method {
            Method::Linearized => "first-order estimates from one recorded FP32 pass and one backward pass of the top-2 margin",
            Method::Exact => "a real evaluation of every configuration",
        };
        let _ = writeln!(
            o,
            "Which layer hurts ({} model, {} images, {}; {:.1} s, {:.1}x one evaluation): the {} most sensitive of {} nodes, by the Jensen-Shannon divergence from FP32 with the node alone quantized. Recovered: top-1 gained by leaving the node alone in float, everything else quantized ({:.2}% fully quantized on these images).\n",
            self.layers_of,
            s.images,
            how,
            s.seconds,
            s.seconds / s.eval_seconds.max(1e-9),
            SENSITIVITY_ROWS.min(s.nodes.len()),
            s.nodes.len(),
            s.int8.top1 * 100.0,
        );
        let _ = writeln!(
            o,
            "| rank | node | op | JS ± s.e. | top-k apart, z | recovered pp |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        for (rank, &i) in s.ranking().iter().take(SENSITIVITY_ROWS).enumerate() {
            let n = &s.nodes[i];
            let z = n.top_set_z.map_or_else(|| "-".to_string(), z_text);
            let _ = writeln!(
                o,
                "| {} | `{}` | {} | {:.2e} ± {:.1e} | {z} | {:+.2} |",
                rank + 1,
                cell(&n.node),
                n.op,
                n.alone.js,
                n.alone.js_stderr,
                (n.float.top1 - s.int8.top1) * 100.0,
            );
        }
        let _ = writeln!(
            o,
            "\n`z`: the smallest paired difference in divergence, image by image, between a node ranked k or higher and one ranked below, in standard errors. {}\n",
            s.resolved_text(2.0, SENSITIVITY_ROWS)
        );
        o
    }
}

/// A top set's `z` ([`crate::sensitivity::NodeSensitivity::top_set_z`])
/// for tables: one decimal, and the huge values of a difference that is
/// the same on every image as `>1000`.
pub fn z_text(z: f64) -> String {
    if z > 1000.0 {
        ">1000".into()
    } else {
        format!("{z:.1}")
    }
}

/// `s` cut to at most `n` characters, keeping its end (tensor names differ
/// at the end).
pub fn short(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        format!("…{}", s.chars().skip(count - n + 1).collect::<String>())
    }
}

/// Writes `dir/report.md` (`title`, `intro` Markdown, then each model's
/// section) and every plot, creating `dir` if needed. Returns the files
/// written, `report.md` first. Each file is written atomically.
pub fn write_report(
    dir: &Path,
    title: &str,
    intro: &str,
    models: &[ModelReport],
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| AnalysisError::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let mut md = format!("# {title}\n\n");
    if !intro.is_empty() {
        md.push_str(intro.trim_end());
        md.push_str("\n\n");
    }
    let mut files = vec![dir.join("report.md")];
    for m in models {
        let mut names = Vec::new();
        for (file, svg) in m.plots() {
            let p = dir.join(&file);
            write_atomic(&p, &svg)?;
            files.push(p);
            names.push(file);
        }
        md.push_str(&m.markdown_with(&names));
    }
    write_atomic(&files[0], &md)?;
    Ok(files)
}
