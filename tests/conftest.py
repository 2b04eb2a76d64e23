"""Shared fixtures: the real data kept in ../shared/data (extracted once per machine), and writers
of tiny files in the official dataset formats."""
from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import h5py
import numpy as np
import pytest
import scipy.io
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XMODAL_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("XMODAL_TEST_CACHE", Path.home() / ".cache" / "xmodal-test-data"))


def _extracted(archive: str, folder: str) -> Path:
    """Extract ``archive`` from ../shared/data into the cache once; skip when it is absent."""
    tar_path = SHARED_DATA / archive
    target = CACHE / folder
    if target.is_dir() and (target / ".complete").exists():
        return target
    if not tar_path.exists():
        pytest.skip(f"real data {tar_path} is absent (only CI and the team's machines have it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{folder}.partial-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
    extracted = tmp / folder
    if not extracted.is_dir():
        raise RuntimeError(f"{tar_path} did not contain a top-level folder {folder!r}")
    (extracted / ".complete").touch()
    try:
        extracted.rename(target)
    except OSError:  # another worker won the race; its copy is complete
        pass
    return target


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    """Root of the CIFAR-10 JPEG ImageFolder tree (``train/``, ``test/``)."""
    return _extracted("cifar10-jpeg.tar.gz", "cifar10")


@pytest.fixture(scope="session")
def nyuv2_mini() -> Path:
    """Root of the 18 real NYU-Depth-V2 frames (``rgb/``, ``depth/``, ``label13/``, ``meta/``)."""
    return _extracted("nyuv2-mini.tar.gz", "nyuv2-mini")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# ------------------------------------------------ tiny files in the official formats
MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 00:00:00 2012 HDF5 schema 1.00 ."


def write_nyu_mat(
    path: Path,
    images: np.ndarray,
    depths: np.ndarray,
    labels: Optional[np.ndarray] = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """A labeled-.mat look-alike from ``images`` (N,3,H,W), ``depths``/``labels`` (N,H,W).

    MATLAB v7.3 writes column-major arrays into HDF5, so every image axis pair is stored
    reversed: ``images`` (N,3,W,H), ``depths`` and ``labels`` (N,W,H); the file starts with a
    512-byte userblock holding MATLAB's text header.
    """
    arrays = {"images": images.transpose(0, 1, 3, 2), "depths": depths.transpose(0, 2, 1)}
    if labels is not None:
        arrays["labels"] = labels.transpose(0, 2, 1).astype(np.uint16)
    with h5py.File(path, "w", userblock_size=512) as file:
        for key, value in arrays.items():
            if key not in skip:
                file.create_dataset(key, data=value, chunks=(1, *value.shape[1:]), compression="gzip")
    with open(path, "r+b") as handle:
        handle.write(MATLAB_HEADER.ljust(128, b" "))
    return path


def write_splits(folder: Path, train: list[int], test: list[int]) -> Path:
    """``splits.mat`` as distributed: column vectors of 1-based frame numbers (uint16)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "splits.mat"
    columns = {key: np.array(frames, np.uint16)[:, None] for key, frames in (("trainNdxs", train), ("testNdxs", test))}
    scipy.io.savemat(path, columns)
    return path


def cells(names: list[str]) -> np.ndarray:
    """A MATLAB 1 x n cell array of strings."""
    return np.array([np.array([name]) for name in names], dtype=object)[None]


def write_mappings(folder: Path, length40: int = 894) -> None:
    """Crafted mappings: raw k -> 40-class ((k-1) % 40)+1, 40-class j -> 13-class ((j-1) % 13)+1."""
    folder.mkdir(parents=True, exist_ok=True)
    map40 = (np.arange(length40) % 40 + 1).astype(np.uint8)[None]
    names40, names13 = cells([f"c40_{i}" for i in range(40)]), cells([f"c13_{i}" for i in range(13)])
    scipy.io.savemat(folder / "classMapping40.mat", {"mapClass": map40, "className": names40})
    struct = {"labels13": (np.arange(40) % 13 + 1).astype(np.uint8)[None], "classNames": names13}
    scipy.io.savemat(folder / "class13Mapping.mat", {"classMapping13": struct})


def nyu_frames(count: int = 3, height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames whose layout a missing transpose would break.

    Frame k (0-based): top-left quadrant pure red, the rest grey 40 + 10 k; depth 1 m on the
    left half, 2 + k m on the right, the top row missing (0); raw labels 21 on the top half,
    11 on the bottom, void (0) in the first column.
    """
    images = np.empty((count, 3, height, width), np.uint8)
    depths = np.empty((count, height, width), np.float32)
    labels = np.empty((count, height, width), np.uint16)
    for k in range(count):
        images[k] = 40 + 10 * k
        images[k, :, : height // 2, : width // 2] = np.array([255, 0, 0])[:, None, None]
        depths[k, :, : width // 2], depths[k, :, width // 2 :] = 1.0, 2.0 + k
        depths[k, 0] = 0.0
        labels[k, : height // 2], labels[k, height // 2 :] = 21, 11
        labels[k, :, 0] = 0
    return images, depths, labels


@pytest.fixture
def nyu_mat(tmp_path: Path) -> Path:
    """A 3-frame labeled .mat (48 x 64) with splits (train 1, 3; test 2) and mappings beside it."""
    write_splits(tmp_path, [1, 3], [2])
    write_mappings(tmp_path)
    return write_nyu_mat(tmp_path / "nyu_depth_v2_labeled.mat", *nyu_frames())


def stl_pattern(count: int, offset: int) -> np.ndarray:
    """``(count, 3, 96, 96)`` uint8: value (h + 2 w + 50 c + k + offset) % 256, asymmetric in h/w."""
    k, c, h, w = np.ogrid[:count, :3, :96, :96]
    return ((h + 2 * w + 50 * c + k + offset) % 256).astype(np.uint8)


def write_stl_binary(path: Path, images: np.ndarray) -> None:
    """Official layout: each channel column-major, i.e. (N, C, W, H) in C order."""
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())


STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@pytest.fixture
def stl10_root(tmp_path: Path) -> Path:
    """``tmp/stl10_binary`` with train 4, test 3, unlabeled 5 images (offsets 0, 100, 200)."""
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split, count, offset in (("train", 4, 0), ("test", 3, 100), ("unlabeled", 5, 200)):
        write_stl_binary(folder / f"{split}_X.bin", stl_pattern(count, offset))
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 3, 3]))
    (folder / "test_y.bin").write_bytes(bytes([2, 2, 7]))
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(["0 2", "1 3"] + ["3"] * 8) + "\n")
    return tmp_path


