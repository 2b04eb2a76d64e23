"""Representation transfer: teachers on one view, a student on another, judged by the protocols
a recipe lists (linear probe, finetune, segmentation).

Stages, each resumable and skipped when an earlier run in the same ``output_dir`` finished it:

1. teacher: trained with labels on the teacher view (e.g. L), loaded from a checkpoint, or used
   as built (ImageNet weights); its top-1 on the test split is reported where its classes are
   the data's. Several teachers (``teacher-<i>``): a ``teachers`` list, each on its own view, or
   ``teachers: M``, M copies of ``teacher`` initialised and shuffled from seeds ``seed * M + i``
   (the CRD paper's ensembles); their averaged softmax is scored for each M too;
2. distill-<method>: for each method, a fresh student (same seed, so every method starts from
   the same weights) learns from the frozen teacher on the distillation split, without labels
   unless the method or ``distill.ce_weight`` adds cross-entropy; ``random`` trains nothing and
   ``ce`` (``train-ce``) only on labels. With several teachers, ``distill-<method>-m<M>`` for
   each M of ``distill.n_teachers`` learns from the first M
   (:class:`xmodal.distiller.Distiller`: one critic per teacher, KD from averaged soft labels);
3. each student is judged on the student view (e.g. ab, depth): its own classifier on the test
   split (``test``), a linear probe on its frozen pooled features, finetuning the whole network
   with labels, and semantic segmentation under a decoder (``segment-<method>-<mode>``,
   :mod:`xmodal.tasks.segmentation`).
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.config import IDENTITY_IF_SET, NOT_IDENTITY, identity, to_dict
from xmodal.engine import Engine
from xmodal.errors import ConfigError
from xmodal.modalities import Modality, modality_from_config, view_fn
from xmodal.models.checkpoint import CheckpointFile, load_weights_into, open_checkpoint, taught_by
from xmodal.schema import (DistillSection, ImageDataConfig, ModalityConfig, ModelConfig, OptimConfig, RunConfig, SplitConfig,
                           TrainConfig, check_same_classes)
from xmodal.tasks import register_task
from xmodal.tasks.distill import (PRESETS, Method, bank_sizes, distill_stages, reads_logits, recipe_loss_options,
                                  resolve_method, teacher_scales)
from xmodal.tasks.evaluation import classify_top1, extract, top1
from xmodal.tasks.linear_probe import ProbeConfig, linear_probe
from xmodal.tasks.seg_pictures import save_legend
from xmodal.tasks.segmentation import SegmentationConfig, check_batches, segment, segmentation_data, segmentation_extra
from xmodal.data.subset import check_classifiable, open_split
from xmodal.tasks.supervised import build_backbone, export, supervised_stage

PROTOCOLS = ("test", "linear_probe", "finetune", "segmentation")
TRAIN_ON_PROBE = {"linear_probe", "finetune"}  # the protocols that read data.probe_train


@dataclass
class UnlabeledSplit(SplitConfig):
    """The distillation split. ``subset`` may list sizes (``[2500, 10000, 50000]``): every method
    then distils on a class-balanced subset of each size (the CRD paper's Figure 3 axis), its rows
    marked ``n_unlabeled``; ``random`` and the teacher's probe, which read no unlabeled image, run once."""

    subset: Union[int, list[int], None] = None


@dataclass
class DataSection(ImageDataConfig):
    """The dataset and which split (and subset size) each stage reads."""

    #: Keys of the former ensemble task and the keys that hold them now.
    renamed: ClassVar[dict[str, str]] = {"train": "data.teacher and data.distill", "test": "data.probe_test"}

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
    ``view``: the view of the batch it reads (``None``: ``modality.teacher_view``).
    ``probe``: also report a linear probe on the teacher's own features of its view of the probe
    data (a row ``teacher``): the ceiling of what its representation tells about the probe's classes.
    ``seed``: the initialisation and data order of a teacher trained here (``None``: the run's
    ``seed`` times the number of teachers, plus its position in ``teachers``).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: Optional[str] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    num_classes: Optional[int] = field(default=None, metadata=IDENTITY_IF_SET)
    probe: bool = field(default=False, metadata=NOT_IDENTITY)  # a report about the teacher, not training
    view: Optional[str] = field(default=None, metadata=IDENTITY_IF_SET)
    seed: Optional[int] = field(default=None, metadata=IDENTITY_IF_SET)


@dataclass
class TransferConfig(RunConfig):
    """Schema of recipes with ``task: transfer``. ``teachers``: a list of teacher sections, or a
    number M of copies of ``teacher`` (seeds ``seed * M + i``)."""

    #: Keys of the former ensemble task and the keys that hold them now.
    renamed: ClassVar[dict[str, str]] = {"student_seeds": "seeds (each seed runs the whole recipe)"}

    task: str = "transfer"
    data: DataSection = field(default_factory=DataSection)
    modality: ModalityConfig = field(default_factory=ModalityConfig)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    teachers: Union[int, list[TeacherSection]] = field(default_factory=list)
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    protocols: list[str] = field(default_factory=lambda: ["linear_probe", "finetune"])
    linear_probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, optim=OptimConfig(lr=0.01)))
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown:
            raise ConfigError(f"protocols: unknown {unknown}; expected a subset of {list(PROTOCOLS)}")
        for method in self.distill.methods:
            resolve_method(method, self.distill.weights)  # an unknown method fails before any data is read
        if TRAIN_ON_PROBE & set(self.protocols):
            check_same_classes(self.data.probe_train, "data.probe_train", self.data.probe_test, "data.probe_test")
        if "test" in self.protocols:  # the student's classifier learns the distillation split's labels
            check_same_classes(self.data.distill, "data.distill", self.data.probe_test, "data.probe_test")
        counts = self.distill.n_teachers
        if isinstance(self.teachers, int) and self.teachers < 1:
            raise ConfigError(f"teachers={self.teachers}: give a number of copies of teacher >= 1, or a list")
        if isinstance(self.teachers, int) and self.teachers > 1 and self.teacher.checkpoint:
            raise ConfigError(f"teachers={self.teachers} copies teacher, whose checkpoint would be one network "
                              f"{self.teachers} times; list the checkpoints under teachers instead")
        fixed = [m for m in self.distill.methods if m in PRESETS and PRESETS[m].ce]
        if fixed and self.distill.ce_weight:
            raise ConfigError(f"distill.ce_weight: {fixed[0]} fixes its own CE weight; override it with "
                              "distill.weights.ce")
        if isinstance(self.teachers, list) and self.teachers and self.teacher != TeacherSection():
            raise ConfigError("teacher and a teachers list are both set; give one teacher under teacher, several "
                              "under teachers (or teachers: M copies of teacher)")
        several = {"n_teachers": counts, "teacher_weights": self.distill.teacher_weights,
                   "split_crd_weight": self.distill.split_crd_weight or None}
        for key, value in several.items():
            if value is not None and not self.teachers:
                raise ConfigError(f"distill.{key} is about several teachers; list them under teachers")
        sizes = self.data.distill.subset
        if isinstance(sizes, list) and counts is not None and len(counts) > 1:
            raise ConfigError("data.distill.subset lists sizes and distill.n_teachers several counts; "
                              "vary one of the two in a run")
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
@dataclass
class _Teacher:
    """One teacher of the run, resolved before anything trains: how it is obtained, what it reads,
    the classes it predicts, and what a student it teaches records of it."""

    section: TeacherSection
    position: Optional[int]          # None: the recipe's single ``teacher``; i: ``teachers[i]``
    seed: int                        # its initialisation and, when trained here, data order
    view: str
    held: Optional[CheckpointFile]
    as_built: bool
    train_set: Optional[Dataset]
    identity: dict[str, Any]
    classes: int = 0
    test_set: Optional[Dataset] = None
    scored: bool = False
    module: Optional[nn.Module] = None
    test_logits: Optional[Tensor] = None

    @property
    def name(self) -> str:
        return "teacher" if self.position is None else f"teacher-{self.position}"

    @property
    def key(self) -> str:
        return _teacher_key(self.position)

    def build(self, modality: Modality) -> nn.Module:
        return build_backbone(self.section.model, modality.channels[self.view], self.classes, self.seed)


