"""Typed settings: one frozen dataclass per section of a study config, built from the validated
config.

The schema (workflow/schemas/config.schema.yaml) documents and validates every key; these
classes are what the code reads (`ev.ppl.mc`, not `config["evaluate"]["ppl"]["mc"]`), so a
function takes the settings of its section instead of the whole config dict. Their fields and
defaults are the schema's: `tests/test_settings.py` checks every class against its section
(`SECTIONS`), so the two cannot drift. Torch-free.

`as_dict()` is what a result file logs as its settings (the same keys and values as the
section of the resolved config).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness.core.errors import UserError


class Section:
    """A config section as a frozen dataclass: `of(config)` reads it (defaults where absent)."""

    #: the section's path in a study config, e.g. ("evaluate", "ppl")
    path: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, given: dict | None):
        """The section from its mapping; keys the class does not know are a UserError (the schema
        reports them first for a validated config)."""
        given = dict(given or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise UserError(f"{'.'.join(cls.path)}: unknown key(s) {', '.join(unknown)} (known: {', '.join(names)})")
        return cls(**given)

    @classmethod
    def of(cls, config: dict | None):
        """This section of a study config (`{}` or a missing section: every default)."""
        node: Any = config or {}
        for key in cls.path:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                node = {}
                break
        if not isinstance(node, dict):
            raise UserError(f"{'.'.join(cls.path)} must be a mapping, got {type(node).__name__}")
        return cls.from_dict(node)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- evaluate.* ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PplSettings(Section):
    path: ClassVar = ("evaluate", "ppl")
    mc: int = 8
    max_sequences: int | None = 128
    batch_size: int = 32
    seed: int = 0
    split: str = "test"


@dataclass(frozen=True)
class SamplesSettings(Section):
    path: ClassVar = ("evaluate", "samples")
    n: int = 16
    steps: list = field(default_factory=lambda: [16, 64])
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    trajectory: bool = True


@dataclass(frozen=True)
class ReferencesSettings(Section):
    path: ClassVar = ("evaluate", "references")
    n: int | None = None
    split: str = "test"
    seed: int = 0


@dataclass(frozen=True)
class GenpplSettings(Section):
    path: ClassVar = ("evaluate", "genppl")
    evaluator: str = "smollm2"
    batch_size: int = 8
    max_tokens: int = 160
    bootstrap: int = 1000
    seed: int = 0
    entropy_prefix: int = 128


@dataclass(frozen=True)
class MauveSettings(Section):
    path: ClassVar = ("evaluate", "mauve")
    max_text_length: int = 128
    human_samples: int = 32
    subsets: int = 1
    min_samples: int = 256
    seed: int = 25
    num_buckets: int | str = "auto"
    pca_max_data: int = -1
    kmeans_explained_var: float = 0.9
    kmeans_num_redo: int = 5
    kmeans_max_iter: int = 500
    divergence_curve_discretization_size: int = 25
    mauve_scaling_factor: float = 5


@dataclass(frozen=True)
class DiversitySettings(Section):
    path: ClassVar = ("evaluate", "diversity")
    self_bleu_samples: int = 128
    bleu_order: int = 4


@dataclass(frozen=True)
class LengthsSettings(Section):
    path: ClassVar = ("evaluate", "lengths")
    bins: int = 32


@dataclass(frozen=True)
class SpeedSettings(Section):
    path: ClassVar = ("evaluate", "speed")
    warmup: int = 1
    repeats: int = 2
    n: int = 4
    skip_rows: int = 1


@dataclass(frozen=True)
class CostSettings(Section):
    path: ClassVar = ("evaluate", "cost")
    n: int = 8
    repeats: int = 3
    warmup: int = 1
    train_repeats: int = 5
    seed: int = 0


@dataclass(frozen=True)
class ZeroshotSettings(Section):
    path: ClassVar = ("evaluate", "zeroshot")
    datasets: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    hub: dict = field(default_factory=dict)
    mc: int = 8
    max_sequences: int | None = 128
    batch_size: int = 32
    seed: int = 0
    required: bool = False


@dataclass(frozen=True)
class EvaluateSettings:
    """The whole `evaluate:` section: which metrics run, and each metric's settings."""

    metrics: list = field(default_factory=lambda: ["ppl", "samples", "genppl", "mauve", "diversity", "lengths", "cost"])
    ppl: PplSettings = field(default_factory=PplSettings)
    samples: SamplesSettings = field(default_factory=SamplesSettings)
    references: ReferencesSettings = field(default_factory=ReferencesSettings)
    genppl: GenpplSettings = field(default_factory=GenpplSettings)
    mauve: MauveSettings = field(default_factory=MauveSettings)
    diversity: DiversitySettings = field(default_factory=DiversitySettings)
    lengths: LengthsSettings = field(default_factory=LengthsSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    cost: CostSettings = field(default_factory=CostSettings)
    zeroshot: ZeroshotSettings = field(default_factory=ZeroshotSettings)

    @classmethod
    def of(cls, config: dict | None) -> "EvaluateSettings":
        ev = (config or {}).get("evaluate") or {}
        metrics = ev.get("metrics")
        parts = {f.name: f.default_factory.of(config) for f in dataclasses.fields(cls) if f.name != "metrics"}
        return cls(**({"metrics": list(metrics)} if metrics is not None else {}), **parts)

    def reference_count(self) -> int:
        """How many held-out texts the reference set needs: references.n, else max(samples.n,
        mauve.human_samples x subsets). samples.n references let genppl give every sample of a
        steps setting its own length-matched reference text; human_samples x subsets fill the
        disjoint MAUVE human subsets."""
        if self.references.n is not None:
            return int(self.references.n)
        return max(int(self.samples.n), int(self.mauve.human_samples) * int(self.mauve.subsets))


# --- train ------------------------------------------------------------------------------------
@dataclass
class TrainSettings(Section):
    """The `train:` section of a study config, with a run's own keys over it (mutable: a run's
    steps are set after matching). `step_multiplier` is the study plan's (harness.core.config
    run_steps), not a run's, so it is not a field. Its fields are part of every run's recipe
    hash (harness.run.recipe.recipe_hash): adding one changes every recipe."""

    path: ClassVar = ("train",)

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
        """The settings from a `train:` mapping; keys that are not fields (step_multiplier) are
        left to the study plan."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in section.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, given: dict | None) -> "TrainSettings":
        return cls.from_config(given or {})


# --- resources, tracking -----------------------------------------------------------------------
@dataclass(frozen=True)
class ResourcesSettings(Section):
    """What the cluster jobs ask for (not part of the study's hash)."""

    path: ClassVar = ("resources",)
    gpus_per_train: int = 1
    nodes_per_train: int = 1
    gpus_per_eval: int = 1


@dataclass(frozen=True)
class TrackingSettings(Section):
    """What goes to MLflow (not part of the study's hash)."""

    path: ClassVar = ("tracking",)
    log_checkpoints: bool = False


#: every typed section and its class (tests/test_settings.py checks each against the schema)
SECTIONS: dict[tuple[str, ...], type[Section]] = {cls.path: cls for cls in (
    PplSettings, SamplesSettings, ReferencesSettings, GenpplSettings, MauveSettings, DiversitySettings,
    LengthsSettings, SpeedSettings, CostSettings, ZeroshotSettings, TrainSettings, ResourcesSettings,
    TrackingSettings)}
