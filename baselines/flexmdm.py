"""FlexMDM: any-order flexible-length masked diffusion (Kim et al., ICLR 2026; spec flexmdm.md).

A continuous-time chain over variable-length sequences over V + {M}, run from t = 0 (the state
is [BOS]) to t = 1 (data): masks are inserted into gaps at rate a(t) lambda_j and unmasked at rate
b(t) phi_j(v). Linear schedules alpha(t) = beta(t) = t, so a(t) = b(t) = 1 / (1 - t).

Forward process (spec 1): every content token gets an insertion clock tau ~ alpha^-1(U) and a
reveal clock sigma in [tau, 1]; at time t it is absent (t < tau), masked (tau <= t < sigma) or
revealed. Absent tokens are removed and the batch re-packed, so like DID the network only sees
the present tokens (masks included). BOS is fixed: never absent, never masked.

Network: the shared backbone conditioned on alpha(t) = t, a token head (specials at -inf, so
phi sums to 1 over real tokens) and a gap head: one non-negative count per gap, read at BOS
(the gap after it) and at every present token (the gap after it), softplus x the longest
content length (spec 2.2, 2.3).

Loss (spec 3.1), per sequence at one (t, clocks):
    l = b(t) sum_{masked j} -log phi_j(x_j) + a(t) sum_{gaps j} D(k_j, lambda_j),
    D(k, lam) = lam - k + k log(k / lam).
Its integral over t in [0, 1] is a valid upper bound on -log p(x) of the continuous-time model
(spec 4.1-4.2), estimated by `nll_bound` with t stratified per sequence. It keeps an alignment
slack even for a perfect model (spec 4.4: ln 2 for the single sequence "ab"), which DID's
subsequence-count DP does not have: see `oracle` below and tests/test_flexmdm.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from harness.core.backbone import Backbone, backbone_config
from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.methods import Method, SampleResult, UserError, check_convention, register
from harness.core.sampling import sample_categorical, uniform
from harness.core.schedule import stratified_uniform
from baselines.ar import on_generator_device, suppress
from baselines.ilm import drop_plan

CLOCK_EPS = 1e-6  # insertion clocks are shifted into (eps, 1] so no token is present at t = 0
T_MAX = 1 - 1e-6  # the hazards 1 / (1 - t) blow up at t = 1: t is kept at or below this
D_CLAMP = 1e-6  # lambda is clamped to >= this inside the log of D (spec 7.2, pitfall 7)


# --- pure math -------------------------------------------------------------------------------
def hazard(t: torch.Tensor) -> torch.Tensor:
    """a(t) = b(t) = alpha'(t) / (1 - alpha(t)) = 1 / (1 - t) for the linear schedules."""
    return 1.0 / (1.0 - t)


