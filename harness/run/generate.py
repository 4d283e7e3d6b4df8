"""`python -m harness sample --run RUN_DIR`: draw and print samples of one trained run.

    python -m harness sample --run results/default/runs/did-varlen-tiny-s0 --n 4 --steps 64 \
        [--prompt TEXT] [--top-p P] [--seed S] [--length L] [--device cpu|cuda] [--json]

The run is loaded by `harness.run.recipe.load_run` (EMA weights unless --no-ema) with its own
tokenizer (`<run>/../../data`, or --data), and `Method.sample` draws all `n` samples in one
call from a generator seeded with `seed`, so the same seed gives the same samples. Texts are
rendered as `harness.metrics.samples` renders them (`render`: specials dropped, documents split
at EOS; several documents of a fixed-layout sample are joined by " <eos> ").

Output on stdout: per sample a header line `--- sample i/n (k tokens) ---` and its text; with
--json instead one JSON object per line (JSON Lines), one per sample, with the fields of
`row` below (`token_ids` are the content ids, BOS removed, prompt included). One summary line
goes to stderr, so stdout holds the samples only.

A prompt is encoded with the run's tokenizer (content ids, no BOS) and kept at the start of every
sample: DID inserts only after it, MDLM/RADD unmask the canvas after it, AR continues it. ILM
does not support prompts (one `error:` line, exit status 2). `--length` (BOS included) is the
sample length of a fixed-layout run; variable-length runs end where the model stops.
"""
from __future__ import annotations

import json
import sys
import time
from harness.core.errors import SEED_MAX, check_int
from harness.core.methods import UserError, declared
from harness.core.runtime import pick_device
from harness.data.tokenizer import render
from harness.run.recipe import load_run

#: what the prompt does per method (the --help text and the README say the same)
PROMPT_SUPPORT = ("did/did-fixed keep it and insert after it; mdlm/radd unmask the canvas after it; "
                  "ar continues it; ilm does not support prompts")


def encode_prompt(tokenizer, text: str | None) -> list[int] | None:
    """Content ids of `text` (None without a prompt); one-line UserError if it cannot be used."""
    if text is None:
        return None
    try:
        ids = [int(t) for t in tokenizer.encode(text)]
    except Exception as err:  # tokenizers raises plain Exception (e.g. an unknown symbol)
        raise UserError(f"the prompt {text!r} cannot be encoded by the run's tokenizer: {err}") from None
    if not ids:
        raise UserError(f"the prompt {text!r} encodes to no tokens")
    vocab = tokenizer.vocab
    bad = [t for t in ids if not 0 <= t < vocab.size or t in set(vocab.specials)]
    if bad:
        raise UserError(f"the prompt {text!r} encodes to ids the model cannot take: {bad}")
    return ids


def display_text(rendered: dict) -> str:
    """The printed text of a sample: its documents (EOS-separated segments) joined by " <eos> "."""
    segments = rendered["segments"]
    return rendered["text"] if len(segments) <= 1 else " <eos> ".join(segments)


def draw(loaded, *, n: int, steps: int, seed: int = 0, top_p: float = 1.0, prompt: str | None = None,
         length: int | None = None) -> tuple[list[dict], dict]:
    """(one row per sample, a summary) for the loaded run; see the module docstring."""
    import torch


    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    method, tokenizer, info = loaded.method, loaded.tokenizer, loaded.info
    if length is not None and method.layout != "fixed":
        raise UserError(f"--length is for fixed-layout runs; {info.get('run')} is {method.layout} "
                        "(its samples end where the model stops, at most the model length)")
    prompt_ids = encode_prompt(tokenizer, prompt)
    gen = torch.Generator(device=method.device).manual_seed(int(seed))
    t0 = time.perf_counter()
    res = method.sample(n, steps, generator=gen, top_p=top_p, prompt=prompt_ids, length=length)
    seconds = time.perf_counter() - t0
    rows = []
    for i, ids in enumerate(res.tokens):
        ids = [int(t) for t in ids]
        rendered = render(ids, tokenizer)
        rows.append({"run": info.get("run"), "method": info.get("method"), "layout": method.layout, "index": i,
                     "seed": int(seed), "steps": int(steps), "top_p": float(top_p), "prompt": prompt,
                     "prompt_ids": prompt_ids, "token_ids": ids, "text": display_text(rendered),
                     "segments": rendered["segments"], "length": rendered["length"]})
    summary = {"run": info.get("run"), "n": len(rows), "steps": int(steps), "nfe": int(res.nfe),
               "seconds": seconds, "mean_length": sum(r["length"] for r in rows) / max(1, len(rows))}
    return rows, summary


#: bounds of `sample`: more samples or steps than these are a typo, not a study (evaluate.samples has its own)
MAX_SAMPLES = 100_000
MAX_SAMPLE_STEPS = 100_000


def run(args) -> int:
    """The `sample` subcommand (args from `add_arguments`)."""
    import os


    check_int("--n", args.n, 1, MAX_SAMPLES)
    check_int("--steps", args.steps, 1, MAX_SAMPLE_STEPS)
    check_int("--seed", args.seed, 0, SEED_MAX)
    if args.length is not None:
        check_int("--length", args.length, 1, 1 << 20)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not os.path.isdir(args.run):
        raise UserError(f"run directory {args.run} does not exist (a folder holding checkpoint.pt)")
    loaded = load_run(args.run, data_dir=args.data, device=pick_device(args.device), ema=not args.no_ema)
    rows, summary = draw(loaded, n=args.n, steps=args.steps, seed=args.seed, top_p=args.top_p, prompt=args.prompt,
                         length=args.length)
    for r in rows:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"--- sample {r['index'] + 1}/{len(rows)} ({r['length']} tokens) ---")
            print(r["text"])
    sys.stdout.flush()
    print(f"sampled {summary['n']} from {summary['run']}: steps={summary['steps']} nfe={summary['nfe']} "
          f"mean length {summary['mean_length']:.1f} in {summary['seconds']:.2f}s", file=sys.stderr)
    return 0


def add_arguments(p) -> None:
    """The `sample` options on the argparse parser `p`."""
    p.add_argument("--run", required=True, help="a trained run directory (holding checkpoint.pt), e.g. "
                   f"results/default/runs/did-varlen-tiny-s0; any method ({', '.join(declared())}), either layout")
    p.add_argument("--data", default=None, help="the prepared data directory with the run's tokenizer "
                   "(default: <run>/../../data)")
    p.add_argument("--n", type=int, default=4, help="number of samples (default: 4)")
    p.add_argument("--steps", type=int, default=64, help="sampling steps (default: 64; ar and ilm ignore it: "
                   "one token per network call)")
    p.add_argument("--prompt", default=None, help=f"text every sample starts with: {PROMPT_SUPPORT}")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1, no cut)")
    p.add_argument("--seed", type=int, default=0, help="generator seed; the same seed gives the same samples "
                   "(default: 0)")
    p.add_argument("--length", type=int, default=None, help="fixed-layout runs only: sample length with BOS, "
                   "at most the model length (default: the model length)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ... or auto (cuda when visible)")
    p.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of the EMA")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample and line (JSON Lines: "
                   "run, method, layout, index, seed, steps, top_p, prompt, prompt_ids, token_ids, text, segments, "
                   "length) instead of text")
