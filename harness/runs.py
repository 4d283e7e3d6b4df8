"""Load a trained run (method with EMA weights, config, tokenizer) for evaluation."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from harness import data as data_lib
from harness.methods import Method, UserError
from harness.train import build_method, load_checkpoint


@dataclass
class LoadedRun:
    method: Method
    config: dict
    info: dict
    data_dir: str
    tokenizer: object
    run_dir: str


def load_run(run_dir: str, data_dir: str | None = None, device: str | torch.device = "cpu", ema: bool = True) -> LoadedRun:
    """The method of `run_dir/checkpoint.pt` in eval mode (EMA weights unless ema=False)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise UserError(f"no trained model in {run_dir} (missing checkpoint.pt): train it first")
    state = load_checkpoint(path)
    info, config = state["info"], state["config"]
    if data_dir is None:
        data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(run_dir))), "data")
    tokenizer = data_lib.load_tokenizer(data_dir)
    if tokenizer.vocab.to_dict() != info["vocab"]:
        raise UserError(f"checkpoint {path} was trained with a different vocabulary than the data in {data_dir}")
    manifest = data_lib.load_manifest(data_dir)
    method = build_method(config, info["method"], info["layout"], manifest, tokenizer.vocab)
    try:
        method.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as err:
        raise UserError(f"checkpoint {path} does not fit method {info['method']!r} size {info['size']!r}: {str(err).splitlines()[0]}") from None
    method.to(device).eval()
    train_json = os.path.join(run_dir, "train.json")
    if os.path.exists(train_json):
        with open(train_json) as fh:
            info = {**info, **json.load(fh)}
    return LoadedRun(method, config, info, data_dir, tokenizer, run_dir)
