//! Times FP32 inference of an ONNX model with the qint8 runtime and prints
//! one JSON line: median and mean latency, throughput, plan memory and the
//! process's peak resident memory.
//!
//! Usage: `infer_bench MODEL --batch B --threads T [--iters N] [--warmup W] [--float-qdq] [--many-images]`
//! (`--float-qdq`: a QDQ model's convolutions in float, not on integer kernels;
//! `--many-images`: kernels chosen for batches of many images, as calibration
//! chooses them)

use std::time::Instant;

use qint8_runtime::{Session, SessionOptions};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of this process in bytes (Linux), or 0.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: infer_bench MODEL --batch B --threads T [--iters N]")?;
    let batch = arg(&args, "--batch", 1);
    let threads = arg(&args, "--threads", 2);
    let iters = arg(&args, "--iters", 20);
    let warmup = arg(&args, "--warmup", 3);
    let model = qint8_graph::onnx::load(path)?;
    let session = Session::new(
        &model,
        SessionOptions {
            threads,
            integer: !args.iter().any(|a| a == "--float-qdq"),
            many_images: args.iter().any(|a| a == "--many-images"),
            ..Default::default()
        },
    )?;
    let input = &session.graph().inputs[0];
    let mut shape = input
        .concrete_shape(batch)
        .ok_or("input has no declared shape")?;
    shape[0] = batch;
    let n: usize = shape.iter().product();
    // Deterministic inputs in [-1, 1).
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), data)?;
    let name = input.name.clone();
    for _ in 0..warmup {
        session.run(&[(&name, x.view())])?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let out = session.run(&[(&name, x.view())])?;
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    if args.iter().any(|a| a == "--profile") {
        let mut by_op: std::collections::BTreeMap<&str, f64> = Default::default();
        let mut rows = Vec::new();
        for _ in 0..5 {
            rows = session.profile(&[(&name, x.view())])?;
        }
        for (_, op, t) in &rows {
            *by_op.entry(op).or_default() += t;
        }
        for (op, t) in &by_op {
            eprintln!("{op:20} {:8.3} ms", t * 1e3);
        }
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        for (node, op, t) in rows.iter().take(60) {
            eprintln!("  {node:40} {op:12} {:8.3} ms", t * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let stats = session.plan(&[(&name, &shape)])?.stats();
    println!(
        "{{\"runtime\":\"qint8\",\"batch\":{batch},\"threads\":{threads},\"iters\":{iters},\"median_s\":{median:.6},\"mean_s\":{mean:.6},\"images_per_s\":{:.2},\"peak_activation_bytes\":{},\"peak_rss_bytes\":{}}}",
        batch as f64 / median,
        stats.peak_activation_bytes(),
        peak_rss()
    );
    Ok(())
}
