//! Calibration through a [`BatchRunner`] (how `--device cuda` runs the
//! forward passes): a runner that runs qint8's CPU session must give the
//! plan `calibrate` gives, and its errors must name the batch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use ndarray::ArrayViewD;
use qint8_calibration::{
    calibrate, calibrate_on, BatchRunner, CalibConfig, ImageDataset, Preprocess, TensorSink,
};
use qint8_graph::Graph;
use qint8_math::histogram::Histogram;
use qint8_math::search::RangeMethod;
use qint8_runtime::{Session, SessionOptions};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn calib_set(n: usize) -> ImageDataset {
    let pre = Preprocess::normalize(vec![0.2860], vec![0.3530]).with_pad(2);
    ImageDataset::from_idx(fixture("data/calib-images-idx3-ubyte"), None, pre)
        .unwrap()
        .take(n)
        .unwrap()
}

/// Runs batches on a CPU session of the graph it was made for, showing
/// what it was asked for after each run; counts its batches. With `stats`
/// it also computes the statistics itself, binning histograms by the rule
/// [`Histogram::from_abs_counts`] documents, as a GPU runner does.
struct CpuRunner {
    graph: Graph,
    session: Option<Session>,
    batches: usize,
    fail_at: Option<usize>,
    stats: bool,
}

/// Tensors by name, with their shapes and values.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

impl CpuRunner {
    /// Every tensor of `wanted` one batch produces, with its shape.
    fn tensors(
        &mut self,
        input: ArrayViewD<'_, f32>,
        wanted: &BTreeSet<String>,
    ) -> Result<Tensors, String> {
        let mut seen = Vec::new();
        self.run_observed(input, wanted, &mut |n, s, x| {
            seen.push((n.to_string(), s.to_vec(), x.to_vec()));
            Ok(())
        })?;
        Ok(seen)
    }
}

impl BatchRunner for CpuRunner {
    fn run_observed(
        &mut self,
        input: ArrayViewD<'_, f32>,
        wanted: &BTreeSet<String>,
        see: &mut TensorSink<'_>,
    ) -> Result<(), String> {
        if self.fail_at == Some(self.batches) {
            return Err("the device went away".into());
        }
        self.batches += 1;
        let graph = &self.graph;
        let session = self.session.get_or_insert_with(|| {
            // The calibrator's own session options: the same kernels, so
            // the same float rounding.
            let opts = SessionOptions {
                many_images: true,
                ..Default::default()
            };
            Session::from_graph(graph.clone(), opts)
                .unwrap()
                .keeping_visible(wanted.iter().cloned())
        });
        let name = session.graph().inputs[0].name.clone();
        let mut seen: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        session
            .run_observed(
                &[(name.as_str(), input.view())],
                &mut |n: &str, s: &[usize], x: &[f32]| {
                    if wanted.contains(n) {
                        seen.push((n.to_string(), s.to_vec(), x.to_vec()));
                    }
                    Ok(())
                },
            )
            .map_err(|e| e.to_string())?;
        if wanted.contains(&name) {
            let x: Vec<f32> = input.iter().copied().collect();
            see(&name, input.shape(), &x)?;
        }
        for (n, s, x) in seen {
            see(&n, &s, &x)?;
        }
        Ok(())
    }

    fn computes_statistics(&self) -> bool {
        self.stats
    }

    fn abs_max(
        &mut self,
        input: ArrayViewD<'_, f32>,
        wanted: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, f32>, String> {
        let mut out = BTreeMap::new();
        for (n, _, x) in self.tensors(input, wanted)? {
            if x.iter().any(|v| !v.is_finite()) {
                return Err(format!("tensor `{n}` holds NaN or infinity"));
            }
            out.insert(n, x.iter().fold(0.0f32, |m, v| m.max(v.abs())));
        }
        Ok(out)
    }

    fn abs_histograms(
        &mut self,
        input: ArrayViewD<'_, f32>,
        ranges: &BTreeMap<String, f32>,
        bins: usize,
    ) -> Result<BTreeMap<String, Histogram>, String> {
        let wanted: BTreeSet<String> = ranges.keys().cloned().collect();
        let mut out = BTreeMap::new();
        for (n, _, x) in self.tensors(input, &wanted)? {
            let amax = ranges[&n];
            let inv = bins as f32 / amax;
            let mut counts = vec![0u64; bins];
            for &v in &x {
                counts[((v.abs() * inv).min((bins - 1) as f32)) as usize] += 1;
            }
            let clipped = x.iter().filter(|v| v.abs() > amax).count() as u64;
            let (lo, hi) = x
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let h = Histogram::from_abs_counts(amax, counts, clipped, lo, hi)
                .map_err(|e| e.to_string())?;
            out.insert(n, h);
        }
        Ok(out)
    }
}

fn runner(
    fail_at: Option<usize>,
    stats: bool,
) -> impl Fn(&Graph) -> Result<Box<dyn BatchRunner>, String> {
    move |g: &Graph| {
        Ok(Box::new(CpuRunner {
            graph: g.clone(),
            session: None,
            batches: 0,
            fail_at,
            stats,
        }) as Box<dyn BatchRunner>)
    }
}

#[test]
fn a_runner_gives_the_plan_of_the_cpu_session() {
    let data = calib_set(40);
    for m in ["resnet50", "efficientnet_b0"] {
        let g = qint8_graph::onnx::load(fixture(&format!("models/{m}.onnx")))
            .unwrap()
            .graph;
        for method in [RangeMethod::Max, RangeMethod::entropy()] {
            let cfg = CalibConfig {
                method,
                batch: 16,
                ..Default::default()
            };
            let want = calibrate(&g, &data, &cfg, &mut |_| {}).unwrap();
            // Tensors copied out, and statistics computed by the runner.
            for stats in [false, true] {
                let got = calibrate_on(&g, &data, &cfg, &runner(None, stats), &mut |_| {}).unwrap();
                let differ: Vec<_> = want
                    .ranges
                    .iter()
                    .filter(|(n, r)| got.ranges.get(*n) != Some(r))
                    .take(3)
                    .collect();
                assert!(differ.is_empty(), "{m} {method:?} {stats}: {differ:?}");
                assert_eq!(got.ranges.len(), want.ranges.len());
                assert!(
                    got.plan == want.plan,
                    "{m} {method:?} {stats}: the plans differ"
                );
                assert_eq!(
                    got.histograms.keys().collect::<Vec<_>>(),
                    want.histograms.keys().collect::<Vec<_>>()
                );
            }
            assert!(!want.plan.activations.is_empty());
        }
    }
}

#[test]
fn runner_errors_name_the_batch() {
    let data = calib_set(40);
    let g = qint8_graph::onnx::load(fixture("models/resnet50.onnx"))
        .unwrap()
        .graph;
    let cfg = CalibConfig {
        batch: 16,
        ..Default::default()
    };
    for stats in [false, true] {
        let e = calibrate_on(&g, &data, &cfg, &runner(Some(1), stats), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("calibration batch 1 (images 16..32): the device went away"),
            "{e}"
        );
    }
    let failing =
        |_: &Graph| -> Result<Box<dyn BatchRunner>, String> { Err("no CUDA device found".into()) };
    let e = calibrate_on(&g, &data, &cfg, &failing, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no CUDA device found"), "{e}");
}
