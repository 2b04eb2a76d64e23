"""Segmentation evaluation: a distilled encoder under an smp U-Net / FPN decoder (CRD §4.3, NYU).

The decoder (and, with ``encoder: finetune``, the encoder too) trains with per-pixel
cross-entropy on the training frames; on the test frames the predictions are scored by

- pixel accuracy = correctly labelled pixels / labelled pixels;
- IoU of class c = TP / (TP + FP + FN), and mIoU = their mean over the classes that occur in
  the ground truth or the prediction of the test set. A class absent from both has no defined
  IoU (0 / 0) and is left out of the mean rather than counted as 0 or 100.

Void pixels (label 255) count nowhere, whatever is predicted there. Everything comes from one
``(C, C)`` confusion matrix summed over batches and over processes, so the numbers do not
depend on the batch size or on how the test frames are shared among processes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.config import NOT_IDENTITY
from xmodal.data.base import IGNORE_INDEX
from xmodal.engine import Engine
from xmodal.stage import Stage
from xmodal.errors import ConfigError, DataError
from xmodal.models.base import Backbone
from xmodal.models.segmentation import DECODERS, build_segmenter
from xmodal.schema import ImageDataConfig, OptimConfig, SplitConfig, TrainConfig
from xmodal.data.subset import SubsetDataset, open_split
from xmodal.tasks.seg_pictures import save_pictures
from xmodal.tasks.supervised import supervised_stage

ENCODER_MODES = ("frozen", "finetune")
SPLITS = ("auto", "official", "holdout")
OUTPUT_STRIDE = 32  # smp's decoders need inputs divisible by the encoder's total stride

ViewFn = Callable[[Mapping[str, Tensor]], Tensor]


@dataclass
class SegmentationConfig:
    """How the segmentation protocol trains and measures.

    Attributes:
        decoder: ``unet`` or ``fpn`` (smp).
        encoder_modes: ``frozen`` (only the decoder trains; judges the representation itself)
            and/or ``finetune`` (encoder and decoder train); one result row per mode.
        split: ``official`` = decoder trained on the labeled train frames, measured on the
            labeled test frames; ``holdout`` = the labeled test frames are split in two
            (``holdout_train`` of them train, the rest measure), for data whose train frames
            carry no labels (the 18-frame mini set); ``auto`` = official when the train split
            has labeled frames, else holdout.
        holdout_train: frames that train the decoder under ``holdout`` (a seeded choice).
        train: the decoder's schedule.
        eval_batch_size: global batch size of the test pass.
        pictures: save RGB | depth | ground truth | prediction for every test frame.
    """

    decoder: str = "unet"
    encoder_modes: list[str] = field(default_factory=lambda: ["frozen"], metadata=NOT_IDENTITY)  # each mode: its own stage
    split: str = "auto"
    holdout_train: int = 5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=20, batch_size=8, optim=OptimConfig(name="adam", lr=1e-3, weight_decay=0.0)))
    eval_batch_size: int = field(default=8, metadata=NOT_IDENTITY)
    pictures: bool = field(default=True, metadata=NOT_IDENTITY)

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ConfigError(f"segmentation.decoder={self.decoder!r}: expected one of {sorted(DECODERS)}")
        unknown = [m for m in self.encoder_modes if m not in ENCODER_MODES]
        if unknown or not self.encoder_modes:
            raise ConfigError(f"segmentation.encoder_modes={self.encoder_modes}: expected a non-empty subset of {list(ENCODER_MODES)}")
        if self.split not in SPLITS:
            raise ConfigError(f"segmentation.split={self.split!r}: expected one of {list(SPLITS)}")
        if self.holdout_train < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"segmentation.holdout_train={self.holdout_train}, eval_batch_size={self.eval_batch_size}: "
                              "expected both >= 1")


# ------------------------------------------------------------------- metrics
def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Counts of (ground truth, prediction) pairs over the labelled pixels.

    Args:
        prediction: ``(*)`` predicted classes in ``0..C-1``.
        target: ``(*)`` same shape, classes in ``0..C-1`` or ``ignore_index`` (void).

    Returns:
        ``(C, C)`` int64, row = ground truth, column = prediction.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 255]), 2)
        tensor([[1, 0],
                [0, 1]])
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    truth, guess = target[keep].long(), prediction[keep].long()
    for name, values in (("target", truth), ("prediction", guess)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise DataError(f"{name} holds class {int(values.max())}: expected 0..{num_classes - 1} or {ignore_index} (void)")
    return torch.bincount(truth * num_classes + guess, minlength=num_classes**2).reshape(num_classes, num_classes)


def sum_over_processes(counts: Tensor) -> Tensor:
    """``counts`` summed over every process of the run (itself when there is one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


def segmentation_scores(confusion: Tensor) -> dict[str, Any]:
    """``pixel_acc``, ``miou`` (percent) and per-class ``iou`` (percent, NaN where undefined).

    ``iou[c]`` is NaN when class c occurs neither in the ground truth nor in the prediction; such
    classes are left out of ``miou``. With no labelled pixel at all both scores are NaN.
    """
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
    total = confusion.sum()
    pixel_acc = float(hits.sum() / total) if total > 0 else float("nan")
    miou = float(iou.nanmean()) if bool((union > 0).any()) else float("nan")
    return {"pixel_acc": 100.0 * pixel_acc, "miou": 100.0 * miou, "iou": (100.0 * iou).tolist()}


# ------------------------------------------------------------------- models
class PaddedSegmenter(nn.Module):
    """An smp model that takes any ``H, W``: the input is zero-padded at the bottom and right
    to a multiple of the encoder's stride, and the logits are cropped back.

    ``(B, C_in, H, W)`` -> ``(B, num_classes, H, W)``. Zero is the depth encoding's mean (and
    its value for missing depth), so the padding adds no fake structure.
    """

    def __init__(self, model: nn.Module, stride: int = OUTPUT_STRIDE) -> None:
        super().__init__()
        self.model, self.stride = model, stride

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, -width % self.stride, 0, -height % self.stride))
        return self.model(padded)[..., :height, :width]


