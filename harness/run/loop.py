"""One training loop for every method.

AdamW with linear warm-up and optional cosine decay, gradient clipping, EMA weights, bf16
autocast on GPU, deterministic seeding, atomic checkpoints with exact resume, and DDP under
`torchrun` (detected from the environment, so the same entry point runs on a laptop, under
torchrun and on a cluster).

Determinism: the batch at step k is a pure function of (seed, k) (harness.data.batches.batch_indices)
and the method's randomness (t, deletions, masks, dropout) comes from the global RNG reseeded
at every step from (seed, k, rank). Resuming from a checkpoint therefore reproduces an
uninterrupted run exactly on CPU. A resume state saved under another recipe (the config was
edited since) is stale: it is ignored and the run starts over.

Validation curve: every `valid_every` steps and at the last step, the strict NLL bound of the EMA
weights on the first `valid_sequences` valid rows (same rows and seed at every point) goes into
that step's history row; its time is taken off the training clock (wall_time, s_per_step).

Preemption: SIGTERM / SIGUSR1 (SLURM's warning signals) make the loop save a checkpoint at the
next step boundary and exit with EXIT_PREEMPTED, which the workflow retries; the retry resumes.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml

from harness.core.atomic import atomic_write_text
from harness.core.batch import Batch
from harness.core.config import config_hash, run_name, run_settings_hash
from harness.core.errors import SEED_MAX, UserError, check_int
from harness.core.records import provenance
from harness.data.batches import batch_indices
from harness.data.manifest import load_manifest, load_tokenizer
from harness.data.storage import load_split
from harness.run.flops import estimate_flops_per_step, matched_steps
from harness.run.process import Distributed, SignalFlag
from harness.run.recipe import (EMA, MAX_STEPS, atomic_torch_save, build_method, check_data_fits, check_matches,
                                is_stale, load_checkpoint, lr_at, recipe_extra, recipe_hash, resolve_run,
                                settings_for, step_seed)
from harness.run.validation import ema_validation, valid_summary, validation_bound

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; Snakemake retries the job, which resumes


STATE_FILE = "resume/state.pt"  # the resumable state; not a Snakemake output, so never deleted on failure


HISTORY_FIELDS = ["step", "loss", "lr", "grad_norm", "clipped_fraction", "tokens", "tokens_per_s", "s_per_step",
                  "wall_time"]


#: `reporter(config, info, out_dir, start_step)` -> an object with `log_row(row)` and
#: `finish(status="FINISHED")`, or None: how a caller watches a training (the CLI: MLflow)
Reporter = Callable[[dict, dict, str, int], Any]


class Preempted(Exception):
    """Raised after a checkpoint was saved because the job received SIGTERM/SIGUSR1."""


class NonFiniteLoss(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def history_csv(rows: list[dict]) -> str:
    fields = list(HISTORY_FIELDS)
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class Clipping:
    """Gradient-norm clipping that counts what it does: the fraction of clipped steps per history
    window and over the run (kept in the resume state), so a recipe whose clip reshapes one method's
    updates and not another's shows it (issue 23)."""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.clipped, self.window_clipped, self.window_steps = 0, 0, 0

    def __call__(self, params) -> torch.Tensor:
        """Clip in place; returns the pre-clip total norm."""
        norm = torch.nn.utils.clip_grad_norm_(params, self.threshold if self.threshold > 0 else float("inf"))
        hit = int(self.threshold > 0 and bool(norm > self.threshold))
        self.clipped += hit
        self.window_clipped += hit
        self.window_steps += 1
        return norm

    def window_fraction(self) -> float:
        return self.window_clipped / max(1, self.window_steps)

    def new_window(self) -> None:
        self.window_clipped, self.window_steps = 0, 0

    def state_dict(self) -> dict:
        return {"clipped": self.clipped}

    def load_state_dict(self, state: dict) -> None:
        self.clipped = int(state.get("clipped", 0))

    def summary(self, history: list[dict], steps: int) -> dict:
        """train.json: the fraction of clipped steps and the median logged pre-clip norm."""
        norms = sorted(float(r["grad_norm"]) for r in history if r.get("grad_norm") is not None)
        return {"grad_clip": self.threshold, "clipped_fraction": round(self.clipped / max(1, steps), 6),
                "grad_norm_median": norms[len(norms) // 2] if norms else None}


def train(
    config: dict,
    method_name: str,
    layout: str,
    seed: int,
    data_dir: str,
    out_dir: str,
    steps: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Train one (method, layout, seed) run of a study; returns the train.json summary.

    `stop_after` (tests, fault injection) stops the process-local loop after that many steps
    as if killed, leaving only what was checkpointed. `reporter` (see `Reporter`; the CLI passes
    harness.results.live.LiveRun.start, which streams to MLflow when MLFLOW_TRACKING_URI is set)
    gets every history row as it is made; its run ends FINISHED, KILLED (preempted: a resume
    reopens it) or FAILED. The loop itself never imports a tracking library.
    """
    if steps is not None:
        check_int("--steps", steps, 1, MAX_STEPS)
    check_int("--seed", seed, 0, SEED_MAX)
    run = Training(config, method_name, layout, seed, data_dir, out_dir, steps)
    live = reporter(config, run.info, out_dir, run.start_step) if run.ctx.main and reporter else None
    try:
        summary = _loop(run, progress, stop_after, live)
    except BaseException as err:
        if live is not None:
            live.finish("KILLED" if isinstance(err, (Preempted, KeyboardInterrupt)) else "FAILED")
        raise
    if live is not None:
        live.finish()
    return summary


def _loop(run: "Training", progress: bool, stop_after: int | None, live) -> dict:
    """The training loop: a step, a history row every `log_every` steps (the validation point in
    it when due, its time taken off the training clock), a checkpoint every `checkpoint_every`
    steps and when a warning signal arrives; then the final state and the run's files."""
    s, total = run.settings, run.settings.steps
    bar = None
    if run.ctx.main and progress:
        from tqdm import tqdm   # deferred: only a training with a progress bar needs it

        bar = tqdm(total=total, initial=run.start_step, desc=run.info["run"], unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - run.wall_offset
    window = _Window()
    run.model.train()
    with SignalFlag() as flag:
        for step in range(run.start_step, total):
            if stop_after is not None and step - run.start_step >= stop_after:
                raise Preempted(f"stopped after {stop_after} steps (test hook)")
            out = run.step(step)
            window.tokens += out.tokens
            window.steps += 1
            done = step + 1
            validate_now = done == total or (s.valid_every > 0 and done % s.valid_every == 0)
            if done % s.log_every == 0 or done == total or validate_now:
                row = run.history_row(done, out, window, t0)
                if validate_now:  # after the timings, and its time is taken off the training clock
                    cols = run.validate()
                    row.update(cols)
                    t0 += cols.get("valid_seconds", 0.0)
                run.history.append(row)
                if live is not None:
                    live.log_row(row)
                window = _Window()
                run.clip.new_window()
                if bar is not None:
                    bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if done % s.checkpoint_every == 0 and done < total:
                run.save_state(done, time.perf_counter() - t0)
            if flag.received:
                run.save_state(done, time.perf_counter() - t0)
                raise Preempted(f"{run.info['run']}: received {flag.received} at step {done}; checkpoint saved")
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    run.save_state(total, wall)
    return run.finish(wall)


@dataclass
class _Window:
    """The steps and tokens since the last history row, and when that row was made."""
    tokens: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class StepResult:
    """One optimizer step: the loss (mean over ranks), the method's stats, the clean tokens of
    the global batch, the pre-clip gradient norm and the learning rate."""
    loss: float
    stats: dict
    tokens: int
    grad_norm: torch.Tensor
    lr: float


class Training:
    """One run being trained: its settings, data, model, optimizer, EMA, history and resume state.

    Built in a fixed order (the model is initialised right after seeding with the run's seed,
    before anything else draws), so a run is a pure function of its recipe; `step`, `save_state`
    and `finish` are the pieces the loop calls.
    """

    def __init__(self, config: dict, method_name: str, layout: str, seed: int, data_dir: str, out_dir: str,
                 steps: int | None):
        self.config, self.layout, self.seed, self.data_dir, self.out_dir = config, layout, seed, data_dir, out_dir
        self.entry = resolve_run(config, method_name, layout)
        self.settings = settings_for(config, self.entry, steps)
        self.ctx = Distributed()
        self.device = self.ctx.device
        self._load_data()
        self._build_model()
        recipe, matching = self._recipe(steps)
        self.info = self._info(steps, matching)
        self.info["recipe"] = recipe
        self.state_path = os.path.join(out_dir, STATE_FILE)
        self.clip = Clipping(self.settings.grad_clip)
        self.start_step, self.history, self.wall_offset = self._resume()
        self.flops_per_step = estimate_flops_per_step(self.model, self.train_data, self.settings, seed, self.ctx.world,
                                                      self.device)

    # --- construction ------------------------------------------------------------------------
    def _load_data(self) -> None:
        s, layout, data_dir = self.settings, self.layout, self.data_dir
        self.manifest = load_manifest(data_dir)
        check_data_fits(self.config["data"], layout, self.manifest, data_dir)
        self.tokenizer = load_tokenizer(data_dir)
        self.train_data = load_split(data_dir, "train", layout)
        if len(self.train_data) < s.batch_size:
            raise UserError(
                f"the train split has {len(self.train_data)} {layout} sequences, fewer than batch_size={s.batch_size}"
            )
        if s.batch_size % (self.ctx.world * s.accumulate):
            raise UserError(
                f"train.batch_size={s.batch_size} must be divisible by world size x accumulate = "
                f"{self.ctx.world} x {s.accumulate}"
            )
        if s.valid_every < 0:
            raise UserError(f"train.valid_every={s.valid_every} must be >= 0 (0: only the final point)")
        self.valid_data = load_split(data_dir, "valid", layout) if self.ctx.main else None

    def _build_model(self) -> None:
        """The method (initialised from the run's seed), AdamW (no decay on vectors) and the EMA."""
        s = self.settings
        torch.manual_seed(self.seed)
        self.model = build_method(self.config, self.entry["method"], self.layout, self.manifest, self.tokenizer.vocab,
                                  s.dropout, self.entry["options"]).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=s.lr,
            betas=s.betas,
            eps=1e-8,
        )
        self.ema = EMA(self.model, s.ema)
        self.use_bf16 = s.precision == "bf16" or (s.precision == "auto" and self.device.type == "cuda")

    def _recipe(self, steps: int | None) -> tuple[str, dict]:
        """The recipe hash and, for a FLOPs-matched run, its steps (set on the settings) and what it
        was matched to. The recipe names the matched runs, not the steps they give."""
        s, entry = self.settings, self.entry
        extra = recipe_extra(self.config, entry, self.manifest, self.tokenizer.vocab, s, self.layout)
        if entry["match"] != "flops" or steps is not None:
            return recipe_hash(s, self.seed, extra), {}
        s.steps = 0
        recipe = recipe_hash(s, self.seed, extra)
        s.steps, matching = matched_steps(self.config, entry, self.model, self.train_data, s, self.seed, self.ctx.world,
                                          self.device, self.manifest, self.tokenizer.vocab)
        if self.ctx.main:   # the job log says what the run was matched to
            print(f"{entry['label']}: match flops: {s.steps} steps to reach the {matching['matched_flops']:.4g} "
                  f"estimated training FLOPs of {matching['matched_to']}", flush=True)
        return recipe, matching

    def _info(self, steps: int | None, matching: dict) -> dict:
        """The run's identity and recipe as train.json, the checkpoint and the resume state record it."""
        config, entry, s, size = self.config, self.entry, self.settings, self.config.get("size", "tiny")
        return {
            "run": run_name(entry["label"], self.layout, size, self.seed),
            "study": config.get("study"),
            "label": entry["label"],
            "method": entry["method"],
            "layout": self.layout,
            "size": size,
            "seed": self.seed,
            "steps": s.steps,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "cosine": s.cosine,
            **matching,
            "max_len": self.model.max_len,
            "vocab": self.tokenizer.vocab.to_dict(),
            "options": self.model.options,
            "params": sum(p.numel() for p in self.model.parameters()),
            "config_hash": config_hash(config),
            # what the workflow and the study loader compare (a --steps override is part of it)
            "settings_hash": run_settings_hash(config, entry if steps is None else
                                               {**entry, "match": "steps", "train": {**entry["train"], "steps": steps}}),
            "world_size": self.ctx.world,
            "precision": "bf16" if self.use_bf16 else "float32",
            "data_hash": self.manifest.get("config_hash"),
        }

    def _resume(self) -> tuple[int, list[dict], float]:
        """(start step, history, wall time so far) from the resume state of the same recipe; a state
        saved under another recipe (the config was edited) is ignored and the run starts over."""
        state = load_checkpoint(self.state_path) if os.path.exists(self.state_path) else None
        if state is not None and is_stale(state["info"], self.info):
            if self.ctx.main:
                print(f"{self.info['run']}: {self.state_path} was saved under another training recipe (config edited); "
                      "starting over", file=sys.stderr, flush=True)
            state = None
        if state is None:
            return 0, [], 0.0
        check_matches(state["info"], self.info, self.state_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.clip.load_state_dict(state.get("clipping", {}))
        if self.ctx.main:  # also with progress=False (the workflow's --quiet): the job log says it resumed
            print(f"{self.info['run']}: resuming from step {state['step']}", flush=True)
        return state["step"], state["history"], state["wall_time"]

    # --- the pieces of the loop --------------------------------------------------------------
    def step(self, step: int) -> StepResult:
        """One optimizer step: the batch of (seed, step), `accumulate` micro-batches of loss and
        backward (bf16 autocast as the settings say), gradients averaged over ranks, clipped, AdamW,
        EMA. The global RNG is reseeded from (seed, step, rank) first: a resumed run draws the same."""
        s, ctx = self.settings, self.ctx
        torch.manual_seed(step_seed(self.seed, step, ctx.rank))
        idx = batch_indices(len(self.train_data), s.batch_size, self.seed, step, ctx.rank, ctx.world)
        lr = lr_at(step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, stats_sum, tokens = 0.0, {}, 0
        for part in [idx[i :: s.accumulate] for i in range(s.accumulate)]:
            batch = self.train_data.batch(part).to(self.device)
            tokens += batch.clean_tokens()
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                loss, stats = self.model.loss(batch)
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLoss(self._nonfinite("loss", loss, step, batch, lr))
            (loss / s.accumulate).backward()
            loss_sum += float(loss.detach()) / s.accumulate
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / s.accumulate
        ctx.average_gradients(self.params)
        grad_norm = self.clip(self.params)
        if not torch.isfinite(grad_norm):  # a step would poison the weights (and the next checkpoint)
            raise NonFiniteLoss(self._nonfinite("gradient norm", grad_norm, step, batch, lr))
        self.optimizer.step()
        self.ema.update(self.model)
        return StepResult(loss=ctx.all_sum(loss_sum) / ctx.world, stats=stats_sum, tokens=int(ctx.all_sum(tokens)),
                          grad_norm=grad_norm, lr=lr)

    def _nonfinite(self, what: str, value: torch.Tensor, step: int, batch: Batch, lr: float) -> str:
        """The one-line error of a NaN/inf step: where, on what batch, and what survives."""
        kept = (f"last good checkpoint kept at {self.state_path} (step {load_checkpoint(self.state_path)['step']})"
                if os.path.exists(self.state_path) else "no checkpoint was saved yet")
        return (f"{self.info['run']}: non-finite {what} ({float(value.detach())}) at step {step}; batch of {batch.size} "
                f"sequences, {batch.clean_tokens()} tokens, lengths {int(batch.lengths.min())}-"
                f"{int(batch.lengths.max())}, lr {lr:.3g}; {kept}")

    def history_row(self, done: int, out: StepResult, window: _Window, t0: float) -> dict:
        """The history row after step `done`: this step's loss and stats, the window's throughput."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = now - window.start
        row = {
            "step": done,
            "loss": round(out.loss, 6),
            "lr": out.lr,
            "grad_norm": round(float(out.grad_norm), 6),  # before clipping (this step's)
            "clipped_fraction": round(self.clip.window_fraction(), 6),
            "tokens": out.tokens,
            "tokens_per_s": round(window.tokens / elapsed, 3),
            "s_per_step": round(elapsed / window.steps, 6),
            "wall_time": round(now - t0, 3),
        }
        if self.flops_per_step is not None:
            row["train_flops"] = float(f"{self.flops_per_step * done:.9g}")
        row.update({k: round(v, 6) for k, v in out.stats.items()})
        return row

    def validate(self) -> dict:
        """The strict validation columns of a history row (rank 0; the others wait), with its seconds."""
        v0 = time.perf_counter()
        cols = (ema_validation(self.model, self.ema, self.valid_data, self.settings, self.seed, self.device)
                if self.ctx.main else {})
        self.ctx.barrier()
        return {**cols, "valid_seconds": round(time.perf_counter() - v0, 3)} if cols else {}

    def save_state(self, step: int, wall: float) -> None:
        """The resume state and history.csv, written atomically by rank 0 (the others wait)."""
        if self.ctx.main:
            atomic_torch_save(
                {
                    "kind": "didbench.state/1",
                    "info": self.info,
                    "step": step,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "ema": self.ema.state_dict(),
                    "history": self.history,
                    "wall_time": wall,
                    "clipping": self.clip.state_dict(),
                },
                self.state_path,
            )
            atomic_write_text(os.path.join(self.out_dir, "history.csv"), history_csv(self.history))
        self.ctx.barrier()

    def finish(self, wall: float) -> dict:
        """The run's files: checkpoint.pt (raw and EMA weights), train.json (the summary, with the
        final validation bound), config.yaml; the resume state is removed. Returns the summary."""
        s, total, history = self.settings, self.settings.steps, self.history
        summary = dict(self.info)
        summary.update(provenance(self.config, self.info))
        summary.update(
            {
                "final_loss": history[-1]["loss"] if history else None,
                "wall_seconds": round(wall, 3),
                "tokens_per_s": _steady_tokens_per_s(history),
                "flops_per_step": None if self.flops_per_step is None else float(f"{self.flops_per_step:.6g}"),
                **self.clip.summary(history, total),
                **self.model.runtime_info(),
            }
        )
        if self.ctx.main:
            model = self.model
            model.eval()
            raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.ema.copy_to(model)
            # the last curve point is the final validation (same rows, seed, convention); recomputed
            # only for a state saved at the last step by a version that did not record it
            last = history[-1] if history and history[-1].get("step") == total else {}
            if "valid_nats_per_token" in last:
                n_valid = min(len(self.valid_data), s.valid_sequences)
                summary.update(valid_summary(last["valid_nats_per_token"], last.get("valid_stderr"), s, n_valid))
            else:
                summary.update(validation_bound(model, self.data_dir, self.layout, s, self.seed, self.device,
                                                valid=self.valid_data))
            atomic_torch_save(
                {"kind": "didbench.checkpoint/1", "info": self.info, "model": raw, "ema": model.state_dict(),
                 "config": self.config},
                os.path.join(self.out_dir, "checkpoint.pt"),
            )
            atomic_write_text(os.path.join(self.out_dir, "train.json"), json.dumps(summary, indent=2, default=str))
            atomic_write_text(os.path.join(self.out_dir, "config.yaml"), yaml.safe_dump(self.config, sort_keys=False))
            # the run is final: its resumable state (optimizer moments, a second copy of the weights) has
            # served its purpose, and a later re-run of the job is a new training anyway
            for leftover in (self.state_path, os.path.dirname(self.state_path)):
                try:
                    os.remove(leftover) if leftover == self.state_path else os.rmdir(leftover)
                except OSError:
                    pass
        self.ctx.close()
        return summary


def _steady_tokens_per_s(history: list[dict]) -> float | None:
    """Median throughput after the first logging window (warm-up excluded)."""
    rates = [r["tokens_per_s"] for r in history[1:]] or [r["tokens_per_s"] for r in history]
    if not rates:
        return None
    rates = sorted(rates)
    return rates[len(rates) // 2]
