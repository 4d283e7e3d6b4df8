"""One training loop for every method.

AdamW with linear warm-up and optional cosine decay, gradient clipping, EMA weights, bf16
autocast on GPU, deterministic seeding, atomic checkpoints with exact resume, and DDP under
`torchrun` (detected from the environment, so the same entry point runs on a laptop, under
torchrun and on a cluster).

Determinism: the batch at step k is a pure function of (seed, k) (harness.data.batch_indices)
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
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from harness import data as data_lib
from harness import methods
from harness.batch import Batch
from harness.atomic import atomic_write, atomic_write_text  # noqa: F401 (re-exported)
from harness.errors import SEED_MAX, check_int
from harness.methods import UserError

MAX_STEPS = 10**9  # the most optimizer steps a run may ask for (the schema's train.steps maximum)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; Snakemake retries the job, which resumes
STATE_FILE = "resume/state.pt"  # the resumable state; not a Snakemake output, so never deleted on failure
HISTORY_FIELDS = ["step", "loss", "lr", "grad_norm", "clipped_fraction", "tokens", "tokens_per_s", "s_per_step",
                  "wall_time"]


class Preempted(Exception):
    """Raised after a checkpoint was saved because the job received SIGTERM/SIGUSR1."""


class NonFiniteLoss(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainSettings:
    """The `train:` section of a study config (defaults live in the config schema)."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    cosine: bool = True
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    ema: float = 0.99
    dropout: float = 0.0
    accumulate: int = 1
    checkpoint_every: int = 100
    log_every: int = 10
    precision: str = "auto"
    valid_mc: int = 4
    valid_sequences: int = 64
    valid_every: int = 50
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: dict) -> "TrainSettings":
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in section.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)


# ------------------------------------------------------------------------------------ helpers


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to lr, then constant or cosine decay to lr * min_lr_ratio."""
    if s.warmup > 0 and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if not s.cosine:
        return s.lr
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919) % (2**62)


class EMA:
    """Exponential moving average of the parameters with the warm-up min(decay, (1+k)/(10+k))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], state["shadow"]

    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a temp file and a rename: a checkpoint on disk is never half-written."""
    atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


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


# ------------------------------------------------------------------------------------ the loop


def _method_options(config: dict, method: str, dropout: float | None, run_options: dict | None = None) -> dict:
    """The method's constructor options: `methods.<method>`, the run's own `options` over them, and
    the dropout unless an option sets it."""
    options = {**((config.get("methods") or {}).get(method, {}) or {}), **(run_options or {})}
    if dropout is not None:
        options.setdefault("dropout", dropout)
    return options


def _max_len(config: dict, layout: str) -> int:
    return int(config["data"]["seq_len"] if layout == "fixed" else config["data"]["max_len"])


def build_method(config: dict, method: str, layout: str, manifest: dict, vocab, dropout: float | None = None,
                 options: dict | None = None):
    """Instantiate the registered method for this run from the study config. `options`: the
    constructor options a checkpoint recorded, or a run's own (over `methods.<method>`)."""
    options = _method_options(config, method, dropout, options)
    return methods.build(method, vocab, config.get("size", "tiny"), layout, _max_len(config, layout), **options)


def resolve_run(config: dict, label: str, layout: str) -> dict:
    """The study's runs entry (harness.config.run_entries) for `label` (a run label or a method
    name) and `layout`; a method the study does not list trains with the study's recipe."""
    from harness.config import run_entry

    entry = run_entry(config, label, layout)
    if entry is None:
        entry = {"label": label, "method": label, "layout": layout, "match": "steps", "seeds": list(config.get("seeds") or [0]),
                 "train": {}, "options": {}}
    return entry


def _settings(config: dict, entry: dict, steps: int | None) -> TrainSettings:
    """The run's TrainSettings: the study's `train`, the run's own keys over it, and `steps`
    (given, else the run's: see harness.config.run_steps; a FLOPs-matched run gets its steps later)."""
    from harness.config import run_steps

    settings = TrainSettings.from_config({**config.get("train", {}), **entry["train"]})
    if steps is not None:
        settings.steps = int(steps)
    elif entry["match"] != "flops":
        settings.steps = run_steps(config, entry)
    return settings


def _recipe_extra(config: dict, entry: dict, manifest: dict, vocab, settings: TrainSettings, layout: str) -> dict:
    """What besides the settings and the seed the weights depend on (see recipe_hash)."""
    from harness.config import match_targets

    extra = {"options": _method_options(config, entry["method"], settings.dropout, entry["options"]),
             "data_hash": manifest.get("config_hash"), "vocab": vocab.to_dict(), "max_len": _max_len(config, layout),
             "method": entry["method"], "layout": layout}
    if entry["match"] == "flops":   # the matched steps follow from the runs it is matched to
        extra["match"] = {"flops": match_targets(config, entry)}
    return extra