def bregman(k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """D(k, lam) = lam - k + k log(k / lam), with D(0, lam) = lam (spec 3.1, E6)."""
    lam_safe = lam.clamp_min(D_CLAMP)
    k_log = torch.where(k > 0, k * (torch.log(k.clamp_min(D_CLAMP)) - torch.log(lam_safe)), torch.zeros_like(lam))
    return lam - k + k_log


def marginals(t: float) -> tuple[float, float, float]:
    """(P(absent), P(masked), P(revealed)) of one token at time t, linear/linear (spec 1.2)."""
    import math

    masked = (1 - t) * -math.log1p(-t) if t < 1 else 0.0
    return 1 - t, masked, t - masked


def draw_clocks(shape, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, sigma) [shape] float64: insertion clock tau = eps + (1 - eps) U and the reveal clock
    sigma = beta^-1(beta(tau) + V (1 - beta(tau))) = tau + V (1 - tau) (spec 1.2)."""
    where = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=where).to(device)
    v = torch.rand(shape, generator=generator, dtype=torch.float64, device=where).to(device)
    tau = CLOCK_EPS + (1 - CLOCK_EPS) * u
    return tau, tau + v * (1 - tau)


@dataclass
class Corrupted:
    """x_t of every sequence, packed, with the targets of the loss (spec 1.3, 1.4)."""

    tokens: torch.Tensor  # [T] BOS, then the present tokens, MASK where still masked
    lengths: torch.Tensor  # [B] present tokens per sequence, BOS included
    seq: torch.Tensor  # [T] sequence of each packed row
    masked: torch.Tensor  # [T] bool: this row is a mask (its target is `targets`)
    targets: torch.Tensor  # [T] the clean token of every row (the unmask target at masks)
    gaps: torch.Tensor  # [T] float: absent tokens in the gap after each row (k_j)


def corrupt(x0: torch.Tensor, lengths: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, sigma: torch.Tensor,
            mask_id: int) -> Corrupted:
    """x_t from given clocks: tau, sigma [B, Lmax] (entries of BOS and padding ignored), t [B]."""
    tt = t.to(tau.dtype)[:, None]
    absent = tt < tau
    plan = drop_plan(x0, lengths, absent)  # BOS and padding are never dropped
    pos = torch.arange(x0.shape[1], device=x0.device)
    keep = (pos[None, :] < lengths[:, None]) & ~(absent & (pos[None, :] > 0))
    masked_full = (tt < sigma) & (pos[None, :] > 0)
    masked = masked_full[keep]
    gaps = torch.zeros(len(plan.tokens), dtype=torch.float64, device=x0.device)
    gaps.index_add_(0, plan.target_rows, torch.ones(len(plan.target_rows), dtype=torch.float64, device=x0.device))
    return Corrupted(tokens=torch.where(masked, torch.full_like(plan.tokens, mask_id), plan.tokens),
                     lengths=plan.lengths, seq=plan.seq, masked=masked, targets=plan.tokens, gaps=gaps)


def sequence_loss(log_phi_target: torch.Tensor, lam: torch.Tensor, c: Corrupted, t: torch.Tensor) -> torch.Tensor:
    """l(x; t, clocks) per sequence [B] (spec 3.1) from -log phi at every row's target [T] (only
    masked rows count) and the gap head lambda [T], in the dtype of `lam`."""
    dtype = lam.dtype
    weight = hazard(t.to(dtype))
    nll = torch.where(c.masked, -log_phi_target.to(dtype), torch.zeros_like(lam))
    per_row = nll + bregman(c.gaps.to(dtype), lam)
    out = torch.zeros(len(c.lengths), dtype=dtype, device=lam.device).index_add(0, c.seq, per_row)
    return weight * out


def unmask_probability(t: float, dt: float, kind: str = "exact") -> float:
    """Probability that a mask is revealed in the sampler step [t, t + dt) (spec 5.3, E5).

    exact: the chain's own (beta(t + dt) - beta(t)) / (1 - beta(t)) = mu = dt / (1 - t);
    tau: plain tau-leaping accepts exactly one Poisson event, mu e^-mu.
    """
    import math

    mu = dt / (1.0 - t)
    return min(mu, 1.0) if kind == "exact" else mu * math.exp(-mu)


def insert_masks(rows: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor, mask_id: int,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Place counts[b, j] masks right after position j of each row (spec 5.2).

    rows [B, W] (right-padded), lengths [B], counts [B, W] (0 beyond a row's length) ->
    (new rows [B, W'], new lengths [B]); old tokens keep their order and shift right.
    """
    b, w = rows.shape
    counts = counts * (torch.arange(w, device=rows.device)[None, :] < lengths[:, None])
    new_lengths = lengths + counts.sum(1)
    width = int(new_lengths.max())
    new_pos = torch.arange(w, device=rows.device)[None, :] + torch.cumsum(counts, 1) - counts
    out = torch.full((b, width), mask_id, dtype=rows.dtype, device=rows.device)
    valid = torch.arange(w, device=rows.device)[None, :] < lengths[:, None]
    out[torch.arange(b, device=rows.device)[:, None].expand(b, w)[valid], new_pos[valid]] = rows[valid]
    out[torch.arange(width, device=rows.device)[None, :] >= new_lengths[:, None]] = pad_id
    return out, new_lengths


