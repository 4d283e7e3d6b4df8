"""Build a FAKE study directory for the analysis and tracking tests.

Every number here is made up from a simple formula of the run's index, so the tests can
recompute what the tables must show. Nothing here is a real measurement and nothing outside
the tests may use it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

RUNS = [
    ("did", "varlen", 0), ("did", "varlen", 1), ("did-fixed", "fixed", 0), ("mdlm", "fixed", 0),
    ("mdlm", "varlen", 0), ("ilm", "varlen", 0), ("ar", "fixed", 0), ("ar", "varlen", 0),
]
STEPS = (16, 64)
#: evaluations each run skips by default (exercises "missing files are tolerated")
MISSING = {"ar-fixed-tiny-s0": {"mauve"}, "ilm-varlen-tiny-s0": {"speed"}}
BINS = list(range(0, 140, 10))


#: runs whose history.csv has no validation columns (written before train.valid_every existed)
NO_VALIDATION = {"ilm-varlen-tiny-s0"}


def fake_valid(i: int, step: int) -> float:
    """The (fake) validation bound of run i at a step of its history."""
    return 4.0 + 0.25 * i + 10.0 / step


def run_name(method, layout, seed, size="tiny"):
    return f"{method}-{layout}-{size}-s{seed}"


def fake_values(i: int, layout: str) -> dict:
    """The (fake) values written for the run with index i."""
    nats = 3.125 + 0.25 * i
    gen = {s: 100.0 + 10 * i - s / 8 for s in STEPS}
    v = {
        "ppl": {"nats_per_token": nats, "ppl": math.exp(nats), "stderr": 0.011 + 0.001 * i,
                "per_sequence_mean": nats + 0.5, "n_sequences": 64, "n_tokens": 4096,
                "paper_convention": {"nats_per_token": nats - 0.125, "ppl": math.exp(nats - 0.125),
                                     "stderr": 0.01, "per_sequence_mean": nats + 0.375, "omits": "fake"},
                # the same 64 test sequences of 64 tokens for every run: bound = 64 nats/token + a
                # per-sequence difficulty shared by all runs (+ a small run-specific wobble)
                "per_sequence": {"index": list(range(64)), "n_tokens": [64] * 64,
                                 "strict": [64 * nats + (j % 8 - 3.5) + 0.01 * i * (j % 3 - 1) for j in range(64)],
                                 "paper": [64 * (nats - 0.125) + (j % 8 - 3.5) for j in range(64)]}},
        "genppl": {"by_steps": [{"steps": s, "gen_ppl": gen[s], "gen_ppl_mean_per_sample": gen[s] + 7,
                                 "ci95": [gen[s] - 5, gen[s] + 5] if i % 2 == 0 else 5.0,
                                 "entropy_nats": 4.0 + 0.01 * i + s / 1000,
                                 "entropy_bits": (4.0 + 0.01 * i + s / 1000) / math.log(2), "n": 32,
                                 # 32 samples of 10 targets: gen PPL within 5% per sample, entropy within
                                 # +-0.5 nats (a 0.01 i difference is noise, a 10 i PPL difference is not)
                                 "per_sample": {"n_targets": [10] * 32,
                                                "nll": [10 * math.log(gen[s]) * (1 + 0.05 * ((k % 5) - 2) / 2)
                                                        for k in range(32)],
                                                "entropy_nats": [4.0 + 0.01 * i + s / 1000 + 0.5 * ((k % 3) - 1)
                                                                 for k in range(32)]}}
                                for s in STEPS],
                   "data": {"gen_ppl": 42.0, "gen_ppl_mean_per_sample": 45.0, "ci95": [40.0, 44.0],
                            "entropy_nats": 4.5, "entropy_bits": 4.5 / math.log(2), "n": 32}},
        "mauve": {"by_steps": [{"steps": s, "mauve": 0.5 + 0.01 * i + s / 1000} for s in STEPS]},
        "diversity": {"by_steps": [{"steps": s, "entropy_nats": 5.0 + 0.01 * i, "entropy_bits": 7.0 + 0.01 * i,
                                    "distinct_1": 0.3 + 0.01 * i, "distinct_2": 0.6, "distinct_3": 0.8,
                                    "self_bleu": 0.25} for s in STEPS],
                      "data": {"entropy_nats": 5.5, "entropy_bits": 7.5, "distinct_1": 0.35, "distinct_2": 0.65,
                               "distinct_3": 0.85, "self_bleu": 0.2}},
        "speed": {"train": {"tokens_per_s": 1000.0 * (i + 1), "s_per_step": 0.125 * (i + 1)},
                  "sample": [{"steps": s, "s_per_sample": 0.001 * s * (i + 1), "nfe": s, "peak_mem_mb": 100.0 + i}
                             for s in STEPS],
                  "flops_per_token": 1.0e6 * (i + 1)},
        "samples": {"by_steps": [{"steps": s, "n": 32, "mean_length": 30.0 + i, "nfe": s,
                                  "seconds_per_sample": 0.002 * s} for s in STEPS]},
    }
    if layout == "varlen":
        counts = {s: [(k + i + s) % 7 for k in range(len(BINS) - 1)] for s in STEPS}
        v["lengths"] = {
            "by_steps": [{"steps": s, "mean": 30.0 + i, "sd": 9.0, "q10": 12.0, "q50": 29.0, "q90": 51.0,
                          "w1": 1.5 + 0.125 * i, "ks": 0.125 + 0.01 * i, "empty_rate": 0.0, "max_rate": 0.03}
                         for s in STEPS],
            "data": {"mean": 31.0, "sd": 10.0, "q10": 11.0, "q50": 30.0, "q90": 52.0},
            "histogram": {"bins": BINS, "samples": {str(s): counts[s] for s in STEPS},
                          "data": [(k * 3) % 8 + 1 for k in range(len(BINS) - 1)]},
        }
    return v


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def make_fake_study(root, study="fake", runs=RUNS, missing=MISSING) -> tuple[Path, dict, dict]:
    """Write a fake results/<study>/ under `root`. Returns (study_dir, config, {run: values})."""
    study_dir = Path(root) / study
    config = {"study": study, "seeds": [0, 1], "size": "tiny",
              "data": {"corpus": {"name": "fakecorpus"}, "seq_len": 128},
              "runs": [{"method": m, "layout": l} for m, l, _ in runs],
              "train": {"steps": 10, "batch_size": 4, "lr": 1e-3}}
    _write_json(study_dir / "data" / "manifest.json", {"corpus": "fakecorpus", "note": "FAKE"})
    written = {}
    for i, (method, layout, seed) in enumerate(runs):
        name = run_name(method, layout, seed)
        rd = study_dir / "runs" / name
        ident = {"run": name, "method": method, "layout": layout, "size": "tiny", "seed": seed}
        _write_json(rd / "train.json", {**ident, "steps": 10, "batch_size": 4, "params": 12345 + i,
                                        "config_hash": "fakehash", "git_commit": "0" * 40, "device": "cpu",
                                        "final_loss": 2.5 - 0.1 * i, "wall_seconds": 10.0 + i,
                                        "created": f"2000-01-01T00:0{i}:00+00:00",
                                        "tokens_per_s": 900.0 * (i + 1), "versions": {"torch": "0.0-fake"}})
        (rd / "config.yaml").write_text(yaml.safe_dump({**config, "method": method, "layout": layout, "seed": seed}))
        lines = ["step,loss,lr,tokens_per_s,wall_time,grad_norm"]
        lines += [f"{s},{3.0 - 0.1 * s + 0.01 * i},0.001,{900.0 * (i + 1)},{0.5 * s + 0.1 * i},1.0"
                  for s in range(1, 11)]
        if name not in NO_VALIDATION:   # the validation curve (train.valid_every = 5): cells only at steps 5, 10
            lines[0] += ",train_flops,valid_nats_per_token,valid_stderr,valid_seconds"
            for s in range(1, 11):
                lines[s] += f",{1.0e9 * (i + 1) * s}" + (f",{fake_valid(i, s)},0.05,0.25" if s % 5 == 0 else ",,,")
        (rd / "history.csv").write_text("\n".join(lines) + "\n")
        values = fake_values(i, layout)
        for kind, vals in values.items():
            if kind in missing.get(name, ()):
                continue
            _write_json(rd / "eval" / f"{kind}.json", {
                "schema": "didbench.result/1", "kind": kind, "study": study, **ident, "config_hash": "fakehash",
                "git_commit": "0" * 40, "device": "cpu", "versions": {}, "created": "2000-01-01T00:00:00",
                "settings": {"fake": True}, "values": vals})
        if "samples" not in missing.get(name, ()):
            (rd / "eval" / "samples.jsonl").write_text("".join(
                json.dumps({"steps": s, "text": f"fake sample {k}"}) + "\n" for s in STEPS for k in range(2)))
        for rule in ("train", "evaluate_ppl"):
            bench = study_dir / "benchmarks" / rule / f"{name}.tsv"
            bench.parent.mkdir(parents=True, exist_ok=True)
            bench.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                             f"{12.5 + i}\t0:00:12\t{500.0 + i}\t900\t400\t450\t0\t1\t50\t10\n")
        written[name] = values
    return study_dir, config, written


# --- the study-level cost files (harness/metrics/cost.py): results/<study>/cost/<layout>.json ----------
COST_REFERENCE = {"varlen": "did", "fixed": "did-fixed"}


def fake_cost_values(layout: str, methods: list[str], repeats: int = 3) -> dict:
    """The (fake) `values` of cost/<layout>.json: method j's step time is (j + 1) x 0.1 s x (1, 1.1,
    1.2, ...) over repeats, the reference's is repeat-for-repeat the same factor times 0.1 s,
    so the ratio of the j-th method (reference first) is exactly j + 1 (the reference's own: 1)."""
    ref = COST_REFERENCE[layout]
    order = [ref] + [m for m in methods if m != ref] if ref in methods else list(methods)
    tokens = 2048 if layout == "fixed" else 500
    noise = [1.0 + 0.1 * r for r in range(repeats)]

    def stat(xs):
        xs = sorted(xs)
        return {"min": xs[0], "median": xs[len(xs) // 2], "max": xs[-1]}

    train_rows, sample_rows = [], []
    for j, m in enumerate(order):
        times = [0.1 * (j + 1) * f for f in noise]
        row = {"method": m, "run": f"{m}-{layout}-tiny-s0", "size": "tiny", "params": 1000 + j,
               "s_per_step": stat(times), "tokens_per_s": stat([tokens / t for t in times]),
               "ratio": {"min": j + 1.0, "median": j + 1.0, "max": j + 1.0} if ref in methods else None,
               "dp_seconds": None, "dp_fraction": None, "flops_per_token": 1.0e6 * (j + 1), "peak_mem_mb": None,
               "times": times}
        if m.startswith("did"):
            row["dp_seconds"] = stat([0.01 * t for t in times])
            row["dp_fraction"] = {"min": 0.01, "median": 0.01, "max": 0.01}
        train_rows.append(row)
        for k in (16, 64):
            calls = [0.004 * k * (j + 1) * f for f in noise]
            sample_rows.append({
                "method": m, "run": f"{m}-{layout}-tiny-s0", "size": "tiny", "steps": k, "n": 4,
                "s_per_sample": stat([c / 4 for c in calls]), "s_per_call": stat(calls),
                "gen_tokens_per_s": stat([4 * (20.0 + j) / c for c in calls]),
                "nfe": {"min": k, "median": k, "max": k}, "mean_length": stat([20.0 + j] * repeats),
                "ratio": {"min": j + 1.0, "median": j + 1.0, "max": j + 1.0} if ref in methods else None,
                "peak_mem_mb": None, "times": calls})
    return {"layout": layout, "size": "tiny", "reference": ref if ref in methods else None, "methods": order,
            "missing": [], "device": "cpu (fake)", "threads": 2, "wall_seconds": 12.5 if layout == "fixed" else 10.0,
            "train": {"batch_size": 4, "accumulate": 1, "clean_tokens": tokens, "max_len": 128,
                      "precision": "float32", "grad_clip": 1.0, "repeats": repeats, "warmup": 1, "rows": train_rows},
            "sample": {"n": 4, "steps": [16, 64], "top_p": 1.0, "repeats": repeats, "warmup": 1,
                       "rows": sample_rows}}


def write_fake_cost(study_dir, runs=RUNS, study="fake") -> dict:
    """Write cost/<layout>.json for every layout of `runs`; returns {layout: values}."""
    written = {}
    for layout in sorted({lay for _, lay, _ in runs}):
        methods = list(dict.fromkeys(m for m, lay, _ in runs if lay == layout))
        values = fake_cost_values(layout, methods)
        _write_json(Path(study_dir) / "cost" / f"{layout}.json", {
            "schema": "didbench.result/1", "kind": "cost", "study": study, "run": None, "method": None,
            "layout": layout, "size": "tiny", "seed": None, "config_hash": "fakehash", "git_commit": "0" * 40,
            "device": "cpu", "versions": {}, "created": "2000-01-01T00:00:00",
            "settings": {"n": 4, "repeats": 3, "warmup": 1, "train_repeats": 3, "seed": 0}, "values": values})
        written[layout] = values
    return written
