"""NYU-Depth-V2 metadata: the official split and the class mappings (MATLAB v5 files).

- ``splits.mat``: ``trainNdxs`` (795) and ``testNdxs`` (654), 1-based frame numbers.
- ``classMapping40.mat``: ``mapClass`` (1 x 894) raw class -> 40-class id (1-based),
  ``className`` (1 x 40).
- ``class13Mapping.mat``: struct ``classMapping13`` with ``labels13`` (1 x 40) 40-class id ->
  13-class id (1-based) and ``classNames`` (1 x 13).

Labels become lookup tables (LUTs) indexed by the stored label: stored 0 (void) -> 255
(:data:`~xmodal.data.base.IGNORE_INDEX`), stored k -> class k' - 1 in 0..C-1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import scipy.io

from xmodal.data.base import IGNORE_INDEX, existing_file
from xmodal.errors import DataError

NUM_RAW_CLASSES = 894
SPLIT_FILE = "splits.mat"
MAPPING40_FILE = "classMapping40.mat"
MAPPING13_FILE = "class13Mapping.mat"
NYU13_CLASSES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
    "picture", "sofa", "table", "tv", "wall", "window",
)
"""The 13 classes in label order (stored 1..13 -> 0..12), as in ``class13Mapping.mat``."""


def load_mat(path: Path) -> dict[str, np.ndarray]:
    """Variables of a MATLAB v5 file; DataError naming the file if scipy cannot read it."""
    path = existing_file(path, "MATLAB file")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises anything from IndexError to MatReadError on junk
        raise DataError(f"cannot read MATLAB file {path} ({error})") from error
    return {key: value for key, value in mat.items() if not key.startswith("__")}


def mat_variable(mat: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    """``mat[key]``, or a DataError that names the missing key and the keys found."""
    if key not in mat:
        raise DataError(f"{path} has no variable {key!r}; found {sorted(mat)}")
    return mat[key]


def _names(cells: np.ndarray) -> list[str]:
    """Strings out of a MATLAB cell array (loadmat gives nested object arrays)."""
    return [str(np.asarray(cell).ravel()[0]) if np.asarray(cell).size else "" for cell in np.asarray(cells).ravel()]


def load_splits(path: Path) -> dict[str, np.ndarray]:
    """``{"train": (795,), "test": (654,)}`` sorted int64 1-based frame numbers."""
    mat = load_mat(path)
    splits = {name: np.sort(mat_variable(mat, key, path).ravel().astype(np.int64))
              for name, key in (("train", "trainNdxs"), ("test", "testNdxs"))}
    if min(split.min(initial=1) for split in splits.values()) < 1:
        raise DataError(f"{path} holds frame numbers below 1; expected 1-based indices")
    if np.intersect1d(splits["train"], splits["test"]).size:
        raise DataError(f"{path}: trainNdxs and testNdxs share frames")
    return splits


def _checked_map(values: np.ndarray, length: int, top: int, what: str, path: Path) -> np.ndarray:
    values = values.ravel().astype(np.int64)
    if len(values) != length:
        raise DataError(f"{path}: {what} has {len(values)} entries, expected {length}")
    if values.min() < 1 or values.max() > top:
        raise DataError(f"{path}: {what} maps to {values.min()}..{values.max()}, expected 1..{top}")
    return values


def load_mapping40(path: Path) -> tuple[np.ndarray, list[str]]:
    """``(map (894,) int64 raw -> 1..40, 40 class names)`` from ``classMapping40.mat``."""
    mat = load_mat(path)
    mapping = _checked_map(mat_variable(mat, "mapClass", path), NUM_RAW_CLASSES, 40, "mapClass", path)
    return mapping, _names(mat_variable(mat, "className", path))


def load_mapping13(path: Path) -> tuple[np.ndarray, list[str]]:
    """``(map (40,) int64 40-class -> 1..13, 13 class names)`` from ``class13Mapping.mat``."""
    mat = load_mat(path)
    struct = mat_variable(mat, "classMapping13", path).ravel()[0]
    fields = struct.dtype.names or ()
    if "labels13" not in fields or "classNames" not in fields:
        raise DataError(f"{path}: classMapping13 lacks 'labels13'/'classNames'; found fields {list(fields)}")
    mapping = _checked_map(np.asarray(struct["labels13"]), 40, 13, "classMapping13.labels13", path)
    return mapping, _names(struct["classNames"])


def lut_from_map(mapping: np.ndarray) -> np.ndarray:
    """LUT ``(K + 1,)`` uint8 for stored labels 0..K: 0 -> 255, k -> mapping[k - 1] - 1."""
    return np.concatenate([[IGNORE_INDEX], mapping - 1]).astype(np.uint8)


def raw_label_lut(num_classes: int, mapping40: Path, mapping13: Optional[Path] = None) -> tuple[np.ndarray, list[str]]:
    """LUT ``(895,)`` raw label (0 void, 1..894) -> 0..C-1 / 255, and the C class names."""
    map40, names40 = load_mapping40(mapping40)
    if num_classes == 40:
        return lut_from_map(map40), names40
    if mapping13 is None:
        raise DataError(f"13-class labels need {MAPPING13_FILE} beside {mapping40}")
    map13, names13 = load_mapping13(mapping13)
    return lut_from_map(map13[map40 - 1]), names13


def identity_lut(num_classes: int) -> np.ndarray:
    """LUT ``(C + 1,)`` for labels already stored as 1..C with 0 void (e.g. ``label13/*.png``)."""
    return lut_from_map(np.arange(1, num_classes + 1))


def apply_lut(labels: np.ndarray, lut: np.ndarray, source: str) -> np.ndarray:
    """``labels`` (H, W) mapped through ``lut`` -> (H, W) int64; DataError naming ``source``
    when a label is outside the LUT (e.g. a 13-class label 14)."""
    top = int(labels.max(initial=0))
    if top >= len(lut) or int(labels.min(initial=0)) < 0:
        raise DataError(f"{source} holds label {top}, outside the class set 0..{len(lut) - 1} (0 = void)")
    return lut[labels].astype(np.int64)


def find_meta_file(name: str, places: Sequence[Path]) -> Optional[Path]:
    """The first ``place/name`` or ``place/meta/name`` that exists."""
    for place in places:
        for candidate in (place / name, place / "meta" / name):
            if candidate.is_file():
                return candidate
    return None