# --- the method ------------------------------------------------------------------------------
class GapHead(nn.Module):
    """lambda >= 0 per position: LayerNorm -> Linear -> GELU -> Linear -> softplus x scale, in
    float32 (spec 2.2). The time condition reaches it through the backbone's final adaLN."""

    def __init__(self, d_model: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.softplus(self.net(hidden.float()).squeeze(-1)) * self.scale


@register("flexmdm")
class FlexMDM(Method):
    """Time-conditioned backbone + token head + gap-count head; insert-then-unmask sampling.

    Options:
      unmask       'exact' (default: a mask is revealed in step [t, t + dt) with the chain's own
                   probability dt / (1 - t)) | 'tau' (plain tau-leaping: one Poisson event
                   accepted, probability mu e^-mu, the original code's)
      gap_scale    the gap head's softplus multiplier; default the longest content length
                   (max_len - 1), the spec's L_max
      dropout      backbone dropout, 0.0
      sample_batch_size  sequences per sampler call inside sample(), 64
    """

    layouts = ("varlen",)
    display_order = 6   # its colour: the first free palette slot
    time_conditioned = True
    # FlexMDM's code evaluates no likelihood (spec 4.4), so there is no paper convention to copy:
    # both conventions report the strict bound
    paper_equals_strict = True
    OPTIONS = {"unmask": "exact", "gap_scale": None, "dropout": 0.0, "sample_batch_size": 64}

    def __init__(self, vocab: Vocab, size: str, layout: str, max_len: int, **options):
        super().__init__(vocab, size, layout, max_len, **options)
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise UserError(f"unknown option(s) for flexmdm: {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(self.OPTIONS)})")
        opts = {**self.OPTIONS, **options}
        if opts["unmask"] not in ("exact", "tau"):
            raise UserError(f"flexmdm unmask must be 'exact' or 'tau', got {opts['unmask']!r}")
        self.unmask = opts["unmask"]
        scale = float(opts["gap_scale"] if opts["gap_scale"] is not None else max(max_len - 1, 1))
        if not scale > 0:
            raise UserError("flexmdm gap_scale must be > 0")
        self.sample_batch_size = int(opts["sample_batch_size"])
        if self.sample_batch_size < 1:
            raise UserError("flexmdm sample_batch_size must be >= 1")

        cfg = backbone_config(size, time_cond=True, dropout=float(opts["dropout"]), max_len=max_len)
        self.backbone = Backbone(cfg, vocab.size)
        self.token_head = nn.Linear(cfg.d_model, vocab.size)
        self.gap_head = GapHead(cfg.d_model, scale)
        self.suppressed = sorted(set(vocab.specials))  # phi sums to 1 over real tokens (spec 2.1)

    # --- network ---
    def network(self, tokens: torch.Tensor, lengths: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token logits [T, V] float32, specials at -inf; lambda [T] float32) of packed x_t."""
        hidden = self.backbone(tokens, lengths=lengths, sigma=t.float())
        return suppress(self.token_head(hidden).float(), self.suppressed), self.gap_head(hidden)

    def _check(self, batch: Batch) -> None:
        if batch.layout != "varlen":
            raise UserError(f"flexmdm needs the varlen layout, got a {batch.layout!r} batch")
        content = batch.x0[:, 1:][batch.valid_mask()[:, 1:]]
        bad = torch.isin(content, torch.tensor(self.suppressed, device=content.device))
        if bool(bad.any()):
            raise UserError(f"flexmdm data contain special ids {sorted(set(content[bad].tolist()))} inside sequences")

    def _draw(self, batch: Batch, t: torch.Tensor, generator, dtype) -> tuple[torch.Tensor, Corrupted]:
        tau, sigma = draw_clocks(batch.x0.shape, generator, batch.x0.device)
        c = corrupt(batch.x0, batch.lengths, t, tau, sigma, self.vocab.mask)
        logits, lam = self.network(c.tokens, c.lengths, t)
        log_phi = torch.zeros(len(c.tokens), dtype=dtype, device=logits.device)
        rows = c.masked.nonzero().squeeze(-1)
        if len(rows):
            picked = logits[rows]
            log_phi[rows] = (picked.gather(-1, c.targets[rows, None]).squeeze(-1).to(dtype)
                             - torch.logsumexp(picked.to(dtype), -1))
        return sequence_loss(log_phi, lam.to(dtype), c, t), c

    # --- interface ---
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Spec 3.1 at one stratified t per sequence, summed and divided by the predicted tokens."""
        self._check(batch)
        t = (stratified_uniform(batch.size, None) * T_MAX).to(batch.x0.device)
        per_seq, c = self._draw(batch, t, None, torch.float32)
        loss = per_seq.sum() / predicted_tokens(batch).sum()
        stats = {
            "kept_fraction": float(c.lengths.sum()) / float(batch.lengths.sum()),
            "masked_fraction": float(c.masked.float().mean()),
            "loss_per_sequence": float(per_seq.detach().mean()),
            "nats_per_token": float(loss.detach()),
        }
        return loss, stats

    @torch.no_grad()
    def nll_bound(self, batch: Batch, mc: int, generator: torch.Generator | None = None,
                  convention: str = "strict") -> torch.Tensor:
        """(1/mc) sum_r l(x; t_r, clocks_r), t_r stratified per sequence in [0, 1 - 1e-6], float64
        (spec 4.3): unbiased for the integral of spec 4.1 over that range, which bounds -log p(x)
        of the continuous-time model. No prior term (the chain starts at [BOS]) and no
        reconstruction term (every token is revealed at t = 1)."""
        check_convention(convention)
        self._check(batch)
        if mc < 1:
            raise UserError("mc must be >= 1")
        dev = batch.x0.device
        u = torch.stack([stratified_uniform(mc, generator) for _ in range(batch.size)]).to(dev)  # [B, mc]
        total = torch.zeros(batch.size, dtype=torch.float64, device=dev)
        for r in range(mc):
            total += self._draw(batch, u[:, r] * T_MAX, generator, torch.float64)[0]
        return total / mc

    def bound_omits(self, convention: str = "strict") -> str:
        check_convention(convention)
        return ("times t > 1 - 1e-6 (hazard clamp); no prior or reconstruction term exists. Both conventions are "
                "this value: FlexMDM's code evaluates no likelihood, so it has no truncation of its own to copy. "
                "The bound keeps an alignment slack even for a perfect model (spec 4.4)")

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int,
        *,
        generator: torch.Generator | None = None,
        top_p: float = 1.0,
        prompt: list[int] | None = None,
        length: int | None = None,
    ) -> SampleResult:
        """Tau-leaping from [BOS] (+ prompt) at t = 0 to t = 1 in `steps` steps (spec 5.1).

        Each step t_k = k / steps makes one network call on the current sequences, then reveals
        masks (option unmask: 'exact' with probability dt / (1 - t_k), 'tau' with mu e^-mu,
        mu = dt / (1 - t_k)) as tokens drawn from phi (top-p filtered, float64), then inserts
        Poisson(dt lambda_j / (1 - t_k)) masks after every position j of the old sequence (none
        inside the prompt, none in the last step, none in a sequence that would exceed max_len).
        The last step fills every remaining mask with argmax phi. NFE = steps per call. `length`
        is ignored (varlen only).
        """
        if n < 1 or steps < 1:
            raise UserError("flexmdm sample needs n >= 1 and steps >= 1")
        prompt = list(prompt or [])
        if set(prompt) & set(self.suppressed):
            raise UserError(f"flexmdm: the prompt contains special token ids {sorted(set(prompt) & set(self.suppressed))}")
        if len(prompt) + 1 > self.max_len:
            raise UserError(f"flexmdm: the prompt ({len(prompt)} tokens + BOS) is longer than max_len {self.max_len}")
        tokens: list[list[int]] = []
        trajectory: list[list[int]] = []
        counts = {"capped_steps": 0, "greedy_filled": 0, "inserted": 0}
        nfe = 0
        for start in range(0, n, self.sample_batch_size):
            size = min(self.sample_batch_size, n - start)
            out, traj, calls = self._sample_chunk(size, steps, generator, top_p, prompt, counts)
            tokens += out
            trajectory = [a + b for a, b in zip(trajectory, traj)] if trajectory else traj
            nfe += calls
        info = {
            "sampler": "tau-leaping",
            "unmask": self.unmask,
            "top_p": float(top_p),
            "float64": True,
            "steps": int(steps),
            "length_cap": self.max_len,
            "prompt_len": len(prompt),
            "insertions": counts["inserted"],
            "insertion_steps_skipped_at_cap": counts["capped_steps"],
            "greedy_filled_at_end": counts["greedy_filled"],
            "trajectory_unit": "content tokens (masks included, BOS excluded) after each step",
        }
        return SampleResult(tokens=tokens, nfe=nfe, trajectory=trajectory, info=info)

    def _sample_chunk(self, n: int, steps: int, generator, top_p: float, prompt: list[int], counts: dict):
        dev, v = self.device, self.vocab
        start = torch.tensor([v.bos] + prompt, dtype=torch.long, device=dev)
        rows = start[None, :].repeat(n, 1)
        lengths = torch.full((n,), len(start), dtype=torch.long, device=dev)
        fixed = len(start)  # positions 0..fixed-1 are BOS + prompt: never masked, no gap inside
        dt = 1.0 / steps
        trajectory = []
        for k in range(steps):
            t = k * dt
            rate = dt * hazard(torch.tensor(t, dtype=torch.float64)).item()  # mu = dt b(t_k)
            valid = torch.arange(rows.shape[1], device=dev)[None, :] < lengths[:, None]
            logits, lam = self.network(rows[valid], lengths, torch.full((n,), t, device=dev))
            masked = valid & (rows == v.mask)
            last = k == steps - 1
            m_rows = logits[masked[valid]]
            if len(m_rows):
                if last:  # final greedy fill (spec 5.1)
                    new = m_rows.argmax(-1)
                    counts["greedy_filled"] += len(new)
                    reveal = torch.ones(len(new), dtype=torch.bool, device=dev)
                else:
                    probs = torch.softmax(m_rows.double(), -1)
                    new = sample_categorical(on_generator_device(probs, generator), generator, top_p).to(dev)
                    p = unmask_probability(t, dt, self.unmask)
                    reveal = uniform(len(new), generator, dev) < p
                filled = rows[masked]
                rows[masked] = torch.where(reveal, new, filled)
            if not last:
                lam_full = torch.zeros(rows.shape, dtype=torch.float64, device=dev)
                lam_full[valid] = lam.double()
                lam_full[:, : fixed - 1] = 0.0  # no insertion inside the prompt (gap after its last token is free)
                mean = dt * hazard(torch.tensor(t, dtype=torch.float64)).item() * lam_full
                c = torch.poisson(on_generator_device(mean, generator), generator=generator).to(dev).long()
                over = lengths + c.sum(1) > self.max_len
                counts["capped_steps"] += int(over.sum())
                c[over] = 0
                counts["inserted"] += int(c.sum())
                rows, lengths = insert_masks(rows, lengths, c, v.mask, v.pad)
            trajectory.append((lengths - 1).tolist())
        out = [rows[i, 1: int(lengths[i])].tolist() for i in range(n)]
        return out, trajectory, steps

    def flops_per_token(self, batch: Batch) -> float:
        """Training FLOPs per clean token: 3 x forward on the expected present tokens (alpha(t) = t,
        t ~ U[0, 1]: about half the content) with both heads."""
        present = 1 + (batch.lengths.double() - 1) * 0.5
        d = self.backbone.cfg.d_model
        heads = (2.0 * d * self.vocab.size + 2.0 * d * d + 2.0 * d) * float(present.sum())
        return 3.0 * (self.backbone.forward_flops(present.cpu()) + heads) / float(batch.lengths.sum())


