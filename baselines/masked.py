"""Shared machinery of the masked-diffusion baselines MDLM and RADD (baselines spec 0-2, 6).

Both baselines are absorbing (masking) diffusions whose network sees no time input, so they
share everything except the training recipe: the canvas, the masking, the restriction of the
output to real target tokens, the caching ancestral sampler and the NLL bound estimator.

Canvas. Fixed layout: the row itself ([BOS] + L-1 tokens). Varlen layout (spec 1.i / 6.1):
a fixed canvas of N_c = max_len positions, [BOS] + content + PAD..., where PAD is a real
target token and a sample is cut at its first PAD. BOS (position 0) is given: never masked,
never predicted.

Targets. BOS and MASK can never be targets; in the fixed layout PAD cannot either (unless the
tokenizer uses one id for PAD and EOS). Those ids get probability exactly zero, identically in
the loss, the bound and the sampler (`restrict_logits`).

The pure functions at the top work on given logits and masks, so the worked examples of spec
1.j and 2.g can be checked without a network.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from harness.core import sampling
from harness.core.backbone import Backbone, backbone_config
from harness.core.batch import Batch, Vocab, predicted_tokens
from harness.core.methods import Method, SampleResult, UserError, check_convention
from harness.core.sampling import bernoulli_at_least_one, sample_categorical, top_p_filter, uniform
from harness.core.schedule import T_MIN, alpha, elbo_weight, sigma_bar

#: Logit given to impossible tokens (MDLM's SUBS constant). Log-softmax runs in float32, where
#: -1e6 is safe; float16 overflows it to -inf and NaNs follow (mdlm #7), so use -1e3 there.
NEG = -1e6
FP16_SAFE_NEG = -1e3


# --- pure math ------------------------------------------------------------------------------
def forbidden_ids(vocab: Vocab, layout: str) -> list[int]:
    """Ids that are never a target: BOS and MASK; PAD too in the fixed layout (if not EOS)."""
    ids = {vocab.bos, vocab.mask}
    if layout == "fixed" and vocab.pad != vocab.eos:
        ids.add(vocab.pad)
    return sorted(ids)


def restrict_logits(logits: torch.Tensor, forbidden: list[int], neg: float | None = None) -> torch.Tensor:
    """Copy of `logits` with the `forbidden` columns set to a large negative constant.

    float16 input keeps its dtype and uses FP16_SAFE_NEG; every other dtype is computed in
    at least float32 with NEG. Softmax then gives those ids probability 0 (exp underflows).
    """
    if logits.dtype == torch.float16:
        neg = FP16_SAFE_NEG if neg is None else neg
    else:
        logits = logits if logits.dtype == torch.float64 else logits.float()
        neg = NEG if neg is None else neg
    idx = torch.tensor(forbidden, dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, idx, neg)  # out of place: the caller's logits stay untouched


def subs_log_probs(logits: torch.Tensor, z: torch.Tensor, mask_id: int, forbidden: list[int]) -> torch.Tensor:
    """MDLM's SUBS parameterisation (spec 1.b): [..., V] log-probabilities given input z.

    Masked positions: log-softmax with the MASK (and every other impossible) logit at NEG.
    Unmasked positions: carry-over, log p = 0 at the observed token and NEG elsewhere.
    """
    logp = F.log_softmax(restrict_logits(logits, forbidden), dim=-1)
    carry = torch.full_like(logp, NEG).scatter(-1, z[..., None], 0.0)
    return torch.where((z == mask_id)[..., None], logp, carry)


def target_nll(logits: torch.Tensor, targets: torch.Tensor, forbidden: list[int]) -> torch.Tensor:
    """-log c(target) per row ([..., V], [...] -> [...]) with the forbidden ids removed."""
    logp = F.log_softmax(restrict_logits(logits, forbidden), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1)


def masked_nll_sum(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, forbidden: list[int]) -> torch.Tensor:
    """S(x_t) = sum over masked positions of -log c(x0 | x_t), float64 [B].

    logits [B, N, V], x0 and masked [B, N]. Logits at unmasked positions are ignored, which is
    exactly what SUBS carry-over gives (their loss is 0).
    """
    nll = target_nll(logits, x0, forbidden).double()
    return torch.where(masked, nll, torch.zeros_like(nll)).sum(-1)


def continuous_nelbo(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MDLM's continuous-time NELBO term (spec 1.c) = RADD's t-DCE (spec 2.b): w(t) S, w = 1/t.

    t is the diffusion time and the mask probability is 1 - alpha(t) = (1 - eps) t.
    """
    return s.double() * elbo_weight(t.double())


