"""The metric registry: what the workflow, the evaluate CLI and the study loader know of each
evaluation, in one place.

A `Metric` names its implementation (imported on use, so this module stays light: the Snakefile
and the config validator read it without torch), the files it writes under a run's `eval/`, what
it needs (a trained run's checkpoint and data), whether it is one job per run or per layout of
the study, the layouts it applies to, and whether the default `evaluate.metrics` runs it. The
evaluate CLI's commands, the workflow's targets (`workflow/rules/common.smk`), the study loader's
result kinds (`harness.results.study`) and the analysis's expected evaluations are read from here;
each built-in metric's Snakemake rule is in `workflow/rules/evaluate.smk`.

A metric from another package (or a module of your own) is declared in the entry-point group
`didbench.metrics` (METRICS_GROUP): `toy = my_package.metric:METRIC`, where METRIC is a `Metric`
with `plugin` semantics. A plugin metric writes one result file, `eval/<name>.json`, through
`harness.core.records.write_result`; its settings are a dataclass (`evaluate.<name>` in a study
config, checked and default-filled from its fields); it needs the run's checkpoint (`needs_run`)
and/or the files of other metrics (`needs`, e.g. ("samples",)). From that declaration alone the
workflow plans it (rule eval_registered), the evaluate CLI runs it, the study loader reads it
(`Study.extra[name]`), MLflow logs it (`<name>/<key>`) and the analysis tabulates it
(tables/<name>.csv): see README "Adding a metric". Keep the module that declares the Metric
light (no torch at import): the Snakefile and the config validator read the declaration.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import metadata

from harness.core.errors import UserError


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
    #: plugin metrics: the metrics whose files it reads (inputs of its job, e.g. ("samples",))
    needs: tuple[str, ...] = ()
    #: plugin metrics: a dataclass whose fields are the keys and defaults of `evaluate.<name>`
    settings: type | None = None
    #: plugin metrics: the `values` keys tabulated and logged (empty: every number). `values` is
    #: either flat ({key: number}) or per sampling steps ({"by_steps": [{"steps": k, key: number}]});
    #: a `<key>_ci95` ([lo, hi] or a half-width) beside a key is its 95% CI
    columns: tuple[str, ...] = ()
    #: plugin metrics: the title of its table (default: `help`)
    title: str = ""
    #: set by the registry for a metric declared through the `didbench.metrics` entry points
    plugin: bool = field(default=False, compare=False)

    @property
    def result_file(self) -> str | None:
        return self.files[0] if self.files else None


#: name -> Metric, in the order results are loaded and tabulated (the built-ins; `metrics()`
#: adds the entry points' metrics)
METRICS: dict[str, Metric] = {}

#: the entry-point group in which a package declares its metrics (name = metric name)
METRICS_GROUP = "didbench.metrics"

#: names a plugin metric may not take: the `evaluate` sections that are not metrics, and the
#: analysis's own table names (a plugin's table is tables/<name>.csv)
RESERVED_NAMES = frozenset({"metrics", "references", "bootstrap", "evaluator", "zeroshot-data", "summary",
                            "headline", "training", "jobs", "cost_train", "cost_sample", "bound_gap",
                            "exact_samples", "data"})


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


#: entry points that failed to load or declare a bad metric: name -> the one-line reason (a study
#: that lists such a metric stops with it; the others run)
BROKEN: dict[str, str] = {}
_plugins_loaded = False


def _describe(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f", package {dist.name} {dist.version}" if dist is not None else ""
    return f"'{ep.name} = {ep.value}' (entry point of group {METRICS_GROUP}{where})"


def _plugin_metric(ep: metadata.EntryPoint) -> Metric:
    """The Metric an entry point names, checked; a UserError of one line says what is wrong."""
    try:
        obj = ep.load()
    except BaseException as err:  # noqa: BLE001 (third-party code: its failure, reported in one line)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"metric {ep.name!r}: {_describe(ep)} failed to load: "
                        f"{type(err).__name__}{': ' + detail if detail else ''}") from None
    if not isinstance(obj, Metric):
        raise UserError(f"metric {ep.name!r}: {_describe(ep)} is {obj!r}, not a harness.core.metric_registry.Metric")
    problem = None
    if ep.name in METRICS and not METRICS[ep.name].plugin or ep.name in RESERVED_NAMES:
        problem = "takes a name didbench already uses"
    elif obj.name != ep.name:
        problem = f"declares the name {obj.name!r}; the entry point's name and Metric.name must agree"
    elif obj.scope != "run":
        problem = "has scope 'study'; a plugin metric is one result per run (scope 'run')"
    elif obj.files not in ((), (f"{obj.name}.json",)):
        problem = f"writes {', '.join(obj.files)}; a plugin metric writes one result file, {obj.name}.json"
    elif obj.settings is not None and not dataclasses.is_dataclass(obj.settings):
        problem = f"has settings {obj.settings!r}, not a dataclass"
    elif unknown := [n for n in obj.needs if n not in METRICS]:
        problem = f"needs {', '.join(unknown)}, not a metric (known: {', '.join(METRICS)})"
    if problem:
        raise UserError(f"metric {ep.name!r}: {_describe(ep)} {problem}")
    return dataclasses.replace(obj, files=(f"{obj.name}.json",), default=False, plugin=True)


def load_plugins(force: bool = False) -> None:
    """Register the metrics of the `didbench.metrics` entry points (once per process; `force`
    reads them again, dropping the plugin metrics registered before)."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for name in [n for n, m in METRICS.items() if m.plugin]:
        del METRICS[name]
    BROKEN.clear()
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=METRICS_GROUP):
        prev = seen.setdefault(ep.name, ep)
        if prev is not ep:
            if prev.value.replace(" ", "") != ep.value.replace(" ", ""):   # the same one seen twice counts once
                METRICS.pop(ep.name, None)
                BROKEN[ep.name] = (f"metric {ep.name!r} is declared by more than one entry point: "
                                   f"{_describe(prev)} and {_describe(ep)}")
            continue
        try:
            register_metric(_plugin_metric(ep))
        except UserError as err:
            BROKEN[ep.name] = str(err)


