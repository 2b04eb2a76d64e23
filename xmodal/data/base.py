"""The sample contract every xmodal dataset keeps, and the shared base of the image sets.

Classification/colour sets return ``{"image": uint8 (3, H, W), "label": int64 (),
"index": int64 ()}``; ``label`` is -1 when the sample is unlabeled and ``index`` is the
sample's row in the CRD memory bank. NYU-Depth-V2 adds ``"depth"`` and ``"mask"`` (see
:mod:`xmodal.data.nyu`).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from xmodal.data.augment import ImageAugment, sample_generator
from xmodal.errors import DataError

IGNORE_INDEX = 255
"""Void pixels in segmentation masks (``CrossEntropyLoss(ignore_index=IGNORE_INDEX)``)."""

UNLABELED = -1
"""The label of a sample whose class is unknown or withheld."""

PathLike = Union[str, Path]


def existing_dir(path: PathLike, what: str = "data root") -> Path:
    """``path`` as a Path; DataError when it is not an existing directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a directory")
    return path


def existing_file(path: PathLike, what: str = "file") -> Path:
    """``path`` as a Path; DataError when it is not an existing regular file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    return path


def check_split(split: str, valid: Sequence[str], dataset: str) -> str:
    """``split`` itself, or a DataError that lists the valid splits."""
    if split not in valid:
        raise DataError(f"unknown split {split!r} for {dataset}; expected one of {list(valid)}")
    return split


def checked_index(index: int, length: int, owner: object) -> int:
    """``index`` as an int; IndexError (which ends ``for sample in dataset``) when out of range."""
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {type(owner).__name__} of {length} samples")
    return index


def scalar(value: int) -> Tensor:
    """An int64 0-d tensor (default collate stacks these into a ``(B,)`` vector)."""
    return torch.tensor(value, dtype=torch.int64)


class AugmentedDataset(Dataset):
    """Holds the ``(seed, epoch)`` half of the augmentation key; the index is the other half.

    xmodal's loaders use non-persistent workers, so an epoch set in the main process before
    iterating reaches every worker of that epoch.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before each epoch's loader)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> random.Random:
        """The generator for sample ``index`` in the current epoch."""
        return sample_generator(self.seed, self.epoch, index)


class ImageDataset(AugmentedDataset):
    """Base of the classification/colour sets: subclasses implement :meth:`read_image`.

    Attributes:
        class_labels: ``(N,)`` int64, the true class of each sample, -1 where it is unknown
            (e.g. STL-10's unlabeled split). Available even when ``labeled=False``, for
            class-aware negative sampling.
        labels: ``(N,)`` int64, what samples report: ``class_labels``, or all -1 when
            ``labeled=False``.
        classes: class names, ``classes[k]`` for label k.
        augment: the :class:`ImageAugment` applied in ``__getitem__``.
    """

    def __init__(
        self,
        class_labels: Tensor,
        classes: Sequence[str],
        labeled: bool = True,
        augment: Union[ImageAugment, str, None] = None,
        size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.class_labels = class_labels.to(torch.int64)
        self.classes = list(classes)
        self.labeled = bool(labeled)
        self.augment = ImageAugment.of(augment, size)

    @property
    def labels(self) -> Tensor:
        """``(N,)`` int64 labels as reported by samples (-1 = unlabeled)."""
        return self.class_labels if self.labeled else torch.full_like(self.class_labels, UNLABELED)

    def read_image(self, index: int) -> Tensor:
        """The stored image ``index`` as ``(3, H, W)`` uint8, before augmentation."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.class_labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = checked_index(index, len(self), self)
        generator = self.generator(index) if self.augment.random else None
        image = self.augment(self.read_image(index), generator)
        label = int(self.class_labels[index]) if self.labeled else UNLABELED
        return {"image": image, "label": scalar(label), "index": scalar(index)}