def expected_recipe(config: dict, label: str, layout: str, seed: int, manifest: dict, vocab) -> str:
    """The recipe hash `train` records for this run of `config` on this data (see recipe_hash)."""
    entry = resolve_run(config, label, layout)
    settings = _settings(config, entry, None)
    if entry["match"] == "flops":
        settings.steps = 0   # not part of the recipe: it follows from extra["match"] and the data
    return recipe_hash(settings, seed, _recipe_extra(config, entry, manifest, vocab, settings, layout))


def matched_steps(config: dict, entry: dict, model, train_data, settings: TrainSettings, seed: int, world: int,
                  device, manifest: dict, vocab) -> tuple[int, dict]:
    """Steps that give a FLOPs-matched run (match: flops) the training FLOPs of the most expensive
    other run of its layout: ceil(max_target steps x FLOPs/step / own FLOPs/step), every FLOPs/step
    estimated the same way (estimate_flops_per_step: the first batches of the seed) at each run's
    own batch. Returns (steps, {target label, target FLOPs, own FLOPs/step})."""
    from harness.config import match_targets

    targets = match_targets(config, entry)
    if not targets:
        raise UserError(f"{entry['label']} ({entry['layout']}): match flops needs another trained run of its layout")
    own = estimate_flops_per_step(model, train_data, settings, seed, world, device)
    if own is None:
        raise UserError(f"{entry['label']}: method {entry['method']} has no FLOPs estimate (flops_per_token)")
    best, best_flops = None, -1.0
    for t in targets:
        other = build_method(config, t["method"], entry["layout"], manifest, vocab, options=t["options"]).to(device)
        ts = TrainSettings.from_config({**config.get("train", {}), "batch_size": t["batch_size"],
                                        "accumulate": t["accumulate"]})
        per_step = estimate_flops_per_step(other, train_data, ts, seed, world, device)
        if per_step is not None and per_step * t["steps"] > best_flops:
            best, best_flops = t, per_step * t["steps"]
        del other
    if best is None:
        raise UserError(f"{entry['label']}: no run of its layout has a FLOPs estimate to match")
    steps = max(1, math.ceil(best_flops / own - 1e-9))
    return steps, {"match": "flops", "matched_to": best["label"], "matched_flops": float(f"{best_flops:.6g}")}


def check_data_fits(config: dict, layout: str, manifest: dict, data_dir) -> None:
    """One-line UserError when the prepared data is not the data the config's `data` section names:
    cut at another length, or prepared from another corpus, split or tokenizer (the manifest's
    config_hash), so a run is never trained or scored on data its config does not describe."""
    key = "seq_len" if layout == "fixed" else "max_len"
    want, have = config["data"].get(key), manifest.get(key)
    if have is not None and want is not None and int(have) != int(want):
        raise UserError(f"data.{key} is {want} in the config but the data in {data_dir} was prepared with "
                        f"{key}={have}: prepare it again (or fix the config)")
    prepared, wanted = manifest.get("config_hash"), data_lib.config_hash(config["data"])
    if prepared is not None and prepared != wanted:
        differ = sorted(k for k in set(manifest.get("config") or {}) | set(data_lib.hashed_config(config["data"]))
                        if (manifest.get("config") or {}).get(k) != data_lib.hashed_config(config["data"]).get(k))
        raise UserError(f"the data in {data_dir} was prepared from another data config than this study's "
                        f"(differs in data.{', data.'.join(differ) or '?'}): prepare it again from this config, "
                        "or point at the study's own data")


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
) -> dict:
    """Train one (method, layout, seed) run of a study; returns the train.json summary.

    `stop_after` (tests, fault injection) stops the process-local loop after that many steps
    as if killed, leaving only what was checkpointed. With MLFLOW_TRACKING_URI set, the history
    rows also stream to MLflow as they are made (harness.live): the run ends FINISHED, KILLED
    (preempted: a resume reopens it) or FAILED.
    """
    holder: dict = {}
    try:
        summary = _train(config, method_name, layout, seed, data_dir, out_dir, steps, progress, stop_after, holder)
    except BaseException as err:
        if holder.get("live") is not None:
            holder["live"].finish("KILLED" if isinstance(err, (Preempted, KeyboardInterrupt)) else "FAILED")
        raise
    if holder.get("live") is not None:
        holder["live"].finish()
    return summary


