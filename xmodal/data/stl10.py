"""STL-10 from the official binary files, read lazily with ``np.memmap``.

Layout (``root/stl10_binary/``): ``{train,test,unlabeled}_X.bin`` hold uint8 images of
3 x 96 x 96, each channel stored column-major (MATLAB order), ``{train,test}_y.bin`` hold
one uint8 label 1..10 per image, ``class_names.txt`` one name per line and
``fold_indices.txt`` ten lines of 0-based train indices (the official 1000-image folds).
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from xmodal.data.augment import ImageAugment
from xmodal.data.base import UNLABELED, ImageDataset, PathLike, check_split, existing_dir, existing_file
from xmodal.errors import DataError

BASE_FOLDER = "stl10_binary"
IMAGE_SHAPE = (3, 96, 96)
IMAGE_BYTES = 3 * 96 * 96
SPLITS = {
    "train": ("train",), "test": ("test",), "unlabeled": ("unlabeled",), "train+unlabeled": ("train", "unlabeled"),
}
"""Each split and the official files it concatenates, in order."""


class BinaryImages:
    """The images of one ``*_X.bin`` file, mapped on first access in each process.

    The map is dropped when pickled (DataLoader workers under ``spawn``), so a 2.7 GB file is
    never copied; each worker maps it again.
    """

    def __init__(self, path: Path) -> None:
        self.path = existing_file(path, "STL-10 image file")
        size = os.path.getsize(self.path)
        if size == 0 or size % IMAGE_BYTES:
            raise DataError(
                f"{self.path} has {size} bytes, expected a positive multiple of {IMAGE_BYTES} "
                "(3x96x96 uint8 images); the file is truncated or not an STL-10 image file"
            )
        self.count = size // IMAGE_BYTES
        self._map: Optional[np.memmap] = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def __getitem__(self, index: int) -> Tensor:
        """Image ``index`` as ``(3, 96, 96)`` uint8, rows first."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.count, *IMAGE_SHAPE))
        # Stored column-major per channel: swap the last two axes to get (C, H, W).
        return torch.from_numpy(np.ascontiguousarray(self._map[index].transpose(0, 2, 1)))


def read_labels(path: Path, count: int) -> Tensor:
    """``(count,)`` int64 labels 0..9 from a ``*_y.bin`` file of uint8 labels 1..10."""
    raw = np.fromfile(existing_file(path, "STL-10 label file"), dtype=np.uint8)
    if len(raw) != count:
        raise DataError(f"{path} holds {len(raw)} labels, expected {count} (one per image of the _X.bin file)")
    if len(raw) and not (raw.min() >= 1 and raw.max() <= 10):
        raise DataError(f"{path} holds labels {raw.min()}..{raw.max()}, expected 1..10")
    return torch.from_numpy(raw.astype(np.int64) - 1)


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file."""
    return [line.strip() for line in existing_file(path).read_text().splitlines() if line.strip()]


def read_fold(path: Path, fold: int, count: int) -> Tensor:
    """0-based train indices of official fold ``fold`` (0..9) from ``fold_indices.txt``."""
    lines = read_lines(path)
    if not 0 <= fold < len(lines):
        raise DataError(f"fold {fold} requested; {path} has folds 0..{len(lines) - 1}")
    indices = torch.tensor([int(token) for token in lines[fold].split()], dtype=torch.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= count):
        raise DataError(f"{path} fold {fold} indexes outside the {count} training images")
    return indices


def download_stl10(root: Path) -> None:
    """Fetch and unpack the official archive (2.6 GB) into ``root``; checked by md5."""
    from torchvision.datasets import STL10
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(STL10.url, str(root), filename=STL10.filename, md5=STL10.tgz_md5)


def resolve_folder(root: Path) -> Path:
    """``root/stl10_binary``, or ``root`` itself when it already is that folder."""
    return root if (root / "class_names.txt").exists() or root.name == BASE_FOLDER else root / BASE_FOLDER


class STL10Dataset(ImageDataset):
    """STL-10 at 96 x 96: ``train`` (5000), ``test`` (8000), ``unlabeled`` (100000, label -1),
    ``train+unlabeled`` (105000, the train part labeled).

    Args:
        root: folder holding ``stl10_binary/`` (or that folder itself).
        split: one of :data:`SPLITS`.
        fold: keep only official training fold 0..9 (1000 images) of the train part.
        labeled: report labels; False gives -1 everywhere.
        download: fetch the official archive when the files are missing (never by default).
        augment, size, seed: see :class:`~xmodal.data.augment.ImageAugment`; CMC uses
            ``augment="resized_crop", size=64``.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        fold: Optional[int] = None,
        labeled: bool = True,
        download: bool = False,
        augment: Union[ImageAugment, str, None] = None,
        size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        check_split(split, list(SPLITS), "STL-10")
        root = Path(root).expanduser()
        if download and not (resolve_folder(root) / "class_names.txt").exists():
            root.mkdir(parents=True, exist_ok=True)
            download_stl10(root)
        self.folder = resolve_folder(existing_dir(root))
        existing_dir(self.folder, "STL-10 folder")
        self.parts = [BinaryImages(self.folder / f"{part}_X.bin") for part in SPLITS[split]]
        all_labels = torch.cat([self._part_labels(part, images) for part, images in zip(SPLITS[split], self.parts)])
        self.rows = torch.arange(len(all_labels))
        if fold is not None:
            if SPLITS[split][0] != "train":
                raise DataError(f"fold={fold} selects training images; split {split!r} has none")
            num_train = len(self.parts[0])
            fold_rows = read_fold(self.folder / "fold_indices.txt", fold, num_train)
            self.rows = torch.cat([fold_rows, self.rows[num_train:]])
        labels = all_labels[self.rows]
        super().__init__(labels, read_lines(self.folder / "class_names.txt"), labeled, augment, size, seed)
        self.split = split
        self._offsets = np.cumsum([0] + [len(part) for part in self.parts]).tolist()

    def _part_labels(self, part: str, images: BinaryImages) -> Tensor:
        if part == "unlabeled":
            return torch.full((len(images),), UNLABELED, dtype=torch.int64)
        return read_labels(self.folder / f"{part}_y.bin", len(images))

    def read_image(self, index: int) -> Tensor:
        row = int(self.rows[index])
        part = bisect.bisect_right(self._offsets, row) - 1
        return self.parts[part][row - self._offsets[part]]
