#!/usr/bin/env bash
# The prepared GPU check (issue 14): the GPU tests, then the GPU benchmarks, within 10 minutes on
# one GPU. Needs only what a GPU machine with PyTorch already has plus this repository (the tests
# also need pytest and the project's dependencies; without them they are skipped with a line).
#   scripts/gpu_bench.sh OUT_DIR [DATA_DIR]
# DATA_DIR must be a prepared data directory (copy results/default/data from a CPU machine, or
# run `python -m harness prepare --config config/default.yaml --out DATA_DIR`). Everything lands
# in OUT_DIR: env.txt, tests.log, bench-attention-gpu.{json,log}, bench-dp-gpu.{json,log},
# bench-train-gpu.{json,log}.
set -uo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [DATA_DIR]}
data=${2:-results/default/data}
mkdir -p "$out"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
status=0

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))"
} > "$out/env.txt" 2>&1 || status=1
cat "$out/env.txt"

echo "== GPU tests (pytest -m gpu) =="
if python -c "import pytest, tokenizers, yaml" 2>/dev/null; then
    timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_attention.py \
        2>&1 | tee "$out/tests.log" || status=1
else
    echo "skipped: pytest or the project's dependencies are not installed here" | tee "$out/tests.log"
fi

echo "== packed attention on CUDA (bf16): varlen kernel vs per-sequence vs padded vs dense =="
timeout 60 python -m harness bench attention --device cuda --cases 1024x16 1024x64 128x256 --repeats 5 \
    --out "$out/bench-attention-gpu.json" 2>&1 | tee "$out/bench-attention-gpu.log" || status=1

echo "== the DP's cost against L on CUDA: PyTorch path vs the Triton kernel (did.dp_kernels) =="
timeout 120 python -m did.bench_dp --device cuda --repeats 3 --out "$out/bench-dp-gpu.json" \
    2>&1 | tee "$out/bench-dp-gpu.log" || status=1

echo "== training step cost (bf16, synchronised, methods interleaved) =="
if [ -s "$data/manifest.json" ]; then
    timeout 240 python -m harness bench train --data "$data" --sizes tiny small --fixed-lengths 128 1024 \
        --warmup 3 --repeats 5 --batch-size 16 --balanced-seed --out "$out/bench-train-gpu.json" \
        2>&1 | tee "$out/bench-train-gpu.log" || status=1
else
    echo "skipped: no prepared data in $data" | tee "$out/bench-train-gpu.log"; status=1
fi
exit $status
