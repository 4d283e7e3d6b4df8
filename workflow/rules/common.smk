"""Shared state of the workflow: the validated study config, its runs, paths and helpers.

Config selection: `config/default.yaml` (the `configfile:` directive) unless `--configfile`
is given, in which case those files REPLACE it (Snakemake would otherwise merge them key by
key into the default study, silently inheriting its corpus options and method settings).
`--config key=value` overrides apply on top in both cases.

The resolved config (validated, every default filled in) is written once to
results/<study>/config/<config_hash>.yaml, and every job reads that file. It is named by its
content and never rewritten, so a dry run with an edited config cannot change what the jobs
of a running workflow read. Which jobs re-run is decided by a param per job holding a hash of
only the settings it depends on: editing e.g. the MAUVE settings re-runs MAUVE, not training.
"""

import os
import re
import shlex
import sys

REPO = workflow.basedir
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# Jobs run `python -m harness` in the working directory, which need not be the repository
# (--directory): put the repository on their PYTHONPATH, and the directory of the Python that
# runs Snakemake first on PATH, so `.venv/bin/snakemake` works without activating the venv
# (`python` and `torchrun` then come from the same environment).
# (shell.prefix is formatted like a shell command: literal braces are doubled)
def _shell_quote(path):
    return shlex.quote(path).replace("{", "{{").replace("}", "}}")


from harness.core.errors import CONSOLE_PREFIX

# CONSOLE_PREFIX: fd 3 keeps the console, so a job's error line reaches it even when its log
# cannot be written (a full disk); harness.core.errors.report_error writes there too
shell.prefix(
    "set -euo pipefail; "
    + CONSOLE_PREFIX
    + "export PYTHONPATH="
    + _shell_quote(REPO)
    + "${{PYTHONPATH:+:$PYTHONPATH}}; export PATH="
    + _shell_quote(os.path.dirname(sys.executable))
    + ":$PATH; "
)

from harness.core.config import config_hash, load_config, read_yaml, run_entry, run_settings_hash, schema, study_runs
from harness.core import metric_registry
from harness.core.errors import UserError


def _shown(path):
    """`path` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _study_config():
    """The validated, default-filled study config, or a one-line error (no traceback)."""
    cli_files = [_shown(str(f)) for f in workflow.overwrite_configfiles]
    try:  # Snakemake's own YAML reading keeps the last of duplicate keys: refuse them here
        for f in cli_files or [os.path.join(REPO, "config", "default.yaml")]:
            read_yaml(f)
    except UserError as err:
        sys.exit(f"error: {err}")
    if cli_files:
        raw = dict(workflow.config_settings.overwrite_config)
        source = ", ".join(cli_files)
    else:
        raw = dict(config)
        source = "config/default.yaml"
    res = raw.get("resources")
    if isinstance(res, dict):  # --config 'resources={gpus_per_train: 8}' gives the string '8'
        raw["resources"] = {k: int(v) if isinstance(v, str) and re.fullmatch(r"-?\d+", v) else v
                            for k, v in res.items()}
    try:
        return load_config(raw, source=source)
    except UserError as err:
        sys.exit(f"error: {err}")


CFG = _study_config()
# resources (what the cluster jobs ask for) is not part of the study: out of the hash, the
# resolved config and `config`, so changing the GPUs re-runs nothing (schema: resources)
_RESOURCE_DEFAULTS = {k: v["default"] for k, v in schema()["properties"]["resources"]["properties"].items()}
RESOURCES = {**_RESOURCE_DEFAULTS, **CFG.pop("resources", {})}
# tracking (what goes to MLflow) is not part of the study either (schema: tracking)
_TRACKING_DEFAULTS = {k: v["default"] for k, v in schema()["properties"]["tracking"]["properties"].items()}
TRACKING = {**_TRACKING_DEFAULTS, **CFG.pop("tracking", {})}
config.clear()
config.update(CFG)

STUDY = CFG["study"]
RESULTS = f"results/{STUDY}"
CONFIG_FILE = f"{RESULTS}/config/{config_hash(CFG)}.yaml"
DATA_DIR = f"{RESULTS}/data"
DATA_MARKER = f"{DATA_DIR}/manifest.json"
RUNS_DIR = f"{RESULTS}/runs"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
MLFLOW_MARKER = f"{RESULTS}/mlflow.done"
COST_DIR = f"{RESULTS}/cost"
# evaluator LMs are cached once per machine, shared by studies (override: DIDBENCH_EVALUATORS)
EVALUATORS = os.environ.get("DIDBENCH_EVALUATORS", "resources/evaluators")
EVALUATOR = CFG["evaluate"]["genppl"]["evaluator"]
METRICS = CFG["evaluate"]["metrics"]

RUNS = {r["name"]: r for r in study_runs(CFG)}
#: the data layouts the study has runs of, in a fixed order (one cost job each)
LAYOUTS = [lay for lay in ("fixed", "varlen") if any(r["layout"] == lay for r in RUNS.values())]
# software of every rule, relative to workflow/rules/ (only used with --sdm conda)
CONDA_ENV = "../envs/didbench.yaml"


def _write_resolved_config(path, cfg):
    """Write `cfg` as YAML to `path` atomically unless it exists (the name is its hash)."""
    import yaml

    if os.path.exists(path):
        return
    text = "# resolved study config: validated, defaults filled (written by the Snakefile)\n"
    text += yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


_write_resolved_config(CONFIG_FILE, CFG)


wildcard_constraints:
    run="|".join(re.escape(name) for name in sorted(RUNS)),
    layout="fixed|varlen",
    name=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


# --- settings hashes (params): a job re-runs when the settings it depends on change ---------
def settings_hash(*sections):
    """Hash of the named config sections ('a.b' for nested keys)."""
    picked = {}
    for dotted in sections:
        value = CFG
        for key in dotted.split("."):
            value = value[key]
        picked[dotted] = value
    return config_hash(picked)


def train_settings(wildcards):
    """Hash of everything one training run depends on (harness.core.config.run_settings_hash)."""
    run = RUNS[wildcards.run]
    return run_settings_hash(CFG, run_entry(CFG, run["label"], run["layout"]))


# --- per-run lookups ---------------------------------------------------------------------
def run_method(wildcards):
    return RUNS[wildcards.run]["method"]


def run_label(wildcards):
    """What `train --method` is given: the run's label (the method unless the run names one)."""
    return RUNS[wildcards.run]["label"]


