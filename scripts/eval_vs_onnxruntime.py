#!/usr/bin/env python3
"""Compare `qint8 eval` with onnxruntime (CPU) on an IDX image classification set.

Loads the IDX images (and labels) with numpy, preprocesses them the way
`qint8 eval` does (zero padding of --pad pixels on every side in uint8 pixel
space, then x / 255, minus mean, divided by std, float32 NCHW), runs the model
with onnxruntime's CPU execution provider on 2 threads and computes top-1.
Then runs `qint8 eval --json --predictions FILE.npy` with the same flags and
prints both top-1 values, both throughputs, and the number of images where
the two predicted classes differ (argmax, lowest index on ties, in both).

`--device cuda` runs qint8 on the GPU (a qint8 built with `--features cuda`);
`--ort-no-opt` turns onnxruntime's graph optimizations off, so a QDQ model
runs as its operators define it (float Q/DQ) rather than fused to integer
kernels. A float32 NPY of preprocessed NCHW inputs (with an int64 NPY of
labels) may stand in for the IDX images.

Exit status: 0 when both top-1 values are equal, 1 when they differ, 2 on
usage errors or when a tool fails.

Example:

    cargo build --release -p qint8-cli
    python3 scripts/eval_vs_onnxruntime.py fixtures/models/resnet50.onnx \
        fixtures/data/eval-images-idx3-ubyte --pad 2 --mean 0.2860 --std 0.3530

Needs numpy and onnxruntime (`pip install onnxruntime numpy`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
IDX_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (gzipped when the name ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype = IDX_TYPES.get(data[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=dtype, offset=offset, count=int(np.prod(dims)))
    return arr.reshape(dims)


def labels_path_for(images: Path) -> Path | None:
    """The `*-labels-idx1-ubyte[.gz]` file beside `*-images-idx3-ubyte[.gz]`."""
    name = images.name
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    for src, dst in [
        ("-images-idx3-ubyte", "-labels-idx1-ubyte"),
        ("-images.idx3-ubyte", "-labels.idx1-ubyte"),
        ("_images_idx3_ubyte", "_labels_idx1_ubyte"),
    ]:
        if stem.endswith(src):
            base = stem[: -len(src)] + dst
            for cand in ([base + ".gz", base] if gz else [base, base + ".gz"]):
                p = images.with_name(cand)
                if p.is_file():
                    return p
    return None


def preprocess(images: np.ndarray, pad: int, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 N x H x W [x C] -> float32 NCHW, padded in pixel space, normalized."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    x = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # zeros, uint8
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    c = x.shape[1]
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    m = np.broadcast_to(m, (c,)).reshape(1, c, 1, 1)
    s = np.broadcast_to(s, (c,)).reshape(1, c, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def default_qint8() -> str:
    built = REPO / "target" / "release" / "qint8"
    if built.is_file():
        return str(built)
    return shutil.which("qint8") or str(built)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="ONNX model with [batch, classes] logits output")
    ap.add_argument("images", type=Path, help="IDX images file (optionally .gz), or a float32 NPY of preprocessed NCHW inputs")
    ap.add_argument("--labels", type=Path, help="IDX labels [default: beside the images]")
    ap.add_argument("--pad", type=int, default=0)
    ap.add_argument("--mean", type=floats, default=[0.0], help="M[,M..]")
    ap.add_argument("--std", type=floats, default=[1.0], help="S[,S..]")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit", type=int, help="only the first N images")
    ap.add_argument("--threads", type=int, default=2, help="threads for both runtimes [2]")
    ap.add_argument("--qint8", default=default_qint8(), help="the qint8 binary [target/release/qint8]")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where qint8 runs [cpu]")
    ap.add_argument("--ort-no-opt", action="store_true", help="onnxruntime with graph optimizations off")
    args = ap.parse_args()

    import onnxruntime as ort

    npy = args.images.suffix == ".npy"
    labels_path = args.labels or (None if npy else labels_path_for(args.images))
    if labels_path is None:
        print(f"error: no labels file beside {args.images}; pass --labels", file=sys.stderr)
        return 2
    if npy:
        x = np.ascontiguousarray(np.load(args.images), dtype=np.float32)
        labels = np.load(labels_path).astype(np.int64)
        if args.limit:
            x, labels = x[: args.limit], labels[: args.limit]
    else:
        images = read_idx(args.images)
        labels = read_idx(labels_path).astype(np.int64)
        if args.limit:
            images, labels = images[: args.limit], labels[: args.limit]
        x = preprocess(images, args.pad, args.mean, args.std)
    n = len(x)

    # onnxruntime, CPU EP, the same thread count; time the inference loop only.
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    if args.ort_no_opt:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(args.model), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    sess.run(None, {in_name: x[: min(args.batch, n)]})  # warm-up (not timed)
    ort_pred = np.empty(n, dtype=np.int64)
    t0 = time.perf_counter()
    for start in range(0, n, args.batch):
        logits = sess.run(None, {in_name: x[start : start + args.batch]})[0]
        ort_pred[start : start + len(logits)] = logits.argmax(axis=1)
    ort_s = time.perf_counter() - t0
    ort_correct = int((ort_pred == labels).sum())

    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(tmp) / "pred.npy"
        cmd = [
            args.qint8, "eval", str(args.model), "--data", str(args.images),
            "--labels", str(labels_path),
            "--batch", str(args.batch), "--threads", str(args.threads),
            "--device", args.device, "--json", "--predictions", str(pred_path),
        ]
        if not npy:
            cmd += [
                "--pad", str(args.pad),
                "--mean=" + ",".join(map(str, args.mean)), "--std=" + ",".join(map(str, args.std)),
            ]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}", file=sys.stderr)
            return 2
        q = json.loads(proc.stdout)
        q_pred = np.load(pred_path).astype(np.int64)
    if len(q_pred) != n or q["n"] != n:
        print(f"error: qint8 evaluated {q['n']} images, onnxruntime {n}", file=sys.stderr)
        return 2
    q_correct = int((q_pred == labels).sum())
    if q_correct != q["correct_top1"]:
        print("warning: qint8's predictions and its reported top-1 disagree", file=sys.stderr)
    differ = int((q_pred != ort_pred).sum())

    print(f"model            {args.model}")
    print(f"images           {args.images} ({n} images, labels {labels_path})")
    print(f"preprocessing    pad {args.pad}, mean {args.mean}, std {args.std}; batch {args.batch}, {args.threads} threads")
    opt = "optimizations off" if args.ort_no_opt else "default optimizations"
    print(f"qint8 device     {q.get('device', 'cpu')}; onnxruntime CPU, {opt}")
    print(f"onnxruntime {ort.__version__:<5} top-1 {ort_correct / n:.4f} ({ort_correct}/{n})  {n / ort_s:8.1f} images/s")
    print(f"qint8            top-1 {q['top1']:.4f} ({q['correct_top1']}/{n})  {q['images_per_s']:8.1f} images/s")
    print(f"predictions differ on {differ} of {n} images")
    return 0 if q_correct == ort_correct else 1


if __name__ == "__main__":
    sys.exit(main())