# --- the oracle of an enumerable source (spec 4.4: the alignment slack) -------------------------
def _states(n: int):
    """Every per-token state assignment of n tokens: 0 absent, 1 masked, 2 revealed."""
    import itertools

    return itertools.product((0, 1, 2), repeat=n)


def _view(x: tuple, states: tuple) -> tuple[tuple, tuple, tuple]:
    """(y, masked targets, gap counts) of x under per-token states: y holds None for a mask."""
    y, targets, gaps = [], [], [0]
    for token, s in zip(x, states):
        if s == 0:
            gaps[-1] += 1
            continue
        y.append(None if s == 1 else token)
        targets.append(token if s == 1 else None)
        gaps.append(0)
    return tuple(y), tuple(targets), tuple(gaps)


def oracle_posterior(source: dict[tuple, float], t: float) -> dict[tuple, tuple[dict, list]]:
    """The Bayes-optimal heads at time t for a finite `source` {sequence: prob}: for every
    reachable y (a tuple with None at masks), ({mask index j: {token: phi}}, [lambda per gap]):
    phi_j = P(hidden token | y, t), lambda_j = E[k_j | y, t] (spec 6, E6: the heads learn
    posterior means). Exact, by enumerating every sequence and per-token state (3^n each)."""
    import math

    prob = marginals(t)
    post: dict[tuple, list] = {}  # y -> [weight, {j: {token: w}}, [sum_w k_j]]
    for seq, p_seq in source.items():
        for states in _states(len(seq)):
            w = p_seq * math.prod(prob[s] for s in states)
            if w == 0.0:
                continue
            y, targets, gaps = _view(seq, states)
            entry = post.setdefault(y, [0.0, {}, [0.0] * len(gaps)])
            entry[0] += w
            for j, tok in enumerate(targets):
                if tok is not None:
                    entry[1].setdefault(j, {}).setdefault(tok, 0.0)
                    entry[1][j][tok] += w
            for j, k in enumerate(gaps):
                entry[2][j] += w * k
    return {y: ({j: {tok: w / norm for tok, w in d.items()} for j, d in phis.items()}, [k / norm for k in lams])
            for y, (norm, phis, lams) in post.items()}


