"""One split of a recipe's dataset, as a stage reads it; class-balanced subsets with memory-bank
rows renumbered."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from xmodal.data import build_dataset
from xmodal.data.folder import balanced_subset
from xmodal.errors import ConfigError
from xmodal.schema import ImageDataConfig, SplitConfig


class SubsetDataset(Dataset):
    """Rows ``keep`` of ``base``; sample ``i`` reports ``index = i`` (its memory-bank row).

    Augmentation still keys on the base dataset's own index, so a sample looks the same in the
    subset as in the full set. ``labels``, ``class_labels``, ``classes`` and ``set_epoch`` are
    forwarded.
    """

    def __init__(self, base: Dataset, keep: Tensor) -> None:
        self.base, self.keep = base, keep.long()

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.base[int(self.keep[i])])
        sample["index"] = torch.tensor(i, dtype=torch.int64)
        return sample

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.base, "classes", []))

    @property
    def labels(self) -> Tensor:
        return self.base.labels[self.keep]

    @property
    def class_labels(self) -> Tensor:
        return getattr(self.base, "class_labels", self.base.labels)[self.keep]


def class_balanced_subset(base: Dataset, size: int, seed: int) -> SubsetDataset:
    """``size`` rows of ``base``, as equal per class as its class labels allow (seeded)."""
    labels = getattr(base, "class_labels", None)
    if labels is None or bool((labels < 0).all()):
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(base), generator=g)[:size].sort().values
    else:
        keep = balanced_subset(labels, size, seed)
    return SubsetDataset(base, keep)


def open_split(data: ImageDataConfig, part: SplitConfig, seed: int, *, augment: bool, labeled: bool) -> Dataset:
    """Split ``part.split`` of ``data`` with the training augmentation when ``augment``, labels
    when ``labeled``, cut to a class-balanced ``part.subset`` (seeded) when one is set."""
    options = dict(data.options)
    for key in ("augment", "labeled"):  # each stage decides these itself
        if key in options:
            raise ConfigError(f"data.options.{key} is set by each stage of the recipe; remove it (see data.augment)")
    options.setdefault("seed", seed)
    dataset = build_dataset(data.name, data.root, part.split, augment=data.augment if augment else None,
                            labeled=labeled, **options)
    if part.subset is not None and part.subset < len(dataset):
        dataset = class_balanced_subset(dataset, part.subset, seed)
    return dataset
