"""Study configs: validate against the workflow schema, fill defaults, name runs.

The schema (workflow/schemas/config.schema.yaml) is the one place where config keys, their
meaning and their defaults live. The Snakefile and every `python -m harness` command load a
config through `load_config`, so a typo stops the work before any job starts, with one line
that names the key, instead of surfacing hours later inside a training job.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import math
import os
from functools import lru_cache
from pathlib import Path

import yaml

from harness.core.errors import UserError
from harness.core.metric_registry import BROKEN as BROKEN_METRICS, SYNTHETIC_DEFAULT, metrics as metric_names, plugin_metrics, plugin_settings, settings_schema
from harness.core.plugins import METHODS_GROUP, checkout_methods

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@lru_cache(maxsize=1)
def schema() -> dict:
    """The study-config JSON schema (YAML on disk)."""
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


# --- method names: the registry's, at validation time ------------------------------------------
#: where the schema lists method names; its enum there names the shipped methods, and
#: `validation_schema` replaces it with `method_names()` (so a method of another package is valid)
METHOD_ENUMS = (
    ("properties", "runs", "items", "properties", "method"),
    ("properties", "methods", "propertyNames"),
    ("properties", "train", "properties", "step_multiplier", "propertyNames"),
)


def shipped_methods() -> list[str]:
    """The methods the schema describes (its enum; their layouts are checked without importing
    torch). Every other method, shipped as a plugin (flexmdm) or another package's, is loaded to
    check a run's layout against its class (`_check_plugin_run`), for configs that use it only."""
    return list(schema()["properties"]["runs"]["items"]["properties"]["method"]["enum"])


def method_names() -> list[str]:
    """The method names a study may use, as the method registry (harness.core.methods) knows them now.

    The shipped methods, the names of the `didbench.methods` entry points of the installed
    packages (not loaded: one that fails to load is reported by `check_config`, with its reason)
    and, when the registry is loaded in this process, whatever was registered in-process. Read
    without importing torch where the registry is not loaded (the Snakefile validates configs too).
    """
    import sys

    registry = sys.modules.get("harness.core.methods")
    shipped = shipped_methods()
    if registry is not None:
        extra = set(registry.declared())
    else:
        from importlib import metadata

        extra = {ep.name for ep in metadata.entry_points(group=METHODS_GROUP)}
    extra |= set(checkout_methods())
    return shipped + sorted(extra - set(shipped))  # the shipped ones first, in the schema's order


def validation_schema() -> dict:
    """schema() with the method-name enums (METHOD_ENUMS) set to the registry's `method_names()`,
    and the plugin metrics (harness.core.metric_registry) added: their names to evaluate.metrics,
    their settings as `evaluate.<name>` sections (no default: a study that does not list one has
    no section, so installing a plugin changes no other study's hash)."""
    sch = copy.deepcopy(schema())
    names = method_names()
    for path in METHOD_ENUMS:
        node = sch
        for key in path:
            node = node[key]
        node["enum"] = names
    evaluate = sch["properties"]["evaluate"]
    enum = evaluate["properties"]["metrics"]["items"]["enum"]
    for metric in plugin_metrics():
        if metric.name in evaluate["properties"]:    # a name the schema already uses: never a plugin's
            continue
        enum.append(metric.name)
        evaluate["properties"][metric.name] = settings_schema(metric)
    enum += [name for name in BROKEN_METRICS if name not in enum]   # listed: check_config says why it is broken
    return sch


def _validator():
    import jsonschema

    # JSON Schema counts 4.0 as an integer; a study config does not (`steps: 4.0` is a typo that
    # would also change the config's hash), so integers are ints (not bools, not floats)
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    return strict(validation_schema())


# --- defaults ---------------------------------------------------------------------------------
def fill_defaults(instance, sch: dict, validator=None):
    """`instance` with every missing key that has a schema default filled in, recursively.

    Follows `properties`, `items`, `additionalProperties` and `allOf` branches whose `if`
    holds (so corpus options get the defaults of the chosen corpus). Values of the wrong type
    are left alone: validation reports them afterwards.
    """
    validator = validator or _validator()
    if isinstance(instance, dict):
        for key, sub in sch.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = fill_defaults(instance[key], sub, validator)
        extra = sch.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance:
                if key not in sch.get("properties", {}):
                    instance[key] = fill_defaults(instance[key], extra, validator)
    elif isinstance(instance, list) and isinstance(sch.get("items"), dict):
        instance[:] = [fill_defaults(v, sch["items"], validator) for v in instance]
    for branch in sch.get("allOf", []):
        if "if" in branch and "then" in branch:
            if validator.evolve(schema=branch["if"]).is_valid(instance):
                instance = fill_defaults(instance, branch["then"], validator)
        else:
            instance = fill_defaults(instance, branch, validator)
    return instance