def cifar_rows(count: int, offset: int) -> np.ndarray:
    """``(count, 3072)`` uint8 rows: 1024 R, 1024 G, 1024 B, each 32 x 32 rows first."""
    k, c, h, w = np.ogrid[:count, :3, :32, :32]
    return ((h + 3 * w + 70 * c + k + offset) % 256).astype(np.uint8).reshape(count, 3072)


def dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(entry, handle)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """CIFAR-10 (five 2-image train batches, 3 test images) and CIFAR-100 (4 train, 2 test)."""
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for b in range(5):
        batch = {"data": cifar_rows(2, 2 * b), "labels": [2 * b, 2 * b + 1], "batch_label": f"b{b}"}
        dump(c10 / f"data_batch_{b + 1}", batch)
    dump(c10 / "test_batch", {"data": cifar_rows(3, 50), "labels": [9, 0, 5]})
    dump(c10 / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    dump(c100 / "train", {"data": cifar_rows(4, 7), "fine_labels": [0, 99, 42, 42], "coarse_labels": [0, 1, 2, 2]})
    dump(c100 / "test", {"data": cifar_rows(2, 9), "fine_labels": [5, 6], "coarse_labels": [0, 0]})
    dump(c100 / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": []})
    return tmp_path


@pytest.fixture(scope="session")
def formats() -> SimpleNamespace:
    """The writers above, for tests that craft their own variants of the official files."""
    return SimpleNamespace(
        write_nyu_mat=write_nyu_mat, write_splits=write_splits, write_mappings=write_mappings,
        nyu_frames=nyu_frames, stl_pattern=stl_pattern, write_stl_binary=write_stl_binary,
        cifar_rows=cifar_rows, dump=dump, cells=cells,
    )


@pytest.fixture
def error_line(capsys):
    """``error_line()`` -> the one ``xmodal: error:`` line a command printed since the last call
    (progress bars may share stderr), after checking there is exactly one and no traceback."""

    def read() -> str:
        err = capsys.readouterr().err
        errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("xmodal: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
        return errors[0]

    return read
