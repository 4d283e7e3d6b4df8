"""The paper-scale studies plan what the paper ran: config/owt-small.yaml (Table 1: OpenWebText,
fixed length, the seven zero-shot sets) and config/stories.yaml (variable-length stories).

One `snakemake -n -p --profile slurm` each, in a temporary working directory: a dry run needs no
data, no network and no cluster (the SLURM executor only submits when the run is real), so the
plans are checked here although the corpora cannot be downloaded. The resolved config the dry
run writes (results/<study>/config/<hash>.yaml) gives the training and evaluation settings.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.data import zeroshot as zs

sys.path.insert(0, str(Path(__file__).parent))
from test_workflow import job_counts  # noqa: E402  (the "Job stats" table of a dry run)
from harness.core.config import config_hash, load_config, study_runs

REPO = Path(__file__).resolve().parent.parent


def dry_run(configfile: str, tmp_path: Path) -> tuple[str, dict]:
    """(the dry run's output, the resolved config it wrote) of `configfile` under the SLURM profile."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIDBENCH_SLURM_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               DIDBENCH_EVALUATORS=str(tmp_path / "evaluators"))       # not cached: the cache job is planned
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "8", "--profile", "slurm",
                             "--directory", str(tmp_path), "--configfile", configfile],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    cfg = load_config(REPO / configfile)
    resolved = tmp_path / "results" / cfg["study"] / "config" / f"{config_hash(cfg)}.yaml"
    return out, yaml.safe_load(resolved.read_text())




def jobs(output: str, rule: str) -> list[dict]:
    """{shell, resources} of every planned job of `rule`."""
    out = []
    for chunk in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        if re.search(rf"^(?:local)?rule {rule}:", chunk, flags=re.M):
            shell = re.search(r"^Shell command: (.*)$", chunk, flags=re.M)
            res = re.search(r"^\s+resources: (.*)$", chunk, flags=re.M)
            out.append({"shell": shell[1] if shell else "", "resources": res[1] if res else ""})
    return out


def _steps_by_method(output: str) -> dict[str, int]:
    found = [re.search(r"--method (\S+) .*--steps (\d+)", j["shell"]) for j in jobs(output, "train")]
    return {m[1]: int(m[2]) for m in found if m}


def test_owt_small_plans_table_1(tmp_path):
    out, cfg = dry_run("config/owt-small.yaml", tmp_path)
    runs = study_runs(cfg)
    assert {r["layout"] for r in runs} == {"fixed"} and len(runs) == 5
    assert job_counts(out) == {
        "prepare_data": 1, "evaluator_cache": 1, "zeroshot_data": 1, "train": 5, "cost": 1, "eval_ppl": 5,
        "eval_samples": 5, "eval_genppl": 5, "eval_mauve": 5, "eval_diversity": 5, "eval_zeroshot": 5,
        "report": 1, "mlflow_log": 1, "all": 1, "total": 42}
    # training at the paper's recipe (did-method.md §9): batch 512 x 1024, 400K steps; DID-S at those
    # steps, DID-F with no --steps (its job computes them from the measured FLOPs, match: flops)
    assert _steps_by_method(out) == {"did-fixed": 400000, "radd": 400000, "mdlm": 400000, "ar": 400000}
    assert [r["match"] for r in runs if r["label"] == "did-fixed-F"] == ["flops"]
    assert re.search(r"--method did-fixed-F --layout fixed --seed 0 +--data", "".join(j["shell"] for j in jobs(out, "train")))
    t = cfg["train"]
    assert (t["batch_size"], t["lr"], t["warmup"], t["weight_decay"], t["ema"]) == (512, 3e-4, 2500, 0.03, 0.9999)
    assert cfg["size"] == "small" and cfg["data"]["seq_len"] == 1024 and cfg["data"]["tokenizer"]["kind"] == "gpt2"
    assert all("gpu=1" in j["resources"] and "runtime=2880" in j["resources"] for j in jobs(out, "train"))
    # gen PPL under GPT-2 large, by name (cached once by the local evaluator job)
    assert [j["shell"].split(" > ")[0] for j in jobs(out, "evaluator_cache")] == [
        f"python -m harness evaluate evaluator --name gpt2-large --out {tmp_path / 'evaluators' / 'gpt2-large'}"]
    assert all("--evaluator-dir " + str(tmp_path / "evaluators" / "gpt2-large") in j["shell"]
               for j in jobs(out, "eval_genppl"))
    # the seven zero-shot sets from the hub, with the lineage's detokenisers, every row at MC 1024
    z = cfg["evaluate"]["zeroshot"]
    assert z["datasets"] == list(zs.SETS) and z["files"] == {} and (z["mc"], z["max_sequences"]) == (1024, None)
    assert {n: zs.SETS[n].detokenizer for n in z["datasets"] if zs.SETS[n].detokenizer} == {
        "wikitext103": "wikitext", "lambada": "lambada", "lm1b": "lm1b", "ptb": "ptb"}
    sets = "results/owt-small/zeroshot/sets.pt"
    assert [j["shell"].split(" > ")[0].split(" --out ")[0] for j in jobs(out, "zeroshot_data")] == [
        f"python -m harness evaluate zeroshot-data --config results/owt-small/config/{config_hash(cfg)}.yaml "
        "--data results/owt-small/data"]
    zero = jobs(out, "eval_zeroshot")
    assert sorted(re.search(r"--run \S+/runs/(\S+)", j["shell"])[1] for j in zero) == sorted(r["name"] for r in runs)
    assert all(f"--sets {sets} --out " in j["shell"] and "gpu=1" in j["resources"] for j in zero)
    # the zero-shot sets download on the submitting node, like the corpus (a local rule)
    text = (REPO / "workflow" / "rules" / "evaluate.smk").read_text()
    assert re.search(r"^localrules:\n    zeroshot_data,\n", text, flags=re.M)


def test_stories_plans_the_variable_length_study(tmp_path):
    out, cfg = dry_run("config/stories.yaml", tmp_path)
    runs = study_runs(cfg)
    assert {r["layout"] for r in runs} == {"varlen"} and len(runs) == 6
    assert job_counts(out) == {
        "prepare_data": 1, "evaluator_cache": 1, "train": 6, "cost": 1, "eval_ppl": 6, "eval_samples": 6,
        "eval_genppl": 6, "eval_mauve": 6, "eval_diversity": 6, "eval_lengths": 6, "report": 1, "mlflow_log": 1,
        "all": 1, "total": 48}                           # no zero-shot job: Table 1 is fixed length
    assert _steps_by_method(out) == {m: 60000 for m in ("did", "radd", "mdlm", "ilm", "ar")}   # DID-F: computed
    t = cfg["train"]
    assert (t["batch_size"], t["lr"], t["warmup"], t["weight_decay"]) == (512, 1e-4, 1000, 0.01)
    assert cfg["evaluate"]["samples"]["steps"] == [64, 128, 256, 512] and cfg["evaluate"]["samples"]["n"] == 1024
    assert all("--evaluator-dir " + str(tmp_path / "evaluators" / "gpt2-large") in j["shell"]
               for j in jobs(out, "eval_genppl"))
    assert cfg["evaluate"]["zeroshot"]["datasets"] == []


@pytest.mark.parametrize("path", ["config/owt-small.yaml", "config/stories.yaml"])
def test_paper_configs_are_documented(path):
    readme = (REPO / "config" / "README.md").read_text()
    assert f"## `{Path(path).name}`" in readme
