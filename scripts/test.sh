#!/usr/bin/env bash
# The project's test command (the one README.md gives and .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
