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

from typing import Any, Callable

import csv
import json

import io
import os
import signal
import sys
import time

import torch

import torch.distributed as dist
from harness.core.atomic import atomic_write_text
from harness.core.batch import Batch
from harness.core.config import config_hash, run_name, run_settings_hash
from harness.core.errors import SEED_MAX, UserError, check_int
from harness.core.records import provenance
from harness.data.batches import batch_indices
from harness.data.manifest import load_manifest, load_tokenizer
from harness.data.storage import load_split
from harness.run.flops import estimate_flops_per_step, matched_steps
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


class _Distributed:
    """DDP context from torchrun's environment (RANK/WORLD_SIZE/LOCAL_RANK); trivial otherwise."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce gradients (mean over ranks) through one flat buffer.

        Done by hand instead of wrapping in DistributedDataParallel because methods train
        through `loss()`, not `forward()`; unused parameters simply contribute zeros.
        """
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class _SignalFlag:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (tests)
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
    holder: dict = {}
    try:
        summary = _train(config, method_name, layout, seed, data_dir, out_dir, steps, progress, stop_after, holder,
                         reporter)
    except BaseException as err:
        if holder.get("live") is not None:
            holder["live"].finish("KILLED" if isinstance(err, (Preempted, KeyboardInterrupt)) else "FAILED")
        raise
    if holder.get("live") is not None:
        holder["live"].finish()
    return summary


