"""`python -m analysis results/<study> [--config config/<study>.yaml]`: regenerate tables and figures.

Without --config the study config is results/<study>/config.yaml (the resolved config the
Snakefile writes), else the first run's config.yaml. It is only used for the study name, the
row order, the corpus name and the DID reference per layout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


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


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", help="results/<study>")
    ap.add_argument("--config", help="the study config (default: <study_dir>/config.yaml, else a run's config.yaml)")
    args = ap.parse_args(argv)
    study_dir = Path(args.study_dir)
    if not study_dir.is_dir():
        return _fail(f"study directory {study_dir} does not exist")
    if args.config and not Path(args.config).is_file():
        return _fail(f"config file {args.config} does not exist")
    from analysis import main

    for f in main(study_dir, _config(study_dir, args.config)):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
