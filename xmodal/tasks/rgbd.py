"""RGB -> depth on NYU-Depth-V2 (CRD §4.3): a depth student learns from an ImageNet RGB teacher
on paired RGB-D frames without labels, then is judged by semantic segmentation.

Stages, each resumable and skipped when an earlier run in the same ``output_dir`` finished it:

1. teacher: an ImageNet RGB network (``efficientnet_lite0`` with the packaged weights by
   default, or any backbone with its own pretrained weights or ``teacher.checkpoint``), frozen;
   nothing trains it here;
2. distill-<method>: for each method a fresh depth student (same seed, so every method starts
   from the same weights; an smp encoder with ``in_channels=1``) learns from the teacher on
   the RGB-D pairs of ``data.distill.split``; ``random`` trains nothing;
3. segment-<method>-<mode>: the student's encoder under an smp U-Net / FPN decoder, frozen or
   finetuned, trained on labeled frames and scored on held-out labeled frames
   (:mod:`xmodal.tasks.segmentation`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

import losses

from xmodal.config import identity
from xmodal.data import build_dataset
from xmodal.engine import Engine
from xmodal.errors import ConfigError, DataError
from xmodal.modalities import modality_from_config, view_fn
from xmodal.models import load_weights_into
from xmodal.models.checkpoint import CheckpointFile, open_checkpoint, taught_by
from xmodal.schema import DataConfig, DistillSection, ModalityConfig, ModelConfig, RunConfig, SplitConfig
from xmodal.tasks import register_task
from xmodal.tasks.distill import distill_stages, needs_logits, resolve_method
from xmodal.tasks.seg_pictures import save_legend, save_pictures
from xmodal.tasks.segmentation import (
    SegmentationConfig, evaluate_segmentation, frame_numbers, holdout_split, picture_dir, segmentation_stage,
    segmenter_for,
)
from xmodal.data.subset import class_balanced_subset
from xmodal.tasks.supervised import build_backbone, configured_model, export

#: What each pretrained teacher's weights expect as input (``modality.options.rgb_norm``).
TEACHER_RGB_NORM = {"efficientnet_lite0": "lite0"}


@dataclass
class RGBDDataSection(DataConfig):
    """The NYU-Depth-V2 data: ``root`` is the labeled ``.mat`` file or a frame folder;
    ``options``: size, scale, num_classes, meta_dir."""

    name: str = "nyu"
    distill: SplitConfig = field(default_factory=lambda: SplitConfig("all"))

    def __post_init__(self) -> None:
        if self.distill.classes is not None:
            raise ConfigError("data.distill.classes: NYU-Depth-V2 frames carry no image classes to select from")


@dataclass
class RGBTeacherSection:
    """The frozen RGB teacher: pretrained weights (``model.options``) or ``checkpoint``.

    ``num_classes``: outputs of its ImageNet head (KD reads those logits); 0 = no head. Only
    factories that keep their pretrained head at that count give KD real logits
    (``efficientnet_lite0``, the torchvision ResNets); smp encoders have no head to keep.
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig("efficientnet_lite0", {"pretrained": True}))
    checkpoint: Optional[str] = None
    num_classes: int = 1000


