"""One split of a recipe's dataset, as a stage reads it; class selections and class-balanced
subsets, with memory-bank rows renumbered."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from xmodal.data import build_dataset
from xmodal.data.base import UNLABELED
from xmodal.data.folder import balanced_subset
from xmodal.errors import ConfigError
from xmodal.schema import ImageDataConfig, SplitConfig


class SubsetDataset(Dataset):
    """Rows ``keep`` of ``base``; sample ``i`` reports ``index = i`` (its memory-bank row).

    Augmentation still keys on the base dataset's own index, so a sample looks the same in the
    subset as in the full set. ``labels``, ``class_labels``, ``classes`` and ``set_epoch`` are
    forwarded; with ``classes`` (base class indices), class ``classes[j]`` is reported as ``j``
    and the other classes' rows must not be in ``keep``.
    """

    def __init__(self, base: Dataset, keep: Tensor, classes: Optional[Sequence[int]] = None) -> None:
        self.base, self.keep = base, keep.long()
        names = list(getattr(base, "classes", []))
        self.relabel: Optional[Tensor] = None  # base class -> reported class (-1: not selected)
        if classes is not None:
            self.relabel = torch.full((len(names),), UNLABELED, dtype=torch.int64)
            self.relabel[torch.tensor(list(classes), dtype=torch.int64)] = torch.arange(len(classes))
            names = [names[c] for c in classes]
        self._names = names

    def __len__(self) -> int:
        return len(self.keep)

    def _mapped(self, labels: Tensor) -> Tensor:
        if self.relabel is None:
            return labels
        return torch.where(labels >= 0, self.relabel[labels.clamp(min=0)], labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.base[int(self.keep[i])])
        sample["index"] = torch.tensor(i, dtype=torch.int64)
        if "label" in sample:
            sample["label"] = self._mapped(torch.as_tensor(sample["label"]))
        return sample

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    @property
    def classes(self) -> list[str]:
        return list(self._names)

    @property
    def labels(self) -> Tensor:
        return self._mapped(self.base.labels[self.keep])

    @property
    def class_labels(self) -> Tensor:
        return self._mapped(getattr(self.base, "class_labels", self.base.labels)[self.keep])


def class_indices(dataset: Dataset, wanted: Sequence[str], where: str) -> list[int]:
    """Indices into ``dataset.classes`` of ``wanted``: each a class name or, failing that, an
    index; ConfigError naming ``where`` for an unknown class, a repeat, or a set without classes."""
    names = list(getattr(dataset, "classes", []) or [])
    known = getattr(dataset, "class_labels", None)
    if not names or known is None or bool((known < 0).all()):
        raise ConfigError(f"{where}: this split's images carry no classes to select from")
    if not wanted:
        raise ConfigError(f"{where}: empty; list at least one class, e.g. {names[:2]}")
    picked = []
    for item in wanted:
        item = str(item)
        if item in names:
            picked.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            picked.append(int(item))
        else:
            raise ConfigError(f"{where}: unknown class {item!r}; the split's classes are {names} "
                              f"(or their indices 0..{len(names) - 1})")
    repeated = sorted({names[c] for c in picked if picked.count(c) > 1})
    if repeated:
        raise ConfigError(f"{where}: class {repeated[0]!r} listed twice")
    return picked


def select_classes(base: Dataset, classes: Sequence[int]) -> SubsetDataset:
    """The images of ``base`` whose class is in ``classes`` (base indices, from
    :func:`class_indices`, which has checked that ``base`` has ``class_labels``), relabelled by
    position."""
    keep = torch.isin(base.class_labels, torch.tensor(list(classes), dtype=torch.int64)).nonzero()[:, 0]
    return SubsetDataset(base, keep, classes)


def class_balanced_subset(base: Dataset, size: int, seed: int) -> SubsetDataset:
    """``size`` rows of ``base``, as equal per class as its class labels allow (seeded)."""
    labels = getattr(base, "class_labels", None)
    if labels is None or bool((labels < 0).all()):
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(base), generator=g)[:size].sort().values
    else:
        keep = balanced_subset(labels, size, seed)
    return SubsetDataset(base, keep)


def open_split(data: ImageDataConfig, part: SplitConfig, seed: int, *, augment: bool, labeled: bool,
               role: str) -> Dataset:
    """Split ``part.split`` of ``data`` with the training augmentation when ``augment``, labels
    when ``labeled``, cut to ``part.classes`` (relabelled in their order) and then to a
    class-balanced ``part.subset`` (seeded) when they are set."""
    options = dict(data.options)
    for key in ("augment", "labeled"):  # each stage decides these itself
        if key in options:
            raise ConfigError(f"data.options.{key} is set by each stage of the recipe; remove it (see data.augment)")
    options.setdefault("seed", seed)
    dataset = build_dataset(data.name, data.root, part.split, augment=data.augment if augment else None,
                            labeled=labeled, **options)
    if part.classes is not None:
        dataset = select_classes(dataset, class_indices(dataset, part.classes, f"data.{role}.classes"))
    if part.subset is not None and part.subset < len(dataset):
        dataset = class_balanced_subset(dataset, part.subset, seed)
    return dataset


def check_classifiable(train: Dataset, test: Dataset, train_key: str, test_key: str) -> None:
    """ConfigError, before anything trains, for labeled splits no classifier can be judged on:
    fewer than two classes, a class without images in either split, or a test split whose
    classes are not the training split's (an ImageFolder's train/ and test/ with other folders)."""
    names = list(getattr(train, "classes", []))
    if list(getattr(test, "classes", [])) != names:
        missing = sorted(set(names) - set(test.classes)) or sorted(set(test.classes) - set(names))
        raise ConfigError(f"{train_key} and {test_key} hold different classes ({len(names)} against "
                          f"{len(test.classes)}; first difference: {missing[:3]}); a classifier is scored on "
                          "the classes it learnt: give splits of the same classes, or choose them with .classes=[...]")
    if len(names) < 2:
        raise ConfigError(f"{train_key} holds {len(names)} class{'' if len(names) == 1 else 'es'} {names}: "
                          "a classifier needs at least two")
    for key, dataset in ((train_key, train), (test_key, test)):
        labels = dataset.labels
        counts = torch.bincount(labels[labels >= 0], minlength=len(names))
        empty = [names[i] for i in (counts == 0).nonzero()[:, 0].tolist()]
        if empty:
            raise ConfigError(f"{key} has no images of class{'es' if len(empty) > 1 else ''} {empty[:5]} "
                              f"({len(dataset)} images, {len(names)} classes); give every class images, or "
                              f"keep the others with {key}.classes=[...]")
