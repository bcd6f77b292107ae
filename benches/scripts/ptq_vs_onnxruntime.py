#!/usr/bin/env python3
"""Post-training INT8 quantization: `qint8 quantize` against onnxruntime's quantize_static.

For every model and calibration method both tools quantize the same FP32 ONNX
file on the same calibration images (the first --calib-size images, padded and
normalized the same way), to QDQ with symmetric signed INT8 activations (with
--activations uint8: asymmetric uint8 activations, onnxruntime's own default,
`qint8 quantize --activations uint8` against activation_type QUInt8 without
ActivationSymmetric) and per-channel symmetric INT8 weights. Each quantization runs in its own child
process, forked from a small launcher, so its wall time and its peak RSS
(os.wait4's ru_maxrss) belong to it alone. Then every file is evaluated on the test set: top-1 with onnxruntime
(CPU, --threads threads) for the FP32 model and both quantized files, and
`qint8 eval` top-1 for qint8's file. Prints a Markdown table (and --json FILE
writes the raw figures).

What is timed:
  qint8        the whole `qint8 quantize ... --threads N` process (reading the
               model and images, calibration, writing the file).
  onnxruntime  the quantize_static(...) call inside its child (interpreter
               start, imports and preparing the calibration arrays excluded);
               quant_pre_process, which onnxruntime recommends before QDQ
               quantization (quantize_static logs a warning without it), runs
               once per model in a child of its own and is reported on its own
               row, as a separate cost.
Each tool quantizes --repeat times (5), the two interleaved so that the
machine's drift reaches both alike; a tool's time is the median of its runs.
The "qint8 speedup" column is the median over the runs of onnxruntime's
quantize_static seconds over qint8's seconds, with their range (in
brackets: with the pre-processing added to onnxruntime).

onnxruntime settings (see ORT_QUANTIZE_CHILD below): quant_format QDQ,
activation_type and weight_type QInt8, per_channel=True, calibrate_method
MinMax / Entropy / Percentile, extra_options ActivationSymmetric=True,
WeightSymmetric=True, and for Percentile CalibPercentile=--percentile (the same
percentile qint8 gets; onnxruntime's own default would be 99.999). quantize_static
has no option for the calibration session's threads (its calibrator builds a
bare SessionOptions), so the child replaces
CalibraterBase.create_inference_session by a copy that also sets
intra_op_num_threads=--threads and inter_op_num_threads=1. onnxruntime has no
MSE calibration: its mse rows say n/a. Both tools get the same calibration
batch: the largest divisor of --calib-size not above --calib-batch, because
onnxruntime's histogram calibrators stack all batches into one array and fail
on a short last batch.

How onnxruntime's entropy calibration differs from TensorRT's (facts from
onnxruntime/quantization/calibrate.py of onnxruntime 1.32; TensorRT's as
published in "8-bit Inference with TensorRT", GTC 2017 S7310, and as coded in
NVIDIA's pytorch-quantization, pytorch_quantization/calib/histogram.py, whose
convention modelopt and qint8 follow):
  * Histogram: TensorRT bins |x| into 2048 bins over [0, max|x|], batch by
    batch. onnxruntime's EntropyCalibrater bins the signed values into
    num_bins bins over [-t, t], t = max|x| (HistogramCollector.collect_value);
    a later collect call that sees a larger |x| adds bins of the same width on
    both sides.
  * Defaults: create_calibrator uses num_bins=128 and num_quantized_bins=128 for
    Entropy, and quantize_static forwards only CalibTensorRangeSymmetric,
    CalibMovingAverage(Constant), CalibMaxIntermediateOutputs and
    CalibPercentile to the calibrator: through quantize_static the two bin
    counts cannot be changed.
  * Candidates: onnxruntime tries windows centred on the middle (zero) bin
    whose half-width runs from num_quantized_bins/2 to num_bins/2 bins
    (get_entropy_threshold); TensorRT tries every end bin from 128 to 2048 of
    the |x| histogram (1921 candidates). With onnxruntime's 128/128 defaults
    and the whole calibration set histogrammed in one call (what
    quantize_static does unless CalibStridedMinMax is set) there is exactly
    one candidate, the full range [-max|x|, max|x|]: Entropy then yields the
    same ranges as MinMax (on resnet50 all scales of the two files are equal).
  * Divergence: onnxruntime's reference P is the window with the counts outside
    it added to its first and last bin; Q merges the window into
    num_quantized_bins groups (any remainder joins the last group) and spreads
    each group over the bins that are non-zero in P, in an int64 array (the
    division truncates); both are smoothed (empty bins get 1e-4) before KL.
    pytorch-quantization first gives bin 0 the count of bin 1 (the ReLU zero
    spike), adds only the mass above the candidate to its last bin, keeps Q in
    float64 and takes KL of the unsmoothed distributions; among equal minima it
    keeps the largest threshold.
  * Symmetry: onnxruntime clips the chosen (lo, hi) to the observed [min, max]
    (the symmetric option is not used by the search); ActivationSymmetric then
    widens it to +-max(|lo|, |hi|). TensorRT searches one threshold on |x|.
  * Memory: HistogramCalibrater.collect_data keeps every batch's outputs of
    every calibrated tensor until the reader is exhausted and only then
    histograms them, so its memory grows with the calibration set (MinMax
    reduces each batch to min/max inside the graph instead); TensorRT,
    pytorch-quantization and qint8 update histograms batch by batch.

--memory mode: qint8's peak RSS when calibrating with entropy on the first 500
and the first 5000 images of the Fashion-MNIST training set (copied to an
uncompressed IDX file first, so reading the 60,000-image archive does not
count), per model, and their ratio.

Data: the fixture models are 1x32x32 Fashion-MNIST classifiers (pad 2 pixels,
x/255, (x-0.2860)/0.3530; see fixtures/models/MODEL_CARD.md). The test and
training sets are the gzipped Fashion-MNIST IDX files in --fashion-mnist DIR
(`apt-get install dataset-fashion-mnist` provides them).

Usage (from the repository root):
    cargo build --release -p qint8-cli
    python3 benches/scripts/ptq_vs_onnxruntime.py [--models M.onnx ...] [--methods minmax,entropy]
    python3 benches/scripts/ptq_vs_onnxruntime.py --memory [--models M.onnx ...]

Needs numpy, onnx and onnxruntime (`pip install onnxruntime onnx numpy`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_MODELS = [str(ROOT / "fixtures" / "models" / f"{m}.onnx") for m in ("resnet50", "vgg16_bn", "efficientnet_b0")]
DEFAULT_CALIB = str(ROOT / "fixtures" / "data" / "calib-images-idx3-ubyte")
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
METHODS = ["minmax", "entropy", "percentile", "mse"]
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# --------------------------------------------------------------------------- data

def read_idx(path: Path) -> np.ndarray:
    """Reads a uint8 IDX file (gzipped when the name ends in .gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim, count=int(np.prod(dims)))
    return arr.reshape(dims)