def _teacher_key(position: Optional[int]) -> str:
    """The recipe key of a teacher: ``teacher``, or ``teachers[i]`` in a list."""
    return "teacher" if position is None else f"teachers[{position}]"


def _sections(cfg: TransferConfig) -> list[tuple[TeacherSection, Optional[int]]]:
    """Every teacher's section and position: ``teacher`` alone, the ``teachers`` list, or
    ``teachers: M`` copies of ``teacher`` with seeds ``seed * M + i`` (``teacher.seed + i`` if set),
    so the pools of runs with different seeds share no network."""
    if isinstance(cfg.teachers, int):
        first = cfg.seed * cfg.teachers if cfg.teacher.seed is None else cfg.teacher.seed
        return [(replace(cfg.teacher, seed=first + i), i) for i in range(cfg.teachers)]
    return [(s, i) for i, s in enumerate(cfg.teachers)] if cfg.teachers else [(cfg.teacher, None)]


def _resolve_teacher(cfg: TransferConfig, modality: Modality, section: TeacherSection, position: Optional[int],
                     teacher_split: Callable[[], Dataset]) -> _Teacher:
    """Check one teacher's settings; ``teacher_split()`` opens the split it trains on. Nothing is
    trained or loaded yet."""
    key = _teacher_key(position)
    view = section.view or modality.teacher_view
    if view not in modality.channels:
        raise ConfigError(f"{key}.view={view!r} is not a view of modality {modality.name!r}; "
                          f"expected one of {sorted(modality.channels)}")
    # Read once: its classifier, the sha256 the students record and the weights loaded are one file's.
    held = open_checkpoint(section.checkpoint, role=key) if section.checkpoint else None
    as_built = held is None and section.train.epochs == 0
    if as_built and not section.model.options.get("pretrained"):
        raise ConfigError(f"{key}.train.epochs=0 with no {key}.checkpoint leaves the teacher untrained; "
                          f"set {key}.model.options.pretrained=true, give a {key}.checkpoint, or train it")
    if as_built:
        modality.check_pretrained(view, section.model.arch)
    if section.num_classes is not None and held is not None and section.num_classes != held.payload["num_classes"]:
        raise ConfigError(f"{key}.num_classes={section.num_classes}, but {key}.checkpoint classifies "
                          f"{held.payload['num_classes']} classes; remove {key}.num_classes (the checkpoint decides)")
    if section.num_classes is not None and held is None and not as_built:
        raise ConfigError(f"{key}.num_classes is for a teacher used as built ({key}.train.epochs=0); a trained "
                          "teacher takes its split's classes, a checkpoint its own")
    # A teacher loaded, or used as built with its own classifier size, reads no teacher split.
    train_set = None if held is not None or as_built and section.num_classes is not None else teacher_split()
    several = len(cfg.teachers) if isinstance(cfg.teachers, list) else 1  # seeds of runs' pools stay apart
    seed = cfg.seed * several + (position or 0) if section.seed is None else section.seed
    return _Teacher(section, position, seed, view, held, as_built, train_set, taught_by(identity(section), held))