@dataclass
class RGBDConfig(RunConfig):
    """Schema of recipes with ``task: rgbd``."""

    task: str = "rgbd"
    data: RGBDDataSection = field(default_factory=RGBDDataSection)
    modality: ModalityConfig = field(default_factory=lambda: ModalityConfig("depth", "rgb", "depth", {"rgb_norm": "lite0"}))
    teacher: RGBTeacherSection = field(default_factory=RGBTeacherSection)
    student: ModelConfig = field(default_factory=lambda: ModelConfig("smp_resnet18"))
    distill: DistillSection = field(default_factory=lambda: DistillSection(methods=["random", "kd", "fitnet", "at", "crd"]))
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)

    def __post_init__(self) -> None:
        if self.data.name != "nyu" or self.modality.name != "depth":
            raise ConfigError(f"task rgbd reads data 'nyu' through modality 'depth', got data.name={self.data.name!r}, "
                              f"modality.name={self.modality.name!r}")
        if not self.data.root:
            raise ConfigError("data.root: give nyu_depth_v2_labeled.mat or a frame folder "
                              "(e.g. data.root=/path/to/nyuv2-mini)")
        d = self.distill
        unused = {"ce_weight": d.ce_weight or None, "n_teachers": d.n_teachers, "teacher_weights": d.teacher_weights,
                  "split_crd_weight": d.split_crd_weight or None}
        for key, value in unused.items():
            if value is not None:
                raise ConfigError(f"distill.{key}: task rgbd distils one teacher without labels; remove it")
        for method in self.distill.methods:
            resolve_method(method, self.distill.weights)  # an unknown method fails before anything trains
        if self.teacher.num_classes == 0 and any(needs_logits(m) for m in self.distill.methods):
            raise ConfigError("distill.methods reads teacher logits (kd) but teacher.num_classes=0")
        _check_rgb_norm(self)


def _check_rgb_norm(cfg: RGBDConfig) -> None:
    """The RGB view must be normalised as the teacher's pretrained weights expect."""
    arch, options = cfg.teacher.model.arch, cfg.teacher.model.options
    pretrained = options.get("pretrained") or options.get("weights")
    if not pretrained and not cfg.teacher.checkpoint:
        raise ConfigError(f"teacher {arch!r} has no weights: set teacher.model.options.pretrained / weights "
                          "or teacher.checkpoint (this task does not train the teacher)")
    expected = TEACHER_RGB_NORM.get(arch, "imagenet") if pretrained and not cfg.teacher.checkpoint else None
    given = cfg.modality.options.get("rgb_norm", "imagenet")
    if expected is not None and given != expected:
        raise ConfigError(f"modality.options.rgb_norm={given!r}, but the pretrained weights of teacher {arch!r} "
                          f"expect {expected!r} input normalisation")


# ----------------------------------------------------------------- datasets
def _nyu(cfg: RGBDConfig, split: str, augment: bool, labeled_only: bool) -> Dataset:
    options = {"seed": cfg.seed, **cfg.data.options}
    return build_dataset(cfg.data.name, cfg.data.root, split, augment=augment, labeled_only=labeled_only, **options)