def section_defaults(*path: str) -> dict:
    """The schema's defaults of one section of a study config (e.g. `("evaluate", "ppl")`): the
    one source the code's own fallbacks are read from, so they cannot drift from the schema."""
    sch, out = schema(), fill_defaults({}, schema())
    for key in path:
        sch = sch["properties"][key]
        out = out.get(key, {}) if isinstance(out, dict) else {}
        if not isinstance(out, dict):
            raise KeyError(f"{'.'.join(path)} is not a section")
    return fill_defaults(copy.deepcopy(out), sch)


# --- errors -----------------------------------------------------------------------------------
def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _names(values) -> str:
    return ", ".join(str(v) for v in values)


def describe_error(err) -> str:
    """One line for a jsonschema ValidationError: `key.path: what is wrong`."""
    path = list(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = list(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in known)
        return f"{_where(path + extra[:1])}: unknown key (known: {_names(known)})"
    if "propertyNames" in err.schema_path:
        bad = err.instance
        return f"{_where(path + [bad])}: unknown key (known: {_names(err.schema.get('enum', []))})"
    if err.validator == "enum":
        return f"{_where(path)}: {err.instance!r} is not one of: {_names(err.validator_value)}"
    if err.validator == "const" and "description" in err.schema:
        return f"{_where(path)}: {err.instance!r} is not allowed here ({err.schema['description']})"
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return f"{_where(path + [missing])}: missing required key"
    if err.validator in ("anyOf", "oneOf"):
        return f"{_where(path)}: {err.instance!r} has the wrong form ({err.schema.get('description', err.message)})"
    return f"{_where(path)}: {err.message}"


def _first_error(instance):
    import jsonschema

    errors = list(_validator().iter_errors(instance))
    if not errors:
        return None
    # best_match prefers the deepest, most specific error; ties broken by path for determinism.
    return jsonschema.exceptions.best_match(sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]))


def is_synthetic_study(cfg: dict) -> bool:
    corpus = (cfg.get("data") or {}).get("corpus")
    return isinstance(corpus, dict) and corpus.get("name") == "synthetic"


# --- the API ----------------------------------------------------------------------------------
#: the most nodes a config may expand to with its aliases resolved (a study config has a few hundred;
#: nested aliases can expand exponentially: a "billion laughs" file would hold the loader for minutes)
MAX_YAML_NODES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            where = (key_node.start_mark.line, key_node.start_mark.column)
            try:
                first = seen.setdefault(key, where)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first != where:   # positions, not lines: `{steps: 4, steps: 400000}` is one line
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first[0] + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict) -> int:
    """Nodes of a composed YAML graph with every alias expanded (each shared node counted per use)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1            # a recursive alias counts once (SafeLoader refuses it later)
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def read_yaml(path) -> dict:
    """A YAML mapping from `path`; a missing file, a syntax error or a duplicate key is a UserError."""
    try:
        with open(path, encoding="utf-8") as fh:
            loader = _UniqueKeyLoader(fh)
            try:
                node = loader.get_single_node()       # the graph, aliases still shared: cheap to measure
                if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
                    raise UserError(f"{path}: its YAML aliases expand to more than {MAX_YAML_NODES} values; "
                                    "a study config needs a few hundred (write the values out)")
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a study config must be a mapping, got {type(data).__name__}")
    return data


def _non_finite(value, where: str = "") -> str | None:
    """The dotted path of the first NaN/inf number in `value` (JSON schema bounds let NaN pass)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "config"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if where and isinstance(k, str) else f"{where}[{k}]" if where else str(k))
        if found:
            return found
    return None


