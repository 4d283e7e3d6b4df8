"""What a run is: its settings, its recipe, its checkpoint and EMA weights, and `load_run`.

A run is (method, layout, size, seed) of a study, trained with `TrainSettings` (the `train:`
section with the run's own keys over it). Its recipe hash names everything the weights depend
on (settings, seed, method options, data hash, vocabulary); a checkpoint or resume state saved
under another recipe is stale. `load_run` reads a trained run back (method with EMA weights,
config, tokenizer) for evaluation, after checking that it is the run its folder and study say.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass

import torch
from harness.core.atomic import atomic_write
from harness.core.config import config_hash, match_targets, parse_run_name, run_entry, run_steps
from harness.core.errors import UserError
from harness.core.methods import Method, build
from harness.core.records import read_json_object
from harness.core.settings import TrainSettings
from harness.data.manifest import load_manifest, load_tokenizer
from harness.data.settings import config_hash as data_config_hash, hashed_config


MAX_STEPS = 10**9  # the most optimizer steps a run may ask for (the schema's train.steps maximum)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to lr, then constant or cosine decay to lr * min_lr_ratio."""
    if s.warmup > 0 and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if not s.cosine:
        return s.lr
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919) % (2**62)


class EMA:
    """Exponential moving average of the parameters with the warm-up min(decay, (1+k)/(10+k))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], state["shadow"]

    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a temp file and a rename: a checkpoint on disk is never half-written."""
    atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


def method_options(config: dict, method: str, dropout: float | None, run_options: dict | None = None) -> dict:
    """The method's constructor options: `methods.<method>`, the run's own `options` over them, and
    the dropout unless an option sets it."""
    options = {**((config.get("methods") or {}).get(method, {}) or {}), **(run_options or {})}
    if dropout is not None:
        options.setdefault("dropout", dropout)
    return options


def max_len_of(data: dict, layout: str) -> int:
    """A layout's sequence length from the study's `data:` section (seq_len fixed, max_len varlen)."""
    return int(data["seq_len"] if layout == "fixed" else data["max_len"])


def build_method(config: dict, method: str, layout: str, manifest: dict, vocab, dropout: float | None = None,
                 options: dict | None = None):
    """Instantiate the registered method for this run from the study config. `options`: the
    constructor options a checkpoint recorded, or a run's own (over `methods.<method>`)."""
    options = method_options(config, method, dropout, options)
    return build(method, vocab, config.get("size", "tiny"), layout, max_len_of(config["data"], layout), **options)


def resolve_run(config: dict, label: str, layout: str) -> dict:
    """The study's runs entry (harness.core.config.run_entries) for `label` (a run label or a method
    name) and `layout`; a method the study does not list trains with the study's recipe."""
    entry = run_entry(config, label, layout)
    if entry is None:
        entry = {"label": label, "method": label, "layout": layout, "match": "steps", "seeds": list(config.get("seeds") or [0]),
                 "train": {}, "options": {}}
    return entry


def settings_for(config: dict, entry: dict, steps: int | None) -> TrainSettings:
    """The run's TrainSettings: the study's `train`, the run's own keys over it, and `steps`
    (given, else the run's: see harness.core.config.run_steps; a FLOPs-matched run gets its steps later)."""
    settings = TrainSettings.from_config({**config.get("train", {}), **entry["train"]})
    if steps is not None:
        settings.steps = int(steps)
    elif entry["match"] != "flops":
        settings.steps = run_steps(config, entry)
    return settings


def recipe_extra(config: dict, entry: dict, manifest: dict, vocab, settings: TrainSettings, layout: str) -> dict:
    """What besides the settings and the seed the weights depend on (see recipe_hash)."""
    extra = {"options": method_options(config, entry["method"], settings.dropout, entry["options"]),
             "data_hash": manifest.get("config_hash"), "vocab": vocab.to_dict(), "max_len": max_len_of(config["data"], layout),
             "method": entry["method"], "layout": layout}
    if entry["match"] == "flops":   # the matched steps follow from the runs it is matched to
        extra["match"] = {"flops": match_targets(config, entry)}
    return extra


def expected_recipe(config: dict, label: str, layout: str, seed: int, manifest: dict, vocab) -> str:
    """The recipe hash `train` records for this run of `config` on this data (see recipe_hash)."""
    entry = resolve_run(config, label, layout)
    settings = settings_for(config, entry, None)
    if entry["match"] == "flops":
        settings.steps = 0   # not part of the recipe: it follows from extra["match"] and the data
    return recipe_hash(settings, seed, recipe_extra(config, entry, manifest, vocab, settings, layout))


