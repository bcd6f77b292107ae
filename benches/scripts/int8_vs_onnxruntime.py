#!/usr/bin/env python3
"""INT8 inference speed: qint8's runtime on a QDQ model (integer
convolutions where the CPU has AVX-512 VNNI) against its FP32 run of the
original model, against the same QDQ file simulated in float, and against
onnxruntime running both files (its default graph optimizations turn the
QDQ model into integer kernels). Besides the fixtures, full-size ResNet-50
and EfficientNet-B0 from `qint8 zoo` at 224x224 (--skip-zoo leaves them out).

Each model is quantized with `qint8 quantize` (defaults: entropy,
per-channel, TensorRT placement; `--activations uint8` for asymmetric
uint8 activations, the form onnxruntime's x86 kernels prefer). Every configuration runs in its own
process, all of them in turn for several rounds, so drift in machine speed
hits each alike; a round reports the median over timed iterations after
warm-up, and ratios are medians of the per-round ratios. Prints a Markdown
table (--json FILE writes the raw figures).

Usage (from the repository root):
    cargo build --release -p qint8-benches --bins -p qint8-cli
    python3 benches/scripts/int8_vs_onnxruntime.py [--threads 2] [--rounds 5] [--activations uint8]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp32_vs_onnxruntime import BIN, ROOT, onnxruntime, run_json  # noqa: E402

PRE = ["--pad", "2", "--mean", "0.2860", "--std", "0.3530"]
CALIB = os.path.join(ROOT, "fixtures", "data", "calib-images-idx3-ubyte")


def qint8(model, batch, threads, iters, warmup, simulated=False):
    cmd = [os.path.join(BIN, "infer_bench"), model, "--batch", str(batch), "--threads", str(threads),
           "--iters", str(iters), "--warmup", str(warmup)]
    return run_json(cmd + (["--float-qdq"] if simulated else []))


def quantize(model, out, extra, activations):
    subprocess.run([os.path.join(BIN, "qint8"), "quantize", model, "--calib", CALIB, "--threads", "2",
                    "--activations", activations, "-o", out] + extra, check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--skip-zoo", action="store_true", help="only the fixtures")
    ap.add_argument("--activations", choices=["int8", "uint8"], default="int8",
                    help="activation type of the QDQ files [int8]")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="qint8-int8-bench-")
    cases = []
    if not args.skip_zoo:
        # Full-size ResNet-50 and EfficientNet-B0 (random weights: speed does
        # not depend on them), calibrated on 32 fixture images resized to 224.
        for zoo, label in [("resnet50", "ResNet-50"), ("efficientnet_b0", "EfficientNet-B0")]:
            fp32 = os.path.join(tmp, f"{zoo}_224.onnx")
            subprocess.run([os.path.join(BIN, "qint8"), "zoo", zoo, "--channels", "1", "--classes", "10",
                            "-o", fp32], check=True, capture_output=True)
            q = os.path.join(tmp, f"{zoo}_224.int8.onnx")
            quantize(fp32, q, ["--calib-size", "32", "--resize", "224", "--mean", "0.2860", "--std", "0.3530"],
                     args.activations)
            cases += [(f"{label} 224x224 (zoo)", fp32, q, 1, 10), (f"{label} 224x224 (zoo)", fp32, q, 8, 3)]
    for name in ["resnet50", "vgg16_bn", "efficientnet_b0"]:
        fp32 = os.path.join(ROOT, "fixtures", "models", f"{name}.onnx")
        q = os.path.join(tmp, f"{name}.int8.onnx")
        quantize(fp32, q, PRE, args.activations)
        cases += [(f"{name} fixture 32x32", fp32, q, 1, 200), (f"{name} fixture 32x32", fp32, q, 32, 60)]

    runs = {
        "qint8 FP32": lambda fp32, q, b, it: qint8(fp32, b, args.threads, it, 3),
        "qint8 INT8": lambda fp32, q, b, it: qint8(q, b, args.threads, it, 3),
        "qint8 INT8 simulated": lambda fp32, q, b, it: qint8(q, b, args.threads, it, 3, simulated=True),
        "onnxruntime FP32": lambda fp32, q, b, it: onnxruntime(fp32, b, args.threads, it, 3),
        "onnxruntime INT8": lambda fp32, q, b, it: onnxruntime(q, b, args.threads, it, 3),
    }
    rows = []
    for label, fp32, q, batch, iters in cases:
        got = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, f in runs.items():
                got[k].append(f(fp32, q, batch, iters)["images_per_s"])

        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(got[a], got[b]))

        row = {"model": label, "batch": batch, "threads": args.threads}
        row.update({k: statistics.median(v) for k, v in got.items()})
        row.update({
            "qint8 INT8 / qint8 FP32": ratio("qint8 INT8", "qint8 FP32"),
            "qint8 INT8 / simulated": ratio("qint8 INT8", "qint8 INT8 simulated"),
            "onnxruntime INT8 / onnxruntime FP32": ratio("onnxruntime INT8", "onnxruntime FP32"),
            "qint8 INT8 / onnxruntime INT8": ratio("qint8 INT8", "onnxruntime INT8"),
        })
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print("| model | batch | qint8 FP32 | qint8 INT8 | INT8 speedup | vs simulated | onnxruntime FP32 | "
          "onnxruntime INT8 | its speedup | qint8 INT8 / onnxruntime INT8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['qint8 FP32']:.1f} | {r['qint8 INT8']:.1f} | "
              f"{r['qint8 INT8 / qint8 FP32']:.2f}x | {r['qint8 INT8 / simulated']:.2f}x | "
              f"{r['onnxruntime FP32']:.1f} | {r['onnxruntime INT8']:.1f} | "
              f"{r['onnxruntime INT8 / onnxruntime FP32']:.2f}x | {r['qint8 INT8 / onnxruntime INT8']:.2f} |")
    print("\n(images/s, medians of the rounds; ratios are medians of per-round ratios)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