def segmenter_for(student: Backbone, decoder: str, num_classes: int, mode: str) -> PaddedSegmenter:
    """A segmenter on a copy of ``student``'s encoder, so each mode starts from the same weights."""
    model = build_segmenter(copy.deepcopy(student), decoder, num_classes, freeze_encoder=mode == "frozen")
    return PaddedSegmenter(model)


def masked_cross_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy over labelled pixels; 0 (with a graph) for an all-void batch."""
    total = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (mask != IGNORE_INDEX).sum().clamp(min=1)


def segmentation_stage(name: str, segmenter: nn.Module, dataset: Dataset, view: ViewFn, train: TrainConfig,
                       record: Mapping[str, Any]) -> Stage:
    """The engine stage that trains ``segmenter`` on ``view(batch)`` against ``batch["mask"]``."""
    return supervised_stage(name, segmenter, dataset, view, train, record,
                            loss=lambda out, batch: masked_cross_entropy(out, batch["mask"]))


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_segmentation(engine: Engine, segmenter: nn.Module, dataset: Dataset, view: ViewFn, num_classes: int,
                          batch_size: int = 8, on_batch: Optional[Callable[[dict, Tensor], None]] = None,
                          desc: str = "segmentation test") -> dict[str, Any]:
    """Scores of ``segmenter`` on ``dataset`` (every process takes its share; counts are summed).

    ``on_batch(batch, prediction)`` sees each of this process's batches with its ``(B, H, W)``
    predicted classes (e.g. to draw pictures).
    """
    was_training = segmenter.training
    segmenter.eval().to(engine.device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=engine.device)
    for batch in engine.batches(dataset, batch_size, desc):
        with engine.autocast():
            prediction = segmenter(view(batch)).argmax(1)
        confusion += confusion_matrix(prediction, batch["mask"], num_classes)
        if on_batch is not None:
            on_batch(batch, prediction)
    segmenter.train(was_training)
    confusion = sum_over_processes(confusion)
    if int(confusion.sum()) == 0:
        raise DataError(f"the {len(dataset)} segmentation test frames hold no labelled pixel (all void)")
    return {**segmentation_scores(confusion.cpu()), "confusion": confusion.cpu().tolist()}


# --------------------------------------------------------------------- splits
def holdout_split(train_pool: Dataset, test_pool: Dataset, n_train: int, seed: int) -> tuple[SubsetDataset, SubsetDataset]:
    """Split labeled frames in two: ``n_train`` (a seeded choice) to train, the rest to test.

    ``train_pool`` and ``test_pool`` hold the same frames (the first augmented, the second not).
    """
    size = len(test_pool)
    if len(train_pool) != size:
        raise ValueError(f"train_pool ({len(train_pool)}) and test_pool ({size}) must hold the same frames")
    if not 1 <= n_train < size:
        raise ConfigError(
            f"segmentation.holdout_train={n_train} leaves no {'test' if n_train >= size else 'training'} frames: "
            f"there are {size} labeled frames to split; expected 1..{size - 1}"
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return SubsetDataset(train_pool, order[:n_train].sort().values), SubsetDataset(test_pool, order[n_train:].sort().values)


def frame_numbers(dataset: Dataset) -> list[int]:
    """The official frame number of each sample of an NYU dataset, or of a subset of one."""
    if isinstance(dataset, SubsetDataset):
        base = frame_numbers(dataset.base)
        return [base[int(i)] for i in dataset.keep]
    frames: Optional[Sequence[int]] = getattr(dataset, "frames", None)
    return [int(f) for f in frames] if frames is not None else list(range(len(dataset)))


def picture_dir(output_dir: Path, method: str, mode: str) -> Path:
    """Where the test pictures of one (method, encoder mode) go."""
    return output_dir / "pictures" / f"{method}-{mode}"


# ------------------------------------------------------------------ protocol
def _frames(data: ImageDataConfig, split: str, seed: int, augment: bool) -> Dataset:
    return open_split(data, SplitConfig(split), seed, augment=augment, labeled=True, role="segmentation")


def segmentation_data(data: ImageDataConfig, seg: SegmentationConfig, seed: int) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(train frames, test frames, a description) of the labeled frames of ``data``."""
    split, reason = seg.split, ""
    if split in ("auto", "official"):
        try:
            train = _frames(data, "train", seed, augment=True)
            split = "official"
        except DataError as err:
            if split == "official":
                raise DataError(f"segmentation.split=official: {err}; data whose train frames carry no labels "
                                "(e.g. the mini set) needs segmentation.split=holdout") from None
            split, reason = "holdout", f"no labeled train frames ({err})"
    if split == "official":
        test = _frames(data, "test", seed, augment=False)
    else:
        train, test = holdout_split(*(_frames(data, "test", seed, augment=a) for a in (True, False)), seg.holdout_train, seed)
    if len(test) and "mask" not in test[0]:
        raise ConfigError(f"protocols: segmentation scores per-pixel labels, and dataset {data.name!r} has none "
                          "(nyu has); remove segmentation from protocols")
    info = {"split": split, "train_frames": frame_numbers(train), "test_frames": frame_numbers(test)}
    return train, test, {**info, **({"why": reason} if reason else {})}