def check_data_fits(data: dict, layout: str, manifest: dict, data_dir) -> None:
    """One-line UserError when the prepared data is not the data the study's `data:` section names:
    cut at another length, or prepared from another corpus, split or tokenizer (the manifest's
    config_hash), so a run is never trained or scored on data its config does not describe."""
    key = "seq_len" if layout == "fixed" else "max_len"
    want, have = data.get(key), manifest.get(key)
    if have is not None and want is not None and int(have) != int(want):
        raise UserError(f"data.{key} is {want} in the config but the data in {data_dir} was prepared with "
                        f"{key}={have}: prepare it again (or fix the config)")
    prepared, wanted = manifest.get("config_hash"), data_config_hash(data)
    if prepared is not None and prepared != wanted:
        differ = sorted(k for k in set(manifest.get("config") or {}) | set(hashed_config(data))
                        if (manifest.get("config") or {}).get(k) != hashed_config(data).get(k))
        raise UserError(f"the data in {data_dir} was prepared from another data config than this study's "
                        f"(differs in data.{', data.'.join(differ) or '?'}): prepare it again from this config, "
                        "or point at the study's own data")


#: settings that change what is trained (checkpoint/log cadence and the validation bound do not)
_NOT_RECIPE = ("checkpoint_every", "log_every", "valid_mc", "valid_sequences", "valid_every")


def recipe_hash(settings: TrainSettings, seed: int, extra: dict) -> str:
    """Hash of everything the weights at step k depend on: settings, steps, seed, and `extra`
    (recipe_extra: method, layout, options, data, vocabulary, length; what a matched run matches).

    A resume state with another recipe is stale (the config was edited after it was saved,
    and Snakemake re-runs the job without deleting resume/); resuming it would mix two
    recipes and label the result with the new one.
    """
    recipe = {k: v for k, v in asdict(settings).items() if k not in _NOT_RECIPE}
    recipe.update(seed=seed, **extra)
    return config_hash(recipe)


def is_stale(saved: dict, info: dict) -> bool:
    """Same run (method, layout, size) but another recipe; states without a recipe are trusted."""
    same_run = all(saved.get(k) == info.get(k) for k in ("method", "layout", "size"))
    return same_run and saved.get("recipe", info["recipe"]) != info["recipe"]


def check_matches(got: dict, expect: dict, path: str) -> None:
    """One-line UserError when a checkpoint belongs to another method/layout/size/vocabulary."""
    for key in ("method", "layout", "size", "vocab", "max_len"):
        if got.get(key) != expect.get(key):
            raise UserError(
                f"checkpoint {path} does not match this run: {key} is {got.get(key)!r} there, {expect.get(key)!r} here"
            )


#: what each kind of checkpoint must hold (harness.run.loop writes both; anything else is refused)
CHECKPOINT_KEYS = {
    "didbench.state/1": ("info", "step", "model", "optimizer", "ema", "history", "wall_time"),
    "didbench.checkpoint/1": ("info", "model", "ema", "config"),
}


def load_checkpoint(path: str, expect: dict | None = None) -> dict:
    """Load a state or final checkpoint, with one-line errors for corrupt or mismatched files."""
    import pickle

    try:
        # weights_only: tensors and plain containers/numbers/strings only (all a didbench state
        # holds), so a crafted file cannot run code while it is loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if re.search(r"GLOBAL |Unsupported global|Unsupported class", str(err)):  # code, not damage
            raise UserError(f"checkpoint {path} holds objects other than tensors and plain data; refused "
                            "(loading it could run code): delete it or retrain") from None
        raise UserError(f"checkpoint {path} is corrupted or unreadable ({type(err).__name__}); delete it to start over") from None
    except Exception as err:  # truncated / not a torch file
        raise UserError(f"checkpoint {path} is corrupted or unreadable ({type(err).__name__}); delete it to start over") from None
    required = CHECKPOINT_KEYS.get(state.get("kind") if isinstance(state, dict) else None)
    if required is None or not isinstance(state.get("info"), dict):
        raise UserError(f"{path} is not a didbench checkpoint")
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is malformed: it lacks {', '.join(missing)}; delete it or retrain")
    missing = [k for k in ("run", "method", "layout", "size", "vocab", "max_len") if k not in state["info"]]
    if missing:
        raise UserError(f"checkpoint {path} is malformed: its info lacks {', '.join(missing)}; delete it or retrain")
    if expect is not None:
        check_matches(state["info"], expect, path)
    return state


