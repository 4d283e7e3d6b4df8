#!/usr/bin/env bash
# GPU check of the cost benchmark (issue 8): tiny and small, fixed (L=128, 1024) and variable
# length, bf16 with synchronisation, methods interleaved. Needs only what a GPU machine with
# PyTorch already has plus this repository; no network, no install. Under 5 minutes on one H100.
# Usage: scripts/gpu_bench.sh OUT_DIR [DATA_DIR]
# DATA_DIR must be a prepared data directory (copy results/default/data from a CPU machine,
# or run `python -m harness prepare --config config/default.yaml --out DATA_DIR` where the
# dependencies are installed).
set -euo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [DATA_DIR]}
data=${2:-results/default/data}
mkdir -p "$out"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L || true
timeout 280 python -m harness bench train --data "$data" --sizes tiny small --fixed-lengths 128 1024 \
    --warmup 3 --repeats 5 --batch-size 16 --out "$out/bench-train-gpu.json" 2>&1 | tee "$out/bench-train-gpu.log"