def _refuse_duplicates(pool: list[_Teacher]) -> None:
    """Two entries naming the same network would count one teacher twice in every M."""
    seen: dict[str, _Teacher] = {}
    for t in pool:
        trained = t.held is None and not t.as_built
        spec = {k: v for k, v in t.identity.items() if k not in ("seed", "view")}
        key = json.dumps([spec, t.view, t.seed if trained else None], sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"{seen[key].key} and {t.key} are the same network (the same checkpoint, or the same "
                              "arch, options, view and seed): give each another checkpoint, seed or arch")
        seen[key] = t


def _score_on(cfg: TransferConfig, t: _Teacher, probe_test: Optional[Dataset]) -> None:
    """The classes ``t`` predicts and the test split it is scored on, when its classes are the data's
    (``probe_test`` ``None``: no classification protocol, nothing to score it on)."""
    d, section, key = cfg.data, t.section, t.key
    if t.held is not None:  # its classifier decides; load_weights_into checks the rest
        t.classes = int(t.held.payload["num_classes"])
    elif t.train_set is None:
        t.classes = section.num_classes
    else:
        t.classes = _num_classes(t.train_set, "teacher", d.teacher)
    if probe_test is None:
        return
    # The teacher is scored on the probe's test split in its own label space: cut to
    # data.teacher.classes (or whole), whatever classes the probe reads.
    part = replace(d.probe_test, classes=d.teacher.classes)
    t.test_set = probe_test if part == d.probe_test else open_split(d, part, cfg.seed, augment=False, labeled=True,
                                                                    role="teacher")
    # A checkpoint of another dataset's label set (say 1,000 classes) still teaches, but its
    # top-1 here would compare its classes with ours: it is not scored. Classes named in
    # data.teacher.classes must be the ones it classifies.
    t.scored = t.classes == len(t.test_set.classes)
    if not t.scored and d.teacher.classes is not None:
        raise ConfigError(f"{key}.checkpoint={section.checkpoint} classifies {t.classes} classes, "
                          f"but data.teacher.classes lists {len(d.teacher.classes)}")


