"""NYU-Depth-V2 RGB-D frames with segmentation masks, from two layouts:

- the official labeled file ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5, 2.8 GB), read
  lazily with h5py one frame at a time (:class:`NYUDepthV2Mat`);
- a folder of PNGs, ``rgb/NNNN.png``, ``depth/NNNN.png`` (uint16 mm), ``label13/NNNN.png``
  (uint8, 1..13, 0 void; optional per frame) and ``meta/*.mat`` (:class:`NYUDepthV2Folder`),
  like the 18-frame mini set used by the tests.

Frames keep their official 1-based numbers, so the official split (``splits.mat``) applies to
both. A sample is ``{"image": uint8 (3, H, W) RGB, "depth": float32 (1, H, W) metres
(0 = missing), "mask": int64 (H, W) 0..C-1 with void = 255, "index": int64 ()}``; a frame
without labels gets an all-255 mask, so every batch has the same keys.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import h5py
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xmodal.data.augment import RGBDAugment
from xmodal.data.base import (
    IGNORE_INDEX, AugmentedDataset, PathLike, check_split, checked_index, existing_dir, existing_file, scalar,
)
from xmodal.data.folder import decode_file
from xmodal.data.nyu_meta import (
    MAPPING13_FILE, MAPPING40_FILE, NYU13_CLASSES, SPLIT_FILE, apply_lut, find_meta_file, identity_lut,
    load_mapping13, load_splits, raw_label_lut,
)
from xmodal.errors import DataError

SPLITS = ("train", "test", "all")


def select_frames(available: np.ndarray, split: str, split_file: Optional[Path], strict: bool) -> np.ndarray:
    """The ``available`` 1-based frame numbers that belong to ``split``.

    ``strict``: every frame of the split must be available (a complete .mat file); otherwise
    the split is intersected with what is there (a partial folder such as the mini set).
    """
    if split == "all":
        return available
    if split_file is None:
        raise DataError(f"split {split!r} needs the official {SPLIT_FILE}; none found (pass meta_dir=FOLDER)")
    wanted = load_splits(split_file)[split]
    missing = np.setdiff1d(wanted, available)
    if strict and missing.size:
        raise DataError(
            f"{split_file} lists {split} frames up to {wanted.max()}, but the data holds frames "
            f"{available.min()}..{available.max()} (first missing: {missing[:5].tolist()})"
        )
    return np.intersect1d(available, wanted)


class NYUDepthV2Base(AugmentedDataset):
    """Shared selection, augmentation and sample assembly; subclasses implement :meth:`read_frame`.

    Attributes:
        frames: ``(N,)`` official 1-based frame numbers, sample i = frame ``frames[i]``.
        has_labels: ``(N,)`` bool, whether frame ``frames[i]`` carries a label map.
        num_classes: C; masks hold 0..C-1 and 255 (void).
        classes: the C class names, mask value k names ``classes[k]`` (empty when unknown).
        geometry: the :class:`RGBDAugment` (output size, zoom range).
    """

    def __init__(
        self,
        frames: np.ndarray,
        has_labels: np.ndarray,
        num_classes: int,
        classes: Sequence[str],
        labeled_only: bool,
        augment: bool,
        size: Optional[tuple[int, int]],
        scale: tuple[float, float],
        seed: int,
    ) -> None:
        super().__init__(seed)
        keep = has_labels if labeled_only else np.ones(len(frames), dtype=bool)
        self.frames, self.has_labels = frames[keep], has_labels[keep]
        if len(self.frames) == 0:
            what = "labeled frames" if labeled_only else "frames"
            raise DataError(f"no {what} left in {type(self).__name__} after the split")
        self.num_classes = num_classes
        self.classes = list(classes)
        self.augment = bool(augment)
        self.geometry = RGBDAugment(size=None if size is None else tuple(size), scale=tuple(scale))

    def read_frame(self, frame: int) -> tuple[Tensor, Tensor, Tensor]:
        """Frame ``frame`` (1-based) at full size: RGB (3,H,W) uint8, depth (1,H,W) float32, mask (H,W) int64."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = checked_index(index, len(self), self)
        image, depth, mask = self.read_frame(int(self.frames[index]))
        generator = self.generator(index) if self.augment else None
        image, depth, mask = self.geometry(image, depth, mask, generator)
        return {"image": image, "depth": depth, "mask": mask, "index": scalar(index)}


def void_mask(height: int, width: int) -> Tensor:
    """An all-void ``(H, W)`` int64 mask for frames without labels."""
    return torch.full((height, width), IGNORE_INDEX, dtype=torch.int64)