def segmentation_data(cfg: RGBDConfig) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(train frames, test frames, a description) for the segmentation protocol."""
    seg = cfg.segmentation
    split, reason = seg.split, ""
    if split in ("auto", "official"):
        try:
            train = _nyu(cfg, "train", augment=True, labeled_only=True)
            split = "official"
        except DataError as err:
            if split == "official":
                raise DataError(f"segmentation.split=official: {err}; data whose train frames carry no labels "
                                "(e.g. the mini set) needs segmentation.split=holdout") from None
            split, reason = "holdout", f"no labeled train frames ({err})"
    if split == "official":
        test = _nyu(cfg, "test", augment=False, labeled_only=True)
    else:
        pool = (_nyu(cfg, "test", augment=a, labeled_only=True) for a in (True, False))
        train, test = holdout_split(*pool, seg.holdout_train, cfg.seed)
    info = {"split": split, "train_frames": frame_numbers(train), "test_frames": frame_numbers(test)}
    return train, test, {**info, **({"why": reason} if reason else {})}


def _distill_set(cfg: RGBDConfig) -> Dataset:
    dataset = _nyu(cfg, cfg.data.distill.split, augment=True, labeled_only=False)
    subset = cfg.data.distill.subset
    return class_balanced_subset(dataset, subset, cfg.seed) if subset is not None and subset < len(dataset) else dataset


def bank_options(loss_options: dict[str, dict[str, Any]], n_data: int) -> dict[str, dict[str, Any]]:
    """``loss_options`` with each memory-bank critic's ``nce_k`` capped at ``n_data - 1``.

    Negatives are drawn without replacement among the other rows, so a small set (18 frames of
    the mini set) cannot supply the paper's K = 16384; the K in force is in the report.
    """
    options = {name: dict(values) for name, values in loss_options.items()}
    for name in losses.available():
        if losses.get(name).memory_bank:
            options[name] = losses.get(name).capped_options(options.get(name, {}), n_data)
    return options


def _check_batches(cfg: RGBDConfig, n_distill: int, n_seg: int, world: int) -> None:
    """Batch sizes that the data can fill and the processes can share, checked before anything trains."""
    for key, batch, size in (("distill.train.batch_size", cfg.distill.train.batch_size, n_distill),
                             ("segmentation.train.batch_size", cfg.segmentation.train.batch_size, n_seg),
                             ("segmentation.eval_batch_size", cfg.segmentation.eval_batch_size, None)):
        if size is not None and batch > size:
            raise ConfigError(f"{key}={batch} exceeds the {size} frames it trains on; expected <= {size}")
        if batch % world:
            raise ConfigError(f"{key}={batch} must be divisible by the number of processes ({world})")


# -------------------------------------------------------------------- stages
def _teacher(cfg: RGBDConfig, engine: Engine, in_channels: int, held: Optional[CheckpointFile]) -> nn.Module:
    model = cfg.teacher.model
    teacher = configured_model(model, in_channels, cfg.teacher.num_classes)
    if held is not None:
        load_weights_into(teacher, held, role="teacher")
    return teacher.to(engine.device).eval().requires_grad_(False)


@register_task("rgbd", RGBDConfig, ("segmentation",))
def run_rgbd(cfg: RGBDConfig, engine: Engine) -> dict[str, Any]:
    """An ImageNet RGB teacher -> a depth student on NYU-Depth-V2, judged by semantic segmentation."""
    began = time.perf_counter()
    modality = modality_from_config(cfg.modality)
    student_view = view_fn(modality, modality.student_view)

    distill_set = _distill_set(cfg)
    seg_train, seg_test, split_info = segmentation_data(cfg)
    _check_batches(cfg, len(distill_set), len(seg_train), engine.world)
    classes = list(seg_test.classes)
    loss_options = bank_options(cfg.distill.loss_options, len(distill_set))
    # Read once: the sha256 the students record is that of the weights loaded.
    held = open_checkpoint(cfg.teacher.checkpoint, role="teacher") if cfg.teacher.checkpoint else None
    teacher = _teacher(cfg, engine, modality.teacher_channels, held)
    record = identity(cfg)
    record["teacher"] = taught_by(record["teacher"], held)
    # distill_stages adds the rest of a distillation's identity (terms, each term's options, warm
    # banks, a first stage's schedule): recording every method's options here as well made one
    # method's stages depend on another's.
    distill_key = {"student": record["student"], "teacher": record["teacher"], "data": record["data"],
                   "modality": record["modality"], "seed": cfg.seed, "distill": record["distill"]["train"]}
    timings: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    per_class: dict[str, dict[str, Optional[float]]] = {}
    sample = engine.first_batch(distill_set)  # the losses read feature shapes from it
    for method in cfg.distill.methods:
        t0 = time.perf_counter()
        student = build_backbone(cfg.student, modality.student_channels,
                                 cfg.teacher.num_classes if needs_logits(method) else 0, cfg.seed + 1)
        stages = [] if method == "random" else distill_stages(
            engine, method, student, [(teacher, modality.teacher_view)], modality, distill_set, cfg.distill.train,
            weights=cfg.distill.weights, loss_options=loss_options, init_cfg=cfg.distill.init_train,
            warm_start=cfg.distill.warm_start, record=distill_key, sample=sample)
        for stage in stages:
            engine.run(stage)
        if stages:  # the distilled depth encoder, before any segmentation training
            export(engine, f"students/{method}", student)
        timings[f"distill-{method}"] = time.perf_counter() - t0
        distilled = stages[-1].config if stages else None  # the segmentation starts from this student
        for mode in cfg.segmentation.encoder_modes:
            t0 = time.perf_counter()
            result = _segment(cfg, engine, method, mode, student, seg_train, seg_test, student_view, len(classes),
                              {**distill_key, "method": method, "distilled": distilled, "mode": mode,
                               "segmentation": record["segmentation"], "split": split_info})
            timings[f"segment-{method}-{mode}"] = time.perf_counter() - t0
            rows += [{"method": method, "protocol": "segmentation", "metric": metric, "value": result[metric],
                      "encoder": mode} for metric in ("pixel_acc", "miou")]
            per_class[f"{method} ({mode})"] = {c: (None if v != v else v) for c, v in zip(classes, result["iou"])}
    if cfg.segmentation.pictures and engine.is_main:
        save_legend(engine.output_dir / "pictures" / "legend.png", classes)
    return {
        "results": rows,
        "teacher": {"arch": cfg.teacher.model.arch, "view": modality.teacher_view, "frozen": True,
                    "rgb_norm": modality.rgb_norm, "checkpoint": cfg.teacher.checkpoint,
                    "checkpoint_sha256": record["teacher"].get("checkpoint_sha256")},
        "per_class_iou": per_class,
        "segmentation_split": split_info,
        "extra": _extra(cfg, len(distill_set), loss_options, split_info, per_class, classes),
        "timings": {**timings, "total": time.perf_counter() - began},
    }


def _segment(cfg: RGBDConfig, engine: Engine, method: str, mode: str, student: nn.Module, train: Dataset,
             test: Dataset, view, num_classes: int, key: dict[str, Any]) -> dict[str, Any]:
    """Train and score one segmenter on ``student``'s encoder; pictures of the test frames."""
    seg = cfg.segmentation
    torch.manual_seed(cfg.seed + 2)  # every method's decoder starts from the same weights
    segmenter = segmenter_for(student, seg.decoder, num_classes, mode)
    frames, folder = frame_numbers(test), picture_dir(engine.output_dir, method, mode)

    def draw(batch, prediction) -> None:
        if seg.pictures:
            save_pictures(folder, frames, batch, prediction)

    stage = segmentation_stage(f"segment-{method}-{mode}", segmenter, train, view, seg.train, key)
    return engine.run(stage, lambda: evaluate_segmentation(engine, segmenter, test, view, num_classes,
                                                           seg.eval_batch_size, on_batch=draw,
                                                           desc=f"segment-{method}-{mode} test"))


