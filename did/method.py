"""The two DID methods behind the harness interface (spec §4, §6, §7, §9).

* `did`       (varlen): time-conditioned backbone (adaLN on sigma_bar(t)), csoftmax head, DISE.
* `did-fixed` (fixed) : no time input, seqnorm head (mass L - n per sequence), DICE.

Options (`methods.<name>.options` in the study config):
  loss: "default" (ELBO weight 1/t) | "simple" (weight 1, training only; spec §4.5).
        nll_bound always uses 1/t.
  dp_dtype: "float32" (the paper's) | "float64" for the training DP; the bound always uses float64.
  dropout (float), threshold (sparse target cut, 1e-6), grid ("uniform" | "cosine" sampling
  grid), sample_batch_size (sequences per sampler call inside sample(), default 64).
  normalise: "token" (default: the batch's summed loss / its predicted tokens N(x), as every
  method's) | "sequence" (the paper code's mean over sequences: a gradient ~mean(N) times larger,
  which a grad_clip tuned for per-token losses cuts far harder; kept to show what that does).

Two likelihood numbers (`nll_bound(..., convention=)`; derivation in `strict_bound_note`):

* strict: a valid upper bound on -log p(x) of the model the sampler runs, the continuous-time
  insertion process from [BOS] at t = 1 to t = 0 with rates s(x_t, sigma_bar(t)) / t and no
  insertion beyond the length cap. The forward process deletes with probability t (eps = 0),
  so x_1 = [BOS] exactly and the prior term is zero; t covers (1e-6, 1].
* paper: the DID code's evaluation (spec §8.2): deletion probability (1 - 1e-3) t, t in
  [1e-3, 1], DICE for did-fixed, the prior term at t = 1 dropped (spec §12.4: x_1 != [BOS] with
  probability 1 - (1 - eps)^(m - 1), 0.64 for m = 1024). Not guaranteed to be a bound.
"""
from __future__ import annotations

import time

import torch

from harness.core import schedule
from harness.core.backbone import Backbone, backbone_config
from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.methods import Method, SampleResult, UserError, check_convention, register
from harness.core.sampling import bernoulli_at_least_one
from did import counting, loss as losses, process, sampler
from did.heads import CSoftmaxHead, SeqNormHead, prompt_blocked_slots, suppressed_tokens

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