class H5Frames:
    """Lazy reader of the labeled ``.mat``; the HDF5 file is opened once per process.

    MATLAB writes arrays column-major, so in HDF5 the axes come reversed: ``images`` is
    ``(N, 3, W, H)``, ``depths`` and ``labels`` ``(N, W, H)``; :meth:`read` transposes back.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = existing_file(path, "NYU-Depth-V2 file")
        with self._open() as file:
            self.count, self.height, self.width, self.has_labels = self._layout(file)
        self._file: Optional[h5py.File] = None
        self._pid: Optional[int] = None

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as error:
            raise DataError(
                f"cannot read {self.path} as HDF5 (MATLAB v7.3): truncated or corrupt? ({error})"
            ) from error

    def _layout(self, file: h5py.File) -> tuple[int, int, int, bool]:
        for key in ("images", "depths"):
            if key not in file:
                raise DataError(f"{self.path} has no dataset {key!r}; found keys {sorted(file.keys())}")
        images, depths = file["images"], file["depths"]
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"{self.path}: 'images' is {images.shape}, expected (N, 3, W, H) as MATLAB writes it")
        shapes = {"depths": depths.shape, **({"labels": file["labels"].shape} if "labels" in file else {})}
        for key, shape in shapes.items():
            if shape != (images.shape[0], *images.shape[2:]):
                raise DataError(
                    f"{self.path}: '{key}' is {shape} but 'images' is {images.shape}; RGB, depth and labels "
                    "must have one (W, H) map per frame"
                )
        return images.shape[0], images.shape[3], images.shape[2], "labels" in file

    def __getstate__(self) -> dict:
        # An open h5py handle must not cross into a worker: each process opens its own.
        return {**self.__dict__, "_file": None, "_pid": None}

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = self._open(), os.getpid()
        return self._file

    def read(self, row: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Frame at 0-based ``row``: RGB (3, H, W) uint8, depth (H, W) float32 m, labels (H, W) or None."""
        file = self._handle()
        try:
            image = np.ascontiguousarray(file["images"][row].transpose(0, 2, 1))
            depth = np.ascontiguousarray(file["depths"][row].T, dtype=np.float32)
            labels = np.ascontiguousarray(file["labels"][row].T) if self.has_labels else None
        except OSError as error:
            raise DataError(f"cannot read frame {row + 1} of {self.path}: truncated or corrupt? ({error})") from error
        return image, depth, labels


class NYUDepthV2Mat(NYUDepthV2Base):
    """The official labeled ``.mat`` (1449 frames), raw 894 classes mapped to 40 or 13.

    Args:
        path: ``nyu_depth_v2_labeled.mat``.
        split: ``"train"`` (795), ``"test"`` (654) or ``"all"``.
        num_classes: 40 (``classMapping40.mat``) or 13 (that, then ``class13Mapping.mat``).
        meta_dir: where ``splits.mat`` and the mappings are (also tried: ``meta_dir/meta``);
            default the file's folder.
        size: output ``(H, W)``; ``None`` keeps 480 x 640.
        augment: random zoom in ``scale`` / crop / flip, jointly on RGB, depth and mask.
        labeled_only: the .mat labels every frame; kept for symmetry with the folder layout.
    """

    def __init__(
        self,
        path: PathLike,
        split: str = "all",
        num_classes: int = 13,
        meta_dir: Optional[PathLike] = None,
        size: Optional[tuple[int, int]] = (240, 320),
        augment: bool = False,
        scale: tuple[float, float] = (1.0, 1.5),
        seed: int = 0,
        labeled_only: bool = False,
    ) -> None:
        check_split(split, SPLITS, "NYU-Depth-V2")
        if num_classes not in (13, 40):
            raise DataError(f"NYU-Depth-V2 labels come in 13 or 40 classes, got num_classes={num_classes}")
        self.file = H5Frames(path)
        places = [Path(meta_dir).expanduser() if meta_dir is not None else self.file.path.parent]
        self.lut, classes = self._label_lut(num_classes, places)
        available = np.arange(1, self.file.count + 1)
        frames = select_frames(available, split, find_meta_file(SPLIT_FILE, places), strict=True)
        has_labels = np.full(len(frames), self.file.has_labels)
        super().__init__(frames, has_labels, num_classes, classes, labeled_only, augment, size, scale, seed)

    def _label_lut(self, num_classes: int, places: list[Path]) -> tuple[np.ndarray, list[str]]:
        mapping40 = find_meta_file(MAPPING40_FILE, places)
        if mapping40 is None:
            if self.file.has_labels:
                raise DataError(f"{self.file.path} has raw labels; mapping them needs {MAPPING40_FILE} in {places[0]}")
            return identity_lut(num_classes), list(NYU13_CLASSES) if num_classes == 13 else []
        return raw_label_lut(num_classes, mapping40, find_meta_file(MAPPING13_FILE, places))

    def read_frame(self, frame: int) -> tuple[Tensor, Tensor, Tensor]:
        image, depth, labels = self.file.read(frame - 1)
        mask = (
            void_mask(*depth.shape) if labels is None
            else torch.from_numpy(apply_lut(labels, self.lut, f"{self.file.path} frame {frame}"))
        )
        return torch.from_numpy(image), torch.from_numpy(np.nan_to_num(depth))[None], mask


