"""The study-config schema, harness.core.config, the Snakemake DAG of every study, and the profiles.

The DAG tests run `snakemake -n` (dry run) in a temporary working directory, so nothing is
written into the repository; no data is needed, which is why the paper-scale studies whose
corpora cannot be downloaded here are still checked.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.core.config import config_hash, load_config, run_name, schema, study_runs
from harness.core.methods import UserError

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
STUDIES = {  # config file -> expected training jobs (owt-small and stories: tests/test_paper_configs.py plans
    "config/default.yaml": 9,         # them under the SLURM profile; the micro study runs whole in tests/test_e2e.py)
    "config/shakespeare-long.yaml": 9,   # DID-S, DID-F (match: flops), MDLM, AR, FlexMDM + 4 untrained references
}


def snakemake(*args, cwd=REPO, timeout=120, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIDBENCH_SLURM_")}  # the user's own: not here
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env_extra}
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run or dry run."""
    counts = {}
    table = output.split("Job stats:", 1)[1]
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


def rule_names() -> set[str]:
    names = set()
    for smk in [REPO / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]:
        names |= set(re.findall(r"^rule (\w+):", smk.read_text(), flags=re.M))
    return names


# --- schema and harness.core.config ----------------------------------------------------------------
def test_default_yaml_equals_schema_defaults():
    """config/default.yaml spells out the schema defaults: an empty config is the default study."""
    assert load_config(REPO / "config/default.yaml") == load_config({})


def test_defaults_are_filled_nested():
    cfg = load_config({"study": "x", "train": {"lr": 0.5}, "data": {"corpus": {"name": "hf", "dataset": "d"}}})
    assert cfg["train"]["lr"] == 0.5
    assert cfg["train"]["steps"] == schema()["properties"]["train"]["properties"]["steps"]["default"]
    # options of the chosen corpus get their defaults, those of other corpora do not appear
    assert cfg["data"]["corpus"] == {"name": "hf", "dataset": "d", "config": None, "split": "train",
                                     "text_field": "text", "group_field": None, "data_files": None,
                                     "cache_dir": None}
    assert cfg["evaluate"]["samples"]["steps"] == [16, 64]