def _ready_teacher(cfg: TransferConfig, engine: Engine, modality: Modality, t: _Teacher, record: dict,
                   timings: dict[str, float]) -> dict[str, Any]:
    """Train, load or take ``t`` as built, freeze it, score it on its test split, and return its
    report entry."""
    teacher = t.module = t.build(modality)
    view = view_fn(modality, t.view)
    if t.as_built and teacher.fc is not None and not getattr(teacher, "pretrained_head", False):
        # KD would distil the soft labels of a classifier nobody trained
        raise ConfigError(f"{t.key}.num_classes={t.classes}: {t.section.model.arch}'s pretrained "
                          f"classifier has another number of classes (an ImageNet head: 1000), and a teacher "
                          f"used as built ({t.key}.train.epochs=0) cannot train a new one")
    if t.held is not None:
        load_weights_into(teacher, t.held, role=t.key)
    teacher.to(engine.device)

    def score() -> dict[str, Any]:  # its logits kept where several teachers' softmax is averaged
        if not t.scored:
            return {"top1": None}
        _, labels, logits = extract(engine, teacher, t.test_set, view, desc=f"{t.name} test")
        t.test_logits = logits if cfg.teachers else None
        return {"top1": top1(logits, labels)}

    if t.held is None and not t.as_built:
        stage = supervised_stage(t.name, teacher, t.train_set, view, t.section.train,
                                 {"teacher": t.identity, "data": record["data"], "seed": t.seed,
                                  "modality": record["modality"]}, data_seed=t.seed)
        result = engine.run(stage, score)  # a finished stage comes back with its score
        timings[t.name] = result.get("seconds", 0.0)
        # reusable as teacher.checkpoint=<output_dir>/teacher.safetensors (teachers/teacher-<i>... in a pool)
        export(engine, t.name if t.position is None else f"teachers/{t.name}", teacher)
    else:
        result = score()
    teacher.eval().requires_grad_(False)
    if cfg.teachers and t.scored and t.test_logits is None:
        score()
    return {"top1": result["top1"], "view": t.view, "arch": t.section.model.arch, "seed": t.seed,
            "input_size": getattr(teacher, "input_size", None), "trained_here": not (t.as_built or t.held),
            "classes": t.test_set.classes if t.scored else None,
            "checkpoint_sha256": t.identity.get("checkpoint_sha256")}