def _extra(cfg: RGBDConfig, n_distill: int, loss_options: dict[str, dict[str, Any]], split: dict[str, Any],
           per_class: dict[str, dict[str, Optional[float]]], classes: list[str]) -> dict[str, str]:
    """The report's context lines: data, split, K, and the per-class IoU of every row."""
    terms = {t for m in cfg.distill.methods for t in resolve_method(m, cfg.distill.weights).terms}
    banks = ", ".join(f"{name} K = {loss_options[name]['nce_k']}" for name in sorted(terms)
                      if losses.get(name).memory_bank)
    extra = {
        "teacher": f"{cfg.teacher.model.arch} (frozen, RGB normalised '{cfg.modality.options.get('rgb_norm', 'imagenet')}')",
        "distillation": f"{n_distill} RGB-D frames of split '{cfg.data.distill.split}', no labels"
                        + (f"; memory-bank negatives: {banks} (at most N - 1)" if banks else ""),
        "segmentation": f"{cfg.segmentation.decoder} decoder, {len(classes)} classes, split '{split['split']}': "
                        f"trained on frames {split['train_frames']}, scored on frames {split['test_frames']}; "
                        "void ignored; mIoU over classes present in ground truth or prediction",
    }
    for row, ious in per_class.items():
        extra[f"IoU {row}"] = ", ".join(f"{c} {'—' if v is None else f'{v:.1f}'}" for c, v in ious.items())
    return extra
