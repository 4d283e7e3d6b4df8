"""The two DID methods behind the harness interface (spec §4, §6, §7, §9).

* `did`       (varlen): time-conditioned backbone (adaLN on sigma_bar(t)), csoftmax head, DISE.
* `did-fixed` (fixed) : no time input, seqnorm head (mass L - n per sequence), DICE.

Options (`methods.<name>.options` in the study config):
  loss: "default" (ELBO weight 1/t) | "simple" (weight 1, training only; spec §4.5).
        nll_bound always uses 1/t.
  dp_dtype: "float32" (the paper's) | "float64" for the training DP; the bound always uses float64.
  dropout (float), threshold (sparse target cut, 1e-6), grid ("uniform" | "cosine" sampling
  grid), sample_batch_size (sequences per sampler call inside sample(), default 64).

What the bound omits (spec §12.4), the paper's convention, kept here: the chain is started at
the deterministic state [BOS], but under eps = 1e-3 the forward marginal at t = 1 still holds
a token with probability 1 - (1 - eps)^(m - 1) (0.64 for m = 1024), so the prior term is not
zero (strictly it is unbounded); and times t < 1e-3 are never sampled. `prior_mass(batch)`
reports that probability; `last_bound_stats` carries its mean for the last nll_bound call.
"""
from __future__ import annotations

import time

import torch

