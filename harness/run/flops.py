"""Training FLOPs: the estimate per optimizer step, and the steps of a FLOPs-matched run.

`match: flops` gives a run the training FLOPs of the most expensive other run of its layout;
every FLOPs/step is estimated the same way (the first batches of the seed, counted by
torch's FLOP counter through the method's loss).
"""
from __future__ import annotations

import math

import torch
from harness.core.config import match_targets
from harness.core.errors import UserError
from harness.data.batches import batch_indices
from harness.core.settings import TrainSettings
from harness.run.recipe import build_method


def matched_steps(config: dict, entry: dict, model, train_data, settings: TrainSettings, seed: int, world: int,
                  device, manifest: dict, vocab) -> tuple[int, dict]:
    """Steps that give a FLOPs-matched run (match: flops) the training FLOPs of the most expensive
    other run of its layout: ceil(max_target steps x FLOPs/step / own FLOPs/step), every FLOPs/step
    estimated the same way (estimate_flops_per_step: the first batches of the seed) at each run's
    own batch. Returns (steps, {target label, target FLOPs, own FLOPs/step})."""
    targets = match_targets(config, entry)
    if not targets:
        raise UserError(f"{entry['label']} ({entry['layout']}): match flops needs another trained run of its layout")
    own = estimate_flops_per_step(model, train_data, settings, seed, world, device)
    if own is None:
        raise UserError(f"{entry['label']}: method {entry['method']} has no FLOPs estimate (flops_per_token)")
    best, best_flops = None, -1.0
    for t in targets:
        other = build_method(config, t["method"], entry["layout"], manifest, vocab, options=t["options"]).to(device)
        ts = TrainSettings.from_config({**config.get("train", {}), "batch_size": t["batch_size"],
                                        "accumulate": t["accumulate"]})
        per_step = estimate_flops_per_step(other, train_data, ts, seed, world, device)
        if per_step is not None and per_step * t["steps"] > best_flops:
            best, best_flops = t, per_step * t["steps"]
        del other
    if best is None:
        raise UserError(f"{entry['label']}: no run of its layout has a FLOPs estimate to match")
    steps = max(1, math.ceil(best_flops / own - 1e-9))
    return steps, {"match": "flops", "matched_to": best["label"], "matched_flops": float(f"{best_flops:.6g}")}


def estimate_flops_per_step(model, train_data, s: TrainSettings, seed: int, world: int, device, steps: int = 4):
    """Estimated training FLOPs of one optimizer step: the mean over the run's first `steps` batches
    of sum over its micro-batches (all ranks) of flops_per_token(batch) x clean tokens.

    The batches are a pure function of (seed, step), so a resumed run gets the same number; the
    global RNG state is restored. None if the method has no FLOPs estimate.
    """
    rng = torch.get_rng_state()
    try:
        total = 0.0
        for step in range(steps):
            for rank in range(world):
                idx = batch_indices(len(train_data), s.batch_size, seed, step, rank, world)
                for i in range(s.accumulate):
                    batch = train_data.batch(idx[i :: s.accumulate]).to(device)
                    total += float(model.flops_per_token(batch)) * batch.clean_tokens()
        return total / steps
    except NotImplementedError:
        return None
    finally:
        torch.set_rng_state(rng)
