"""Metrics: every evaluation of a trained run (one module each), the study-level cost job
(`cost`) and the benchmark (`bench`). May import
harness.core, harness.data and harness.run.

`python -m harness evaluate <what> ...`: the evaluation suite of one trained run.

    ppl        --config C --run RUN --data DATA --out EVAL/ppl.json
    samples    --config C --run RUN --data DATA --out EVAL/samples.json
               [--jsonl EVAL/samples.jsonl] [--references EVAL/references.jsonl]
    references --config C --data DATA --layout fixed|varlen --out FILE.jsonl
    evaluator  --name smollm2 --out DIR                        (offline evaluator cache, built once)
    genppl     --config C --evaluator-dir DIR --out EVAL/genppl.json [--samples EVAL/samples.json]
               [--references EVAL/references.jsonl] [--features EVAL/features.npz]
    mauve      --config C --out EVAL/mauve.json [--samples EVAL/samples.json] [--features EVAL/features.npz]
    diversity  --config C --out EVAL/diversity.json [--samples ...] [--references ...]
    lengths    --config C --out EVAL/lengths.json [--samples ...] [--references ...]
    speed      --config C --run RUN --data DATA --out EVAL/speed.json
    exact      --config C --data DATA --out EVAL/exact.json [--ppl EVAL/ppl.json] [--samples ...]
               [--references ...]                         (synthetic corpora: the source's exact law)
    zeroshot-data --config C --data DATA --out RESULTS/zeroshot/sets.pt
               (the test sets of evaluate.zeroshot.datasets, tokenised and chunked once per study)
    zeroshot   --config C --run RUN --data DATA --out EVAL/zeroshot.json [--sets sets.pt]
               (both bounds on every zero-shot set: the DID paper's Table 1; fixed-length runs)
    <plugin>   --config C --run RUN --data DATA --out EVAL/<plugin>.json
               (a metric of the `didbench.metrics` entry points: harness.core.metric_registry)

Inputs left out default to the files next to --out (EVAL/samples.json, EVAL/references.jsonl,
EVAL/features.npz), which is where `samples` and `genppl` write them; --run and --data are
accepted by every command so one workflow template fits all. Every command writes its result
through harness.core.records.write_result (provenance + settings + values) and prints one line.
Modules are imported on use, so `--help` and light commands do not load torch/transformers.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from harness.core.metric_registry import run_metrics

#: the helper commands beside the metrics
HELPERS = {
    "references": ("harness.metrics.samples", "run_references", "held-out reference texts only"),
    "evaluator": ("harness.metrics.evaluator", "run", "build the offline evaluator LM cache"),
    "zeroshot-data": ("harness.metrics.zeroshot", "run_data", "tokenise and chunk the zero-shot test sets once"),
}


def commands() -> dict[str, tuple[str, str, str]]:
    """`evaluate <what>`: every per-run metric of the registry (the plugin metrics' included),
    then the helper commands: {what: (module, function, help)}."""
    return {**{m.name: (m.module, m.function, m.help) for m in run_metrics()}, **HELPERS}


def needs_run() -> set[str]:
    return {m.name for m in run_metrics() if m.needs_run}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = commands()
    p.add_argument("what", choices=sorted(cmds), help="; ".join(f"{k}: {v[2]}" for k, v in cmds.items()))
    p.add_argument("--config", help="study config (YAML); required except for `evaluator`")
    p.add_argument("--run", help="run directory (checkpoint.pt, history.csv)")
    p.add_argument("--data", help="prepared data directory")
    p.add_argument("--out", required=True, help="result file (a folder for `evaluator`)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--jsonl", help="samples: the samples file (default: --out with suffix .jsonl)")
    p.add_argument("--samples", help="the samples summary samples.json (samples.jsonl is found from it)")
    p.add_argument("--references", help="references.jsonl (written by `samples`, read by genppl/diversity/lengths)")
    p.add_argument("--ppl", help="exact: the ppl.json whose rows get their bound gap (default next to --out)")
    p.add_argument("--features", help="evaluator features npz (written by genppl, read by mauve)")
    p.add_argument("--evaluator-dir", help="evaluator cache folder (default resources/evaluators/<name>)")
    p.add_argument("--layout", choices=["fixed", "varlen"], help="references: data layout")
    p.add_argument("--name", help="evaluator: evaluator name or local model folder")
    p.add_argument("--sets", help="zeroshot: the prepared test sets (written by zeroshot-data; default: "
                   "prepared in this process)")
    return p


def _fill_defaults(args) -> None:
    """Inputs not given default to the files next to --out."""
    here = Path(args.out).parent
    args.samples = args.samples or str(here / "samples.json")
    args.references = args.references or str(here / "references.jsonl")
    args.features = args.features or str(here / "features.npz")
    args.ppl = args.ppl or str(here / "ppl.json")


def main(argv: list[str] | None = None) -> int:
    from harness.core.methods import UserError

    args = build_parser().parse_args(argv)
    config = {}
    if args.config:
        from harness.core.config import load_config

        config = load_config(args.config)
    elif args.what != "evaluator":
        raise UserError(f"evaluate {args.what} needs --config")
    if args.what in needs_run() and not (args.run and args.data):
        raise UserError(f"evaluate {args.what} needs --run RUN_DIR and --data DATA_DIR")
    if args.what in ("references", "exact", "zeroshot-data") and not args.data:
        raise UserError(f"evaluate {args.what} needs --data DATA_DIR")
    _fill_defaults(args)
    module, func, _ = commands()[args.what]
    getattr(importlib.import_module(module), func)(args, config)
    return 0