def run_layout(wildcards):
    return RUNS[wildcards.run]["layout"]


def run_seed(wildcards):
    return RUNS[wildcards.run]["seed"]


def run_steps(wildcards):
    return RUNS[wildcards.run]["steps"]


def steps_option(wildcards):
    """`--steps N` for a run of a set length (the command shows it); none for a FLOPs-matched run
    (the trainer computes its steps) or an untrained one (0 steps, from its config entry)."""
    steps = RUNS[wildcards.run]["steps"]
    return f"--steps {int(steps)}" if steps else ""


def study_config(wildcards, input):
    """The resolved config file of this study (a function of `input` so that Snakemake does
    not treat its hash-named path as a changed param: `settings` params decide re-runs)."""
    return CONFIG_FILE


# --- paths handed to the CLI, derived from the job's files (no hard-coded prefixes) -------
def parent(path, levels=1):
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


def input_data_dir(wildcards, input):
    return parent(input.data)


def marker_dir(wildcards, output):
    """Directory a job's `marker` output marks as complete (data, evaluator cache, study)."""
    return parent(output.marker)


def train_run_dir(wildcards, output):
    return parent(output.checkpoint)


def report_study_dir(wildcards, output):
    return parent(output.tables)


def cost_study_dir(wildcards, output):
    """results/<study> of a cost job (its result is results/<study>/cost/<layout>.json)."""
    return parent(output.result, 2)


def layout_checkpoints(wildcards):
    """The checkpoints of every run of one layout: the cost job starts when all are trained."""
    return [f"{RUNS_DIR}/{name}/checkpoint.pt" for name, r in RUNS.items() if r["layout"] == wildcards.layout]


def eval_run_dir(wildcards, output):
    """RUN_DIR of an evaluation job (its result is RUN_DIR/eval/<what>.json)."""
    return parent(output.result, 2)


def input_evaluator_dir(wildcards, input):
    return parent(input.evaluator)


# --- cluster resources (the rules' `resources:`; runtime, memory and CPUs: the SLURM profile) --
def _partition(gpus):
    """SLURM partition of a job: DIDBENCH_SLURM_GPU_PARTITION for jobs with GPUs,
    DIDBENCH_SLURM_CPU_PARTITION for the others, each falling back to DIDBENCH_SLURM_PARTITION;
    none set: no slurm_partition (the cluster's default partition)."""
    name = "DIDBENCH_SLURM_GPU_PARTITION" if gpus else "DIDBENCH_SLURM_CPU_PARTITION"
    return os.environ.get(name) or os.environ.get("DIDBENCH_SLURM_PARTITION", "")


