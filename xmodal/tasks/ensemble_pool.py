"""The teacher pool of an ensemble recipe: members trained here (one resumable stage each) or loaded.

A pool is ``count`` teachers of one architecture trained with seeds ``seed, seed + 1, ...`` on one
view (the seed also orders its data); ``members[i]``, where given, overrides teacher ``i`` (its
architecture, view, seed, or a checkpoint to load instead of training). Every
trained teacher is also exported as a backbone checkpoint (``<output_dir>/teachers/teacher-<i>.safetensors``)
that another run can list under ``members[i].checkpoint``. The pool's own accuracy is measured
on the test split: each member's top-1 and, for each M, that of the first M members' averaged
softmax.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.config import to_dict
from xmodal.engine import Engine
from xmodal.errors import ConfigError
from xmodal.modalities import Modality, view_fn
from xmodal.models import load_backbone
from xmodal.models.checkpoint import CheckpointFile, open_checkpoint, taught_by
from xmodal.schema import ModelConfig, TrainConfig
from xmodal.tasks.evaluation import extract, top1
from xmodal.tasks.supervised import build_backbone, export, supervised_stage


@dataclass
class TeacherSpec:
    """One member of the pool; a field left unset takes the pool's default."""

    model: Optional[ModelConfig] = None
    view: Optional[str] = None
    seed: Optional[int] = None
    checkpoint: Optional[str] = None


@dataclass
class PoolSection:
    """The teachers: ``count`` of ``model`` on ``view`` (seeds ``seed + i``); ``members[i]`` overrides
    teacher ``i``. Without ``count`` the pool is the ``members`` list."""

    count: Optional[int] = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig("resnet8", {"width": 16}))
    view: Optional[str] = None
    seed: int = 0
    members: list[TeacherSpec] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class Member:
    """A resolved pool member: everything that defines it."""

    position: int
    model: ModelConfig
    view: str
    seed: int
    checkpoint: Optional[str]

    @functools.cached_property
    def file(self) -> Optional[CheckpointFile]:
        """The member's checkpoint, read once: the checks, the identity and the weights loaded all
        come from these bytes, so a file put at the path meanwhile is neither loaded nor recorded."""
        return open_checkpoint(self.checkpoint, f"teacher {self.position}") if self.checkpoint else None

    @functools.cached_property
    def identity(self) -> dict[str, Any]:
        """What a student taught by this member records: its spec, a checkpoint by its content."""
        return taught_by(to_dict(self), self.file, f"teacher {self.position}")

    def describe(self) -> str:
        if self.checkpoint:
            return f"{self.checkpoint} on {self.view}"
        width = self.model.options.get("width")
        return f"{self.model.arch}{f'-w{width}' if width else ''} on {self.view} (seed {self.seed})"


def resolve_pool(pool: PoolSection, modality: Modality) -> list[Member]:
    """The pool's members, checked: not empty, valid views, no teacher listed twice."""
    size = len(pool.members) if pool.count is None else pool.count
    if len(pool.members) > size:
        raise ConfigError(f"teachers.members lists {len(pool.members)} teachers but teachers.count={pool.count}; "
                          "raise the count or drop members")
    specs = list(pool.members) + [TeacherSpec() for _ in range(size - len(pool.members))]
    if not specs:
        raise ConfigError("teachers: the pool is empty; set teachers.count >= 1 or list teachers.members")
    default_view = pool.view or modality.teacher_view
    members = [Member(i, s.model or pool.model, s.view or default_view, pool.seed + i if s.seed is None else s.seed,
                      s.checkpoint) for i, s in enumerate(specs)]
    for m in members:
        if m.view not in modality.channels:
            raise ConfigError(f"teachers.members[{m.position}].view={m.view!r} is not a view of modality "
                              f"{modality.name!r}; expected one of {sorted(modality.channels)}")
    _refuse_duplicates(members)
    return members


def _refuse_duplicates(members: Sequence[Member]) -> None:
    """Two entries naming the same network would count one teacher twice in every M."""
    seen: dict[Any, int] = {}
    for m in members:
        if m.checkpoint:
            path = Path(m.checkpoint).expanduser()
            key: Any = ("file", m.identity["checkpoint_sha256"]) if path.is_file() else ("path", str(path.resolve()))
            what = f"the same checkpoint ({m.checkpoint})"
        else:
            key = ("trained", m.model.arch, repr(sorted(m.model.options.items())), m.view, m.seed)
            what = f"the same network (arch, options, view and seed {m.seed})"
        if key in seen:
            raise ConfigError(f"teachers.members[{seen[key]}] and [{m.position}] are {what}: "
                              "duplicate teachers; give each a different checkpoint or seed")
        seen[key] = m.position


def check_checkpoints(members: Sequence[Member], modality: Modality, num_classes: int, data: str) -> None:
    """Refuse, before anything trains, a checkpoint whose classifier is not the data's or whose
    input is not its view's."""
    for m in members:
        if not m.checkpoint:
            continue
        header = m.file.payload
        where = f"teachers.members[{m.position}].checkpoint {m.checkpoint}"
        if header["num_classes"] != num_classes:
            raise ConfigError(f"{where} classifies {header['num_classes']} classes but the data ({data}) has "
                              f"{num_classes}: every teacher must classify the data's classes")
        if header["in_channels"] != modality.channels[m.view]:
            raise ConfigError(f"{where} takes {header['in_channels']} input channels but its view {m.view!r} has "
                              f"{modality.channels[m.view]}")


@contextmanager
def data_order(engine: Engine, seed: int) -> Iterator[None]:
    """Stages inside draw their data order from ``seed`` (the engine reads its ``seed`` per loader),
    so each teacher and each student seed sees its own order."""
    saved, engine.seed = engine.seed, seed
    try:
        yield
    finally:
        engine.seed = saved


def build_pool(engine: Engine, members: Sequence[Member], modality: Modality, train_set: Dataset, test_set: Dataset,
               num_classes: int, train: TrainConfig, record: dict[str, Any]) -> tuple[list[nn.Module], list[Tensor], Tensor]:
    """Train or load every member; returns the frozen teachers, their test logits ``(N_test, C)``
    and the test labels ``(N_test,)``.

    ``record`` is the part of the recipe that defines a teacher's stage besides its own spec.
    """
    teachers, logits, labels = [], [], torch.empty(0, dtype=torch.long)
    for m in members:
        view = view_fn(modality, m.view)
        if m.checkpoint:
            teacher = load_backbone(m.file, f"teacher {m.position}", in_channels=modality.channels[m.view],
                                    num_classes=num_classes)
        else:
            teacher = build_backbone(m.model, modality.channels[m.view], num_classes, m.seed)
            stage = supervised_stage(f"teacher-{m.position}", teacher, train_set, view, train,
                                      {**record, "teacher": to_dict(m), "train": to_dict(train)})
            with data_order(engine, m.seed):
                engine.run(stage)
            export(engine, f"teachers/teacher-{m.position}", teacher)
        teacher.to(engine.device).eval().requires_grad_(False)
        _, labels, member_logits = extract(engine, teacher, test_set, view, desc=f"teacher {m.position} test")
        teachers.append(teacher)
        logits.append(member_logits)
    return teachers, logits, labels


def ensemble_top1(logits: Sequence[Tensor], labels: Tensor) -> float:
    """Top-1 (percent) of the averaged softmax of the given members."""
    return top1(torch.stack([member.softmax(dim=1) for member in logits]).mean(dim=0), labels)