def metrics() -> dict[str, Metric]:
    """Every metric: the built-ins, then those of the `didbench.metrics` entry points."""
    load_plugins()
    return METRICS


def plugin_metrics() -> list[Metric]:
    """The metrics declared through the entry points (they share the generic rule, rows and table)."""
    return [m for m in metrics().values() if m.plugin]


def plugin_settings(metric: Metric, given: dict | None = None) -> dict:
    """A plugin metric's settings: its dataclass's defaults, overridden by `given` (evaluate.<name>)."""
    base = dataclasses.asdict(metric.settings()) if metric.settings is not None else {}
    return {**base, **(given or {})}


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (tuple, "array"), (dict, "object"))


def settings_schema(metric: Metric) -> dict:
    """The JSON schema of `evaluate.<name>` for a plugin metric: its settings dataclass's fields,
    each typed by its default (an int default accepts integers, a float one any number)."""
    props = {}
    for f in dataclasses.fields(metric.settings) if metric.settings is not None else ():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        entry = {"description": f"{metric.name} setting (plugin metric)", "default": default}
        kind = next((name for t, name in _JSON_TYPES if isinstance(default, t)), None)
        if kind is not None:
            entry["type"] = kind
        props[f.name] = entry
    return {"description": metric.help, "type": "object", "additionalProperties": False, "properties": props}


def run_metrics() -> list[Metric]:
    """The metrics with one result per trained run, in loading order."""
    return [m for m in metrics().values() if m.scope == "run"]


def result_kinds() -> tuple[str, ...]:
    """The per-run result kinds a study may hold (eval/<kind>.json), in loading order."""
    return tuple(m.name for m in run_metrics())


def default_run_kinds() -> tuple[str, ...]:
    """The per-run result kinds of the default `evaluate.metrics` (the others are opt-in)."""
    return tuple(m.name for m in run_metrics() if m.default)


#: the default `evaluate.metrics` of a study on a synthetic corpus: its exact metrics replace the
#: evaluator-LM ones (no evaluator is needed). Its order is part of the study's config hash.
SYNTHETIC_DEFAULT = ("ppl", "samples", "exact", "diversity", "lengths", "cost")