def job_resources(gpus=0, nodes=1):
    """gpu, nodes and slurm_partition of a rule with `gpus` GPUs per node on `nodes` nodes (from
    config resources.gpus_per_* and nodes_per_train).

    Rule resources, not profile set-resources, so that the profile's per-rule runtime, memory
    and signals stay when the GPUs change (a --set-resources on the command line replaces the
    profile's whole set-resources). `gpu` is only set where > 0, `nodes` where > 1.
    """
    out = {"gpu": int(gpus)} if gpus else {}
    if nodes > 1:
        out["nodes"] = int(nodes)
    partition = _partition(gpus)
    if partition:
        out["slurm_partition"] = partition
    return out


if RESOURCES["nodes_per_train"] > 1 and RESOURCES["gpus_per_train"] < 1:
    sys.exit("error: resources.nodes_per_train > 1 needs resources.gpus_per_train >= 1 (one torchrun per node)")
TRAIN_RESOURCES = job_resources(RESOURCES["gpus_per_train"], RESOURCES["nodes_per_train"])
GPU_EVAL_RESOURCES = job_resources(RESOURCES["gpus_per_eval"])
CPU_RESOURCES = job_resources(0)


#: the rendezvous port of multi-node training on the job's first node
RDZV_PORT = 29500


def launcher(wildcards, resources):
    """`python`; `torchrun --standalone` with one process per GPU when the job has >1 GPU on one
    node; on several nodes, `srun` one task per node, each a torchrun joined by a c10d rendezvous
    on the first node of the allocation (SLURM_JOB_NODELIST), the job id as rendezvous id.

    Depends on resources only, so Snakemake does not count it as a changed param: moving a
    run from 1 to 8 GPUs does not re-run finished jobs.
    """
    gpus = int(getattr(resources, "gpu", 0) or 0)
    nodes = int(getattr(resources, "nodes", 1) or 1)
    if nodes > 1:
        head = "$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)"
        return (f"srun --nodes {nodes} --ntasks-per-node 1 --kill-on-bad-exit=1 torchrun --nnodes {nodes}"
                f" --nproc_per_node {gpus} --rdzv_backend c10d --rdzv_id \"$SLURM_JOB_ID\""
                f" --rdzv_endpoint \"{head}:{RDZV_PORT}\"")
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus}"
    return "python"


# --- targets ------------------------------------------------------------------------------
#: what the workflow knows of each evaluation: the metric registry (harness.core.metric_registry)
METRIC_REGISTRY = metric_registry.metrics()


#: the zero-shot test sets of evaluate.zeroshot (empty: no zero-shot job is planned)
ZEROSHOT_DATASETS = CFG["evaluate"]["zeroshot"]["datasets"]


def run_eval_files(name):
    """The evaluation outputs of one run, as selected by evaluate.metrics (each metric's own layouts:
    lengths is varlen only), and zeroshot.json for a fixed-length run when
    evaluate.zeroshot.datasets names any set."""
    out = []
    for metric in (METRIC_REGISTRY[m] for m in METRICS):
        if metric.scope != "run" or RUNS[name]["layout"] not in metric.layouts:
            continue
        out += [f"{RUNS_DIR}/{name}/eval/{f}" for f in metric.files]
    if ZEROSHOT_DATASETS and RUNS[name]["layout"] == "fixed":
        out.append(f"{RUNS_DIR}/{name}/eval/zeroshot.json")
    return out


# plugin metrics (rules eval_registered / eval_registered_cpu, workflow/rules/evaluate.smk)
def registered_inputs(wildcards):
    metric = METRIC_REGISTRY[wildcards.metric]
    out = {"data": DATA_MARKER}
    if metric.needs_run:
        out["checkpoint"] = f"{RUNS_DIR}/{wildcards.run}/checkpoint.pt"
    for need in metric.needs:
        for f in METRIC_REGISTRY[need].files:
            out[f"{need}_{f.replace('.', '_')}"] = f"{RUNS_DIR}/{wildcards.run}/eval/{f}"
    return out


def registered_settings(wildcards):
    return config_hash(CFG["evaluate"].get(wildcards.metric))


def study_metric_files():
    """The study-level evaluations: results/<study>/cost/<layout>.json per layout (metric cost)."""
    return [f"{COST_DIR}/{lay}.json" for lay in LAYOUTS] if "cost" in METRICS else []


def study_results():
    """Every file the report and MLflow read: training summaries, histories and evaluations
    (per run, and the study-level cost files)."""
    out = []
    for name in RUNS:
        out += [f"{RUNS_DIR}/{name}/train.json", f"{RUNS_DIR}/{name}/history.csv"]
        out += run_eval_files(name)
    return out + study_metric_files()


def report_outputs():
    return [f"{RESULTS}/tables", f"{RESULTS}/figures", f"{RESULTS}/paper"]