def _student_classes(spec: Method, teacher_classes: int, label_classes: int) -> int:
    """The classifier of a method's student: over the labels' classes when it trains with CE, the
    teachers' when a term reads logits (KD), none otherwise."""
    return label_classes if spec.ce else teacher_classes if reads_logits(spec) else 0


@register_task("transfer", TransferConfig, PROTOCOLS)
def run_transfer(cfg: TransferConfig, engine: Engine) -> dict[str, Any]:
    """Teachers (one, a list, or M copies) -> a student, judged by test, probe, finetune or segmentation."""
    began = time.perf_counter()
    modality = modality_from_config(cfg.modality)
    student_view = view_fn(modality, modality.student_view)
    d = cfg.data
    teacher_split = functools.cache(lambda: open_split(d, d.teacher, cfg.seed, augment=True, labeled=True,
                                                       role="teacher"))
    pool = [_resolve_teacher(cfg, modality, section, i, teacher_split) for section, i in _sections(cfg)]
    _refuse_duplicates(pool)
    probe_train = finetune_train = probe_test = None
    num_classes = 0
    if ({"test"} | TRAIN_ON_PROBE) & set(cfg.protocols):
        probe_test = open_split(d, d.probe_test, cfg.seed, augment=False, labeled=True, role="probe_test")
        num_classes = _num_classes(probe_test, "probe_test", d.probe_test)
    if TRAIN_ON_PROBE & set(cfg.protocols):
        probe_train = open_split(d, d.probe_train, cfg.seed, augment=False, labeled=True, role="probe_train")
        finetune_train = open_split(d, d.probe_train, cfg.seed, augment=True, labeled=True, role="probe_train")
        num_classes = _num_classes(probe_train, "probe_train", d.probe_train)
        check_classifiable(probe_train, probe_test, "data.probe_train", "data.probe_test")
    seg = _SegmentationData.open(cfg, engine) if "segmentation" in cfg.protocols else None
    counts = _teacher_counts(cfg, len(pool))
    specs = {m: resolve_method(m, cfg.distill.weights, cfg.distill.warm_start, cfg.distill.ce_weight)
             for m in cfg.distill.methods}
    labeled = any(spec.ce for spec in specs.values())
    sizes = d.distill.subset if isinstance(d.distill.subset, list) else None
    unlabeled = [_unlabeled(cfg, part, labeled) for part in
                 ([d.distill] if sizes is None else [replace(d.distill, subset=n) for n in sorted(sizes)])]
    for t in pool:
        _score_on(cfg, t, probe_test)
    classes = pool[0].classes
    label_classes = len(unlabeled[0].dataset.classes) if labeled else 0
    if "test" in cfg.protocols:  # it scores the student's own classifier: one over the test classes
        if labeled:
            check_classifiable(unlabeled[0].dataset, probe_test, "data.distill", "data.probe_test")
        for method, spec in specs.items():
            if _student_classes(spec, classes, label_classes) != num_classes:
                fix = "drop it or judge it with linear_probe" if not spec.terms else \
                    "set distill.weights.ce > 0" if method in PRESETS and PRESETS[method].ce else \
                    "give it cross-entropy (distill.ce_weight > 0) or judge it with linear_probe"
                raise ConfigError(f"protocol test scores the student's own classifier, but {method!r} trains none "
                                  f"over the {num_classes} classes of data.probe_test; {fix}")
    timings: dict[str, float] = {}
    record = identity(cfg)
    shared = {"student": record["student"], "data": record["data"], "modality": record["modality"], "seed": cfg.seed}

    def student_of(method: str) -> nn.Module:
        # every method's student starts from the same weights (seed + 1)
        return build_backbone(cfg.student, modality.student_channels,
                              _student_classes(specs[method], classes, label_classes), cfg.seed + 1)

    def stages_of(method: str, student: nn.Module, teachers: list[nn.Module], part: _Unlabeled) -> list:
        data, spec = part.data_record(record["data"], sizes), specs[method]
        if not spec.terms:  # no teacher: random trains nothing, ce only on labels
            ce = spec.ce
            return [supervised_stage(f"train-{method}{part.tag(sizes)}", student, part.dataset, student_view,
                                     cfg.distill.train, {**shared, "data": data, "method": method, "ce_weight": ce,
                                                         "distill": record["distill"]["train"]},
                                     loss=lambda out, batch: ce * F.cross_entropy(out.logits, batch["label"]))] \
                if spec.ce else []
        # One teacher: recorded as ``teacher``, as single-teacher runs always were; several: the list.
        taught = {"teacher": pool[0].identity} if not cfg.teachers else \
            {"teachers": [t.identity for t in pool[:len(teachers)]]}
        return distill_stages(engine, method, student, [(t, p.view) for t, p in zip(teachers, pool)], modality,
                              part.dataset, cfg.distill.train, weights=cfg.distill.weights,
                              loss_options=part.loss_options,
                              ce_weight=cfg.distill.ce_weight,
                              init_cfg=cfg.distill.init_train, warm_start=cfg.distill.warm_start, sample=part.sample,
                              tag=_tag(cfg, len(teachers)) + part.tag(sizes),
                              teacher_weights=teacher_scales(cfg.distill, len(pool), len(teachers)),
                              record={**shared, **taught, "data": data, "distill": record["distill"]["train"]})

    for part in unlabeled:  # the losses read feature shapes from a first batch
        part.sample = engine.first_batch(part.dataset)

    # Build every method's losses once before anything trains (on untrained copies of the
    # teachers): a bad loss option or a K the distillation set cannot supply fails in seconds,
    # not after the teachers and the methods before it. The global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        scratch = [t.build(modality) for t in pool[:counts[-1]]]
        for part in unlabeled:
            for m in counts:
                for method in cfg.distill.methods:
                    if specs[method].terms:
                        stages_of(method, student_of(method), scratch[:m], part)
        del scratch

    # 1. the teachers (of several, none when no method reads one), and for each M the first M's averaged softmax
    used = pool[:counts[-1]] if not cfg.teachers or any(spec.terms for spec in specs.values()) else []
    reports = [_ready_teacher(cfg, engine, modality, t, record, timings) for t in used]
    ensemble = {}
    if used and cfg.teachers and all(t.scored for t in used):
        labels = pool[0].test_set.labels
        ensemble = {str(m): top1(torch.stack([t.test_logits.softmax(1) for t in pool[:m]]).mean(0), labels)
                    for m in counts}

    rows = []
    for t in used:
        if t.section.probe and probe_train is not None:
            t0 = time.perf_counter()
            result = linear_probe(engine, t.module, probe_train, probe_test, view_fn(modality, t.view), num_classes,
                                  cfg.linear_probe, seed=cfg.seed, name=f"probe-{t.name}")
            timings[f"probe-{t.name}"] = time.perf_counter() - t0
            rows.append({"method": t.name, "protocol": "linear_probe", "metric": "top1", "value": result["top1"]})
    teachers = [t.module for t in pool]
    for part in unlabeled:
        for m in counts:
            for method in cfg.distill.methods:
                spec = specs[method]
                if not spec.terms and (m != counts[0] or part is not unlabeled[0] and not spec.ce):
                    continue  # no teacher: one row for every M (random, reading no image, for every size too)
                tag = (_tag(cfg, m) if spec.terms else "") + (part.tag(sizes) if spec.terms or spec.ce else "")
                t0 = time.perf_counter()
                student = student_of(method)
                stages = stages_of(method, student, teachers[:m], part)
                for stage in stages:
                    engine.run(stage)
                if stages:  # the distilled student, before any finetuning
                    export(engine, f"students/{method}{tag}", student)
                timings[f"distill-{method}{tag}"] = time.perf_counter() - t0
                # The finetune stage's identity includes the distillation it starts from, all of it.
                distilled = stages[-1].config if stages else None
                data = part.data_record(record["data"], sizes)
                judged = _judge(cfg, engine, method, student, probe_train, finetune_train, probe_test, student_view,
                                num_classes, record, pool[0].identity, distilled, timings, tag, data, seg)
                extra = {}
                if sizes is not None and (spec.terms or spec.ce):
                    extra["n_unlabeled"] = len(part.dataset)
                if cfg.teachers and spec.terms:
                    extra["n_teachers"] = m
                rows.extend({**row, **extra} for row in judged)
    report = {"results": rows, "timings": {**timings, "total": time.perf_counter() - began}}
    banks = bank_sizes(cfg.distill.methods, cfg.distill.weights, unlabeled[-1].loss_options)
    if cfg.distill.cap_negatives and banks:
        report["extra"] = {"distillation": f"{len(unlabeled[-1].dataset)} images of split '{d.distill.split}'; "
                                           f"memory-bank negatives: {banks} (at most N - 1)"}
    if seg is not None:
        report.update(per_class_iou=seg.per_class, segmentation_split=seg.info)
        report["extra"] = {**report.get("extra", {}), **segmentation_extra(cfg.segmentation, seg.classes, seg.info,
                                                                            seg.per_class)}
        if cfg.segmentation.pictures and engine.is_main:
            save_legend(engine.output_dir / "pictures" / "legend.png", seg.classes)
    if cfg.teachers:
        report["teachers"] = {"members": reports, **({"ensemble_top1": ensemble} if ensemble else {})}
        if ensemble:
            report["extra"] = {**report.get("extra", {}), "teacher ensemble (averaged softmax, test top1)":
                               ", ".join(f"M={m}: {v:.2f}" for m, v in ensemble.items())}
    else:
        report["teacher"] = reports[0]
    return report


