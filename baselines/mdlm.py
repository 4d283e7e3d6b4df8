"""MDLM (Sahoo et al. 2024) on the shared backbone (baselines spec section 1).

Choices (spec options):
* SUBS parameterisation: impossible ids (MASK, BOS; PAD in the fixed layout) get logit -1e6
  before a float32 log-softmax; unmasked positions are carried over, so only masked positions
  enter the loss and the head runs only there (`baselines.masked.subs_log_probs` is the full form).
* No time conditioning (spec 1.e default), so the caching sampler is exact.
* Loss: continuous-time NELBO (T = 0), weight -alpha'/(1-alpha) = 1/t for the log-linear schedule,
  t in [t_min, 1] with t_min = 1e-3, mask probability (1 - eps) t.
* t sampler: MDLM's antithetic one, one t per stratum of the micro-batch
  (`harness.core.schedule.stratified_t`, strata in random order).
* Batch loss: sum of per-sequence NELBO / sum of N(x) (harness.core.batch.predicted_tokens).
* Sampler `ddpm_cache` (spec 1.h): K ancestral steps on a uniform grid 1 -> 1e-5, each MASK
  unmasks with probability (t - s)/t, then a final noise-removal step for the MASKs left
  (probability about 1e-5 each). Default `noise_removal: sample` (DUO: one more ancestral step
  with alpha_s = 1, so the output is a proper sample); `argmax` gives MDLM's original choice.
"""
from __future__ import annotations

import torch

from harness.core.batch import Batch, Vocab
from harness.core.methods import UserError, register
from harness.core.schedule import T_MIN, alpha, stratified_t, time_grid, update_rate
from baselines.masked import MaskedDiffusion, bernoulli_mask, continuous_nelbo


@register("mdlm")
class MDLM(MaskedDiffusion):
    """Masked diffusion LM with SUBS and the continuous-time NELBO.

    Options: `dropout` (0.0), `backbone` (backbone_config overrides), `t_min` (1e-3),
    `noise_removal` ('sample' | 'argmax'), `grid` ('uniform' | 'cosine').
    """

    display_order, palette_slot, paper_label = 2, 1, "MDLM"
    OPTIONS = {**MaskedDiffusion.OPTIONS, "t_min": T_MIN, "noise_removal": "sample", "grid": "uniform"}

    def __init__(self, vocab: Vocab, size: str, layout: str, max_len: int, **options):
        super().__init__(vocab, size, layout, max_len, **options)
        self.t_min = float(self.opts["t_min"])
        if not 0.0 <= self.t_min < 1.0:
            raise UserError("mdlm option t_min must be in [0, 1)")
        if self.opts["noise_removal"] not in ("sample", "argmax"):
            raise UserError("mdlm option noise_removal must be 'sample' or 'argmax'")
        if self.opts["grid"] not in ("uniform", "cosine"):
            raise UserError("mdlm option grid must be 'uniform' or 'cosine'")

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        canvas, predictable = self.canvas(batch)
        t = stratified_t(canvas.shape[0], device=canvas.device, t_min=self.t_min)
        masked = bernoulli_mask(predictable, 1 - alpha(t))
        per_seq = continuous_nelbo(self.masked_nll(canvas, masked), t)
        loss = self.per_token(per_seq, batch)
        stats = {"nelbo": float(loss.detach()), "mask_frac": float(masked.sum() / predictable.sum().clamp_min(1)),
                 "nats_per_token": float(loss.detach())}  # the one-draw NELBO per N(x): comparable across methods
        return loss.float(), stats

    def sampling_rates(self, steps: int) -> tuple[list[float], bool]:
        grid = time_grid(steps, self.opts["grid"])
        rates = update_rate(grid[:-1], grid[1:]).tolist() + [1.0]  # + final noise removal
        return rates, self.opts["noise_removal"] == "argmax"

    def sampler_info(self) -> dict:
        return {"sampler": "ddpm_cache", "noise_removal": self.opts["noise_removal"], "grid": self.opts["grid"]}
