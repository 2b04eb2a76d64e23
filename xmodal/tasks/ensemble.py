"""Ensemble distillation (CRD §4.4, Figure 4): one student, M teachers, one critic per teacher.

Stages, each resumable and skipped when an earlier run in the same ``output_dir`` finished it:

1. ``teacher-<i>``: the pool's members, trained with labels on their own views (or loaded);
   each member's test top-1 and, for each M, the first M members' averaged-softmax top-1;
2. for each student seed: ``ce-s<seed>`` (no teacher), then for each M in
   ``distill.n_teachers`` and each method, ``<method>-m<M>-s<seed>``: a fresh student (the same
   initial weights for every method of a seed) trained on the student view with
   ``γ·CE + α·KD(averaged soft labels) + Σ_i w_i·CRD(S, T_i)`` from the first M teachers;
3. each student's top-1 on the test split; the report averages over student seeds.

Methods (RepDistiller's weights): ``ce`` (γ=1), ``kd_ensemble`` (γ=0.1, α=0.9, T=4),
``crd_ensemble`` (γ=1, β=0.8 per critic), ``crd_kd_ensemble`` (γ=1, α=1, β=0.8).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.config import NOT_IDENTITY, identity, to_dict
from xmodal.engine import Engine
from xmodal.stage import Stage
from xmodal.errors import ConfigError
from xmodal.modalities import Modality, modality_from_config, view_fn
from xmodal.schema import DistillSection, ImageDataConfig, ModalityConfig, ModelConfig, RunConfig, SplitConfig, \
    check_same_classes
from xmodal.tasks.ensemble_pool import Member, PoolSection, build_pool, check_checkpoints, data_order, ensemble_top1, \
    resolve_pool
from xmodal.tasks.evaluation import classify_top1, top1
from xmodal.data.subset import check_classifiable, open_split
from xmodal.tasks import register_task
from xmodal.tasks.distill import Method, distill_stages, teacher_scales
from xmodal.tasks.supervised import build_backbone, export, supervised_stage

#: Loss weights of each method: γ on CE, α on KD from the averaged ensemble, β on every critic.
METHODS: dict[str, dict[str, float]] = {
    "ce": {"ce": 1.0},
    "kd_ensemble": {"ce": 0.1, "kd": 0.9},
    "crd_ensemble": {"ce": 1.0, "crd": 0.8},
    "crd_kd_ensemble": {"ce": 1.0, "kd": 1.0, "crd": 0.8},
}
TERMS = ("ce", "kd", "crd")


@dataclass
class EnsembleData(ImageDataConfig):
    """The labeled dataset: ``train`` teaches teachers and students, ``test`` judges them."""

    train: SplitConfig = field(default_factory=lambda: SplitConfig("train"))
    # scored after training: not part of a student's stage identity
    test: SplitConfig = field(default_factory=lambda: SplitConfig("test"), metadata=NOT_IDENTITY)


@dataclass
class EnsembleConfig(RunConfig):
    """Schema of recipes with ``task: ensemble``."""

    task: str = "ensemble"
    student_seeds: list[int] = field(default_factory=lambda: [0])
    data: EnsembleData = field(default_factory=EnsembleData)
    modality: ModalityConfig = field(default_factory=lambda: ModalityConfig("identity", "rgb", "rgb"))
    teachers: PoolSection = field(default_factory=lambda: PoolSection(count=4))
    student: ModelConfig = field(default_factory=lambda: ModelConfig("resnet8", {"width": 8}))
    distill: DistillSection = field(default_factory=lambda: DistillSection(
        methods=list(METHODS), n_teachers=[1, 2, 4, 8], loss_options={"crd": {"nce_k": 4096, "negatives": "class"}}))

    def __post_init__(self) -> None:
        d = self.distill
        unknown = [m for m in d.methods if m not in METHODS]
        if unknown or not d.methods:
            raise ConfigError(f"distill.methods={d.methods}: expected a non-empty subset of {list(METHODS)}")
        if set(d.weights) - set(TERMS):
            raise ConfigError(f"distill.weights={d.weights}: expected weights of terms among {list(TERMS)} "
                              "(each overrides that term in every method that has it)")
        if set(d.loss_options) - {"crd", "kd"}:
            raise ConfigError(f"distill.loss_options: options of {sorted(set(d.loss_options) - {'crd', 'kd'})}; "
                              "the ensemble methods use crd and kd")
        if d.ce_weight:
            raise ConfigError("distill.ce_weight: each ensemble method sets its own CE weight; "
                              "override it with distill.weights.ce")
        if not d.n_teachers:
            raise ConfigError("distill.n_teachers: list the numbers of teachers M to distil from, e.g. [1, 2, 4]")
        if not self.student_seeds or len(set(self.student_seeds)) != len(self.student_seeds):
            raise ConfigError(f"student_seeds={self.student_seeds}: expected distinct seeds")
        check_same_classes(self.data.train, "data.train", self.data.test, "data.test")


def method_terms(distill: DistillSection, method: str) -> dict[str, float]:
    """``{"ce": γ, "kd": α, "crd": β}`` of ``method`` with the recipe's overrides of its terms."""
    return {**METHODS[method], **{k: float(v) for k, v in distill.weights.items() if k in METHODS[method]}}