def check_config(cfg: dict) -> None:
    """Schema validation plus the checks a schema cannot express; raises a one-line UserError."""
    bad = _non_finite(cfg)
    if bad is not None:
        value = cfg
        for part in bad.replace("[", ".").replace("]", "").split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        raise UserError(f"{bad}: {value} is not a finite number")
    err = _first_error(cfg)
    if err is not None:
        raise UserError(describe_error(err))
    seen: dict[tuple, int] = {}
    shipped = set(shipped_methods())
    names = set(method_names())
    for i, run in enumerate(cfg["runs"]):
        key = (run_label(run), run["layout"])
        if key in seen:
            raise UserError(f"runs[{i}]: duplicate of runs[{seen[key]}] ({key[0]}, {key[1]}): give one a label")
        seen[key] = i
        if key[0] != run["method"] and (key[0] in names or key[0] == "data"):
            raise UserError(f"runs[{i}].label: {key[0]!r} is " + ("another method's name" if key[0] in names else
                                                                  "the tables' name for the data rows"))
        if (run.get("train") or {}).get("steps") == 0 and "label" not in run:
            raise UserError(f"runs[{i}].train.steps: 0 (the untrained network) needs a label of its own, "
                            f"e.g. {run['method']}-init")
        if run.get("match") == "flops" and "steps" in (run.get("train") or {}):
            raise UserError(f"runs[{i}]: match flops sets the steps; remove train.steps")
        if run.get("match_to") and run.get("match") != "flops":
            raise UserError(f"runs[{i}].match_to: only a run with match: flops is matched to other runs")
        if run["method"] not in shipped:  # another package's method: load it now, check its layouts
            _check_plugin_run(i, run)
    trained = {(e["label"], e["layout"]) for e in run_entries(cfg) if e["match"] != "flops" and run_steps(cfg, e) > 0}
    for i, run in enumerate(cfg["runs"]):
        unknown = [lab for lab in run.get("match_to") or [] if (lab, run["layout"]) not in trained]
        if unknown:
            raise UserError(f"runs[{i}].match_to: {', '.join(map(repr, unknown))} is not a trained run of layout "
                            f"{run['layout']} that is matched by steps")
    if cfg["data"]["min_tokens"] > cfg["data"]["max_len"]:
        raise UserError(
            f"data.min_tokens: {cfg['data']['min_tokens']} is larger than data.max_len ({cfg['data']['max_len']})"
        )
    synthetic = is_synthetic_study(cfg)
    if synthetic != (cfg["data"]["tokenizer"]["kind"] == "symbols"):
        raise UserError("data.tokenizer.kind: a synthetic corpus needs kind symbols, and kind symbols a synthetic corpus")
    for name in cfg["evaluate"]["metrics"]:
        if name in BROKEN_METRICS and name not in metric_names():   # a built-in's name stays the built-in
            raise UserError(f"evaluate.metrics: {BROKEN_METRICS[name]}")
    if "exact" in cfg["evaluate"]["metrics"] and not synthetic:
        raise UserError("evaluate.metrics: exact needs a synthetic corpus (data.corpus.name: synthetic), "
                        "whose law is known")
    if cfg["evaluate"]["zeroshot"]["datasets"] and synthetic:
        raise UserError("evaluate.zeroshot.datasets: zero-shot test sets are real text; a synthetic corpus's "
                        "symbol tokenizer cannot read them")
    if cfg["data"]["valid_fraction"] + cfg["data"]["test_fraction"] >= 1:
        raise UserError("data.valid_fraction + data.test_fraction must be below 1")


def _fill_plugin_settings(cfg: dict) -> None:
    """Give each plugin metric the study lists its `evaluate.<name>` section, default-filled from
    its settings dataclass (the resolved config then records every setting its job used)."""
    for metric in plugin_metrics():
        if metric.name in cfg["evaluate"]["metrics"]:
            cfg["evaluate"][metric.name] = plugin_settings(metric, cfg["evaluate"].get(metric.name))


def _check_plugin_run(i: int, run: dict) -> None:
    """Load a method that the schema does not describe (an entry point's) and check the run's
    layout against its `layouts`: a broken entry point stops the study here, with one line."""
    from harness.core import methods  # imports torch: only for configs that use such a method

    try:
        cls = methods.get(run["method"])
    except UserError as err:
        raise UserError(f"runs[{i}].method: {err}") from None
    if run["layout"] not in cls.layouts:
        raise UserError(f"runs[{i}].layout: {run['layout']!r} is not allowed here (method {run['method']!r} "
                        f"supports {', '.join(cls.layouts)})")