def _train(config: dict, method_name: str, layout: str, seed: int, data_dir: str, out_dir: str,
           steps: int | None, progress: bool, stop_after: int | None, holder: dict) -> dict:
    from harness.config import config_hash, run_name, run_settings_hash
    from harness.results import provenance

    if steps is not None:
        check_int("--steps", steps, 1, MAX_STEPS)
    check_int("--seed", seed, 0, SEED_MAX)
    entry = resolve_run(config, method_name, layout)
    method_name, label = entry["method"], entry["label"]
    settings = _settings(config, entry, steps)
    ctx = _Distributed()
    device = ctx.device

    manifest = data_lib.load_manifest(data_dir)
    check_data_fits(config, layout, manifest, data_dir)
    tokenizer = data_lib.load_tokenizer(data_dir)
    train_data = data_lib.load_split(data_dir, "train", layout)
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
    valid_data = data_lib.load_split(data_dir, "valid", layout) if ctx.main else None

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
    extra = _recipe_extra(config, entry, manifest, tokenizer.vocab, settings, layout)
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
    if state is not None and _stale(state["info"], info):
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

    from harness.live import LiveRun

    live = holder["live"] = LiveRun.start(config, info, out_dir, start_step) if ctx.main else None

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
            idx = data_lib.batch_indices(len(train_data), settings.batch_size, seed, step, ctx.rank, ctx.world)
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
            summary.update(_valid_summary(last["valid_nats_per_token"], last.get("valid_stderr"), settings, n_valid))
        else:
            summary.update(validation_bound(model, data_dir, layout, settings, seed, device, valid=valid_data))
        atomic_torch_save(
            {"kind": "didbench.checkpoint/1", "info": info, "model": raw, "ema": model.state_dict(), "config": config},
            os.path.join(out_dir, "checkpoint.pt"),
        )
        import json

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


VALID_SEED_OFFSET = 17  # the validation generator's seed is seed + 17, at every evaluation


@torch.no_grad()
def strict_validation(model, valid, s: TrainSettings, seed: int, device) -> dict:
    """Strict NLL bound of `model` as it is on the first `s.valid_sequences` rows of `valid`.

    The same rows for every method of a layout, `s.valid_mc` draws per sequence and a generator
    seeded afresh with the same seed at every call (common random numbers: two calls differ only
    by the weights). Returns harness.evaluate.ppl.nll_statistics (nats_per_token = sum B / sum N,
    stderr across sequences), or {} without validation rows.
    """
    from harness.batch import predicted_tokens
    from harness.evaluate.ppl import nll_statistics

    if valid is None or len(valid) == 0:
        return {}
    gen = torch.Generator(device=device).manual_seed(int(seed) + VALID_SEED_OFFSET)
    bounds, tokens = [], []
    for batch in data_lib.eval_batches(valid, s.batch_size, s.valid_sequences):
        batch = batch.to(device)
        bounds.append(model.nll_bound(batch, s.valid_mc, gen, convention="strict").detach().to("cpu", torch.float64))
        tokens.append(predicted_tokens(batch).to("cpu"))
    if not bounds or int(torch.cat(tokens).sum()) == 0:
        return {}
    return nll_statistics(torch.cat(bounds).numpy(), torch.cat(tokens).numpy())


def ema_validation(model, ema: EMA, valid, s: TrainSettings, seed: int, device) -> dict:
    """History columns valid_nats_per_token / valid_stderr of the EMA weights, mid-training.

    The EMA weights are swapped in for the evaluation and the raw weights, train mode and the
    global RNG state (CPU and CUDA) restored after it, so training continues exactly as without it.
    """
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        ema.copy_to(model)
        model.eval()
        res = strict_validation(model, valid, s, seed, device)
    finally:
        model.load_state_dict(raw)
        model.train()
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    if not res:
        return {}
    stderr = res.get("stderr")
    return {"valid_nats_per_token": round(res["nats_per_token"], 6),
            "valid_stderr": None if stderr is None else round(stderr, 6)}


def _valid_summary(nats: float, stderr, s: TrainSettings, n_sequences: int) -> dict:
    """train.json's validation keys from one (rounded) strict bound."""
    nats = float(nats)
    return {"valid_nats_per_token": nats, "valid_ppl": round(math.exp(min(nats, 700)), 4),
            "valid_stderr": None if stderr is None or stderr != stderr else float(stderr),
            "valid_mc": s.valid_mc, "valid_sequences": int(n_sequences), "valid_convention": "strict"}