# ----------------------------------------------------------------- datasets
def _teacher_counts(cfg: EnsembleConfig, pool_size: int) -> list[int]:
    counts = sorted(cfg.distill.n_teachers)
    if counts[-1] > pool_size:
        raise ConfigError(f"distill.n_teachers asks for {counts[-1]} teachers but the pool has {pool_size}; "
                          "raise teachers.count or lower distill.n_teachers")
    return counts


# -------------------------------------------------------------------- stages
def student_stage(cfg: EnsembleConfig, engine: Engine, method: str, members: Sequence[Member],
                  teachers: Sequence[nn.Module], train_set: Dataset, sample: dict[str, Tensor], modality: Modality,
                  num_classes: int, scales: Optional[Sequence[float]], seed: int,
                  record: dict[str, Any]) -> tuple[Stage, nn.Module]:
    """The stage that trains one student from ``teachers`` (none for ``ce``) with ``method``,
    through :class:`xmodal.distiller.Distiller` (one critic per teacher, KD from the averaged soft labels).

    ``sample`` is one batch of ``train_set`` on the device: the losses read feature widths from it.
    """
    student = build_backbone(cfg.student, modality.student_channels, num_classes, seed)
    student.to(engine.device)
    terms = method_terms(cfg.distill, method)
    # The stage's identity: only what changes this student (a CE student ignores the CRD options).
    config = {**record, "method": method, "terms": terms, "seed": seed}
    if not members:
        stage = supervised_stage(f"train-{method}-s{seed}", student, train_set, view_fn(modality, modality.student_view),
                                 cfg.distill.train, config)
        return stage, student
    config.update(teachers=[m.identity for m in members], teacher_train=to_dict(cfg.teachers.train))
    losses = {name: weight for name, weight in terms.items() if name != "ce" and weight}
    # critic i of student seed s is seeded s + i (its banks and negatives)
    options = {"crd": {**cfg.distill.loss_options.get("crd", {}), "seed": seed}, "kd": cfg.distill.loss_options.get("kd", {})}
    try:
        stages = distill_stages(
            engine, method, student, [(t, m.view) for t, m in zip(teachers, members)], modality, train_set,
            cfg.distill.train, weights=losses, loss_options={k: v for k, v in options.items() if k in losses},
            ce_weight=terms.get("ce", 0.0), record=config, sample=sample, tag=f"-m{len(teachers)}-s{seed}",
            spec=Method(losses, warm_start=cfg.distill.warm_start),
            teacher_weights=scales)
    except ConfigError as err:
        raise ConfigError(f"{method} with {len(teachers)} teachers: {err}") from None
    return stages[-1], student