def load_config(path_or_dict, source: str | None = None) -> dict:
    """A validated study config with every default filled in (a new dict; the input is not changed).

    `path_or_dict`: a YAML file or an already loaded mapping. `source` names it in error
    messages (default: the path, or "config"). Mistakes raise UserError with one line such as
    `config/default.yaml: train.lr: -1 is less than or equal to the minimum of 0`.
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        source = source or str(path_or_dict)
        raw = read_yaml(path_or_dict)
    elif isinstance(path_or_dict, dict):
        source = source or "config"
        raw = copy.deepcopy(path_or_dict)
    else:
        raise UserError(f"a config must be a file or a mapping, got {type(path_or_dict).__name__}")
    try:
        metrics_given = "metrics" in (raw.get("evaluate") or {}) if isinstance(raw.get("evaluate"), dict) else False
        cfg = fill_defaults(raw, schema())
        if not metrics_given and is_synthetic_study(cfg):
            cfg["evaluate"]["metrics"] = list(SYNTHETIC_DEFAULT)
        check_config(cfg)
        _fill_plugin_settings(cfg)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    return cfg


def canonical_json(cfg) -> str:
    """The config as canonical JSON (sorted keys, no spaces): equal configs, equal text."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


#: opt-in sections added after studies had run, whose defaults plan no job: left out of a
#: config's hash while they hold exactly their defaults, so adding one changed no study's hash
#: (its resolved-config file, the config_hash of its results, its report and MLflow jobs)
HASH_NEUTRAL_DEFAULTS = (("evaluate", "zeroshot"), ("data", "storage"))


@lru_cache(maxsize=None)
def _section_default(path: tuple[str, ...]) -> str:
    """Canonical JSON of the default-filled value of the schema section at `path`."""
    node = schema()
    for key in path:
        node = node["properties"][key]
    return canonical_json(fill_defaults(copy.deepcopy(node.get("default", {})), node))