def _train(config: dict, method_name: str, layout: str, seed: int, data_dir: str, out_dir: str,
           steps: int | None, progress: bool, stop_after: int | None, holder: dict,
           reporter: Reporter | None = None) -> dict:

    if steps is not None:
        check_int("--steps", steps, 1, MAX_STEPS)
    check_int("--seed", seed, 0, SEED_MAX)
    entry = resolve_run(config, method_name, layout)
    method_name, label = entry["method"], entry["label"]
    settings = settings_for(config, entry, steps)
    ctx = _Distributed()
    device = ctx.device

    manifest = load_manifest(data_dir)
    check_data_fits(config, layout, manifest, data_dir)
    tokenizer = load_tokenizer(data_dir)
    train_data = load_split(data_dir, "train", layout)
    if len(train_data) < settings.batch_size:
        raise UserError(
            f"the train split has {len(train_data)} {layout} sequences, fewer than batch_size={settings.batch_size}"
        )
    if settings.batch_size % (ctx.world * settings.accumulate):
        raise UserError(
            f"train.batch_size={settings.batch_size} must be divisible by world size x accumulate = "
            f"{ctx.world} x {settings.accumulate}"
        )
    if settings.valid_every < 0:
        raise UserError(f"train.valid_every={settings.valid_every} must be >= 0 (0: only the final point)")
    valid_data = load_split(data_dir, "valid", layout) if ctx.main else None

    torch.manual_seed(seed)
    model = build_method(config, method_name, layout, manifest, tokenizer.vocab, settings.dropout,
                         entry["options"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=settings.betas,
        eps=1e-8,
    )
    ema = EMA(model, settings.ema)
    use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
    extra = recipe_extra(config, entry, manifest, tokenizer.vocab, settings, layout)
    matching: dict = {}
    if entry["match"] == "flops" and steps is None:
        settings.steps = 0   # the recipe names the matched runs, not the steps they give
        recipe = recipe_hash(settings, seed, extra)
        settings.steps, matching = matched_steps(config, entry, model, train_data, settings, seed, ctx.world, device,
                                                 manifest, tokenizer.vocab)
        if ctx.main:   # the job log says what the run was matched to
            print(f"{label}: match flops: {settings.steps} steps to reach the {matching['matched_flops']:.4g} estimated "
                  f"training FLOPs of {matching['matched_to']}", flush=True)
    else:
        recipe = recipe_hash(settings, seed, extra)
    total_steps = settings.steps

    info = {
        "run": run_name(label, layout, config.get("size", "tiny"), seed),
        "study": config.get("study"),
        "label": label,
        "method": method_name,
        "layout": layout,
        "size": config.get("size", "tiny"),
        "seed": seed,
        "steps": total_steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "cosine": settings.cosine,
        **matching,
        "max_len": model.max_len,
        "vocab": tokenizer.vocab.to_dict(),
        "options": model.options,
        "params": sum(p.numel() for p in model.parameters()),
        "config_hash": config_hash(config),
        # what the workflow and the study loader compare (a --steps override is part of it)
        "settings_hash": run_settings_hash(config, entry if steps is None else
                                           {**entry, "match": "steps", "train": {**entry["train"], "steps": steps}}),
        "world_size": ctx.world,
        "precision": "bf16" if use_bf16 else "float32",
        "data_hash": manifest.get("config_hash"),
    }
    info["recipe"] = recipe

    state_path = os.path.join(out_dir, STATE_FILE)
    start_step, history, wall_offset = 0, [], 0.0
    clip = Clipping(settings.grad_clip)
    state = load_checkpoint(state_path) if os.path.exists(state_path) else None
    if state is not None and is_stale(state["info"], info):
        if ctx.main:
            print(f"{info['run']}: {state_path} was saved under another training recipe (config edited); "
                  "starting over", file=sys.stderr, flush=True)
        state = None
    if state is not None:
        check_matches(state["info"], info, state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start_step, history, wall_offset = state["step"], state["history"], state["wall_time"]
        clip.load_state_dict(state.get("clipping", {}))
        if ctx.main:  # also with progress=False (the workflow's --quiet): the job log says it resumed
            print(f"{info['run']}: resuming from step {start_step}", flush=True)

    def save_state(step: int, wall: float) -> None:
        if ctx.main:
            atomic_torch_save(
                {
                    "kind": "didbench.state/1",
                    "info": info,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict(),
                    "history": history,
                    "wall_time": wall,
                    "clipping": clip.state_dict(),
                },
                state_path,
            )
            atomic_write_text(os.path.join(out_dir, "history.csv"), history_csv(history))
        ctx.barrier()

    def _nonfinite(what: str, value: torch.Tensor, step: int, batch: Batch, lr: float) -> str:
        """The one-line error of a NaN/inf step: where, on what batch, and what survives."""
        kept = (f"last good checkpoint kept at {state_path} (step {load_checkpoint(state_path)['step']})"
                if os.path.exists(state_path) else "no checkpoint was saved yet")
        return (f"{info['run']}: non-finite {what} ({float(value.detach())}) at step {step}; batch of {batch.size} "
                f"sequences, {batch.clean_tokens()} tokens, lengths {int(batch.lengths.min())}-"
                f"{int(batch.lengths.max())}, lr {lr:.3g}; {kept}")

    flops_per_step = estimate_flops_per_step(model, train_data, settings, seed, ctx.world, device)

    def validate() -> dict:
        """The strict validation columns of a history row (rank 0; the others wait), with its seconds."""
        v0 = time.perf_counter()
        cols = ema_validation(model, ema, valid_data, settings, seed, device) if ctx.main else {}
        ctx.barrier()
        return {**cols, "valid_seconds": round(time.perf_counter() - v0, 3)} if cols else {}


    live = holder["live"] = reporter(config, info, out_dir, start_step) if ctx.main and reporter else None

    bar = None
    if ctx.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=info["run"], unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - wall_offset
    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
    model.train()
    with _SignalFlag() as flag:
        for step in range(start_step, total_steps):
            if stop_after is not None and step - start_step >= stop_after:
                raise Preempted(f"stopped after {stop_after} steps (test hook)")
            torch.manual_seed(step_seed(seed, step, ctx.rank))
            idx = batch_indices(len(train_data), settings.batch_size, seed, step, ctx.rank, ctx.world)
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            micro = [idx[i :: settings.accumulate] for i in range(settings.accumulate)]
            loss_sum, stats_sum, tokens = 0.0, {}, 0
            for part in micro:
                batch = train_data.batch(part).to(device)
                tokens += batch.clean_tokens()
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, stats = model.loss(batch)
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteLoss(_nonfinite("loss", loss, step, batch, lr))
                (loss / settings.accumulate).backward()
                loss_sum += float(loss.detach()) / settings.accumulate
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / settings.accumulate
            ctx.average_gradients(params)
            grad_norm = clip(params)
            if not torch.isfinite(grad_norm):  # a step would poison the weights (and the next checkpoint)
                raise NonFiniteLoss(_nonfinite("gradient norm", grad_norm, step, batch, lr))
            optimizer.step()
            ema.update(model)

            tokens = int(ctx.all_sum(tokens))
            loss_avg = ctx.all_sum(loss_sum) / ctx.world
            window_tokens += tokens
            window_steps += 1
            done = step + 1
            validate_now = done == total_steps or (settings.valid_every > 0 and done % settings.valid_every == 0)
            if done % settings.log_every == 0 or done == total_steps or validate_now:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                elapsed = now - window_start
                row = {
                    "step": done,
                    "loss": round(loss_avg, 6),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 6),  # before clipping (this step's)
                    "clipped_fraction": round(clip.window_fraction(), 6),
                    "tokens": tokens,
                    "tokens_per_s": round(window_tokens / elapsed, 3),
                    "s_per_step": round(elapsed / window_steps, 6),
                    "wall_time": round(now - t0, 3),
                }
                if flops_per_step is not None:
                    row["train_flops"] = float(f"{flops_per_step * done:.9g}")
                row.update({k: round(v, 6) for k, v in stats_sum.items()})
                if validate_now:  # after the timings, and its time is taken off the training clock
                    cols = validate()
                    row.update(cols)
                    t0 += cols.get("valid_seconds", 0.0)
                history.append(row)
                if live is not None:
                    live.log_row(row)
                window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
                clip.new_window()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if done % settings.checkpoint_every == 0 and done < total_steps:
                save_state(done, time.perf_counter() - t0)
            if flag.received:
                save_state(done, time.perf_counter() - t0)
                raise Preempted(f"{info['run']}: received {flag.received} at step {done}; checkpoint saved")
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    save_state(total_steps, wall)

    # final artefacts: EMA weights for evaluation, a quick validation bound, the summary
    summary = dict(info)
    summary.update(provenance(config, info))
    summary.update(
        {
            "final_loss": history[-1]["loss"] if history else None,
            "wall_seconds": round(wall, 3),
            "tokens_per_s": _steady_tokens_per_s(history),
            "flops_per_step": None if flops_per_step is None else float(f"{flops_per_step:.6g}"),
            **clip.summary(history, total_steps),
        }
    )
    if ctx.main:
        model.eval()
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ema.copy_to(model)
        # the last curve point is the final validation (same rows, seed, convention); recomputed
        # only for a state saved at the last step by a version that did not record it
        last = history[-1] if history and history[-1].get("step") == total_steps else {}
        if "valid_nats_per_token" in last:
            n_valid = min(len(valid_data), settings.valid_sequences)
            summary.update(valid_summary(last["valid_nats_per_token"], last.get("valid_stderr"), settings, n_valid))
        else:
            summary.update(validation_bound(model, data_dir, layout, settings, seed, device, valid=valid_data))
        atomic_torch_save(
            {"kind": "didbench.checkpoint/1", "info": info, "model": raw, "ema": model.state_dict(), "config": config},
            os.path.join(out_dir, "checkpoint.pt"),
        )

        atomic_write_text(os.path.join(out_dir, "train.json"), json.dumps(summary, indent=2, default=str))
        import yaml

        atomic_write_text(os.path.join(out_dir, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
        # the run is final: its resumable state (optimizer moments, a second copy of the weights) has
        # served its purpose, and a later re-run of the job is a new training anyway
        for leftover in (state_path, os.path.dirname(state_path)):
            try:
                os.remove(leftover) if leftover == state_path else os.rmdir(leftover)
            except OSError:
                pass
    ctx.close()
    return summary


def _steady_tokens_per_s(history: list[dict]) -> float | None:
    """Median throughput after the first logging window (warm-up excluded)."""
    rates = [r["tokens_per_s"] for r in history[1:]] or [r["tokens_per_s"] for r in history]
    if not rates:
        return None
    rates = sorted(rates)
    return rates[len(rates) // 2]