# ------------------------------------------------------------------- runner
@register_task("ensemble", EnsembleConfig, ("test",))
def run_ensemble(cfg: EnsembleConfig, engine: Engine) -> dict[str, Any]:
    """M teachers trained here on labels -> one student (CE, KD, one critic per teacher), test top-1 against M."""
    began = time.perf_counter()
    modality = modality_from_config(cfg.modality)
    members = resolve_pool(cfg.teachers, modality)
    counts = _teacher_counts(cfg, len(members))
    teacher_scales(cfg.distill, len(members), len(members))  # a wrong-length list fails before training
    train_set = open_split(cfg.data, cfg.data.train, cfg.seed, augment=True, labeled=True, role="train")
    test_set = open_split(cfg.data, cfg.data.test, cfg.seed, augment=False, labeled=True, role="test")
    check_classifiable(train_set, test_set, "data.train", "data.test")
    if not getattr(train_set, "classes", None):
        raise ConfigError(f"dataset {cfg.data.name!r} split {cfg.data.train.split!r} has no classes: ensembles need labels")
    num_classes = len(train_set.classes)
    check_checkpoints(members, modality, num_classes, f"{cfg.data.name} {cfg.data.train.split}")
    record = identity(cfg)
    # cfg.seed picks the subset, the augmentation draws and the teachers' data order.
    shared = {"data": record["data"], "modality": record["modality"], "run_seed": cfg.seed}
    timings: dict[str, float] = {}

    # 1. the teacher pool (only the members some M uses)
    t0 = time.perf_counter()
    used = members[: counts[-1]] if set(cfg.distill.methods) - {"ce"} else []
    teachers, test_logits, test_labels = build_pool(engine, used, modality, train_set, test_set, num_classes,
                                                    cfg.teachers.train, shared)
    timings["teachers"] = time.perf_counter() - t0
    pool = {
        "members": [{"member": m.describe(), "view": m.view, "top1": top1(logits, test_labels),
                     "checkpoint_sha256": m.identity.get("checkpoint_sha256")} for m, logits in zip(used, test_logits)],
        "ensemble_top1": {str(m): ensemble_top1(test_logits[:m], test_labels) for m in counts if used},
    }

    # 2. students, one seed at a time, every method from the same initial weights
    student_record = {**shared, "student": record["student"], "train": record["distill"]["train"]}
    sample = engine.first_batch(train_set)
    per_seed = []
    for seed in cfg.student_seeds:
        runs = [("ce", 0)] if "ce" in cfg.distill.methods else []
        runs += [(method, m) for m in counts for method in cfg.distill.methods if method != "ce"]
        for method, m in runs:
            t0 = time.perf_counter()
            with data_order(engine, cfg.seed + seed):
                stage, student = student_stage(cfg, engine, method, used[:m], teachers[:m], train_set, sample,
                                               modality, num_classes, teacher_scales(cfg.distill, len(members), m), seed,
                                               student_record)
                result = engine.run(stage, lambda: {"top1": classify_top1(
                    engine, student, test_set, view_fn(modality, modality.student_view), desc=f"{stage.name} test")})
            export(engine, f"students/{method}-m{m}-s{seed}", student)
            timings[stage.name] = time.perf_counter() - t0
            per_seed.append({"method": method, "n_teachers": m, "seed": seed, "top1": result["top1"]})
    return {
        "results": _mean_rows(per_seed, cfg.distill.methods),
        "per_seed": per_seed,
        "teachers": pool,
        "extra": _summary(cfg, pool, len(train_set), len(test_set)),
        "timings": {**timings, "total": time.perf_counter() - began},
    }


def _mean_rows(per_seed: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    keys = list(dict.fromkeys((r["method"], r["n_teachers"]) for r in per_seed))
    for method, m in sorted(keys, key=lambda k: (methods.index(k[0]), k[1])):
        values = [r["top1"] for r in per_seed if (r["method"], r["n_teachers"]) == (method, m)]
        spread = {"sd": statistics.stdev(values)} if len(values) > 1 else {}
        rows.append({"method": method, "protocol": "test", "metric": "top1", "value": statistics.fmean(values),
                     "n_teachers": m, **spread})
    return rows


def _summary(cfg: EnsembleConfig, pool: dict[str, Any], n_train: int, n_test: int) -> dict[str, str]:
    members = "; ".join(f"{i}: {p['member']} {p['top1']:.2f}" for i, p in enumerate(pool["members"]))
    ensemble = ", ".join(f"M={m}: {v:.2f}" for m, v in pool["ensemble_top1"].items())
    d, t = cfg.distill.train, cfg.teachers.train
    return {
        "teachers (test top1)": members or "none",
        "teacher ensemble (averaged softmax, test top1)": ensemble or "none",
        "students": f"{cfg.student.arch} {cfg.student.options} on {cfg.modality.student_view}, "
                    f"mean over seeds {cfg.student_seeds}",
        "budget": f"{n_train} training / {n_test} test images; teachers {t.epochs} epochs, students {d.epochs} "
                  f"epochs at batch {d.batch_size}; CRD {cfg.distill.loss_options.get('crd', {})}, warm start {cfg.distill.warm_start}",
    }