def validation_bound(model, data_dir: str, layout: str, s: TrainSettings, seed: int, device, valid=None) -> dict:
    """train.json's final validation bound of `model` (the caller swaps in the EMA weights).

    The same computation as every point of the validation curve (strict_validation): strict
    bound, same rows, same seed. `valid`: the split if already loaded.
    """
    if valid is None:
        valid = data_lib.load_split(data_dir, "valid", layout)
    res = strict_validation(model, valid, s, seed, device)
    if not res:
        return {}
    stderr = res.get("stderr")
    return _valid_summary(round(res["nats_per_token"], 6), None if stderr is None else round(stderr, 6), s,
                          res["n_sequences"])


def estimate_flops_per_step(model, train_data, s: TrainSettings, seed: int, world: int, device, steps: int = 4):
    """Estimated training FLOPs of one optimizer step: the mean over the run's first `steps` batches
    of sum over its micro-batches (all ranks) of flops_per_token(batch) x clean tokens.

    The batches are a pure function of (seed, step), so a resumed run gets the same number; the
    global RNG state is restored. None if the method has no FLOPs estimate.
    """
    rng = torch.get_rng_state()
    try:
        total = 0.0
        for step in range(steps):
            for rank in range(world):
                idx = data_lib.batch_indices(len(train_data), s.batch_size, seed, step, rank, world)
                for i in range(s.accumulate):
                    batch = train_data.batch(idx[i :: s.accumulate]).to(device)
                    total += float(model.flops_per_token(batch)) * batch.clean_tokens()
        return total / steps
    except NotImplementedError:
        return None
    finally:
        torch.set_rng_state(rng)


#: settings that change what is trained (checkpoint/log cadence and the validation bound do not)
_NOT_RECIPE = ("checkpoint_every", "log_every", "valid_mc", "valid_sequences", "valid_every")


def recipe_hash(settings: TrainSettings, seed: int, extra: dict) -> str:
    """Hash of everything the weights at step k depend on: settings, steps, seed, and `extra`
    (_recipe_extra: method, layout, options, data, vocabulary, length; what a matched run matches).

    A resume state with another recipe is stale (the config was edited after it was saved,
    and Snakemake re-runs the job without deleting resume/); resuming it would mix two
    recipes and label the result with the new one.
    """
    from harness.config import config_hash

    recipe = {k: v for k, v in asdict(settings).items() if k not in _NOT_RECIPE}
    recipe.update(seed=seed, **extra)
    return config_hash(recipe)


def _stale(saved: dict, info: dict) -> bool:
    """Same run (method, layout, size) but another recipe; states without a recipe are trusted."""
    same_run = all(saved.get(k) == info.get(k) for k in ("method", "layout", "size"))
    return same_run and saved.get("recipe", info["recipe"]) != info["recipe"]


def check_matches(got: dict, expect: dict, path: str) -> None:
    """One-line UserError when a checkpoint belongs to another method/layout/size/vocabulary."""
    for key in ("method", "layout", "size", "vocab", "max_len"):
        if got.get(key) != expect.get(key):
            raise UserError(
                f"checkpoint {path} does not match this run: {key} is {got.get(key)!r} there, {expect.get(key)!r} here"
            )


#: what each kind of checkpoint must hold (harness.train writes both; anything else is refused)
CHECKPOINT_KEYS = {
    "didbench.state/1": ("info", "step", "model", "optimizer", "ema", "history", "wall_time"),
    "didbench.checkpoint/1": ("info", "model", "ema", "config"),
}


def load_checkpoint(path: str, expect: dict | None = None) -> dict:
    """Load a state or final checkpoint, with one-line errors for corrupt or mismatched files."""
    import pickle

    try:
        # weights_only: tensors and plain containers/numbers/strings only (all a didbench state
        # holds), so a crafted file cannot run code while it is loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if re.search(r"GLOBAL |Unsupported global|Unsupported class", str(err)):  # code, not damage
            raise UserError(f"checkpoint {path} holds objects other than tensors and plain data; refused "
                            "(loading it could run code): delete it or retrain") from None
        raise UserError(f"checkpoint {path} is corrupted or unreadable ({type(err).__name__}); delete it to start over") from None
    except Exception as err:  # truncated / not a torch file
        raise UserError(f"checkpoint {path} is corrupted or unreadable ({type(err).__name__}); delete it to start over") from None
    required = CHECKPOINT_KEYS.get(state.get("kind") if isinstance(state, dict) else None)
    if required is None or not isinstance(state.get("info"), dict):
        raise UserError(f"{path} is not a didbench checkpoint")
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is malformed: it lacks {', '.join(missing)}; delete it or retrain")
    missing = [k for k in ("run", "method", "layout", "size", "vocab", "max_len") if k not in state["info"]]
    if missing:
        raise UserError(f"checkpoint {path} is malformed: its info lacks {', '.join(missing)}; delete it or retrain")
    if expect is not None:
        check_matches(state["info"], expect, path)
    return state
