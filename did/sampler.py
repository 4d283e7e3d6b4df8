"""The DID insertion sampler (spec §7): grow every sequence from [BOS] by parallel insertions.

At step k (t = t_k -> s = t_{k+1}) every slot i of every sequence independently draws either
VOID or one token v, with P(v) = rho * s[i, v] and P(VOID) = 1 - sum_v P(v) (clamped at 0),
where rho = (t - s) / t is the probability that a token missing at t appears by s (the
log-linear schedule's tweedie = euler rate). The last step uses rho = 1 + 1e-3: insert
everything still predicted, one token per slot at most. All insertions of a step are spliced
in at once. Sequences stay packed (no padding) the whole time.

The sampler only sees a score function `score_fn(tokens [T], lengths [B], sigma [B] | None)
-> log-scores [T, V]`, so it runs the same against a network or a test oracle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from harness.core import sampling, schedule

ScoreFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

LAST_STEP_RATE = 1 + 1e-3
_CHUNK_ELEMENTS = 1 << 24  # float64 probabilities per chunk of slots (128 MiB)


@dataclass
class Sampled:
    """sequences: full token ids per sample (BOS and prompt included). trajectory[k][b]: content
    length (BOS excluded) of sample b after step k."""

    sequences: list[list[int]]
    nfe: int
    trajectory: list[list[int]]
    info: dict = field(default_factory=dict)


SCREEN_TOLERANCE = 1e-3  # relative; float32 logsumexp over a vocabulary is good to ~1e-6


def _draw(log_scores, rho, blocked, forbidden, top_p, gen) -> torch.Tensor:
    """One draw per slot: the inserted token id, or -1 for VOID. log_scores [R, V].

    Two stages, exactly the joint race over (rho*s, VOID = 1 - sum): insert with probability
    min(1, sum), then the token from rho*s / sum, in float64. The insert decision u < min(1, sum)
    is screened with a float32 logsumexp of each slot's scores; only slots whose u lies within a
    relative SCREEN_TOLERANCE of the screened total (float32's error is ~1000x smaller) get their
    float64 total. Float64 probabilities are then built only for inserting slots, as the masked
    models' samplers do for the positions they unmask. Same uniforms, same decisions and the same
    float64 token draws as computing every slot in float64, at a fraction of the cost.
    """
    R, V = log_scores.shape
    out = torch.full((R,), -1, dtype=torch.long, device=log_scores.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(V, 1))

    def probs64(rows: torch.Tensor) -> torch.Tensor:
        probs = rows.to(torch.float64).exp() * rho
        if forbidden is not None:
            probs[:, forbidden] = 0.0
        return probs

    for lo in range(0, R, chunk):
        part = log_scores[lo : lo + chunk]
        screen = part.float()
        if forbidden is not None and bool(torch.isfinite(screen[:, forbidden]).any()):
            screen = screen.index_fill(-1, forbidden, float("-inf"))
        total = (torch.logsumexp(screen, -1).to(torch.float64).exp() * rho).clamp(max=1.0)
        u = torch.rand(total.shape, generator=gen, dtype=torch.float64, device=total.device)
        insert = u < total
        unsure = (u - total).abs() <= SCREEN_TOLERANCE * total
        if bool(unsure.any()):
            insert[unsure] = u[unsure] < probs64(part[unsure]).sum(-1).clamp(max=1.0)
        tok = torch.full_like(insert, -1, dtype=torch.long)
        if insert.any():
            tok[insert] = sampling.sample_categorical(probs64(part[insert]), gen, top_p=top_p)
        out[lo : lo + chunk] = tok
    return out.masked_fill(blocked, -1)


def _enforce_cap(ins: torch.Tensor, row_seq: torch.Tensor, room: torch.Tensor, gen) -> int:
    """Keep at most room[b] insertions of sequence b, chosen uniformly at random (in place)."""
    rows = torch.nonzero(ins >= 0, as_tuple=True)[0]
    if rows.numel() == 0:
        return 0
    seq = row_seq[rows]
    counts = torch.zeros_like(room).index_add(0, seq, torch.ones_like(seq))
    if bool((counts <= room).all()):
        return 0
    prio = torch.rand(rows.shape, generator=gen, dtype=torch.float64, device=rows.device)
    order = torch.argsort(seq.to(torch.float64) + prio)  # grouped by sequence, random within
    seq_sorted = seq[order]
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel(), device=rows.device) - start[seq_sorted]
    drop = rows[order][rank >= room[seq_sorted]]
    ins[drop] = -1
    return int(drop.numel())


def _splice(tokens, lengths, row_seq, ins):
    """Insert ins[k] (>= 0) right after packed row k."""
    has = ins >= 0
    width = 1 + has.long()
    pos = torch.cumsum(width, 0) - width
    new = torch.empty(int(width.sum()), dtype=tokens.dtype, device=tokens.device)
    new[pos] = tokens
    new[pos[has] + 1] = ins[has]
    added = torch.zeros_like(lengths).index_add(0, row_seq, has.long())
    return new, lengths + added, added


def sample(
    score_fn: ScoreFn,
    n: int,
    steps: int,
    *,
    bos: int,
    cap: int,
    time_conditioned: bool,
    cache: bool = False,
    generator: torch.Generator | None = None,
    top_p: float = 1.0,
    prompt: list[int] | None = None,
    grid: str = "uniform",
    forbidden: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> Sampled:
    """Draw n sequences with `steps` insertion steps.

    cap: the longest total length (BOS included); a sequence that reaches it stops growing
    (surplus insertions of a step are dropped at random). time_conditioned: pass
    sigma_bar(t_k) to score_fn, otherwise None. cache: reuse the scores of sequences that did
    not change (valid only without time input). prompt: content ids kept at the start; slots
    inside the prompt are blocked. forbidden: token ids never inserted.

    Longer than most functions on purpose: it is the sampling loop of the spec's algorithm
    (grid, scores, per-slot draws, splicing, the cap) in one place, to be read against the spec
    line by line; its pieces (`_draw`, `_splice`) are functions of their own.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if cache and time_conditioned:
        raise ValueError("score caching needs a time-independent score function")
    device = torch.device(device)
    gen = sampling.generator_on(device, generator)
    prompt = list(prompt or [])
    start = torch.tensor([bos] + prompt, dtype=torch.long, device=device)
    if len(start) > cap:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the length cap {cap}")
    tokens = start.repeat(n)
    lengths = torch.full((n,), len(start), dtype=torch.long, device=device)
    forbid = torch.tensor(sorted(set(forbidden or [])), dtype=torch.long, device=device) if forbidden else None
    times = schedule.time_grid(steps, grid)

    stored: list[torch.Tensor | None] = [None] * n
    changed = torch.ones(n, dtype=torch.bool, device=device)
    nfe, seq_evals, dropped = 0, 0, 0
    trajectory: list[list[int]] = []
    for k in range(steps):
        t, s = times[k], times[k + 1]
        rho = LAST_STEP_RATE if k == steps - 1 else float(schedule.update_rate(t, s))
        row_seq = torch.repeat_interleave(torch.arange(n, device=device), lengths)
        active = lengths < cap
        need = active & changed if cache else active
        scores = None
        if bool(need.any()):
            sel = need[row_seq]
            sub_lengths = lengths[need]
            sigma = None
            if time_conditioned:
                sigma = schedule.sigma_bar(t).to(device=device, dtype=torch.float32).expand(len(sub_lengths))
            scores = score_fn(tokens[sel], sub_lengths, sigma)
            for b, part in zip(torch.nonzero(need, as_tuple=True)[0].tolist(), scores.split(sub_lengths.tolist())):
                stored[b] = part
            nfe += 1
            seq_evals += int(need.sum())
        ins = torch.full_like(tokens, -1)
        act_rows = active[row_seq]
        if bool(act_rows.any()):
            if scores is not None and bool(torch.equal(need, active)):  # all scored just now, in order
                log_scores = scores
            else:
                log_scores = torch.cat([stored[b] for b in torch.nonzero(active, as_tuple=True)[0].tolist()])
            pos_in_seq = torch.arange(len(tokens), device=device) - (torch.cumsum(lengths, 0) - lengths)[row_seq]
            blocked = pos_in_seq[act_rows] < len(prompt)  # slot i < prompt_len - 1 (prompt_len counts BOS)
            ins[act_rows] = _draw(log_scores, rho, blocked, forbid, top_p, gen)
        dropped += _enforce_cap(ins, row_seq, (cap - lengths).clamp_min(0), gen)
        tokens, lengths, added = _splice(tokens, lengths, row_seq, ins)
        changed = added > 0
        if not cache:
            stored = [None] * n  # time moves on: old scores are stale
        trajectory.append((lengths - 1).tolist())

    sequences = [seq.tolist() for seq in tokens.split(lengths.tolist())]
    info = {
        "sequence_evaluations": seq_evals,
        "steps": steps,
        "grid": grid,
        "top_p": top_p,
        "cap": cap,
        "reached_cap": int((lengths >= cap).sum()),
        "insertions_dropped_by_cap": dropped,
        "prompt_len": len(prompt),
        "cached": cache,
    }
    return Sampled(sequences=sequences, nfe=nfe, trajectory=trajectory, info=info)