def check_batches(seg: SegmentationConfig, n_train: int, world: int) -> None:
    """Batch sizes the labeled frames can fill and the processes can share, before anything trains."""
    for key, batch, size in (("segmentation.train.batch_size", seg.train.batch_size, n_train),
                             ("segmentation.eval_batch_size", seg.eval_batch_size, None)):
        if size is not None and batch > size:
            raise ConfigError(f"{key}={batch} exceeds the {size} frames it trains on; expected <= {size}")
        if batch % world:
            raise ConfigError(f"{key}={batch} must be divisible by the number of processes ({world})")


def segment(engine: Engine, seg: SegmentationConfig, name: str, mode: str, student: Backbone, train: Dataset,
            test: Dataset, view: ViewFn, num_classes: int, key: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train and score one segmenter on ``student``'s encoder (stage ``segment-<name>-<mode>``);
    pictures of the test frames."""
    torch.manual_seed(seed + 2)  # every method's decoder starts from the same weights
    segmenter = segmenter_for(student, seg.decoder, num_classes, mode)
    frames, folder = frame_numbers(test), picture_dir(engine.output_dir, name, mode)

    def draw(batch, prediction) -> None:
        if seg.pictures:
            save_pictures(folder, frames, batch, prediction)

    stage = segmentation_stage(f"segment-{name}-{mode}", segmenter, train, view, seg.train, key)
    return engine.run(stage, lambda: evaluate_segmentation(engine, segmenter, test, view, num_classes, seg.eval_batch_size,
                                                           on_batch=draw, desc=f"segment-{name}-{mode} test"))


def segmentation_extra(seg: SegmentationConfig, classes: Sequence[str], split: dict[str, Any],
                       per_class: dict[str, dict[str, Optional[float]]]) -> dict[str, str]:
    """The report's context lines: the protocol, its frames, and the per-class IoU of every row."""
    extra = {"segmentation": f"{seg.decoder} decoder, {len(classes)} classes, split '{split['split']}': "
                             f"trained on frames {split['train_frames']}, scored on frames {split['test_frames']}; "
                             "void ignored; mIoU over classes present in ground truth or prediction"}
    for row, ious in per_class.items():
        extra[f"IoU {row}"] = ", ".join(f"{c} {'—' if v is None else f'{v:.1f}'}" for c, v in ious.items())
    return extra