def read_png(path: Path, modes: Sequence[str], expected: str) -> np.ndarray:
    """Pixels of a PNG whose PIL mode is one of ``modes``; DataError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            mode, pixels = image.mode, np.array(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode {path}: expected {expected} ({error})") from error
    if mode not in modes:
        raise DataError(f"{path} is a {mode} image, expected {expected}")
    return pixels


def frame_numbers(folder: Path) -> np.ndarray:
    """Sorted 1-based frame numbers from ``folder/NNNN.png`` names."""
    names = sorted(path.stem for path in folder.glob("*.png"))
    if not names:
        raise DataError(f"no frames found in {folder}, expected {folder}/NNNN.png (official 1-based frame numbers)")
    bad = [name for name in names if not name.isdigit()]
    if bad:
        raise DataError(f"{folder}/{bad[0]}.png: expected names NNNN.png with the official 1-based frame number")
    return np.array([int(name) for name in names], dtype=np.int64)


class NYUDepthV2Folder(NYUDepthV2Base):
    """Frames as PNG files (``rgb/``, ``depth/`` in mm, ``label13/`` optional) with ``meta/``.

    Args:
        root: the folder holding ``rgb/``, ``depth/``, ``label13/`` and ``meta/``.
        split: ``"train"``, ``"test"`` or ``"all"``: the official split, restricted to the
            frames present.
        num_classes: 13 (the only labels this layout carries).
        meta_dir: where ``splits.mat`` and ``class13Mapping.mat`` are (also tried:
            ``meta_dir/meta``); default ``root``, i.e. ``root/meta``.
        size, augment, scale, seed, labeled_only: as in :class:`NYUDepthV2Mat`;
            ``labeled_only`` keeps the frames that have a ``label13`` file.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "all",
        num_classes: int = 13,
        meta_dir: Optional[PathLike] = None,
        size: Optional[tuple[int, int]] = (240, 320),
        augment: bool = False,
        scale: tuple[float, float] = (1.0, 1.5),
        seed: int = 0,
        labeled_only: bool = False,
    ) -> None:
        check_split(split, SPLITS, "NYU-Depth-V2")
        if num_classes != 13:
            raise DataError(f"the folder layout carries 13-class labels (label13/) only, got num_classes={num_classes}")
        self.root = existing_dir(root)
        available = frame_numbers(existing_dir(self.root / "rgb", "RGB folder"))
        for frame in available:
            existing_file(self.path("depth", frame), f"depth of frame {frame}")
        places = [Path(meta_dir).expanduser() if meta_dir is not None else self.root]
        frames = select_frames(available, split, find_meta_file(SPLIT_FILE, places), strict=False)
        has_labels = np.array([self.path("label13", frame).is_file() for frame in frames], dtype=bool)
        mapping13 = find_meta_file(MAPPING13_FILE, places)
        classes = load_mapping13(mapping13)[1] if mapping13 is not None else list(NYU13_CLASSES)
        self.lut = identity_lut(13)
        super().__init__(frames, has_labels, 13, classes, labeled_only, augment, size, scale, seed)

    def path(self, kind: str, frame: int) -> Path:
        """``root/<kind>/NNNN.png`` of a 1-based frame number."""
        return self.root / kind / f"{frame:04d}.png"

    def read_frame(self, frame: int) -> tuple[Tensor, Tensor, Tensor]:
        image = decode_file(self.path("rgb", frame))
        depth_mm = read_png(self.path("depth", frame), ("I;16", "I;16B", "I"), "a 16-bit PNG of millimetres")
        self._check_size(frame, "depth", image.shape[-2:], depth_mm.shape)
        depth = torch.from_numpy(depth_mm.astype(np.float32) / 1000.0)[None]
        label_path = self.path("label13", frame)
        if not label_path.is_file():
            return image, depth, void_mask(*depth_mm.shape)
        labels = read_png(label_path, ("L", "P"), "an 8-bit PNG of 13-class labels (0 = void)")
        self._check_size(frame, "label13", image.shape[-2:], labels.shape)
        return image, depth, torch.from_numpy(apply_lut(labels, self.lut, str(label_path)))

    def _check_size(self, frame: int, kind: str, rgb_hw: Sequence[int], other_hw: Sequence[int]) -> None:
        if tuple(rgb_hw) != tuple(other_hw):
            raise DataError(
                f"frame {frame}: {self.path('rgb', frame)} is {tuple(rgb_hw)} but "
                f"{self.path(kind, frame)} is {tuple(other_hw)}; RGB, depth and labels must be pixel-aligned"
            )


def nyu_dataset(root: PathLike, split: str = "all", labeled: bool = False, augment: Any = False,
                **options) -> NYUDepthV2Base:
    """:class:`NYUDepthV2Mat` when ``root`` is a file, :class:`NYUDepthV2Folder` when a folder.

    ``labeled``: only frames with labels (``labeled_only``); ``augment``: an augmentation name
    other than ``"none"`` (or ``True``) turns on the joint zoom / crop / flip of RGB, depth and labels.
    """
    options["labeled_only"] = bool(options.get("labeled_only", False) or labeled)
    options["augment"] = augment not in (None, False, "none")
    path = Path(root).expanduser()
    if path.is_file():
        return NYUDepthV2Mat(path, split, **options)
    if path.is_dir():
        return NYUDepthV2Folder(path, split, **options)
    raise DataError(f"data root {path} does not exist (expected nyu_depth_v2_labeled.mat or a frame folder)")