def test_load_config_does_not_change_its_input():
    raw = {"train": {"lr": 0.5}}
    load_config(raw)
    assert raw == {"train": {"lr": 0.5}}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"train": {"lr": -1}}, "cfg.yaml: train.lr: -1 is less than or equal to the minimum of 0"),
        ({"train": {"lrr": 1}}, "cfg.yaml: train.lrr: unknown key (known: steps,"),
        ({"nonsense": 1}, "cfg.yaml: nonsense: unknown key (known: study,"),
        ({"runs": [{"method": "sedd", "layout": "fixed"}]}, "cfg.yaml: runs[0].method: 'sedd' is not one of: did,"),
        ({"runs": [{"method": "did", "layout": "fixed"}]}, "cfg.yaml: runs[0].layout: 'fixed' is not allowed here"),
        ({"runs": [{"method": "did-fixed", "layout": "varlen"}]}, "cfg.yaml: runs[0].layout: 'varlen' is not allowed"),
        ({"runs": [{"method": "ar", "layout": "fixed"}] * 2}, "cfg.yaml: runs[1]: duplicate of runs[0] (ar, fixed)"),
        ({"methods": {"sedd": {}}}, "cfg.yaml: methods.sedd: unknown key (known: did,"),
        ({"train": {"step_multiplier": {"did-fixed": 0}}}, "cfg.yaml: train.step_multiplier.did-fixed: 0 is less"),
        ({"size": "huge"}, "cfg.yaml: size: 'huge' is not one of: tiny, small, medium, large"),
        ({"data": {"tokenizer": {"kind": "bert"}}}, "cfg.yaml: data.tokenizer.kind: 'bert' is not one of: gpt2, bpe"),
        ({"data": {"corpus": {"name": "hf"}}}, "cfg.yaml: data.corpus.dataset: missing required key"),
        ({"data": {"corpus": {"name": "shakespeare", "dataset": "x"}}}, "cfg.yaml: data.corpus.dataset: unknown key"),
        ({"data": {"min_tokens": 200}}, "cfg.yaml: data.min_tokens: 200 is larger than data.max_len (128)"),
        ({"evaluate": {"genppl": {"evaluator": "gpt9"}}}, "cfg.yaml: evaluate.genppl.evaluator: 'gpt9' is not one of"),
        ({"evaluate": {"samples": {"steps": [0]}}}, "cfg.yaml: evaluate.samples.steps[0]: 0 is less than the minimum of 1"),
        ({"seeds": []}, "cfg.yaml: seeds: [] should be non-empty"),
        ({"train": 5}, "cfg.yaml: train: 5 is not of type 'object'"),
    ],
)
def test_bad_configs_give_one_line(bad, message):
    with pytest.raises(UserError) as err:
        load_config(bad, source="cfg.yaml")
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {lr: 1\n")
    with pytest.raises(UserError, match=r"broken.yaml: line \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_config_hash_and_run_name():
    cfg = load_config({})
    h = config_hash(cfg)
    assert re.fullmatch(r"[0-9a-f]{12}", h)
    shuffled = json.loads(json.dumps(cfg))
    shuffled = dict(reversed(list(shuffled.items())))  # key order does not matter
    assert config_hash(shuffled) == h
    changed = copy.deepcopy(cfg)
    changed["train"]["lr"] *= 2
    assert config_hash(changed) != h
    assert run_name("did", "varlen", "tiny", 0) == "did-varlen-tiny-s0"


def test_study_runs_apply_step_multiplier():
    cfg = load_config(REPO / "config/owt-small.yaml")
    runs = {r["name"]: r for r in study_runs(cfg)}
    assert set(runs) == {"did-fixed-fixed-small-s0", "did-fixed-F-fixed-small-s0", "radd-fixed-small-s0",
                         "mdlm-fixed-small-s0", "ar-fixed-small-s0"}
    assert runs["did-fixed-fixed-small-s0"]["steps"] == runs["radd-fixed-small-s0"]["steps"] == 400000
    assert runs["did-fixed-F-fixed-small-s0"]["steps"] is None       # FLOPs-matched: its training job computes them
    cfg["train"]["step_multiplier"] = {"did-fixed": 2}                # the multiplier still works where given
    assert {r["name"]: r["steps"] for r in study_runs(cfg)}["did-fixed-fixed-small-s0"] == 800000


def test_schema_works_with_snakemake_validate():
    """The schema is plain draft 2020-12: snakemake.utils.validate accepts it and fills defaults."""
    from snakemake.utils import validate

    cfg = {"study": "x"}
    validate(cfg, str(REPO / "workflow/schemas/config.schema.yaml"))
    assert cfg["size"] == "tiny" and cfg["seeds"] == [0]


def test_every_key_documented_with_default():
    def walk(node, path):
        if not isinstance(node, dict):
            return
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}".lstrip(".")
            assert "description" in sub, f"{where} has no description"
            # required keys have no default; resources and tracking neither: absent, they stay out of the study's
            # hash (the Snakefile fills its keys' defaults and removes it, see common.smk); a run's own keys
            # (absent: the study's) and the opt-in sweep neither, so no existing study's hash changed
            optional = path.startswith("runs[]") or where == "sweep" or where.startswith("sweep.")
            if key not in ("name", "method", "layout", "dataset", "paths", "source", "resources", "tracking") \
                    and not optional:
                assert "default" in sub, f"{where} has no default"
            if sub.get("type") == "object" and "properties" in sub:
                closed = sub.get("additionalProperties") is False or (
                    sub.get("allOf") and all(b["then"].get("additionalProperties") is False for b in sub["allOf"])
                )  # data.corpus: closed per corpus name
                assert closed, f"{where} accepts unknown keys"
            walk(sub, where)
        for branch in node.get("allOf", []):
            walk(branch.get("then", {}), path)
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")

    assert schema()["additionalProperties"] is False
    walk(schema(), "")


def test_every_typed_settings_class_is_its_schema_section():
    """harness.core.settings: the fields and defaults of each class are its schema section's (the
    one test that keeps the two in step), and a validated config reads back into it unchanged."""
    from dataclasses import fields

    from harness.core.config import section_defaults
    from harness.core.settings import SECTIONS, EvaluateSettings, TrainSettings

    cfg = load_config(REPO / "config/shakespeare-long.yaml")
    for path, cls in SECTIONS.items():
        node = schema()
        for key in path:
            node = node["properties"][key]
        names = [f.name for f in fields(cls)]
        if cls is TrainSettings:   # a run's settings: the plan's step_multiplier is not one; `extra` is no key
            assert names[-1] == "extra" and set(node["properties"]) - set(names) == {"step_multiplier"}
            names = names[:-1]
            got = {k: list(v) if isinstance(v, tuple) else v for k, v in cls().as_dict().items() if k != "extra"}
            assert got == {k: v for k, v in section_defaults(*path).items() if k in names}, path
        else:
            assert names == list(node["properties"]), path                       # the same keys, in order
            assert cls().as_dict() == section_defaults(*path), path               # the same defaults
            section = cfg
            for key in path:
                section = section.get(key, {})
            if section:
                assert cls.of(cfg).as_dict() == section, path                     # a config reads back whole
    assert [f.name for f in fields(EvaluateSettings)] == list(schema()["properties"]["evaluate"]["properties"])
    assert EvaluateSettings.of(load_config({})) == EvaluateSettings()
    # the data stage's own fallbacks (for a data section read without the schema, e.g. a manifest's)
    from harness.data.settings import DATA_DEFAULTS
    from harness.data.storage import SHARD_DEFAULTS

    data = section_defaults("data")
    assert list(DATA_DEFAULTS) == list(data)
    assert {k: v for k, v in DATA_DEFAULTS.items() if k != "corpus"} == {k: v for k, v in data.items() if k != "corpus"}
    assert DATA_DEFAULTS["corpus"] == {"name": data["corpus"]["name"]}   # its options: the corpus reader's defaults
    shards = schema()["properties"]["data"]["properties"]["storage"]["anyOf"][1]["properties"]
    assert SHARD_DEFAULTS == {k: v["default"] for k, v in shards.items() if k != "kind"}


def test_schema_method_layouts_match_the_registry():
    from harness.core import methods

    # the shipped methods (tests may register test doubles such as "toy-test" in the same session)
    names = [n for n in methods.available() if methods.get(n).__module__.split(".")[0] in ("did", "baselines")]
    run_schema = schema()["properties"]["runs"]["items"]
    # the schema describes the core methods; a plugin-path method (flexmdm) is checked by its class
    assert set(run_schema["properties"]["method"]["enum"]) == set(names) - {"flexmdm"}
    for name in names:
        for layout in ("fixed", "varlen"):
            ok = layout in methods.get(name).layouts
            try:
                load_config({"runs": [{"method": name, "layout": layout}]})
                accepted = True
            except UserError:
                accepted = False
            assert accepted == ok, (name, layout)


def test_study_configs_are_valid():
    for path in sorted({*STUDIES, *(f"config/{p.name}" for p in (REPO / "config").glob("*.yaml"))}):
        cfg = load_config(REPO / path)
        assert cfg["study"] == Path(path).stem or path == "config/default.yaml"


# --- the workflow -----------------------------------------------------------------------------
def test_lint_is_clean(tmp_path):
    result = snakemake("--lint", "--cores", "1", "--directory", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("configfile", list(STUDIES))
def test_dry_run(configfile, tmp_path):
    args = ["-n", "-p", "--cores", "2", "--directory", str(tmp_path)]
    if configfile != "config/default.yaml":
        args += ["--configfile", configfile]  # must come last: it takes several values
    result = snakemake(*args, DIDBENCH_EVALUATORS=str(tmp_path / "evaluators"))  # not cached yet
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    counts = job_counts(out)
    cfg = load_config(REPO / configfile)
    n_runs = len(study_runs(cfg))
    n_varlen = sum(r["layout"] == "varlen" for r in study_runs(cfg))
    assert counts["train"] == STUDIES[configfile] == n_runs
    assert counts["prepare_data"] == 1 and counts["report"] == 1 and counts["mlflow_log"] == 1
    for rule in ("eval_ppl", "eval_samples", "eval_genppl", "eval_mauve", "eval_diversity"):
        assert counts[rule] == n_runs, rule
    layouts = {r["layout"] for r in cfg["runs"]}
    with_cost = "cost" in cfg["evaluate"]["metrics"]     # the study-level cost job, per layout
    assert counts.get("cost", 0) == (len(layouts) if with_cost else 0) and "eval_speed" not in counts
    assert counts.get("eval_lengths", 0) == n_varlen
    assert counts["evaluator_cache"] == 1
    # the resolved config is written under the study, named by its hash
    resolved = tmp_path / "results" / cfg["study"] / "config" / f"{config_hash(cfg)}.yaml"
    assert yaml.safe_load(resolved.read_text()) == cfg
    # every job is a `python -m harness` command; the report's (`harness report`) checks every result
    # file, then runs `python -m analysis` in its own process (the harness never imports analysis)
    commands = re.findall(r"^(?:exec )?(\S+(?: \S+)*?) -m harness (\w+)", out, flags=re.M)
    assert {c[1] for c in commands} == {"prepare", "train", "evaluate", "report", "log"} | ({"cost"} if with_cost else set())
    assert len(re.findall(r"python -m harness report --config \S+ --study-dir ", out)) == 1


def test_synthetic_study_plans_exact_metrics_not_the_evaluator(tmp_path):
    """config/synthetic.yaml (run by hand, committed): only planned here."""
    result = snakemake("-n", "--cores", "2", "--directory", str(tmp_path), "--configfile", "config/synthetic.yaml",
                       DIDBENCH_EVALUATORS=str(tmp_path / "evaluators"))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout + result.stderr)
    cfg = load_config(REPO / "config/synthetic.yaml")
    runs = study_runs(cfg)
    n_runs = len(runs)
    trained = [r for r in runs if r["steps"] != 0]
    assert len(cfg["seeds"]) >= 3 and counts["train"] == n_runs
    assert {r["label"] for r in trained} == {"did", "did-F", "mdlm", "ilm", "ar", "flexmdm"}          # DID-S and DID-F
    assert all(sum(r["label"] == lab for r in trained) >= 3 for lab in ("did", "did-F", "mdlm", "ilm", "ar", "flexmdm"))
    assert counts["eval_exact"] == n_runs and counts["eval_ppl"] == n_runs
    assert counts["cost"] == len({r["layout"] for r in runs})
    for rule in ("eval_genppl", "eval_mauve", "evaluator_cache"):
        assert rule not in counts, rule


def test_bad_config_stops_snakemake_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: bad\nruns: [{method: did, layout: fixed}]\n")
    result = snakemake("-n", "--cores", "1", "--directory", str(tmp_path), "--configfile", str(bad))
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == ["error: bad.yaml: runs[0].layout: 'fixed' is not allowed here "
                     "(did and ilm model variable-length data only)"], lines


# --- the SLURM profiles -----------------------------------------------------------------------
def test_slurm_profiles():
    cfg = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    assert cfg["executor"] == "slurm" and cfg["jobs"] >= 1
    # the plugin picks sacct where accounting runs; squeue only in the loopback cluster's overlay
    assert "slurm-status-command" not in cfg
    local = yaml.safe_load((REPO / "scripts" / "local-slurm" / "profile" / "config.yaml").read_text())
    assert local["slurm-status-command"] == "squeue"  # no slurmdbd on the test cluster (sacct would hang)
    assert not set(local) & {"set-resources", "default-resources", "config"}  # the user's resources stay
    assert set(cfg["set-resources"]) <= rule_names(), "set-resources names a rule that does not exist"
    assert "--signal=TERM@" in cfg["set-resources"]["train"]["slurm_extra"]
    assert "--exclusive" in cfg["set-resources"]["cost"]["slurm_extra"]   # the cost job times alone
    # GPUs and partitions come from the config and the environment (rule resources), so changing
    # them never replaces the profile's per-rule blocks
    for res in [cfg["default-resources"], *cfg["set-resources"].values()]:
        assert not set(res) & {"gpu", "gres", "slurm_partition"}, res
    # the CPU-only overlay only turns the GPUs off
    cpu = yaml.safe_load((REPO / "slurm-cpu" / "config.yaml").read_text())
    assert set(cpu) == {"config"}


def _resources(output: str) -> dict[str, str]:
    """rule -> the `resources:` line of its (last) job in a dry run."""
    return dict(re.findall(r"rule (\w+):.*?resources: ([^\n]*)", output, flags=re.S))


def _dry_run_resources(tmp_path, *args, **env):
    result = snakemake("-n", "-p", "--cores", "8", "--profile", "slurm", *args, "--directory", str(tmp_path),
                       "--configfile", "tests/configs/micro.yaml", **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return _resources(result.stdout), result.stdout


def test_slurm_profile_dry_run(tmp_path):
    """The profile parses: resources, partitions from the environment, GPUs only where set."""
    resources, _ = _dry_run_resources(tmp_path, DIDBENCH_SLURM_PARTITION="all")
    assert "gpu=1" in resources["train"] and "runtime=2880" in resources["train"]
    assert "gpu=" not in resources["prepare_data"] and "gpu=" not in resources["eval_mauve"]
    assert "slurm_partition=all" in resources["eval_mauve"] and "slurm_partition=all" in resources["train"]
    # separate partitions: jobs with GPUs get the GPU one, the others the CPU one
    resources, _ = _dry_run_resources(tmp_path / "w2", DIDBENCH_SLURM_PARTITION="all",
                                      DIDBENCH_SLURM_GPU_PARTITION="gpuq", DIDBENCH_SLURM_CPU_PARTITION="cpuq")
    for rule in ("train", "eval_ppl", "eval_samples", "eval_genppl", "cost"):
        assert "slurm_partition=gpuq" in resources[rule], rule
    for rule in ("eval_mauve", "eval_diversity", "eval_lengths"):
        assert "slurm_partition=cpuq" in resources[rule], rule
    # none set: the cluster's default partition (test_cpu_overlay_keeps_every_other_resource)


TRAIN_BLOCK = ("runtime=2880", "mem_mb=64000", "cpus_per_gpu=8", "slurm_extra=--signal=TERM@120")


@pytest.mark.parametrize("config", ["resources={gpus_per_train: '8'}"])  # a number: tests/test_slurm.py
def test_more_gpus_keep_the_train_block(tmp_path, config):
    """resources.gpus_per_train changes the GPUs and nothing else of the profile's train block."""
    resources, out = _dry_run_resources(tmp_path, "--config", config)
    assert "gpu=8" in resources["train"], resources["train"]
    assert all(opt in resources["train"] for opt in TRAIN_BLOCK), resources["train"]
    assert "gpu=1" in resources["eval_ppl"] and "mem_mb=32000" in resources["eval_ppl"]
    assert out.count("exec torchrun --standalone --nproc_per_node 8 -m harness train") == 3


def test_several_nodes_train_with_one_torchrun_per_node(tmp_path):
    """resources.nodes_per_train: SLURM --nodes, srun one task per node, torchrun joined by c10d."""
    resources, out = _dry_run_resources(tmp_path, "--config", "resources={gpus_per_train: '4', nodes_per_train: '2'}")
    assert "gpu=4" in resources["train"] and "nodes=2" in resources["train"], resources["train"]
    assert all(opt in resources["train"] for opt in TRAIN_BLOCK), resources["train"]
    assert "nodes=" not in resources["eval_ppl"]
    assert out.count("exec srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 torchrun --nnodes 2"
                     " --nproc_per_node 4 --rdzv_backend c10d --rdzv_id \"$SLURM_JOB_ID\" --rdzv_endpoint"
                     ' "$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):29500" -m harness train') == 3


def test_cpu_overlay_keeps_every_other_resource(tmp_path):
    """--profile slurm --profile slurm-cpu: no GPU anywhere, runtime/memory/signals of slurm/ kept."""
    resources, out = _dry_run_resources(tmp_path, "--profile", "slurm-cpu")
    assert not [rule for rule, res in resources.items() if re.search(r"(^|, )gpu=", res)]
    assert not [rule for rule, res in resources.items() if "slurm_partition" in res]  # no partition variable set
    assert all(opt in resources["train"] for opt in TRAIN_BLOCK), resources["train"]
    assert "mem_mb=32000" in resources["eval_genppl"] and "runtime=720" in resources["eval_ppl"]
    assert "slurm_extra=--exclusive" in resources["cost"]
    assert "exec python -m harness train" in out and "torchrun" not in out


def test_bad_resources_give_one_line(tmp_path):
    """Through Snakemake once (the --config string path); the schema's other refusals directly."""
    result = snakemake("-n", "--cores", "1", "--directory", str(tmp_path), "--config", "resources={gpus_per_train: -1}")
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if line.strip() and "is extended by additional config" not in line]  # Snakemake's own note
    assert lines == ["error: config/default.yaml: resources.gpus_per_train: -1 is less than the minimum of 0"], lines


@pytest.mark.parametrize("resources, message", [
    ({"gpus_per_eval": 2}, "resources.gpus_per_eval: 2 is greater than the maximum of 1"),
    ({"gpus": 8}, "resources.gpus: unknown key (known: gpus_per_train, nodes_per_train, gpus_per_eval)"),
    ({"gpus_per_train": "many"}, "resources.gpus_per_train: 'many' is not of type 'integer'"),
])
def test_bad_resources_are_refused_by_the_schema(resources, message):
    from harness.core.config import load_config
    from harness.core.errors import UserError

    with pytest.raises(UserError) as err:
        load_config({"resources": resources}, source="config/default.yaml")
    assert str(err.value) == f"config/default.yaml: {message}"


def test_resources_stay_out_of_the_study_hash(tmp_path):
    """Changing the GPUs re-runs nothing: the resolved config (and its hash) is the study's without them."""
    result = snakemake("-n", "--cores", "1", "--directory", str(tmp_path), "--config", "resources={gpus_per_train: 4}")
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "results" / "default" / "config").iterdir())
    assert names == [f"{config_hash(load_config({}))}.yaml"]


