"""The micro study through SLURM: every non-local job goes through sbatch.

Needs a SLURM cluster, e.g. the one-node loopback cluster of scripts/local-slurm/start.sh:

    scripts/local-slurm/start.sh /tmp/didbench-slurm
    pytest -m slurm tests/test_slurm.py
    scripts/local-slurm/stop.sh /tmp/didbench-slurm

Runs `--profile slurm --profile slurm-cpu` (the GPU profile with its GPU requests replaced by
the CPU-only one, as a CPU cluster would). The run is wrapped in `timeout -k` because a Snakemake
that polls a job it can no longer see outlives a plain SIGTERM (local-slurm.md, pitfall 3).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import load_config, study_runs

REPO = Path(__file__).resolve().parent.parent
MICRO = "tests/configs/micro.yaml"
LOCAL_RULES = {"report", "mlflow_log", "all"}

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
    cmd = ["timeout", "-k", "15", "1500", sys.executable, "-m", "snakemake", "--cores", "8",
           "--profile", "slurm", "--profile", "slurm-cpu", "--slurm-keep-successful-logs",
           "--directory", str(tmp_path), "--configfile", MICRO]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]

    cfg = load_config(REPO / MICRO)
    study = tmp_path / "results" / cfg["study"]
    assert json.loads((study / "mlflow.done").read_text())["runs"] == len(study_runs(cfg))
    assert list((study / "tables").glob("*.md")) and list((study / "figures").glob("*.png"))

    # every job except the local rules was submitted with sbatch, and its SLURM log is kept
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)
    rules = {Path(log).relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0] for _, log in submitted}
    assert {"rule_prepare_data", "rule_train", "rule_eval_samples", "rule_eval_genppl", "rule_eval_mauve"} <= rules
    assert not {f"rule_{r}" for r in LOCAL_RULES} & rules
    assert len({job for job, _ in submitted}) == len(submitted)
    train_logs = list((tmp_path / ".snakemake" / "slurm_logs" / "rule_train").glob("*/*.log"))
    assert len(train_logs) == len(study_runs(cfg))
    # each log is the sbatch job's output: Snakemake's jobstep executor ran the rule in it
    for log in train_logs:
        text = log.read_text()
        assert "slurm-jobstep" in text and "(Rule: train)" in text, log
