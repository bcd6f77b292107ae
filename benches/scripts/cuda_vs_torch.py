#!/usr/bin/env python3
"""qint8's GPU executor against PyTorch on the same GPU, in one run.

For each architecture, writes the model-zoo network (`qint8 zoo`: torchvision
topology, seeded random weights, torchvision's parameter names) as ONNX, loads
the same weights into torchvision's model, and times one batch from host
memory to host memory (upload, inference, download) in both:

- qint8: `qint8 run MODEL --device cuda --repeat N` (median of N runs after
  one untimed run);
- PyTorch: the median of N runs after three untimed ones, each synchronized.

Both run strict float32 (PyTorch's TF32 switched off). Prints the medians,
their ratio, and the largest difference of the two outputs relative to the
largest PyTorch logit.

Example (on a machine with a GPU, PyTorch and torchvision):

    cargo build --release -p qint8-cli --features cuda
    python3 benches/scripts/cuda_vs_torch.py --batch 64 --resolution 224

Needs numpy, onnx, torch and torchvision.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent.parent


def torch_model(arch: str, onnx_path: Path):
    """torchvision's `arch` with the weights of the ONNX file."""
    import onnx
    import torch
    import torchvision
    from onnx import numpy_helper

    model = getattr(torchvision.models, arch)(weights=None)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    state = model.state_dict()
    loaded = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in inits:
            raise KeyError(f"{arch}: {k} is not in {onnx_path.name}")
        loaded[k] = torch.from_numpy(np.array(inits[k])).reshape(v.shape)
    model.load_state_dict(loaded, strict=False)
    return model.eval()


def time_torch(model, x: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.cuda()
    y = None
    times = []
    with torch.inference_mode():
        for i in range(repeat + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = model(torch.from_numpy(x).cuda()).cpu()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return float(np.median(times)), y.numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="resnet50,vgg16,efficientnet_b0")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--qint8", default=str(REPO / "target" / "release" / "qint8"))
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.batch, 3, args.resolution, args.resolution), dtype=np.float32)
        np.save(tmp / "x.npy", x)
        for arch in args.archs.split(","):
            onnx_path = tmp / f"{arch}.onnx"
            subprocess.run(
                [args.qint8, "zoo", arch, "-o", str(onnx_path), "--resolution", str(args.resolution)],
                check=True, capture_output=True,
            )
            proc = subprocess.run(
                [args.qint8, "run", str(onnx_path), "-i", str(tmp / "x.npy"), "-o", str(tmp / "y.npy"),
                 "--device", "cuda", "--repeat", str(args.repeat)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                print(f"error: qint8 run failed on {arch}:\n{proc.stderr}", file=sys.stderr)
                return 2
            m = re.search(r"median ([0-9.]+) ms", proc.stdout)
            if m is None:
                print(f"error: no timing in {proc.stdout!r}", file=sys.stderr)
                return 2
            q_ms = float(m.group(1))
            q_y = np.load(tmp / "y.npy")
            t_s, t_y = time_torch(torch_model(arch, onnx_path), x, args.repeat)
            err = float(np.abs(q_y - t_y).max() / max(np.abs(t_y).max(), 1e-12))
            rows.append((arch, q_ms, t_s * 1e3, err))

    import torch

    print(f"device {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"batch {args.batch} of 3x{args.resolution}x{args.resolution}, float32, host to host")
    print(f"{'model':<16} {'qint8 ms':>9} {'torch ms':>9} {'qint8/torch':>11} {'rel. diff':>10}")
    for arch, q, t, e in rows:
        print(f"{arch:<16} {q:9.2f} {t:9.2f} {q / t:11.2f} {e:10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