@pytest.mark.slow  # runs prepare_data for real (~50 s); the SLURM CI test checks the same on a real cluster
def test_downloading_rules_are_local_under_the_slurm_profile(tmp_path):
    """prepare_data and evaluator_cache need the network: localrules, so on a cluster they run on
    the submitting node. A dry run never says `localrule`, so prepare_data runs for real here,
    with the SLURM executor and no cluster (a submitted job would fail without one)."""
    result = snakemake("results/micro/data/manifest.json", "--cores", "1", "--profile", "slurm",
                       "--directory", str(tmp_path), "--configfile", "tests/configs/micro.yaml", timeout=300,
                       SLURM_CONF=str(tmp_path / "no-such-slurm.conf"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "localrule prepare_data:" in out and "submitted with SLURM jobid" not in out
    assert (tmp_path / "results" / "micro" / "data" / "manifest.json").is_file()
    text = (REPO / "workflow" / "rules" / "data.smk").read_text()
    localrules = re.search(r"^localrules:\n((?:    \w+,\n)+)", text, flags=re.M)
    assert localrules and {"prepare_data", "evaluator_cache"} <= set(re.findall(r"\w+", localrules.group(1)))


def _job_blocks(output: str) -> dict[str, list[dict]]:
    """rule -> [{input, output, threads, shell}] of every job block of a `snakemake -n -p` output."""
    blocks: dict[str, list[dict]] = {}
    for chunk in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        m = re.search(r"^(?:local)?rule (\w+):", chunk, flags=re.M)
        if not m:
            continue
        get = lambda key: (re.search(rf"^\s+{key}: (.*)$", chunk, flags=re.M) or [None, ""])[1]  # noqa: E731
        blocks.setdefault(m.group(1), []).append({
            "input": [x.strip() for x in get("input").split(",") if x.strip()],
            "output": [x.strip() for x in get("output").split(",") if x.strip()],
            "threads": get("threads"), "shell": (re.search(r"^Shell command: (.*)$", chunk, flags=re.M) or [None, ""])[1]})
    return blocks


def test_cost_jobs_gate_the_report(tmp_path):
    """One exclusive cost job per layout, after every checkpoint of its layout; report and MLflow
    read its file; `speed` stays available as an opt-in per-run metric."""
    result = snakemake("-n", "-p", "--cores", "3", "--directory", str(tmp_path), "--configfile", "tests/configs/micro.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = _job_blocks(result.stdout)
    cfg = load_config(REPO / "tests/configs/micro.yaml")
    results = f"results/{cfg['study']}"
    cost = {b["output"][0]: b for b in blocks["cost"]}
    assert set(cost) == {f"{results}/cost/fixed.json", f"{results}/cost/varlen.json"}
    for layout in ("fixed", "varlen"):
        job = cost[f"{results}/cost/{layout}.json"]
        ckpts = {f"{results}/runs/{r['name']}/checkpoint.pt" for r in study_runs(cfg) if r["layout"] == layout}
        assert ckpts <= set(job["input"]) and f"{results}/data/manifest.json" in job["input"]
        assert not any(r["layout"] != layout and r["name"] in " ".join(job["input"]) for r in study_runs(cfg))
        assert job["threads"] == "3"                                  # every core: nothing runs beside it
        assert f"-m harness cost --config {results}/config/" in job["shell"]
        assert f"--study-dir {results} --layout {layout} --threads 3 --out {results}/cost/{layout}.json" in job["shell"]
    for rule in ("report", "mlflow_log"):
        assert set(cost) <= set(blocks[rule][0]["input"]), rule
    # opt in to the per-run speed evaluation and out of the cost job
    opt = yaml.safe_load((REPO / "tests/configs/micro.yaml").read_text())
    opt["evaluate"]["metrics"] = ["ppl", "speed"]
    path = tmp_path / "speed.yaml"
    path.write_text(yaml.safe_dump(opt))
    result = snakemake("-n", "--cores", "2", "--directory", str(tmp_path / "w2"), "--configfile", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout + result.stderr)
    assert counts["eval_speed"] == len(study_runs(cfg)) and "cost" not in counts


def test_cost_settings_in_schema_and_defaults():
    cfg = load_config({})
    assert cfg["evaluate"]["metrics"] == ["ppl", "samples", "genppl", "mauve", "diversity", "lengths", "cost"]
    enum = schema()["properties"]["evaluate"]["properties"]["metrics"]["items"]["enum"]
    assert {"speed", "cost"} <= set(enum)
    assert set(cfg["evaluate"]["cost"]) == {"n", "repeats", "warmup", "train_repeats", "seed"}
    assert cfg["evaluate"]["cost"]["repeats"] >= 3 and cfg["evaluate"]["cost"]["train_repeats"] >= 5
    with pytest.raises(UserError, match="evaluate.cost.repeats"):
        load_config({"evaluate": {"cost": {"repeats": 0}}}, source="c.yaml")