def _tag(cfg: TransferConfig, m: int) -> str:
    """The stage-name suffix of a distillation from ``m`` teachers of a ``teachers`` list."""
    return f"-m{m}" if cfg.teachers else ""


def _teacher_counts(cfg: TransferConfig, pool: int) -> list[int]:
    """The numbers of teachers M the students distil from: ``distill.n_teachers``, or the whole pool."""
    counts = sorted(cfg.distill.n_teachers or [pool])
    if counts[-1] > pool:
        raise ConfigError(f"distill.n_teachers asks for {counts[-1]} teachers but teachers lists {pool}; "
                          "add teachers or lower distill.n_teachers")
    return counts


@dataclass
class _Unlabeled:
    """One unlabeled set the students distil on: its split config, the dataset, the recipe's loss
    options for its size (K capped where asked), a first batch."""

    split: UnlabeledSplit
    dataset: Dataset
    loss_options: dict[str, dict[str, Any]]
    sample: Optional[dict] = None

    def data_record(self, data: dict, sizes: Optional[list[int]]) -> dict:
        """The recipe's data record as this set's stages record it: on the Figure 3 axis, with this
        size in place of the list, so each size's stages keep their identity when the list grows."""
        return data if sizes is None else {**data, "distill": to_dict(self.split)}

    def tag(self, sizes: Optional[list[int]]) -> str:
        """The suffix of its stages' names: none for a single set, ``-n<size>`` on the Figure 3 axis."""
        return "" if sizes is None else f"-n{self.split.subset}"


