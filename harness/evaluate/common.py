"""Helpers every evaluation shares: settings with defaults, the device, ids -> text.

Settings live under `evaluate.<section>` in the study config. The defaults below apply when a
key is absent, and the merged dict is what each result logs under "settings", so a result
always names every setting that produced it.
"""
from __future__ import annotations

import copy

from harness.methods import UserError

DEFAULTS: dict[str, dict] = {
    "ppl": {"mc": 4, "max_sequences": 128, "batch_size": 32, "seed": 0, "split": "test"},
    "samples": {"n": 16, "steps": [16, 64], "top_p": 1.0, "seed": 0, "batch_size": 16, "trajectory": True},
    # n: None -> enough for the samples and for every MAUVE human subset
    "references": {"n": None, "split": "test", "seed": 0},
    "genppl": {
        "evaluator": "smollm2", "batch_size": 8, "max_tokens": 160, "bootstrap": 1000, "seed": 0,
        "entropy_prefix": 128,
    },
    "mauve": {
        "max_text_length": 128, "human_samples": 32, "subsets": 1, "seed": 25, "num_buckets": "auto",
        "pca_max_data": -1, "kmeans_explained_var": 0.9, "kmeans_num_redo": 5, "kmeans_max_iter": 500,
        "divergence_curve_discretization_size": 25, "mauve_scaling_factor": 5,
    },
    "diversity": {"self_bleu_samples": 128, "bleu_order": 4},
    "lengths": {"bins": 32},
    "speed": {"warmup": 1, "repeats": 2, "n": 4, "skip_rows": 1},
}


def settings(config: dict, section: str) -> dict:
    """`config["evaluate"][section]` over the defaults.

    Keys are checked by the config schema (workflow/schemas/config.schema.yaml); keys unknown
    here are kept, so they still show up in the logged settings.
    """
    base = copy.deepcopy(DEFAULTS[section])
    given = ((config or {}).get("evaluate") or {}).get(section) or {}
    if not isinstance(given, dict):
        raise UserError(f"evaluate.{section} must be a mapping, got {type(given).__name__}")
    base.update(copy.deepcopy(given))
    return base


def reference_count(config: dict) -> int:
    """How many held-out texts the reference set needs (samples per steps, MAUVE human subsets)."""
    ref = settings(config, "references")
    if ref["n"] is not None:
        return int(ref["n"])
    mv = settings(config, "mauve")
    return max(int(settings(config, "samples")["n"]), int(mv["human_samples"]) * int(mv["subsets"]))


def pick_device(name: str | None = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; any other name is used as given."""
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA device is visible")
    return str(name)


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def render(ids, tokenizer) -> dict:
    """Text, document segments and content length of a token-id sequence (no BOS).

    * `text`: `tokenizer.decode(ids, skip_special=True)`, which drops BOS/EOS/PAD/MASK.
    * `segments`: the texts between EOS tokens. In the fixed layout EOS separates documents;
      genppl re-inserts the evaluator's document separator there (baselines spec 6.3.2 keeps
      document separators), and for varlen data there is one segment.
    * `length`: content tokens, i.e. ids that are not special (baselines spec 6.6).
    """
    ids = [int(t) for t in ids]
    vocab = tokenizer.vocab
    specials = set(vocab.specials)
    pieces: list[list[int]] = [[]]
    for t in ids:
        if t == vocab.eos:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return {
        "text": tokenizer.decode(ids, skip_special=True),
        "segments": [tokenizer.decode(p, skip_special=True) for p in pieces],
        "length": sum(t not in specials for t in ids),
    }


def steps_list(values) -> list[int]:
    """The steps sweep as a list of positive ints (a single int is allowed)."""
    items = values if isinstance(values, (list, tuple)) else [values]
    try:
        out = [int(s) for s in items]
    except (TypeError, ValueError):
        raise UserError(f"evaluate.samples.steps must be integers, got {values!r}") from None
    if not out or any(s <= 0 for s in out):
        raise UserError(f"evaluate.samples.steps must be positive integers, got {values!r}")
    return out


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr (updates at most every 5 s so cluster logs stay short)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 5.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
