#!/usr/bin/env python3
"""Where does a QDQ model's accuracy go? Remove one kind of quantization at a time.

Takes a QDQ ONNX file (as `qint8 quantize` or `qint8 mixed-precision` write
it) and scores it with onnxruntime on an IDX test set, then once per kind of
quantized tensor with that kind's Q/DQ pairs bypassed (its consumers read the
float tensor again), and once with every weight back in float. The gain of
each row over the first is what that kind of quantization costs; a cost spread
evenly over many nodes cannot be recovered by keeping a few nodes in float.

Kinds, by the node that reads the quantized tensor:
  depthwise   input of a grouped Conv
  gated       input of a Conv fed by a Mul whose inputs are not x and
              sigmoid(x) (a squeeze-and-excitation output)
  swish       input of a Conv fed by x * sigmoid(x)
  pooled      input of a Conv fed by GlobalAveragePool
  conv        input of any other Conv (the model input included)
  gemm        input of a Gemm or MatMul
  add         input of an Add
  weights     every DequantizeLinear weight replaced by --fp32's initializer
              of the same name, where that initializer rounds to the stored
              int8 values (a smoothed file's rescaled weights do not: pass
              --no-smooth when quantizing for this row)

Preprocessing as in scripts/eval_vs_onnxruntime.py (--pad, --mean, --std).
onnxruntime runs with graph optimizations off, so every row computes the QDQ
arithmetic as written (with them on, it fuses QDQ groups into integer
kernels that round differently).

Example:

    qint8 quantize fixtures/models/efficientnet_b0.onnx --calib fixtures/data/calib-images-idx3-ubyte \\
        --method minmax --per-tensor --no-smooth --pad 2 --mean 0.2860 --std 0.3530 -o /tmp/e.onnx
    python3 benches/scripts/qdq_ablation.py /tmp/e.onnx --fp32 fixtures/models/efficientnet_b0.onnx \\
        --data t10k-images-idx3-ubyte.gz --pad 2 --mean 0.2860 --std 0.3530

Needs numpy, onnx and onnxruntime (`pip install onnxruntime onnx numpy`).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "scripts"))
from eval_vs_onnxruntime import floats, labels_path_for, preprocess, read_idx  # noqa: E402

KINDS = ["depthwise", "gated", "swish", "pooled", "conv", "gemm", "add"]


def producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def dequantized_source(prod: dict, name: str) -> str | None:
    """The float tensor behind name when name is DequantizeLinear(QuantizeLinear(x))."""
    dq = prod.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = prod.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.input[0]


def kind(prod: dict, node, source: str) -> str:
    if node.op_type == "Add":
        return "add"
    if node.op_type in ("Gemm", "MatMul"):
        return "gemm"
    if node.op_type != "Conv":
        return "other"
    if any(a.name == "group" and a.i > 1 for a in node.attribute):
        return "depthwise"
    src = prod.get(source)
    if src is None:
        return "conv"
    if src.op_type == "GlobalAveragePool":
        return "pooled"
    if src.op_type == "Mul":
        a, b = src.input
        for x, s in ((a, b), (b, a)):
            p = prod.get(s)
            if p is not None and p.op_type == "Sigmoid" and p.input[0] == x:
                return "swish"
        return "gated"
    return "conv"


def bypass(model, kinds: set[str]):
    """A copy of model whose activation Q/DQ pairs of the given kinds are bypassed; the count."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    prod = producers(m.graph)
    n = 0
    for node in m.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, x in enumerate(node.input):
            src = dequantized_source(prod, x)
            if src is not None and kind(prod, node, src) in kinds:
                node.input[i] = src
                n += 1
    return m, n


def float_weights(model, fp32):
    """A copy of model whose weight DequantizeLinear outputs are replaced by fp32's initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    prod = producers(m.graph)
    fp = {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in m.graph.initializer}
    n = 0
    for node in m.graph.node:
        for i, x in enumerate(node.input):
            dq = prod.get(x)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in have:
                continue
            name = dq.input[0].removesuffix("_quantized")
            if name in fp and rounds_to(fp[name], m.graph, dq):
                node.input[i] = name
                if name not in have:
                    m.graph.initializer.append(fp[name])
                    have.add(name)
                n += 1
    return m, n


def rounds_to(weight, graph, dq) -> bool:
    """Whether the float weight is what dq's int8 values were rounded from."""
    inits = {t.name: t for t in graph.initializer if t.name in dq.input}
    q = onnx.numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = onnx.numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    w = onnx.numpy_helper.to_array(weight).astype(np.float64)
    if w.shape != q.shape:
        return False
    if scale.size > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    return bool(np.all(np.abs(w - q * scale) <= 0.5001 * scale))


def top1(model, x: np.ndarray, labels: np.ndarray, threads: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), 256):
        correct += int((s.run(None, {name: x[i: i + 256]})[0].argmax(1) == labels[i: i + 256]).sum())
    return 100.0 * correct / len(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="QDQ ONNX file")
    ap.add_argument("--fp32", help="the FP32 model it came from (for the weights row)")
    ap.add_argument("--data", required=True, help="IDX images (may be gzipped)")
    ap.add_argument("--labels", help="IDX labels (default: next to --data)")
    ap.add_argument("--pad", type=int, default=0)
    ap.add_argument("--mean", type=floats, default=[0.0])
    ap.add_argument("--std", type=floats, default=[1.0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    data = Path(args.data)
    labels = Path(args.labels) if args.labels else labels_path_for(data)
    if labels is None:
        print(f"no labels found next to {data}; pass --labels", file=sys.stderr)
        return 2
    x = preprocess(read_idx(data), args.pad, args.mean, args.std)
    y = read_idx(labels).astype(np.int64)
    model = onnx.load(args.model)
    prod = producers(model.graph)
    counts = Counter(
        kind(prod, n, src)
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        for src in (dequantized_source(prod, i) for i in n.input)
        if src is not None
    )
    base = top1(model, x, y, args.threads)
    print(f"{args.model}: {len(x)} images, onnxruntime {ort.__version__}\n")
    print("| in float | inputs | top-1 % | gain (pp) |\n|---|---|---|---|")
    print(f"| nothing (the file as it is) | | {base:.2f} | |")
    for k in KINDS:
        if counts[k]:
            m, n = bypass(model, {k})
            t = top1(m, x, y, args.threads)
            print(f"| {k} | {n} | {t:.2f} | {t - base:+.2f} |")
    if args.fp32:
        m, n = float_weights(model, onnx.load(args.fp32))
        if n:
            t = top1(m, x, y, args.threads)
            print(f"| weights | {n} | {t:.2f} | {t - base:+.2f} |")
        else:
            print("| weights | 0 | (no weight of --fp32 rounds to the stored ones) | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
