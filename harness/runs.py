"""Load a trained run (method with EMA weights, config, tokenizer) for evaluation."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from harness import data as data_lib
from harness.methods import Method, UserError
from harness.results import read_json_object
from harness.train import build_method, check_data_fits, expected_recipe, load_checkpoint


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
    tokenizer = data_lib.load_tokenizer(data_dir)
    if tokenizer.vocab.to_dict() != info["vocab"]:
        raise UserError(f"checkpoint {path} was trained with a different vocabulary than the data in {data_dir}")
    manifest = data_lib.load_manifest(data_dir)
    if info.get("data_hash") and manifest.get("config_hash") and info["data_hash"] != manifest["config_hash"]:
        raise UserError(f"checkpoint {path} was trained on other data than {data_dir} (another data config): "
                        "evaluate it on its own data, or retrain")
    if study_config is not None:
        check_data_fits(study_config, info["layout"], manifest, data_dir)
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
    from harness.study import parse_run_name

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
