"""`python -m analysis results/<study> [--config config/<study>.yaml]`: regenerate tables and figures.

`python -m analysis paper results/<study> [--config C] [--out DIR]`: the DID paper's tables and
figure in the paper's layout, next to its published numbers (results/<study>/paper/, see
analysis/paper.py).

Without --config the study config is results/<study>/config.yaml (the resolved config the
Snakefile writes), else the first run's config.yaml. It is only used for the study name, the
row order, the corpus name and the DID reference per layout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from harness.core.errors import UserError
from analysis import main
from analysis.paper import main as paper_main

COMMANDS = ("paper",)
EPILOG = ("subcommand:\n  paper STUDY_DIR   the paper's Table 1, gen PPL vs steps, length CDF and speed tables "
          "in the paper's\n                    layout, next to the published numbers (STUDY_DIR/paper/); "
          "`python -m analysis paper --help`")


def _config(study_dir: Path, path: str | None) -> dict | None:
    runs = sorted((study_dir / "runs").glob("*/config.yaml"))
    candidates = [Path(path)] if path else [study_dir / "config.yaml", *runs]
    for p in (c for c in candidates if c.is_file()):
        cfg = yaml.safe_load(p.read_text())
        return cfg if isinstance(cfg, dict) else None
    return None


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _check(study_dir: Path, config: str | None) -> str | None:
    """The one-line problem with the arguments, or None."""
    if not study_dir.is_dir():
        return f"study directory {study_dir} does not exist"
    if config and not Path(config).is_file():
        return f"config file {config} does not exist"
    return None


def paper_cli(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m analysis paper",
        description="Write the DID paper's tables and figure in the paper's layout for one study: "
                    "table1.md (perplexity bounds, methods x datasets: zero-shot sets from eval/zeroshot.json, else "
                    "the study's own test split, labelled in-domain), genppl_steps.md (variable-length gen PPL vs "
                    "steps), length_cdf.png (generated-length CDF vs the data, the paper's Figure 2) and speed.md "
                    "(DID's training/inference speedups from cost/<layout>.json), each with a CSV, the paper's "
                    "published numbers as labelled reference rows and notes on every convention that differs; "
                    "README.md links them.")
    ap.add_argument("study_dir", help="results/<study>")
    ap.add_argument("--config", help="the study config (default: <study_dir>/config.yaml, else a run's config.yaml)")
    ap.add_argument("--out", help="output folder (default: <study_dir>/paper)")
    args = ap.parse_args(argv)
    study_dir = Path(args.study_dir)
    problem = _check(study_dir, args.config)
    if problem:
        return _fail(problem)

    try:
        files = paper_main(study_dir, _config(study_dir, args.config), args.out)
    except UserError as exc:
        return _fail(str(exc))
    for f in files:
        print(f)
    return 0


def cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `paper` is a subcommand unless it is the only argument and names an existing study directory
    if argv and argv[0] in COMMANDS and not (len(argv) == 1 and Path(argv[0]).is_dir()):
        return paper_cli(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0], epilog=EPILOG,
                                 usage="%(prog)s [-h] [--config CONFIG] study_dir\n"
                                       "       %(prog)s paper [-h] [--config CONFIG] [--out OUT] study_dir",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", help="results/<study>")
    ap.add_argument("--config", help="the study config (default: <study_dir>/config.yaml, else a run's config.yaml)")
    args = ap.parse_args(argv)
    study_dir = Path(args.study_dir)
    problem = _check(study_dir, args.config)
    if problem:
        return _fail(problem)

    for f in main(study_dir, _config(study_dir, args.config)):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