@dataclass
class LoadedRun:
    method: Method
    config: dict
    info: dict
    data_dir: str
    tokenizer: object
    run_dir: str


def load_run(run_dir: str, data_dir: str | None = None, device: str | torch.device = "cpu", ema: bool = True,
             study_config: dict | None = None) -> LoadedRun:
    """The method of `run_dir/checkpoint.pt` in eval mode (EMA weights unless ema=False).

    `study_config`: the config the results will be labelled with; the checkpoint's training recipe
    must be the one this config gives its run (a checkpoint of another recipe copied into the run
    directory would otherwise be evaluated under the study's name and config hash).
    """
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise UserError(f"no trained model in {run_dir} (missing checkpoint.pt): train it first")
    state = load_checkpoint(path)
    info, config = state["info"], state["config"]
    if not isinstance(config, dict):
        raise UserError(f"checkpoint {path} is malformed: its config is a {type(config).__name__}, not a mapping")
    check_folder(run_dir, info, path)
    if data_dir is None:
        data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(run_dir))), "data")
    tokenizer = load_tokenizer(data_dir)
    if tokenizer.vocab.to_dict() != info["vocab"]:
        raise UserError(f"checkpoint {path} was trained with a different vocabulary than the data in {data_dir}")
    manifest = load_manifest(data_dir)
    if info.get("data_hash") and manifest.get("config_hash") and info["data_hash"] != manifest["config_hash"]:
        raise UserError(f"checkpoint {path} was trained on other data than {data_dir} (another data config): "
                        "evaluate it on its own data, or retrain")
    if study_config is not None:
        check_data_fits(study_config["data"], info["layout"], manifest, data_dir)
        check_recipe(path, info, study_config, manifest, tokenizer.vocab)
    method = build_method(config, info["method"], info["layout"], manifest, tokenizer.vocab,
                          options=info.get("options"))   # the options it was trained with (a run may have its own)
    try:
        method.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as err:
        raise UserError(f"checkpoint {path} does not fit method {info['method']!r} size {info['size']!r}: {str(err).splitlines()[0]}") from None
    method.to(device).eval()
    train_json = os.path.join(run_dir, "train.json")
    if os.path.exists(train_json):
        summary = read_json_object(train_json, "training summary")
        for key in IDENTITY:   # the summary and the checkpoint must describe the same run
            if key in summary and key in info and summary[key] != info[key]:
                raise UserError(f"{train_json} ({key} {summary[key]!r}) does not belong to checkpoint {path} "
                                f"({key} {info[key]!r}): retrain the run")
        info = {**info, **summary}
    return LoadedRun(method, config, info, data_dir, tokenizer, run_dir)


#: what names a run: a checkpoint, its train.json and its folder must agree on these
IDENTITY = ("run", "method", "label", "layout", "size", "seed", "recipe")


def check_folder(run_dir: str, info: dict, path: str) -> None:
    """One-line UserError when a checkpoint sits in the folder of another run (a copied file would
    otherwise be evaluated, and labelled, as the run its folder names). A folder whose name is not a
    run name (`<label>-<layout>-<size>-s<seed>`) is the user's own and is not compared."""
    folder = os.path.basename(os.path.normpath(run_dir))
    if parse_run_name(folder) and folder != info.get("run"):
        raise UserError(f"checkpoint {path} belongs to run {info.get('run')!r} ({info.get('method')}, "
                        f"{info.get('layout')}), not to the run its folder names ({folder}): retrain {folder}, or "
                        "move the file to its own run folder")


def check_recipe(path: str, info: dict, study_config: dict, manifest: dict, vocab) -> None:
    """One-line UserError unless the checkpoint's recipe hash is the one `study_config` gives its run."""
    if info.get("size") != study_config.get("size"):
        raise UserError(f"checkpoint {path} is a {info.get('size')!r} model, the study's size is "
                        f"{study_config.get('size')!r}: retrain the run")
    if not info.get("recipe"):
        raise UserError(f"checkpoint {path} records no training recipe (made before recipes were recorded, or "
                        "elsewhere): nothing says it is this study's run; retrain it")
    expected = expected_recipe(study_config, info.get("label") or info["method"], info["layout"], int(info["seed"]),
                               manifest, vocab)
    if info["recipe"] != expected:
        raise UserError(f"checkpoint {path} was trained with another recipe ({info['recipe']}) than this study's "
                        f"{info['run']} ({expected}): the config or data changed, or the file was copied from "
                        "elsewhere; retrain the run")
