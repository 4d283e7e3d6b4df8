"""`python -m harness prepare|train|evaluate|sample|cost|report|log|bench ...`

User mistakes (harness.core.methods.UserError) print one line `error: ...` and exit with status 2;
a preempted training job exits with harness.run.loop.EXIT_PREEMPTED so the workflow retries it.
"""
from __future__ import annotations

import argparse
import json
import sys

from harness.core.methods import UserError


def _cmd_prepare(args) -> int:
    from harness.core.config import load_config
    from harness.data.prepare import prepare

    cfg = load_config(args.config)
    manifest = prepare(cfg["data"], args.out, workers=args.workers, progress=not args.quiet)
    splits = manifest.get("splits", {})
    shards = f" in {manifest['shards']['count']} shard(s)" if manifest.get("storage") == "shards" else ""
    print(f"prepared {cfg['data']['corpus']['name']} -> {args.out}{shards}: "
          + ", ".join(f"{k}={v}" for k, v in _split_summary(splits).items()))
    return 0


def _split_summary(splits: dict) -> dict:
    out = {}
    for name, s in splits.items():
        if isinstance(s, dict):
            out[name] = s.get("documents", s.get("tokens", "?"))
    return out


def _cmd_train(args) -> int:
    from harness.core.config import load_config
    from harness.results.live import LiveRun
    from harness.run.loop import train

    cfg = load_config(args.config)
    summary = train(cfg, args.method, args.layout, args.seed, args.data, args.out, steps=args.steps, progress=not args.quiet,
                    reporter=LiveRun.start)
    msg = f"trained {summary['run']}: final loss {summary['final_loss']}, {summary['tokens_per_s']} tokens/s"
    if "valid_nats_per_token" in summary:
        msg += f", valid bound {summary['valid_nats_per_token']:.4f} nats/token (ppl {summary['valid_ppl']:.2f})"
    print(msg)
    return 0


def _cmd_evaluate(args, rest) -> int:
    from harness import metrics as evaluate

    return evaluate.main(rest) or 0


def _cmd_cost(args) -> int:
    from harness.metrics import cost

    cost.run(args)
    return 0