def lambda_dce(s: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """RADD's lambda-DCE (spec 2.b): S / lambda, lambda = mask probability. 0 when nothing is masked."""
    s, lam = s.double(), lam.double()
    return torch.where(s == 0, torch.zeros_like(s), s / lam)


def k_dce(s: torch.Tensor, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """RADD's k-DCE (spec 2.b): (n / k) S with exactly k of n positions masked."""
    return s.double() * n.double() / k.double()


def radd_code_t_dce(s: torch.Tensor, n_masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The value RADD's released `t_DCE_loss` logs (spec 2.b caveat, 2.h). NOT a bound.

    That code scores log c - log(e^sigma_bar - 1) at each masked position, so it adds
    w(t) * n_masked * log(e^sigma_bar - 1) to the t-DCE. The offset does not depend on the
    network (same gradients) but it is negative for t < ~0.5, so the number is not an upper
    bound on -log p. We only log it for comparison with RADD's training curves.
    """
    t = t.double()
    offset = n_masked.double() * torch.log(torch.expm1(sigma_bar(t)))
    return (s.double() + offset) * elbo_weight(t)


# --- canvas and masking -----------------------------------------------------------------------
def build_canvas(batch: Batch, canvas_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas [B, N] long, predictable [B, N] bool) for a batch.

    fixed : the row itself; predictable = real positions after BOS.
    varlen: [BOS] + content + PAD... on `canvas_len` positions; predictable = every position
            after BOS (the PAD block is predicted).
    """
    x0 = batch.x0
    if batch.layout == "fixed":
        canvas = x0
        predictable = batch.valid_mask()
    elif batch.layout == "varlen":
        if int(batch.lengths.max()) > canvas_len:
            raise UserError(f"a sequence of length {int(batch.lengths.max())} does not fit the canvas of {canvas_len}")
        b, lmax = x0.shape
        canvas = torch.full((b, canvas_len), pad, dtype=x0.dtype, device=x0.device)
        keep = min(lmax, canvas_len)
        canvas[:, :keep] = torch.where(batch.valid_mask()[:, :keep], x0[:, :keep], torch.full_like(x0[:, :keep], pad))
        predictable = torch.ones_like(canvas, dtype=torch.bool)
    else:
        raise ValueError(f"unknown layout {batch.layout!r}")
    predictable = predictable.clone()
    predictable[:, 0] = False  # BOS is given
    return canvas, predictable


def bernoulli_mask(predictable: torch.Tensor, rate: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask each predictable position independently with its row's probability rate [B]."""
    u = uniform(predictable.shape, generator, predictable.device)
    return predictable & (u < rate.to(predictable.device, torch.float64)[:, None])


def exact_k_mask(predictable: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask exactly k[b] uniformly chosen predictable positions of each row b."""
    u = uniform(predictable.shape, generator, predictable.device)
    u = torch.where(predictable, u, torch.full_like(u, 2.0))  # non-predictable positions rank last
    rank = u.argsort(dim=1).argsort(dim=1)
    return predictable & (rank < k.to(predictable.device)[:, None])


def stratified_levels(b: int, k: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """[b, k] float64 mask rates lambda_{i,j} = (j + u_{i,j}) / k: stratified per sequence (spec 6.2)."""
    u = uniform((b, k), generator, device)
    return (torch.arange(k, dtype=torch.float64, device=device)[None, :] + u) / k


# --- the shared method ------------------------------------------------------------------------
class MaskedDiffusion(Method):
    """Backbone (no time input) + linear head over the vocabulary on a masked canvas.

    Subclasses implement `loss` and `sampling_rates`. `nll_bound` is shared: it is the exact
    NELBO with alpha(1) = 0 and no eps-truncation (spec 6.2), the same estimator for MDLM and
    RADD because neither network sees the time.

    Bound vs N(x). In the varlen layout the bound is on -log p of the whole canvas (content and
    the PAD block). The canvas is a function of x and a sample is cut at its first PAD, so
    -log p(x) <= -log p(canvas(x)) <= B(x): B(x) is a bound on the text itself. Per-token
    numbers divide B(x) by N(x) = content + 1 (harness.core.batch.predicted_tokens), the same
    denominator as every other method, even though the PAD block spans N_c - 1 - content
    predicted positions.
    """

    dense_canvas = True

    layouts = ("fixed", "varlen")
    time_conditioned = False
    #: option name -> default; subclasses extend. `backbone`: overrides for backbone_config.
    OPTIONS: dict = {"dropout": 0.0, "backbone": None}

    def __init__(self, vocab: Vocab, size: str, layout: str, max_len: int, **options):
        super().__init__(vocab, size, layout, max_len, **options)
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise UserError(
                f"unknown option(s) for {self.name}: {', '.join(sorted(unknown))} (known: {', '.join(self.OPTIONS)})"
            )
        self.opts = {**self.OPTIONS, **options}
        if max_len < 2:
            raise UserError(f"{self.name} needs max_len >= 2 (BOS + at least one position), got {max_len}")
        backbone_overrides = dict(self.opts.get("backbone") or {})

        cfg = backbone_config(
            size, time_cond=False, dropout=float(self.opts["dropout"]), max_len=max_len, **backbone_overrides
        )
        self.backbone = Backbone(cfg, vocab.size)
        self.head = nn.Linear(cfg.d_model, vocab.size)
        nn.init.zeros_(self.head.weight)  # RADD's zero-initialised output layer (spec 2.c)
        nn.init.zeros_(self.head.bias)
        self.forbidden = forbidden_ids(vocab, layout)

    # --- network pieces ---
    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        """Backbone features of a dense masked canvas [B, N] -> [B, N, d]."""
        return self.backbone(z)

    def canvas(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.layout != self.layout:
            raise UserError(f"{self.name} was built for layout {self.layout!r} but got a {batch.layout!r} batch")
        return build_canvas(batch, self.max_len, self.vocab.pad)

    def masked_nll(self, canvas: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """S per sequence (float64 [B], differentiable) with `masked` positions replaced by MASK.

        The head runs only at masked positions: SUBS carry-over makes every other loss 0.
        """
        z = torch.where(masked, torch.full_like(canvas, self.vocab.mask), canvas)
        h = self.hidden(z)[masked]  # [M, d]
        nll = target_nll(self.head(h), canvas[masked], self.forbidden).double()
        rows = masked.nonzero()[:, 0]
        return torch.zeros(canvas.shape[0], dtype=torch.float64, device=canvas.device).index_add(0, rows, nll)

    def per_token(self, per_seq: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Batch loss: sum of per-sequence values / sum of N(x) (token-weighted, spec 0)."""
        return per_seq.sum() / predicted_tokens(batch).to(per_seq.device).sum()

    # --- NLL bound (spec 6.2) ---
    @torch.no_grad()
    def nll_bound(self, batch: Batch, mc: int = 1, generator: torch.Generator | None = None,
                  convention: str = "strict") -> torch.Tensor:
        """Per-sequence bound [B], float64, K = `mc` draws stratified per sequence.

        strict: (1/K) sum_k (1/lambda_k) sum_{l in M_k} -log c(x^l | x with M_k masked), with
        lambda_k = (k + u_k)/K and M_k ~ Bernoulli(lambda_k) over the predictable positions: the
        exact NELBO with alpha(1) = 0 (the chain starts from the all-MASK canvas the sampler
        starts from, so there is no prior term) and no time truncation. Its expectation is the
        average over orders of the any-order AR NLL (spec 2.b), an upper bound on -log p(x).
        Unbiased; drawing the mask conditioned on at least one masked position keeps the lowest
        stratum (weight 1/lambda) from the heavy tail a plain draw has there.

        paper: MDLM/RADD's evaluation, t_k stratified in [1e-3, 1], mask probability
        1 - alpha(t) = (1 - eps) t, weight 1/t: drops t < 1e-3 and the prior term (at t = 1 each
        token is still clean with probability eps). Not guaranteed to be a bound.
        One network call per draw (batch-wide).
        """
        check_convention(convention)
        if mc < 1:
            raise UserError("mc must be >= 1")
        canvas, predictable = self.canvas(batch)
        dev = canvas.device
        total = torch.zeros(canvas.shape[0], dtype=torch.float64, device=dev)
        # each draw masks conditioned on at least one mask, weighted by its probability
        # (harness.core.sampling.bernoulli_at_least_one): nothing masked scores 0, so this is the
        # same expectation as a plain draw without the heavy 1/lambda tail at small lambda
        if convention == "strict":
            lam = stratified_levels(canvas.shape[0], mc, generator, dev)
            for k in range(mc):
                masked, p_any = bernoulli_at_least_one(predictable, lam[:, k], generator)
                total += p_any * lambda_dce(self.masked_nll(canvas, masked), lam[:, k])
        else:
            t = T_MIN + (1 - T_MIN) * stratified_levels(canvas.shape[0], mc, generator, dev)
            for k in range(mc):
                masked, p_any = bernoulli_at_least_one(predictable, 1 - alpha(t[:, k]), generator)
                total += p_any * continuous_nelbo(self.masked_nll(canvas, masked), t[:, k])
        return total / mc

    def bound_omits(self, convention: str = "strict") -> str:
        check_convention(convention)
        if convention == "strict":
            return "nothing: the exact continuous-time NELBO with alpha(1) = 0 (lambda over (0, 1], no prior term)"
        return ("times t < 1e-3 and the prior term at t = 1 (each token stays clean with probability 1e-3), "
                "as MDLM/RADD's code evaluates; not guaranteed to be an upper bound")

    # --- sampling ---
    def sampling_rates(self, steps: int) -> tuple[list[float], bool]:
        """(per-step unmasking probabilities, whether the last step takes the argmax)."""
        raise NotImplementedError

    def sampler_info(self) -> dict:
        return {}

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
        """Ancestral unmasking with caching, probabilities sampled in float64.

        The canvas has `length` positions (BOS included; default max_len). fixed: every sample
        has length-1 content tokens. varlen: the canvas is cut at the first PAD (spec 6.1) and
        what the cut drops is reported per sample (spec 6.6) in `per_sample`:
        "content_after_pad" (bool: some non-PAD token follows the first PAD) and
        "tokens_after_pad" (how many); the fixed layout has no PAD canvas and reports neither.
        `prompt` (content ids) is clamped right after BOS and never masked.
        """
        if n < 1:
            raise UserError("number of samples must be >= 1")
        if steps < 1:
            raise UserError("steps must be >= 1")
        if not 0.0 < top_p <= 1.0:
            raise UserError("top_p must be in (0, 1]")
        total = self.max_len if length is None else int(length)
        if not 2 <= total <= self.max_len:
            raise UserError(f"length must be in [2, {self.max_len}] (BOS included), got {total}")
        prompt = list(prompt or [])
        if len(prompt) > total - 1:
            raise UserError(f"prompt of {len(prompt)} tokens does not fit in length {total}")
        if any(tok in self.forbidden or not 0 <= tok < self.vocab.size for tok in prompt):
            raise UserError("prompt contains an id the model cannot produce (BOS, MASK, PAD or out of range)")
        dev = self.device
        x = torch.full((n, total), self.vocab.mask, dtype=torch.long, device=dev)
        x[:, 0] = self.vocab.bos
        if prompt:
            x[:, 1 : 1 + len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=dev)
        rates, final_argmax = self.sampling_rates(steps)
        x, nfe = ancestral_unmask(
            self.hidden, self.head, x, self.vocab.mask, self.forbidden, rates,
            generator=sampling.generator_on(dev, generator), top_p=top_p, final_argmax=final_argmax,
        )
        rows = x[:, 1:].tolist()
        per_sample: dict[str, list] = {}
        if self.layout == "varlen":
            tokens, after = cut_at_first_pad(rows, self.vocab.pad)
            per_sample = {"content_after_pad": [k > 0 for k in after], "tokens_after_pad": after}
        else:
            tokens = rows
        info = {"steps": int(steps), "top_p": float(top_p), "float64": True, "cache": True, "canvas": total}
        info.update(self.sampler_info())
        return SampleResult(tokens=tokens, nfe=nfe, trajectory=None, info=info, per_sample=per_sample)

    def flops_per_token(self, batch: Batch) -> float:
        """3 x forward FLOPs of the backbone on the canvas + head at the masked positions, per clean token.

        The head runs only at masked positions; their expected share is E[lambda] = 1/2.
        """
        canvas, _ = self.canvas(batch)
        b, n = canvas.shape
        lengths = torch.full((b,), n, dtype=torch.long)
        head = 2 * self.backbone.cfg.d_model * self.vocab.size * (b * n) / 2
        return 3.0 * (float(self.backbone.forward_flops(lengths)) + head) / batch.clean_tokens()


def cut_at_first_pad(rows: list[list[int]], pad: int) -> tuple[list[list[int]], list[int]]:
    """(each row cut before its first PAD, non-PAD tokens each cut dropped) for varlen canvases.

    The second list counts "content after the first PAD" (baselines spec 6.6): the cut keeps
    the text before the first PAD, so anything the sampler put after it is lost and counted.
    """
    tokens, after = [], []
    for row in rows:
        if pad in row:
            at = row.index(pad)
            tokens.append(row[:at])
            after.append(sum(t != pad for t in row[at + 1 :]))
        else:
            tokens.append(list(row))
            after.append(0)
    return tokens, after


def ancestral_unmask(
    hidden_fn,
    head: nn.Module,
    x: torch.Tensor,
    mask_id: int,
    forbidden: list[int],
    rates: list[float],
    *,
    generator: torch.Generator | None = None,
    top_p: float = 1.0,
    final_argmax: bool = False,
) -> tuple[torch.Tensor, int]:
    """Run the reverse masking process on canvases x [n, N]; returns (x, network calls).

    Step i unmasks each MASK position independently with probability rates[i] (>= 1 means all)
    and draws its token from the network's distribution c(. | x) (float64, optional top-p),
    which is the same law as one exponential race over (rate * c, 1 - rate) (spec 1.h, 2.e).
    If `final_argmax`, the last step takes the most likely token instead of sampling.

    Caching (exact because the network has no time input): backbone features are kept per
    sequence and recomputed only for sequences that changed since they were computed, so a
    network call happens only when some sequence that still has MASKs changed. The head is
    applied only at the positions being unmasked.
    """
    x = x.clone()
    n = x.shape[0]
    masked = x == mask_id
    cache: torch.Tensor | None = None
    fresh = torch.zeros(n, dtype=torch.bool, device=x.device)
    nfe = 0
    for i, rate in enumerate(rates):
        if not masked.any():
            break
        need = masked.any(1) & ~fresh
        if need.any():
            h = hidden_fn(x[need])
            if cache is None:
                cache = h.new_zeros((n, *h.shape[1:]))
            cache[need] = h
            fresh |= need
            nfe += 1
        pick = masked if rate >= 1 else masked & (uniform(masked.shape, generator, x.device) < rate)
        if not pick.any():
            continue
        probs = torch.softmax(restrict_logits(head(cache[pick]), forbidden).double(), dim=-1)
        if final_argmax and i == len(rates) - 1:
            tokens = top_p_filter(probs, top_p).argmax(-1)
        else:
            tokens = sample_categorical(probs, generator, top_p).to(x.device)
        x[pick] = tokens
        masked &= ~pick
        fresh &= ~pick.any(1)
    return x, nfe
