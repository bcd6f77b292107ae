#!/usr/bin/env python3
"""FP32 inference speed and memory: qint8's runtime against onnxruntime.

Both run the same ONNX file with the same thread count, in separate
processes, alternating A B A B for several rounds so drift in machine speed
hits both; each round reports a median over timed iterations after warm-up.
Prints a Markdown table (and --json FILE writes the raw figures).

Usage (from the repository root):
    cargo build --release -p qint8-benches --bins -p qint8-cli
    python3 benches/scripts/fp32_vs_onnxruntime.py [--threads 2] [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release")

ORT_RUNNER = r"""
import sys, time, json, resource
import numpy as np, onnxruntime as ort
path, batch, threads, iters, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
inp = s.get_inputs()[0]
shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
for _ in range(warmup):
    s.run(None, {inp.name: x})
ts = []
for _ in range(iters):
    t = time.perf_counter()
    s.run(None, {inp.name: x})
    ts.append(time.perf_counter() - t)
ts.sort()
med = ts[len(ts) // 2]
print(json.dumps({"runtime": "onnxruntime", "version": ort.__version__, "median_s": med,
                  "images_per_s": batch / med,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def qint8(model, batch, threads, iters, warmup):
    return run_json([os.path.join(BIN, "infer_bench"), model, "--batch", str(batch), "--threads", str(threads),
                     "--iters", str(iters), "--warmup", str(warmup)])


def onnxruntime(model, batch, threads, iters, warmup):
    return run_json([sys.executable, "-c", ORT_RUNNER, model, str(batch), str(threads), str(iters), str(warmup)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--skip-zoo", action="store_true", help="only the fixtures")
    ap.add_argument("--zoo", type=lambda v: v.split(","), default=["resnet50"],
                    help="full-size zoo models at 224x224, comma-separated [resnet50]")
    ap.add_argument("--skip-fixtures", action="store_true", help="only the full-size zoo models")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="qint8-bench-")
    cases = []
    if not args.skip_zoo:
        for arch in args.zoo:
            path = os.path.join(tmp, f"{arch}_224.onnx")
            subprocess.run([os.path.join(BIN, "qint8"), "zoo", arch, "-o", path], check=True)
            cases += [(f"{arch} 224x224 (zoo)", path, 1, 10), (f"{arch} 224x224 (zoo)", path, 8, 4)]
    for name in [] if args.skip_fixtures else ["resnet50", "vgg16_bn", "efficientnet_b0"]:
        cases.append((f"{name} fixture 32x32", os.path.join(ROOT, "fixtures", "models", f"{name}.onnx"), 32, 150))

    rows = []
    for label, model, batch, iters in cases:
        q, o = [], []
        for _ in range(args.rounds):
            q.append(qint8(model, batch, args.threads, iters, 3))
            o.append(onnxruntime(model, batch, args.threads, iters, 3))
        qi = statistics.median(r["images_per_s"] for r in q)
        oi = statistics.median(r["images_per_s"] for r in o)
        # Each round's two runs are neighbours in time: the median of their
        # ratios cancels the machine's drift better than a ratio of medians.
        ratio = statistics.median(a["images_per_s"] / b["images_per_s"] for a, b in zip(q, o))
        row = {
            "model": label, "batch": batch, "threads": args.threads,
            "qint8_images_per_s": qi, "onnxruntime_images_per_s": oi, "ratio": ratio,
            "qint8_peak_rss_mb": max(r["peak_rss_bytes"] for r in q) / 2**20,
            "onnxruntime_peak_rss_mb": max(r["peak_rss_bytes"] for r in o) / 2**20,
            "qint8_peak_activation_mb": q[0]["peak_activation_bytes"] / 2**20,
            "onnxruntime_version": o[0]["version"],
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print(f"| model | batch | qint8 img/s | onnxruntime img/s | ratio (median of rounds) | qint8 peak RSS MB | onnxruntime peak RSS MB | qint8 activation arena MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['qint8_images_per_s']:.1f} | {r['onnxruntime_images_per_s']:.1f} | "
              f"{r['ratio']:.2f} | {r['qint8_peak_rss_mb']:.0f} | {r['onnxruntime_peak_rss_mb']:.0f} | {r['qint8_peak_activation_mb']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
