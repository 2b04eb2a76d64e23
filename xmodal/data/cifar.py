"""CIFAR-10 / CIFAR-100 from the official python pickles.

``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``root/cifar-100-python/{train, test, meta}``: each batch is a pickled dict whose ``data`` is
``(N, 3072)`` uint8 (1024 R, 1024 G, 1024 B, rows first) with ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100). The file names come from torchvision's readers; the pickles are
read here because torchvision insists on the official md5 sums, which small test files and
re-packed copies do not have.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100

from xmodal.data.augment import ImageAugment
from xmodal.data.base import ImageDataset, PathLike, check_split, existing_dir, existing_file
from xmodal.errors import DataError

_READERS = {10: CIFAR10, 100: CIFAR100}
_LABEL_KEYS = {10: "labels", 100: "fine_labels"}
_NAME_KEYS = {10: "label_names", 100: "fine_label_names"}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and numpy arrays and nothing else.

    The official batches are pickles, a format that can name any callable; a file put in place of
    one (a shared or downloaded dataset folder) must not run code. Only numpy's array
    reconstruction is resolved; any other global is refused.
    """

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[str, Any]:
    """One official batch file; DataError naming it when it is not a CIFAR pickle."""
    try:
        with existing_file(path, "CIFAR batch file").open("rb") as handle:
            entry = _ArraysOnly(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a readable CIFAR pickle ({error})") from error
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, expected a dict")
    return entry


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` of one batch file."""
    entry = read_pickle(path)
    key = _LABEL_KEYS[num_classes]
    if "data" not in entry or key not in entry:
        raise DataError(f"{path} lacks 'data' or {key!r} (keys found: {sorted(entry)}); is it CIFAR-{num_classes}?")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: data {data.shape} and {len(labels)} labels, expected (N, 3072) and N labels")
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise DataError(f"{path} holds labels {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """The class names stored in the ``batches.meta`` / ``meta`` pickle."""
    meta, key = read_pickle(path), _NAME_KEYS[num_classes]
    if key not in meta or len(meta[key]) != num_classes:
        raise DataError(f"{path} should hold {num_classes} names under {key!r} (keys found: {sorted(meta)})")
    return list(meta[key])


def batch_files(num_classes: int, split: str) -> list[str]:
    """Names of the official files of ``split`` ("train" / "test")."""
    reader = _READERS[num_classes]
    return [name for name, _md5 in (reader.train_list if split == "train" else reader.test_list)]


class CIFARDataset(ImageDataset):
    """CIFAR-10 or CIFAR-100 (fine labels), all images held in memory (150 MB).

    Args:
        root: folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        split: ``"train"`` (50000) or ``"test"`` (10000).
        num_classes: 10 or 100.
        labeled: report labels; False gives -1 (``class_labels`` keeps them).
        download: fetch the official archive via torchvision when missing (never by default).
        augment, size, seed: see :class:`~xmodal.data.augment.ImageAugment` (``"crop"`` is
            the standard 4-px-padded crop + flip).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        num_classes: int = 10,
        labeled: bool = True,
        download: bool = False,
        augment: Union[ImageAugment, str, None] = None,
        size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        check_split(split, ["train", "test"], f"CIFAR-{num_classes}")
        if num_classes not in _READERS:
            raise DataError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
        reader = _READERS[num_classes]
        if download:
            reader(str(root), train=split == "train", download=True)
        folder = existing_dir(existing_dir(root) / reader.base_folder, f"CIFAR-{num_classes} folder")
        batches = [read_batch(folder / name, num_classes) for name in batch_files(num_classes, split)]
        self.images = torch.from_numpy(np.concatenate([images for images, _ in batches]))
        labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
        classes = read_class_names(folder / reader.meta["filename"], num_classes)
        super().__init__(labels, classes, labeled, augment, size, seed)
        self.split = split
        self.num_classes = num_classes

    def read_image(self, index: int) -> Tensor:
        return self.images[index]
