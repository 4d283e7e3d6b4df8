"""The metric registry: what the workflow, the evaluate CLI and the study loader know of each
evaluation, in one place.

A `Metric` names its implementation (imported on use, so this module stays light: the Snakefile
and the config validator read it without torch), the files it writes under a run's `eval/`, what
it needs (a trained run's checkpoint and data), whether it is one job per run or per layout of
the study, the layouts it applies to, and whether the default `evaluate.metrics` runs it. The
evaluate CLI's commands, the workflow's targets (`workflow/rules/common.smk`), the study loader's
result kinds (`harness.results.study`) and the analysis's expected evaluations are read from here;
each metric's Snakemake rule is in `workflow/rules/evaluate.smk`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str                      #: `evaluate.metrics` entry and `python -m harness evaluate <name>`
    module: str                    #: its implementation; `function(args, config)` writes the result
    help: str                      #: one line for `python -m harness evaluate --help`
    files: tuple[str, ...] = ()    #: the files of one run's job the workflow asks for, under RUN/eval/
                                   #: (the result file first)
    needs_run: bool = False        #: reads a trained run (--run) and the prepared data (--data)
    scope: str = "run"             #: "run": one result per trained run; "study": one per layout (cost)
    layouts: tuple[str, ...] = ("fixed", "varlen")   #: the run layouts it applies to
    default: bool = True           #: in the default `evaluate.metrics` of a real-text study (schema default)
    function: str = "run"

    @property
    def result_file(self) -> str | None:
        return self.files[0] if self.files else None


#: name -> Metric, in the order results are loaded and tabulated
METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if metric.name in METRICS and METRICS[metric.name] != metric:
        raise ValueError(f"metric {metric.name!r} registered twice")
    if metric.scope not in ("run", "study"):
        raise ValueError(f"metric {metric.name!r}: scope must be 'run' or 'study', got {metric.scope!r}")
    METRICS[metric.name] = metric
    return metric


for _m in (
    Metric("ppl", "harness.metrics.ppl", "NLL bound / perplexity on the test split", ("ppl.json",),
           needs_run=True),
    Metric("samples", "harness.metrics.samples", "unconditional samples per steps (+ the reference texts)",
           ("samples.json", "samples.jsonl", "references.jsonl"), needs_run=True),
    Metric("genppl", "harness.metrics.genppl", "generative perplexity + entropy + MAUVE features",
           ("genppl.json",)),
    Metric("mauve", "harness.metrics.mauve", "MAUVE from the genppl features", ("mauve.json",)),
    Metric("diversity", "harness.metrics.diversity", "entropy, distinct-n, self-BLEU", ("diversity.json",),
          ),
    Metric("lengths", "harness.metrics.lengths", "length distribution vs held-out data", ("lengths.json",),
           layouts=("varlen",)),
    Metric("speed", "harness.metrics.speed", "training throughput, sampling time/memory, FLOPs", ("speed.json",),
           needs_run=True, default=False),
    Metric("exact", "harness.metrics.exact", "synthetic corpora: bound gap, exact sample NLL, invalid fraction, "
           "length law", ("exact.json",), default=False),
    Metric("zeroshot", "harness.metrics.zeroshot", "NLL bounds on the zero-shot test sets (Table 1)",
           ("zeroshot.json",), needs_run=True, layouts=("fixed",), default=False),
    Metric("cost", "harness.metrics.cost", "every method of one layout timed interleaved (python -m harness cost)",
           scope="study"),
):
    register_metric(_m)


def run_metrics() -> list[Metric]:
    """The metrics with one result per trained run, in loading order."""
    return [m for m in METRICS.values() if m.scope == "run"]


def result_kinds() -> tuple[str, ...]:
    """The per-run result kinds a study may hold (eval/<kind>.json), in loading order."""
    return tuple(m.name for m in run_metrics())


def default_run_kinds() -> tuple[str, ...]:
    """The per-run result kinds of the default `evaluate.metrics` (the others are opt-in)."""
    return tuple(m.name for m in run_metrics() if m.default)


#: the default `evaluate.metrics` of a study on a synthetic corpus: its exact metrics replace the
#: evaluator-LM ones (no evaluator is needed). Its order is part of the study's config hash.
SYNTHETIC_DEFAULT = ("ppl", "samples", "exact", "diversity", "lengths", "cost")
