"""Compare every result file of two runs of the same study: a refactor must not change a number.

    python scripts/compare_results.py OLD/results/micro NEW/results/micro

Run a study before and after a change (e.g. `snakemake --cores 2 --directory /tmp/before
--configfile tests/configs/micro.yaml` from each checkout) and compare the two result folders.
Every JSON, JSONL and CSV file must agree exactly, except what legitimately differs between two
runs: provenance (git commit, creation time) and wall-clock measurements (any key or column that
is a time, a rate, a time ratio or a memory peak). Markdown/LaTeX renderings of a CSV table,
images, logs, Snakemake benchmark files and MLflow stores are skipped (the CSV beside them is
compared). Exit status 1 when anything differs or is missing.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

#: keys that are provenance or measurements of the machine, not results
VOLATILE = {"git_commit", "created", "times", "dp_fraction", "s", "hostname", "pid", "device", "threads"}
#: words (between underscores) that make a key a time, a rate, a time ratio or a memory peak
VOLATILE_WORDS = {"seconds", "time", "wall", "elapsed", "duration", "rss", "cpu", "timing", "throughput", "speed",
                  "times", "ratio", "speedup", "mem", "mb"}
SKIPPED_SUFFIXES = {".png", ".html", ".log", ".db", ".pt", ".npz", ".tsv"}


def volatile(key: str) -> bool:
    """A provenance key, or a measurement: s_per_<x>, <x>_per_s(_min), or a key with a time word."""
    words = key.lower().split("_")
    return (key.lower() in VOLATILE or bool(VOLATILE_WORDS & set(words))
            or ("per" in words and "s" in words))


def stable(obj):
    """`obj` without its volatile keys, at every depth."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if not volatile(k)}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def skipped(rel: Path, root: Path) -> bool:
    if {"logs", "benchmarks", "mlartifacts", ".snakemake"} & set(rel.parts) or rel.suffix in SKIPPED_SUFFIXES:
        return True
    if rel.name in ("summary.md", "mlflow.done") or rel.name.startswith("."):   # mlflow.done: the store's path
        return True
    return rel.suffix in (".md", ".tex") and (root / rel.with_suffix(".csv")).exists()


def same(a: Path, b: Path) -> bool:
    if a.suffix == ".json":
        return stable(json.loads(a.read_text())) == stable(json.loads(b.read_text()))
    if a.suffix == ".jsonl":
        rows = [[stable(json.loads(line)) for line in p.read_text().splitlines() if line.strip()] for p in (a, b)]
        return rows[0] == rows[1]
    if a.suffix == ".csv":
        rows = [[{k: v for k, v in r.items() if not volatile(k)} for r in csv.DictReader(io.StringIO(p.read_text()))]
                for p in (a, b)]
        return rows[0] == rows[1]
    return a.read_bytes() == b.read_bytes()


def compare(old: Path, new: Path) -> list[str]:
    problems, counts = [], {"identical": 0, "skipped": 0}
    for path in sorted(p for p in old.rglob("*") if p.is_file()):
        rel = path.relative_to(old)
        if skipped(rel, old):
            counts["skipped"] += 1
        elif not (new / rel).is_file():
            problems.append(f"missing in {new}: {rel}")
        elif not same(path, new / rel):
            problems.append(f"differs: {rel}")
        else:
            counts["identical"] += 1
    extra = [p.relative_to(new) for p in new.rglob("*") if p.is_file() and not (old / p.relative_to(new)).exists()]
    problems += [f"only in {new}: {rel}" for rel in sorted(extra) if not skipped(rel, new)]
    print(f"{counts['identical']} result files identical, {len(problems)} problems, {counts['skipped']} skipped "
          "(logs, benchmarks, images, stores, renderings of a compared CSV)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    for d in (args.old, args.new):
        if not d.is_dir():
            print(f"error: {d} is not a directory", file=sys.stderr)
            return 2
    problems = compare(args.old, args.new)
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