def _unlabeled(cfg: TransferConfig, part: UnlabeledSplit, labeled: bool) -> _Unlabeled:
    """The distillation split cut to ``part.subset`` (with its labels when a method trains with
    CE); on the Figure 3 axis a size the split cannot supply is refused (the curve would repeat the
    whole split under another size's name)."""
    dataset = open_split(cfg.data, part, cfg.seed, augment=True, labeled=labeled, role="distill")
    if labeled:
        _num_classes(dataset, "distill", part)
    listed = isinstance(cfg.data.distill.subset, list)
    if listed and len(dataset) < part.subset:
        raise ConfigError(f"data.distill.subset lists {part.subset}, but split {part.split!r} holds "
                          f"{len(dataset)} images; list sizes up to {len(dataset)}")
    if len(dataset) < cfg.distill.train.batch_size and any(m != "random" for m in cfg.distill.methods):
        raise ConfigError(f"distill.train.batch_size={cfg.distill.train.batch_size} exceeds the {len(dataset)} "
                          f"unlabeled images of data.distill (subset {part.subset}); lower batch_size")
    return _Unlabeled(part, dataset, recipe_loss_options(cfg.distill, len(dataset)))


@dataclass
class _SegmentationData:
    """The labeled frames of the segmentation protocol, and the per-class IoU of every row so far."""

    train: Dataset
    test: Dataset
    info: dict[str, Any]
    classes: list[str]
    per_class: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: TransferConfig, engine: Engine) -> "_SegmentationData":
        train, test, info = segmentation_data(cfg.data, cfg.segmentation, cfg.seed)
        check_batches(cfg.segmentation, len(train), engine.world)
        return cls(train, test, info, list(test.classes))