strict_bound_note = """Why the strict DID number is an upper bound (and how it is estimated).

Model. The sampler simulates a continuous-time Markov chain on token sequences from [BOS] at
t = 1 down to t = 0: in state x at time t, action (slot i, token v) fires at rate
R(x, t)[i, v] = s(x, sigma_bar_eps(t))[i, v] / t (the tau-leaping probability Delta t / t per
step), and no action fires once |x| reaches the length cap (the sampler drops insertions
beyond it). The network input sigma_bar_eps(t) = -log(1 - (1 - eps) t) is just the network's
time feature; the model is defined by it whatever the forward process is.

ELBO. For any forward process q that ends at [BOS] at t = 1 and whose reverse conditional rates
given x0 are Rq, the path-space KL gives -log p(x0) <= KL(q(x_1|x0) || delta_BOS)
+ int_0^1 E_{x_t ~ q_t(.|x0)} sum_y [R(y) - Rq(y) log R(y) + Rq(y)(log Rq(y) - 1)] dt.
Take deletion with probability t (eps = 0): q(x_1|x0) = delta_BOS, so the first term is 0, and
Rq(x_t -> y) = (1/t) N(x_t, y) N(y, x0) / N(x_t, x0) (alpha/(1 - alpha) times the deletion rate
1/(1 - t)). Each of the N(x_t, y) actions (i, v) giving y has the same count ratio
r[i, v] = N(y, x0)/N(x_t, x0), so the log t terms cancel and the integrand is the DSE of spec
§4.1 with weight 1/t. Jensen on log sum_{(i,v) -> y} s (spec §4.1) bounds it by DISE:
(1/t) sum_{i,v} [s - r log s + r (log r - 1)], equality when s is proportional to r within every
y (true of the exact scores). With the cap, rows with |x_t| = cap have s = 0 and r = 0 (the
data never exceed the cap), so they contribute 0. did-fixed: DISE of the seqnorm head =
DICE + (1/t) 1e-4 on every row with |x_t| < L (the head's mass is L - n + 1e-4 while
sum r = L - n): the "seqnorm cap term".

Estimate. The integral is taken over [T_FLOOR, 1] = [1e-6, 1] with K times per sequence from
harness.core.schedule.bound_times: stratified, uniform above 1e-3 and log-uniform on
[1e-6, 1e-3] (a quarter of the strata), each draw weighted by dt/du, so the estimate is
unbiased whatever the integrand. Below 1e-3 a well-fitted model predicts about t (m - 1)
insertions, the integrand is bounded and the slice (0, 1e-6) is negligible (< 1e-6 x that
bound). A model that still predicts c > 0 insertions as t -> 0 pays about
c ln(1e-3 / 1e-6) = 6.9 c nats in the slice (and without the clamp the bound would be
infinite: such a model inserts infinitely often near t = 0); `insertion_mass_at_t0` in the
result file reports c.
"""
_OPTIONS = {"loss", "dp_dtype", "dropout", "threshold", "grid", "sample_batch_size", "normalise"}


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """harness.core.schedule draws t on the CPU: derive a CPU generator from a device one."""
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
        self.normalise = options.get("normalise", "token")
        if self.normalise not in ("token", "sequence"):
            raise UserError(f"{self.name}: option normalise must be 'token' or 'sequence', got {self.normalise!r}")
        cfg = backbone_config(
            size, time_cond=self.time_conditioned, dropout=float(options.get("dropout", 0.0)), max_len=max_len
        )
        self.backbone = Backbone(cfg, vocab.size)
        self.head = self.head_cls(cfg.d_model, vocab, max_len)
        self.last_bound_stats: dict = {}
        self.dp_backends: set[str] = set()   # did.dp_kernels backends used (runtime_info)

    # --- the network ---------------------------------------------------------------------
    def score(self, tokens, lengths, sigma=None, blocked=None, seq_len=None) -> torch.Tensor:
        """Insertion log-scores [T, V] (float32) of packed sequences."""
        h = self.backbone(tokens, lengths=lengths, sigma=sigma if self.time_conditioned else None)
        if seq_len is not None:
            return self.head(h, lengths, blocked, seq_len=seq_len)
        return self.head(h, lengths, blocked)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor | None:
        return schedule.sigma_bar(t).float() if self.time_conditioned else None

    def _per_sequence(self, batch: Batch, t, generator, weight_kind: str, dp_dtype, acc_dtype,
                      eps: float = schedule.EPS, loss_name: str | None = None, capped: bool = False):
        """One x_t ~ q_t(. | x0) per sequence and its loss [B]; also the DP and forward times."""
        d = process.delete(batch.x0, batch.lengths, t, generator=generator, eps=eps)
        return self._loss_at(batch, d, weight_kind, dp_dtype, acc_dtype, loss_name, capped)

    def _loss_at(self, batch: Batch, d, weight_kind: str, dp_dtype, acc_dtype, loss_name: str | None = None,
                 capped: bool = False):
        """(loss [B], d, DP seconds, forward seconds) of the given x_t (a process.Deleted).

        `loss_name`: dise | dice (default: the method's own). `capped`: sequences with |x_t|
        at the length cap contribute 0 (the capped model inserts nothing there; strict bound).
        """
        device = batch.x0.device
        t0 = time.perf_counter()
        targets = counting.sparse_insertion_targets(
            batch.x0, d.keep, batch.lengths, self.vocab.size, dp_dtype=dp_dtype, threshold=self.threshold
        )
        self.dp_backends.add(targets.backend)
        _sync(device)
        t1 = time.perf_counter()
        log_s = self.score(d.tokens, d.lengths, self._sigma(d.t))
        weight = schedule.elbo_weight(d.t) if weight_kind == "default" else torch.ones_like(d.t)
        weight = weight.to(acc_dtype) if acc_dtype == torch.float64 else weight.float()
        per_seq = losses.LOSSES[loss_name or self.loss_name](log_s, targets, d.row_sequence(), weight, acc_dtype=acc_dtype)
        if capped:
            per_seq = torch.where(d.lengths >= self.max_len, torch.zeros_like(per_seq), per_seq)
        _sync(device)
        t2 = time.perf_counter()
        return per_seq, d, t1 - t0, t2 - t1

    def _bound_draw(self, batch: Batch, t: torch.Tensor, generator, *, eps: float, loss_name: str, capped: bool):
        """Unbiased estimate [B] of E_{x_t ~ q_t(. | x0)}[loss(x_t, t)] at times t [B] (float64).

        E = P(nothing deleted) loss(x0) + P(>= 1 deleted) E[loss | >= 1 deleted], with the second
        x_t drawn conditioned on a deletion (harness.core.sampling.bernoulli_at_least_one): same
        expectation as one plain draw, without its heavy 1/t tail at small t.
        """
        f64 = torch.float64
        x0, lengths = batch.x0, batch.lengths
        hit, p_any = bernoulli_at_least_one(process.deletable(lengths, x0.shape[1]), (1 - eps) * t, generator)
        valid = batch.valid_mask()
        some, *_ = self._loss_at(batch, process.from_keep(x0, valid & ~hit, t), "default", f64, f64, loss_name, capped)
        # nothing deleted: r = 0, so DICE is 0 and DISE is (1/t) sum s(x0); capped full rows are 0 too
        none = torch.zeros_like(some)
        if loss_name != "dice" and not (capped and bool((lengths >= self.max_len).all())):
            none, *_ = self._loss_at(batch, process.from_keep(x0, valid, t), "default", f64, f64, loss_name, capped)
        return (1 - p_any) * none + p_any * some

    # --- the interface -------------------------------------------------------------------
    def runtime_info(self) -> dict:
        """The DP backend(s) that computed this process's insertion targets (did.dp_kernels:
        they agree to the rounding of a logaddexp, not bitwise)."""
        return {"dp_backend": ", ".join(sorted(self.dp_backends))} if self.dp_backends else {}

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        self._check_layout(batch)
        per_seq, d, dp_s, fwd_s = self._per_sequence(batch, None, None, self.loss_kind, self.dp_dtype, torch.float32)
        stats = {
            "dp_seconds": dp_s,
            "forward_seconds": fwd_s,  # network + loss, forward only
            "kept_fraction": float(d.lengths.sum()) / float(batch.lengths.sum()),  # network tokens / clean tokens
            "loss_per_sequence": float(per_seq.detach().mean()),
        }
        # the objective per predicted token N(x) (sum over the batch / sum N), as every method's: the
        # paper's per-sequence mean has the same direction but a gradient ~mean(N) times larger, which
        # a shared grad_clip would cut ~50-100x for DID only (issue 23)
        per_token = per_seq.sum() / predicted_tokens(batch).sum()
        stats["nats_per_token"] = float(per_token.detach())
        return (per_token if self.normalise == "token" else per_seq.mean()), stats

    @torch.no_grad()
    def nll_bound(self, batch: Batch, mc: int, generator: torch.Generator | None = None,
                  convention: str = "strict") -> torch.Tensor:
        """Per-sequence bound [B], float64, K = `mc` times per sequence (weight 1/t).

        strict (see `strict_bound_note`): DISE of the capped model, deletion probability t,
        (1/K) sum_k DISE(t_k) dt/du_k with t_k from harness.core.schedule.bound_times over [1e-6, 1].
        paper: (1/K) sum_k DISE/DICE(t_k), t_k stratified in [1e-3, 1], deletion (1 - 1e-3) t.
        """
        check_convention(convention)
        self._check_layout(batch)
        if mc < 1:
            raise UserError("mc must be >= 1")
        cpu_gen = _cpu_generator(generator)
        B, dev = batch.size, batch.x0.device
        total = torch.zeros(B, dtype=torch.float64, device=dev)
        stats: dict = {"mc": mc, "convention": convention}
        if convention == "strict":
            t, jac = schedule.bound_times(B, mc, cpu_gen)
            t, jac = t.to(dev), jac.to(dev)
            low = torch.zeros(B, dtype=torch.float64, device=dev)
            for k in range(mc):
                value = self._bound_draw(batch, t[:, k], cpu_gen, eps=0.0, loss_name="dise", capped=True) * jac[:, k]
                total += value
                low += torch.where(t[:, k] < schedule.T_MIN, value, torch.zeros_like(value))
            stats["low_slice_per_sequence"] = (low / mc).tolist()  # part of the bound from t < 1e-3
            stats["insertion_mass_at_t0"] = self.insertion_mass(batch).tolist()
        else:
            t = torch.stack([schedule.stratified_t(mc, cpu_gen) for _ in range(B)]).to(dev)  # [B, K]
            for k in range(mc):
                total += self._bound_draw(batch, t[:, k], cpu_gen, eps=schedule.EPS, loss_name=self.loss_name,
                                          capped=False)
            stats["mean_p_x1_not_bos"] = float(self.prior_mass(batch).mean())
        self.last_bound_stats = stats
        return total / mc

    def bound_omits(self, convention: str = "strict") -> str:
        check_convention(convention)
        if convention == "strict":
            return ("times t < 1e-6 (negligible unless the model still inserts as t -> 0: see "
                    "insertion_mass_at_t0); prior term zero by construction (deletion probability t)")
        return ("times t < 1e-3 and the prior term at t = 1 (x_1 != [BOS] with probability 1 - (1 - 1e-3)^(m - 1)), "
                "as the DID paper's code evaluates" + ("; DICE drops the seqnorm head's 1e-4 mass term"
                                                        if self.loss_name == "dice" else "")
                + "; not guaranteed to be an upper bound")

    @torch.no_grad()
    def insertion_mass(self, batch: Batch, t: float = schedule.T_FLOOR) -> torch.Tensor:
        """[B] total predicted insertions sum_{i,v} s(x0, sigma_bar(t)) on the clean sequences at a
        tiny t: the c of `strict_bound_note` (0 for a model that knows a sequence is complete)."""
        tt = torch.full((batch.size,), float(t), dtype=torch.float64, device=batch.x0.device)
        x = batch.x0[batch.valid_mask()]
        log_s = self.score(x, batch.lengths, self._sigma(tt))
        mass = torch.logsumexp(log_s.double(), dim=-1).exp()
        seq = torch.repeat_interleave(torch.arange(batch.size, device=x.device), batch.lengths)
        out = torch.zeros(batch.size, dtype=torch.float64, device=x.device).index_add(0, seq, mass)
        return torch.where(batch.lengths >= self.max_len, torch.zeros_like(out), out)  # capped: nothing inserted

    @staticmethod
    def prior_mass(batch: Batch, eps: float = schedule.EPS) -> torch.Tensor:
        """[B] float64: P(x_1 != [BOS]) = 1 - (1 - eps)^(m - 1), the mass the paper convention ignores."""
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
    display_order, palette_slot, reference_in, paper_label = 0, 0, ("varlen",), "DID"
    head_cls = CSoftmaxHead
    loss_name = "dise"


@register("did-fixed")
class DIDFixed(_DIDBase):
    """Fixed-length DID: no time input, seqnorm head, DICE (= DISE under seqnorm)."""

    layouts = ("fixed",)
    time_conditioned = False
    display_order, palette_slot, reference_in, paper_label = 1, 9, ("fixed",), "DID"
    head_cls = SeqNormHead
    loss_name = "dice"