from did import counting, loss as losses, process, sampler
from did.heads import CSoftmaxHead, SeqNormHead, prompt_blocked_slots, suppressed_tokens
from harness import schedule
from harness.backbone import Backbone, backbone_config
from harness.batch import Batch, Vocab
from harness.methods import Method, SampleResult, UserError, register

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_OPTIONS = {"loss", "dp_dtype", "dropout", "threshold", "grid", "sample_batch_size"}


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """harness.schedule draws t on the CPU: derive a CPU generator from a device one."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _DIDBase(Method):
    head_cls: type = CSoftmaxHead
    loss_name: str = "dise"

    def __init__(self, vocab: Vocab, size: str, layout: str, max_len: int, **options):
        super().__init__(vocab, size, layout, max_len, **options)
        unknown = set(options) - _OPTIONS
        if unknown:
            raise UserError(f"unknown option(s) for {self.name}: {', '.join(sorted(unknown))} (known: {', '.join(sorted(_OPTIONS))})")
        self.loss_kind = options.get("loss", "default")
        if self.loss_kind not in ("default", "simple"):
            raise UserError(f"{self.name}: option loss must be 'default' or 'simple', got {self.loss_kind!r}")
        dp = options.get("dp_dtype", "float32")
        if dp not in _DTYPES:
            raise UserError(f"{self.name}: option dp_dtype must be float32 or float64, got {dp!r}")
        self.dp_dtype = _DTYPES[dp]
        self.threshold = float(options.get("threshold", 1e-6))
        self.grid = options.get("grid", "uniform")
        if self.grid not in ("uniform", "cosine"):
            raise UserError(f"{self.name}: option grid must be 'uniform' or 'cosine', got {self.grid!r}")
        self.sample_batch_size = int(options.get("sample_batch_size", 64))
        cfg = backbone_config(
            size, time_cond=self.time_conditioned, dropout=float(options.get("dropout", 0.0)), max_len=max_len
        )
        self.backbone = Backbone(cfg, vocab.size)
        self.head = self.head_cls(cfg.d_model, vocab, max_len)
        self.last_bound_stats: dict = {}

    # --- the network ---------------------------------------------------------------------
    def score(self, tokens, lengths, sigma=None, blocked=None, seq_len=None) -> torch.Tensor:
        """Insertion log-scores [T, V] (float32) of packed sequences."""
        h = self.backbone(tokens, lengths=lengths, sigma=sigma if self.time_conditioned else None)
        if seq_len is not None:
            return self.head(h, lengths, blocked, seq_len=seq_len)
        return self.head(h, lengths, blocked)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor | None:
        return schedule.sigma_bar(t).float() if self.time_conditioned else None

    def _per_sequence(self, batch: Batch, t, generator, weight_kind: str, dp_dtype, acc_dtype):
        """One x_t per sequence and its loss [B]; also the DP and forward times."""
        device = batch.x0.device
        t0 = time.perf_counter()
        d = process.delete(batch.x0, batch.lengths, t, generator=generator)
        targets = counting.sparse_insertion_targets(
            batch.x0, d.keep, batch.lengths, self.vocab.size, dp_dtype=dp_dtype, threshold=self.threshold
        )
        _sync(device)
        t1 = time.perf_counter()
        log_s = self.score(d.tokens, d.lengths, self._sigma(d.t))
        weight = schedule.elbo_weight(d.t) if weight_kind == "default" else torch.ones_like(d.t)
        weight = weight.to(acc_dtype) if acc_dtype == torch.float64 else weight.float()
        per_seq = losses.LOSSES[self.loss_name](log_s, targets, d.row_sequence(), weight, acc_dtype=acc_dtype)
        _sync(device)
        t2 = time.perf_counter()
        return per_seq, d, t1 - t0, t2 - t1

    # --- the interface -------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        self._check_layout(batch)
        per_seq, d, dp_s, fwd_s = self._per_sequence(batch, None, None, self.loss_kind, self.dp_dtype, torch.float32)
        stats = {
            "dp_seconds": dp_s,
            "forward_seconds": fwd_s,  # network + loss, forward only
            "kept_fraction": float(d.lengths.sum()) / float(batch.lengths.sum()),  # network tokens / clean tokens
            "loss_per_sequence": float(per_seq.detach().mean()),
        }
        return per_seq.mean(), stats

    @torch.no_grad()
    def nll_bound(self, batch: Batch, mc: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(1/K) sum_k DISE/DICE at K times stratified per sequence, weight 1/t, float64."""
        self._check_layout(batch)
        if mc < 1:
            raise UserError("mc must be >= 1")
        cpu_gen = _cpu_generator(generator)
        B = batch.size
        t = torch.stack([schedule.stratified_t(mc, cpu_gen) for _ in range(B)]).to(batch.x0.device)  # [B, K]
        total = torch.zeros(B, dtype=torch.float64, device=batch.x0.device)
        for k in range(mc):
            per_seq, *_ = self._per_sequence(batch, t[:, k], generator, "default", torch.float64, torch.float64)
            total += per_seq
        prior = self.prior_mass(batch)
        self.last_bound_stats = {
            "mc": mc,
            "omitted": "prior term at t=1 and times t < 1e-3 (paper convention)",
            "mean_p_x1_not_bos": float(prior.mean()),
        }
        return total / mc

    @staticmethod
    def prior_mass(batch: Batch, eps: float = schedule.EPS) -> torch.Tensor:
        """[B] float64: P(x_1 != [BOS]) = 1 - (1 - eps)^(m - 1), the mass the bound ignores."""
        deletable = (batch.lengths - 1).to(torch.float64)
        return 1 - (1 - eps) ** deletable

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
        """Insertion sampling (spec §7). Tokens are everything after BOS (prompt included).

        did-fixed grows towards `length` (default the model length L) and is capped there, so
        a sample has at most L - 1 content tokens, usually exactly that (spec §7.3: it can stop
        a little short). Our fixed rows are [BOS] + L - 1 stream tokens with no closing EOS,
        so unlike the official code no final token is dropped. `did` is capped at max_len.
        """
        cap = self.max_len if length is None else int(length)
        if not 1 <= cap <= self.max_len:
            raise UserError(f"{self.name}: length must be in [1, {self.max_len}] (the model length), got {length}")
        prompt = list(prompt or [])
        if len(prompt) + 1 > cap:
            raise UserError(f"{self.name}: the prompt ({len(prompt)} tokens + BOS) is longer than the length {cap}")
        bad = set(prompt) & set(suppressed_tokens(self.vocab))
        if bad:
            raise UserError(f"{self.name}: the prompt contains special token ids {sorted(bad)}")
        prompt_len = len(prompt) + 1
        fixed = self.layout == "fixed"

        def score_fn(tokens, lengths, sigma):
            blocked = prompt_blocked_slots(lengths, prompt_len) if prompt else None
            return self.score(tokens, lengths, sigma, blocked, seq_len=cap if fixed else None)

        tokens: list[list[int]] = []
        trajectory: list[list[int]] = []
        nfe, evals, reached, dropped = 0, 0, 0, 0
        for start in range(0, n, self.sample_batch_size):
            size = min(self.sample_batch_size, n - start)
            out = sampler.sample(
                score_fn, size, steps, bos=self.vocab.bos, cap=cap, time_conditioned=self.time_conditioned,
                cache=not self.time_conditioned, generator=generator, top_p=top_p, prompt=prompt, grid=self.grid,
                forbidden=suppressed_tokens(self.vocab), device=self.device,
            )
            tokens += [seq[1:] for seq in out.sequences]
            trajectory = [a + b for a, b in zip(trajectory, out.trajectory)] if trajectory else out.trajectory
            nfe += out.nfe
            evals += out.info["sequence_evaluations"]
            reached += out.info["reached_cap"]
            dropped += out.info["insertions_dropped_by_cap"]
        info = {
            "sequence_evaluations": evals,  # sequences scored, summed over calls (caching saves these)
            "reached_length_cap": reached,
            "insertions_dropped_by_cap": dropped,
            "length_cap": cap,
            "grid": self.grid,
            "trajectory_unit": "content tokens (BOS excluded, prompt included) after each step",
            "prompt_len": len(prompt),
        }
        return SampleResult(tokens=tokens, nfe=nfe, trajectory=trajectory, info=info)

    def flops_per_token(self, batch: Batch) -> float:
        """Training FLOPs per clean token: 3 x forward on the expected survivors (about half)."""
        alpha_mean = 1 - (1 - schedule.EPS) * (1 + schedule.T_MIN) / 2  # E[alpha(t)], t ~ U[1e-3, 1]
        survivors = 1 + (batch.lengths.double() - 1) * alpha_mean
        head = 2.0 * self.backbone.cfg.d_model * (self.vocab.size + 1) * float(survivors.sum())
        fwd = self.backbone.forward_flops(survivors.cpu()) + head
        return 3.0 * fwd / float(batch.lengths.sum())

    def _check_layout(self, batch: Batch) -> None:
        if batch.layout != self.layout:
            raise UserError(f"{self.name} expects {self.layout} batches, got {batch.layout}")


@register("did")
class DID(_DIDBase):
    """Variable-length DID: time-conditioned, csoftmax head, DISE."""

    layouts = ("varlen",)
    time_conditioned = True
    head_cls = CSoftmaxHead
    loss_name = "dise"


@register("did-fixed")
class DIDFixed(_DIDBase):
    """Fixed-length DID: no time input, seqnorm head, DICE (= DISE under seqnorm)."""

    layouts = ("fixed",)
    time_conditioned = False
    head_cls = SeqNormHead
    loss_name = "dice"
