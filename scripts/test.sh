#!/usr/bin/env bash
# The project's test command (the one README.md gives and .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
# onnxruntime is the outside oracle of the parity tests; install it when it
# is missing (the tests skip it, with a note, if that is not possible).
if ! python3 -c "import onnxruntime, numpy" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check onnxruntime numpy \
    || echo "note: could not install onnxruntime; parity tests will be skipped" >&2
fi
# Property tests use a fixed seed so every run checks the same cases (set
# PROPTEST_RNG_SEED to explore others; failures are saved beside each test).
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261126}"
cargo test --workspace
# The cuda feature builds without CUDA. Its GPU tests skip without a GPU;
# its kernels compile wherever NVRTC loads (pip's nvidia-cuda-nvrtc counts).
nvrtc=$(python3 -c "import nvidia, pathlib; print(next((str(p.parent) for d in nvidia.__path__ for p in pathlib.Path(d).glob('*/lib/libnvrtc.so*')), ''))" 2>/dev/null || true)
LD_LIBRARY_PATH="${nvrtc:+$nvrtc:}${LD_LIBRARY_PATH:-}" cargo test -p qint8-trt --features cuda