def _judge(cfg, engine, method, student, probe_train, finetune_train, probe_test, view, num_classes, record,
           teacher: dict, distilled, timings, tag: str, data: dict,
           seg: Optional[_SegmentationData]) -> list[dict[str, Any]]:
    """The rows of one student under each protocol; ``tag`` ends its stages' names and ``data``
    is the data record of its later stages. Finetuning, which changes the student, comes last."""
    rows = []
    if "test" in cfg.protocols:
        rows.append({"method": method, "protocol": "test", "metric": "top1", "value": classify_top1(
            engine, student, probe_test, view, desc=f"test-{method}{tag}")})
    if "linear_probe" in cfg.protocols:
        t0 = time.perf_counter()
        result = linear_probe(engine, student, probe_train, probe_test, view, num_classes,
                              cfg.linear_probe, seed=cfg.seed, name=f"probe-{method}{tag}")
        timings[f"probe-{method}{tag}"] = time.perf_counter() - t0
        rows.append({"method": method, "protocol": "linear_probe", "metric": "top1", "value": result["top1"]})
    for mode in cfg.segmentation.encoder_modes if seg is not None else []:
        t0 = time.perf_counter()
        key = {"student": record["student"], "teacher": teacher, "data": data, "modality": record["modality"],
               "seed": cfg.seed, "method": method, "distilled": distilled, "mode": mode,
               "segmentation": record["segmentation"], "split": seg.info}
        result = segment(engine, cfg.segmentation, f"{method}{tag}", mode, student, seg.train, seg.test, view,
                         len(seg.classes), key, cfg.seed)
        timings[f"segment-{method}{tag}-{mode}"] = time.perf_counter() - t0
        rows += [{"method": method, "protocol": "segmentation", "metric": metric, "value": result[metric],
                  "encoder": mode} for metric in ("pixel_acc", "miou")]
        seg.per_class[f"{method}{tag} ({mode})"] = {c: (None if v != v else v) for c, v in zip(seg.classes, result["iou"])}
    if "finetune" in cfg.protocols:
        student.reset_classifier(num_classes)
        stage = supervised_stage(f"finetune-{method}{tag}", student, finetune_train, view, cfg.finetune,
                                  {"finetune": record["finetune"], "method": method,
                                   "data": data,
                                   "distill": distilled, "teacher": teacher,
                                   "student": record["student"], "seed": cfg.seed})
        result = engine.run(stage, lambda: {"top1": classify_top1(engine, student, probe_test, view,
                                                                 desc=f"finetune-{method}{tag} test")})
        timings[f"finetune-{method}{tag}"] = result.get("seconds", 0.0)
        rows.append({"method": method, "protocol": "finetune", "metric": "top1", "value": result["top1"]})
    return rows
