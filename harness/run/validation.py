"""The validation curve: the strict NLL bound of the (EMA) weights on fixed validation rows.

Every `valid_every` steps and at the last step the loop scores the first `valid_sequences` valid
rows with the same Monte-Carlo seed, so the points of one curve differ only by the weights.
"""
from __future__ import annotations

import math

import torch
from harness.core.batch import predicted_tokens
from harness.core.bounds import nll_statistics
from harness.data.batches import eval_batches
from harness.data.storage import load_split
from harness.core.settings import TrainSettings
from harness.run.recipe import EMA


VALID_SEED_OFFSET = 17  # the validation generator's seed is seed + 17, at every evaluation


@torch.no_grad()
def strict_validation(model, valid, s: TrainSettings, seed: int, device) -> dict:
    """Strict NLL bound of `model` as it is on the first `s.valid_sequences` rows of `valid`.

    The same rows for every method of a layout, `s.valid_mc` draws per sequence and a generator
    seeded afresh with the same seed at every call (common random numbers: two calls differ only
    by the weights). Returns harness.core.bounds.nll_statistics (nats_per_token = sum B / sum N,
    stderr across sequences), or {} without validation rows.
    """

    if valid is None or len(valid) == 0:
        return {}
    gen = torch.Generator(device=device).manual_seed(int(seed) + VALID_SEED_OFFSET)
    bounds, tokens = [], []
    for batch in eval_batches(valid, s.batch_size, s.valid_sequences):
        batch = batch.to(device)
        bounds.append(model.nll_bound(batch, s.valid_mc, gen, convention="strict").detach().to("cpu", torch.float64))
        tokens.append(predicted_tokens(batch).to("cpu"))
    if not bounds or int(torch.cat(tokens).sum()) == 0:
        return {}
    return nll_statistics(torch.cat(bounds).numpy(), torch.cat(tokens).numpy())


def ema_validation(model, ema: EMA, valid, s: TrainSettings, seed: int, device) -> dict:
    """History columns valid_nats_per_token / valid_stderr of the EMA weights, mid-training.

    The EMA weights are swapped in for the evaluation and the raw weights, train mode and the
    global RNG state (CPU and CUDA) restored after it, so training continues exactly as without it.
    """
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        ema.copy_to(model)
        model.eval()
        res = strict_validation(model, valid, s, seed, device)
    finally:
        model.load_state_dict(raw)
        model.train()
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    if not res:
        return {}
    stderr = res.get("stderr")
    return {"valid_nats_per_token": round(res["nats_per_token"], 6),
            "valid_stderr": None if stderr is None else round(stderr, 6)}


def valid_summary(nats: float, stderr, s: TrainSettings, n_sequences: int) -> dict:
    """train.json's validation keys from one (rounded) strict bound."""
    nats = float(nats)
    return {"valid_nats_per_token": nats, "valid_ppl": round(math.exp(min(nats, 700)), 4),
            "valid_stderr": None if stderr is None or stderr != stderr else float(stderr),
            "valid_mc": s.valid_mc, "valid_sequences": int(n_sequences), "valid_convention": "strict"}


def validation_bound(model, data_dir: str, layout: str, s: TrainSettings, seed: int, device, valid=None) -> dict:
    """train.json's final validation bound of `model` (the caller swaps in the EMA weights).

    The same computation as every point of the validation curve (strict_validation): strict
    bound, same rows, same seed. `valid`: the split if already loaded.
    """
    if valid is None:
        valid = load_split(data_dir, "valid", layout)
    res = strict_validation(model, valid, s, seed, device)
    if not res:
        return {}
    stderr = res.get("stderr")
    return valid_summary(round(res["nats_per_token"], 6), None if stderr is None else round(stderr, 6), s,
                          res["n_sequences"])
