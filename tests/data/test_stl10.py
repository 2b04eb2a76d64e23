"""STL10Dataset on tiny files written in the official binary layout."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import xmodal.data.stl10 as stl10
from xmodal.data.stl10 import STL10Dataset
from xmodal.errors import DataError


def expected(k: int, offset: int) -> torch.Tensor:
    """Image k of a split, rows first: value (h + 2 w + 50 c + k + offset) % 256."""
    c, h, w = np.ogrid[:3, :96, :96]
    return torch.from_numpy(((h + 2 * w + 50 * c + k + offset) % 256).astype(np.uint8))


def test_images_are_read_rows_first(stl10_root: Path):
    dataset = STL10Dataset(stl10_root, "train")
    image = dataset[2]["image"]
    assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
    # Moving right adds 2, moving down adds 1: a missing transpose would swap them.
    assert int(image[0, 0, 1]) - int(image[0, 0, 0]) == 2 and int(image[0, 1, 0]) - int(image[0, 0, 0]) == 1
    for k in range(4):
        assert torch.equal(dataset[k]["image"], expected(k, 0))


def test_labels_are_zero_based_and_classes_read(stl10_root: Path):
    dataset = STL10Dataset(stl10_root, "train")
    assert dataset.labels.tolist() == [0, 9, 2, 2]
    assert dataset.classes[0] == "airplane" and len(dataset.classes) == 10
    assert [int(dataset[i]["label"]) for i in range(4)] == [0, 9, 2, 2]
    assert STL10Dataset(stl10_root / "stl10_binary", "test").labels.tolist() == [1, 1, 6]


def test_unlabeled_and_combined_splits(stl10_root: Path):
    unlabeled = STL10Dataset(stl10_root, "unlabeled")
    assert len(unlabeled) == 5 and bool((unlabeled.labels == -1).all())
    assert torch.equal(unlabeled[4]["image"], expected(4, 200))
    both = STL10Dataset(stl10_root, "train+unlabeled")
    assert len(both) == 9 and both.labels.tolist() == [0, 9, 2, 2, -1, -1, -1, -1, -1]
    assert torch.equal(both[3]["image"], expected(3, 0)) and torch.equal(both[6]["image"], expected(2, 200))
    assert int(both[6]["index"]) == 6


def test_fold_selects_official_training_images(stl10_root: Path):
    fold = STL10Dataset(stl10_root, "train", fold=1)
    assert len(fold) == 2 and fold.labels.tolist() == [9, 2]
    assert torch.equal(fold[0]["image"], expected(1, 0))
    combined = STL10Dataset(stl10_root, "train+unlabeled", fold=0)
    assert len(combined) == 7 and combined.labels.tolist()[:3] == [0, 2, -1]
    with pytest.raises(DataError, match="selects training images"):
        STL10Dataset(stl10_root, "test", fold=0)


def test_cmc_resized_crop_to_64(stl10_root: Path):
    dataset = STL10Dataset(stl10_root, "unlabeled", augment="resized_crop", size=64, seed=1)
    first = dataset[0]["image"]
    assert first.shape == (3, 64, 64)
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["image"])
    assert STL10Dataset(stl10_root, "test", size=64)[0]["image"].shape == (3, 64, 64)


def test_pickling_drops_the_memory_map(stl10_root: Path):
    dataset = STL10Dataset(stl10_root, "unlabeled")
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.parts[0]._map is None
    assert torch.equal(clone[1]["image"], dataset[1]["image"])


def test_truncated_binary_raises(stl10_root: Path):
    path = stl10_root / "stl10_binary" / "unlabeled_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"unlabeled_X\.bin has .* bytes, expected a positive multiple of 27648"):
        STL10Dataset(stl10_root, "unlabeled")


def test_label_count_mismatch_raises(stl10_root: Path):
    (stl10_root / "stl10_binary" / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataError, match=r"train_y\.bin holds 3 labels, expected 4"):
        STL10Dataset(stl10_root, "train")


def test_label_out_of_range_raises(stl10_root: Path):
    (stl10_root / "stl10_binary" / "train_y.bin").write_bytes(bytes([0, 2, 3, 11]))
    with pytest.raises(DataError, match="expected 1..10"):
        STL10Dataset(stl10_root, "train")


def test_missing_files_and_bad_split(tmp_path: Path, stl10_root: Path):
    with pytest.raises(DataError, match="data root .*absent does not exist"):
        STL10Dataset(tmp_path / "absent", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"STL-10 folder .*empty/stl10_binary does not exist"):
        STL10Dataset(tmp_path / "empty", "train")
    (stl10_root / "stl10_binary" / "test_X.bin").unlink()
    with pytest.raises(DataError, match=r"STL-10 image file .*test_X\.bin does not exist"):
        STL10Dataset(stl10_root, "test")
    with pytest.raises(DataError, match="unknown split 'val'"):
        STL10Dataset(stl10_root, "val")


def test_download_only_when_asked(stl10_root: Path, tmp_path: Path, monkeypatch):
    calls = []

    def fake_download(root: Path) -> None:  # stands in for the 2.6 GB archive
        calls.append(root)
        shutil.copytree(stl10_root / "stl10_binary", root / "stl10_binary")

    monkeypatch.setattr(stl10, "download_stl10", fake_download)
    with pytest.raises(DataError, match="does not exist"):
        STL10Dataset(tmp_path / "fresh", "train")
    assert calls == []
    assert len(STL10Dataset(tmp_path / "fresh", "train", download=True)) == 4
    assert len(STL10Dataset(tmp_path / "fresh", "train", download=True)) == 4  # present: no second fetch
    assert calls == [tmp_path / "fresh"]
