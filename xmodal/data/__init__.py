"""Datasets in xmodal's sample format, built by name from a recipe.

Every dataset returns dicts: ``{"image": uint8 (3, H, W), "label": int64 (), "index": int64 ()}``
for classification/colour sets, plus ``"depth"`` / ``"mask"`` (and no ``"label"``) for
NYU-Depth-V2. Workers only decode and apply geometric augmentation drawn from
``(seed, epoch, index)``; colour conversion happens on the device.

Example:
    >>> train = build_dataset("synthetic", None, "train", augment="crop")
    >>> train.set_epoch(0)
    >>> sample = train[0]  # {"image": (3, 32, 32) uint8, "label": ..., "index": 0}
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

from torch.utils.data import Dataset

from xmodal.data.augment import ImageAugment, RGBDAugment, sample_generator
from xmodal.data.base import IGNORE_INDEX, UNLABELED, ImageDataset, PathLike, existing_dir
from xmodal.data.cifar import CIFARDataset
from xmodal.data.folder import ImageFolderDataset
from xmodal.data.nyu import NYUDepthV2Base, NYUDepthV2Folder, NYUDepthV2Mat, nyu_dataset
from xmodal.data.stl10 import STL10Dataset
from xmodal.data.synthetic import SyntheticShapes
from xmodal.errors import DataError


def _imagefolder(root: PathLike, split: str, **options: Any) -> Dataset:
    # A split is a sub-folder (``cifar10/train``); "all" means root is the class tree itself.
    if split == "all":
        return ImageFolderDataset(root, **options)
    folder = existing_dir(root) / split
    if not folder.is_dir():
        raise DataError(
            f"no folder {folder} for split {split!r}; use split='all' if {root} itself holds the class folders"
        )
    return ImageFolderDataset(folder, **options)


_BUILDERS: dict[str, Callable[..., Dataset]] = {
    "synthetic": lambda root, split, **options: SyntheticShapes(split, **options),
    "imagefolder": _imagefolder,
    "stl10": lambda root, split, **options: STL10Dataset(root, split, **options),
    "cifar10": lambda root, split, **options: CIFARDataset(root, split, num_classes=10, **options),
    "cifar100": lambda root, split, **options: CIFARDataset(root, split, num_classes=100, **options),
    "nyu": nyu_dataset,
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`, sorted."""
    return sorted(_BUILDERS)


def build_dataset(name: str, root: Optional[PathLike], split: str, **options: Any) -> Dataset:
    """The dataset ``name`` at ``root`` (``None`` for ``"synthetic"``), split ``split``.

    ``options`` go to the dataset class (e.g. ``augment="crop"``, ``size=64``, ``labeled=False``,
    ``subset=5000``, ``num_classes=13``). For ``"imagefolder"`` the split is the sub-folder
    ``root/<split>`` (``"all"``: root is the class tree itself); for ``"nyu"`` a file root
    means the official ``.mat`` and a folder root the PNG layout.

    Raises:
        DataError: unknown name (naming the nearest valid one), unknown option, missing root,
            bad data.
    """
    if name not in _BUILDERS:
        near = difflib.get_close_matches(name, _BUILDERS, n=1, cutoff=0.0)
        names = ", ".join(available_datasets())
        raise DataError(f"unknown dataset {name!r}; did you mean {near[0]!r}? Available: {names}")
    if root is None and name != "synthetic":
        raise DataError(f"dataset {name!r} needs a data root (root=None is only valid for 'synthetic')")
    try:
        return _BUILDERS[name](root, split, **options)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise DataError(f"dataset {name!r} does not take that option: {error}") from None


__all__ = [
    "IGNORE_INDEX", "UNLABELED", "CIFARDataset", "ImageAugment", "ImageDataset", "ImageFolderDataset",
    "NYUDepthV2Base", "NYUDepthV2Folder", "NYUDepthV2Mat", "RGBDAugment", "STL10Dataset", "SyntheticShapes",
    "available_datasets", "build_dataset", "nyu_dataset", "sample_generator",
]
