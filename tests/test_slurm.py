"""The micro study through SLURM: every non-local job goes through sbatch.

Needs a SLURM cluster, e.g. the one-node loopback cluster of scripts/local-slurm/start.sh:

    scripts/local-slurm/start.sh /tmp/didbench-slurm
    pytest -m slurm tests/test_slurm.py
    scripts/local-slurm/stop.sh /tmp/didbench-slurm

Runs `--profile slurm --profile slurm-cpu --profile scripts/local-slurm/profile`: the user's
GPU profile, the CPU-only overlay (GPUs off, every other setting kept) and the loopback
cluster's overlay (squeue polling). The run is wrapped in `timeout -k` because a Snakemake that
polls a job it can no longer see outlives a plain SIGTERM (local-slurm.md, pitfall 3).
Then the training jobs are submitted once more with 8 GPUs (config resources.gpus_per_train)
to the cluster's GPU partition, which is down: they queue, never run, and their sbatch options
are read back (the node has 8 stand-in GPUs, so the request is validated).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core.config import load_config, study_runs

REPO = Path(__file__).resolve().parent.parent
MICRO = "tests/configs/micro.yaml"
LOCAL_RULES = {"report", "mlflow_log", "all", "prepare_data", "evaluator_cache"}
PROFILES = ["--profile", "slurm", "--profile", "slurm-cpu", "--profile", "scripts/local-slurm/profile"]
SUBMITTED = r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)"

pytestmark = pytest.mark.slurm


def cluster_up() -> bool:
    if not (shutil.which("sinfo") and shutil.which("sbatch") and shutil.which("timeout")):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.strip() in ("idle", "mixed") for s in out.stdout.split())


@pytest.mark.skipif(
    not cluster_up() and not os.environ.get("CI"),  # in CI the cluster must be up: fail, never skip
    reason="no SLURM cluster with an idle node (scripts/local-slurm/start.sh)",
)
def test_micro_study_through_slurm(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DIDBENCH_EVALUATORS", str(REPO / "resources" / "evaluators"))
    env["DIDBENCH_SLURM_CPU_PARTITION"] = "debug"   # scripts/local-slurm/start.sh: runs jobs
    env["DIDBENCH_SLURM_GPU_PARTITION"] = "gpu"     # down: queues GPU jobs, never runs them
    cmd = ["timeout", "-k", "15", "1500", sys.executable, "-m", "snakemake", "--cores", "8", *PROFILES,
           "--slurm-keep-successful-logs", "--verbose", "--directory", str(tmp_path), "--configfile", MICRO]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]

    cfg = load_config(REPO / MICRO)
    study = tmp_path / "results" / cfg["study"]
    assert json.loads((study / "mlflow.done").read_text())["runs"] == len(study_runs(cfg))
    assert list((study / "tables").glob("*.md")) and list((study / "figures").glob("*.png"))

    # every job except the local rules was submitted with sbatch, and its SLURM log is kept
    submitted = re.findall(SUBMITTED, output)
    rules = {Path(log).relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0] for _, log in submitted}
    assert {"rule_train", "rule_eval_samples", "rule_eval_genppl", "rule_eval_mauve"} <= rules
    assert not {f"rule_{r}" for r in LOCAL_RULES} & rules
    # the two rules that download run on the submitting node (compute nodes need no network)
    assert "localrule prepare_data:" in output
    assert len({job for job, _ in submitted}) == len(submitted)
    train_logs = list((tmp_path / ".snakemake" / "slurm_logs" / "rule_train").glob("*/*.log"))
    assert len(train_logs) == len(study_runs(cfg))
    # each log is the sbatch job's output: Snakemake's jobstep executor ran the rule in it
    for log in train_logs:
        text = log.read_text()
        assert "slurm-jobstep" in text and "(Rule: train)" in text, log

    # without GPUs, the training jobs keep every other option of slurm/config.yaml's train block
    calls = train_sbatch_calls(output)
    assert len(calls) == len(study_runs(cfg)), output[-3000:]
    for call in calls:
        assert " -t 2880" in call and " --mem 64000" in call and "--signal=TERM@120" in call, call
        assert "--gpus" not in call and " -p debug" in call.replace("'", ""), call
    gpu_override(tmp_path, env, len(calls))


def train_sbatch_calls(output: str) -> list[str]:
    """The sbatch command lines of the training jobs (`--verbose` logs every one)."""
    return [c for c in re.findall(r"sbatch call: (.*)", output) if "rule_train" in c]


def gpu_override(workdir: Path, env: dict, n_train: int) -> None:
    """Submit the training jobs with 8 GPUs to the down GPU partition; check what SLURM holds."""
    log_path = workdir / "override.log"
    cmd = ["timeout", "-k", "15", "600", sys.executable, "-m", "snakemake", "--cores", "8", *PROFILES,
           "--verbose", "--directory", str(workdir), "--forcerun", "train", "--until", "train",
           "--config", "resources={gpus_per_train: 8, gpus_per_eval: 0}", "--configfile", MICRO]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    jobs: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            jobs = [j for j, log in re.findall(SUBMITTED, log_path.read_text()) if "rule_train" in log]
            if len(jobs) == n_train:
                break
            time.sleep(2)
        output = log_path.read_text()
        assert len(jobs) == n_train, output[-5000:]
        for job in jobs:
            info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
            fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
            assert fields["Partition"] == "gpu" and fields["JobState"] == "PENDING", info
            assert fields["TresPerJob"] == "gres:gpu:8" and fields["CpusPerTres"] == "gres:gpu:8", info
            assert fields["TimeLimit"] == "2-00:00:00" and fields["MinMemoryNode"] in ("64000M", "62.50G"), info
        calls = train_sbatch_calls(output)
        assert len(calls) == n_train
        for call in calls:
            assert "--gpus=8" in call and "--cpus-per-gpu=8" in call and "--signal=TERM@120" in call, call
        assert "exec torchrun --standalone --nproc_per_node 8 -m harness train" in output
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True)