def _hashed(cfg):
    """`cfg` without the HASH_NEUTRAL_DEFAULTS sections that hold their defaults (copied, not changed)."""
    for path in HASH_NEUTRAL_DEFAULTS:
        node = cfg
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            continue
        if canonical_json(node[path[-1]]) != _section_default(path):
            continue
        cfg = dict(cfg)
        parent = cfg
        for key in path[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
        del parent[path[-1]]
    return cfg


def config_hash(cfg) -> str:
    """First 12 hex digits of sha256(canonical JSON): names a config in results and run files.

    Sections of HASH_NEUTRAL_DEFAULTS at their defaults are left out (see there)."""
    return hashlib.sha256(canonical_json(_hashed(cfg)).encode("utf-8")).hexdigest()[:12]


def run_name(label: str, layout: str, size: str, seed: int) -> str:
    """`<label>-<layout>-<size>-s<seed>`, e.g. did-varlen-tiny-s0 (the label is the method unless
    the run gives one)."""
    return f"{label}-{layout}-{size}-s{seed}"



_RUN_NAME = re.compile(r"^(?P<method>.+)-(?P<layout>fixed|varlen)-(?P<size>[^-]+)-s(?P<seed>\d+)$")


def parse_run_name(name: str) -> dict:
    """`<method>-<layout>-<size>-s<seed>` -> identity dict (empty if the name does not match)."""
    m = _RUN_NAME.match(name)
    if not m:
        return {}
    d = m.groupdict()
    d["seed"] = int(d["seed"])
    return d

def run_label(run: dict) -> str:
    """A `runs` entry's label: its own, else its method."""
    return run.get("label") or run["method"]


def _sweep_entries(cfg: dict) -> list[dict]:
    """The `runs` entries with the `sweep` grid expanded (config order, then lr, then batch)."""
    grid = cfg.get("sweep")
    if not grid:
        return [dict(run) for run in cfg["runs"]]
    sequences = cfg["train"]["steps"] * cfg["train"]["batch_size"]
    out = []
    for run in cfg["runs"]:
        if run.get("match") == "flops":
            out.append(dict(run))
            continue
        for lr in grid["lr"]:
            for batch in grid["batch_size"]:
                train = {**(run.get("train") or {}), "lr": lr, "batch_size": batch,
                         "steps": max(1, round(sequences / batch))}
                out.append({**run, "label": f"{run_label(run)}-lr{lr:g}-b{batch}", "train": train})
    return out


def run_entries(cfg: dict) -> list[dict]:
    """Every `runs` entry of a study (the sweep expanded) with its label: {label, method, layout,
    match, seeds, train (the run's own recipe keys), options (its own method options)}."""
    return [{"label": run_label(run), "method": run["method"], "layout": run["layout"],
             "match": run.get("match", "steps"), "match_to": list(run.get("match_to") or []),
             "seeds": list(run.get("seeds") or cfg["seeds"]),
             "train": dict(run.get("train") or {}), "options": dict(run.get("options") or {})}
            for run in _sweep_entries(cfg)]


def run_entry(cfg: dict, label: str, layout: str) -> dict | None:
    """The entry of run_entries whose label (or, failing that, method) and layout are these."""
    entries = [e for e in run_entries(cfg) if e["layout"] == layout]
    for key in ("label", "method"):
        found = [e for e in entries if e[key] == label]
        if found:
            return found[0]
    return None


def run_steps(cfg: dict, entry: dict) -> int:
    """The steps of an entry that is not FLOPs-matched: its own train.steps, else train.steps x
    step_multiplier of its method."""
    if "steps" in entry["train"]:
        return int(entry["train"]["steps"])
    multiplier = (cfg["train"].get("step_multiplier") or {}).get(entry["method"], 1)
    return max(1, int(round(cfg["train"]["steps"] * multiplier)))


def match_targets(cfg: dict, entry: dict) -> list[dict]:
    """What a match-flops entry is matched to: every other trained entry of its layout, or those its
    `match_to` names ({label, method, steps, batch_size, accumulate}); the training job takes the
    most expensive."""
    out = []
    for e in run_entries(cfg):
        if e["layout"] != entry["layout"] or e["label"] == entry["label"] or e["match"] == "flops":
            continue
        if entry.get("match_to") and e["label"] not in entry["match_to"]:
            continue
        steps = run_steps(cfg, e)
        if steps == 0:
            continue
        merged = {**cfg["train"], **e["train"]}
        out.append({"label": e["label"], "method": e["method"], "steps": steps, "batch_size": merged["batch_size"],
                    "accumulate": merged["accumulate"], "options": e["options"]})
    return out


def run_settings_hash(cfg: dict, entry: dict) -> str:
    """Hash of everything one training run of `entry` (run_entries) depends on: the data, the size,
    its recipe (the study's `train` with its own keys over it), its steps (or, FLOPs-matched, the runs
    it is matched to) and its method options; not the other runs, not the evaluation. The workflow
    re-runs a training job when it changes (its `settings` param); train.json records it
    (`settings_hash`), so a result trained under another recipe is told apart from the study's."""
    train = {k: v for k, v in cfg["train"].items() if k != "step_multiplier"}
    picked = {
        "data": cfg["data"],
        "size": cfg["size"],
        "train": {**train, **entry["train"]},
        "steps": None if entry["match"] == "flops" else run_steps(cfg, entry),
        "options": {**(cfg.get("methods") or {}).get(entry["method"], {}), **entry["options"]},
    }
    if entry["match"] == "flops":
        picked["match"] = match_targets(cfg, entry)
    if entry["label"] != entry["method"]:   # unlabelled runs keep the hash they always had
        picked["run"] = {"label": entry["label"], "method": entry["method"]}
    return config_hash(picked)


def study_runs(cfg: dict) -> list[dict]:
    """Every trained model of a study: {name, label, method, layout, size, seed, steps, match},
    seed by seed in config order; steps is None where the run is FLOPs-matched (its training job
    computes them)."""
    out = []
    entries = run_entries(cfg)
    seeds = list(dict.fromkeys([s for e in entries for s in e["seeds"]]))
    for seed in seeds:
        for e in entries:
            if seed not in e["seeds"]:
                continue
            steps = None if e["match"] == "flops" else run_steps(cfg, e)
            out.append({"name": run_name(e["label"], e["layout"], cfg["size"], seed), "label": e["label"],
                        "method": e["method"], "layout": e["layout"], "size": cfg["size"], "seed": seed,
                        "steps": steps, "match": e["match"]})
    return out
