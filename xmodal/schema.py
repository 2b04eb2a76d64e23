"""Config sections shared by every task's recipe schema (see :mod:`xmodal.config`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from xmodal.config import NOT_IDENTITY
from xmodal.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class OptimConfig:
    """Optimiser and per-epoch learning-rate schedule.

    ``step`` multiplies the rate by ``gamma`` at each fraction of the epochs in ``milestones``
    (RepDistiller: x0.1 at 150/180/210 of 240 epochs = 0.625/0.75/0.875).
    """

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.625, 0.75, 0.875])
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={self.name!r}: expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: expected a positive learning rate")

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    def lr_lambda(self, epochs: int) -> Callable[[int], float]:
        """Factor of the base rate for each epoch (applied at the epoch's start)."""
        if self.schedule == "constant":
            return lambda epoch: 1.0
        if self.schedule == "cosine":
            return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
        steps = [round(m * epochs) for m in self.milestones]
        return lambda epoch: self.gamma ** sum(epoch >= s for s in steps)


@dataclass
class TrainConfig:
    """A training stage's schedule."""

    epochs: int = 10
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"epochs={self.epochs}, batch_size={self.batch_size}: expected epochs >= 0, batch_size >= 1")


@dataclass
class DistillSection:
    """How students are distilled, in every task: ``methods`` (registered losses and presets),
    ``weights.<loss>`` (overrides that loss's weight in every method that has it),
    ``loss_options.<loss>`` (its constructor options), ``ce_weight`` (cross-entropy on labels,
    where a task has them), warm banks, and, with several teachers, ``n_teachers`` (the M values),
    ``teacher_weights`` (one per teacher, scaling its own terms) and ``split_crd_weight`` (the M
    critics share the weight, ``w_i / Σ w``, instead of each taking it whole as in the paper)."""

    #: Keys of earlier recipe dialects and the key each is now.
    renamed: ClassVar[dict[str, str]] = {"crd": "distill.loss_options.crd", "kd_T": "distill.loss_options.kd.T"}

    methods: list[str] = field(default_factory=lambda: ["random", "kd", "crd"])
    train: TrainConfig = field(default_factory=TrainConfig)
    init_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5))
    weights: dict[str, Any] = field(default_factory=dict)
    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    ce_weight: float = 0.0
    warm_start: bool = False
    n_teachers: Optional[list[int]] = None
    teacher_weights: Optional[list[float]] = None
    split_crd_weight: bool = False
    # Memory-bank losses take K = min(K, N - 1) instead of refusing a K the set cannot supply
    # (18 NYU frames cannot give the paper's 16384); the report gives the K in force.
    cap_negatives: bool = False

    def __post_init__(self) -> None:
        for name, weight in self.weights.items():
            if isinstance(weight, dict):  # the former per-method dialect: {method: {loss: weight}}
                raise ConfigError(f"distill.weights.{name}: weights are per loss, for every method that has it: "
                                  f"distill.weights.<loss>=<weight> (e.g. distill.weights.crd=0.5)")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"distill.weights.{name} must be a number, got {weight!r}")
            if not math.isfinite(weight):
                raise ConfigError(f"distill.weights.{name} must be a finite number, got {weight!r}")
        self.weights = {name: float(weight) for name, weight in self.weights.items()}
        counts = self.n_teachers
        if counts is not None and (not counts or min(counts) < 1 or len(set(counts)) != len(counts)):
            raise ConfigError(f"distill.n_teachers={counts}: expected distinct teacher counts >= 1")
        if self.ce_weight < 0:
            raise ConfigError(f"distill.ce_weight={self.ce_weight}: expected a non-negative weight")


@dataclass
class ModelConfig:
    """A backbone by registry name, with builder options (e.g. ``width: 8``).

    ``fp32_stem``: run the backbone's stem (first convolution, BN, ReLU) in float32 under
    ``mixed_precision=bf16`` / ``fp16``; no effect on a float32 run, nor on the weights or
    checkpoints. Staged backbones only (see ``xmodal.models.base.keep_stem_fp32``).
    """

    arch: str = "resnet8"
    options: dict[str, Any] = field(default_factory=dict)
    fp32_stem: bool = False


@dataclass
class SplitConfig:
    """Which split of the dataset a stage reads, and an optional class-balanced subset size.

    ``classes``: keep only images of these classes (names, or indices into the dataset's class
    list), relabelled 0, 1, ... in the order given: a teacher trained on another label set than
    the probe's (e.g. ``data.teacher.classes=[airplane,automobile,bird,cat,deer]``).
    """

    split: str = "train"
    subset: Optional[int] = None
    classes: Optional[list[str]] = None


def check_same_classes(train: SplitConfig, train_key: str, test: SplitConfig, test_key: str) -> None:
    """ConfigError unless a model trained on ``train`` is scored on ``test`` in the same label space."""
    if train.classes != test.classes:
        raise ConfigError(f"{train_key}.classes={train.classes} and {test_key}.classes={test.classes} differ: a "
                          "classifier is scored in the label space it was trained in")


@dataclass
class DataConfig:
    """A dataset by name: where it is, its constructor options, and the DataLoader workers.

    ``num_workers``: ``None`` picks 0 for the in-memory built-in set, up to 4 for files.
    """

    name: str = "synthetic"
    root: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    num_workers: Optional[int] = field(default=None, metadata=NOT_IDENTITY)


@dataclass
class ImageDataConfig(DataConfig):
    """An image-classification / colour dataset; ``augment`` is the training augmentation."""

    augment: str = "crop"


@dataclass
class ModalityConfig:
    """The modality adapter and the views teacher and student see."""

    name: str = "lab"
    teacher_view: str = "L"
    student_view: str = "ab"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """The keys every task's recipe starts with; a task's schema subclasses it and sets ``task``."""

    task: str = ""
    recipe: str = ""
    description: str = ""
    seed: int = 0
    # Several seeds: every stage runs once per seed (into <output_dir>/seed-<s>/) and the report
    # gives each row's mean ± sd over them; ``seed`` is then unused.
    seeds: Optional[list[int]] = None
    quick: bool = False
    output_dir: Optional[str] = None
    mixed_precision: str = "no"
    # bf16 on the CPU: "auto" runs convolutions as bf16 kernels would, on float32 kernels, where the
    # CPU lacks oneDNN's bf16 path; "emulated" / "native" force one (xmodal/precision.py).
    cpu_bf16_convs: str = "auto"
    cpu: bool = False
    # Trackers of the per-epoch scalars (Accelerate's): tensorboard, wandb, mlflow, aim; [] for none.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"], metadata=NOT_IDENTITY)