def _cmd_report(args) -> int:
    """`python -m analysis STUDY_DIR --config C` as its own process: the harness never imports the
    analysis package (tables and figures depend on the harness, not the other way round)."""
    import subprocess

    from harness.core.config import load_config
    from harness.results.study import check_results, run_dirs

    load_config(args.config)   # a bad config is one line here, as for every other command
    check_results(args.study_dir)   # a truncated or schema-less result file: one line naming it, no report
    written = 0
    layouts = [[], ["paper"]] if run_dirs(args.study_dir) else [[]]   # paper/: the DID paper's own layout
    for layout in layouts:   # tables/ + figures/, then paper/ (nothing to lay out without a run)
        cmd = [sys.executable, "-m", "analysis", *layout, str(args.study_dir), "--config", str(args.config)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            return done.returncode
        written += len(done.stdout.splitlines())
    print(f"report: wrote {written} files under {args.study_dir}")
    return 0


def _cmd_log(args) -> int:
    from harness.core.config import load_config
    from harness.results.tracking import log_study

    summary = log_study(args.study_dir, load_config(args.config), checkpoints=args.checkpoints == "yes")
    print("mlflow: " + json.dumps(summary, default=str))
    print(f"mlflow: the key metrics: `mlflow ui --backend-store-uri {summary['tracking_uri']}`, then {summary['view']}")
    if args.marker:
        from harness.core.atomic import atomic_write_text

        atomic_write_text(args.marker, json.dumps(summary, default=str) + "\n")
    return 0


def _cmd_sample(args) -> int:
    from harness.run import generate

    return generate.run(args)


def _cmd_bench(args, rest) -> int:
    from harness.metrics import bench

    return bench.main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description="didbench: DID vs masked-diffusion and insertion LMs")
    sub = p.add_subparsers(dest="command", required=True)

    from harness.core.backbone import SIZES
    from harness.core.methods import declared   # names only: no method (no plugin) is imported to build the help

    config_help = "study config (YAML, validated against workflow/schemas/config.schema.yaml)"
    s = sub.add_parser("prepare", help="corpus -> tokenizer -> fixed/varlen token files + manifest")
    s.add_argument("--config", required=True, help=config_help + "; its `data` section is used")
    s.add_argument("--out", required=True, help="data directory, e.g. results/default/data")
    s.add_argument("--workers", type=int, default=None, help="data.storage shards only: tokenizer processes "
                   "(default: data.storage.workers, 1); the files do not depend on it")
    s.add_argument("--quiet", action="store_true", help="no progress bar (data.storage shards)")

    s = sub.add_parser("train", help="train one (method, layout, seed) run of a study")
    s.add_argument("--config", required=True, help=config_help + f"; its `size` picks the backbone "
                   f"({', '.join(SIZES)})")
    s.add_argument("--method", required=True, help=f"the method to train ({', '.join(declared())}), or the label of "
                   "one of the study's runs (e.g. did-F); a method the config does not list trains with the study's recipe")
    s.add_argument("--layout", required=True, choices=["fixed", "varlen"],
                   help="data layout: fixed (dense chunks) or varlen (one document per sequence); each method "
                   "says which it supports")
    s.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    s.add_argument("--data", required=True, help="prepared data directory (from `prepare`)")
    s.add_argument("--out", required=True, help="run directory: checkpoint.pt, history.csv, train.json; "
                   "re-running resumes from <out>/resume/state.pt")
    s.add_argument("--steps", type=int, default=None, help="override train.steps (x step_multiplier)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("evaluate", help="evaluate a trained run: ppl|samples|genppl|mauve|diversity|lengths|speed|evaluator "
                   "(`evaluate --help` for its options)", add_help=False)

    from harness.run import generate

    s = sub.add_parser("sample", help="print samples of a trained run (any method, either layout)",
                       description=generate.__doc__.split("\n\n")[0])
    generate.add_arguments(s)

    s = sub.add_parser("cost", help="the study's cost job for one layout: training and sampling of every method, "
                       "interleaved in one process")
    from harness.metrics.cost import build_parser as cost_parser

    cost_parser(s)

    s = sub.add_parser("report", help="tables and figures of a study")
    s.add_argument("--config", required=True, help=config_help)
    s.add_argument("--study-dir", required=True, help="results/<study>: its result files are read, tables/ and "
                   "figures/ written")

    s = sub.add_parser("log", help="log a study to MLflow (idempotent)")
    s.add_argument("--config", required=True, help=config_help)
    s.add_argument("--study-dir", required=True, help="results/<study> whose result files and histories are logged")
    s.add_argument("--marker", default=None, help="file written when logging completed")
    s.add_argument("--checkpoints", nargs="?", const="yes", default="no", choices=["yes", "no"],
                   help="also log each run's checkpoint.pt as an artifact (`--checkpoints` alone = yes; the "
                   "workflow passes yes/no from config tracking.log_checkpoints)")

    sub.add_parser("bench", help="cost benchmark: methods interleaved in one process (train|sample|attention; "
                   "`bench train --help`, `bench sample --help`, `bench attention --help` for the options)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in ("evaluate", "bench"):
            args = argparse.Namespace(command=argv[0])
            rest = argv[1:]
            return _cmd_evaluate(args, rest) if argv[0] == "evaluate" else _cmd_bench(args, rest)
        args = parser.parse_args(argv)
        handler = {"prepare": _cmd_prepare, "train": _cmd_train, "sample": _cmd_sample, "cost": _cmd_cost,
                   "report": _cmd_report, "log": _cmd_log}[args.command]
        return handler(args)
    except UserError as err:
        from harness.core.errors import report_error

        report_error(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # preemption is not a failure of the code
        from harness.run.loop import EXIT_PREEMPTED, Preempted

        if isinstance(err, Preempted):
            print(f"preempted: {err}", file=sys.stderr)
            return EXIT_PREEMPTED
        raise