def oracle_loss(source: dict[tuple, float], x: tuple, t: float) -> float:
    """E_{clocks}[l(x; t)] of the oracle network (`oracle_posterior`), exactly."""
    import math

    prob = marginals(t)
    post = oracle_posterior(source, t)
    total = 0.0
    for states in _states(len(x)):
        w = math.prod(prob[s] for s in states)
        if w == 0.0:
            continue
        y, targets, gaps = _view(x, states)
        phis, lams = post[y]
        unmask = sum(-math.log(phis[j][tok]) for j, tok in enumerate(targets) if tok is not None)
        gap = sum(lam - k + (k * math.log(k / lam) if k > 0 else 0.0) for k, lam in zip(gaps, lams))
        total += w * (unmask + gap) / (1.0 - t)  # the hazard a(t) = b(t)
    return total


def oracle_bound(source: dict[tuple, float], x: tuple) -> float:
    """The integral over t in [0, 1] of `oracle_loss`: the FlexMDM bound of the perfect model.

    -log p(x) of that model is -log source[x]; the difference is the alignment slack (spec 4.4).
    Adaptive quadrature over t (the integrand's -log(1 - t) growth at t -> 1 is integrable).
    """
    from scipy.integrate import quad

    value, _ = quad(lambda t: oracle_loss(source, x, t), 0.0, 1.0, limit=200)
    return value
