"""Representation transfer judged by linear probe and finetune (the Lab colour recipe's task).

Stages, each resumable and skipped when an earlier run in the same ``output_dir`` finished it:

1. teacher: trained with labels on the teacher view (e.g. L), or loaded from a checkpoint;
   its top-1 on the test split is reported;
2. distill-<method>: for each method, a fresh student (same seed, so every method starts from
   the same weights) learns from the frozen teacher on the distillation split, without labels
   unless ``distill.ce_weight`` > 0; ``random`` trains nothing;
3. each student is judged on the student view (e.g. ab) by a linear probe on its frozen pooled
   features and by finetuning the whole network with labels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.config import to_dict
from xmodal.engine import Engine
from xmodal.errors import ConfigError
from xmodal.modalities import Modality, modality_from_config
from xmodal.models import save_backbone
from xmodal.models.checkpoint import load_weights_into, open_checkpoint, taught_by
from xmodal.schema import (ImageDataConfig, ModalityConfig, ModelConfig, OptimConfig, RunConfig, SplitConfig,
                           TrainConfig, check_same_classes)
from xmodal.tasks.distill import distill_stages, needs_logits
from xmodal.tasks.evaluation import classify_top1
from xmodal.tasks.linear_probe import ProbeConfig, linear_probe
from xmodal.tasks.subset import check_classifiable, open_split
from xmodal.tasks.supervised import build_backbone, supervised_stage

PROTOCOLS = ("linear_probe", "finetune")


@dataclass
class UnlabeledSplit(SplitConfig):
    """The distillation split. ``subset`` may list sizes (``[2500, 10000, 50000]``): every method
    then distils on a class-balanced subset of each size (the CRD paper's Figure 3 axis), its rows
    marked ``n_unlabeled``; ``random`` and the teacher's probe, which read no unlabeled image, run once."""

    subset: Union[int, list[int], None] = None


@dataclass
class DataSection(ImageDataConfig):
    """The dataset and which split (and subset size) each stage reads."""

    teacher: SplitConfig = field(default_factory=lambda: SplitConfig("train"))
    distill: UnlabeledSplit = field(default_factory=lambda: UnlabeledSplit("unlabeled"))
    probe_train: SplitConfig = field(default_factory=lambda: SplitConfig("train"))
    probe_test: SplitConfig = field(default_factory=lambda: SplitConfig("test"))


@dataclass
class TeacherSection:
    """The teacher network: trained here on its view, loaded from ``checkpoint``, or used as built
    (``train.epochs: 0`` with pretrained weights, e.g. an ImageNet network).

    ``num_classes``: the classifier of a teacher used as built (1000 keeps an ImageNet head, whose
    soft labels KD distils); ``None`` takes the teacher split's classes.
    ``probe``: also report a linear probe on the teacher's own features of its view of the probe
    data (a row ``teacher``): the ceiling of what its representation tells about the probe's classes.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: Optional[str] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    num_classes: Optional[int] = None
    probe: bool = False


@dataclass
class DistillSection:
    """Which methods distill the student, and how."""

    methods: list[str] = field(default_factory=lambda: ["random", "kd", "crd"])
    train: TrainConfig = field(default_factory=TrainConfig)
    init_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5))
    weights: dict[str, float] = field(default_factory=dict)
    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    ce_weight: float = 0.0
    warm_start: bool = False


@dataclass
class TransferConfig(RunConfig):
    """Schema of recipes with ``task: transfer``."""

    task: str = "transfer"
    data: DataSection = field(default_factory=DataSection)
    modality: ModalityConfig = field(default_factory=ModalityConfig)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    linear_probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, optim=OptimConfig(lr=0.01)))

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown:
            raise ConfigError(f"protocols: unknown {unknown}; expected a subset of {list(PROTOCOLS)}")
        check_same_classes(self.data.probe_train, "data.probe_train", self.data.probe_test, "data.probe_test")
        sizes = self.data.distill.subset
        if isinstance(sizes, list) and (not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes)):
            raise ConfigError(f"data.distill.subset={sizes}: expected distinct positive sizes")


# ----------------------------------------------------------------- datasets
def _num_classes(dataset: Dataset, role: str, part: SplitConfig) -> int:
    """Classes of a split that trains with labels; every sample must carry one."""
    classes = getattr(dataset, "classes", None)
    labels = getattr(dataset, "labels", None)
    if not classes or labels is None or bool((labels < 0).any()):
        raise ConfigError(
            f"data.{role}.split={part.split!r} holds unlabeled images, but the {role} stage trains with "
            f"labels; choose a labeled split (e.g. data.{role}.split=train)"
        )
    return len(classes)


# -------------------------------------------------------------------- stages
class _Views:
    """Teacher and student views of a batch through one adapter, converted once per batch.

    A distillation step asks for both views of the same batch; the second request is served
    from the first conversion.
    """

    def __init__(self, modality: Modality) -> None:
        self.modality = modality
        self._last: tuple[Any, dict] = (None, {})

    def _both(self, batch) -> dict:
        # Holding the image itself (not its id) keeps the cache from matching a new tensor
        # that happens to reuse a freed one's address.
        image = batch["image"]
        if self._last[0] is not image:
            m = self.modality
            self._last = (image, m.views(batch, [m.teacher_view, m.student_view]))
        return self._last[1]

    def teacher(self, batch):
        return self._both(batch)[self.modality.teacher_view]

    def student(self, batch):
        return self._both(batch)[self.modality.student_view]


def build_student(cfg: TransferConfig, modality: Modality, method: str, teacher_classes: int) -> nn.Module:
    """``method``'s student before distillation: every method's starts from the same weights
    (seed + 1), with a classifier over the teacher's classes only when ``method`` needs logits."""
    return build_backbone(cfg.student, modality.student_channels,
                          teacher_classes if needs_logits(method) else 0, cfg.seed + 1)


def run_transfer(cfg: TransferConfig, engine: Engine) -> dict[str, Any]:
    """Run every stage of a transfer recipe and return the report's content."""
    began = time.perf_counter()
    modality = modality_from_config(cfg.modality)
    views = _Views(modality)
    d = cfg.data
    # Read once: its classifier, the sha256 the students record and the weights loaded are one file's.
    held = open_checkpoint(cfg.teacher.checkpoint, role="teacher") if cfg.teacher.checkpoint else None
    as_built = held is None and cfg.teacher.train.epochs == 0
    if as_built and not cfg.teacher.model.options.get("pretrained"):
        raise ConfigError("teacher.train.epochs=0 with no teacher.checkpoint leaves the teacher untrained; "
                          "set teacher.model.options.pretrained=true, give a teacher.checkpoint, or train it")
    if cfg.teacher.num_classes is not None and not as_built:
        raise ConfigError("teacher.num_classes is for a teacher used as built (teacher.train.epochs=0); a trained "
                          "teacher takes its split's classes, a checkpoint its own")
    # A teacher used as built with its own classifier size reads no teacher split.
    teacher_train = None if as_built and cfg.teacher.num_classes is not None else open_split(
        d, d.teacher, cfg.seed, augment=True, labeled=True, role="teacher")
    probe_train = open_split(d, d.probe_train, cfg.seed, augment=False, labeled=True, role="probe_train")
    finetune_train = open_split(d, d.probe_train, cfg.seed, augment=True, labeled=True, role="probe_train")
    probe_test = open_split(d, d.probe_test, cfg.seed, augment=False, labeled=True, role="probe_test")
    num_classes = _num_classes(probe_train, "probe_train", d.probe_train)
    check_classifiable(probe_train, probe_test, "data.probe_train", "data.probe_test")
    sizes = d.distill.subset if isinstance(d.distill.subset, list) else None
    unlabeled = [_unlabeled(cfg, part) for part in
                 ([d.distill] if sizes is None else [replace(d.distill, subset=n) for n in sorted(sizes)])]
    # The teacher is scored on the probe's test split in its own label space: cut to
    # data.teacher.classes (or whole), whatever classes the probe reads.
    teacher_part = replace(d.probe_test, classes=d.teacher.classes)
    teacher_test = probe_test if teacher_part == d.probe_test else open_split(
        d, teacher_part, cfg.seed, augment=False, labeled=True, role="teacher")
    if held is not None:  # its classifier decides; load_weights_into checks the rest
        teacher_classes = int(held.payload["num_classes"])
    elif teacher_train is None:
        teacher_classes = cfg.teacher.num_classes
    else:
        teacher_classes = _num_classes(teacher_train, "teacher", d.teacher)
    # A checkpoint of another dataset's label set (say 1,000 classes) still teaches, but its
    # top-1 here would compare its classes with ours: it is not scored. Classes named in
    # data.teacher.classes must be the ones it classifies.
    scored = teacher_classes == len(teacher_test.classes)
    if not scored and d.teacher.classes is not None:
        raise ConfigError(f"teacher.checkpoint={cfg.teacher.checkpoint} classifies {teacher_classes} classes, "
                          f"but data.teacher.classes lists {len(d.teacher.classes)}")
    timings: dict[str, float] = {}
    record = to_dict(cfg)
    record["data"].pop("num_workers")  # workers change no result: not part of any stage's identity
    record["teacher"] = taught_by(record["teacher"], held)
    # What the stages' identities hold of the teacher: not its probe (a report of it, not training),
    # nor an unset num_classes, so folders written before these keys existed still resume.
    record["teacher"].pop("probe")
    if record["teacher"]["num_classes"] is None:
        record["teacher"].pop("num_classes")
    shared = {"student": record["student"], "teacher": record["teacher"], "data": record["data"],
              "modality": record["modality"], "seed": cfg.seed}

    def stages_of(method: str, student: nn.Module, teacher: nn.Module, part: _Unlabeled) -> list:
        data = part.data_record(record["data"], sizes)
        return distill_stages(engine, method, student, teacher, part.dataset, views.teacher, views.student,
                              cfg.distill.train, weights=cfg.distill.weights, loss_options=cfg.distill.loss_options,
                              ce_weight=cfg.distill.ce_weight, init_cfg=cfg.distill.init_train,
                              warm_start=cfg.distill.warm_start, sample=part.sample, tag=part.tag(sizes),
                              record={**shared, "data": data, "distill": record["distill"]["train"]})

    for part in unlabeled:  # the losses read feature shapes from a first batch
        part.sample = engine.first_batch(part.dataset)

    # Build every method's losses once before anything trains (on an untrained copy of the
    # teacher): a bad loss option or a K the distillation set cannot supply fails in seconds,
    # not after the teacher and the methods before it. The global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        scratch_teacher = build_backbone(cfg.teacher.model, modality.teacher_channels, teacher_classes, cfg.seed)
        for part in unlabeled:
            for method in cfg.distill.methods:
                if method != "random":
                    stages_of(method, build_student(cfg, modality, method, teacher_classes), scratch_teacher, part)
        del scratch_teacher

    # 1. teacher
    teacher = build_backbone(cfg.teacher.model, modality.teacher_channels, teacher_classes, cfg.seed)
    if as_built and teacher.fc is not None and not getattr(teacher, "pretrained_head", False):
        # KD would distil the soft labels of a classifier nobody trained
        raise ConfigError(f"teacher.num_classes={teacher_classes}: {cfg.teacher.model.arch}'s pretrained "
                          f"classifier has another number of classes (an ImageNet head: 1000), and a teacher "
                          "used as built (teacher.train.epochs=0) cannot train a new one")
    if held is not None or as_built:
        if held is not None:
            load_weights_into(teacher, held, role="teacher")
        teacher.to(engine.device)
        teacher_result = {"top1": classify_top1(engine, teacher, teacher_test, views.teacher, desc="teacher test")
                          if scored else None}
    else:
        stage = supervised_stage("teacher", teacher, teacher_train, views.teacher, cfg.teacher.train,
                                  {"teacher": record["teacher"], "data": record["data"], "seed": cfg.seed,
                                   "modality": record["modality"]})
        teacher_result = engine.run(stage, lambda: {"top1": classify_top1(engine, teacher, teacher_test, views.teacher,
                                                                         desc="teacher test")})
        timings["teacher"] = teacher_result.get("seconds", 0.0)
        exported = engine.output_dir / "teacher.pt"  # reusable as teacher.checkpoint=<output_dir>/teacher.pt
        if engine.is_main and not exported.exists():
            save_backbone(exported, teacher)
    teacher.eval().requires_grad_(False)

    rows = []
    if cfg.teacher.probe:
        t0 = time.perf_counter()
        result = linear_probe(engine, teacher, probe_train, probe_test, views.teacher, num_classes, cfg.linear_probe,
                              seed=cfg.seed, name="probe-teacher")
        timings["probe-teacher"] = time.perf_counter() - t0
        rows.append({"method": "teacher", "protocol": "linear_probe", "metric": "top1", "value": result["top1"]})
    for part in unlabeled:
        for method in cfg.distill.methods:
            if method == "random" and part is not unlabeled[0]:
                continue  # reads no unlabeled image: one row for every size
            tag = "" if method == "random" else part.tag(sizes)
            t0 = time.perf_counter()
            student = build_student(cfg, modality, method, teacher_classes)
            stages = stages_of(method, student, teacher, part) if method != "random" else []
            for stage in stages:
                engine.run(stage)
            timings[f"distill-{method}{tag}"] = time.perf_counter() - t0
            # The finetune stage's identity includes the distillation it starts from, all of it.
            distilled = stages[-1].config if stages else None
            data = part.data_record(record["data"], sizes)
            judged = _judge(cfg, engine, method, student, probe_train, finetune_train, probe_test, views, num_classes,
                            record, distilled, timings, tag, data)
            if sizes is not None and method != "random":
                judged = [{**row, "n_unlabeled": len(part.dataset)} for row in judged]
            rows.extend(judged)
    return {
        "results": rows,
        "teacher": {"top1": teacher_result["top1"], "view": modality.teacher_view, "arch": cfg.teacher.model.arch,
                    "input_size": getattr(teacher, "input_size", None), "trained_here": not (as_built or held),
                    "classes": teacher_test.classes if scored else None,
                    "checkpoint_sha256": record["teacher"].get("checkpoint_sha256")},
        "timings": {**timings, "total": time.perf_counter() - began},
    }


@dataclass
class _Unlabeled:
    """One unlabeled set the students distil on: its split config, the dataset, a first batch."""

    split: UnlabeledSplit
    dataset: Dataset
    sample: Optional[dict] = None

    def data_record(self, data: dict, sizes: Optional[list[int]]) -> dict:
        """The recipe's data record as this set's stages record it: on the Figure 3 axis, with this
        size in place of the list, so each size's stages keep their identity when the list grows."""
        return data if sizes is None else {**data, "distill": to_dict(self.split)}

    def tag(self, sizes: Optional[list[int]]) -> str:
        """The suffix of its stages' names: none for a single set, ``-n<size>`` on the Figure 3 axis."""
        return "" if sizes is None else f"-n{self.split.subset}"


def _unlabeled(cfg: TransferConfig, part: UnlabeledSplit) -> _Unlabeled:
    """The distillation split cut to ``part.subset``; on the Figure 3 axis a size the split cannot
    supply is refused (the curve would repeat the whole split under another size's name)."""
    dataset = open_split(cfg.data, part, cfg.seed, augment=True, labeled=cfg.distill.ce_weight > 0, role="distill")
    listed = isinstance(cfg.data.distill.subset, list)
    if listed and len(dataset) < part.subset:
        raise ConfigError(f"data.distill.subset lists {part.subset}, but split {part.split!r} holds "
                          f"{len(dataset)} images; list sizes up to {len(dataset)}")
    if len(dataset) < cfg.distill.train.batch_size and any(m != "random" for m in cfg.distill.methods):
        raise ConfigError(f"distill.train.batch_size={cfg.distill.train.batch_size} exceeds the {len(dataset)} "
                          f"unlabeled images of data.distill (subset {part.subset}); lower batch_size")
    return _Unlabeled(part, dataset)


def _judge(cfg, engine, method, student, probe_train, finetune_train, probe_test, views, num_classes, record,
           distilled, timings, tag: str, data: dict) -> list[dict[str, Any]]:
    """The linear probe and finetune rows of one student; ``tag`` ends its stages' names and
    ``data`` is the data record of its finetune stage."""
    rows = []
    if "linear_probe" in cfg.protocols:
        t0 = time.perf_counter()
        result = linear_probe(engine, student, probe_train, probe_test, views.student, num_classes,
                              cfg.linear_probe, seed=cfg.seed, name=f"probe-{method}{tag}")
        timings[f"probe-{method}{tag}"] = time.perf_counter() - t0
        rows.append({"method": method, "protocol": "linear_probe", "metric": "top1", "value": result["top1"]})
    if "finetune" in cfg.protocols:
        student.reset_classifier(num_classes)
        stage = supervised_stage(f"finetune-{method}{tag}", student, finetune_train, views.student, cfg.finetune,
                                  {"finetune": record["finetune"], "method": method,
                                   "data": data,
                                   "distill": distilled, "teacher": record["teacher"],
                                   "student": record["student"], "seed": cfg.seed})
        result = engine.run(stage, lambda: {"top1": classify_top1(engine, student, probe_test, views.student,
                                                                 desc=f"finetune-{method}{tag} test")})
        timings[f"finetune-{method}{tag}"] = result.get("seconds", 0.0)
        rows.append({"method": method, "protocol": "finetune", "metric": "top1", "value": result["top1"]})
    return rows
