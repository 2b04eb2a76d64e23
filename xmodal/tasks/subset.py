"""A class-balanced subset of any xmodal dataset, with memory-bank rows renumbered."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from xmodal.data.folder import balanced_subset


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