def write_idx(path: Path, arr: np.ndarray) -> None:
    """Writes a uint8 array as an uncompressed IDX file."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]))
        for d in arr.shape:
            f.write(int(d).to_bytes(4, "big"))
        f.write(arr.tobytes())


def preprocess(images: np.ndarray, pad: int, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 N x H x W [x C] -> float32 NCHW: zero padding in pixel space, x/255, (x-mean)/std."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    x = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    c = x.shape[1]
    m = np.broadcast_to(np.asarray(mean, dtype=np.float32).reshape(-1), (c,)).reshape(1, c, 1, 1)
    s = np.broadcast_to(np.asarray(std, dtype=np.float32).reshape(-1), (c,)).reshape(1, c, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def fmt_floats(v: list[float]) -> str:
    return ",".join(repr(x) for x in v)


def calib_batch(n: int, limit: int) -> int:
    """The largest divisor of n that is at most limit."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# --------------------------------------------------------------------------- children

# A small launcher between this script and each measured child. Linux's
# ru_maxrss of a process includes the resident size of the address space it
# had before exec(): a child spawned straight from this script (which holds
# the test set and onnxruntime, 150+ MB) would report at least this script's
# size. Forked from this ~10 MB launcher instead, a child's figure is its own
# peak (or ~10 MB if that were smaller).
LAUNCHER = r"""
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": time.perf_counter() - t, "maxrss_kib": ru.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status) & 255)
"""


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Runs cmd to completion; returns its wall time, its own peak RSS and its output."""
    with tempfile.TemporaryDirectory(prefix="qint8-ptq-run-") as d:
        usage = os.path.join(d, "usage.json")
        out_path, err_path = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            p = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, usage, *cmd], stdout=out, stderr=err, env=env)
        res = {"cmd": cmd, "returncode": p.returncode,
               "stdout": open(out_path, errors="replace").read(), "stderr": open(err_path, errors="replace").read()}
        if os.path.exists(usage):
            u = json.load(open(usage))
            res["wall_s"] = u["wall_s"]
            res["peak_rss_mb"] = u["maxrss_kib"] / 1024  # Linux: ru_maxrss is in KiB
        elif p.returncode == 0:
            raise RuntimeError(f"the launcher of {cmd} wrote no usage figures")
    return res


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


# Runs in a child process: python3 -c ORT_PREPROCESS_CHILD IN OUT RESULT.json
ORT_PREPROCESS_CHILD = r"""
import json, sys, time
from onnxruntime.quantization import quant_pre_process
src, dst, result = sys.argv[1:4]
t = time.perf_counter()
quant_pre_process(src, dst)
json.dump({"seconds": time.perf_counter() - t}, open(result, "w"))
"""

# Runs in a child process: python3 THIS_SCRIPT _ort_quantize SPEC.json
def ort_quantize_child(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization import calibrate

    threads = spec["threads"]
    patched = {"sessions": 0}

    # quantize_static offers no thread setting for its calibration session;
    # same body as CalibraterBase.create_inference_session plus the thread count.
    def create_inference_session(self):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=so,
                                                  providers=self.execution_providers)
        patched["sessions"] += 1

    if not hasattr(calibrate.CalibraterBase, "create_inference_session"):
        raise SystemExit("onnxruntime's CalibraterBase has no create_inference_session: cannot set its threads")
    calibrate.CalibraterBase.create_inference_session = create_inference_session

    images = read_idx(Path(spec["calib"]))[: spec["calib_size"]]
    if len(images) < spec["calib_size"]:
        raise SystemExit(f"{spec['calib']} has only {len(images)} images")
    x = preprocess(images, spec["pad"], spec["mean"], spec["std"])
    batch = spec["batch"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(x):
                return None
            b = x[self.i: self.i + batch]
            self.i += batch
            return {spec["input_name"]: b}

        def __len__(self):
            return len(x)

        def set_range(self, start_index, end_index):
            raise NotImplementedError

    uint8 = spec.get("activations") == "uint8"
    extra = {"ActivationSymmetric": not uint8, "WeightSymmetric": True}
    if spec["method"] == "percentile":
        extra["CalibPercentile"] = spec["percentile"]
    t = time.perf_counter()
    quantize_static(
        spec["model"], spec["output"], Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8 if uint8 else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[spec["method"]]),
        extra_options=extra,
    )
    seconds = time.perf_counter() - t
    hwm = None
    try:  # the peak RSS of this address space, a cross-check of the launcher's figure
        with open("/proc/self/status") as f:
            hwm = next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    json.dump({"seconds": seconds, "vm_hwm_mb": hwm, "calibration_sessions": patched["sessions"], "extra_options": extra,
               "batch": batch, "onnxruntime": ort.__version__}, open(spec["result"], "w"))


# --------------------------------------------------------------------------- evaluation

def ort_top1(model: str, x: np.ndarray, labels: np.ndarray, threads: int, batch: int = 256) -> float:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        logits = s.run(None, {name: x[i: i + batch]})[0]
        correct += int((logits.argmax(axis=1) == labels[i: i + batch]).sum())
    return correct / len(x)


def qint8_eval(args, model: str, images: str, labels: str) -> float:
    r = subprocess.run([args.qint8, "eval", model, "--data", images, "--labels", labels, "--pad", str(args.pad),
                        "--mean=" + fmt_floats(args.mean), "--std=" + fmt_floats(args.std),
                        "--threads", str(args.threads), "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"qint8 eval failed:\n{r.stderr}")
    return json.loads(r.stdout)["top1"]


def input_name(model: str) -> str:
    import onnx
    m = onnx.load(model, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


# --------------------------------------------------------------------------- modes

def qint8_quantize(args, model: str, calib: str, n: int, method: str, out: str, batch: int) -> dict:
    cmd = [args.qint8, "quantize", model, "--calib", calib, "--calib-size", str(n), "--method", method,
           "--pad", str(args.pad), "--mean=" + fmt_floats(args.mean), "--std=" + fmt_floats(args.std),
           "--threads", str(args.threads), "--batch", str(batch), "-o", out, "--json",
           "--activations", args.activations]
    if method == "percentile":
        cmd += ["--percentile", repr(args.percentile)]
    r = run_measured(cmd, child_env(args.threads))
    if r["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r['returncode']}):\n{r['stderr'][-3000:]}")
    r["summary"] = json.loads(r["stdout"].strip().splitlines()[-1])
    return r


def compare(args) -> list[dict]:
    import onnxruntime as ort

    fm = Path(args.fashion_mnist)
    test_images, test_labels = fm / "t10k-images-idx3-ubyte.gz", fm / "t10k-labels-idx1-ubyte.gz"
    x_test = preprocess(read_idx(test_images), args.pad, args.mean, args.std)
    y_test = read_idx(test_labels).astype(np.int64)
    n_calib = len(read_idx(Path(args.calib)))
    if n_calib < args.calib_size:
        sys.exit(f"error: {args.calib} has {n_calib} images, fewer than --calib-size {args.calib_size}")
    batch = calib_batch(args.calib_size, args.calib_batch)
    print(f"onnxruntime {ort.__version__}; {args.calib_size} calibration images from {args.calib}, batch {batch}; "
          f"{len(x_test)} test images; {args.threads} threads", file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory(prefix="qint8-ptq-") as tmp:
        for model in args.models:
            name = Path(model).stem
            fp32 = ort_top1(model, x_test, y_test, args.threads)
            rows.append({"model": name, "method": "fp32", "tool": "onnxruntime", "top1": fp32})
            print(json.dumps(rows[-1]), file=sys.stderr)

            ort_input = model
            if not args.skip_ort:
                pre = os.path.join(tmp, f"{name}.pre.onnx")
                res = os.path.join(tmp, f"{name}.pre.json")
                r = run_measured([sys.executable, "-c", ORT_PREPROCESS_CHILD, model, pre, res], child_env(args.threads))
                if r["returncode"] != 0:
                    print(f"warning: quant_pre_process failed, quantizing the original file:\n{r['stderr'][-2000:]}",
                          file=sys.stderr)
                    pre_s = None
                else:
                    ort_input = pre
                    pre_s = json.load(open(res))["seconds"]
                rows.append({"model": name, "method": "pre-process", "tool": "onnxruntime", "seconds": pre_s,
                             "process_wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                             "error": None if pre_s is not None else r["stderr"][-2000:]})
                print(json.dumps(rows[-1]), file=sys.stderr)
            pre_s = next((r["seconds"] for r in rows if r["model"] == name and r["method"] == "pre-process"), None)

            for method in args.methods:
                # Both tools quantize --repeat times, interleaved, so the
                # machine's drift hits both alike; each reports its median
                # and the speedup is the median of the paired ratios.
                ort_row = {"model": name, "method": method, "tool": "onnxruntime"}
                if args.skip_ort:
                    ort_row = None
                elif method not in ORT_METHODS:
                    ort_row["error"] = "n/a (onnxruntime has no such calibration method)"
                ort_out = os.path.join(tmp, f"{name}.{method}.ort.onnx")
                out = os.path.join(tmp, f"{name}.{method}.qint8.onnx")
                ort_runs, q_runs = [], []
                for _ in range(args.repeat):
                    if ort_row is not None and "error" not in ort_row:
                        spec = {"model": ort_input, "output": ort_out, "calib": args.calib,
                                "calib_size": args.calib_size, "pad": args.pad, "mean": args.mean, "std": args.std,
                                "batch": batch, "threads": args.threads, "method": method,
                                "percentile": args.percentile, "input_name": input_name(ort_input),
                                "activations": args.activations,
                                "result": ort_out + ".json"}
                        spec_path = ort_out + ".spec.json"
                        json.dump(spec, open(spec_path, "w"))
                        r = run_measured([sys.executable, os.path.abspath(__file__), "_ort_quantize", spec_path],
                                         child_env(args.threads))
                        if r["returncode"] != 0:
                            ort_row["error"] = r["stderr"][-2000:]
                            print(f"warning: onnxruntime {method} on {name} failed:\n{r['stderr'][-2000:]}",
                                  file=sys.stderr)
                        else:
                            ort_runs.append((json.load(open(spec["result"])), r))
                    q_runs.append(qint8_quantize(args, model, args.calib, args.calib_size, method, out, batch))

                if ort_row is not None and "error" not in ort_row:
                    info, r = ort_runs[-1]
                    ort_row.update(seconds=statistics.median(i["seconds"] for i, _ in ort_runs),
                                   runs_s=[i["seconds"] for i, _ in ort_runs], process_wall_s=r["wall_s"],
                                   peak_rss_mb=max(rr["peak_rss_mb"] for _, rr in ort_runs), batch=info["batch"],
                                   calibration_sessions=info["calibration_sessions"], vm_hwm_mb=info["vm_hwm_mb"],
                                   extra_options=info["extra_options"], onnxruntime=info["onnxruntime"],
                                   top1=ort_top1(ort_out, x_test, y_test, args.threads))
                    ort_row["drop_pp"] = (fp32 - ort_row["top1"]) * 100
                if ort_row is not None:
                    rows.append(ort_row)
                    print(json.dumps(ort_row), file=sys.stderr)

                q = q_runs[-1]
                row = {"model": name, "method": method, "tool": "qint8",
                       "seconds": statistics.median(qq["wall_s"] for qq in q_runs),
                       "runs_s": [qq["wall_s"] for qq in q_runs],
                       "process_wall_s": q["wall_s"], "peak_rss_mb": max(qq["peak_rss_mb"] for qq in q_runs),
                       "batch": batch,
                       "calibration_seconds": q["summary"].get("calibration_seconds"),
                       "total_seconds": q["summary"].get("total_seconds"),
                       "top1": ort_top1(out, x_test, y_test, args.threads),
                       "qint8_eval_top1": qint8_eval(args, out, str(test_images), str(test_labels))}
                row["drop_pp"] = (fp32 - row["top1"]) * 100
                if ort_row is not None and "seconds" in ort_row:
                    pairs = list(zip(ort_row["runs_s"], row["runs_s"]))
                    row["speedup"] = statistics.median(o / qq for o, qq in pairs)
                    row["speedup_range"] = [min(o / qq for o, qq in pairs), max(o / qq for o, qq in pairs)]
                    if pre_s is not None:
                        row["speedup_with_preprocess"] = statistics.median((o + pre_s) / qq for o, qq in pairs)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)

    def f(v, spec):
        return "" if v is None else format(v, spec)

    print(f"\nPTQ, {args.calib_size} calibration images (batch {batch}), top-1 on {len(x_test)} test images, "
          f"{args.threads} threads; onnxruntime {ort.__version__}\n")
    print("| model | method | tool | quantize wall s | peak RSS MB | top-1 (onnxruntime) | drop vs FP32 (pp) "
          "| top-1 (qint8 eval) | qint8 speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error"):
            short = "n/a" if r["error"].startswith("n/a") else "failed"
            print(f"| {r['model']} | {r['method']} | {r['tool']} | {short} | {short} | {short} | | | |")
            continue
        if r["method"] == "fp32":
            print(f"| {r['model']} | FP32 | — | | | {r['top1']:.4f} | | | |")
            continue
        if r["method"] == "pre-process":
            print(f"| {r['model']} | (quant_pre_process) | onnxruntime | {f(r['seconds'], '.2f')} "
                  f"| {r['peak_rss_mb']:.0f} | | | | |")
            continue
        speed = ""
        if "speedup" in r:
            lo, hi = r["speedup_range"]
            speed = f"{r['speedup']:.1f}x [{lo:.1f}-{hi:.1f}]"
            if "speedup_with_preprocess" in r:
                speed += f" ({r['speedup_with_preprocess']:.1f}x)"
        print(f"| {r['model']} | {r['method']} | {r['tool']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} "
              f"| {r['top1']:.4f} | {r['drop_pp']:+.2f} | {f(r.get('qint8_eval_top1'), '.4f')} | {speed} |")
    print(f"\nquantize wall s: median of {args.repeat} runs per tool, interleaved; qint8 = the whole `qint8 quantize` "
          "process; onnxruntime = the quantize_static call (quant_pre_process on its own row). qint8 speedup = the "
          "median of the runs' onnxruntime s / qint8 s [their range] (in brackets: onnxruntime with "
          "quant_pre_process). Drop = FP32 top-1 minus quantized top-1, both with onnxruntime.")
    return rows


def memory(args) -> list[dict]:
    train = Path(args.fashion_mnist) / "train-images-idx3-ubyte.gz"
    images = read_idx(train)
    sizes = args.memory_sizes
    if max(sizes) > len(images):
        sys.exit(f"error: {train} has only {len(images)} images")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qint8-ptq-mem-") as tmp:
        files = {}
        for n in sizes:
            files[n] = os.path.join(tmp, f"train-first-{n}-images-idx3-ubyte")
            write_idx(Path(files[n]), images[:n])
        for model in args.models:
            name = Path(model).stem
            row = {"model": name, "method": "entropy", "runs": {}}
            for n in sizes:
                out = os.path.join(tmp, f"{name}.{n}.onnx")
                q = qint8_quantize(args, model, files[n], n, "entropy", out, args.calib_batch)
                row["runs"][n] = {"peak_rss_mb": q["peak_rss_mb"], "wall_s": q["wall_s"],
                                  "calibration_seconds": q["summary"].get("calibration_seconds")}
                print(json.dumps({"model": name, "calib_size": n, **row["runs"][n]}), file=sys.stderr)
            row["ratio"] = row["runs"][sizes[-1]]["peak_rss_mb"] / row["runs"][sizes[0]]["peak_rss_mb"]
            rows.append(row)

    a, b = sizes[0], sizes[-1]
    print(f"\nqint8 entropy calibration peak RSS, first N Fashion-MNIST training images, batch {args.calib_batch}, "
          f"{args.threads} threads\n")
    print(f"| model | method | peak RSS MB @{a} | peak RSS MB @{b} | ratio | calibration s @{a} | calibration s @{b} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ra, rb = r["runs"][a], r["runs"][b]
        print(f"| {r['model']} | {r['method']} | {ra['peak_rss_mb']:.0f} | {rb['peak_rss_mb']:.0f} | {r['ratio']:.2f} "
              f"| {ra['calibration_seconds']:.2f} | {rb['calibration_seconds']:.2f} |")
    return rows


def default_qint8() -> str:
    built = ROOT / "target" / "release" / "qint8"
    if built.is_file():
        return str(built)
    return shutil.which("qint8") or str(built)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_ort_quantize":
        ort_quantize_child(sys.argv[2])
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="FP32 ONNX models [the three fixtures]")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=METHODS,
                    help="comma-separated, of " + ",".join(METHODS) + " [all]")
    ap.add_argument("--calib", default=DEFAULT_CALIB, help="IDX calibration images [fixtures/data/calib-images-idx3-ubyte]")
    ap.add_argument("--calib-size", type=int, default=1000, help="calibrate on the first N images [1000]")
    ap.add_argument("--calib-batch", type=int, default=32,
                    help="calibration batch limit; the batch used is the largest divisor of --calib-size not above it [32]")
    ap.add_argument("--fashion-mnist", default=DEFAULT_FASHION_MNIST,
                    help="directory with the gzipped Fashion-MNIST IDX files [%(default)s]")
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--mean", type=floats, default=[0.2860], help="M[,M..] [0.2860]")
    ap.add_argument("--std", type=floats, default=[0.3530], help="S[,S..] [0.3530]")
    ap.add_argument("--percentile", type=float, default=99.99, help="percentile for both tools [99.99]")
    ap.add_argument("--threads", type=int, default=2, help="threads for both tools [2]")
    ap.add_argument("--skip-ort", action="store_true", help="only qint8 (and the FP32 top-1)")
    ap.add_argument("--activations", choices=["int8", "uint8"], default="int8",
                    help="activation type for both tools [int8]")
    ap.add_argument("--repeat", type=int, default=5,
                    help="quantize this many times with each tool, interleaved; medians are reported [5]")
    ap.add_argument("--memory", action="store_true", help="measure qint8's entropy-calibration peak RSS instead")
    ap.add_argument("--memory-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[500, 5000],
                    help="calibration sizes for --memory [500,5000]")
    ap.add_argument("--qint8", default=default_qint8(), help="the qint8 binary [target/release/qint8]")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")

    rows = memory(args) if args.memory else compare(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
