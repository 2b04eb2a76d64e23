"""CIFARDataset on tiny pickles written in the official format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.data.cifar import CIFARDataset
from xmodal.errors import DataError


def expected(k: int, offset: int) -> torch.Tensor:
    c, h, w = np.ogrid[:3, :32, :32]
    return torch.from_numpy(((h + 3 * w + 70 * c + k + offset) % 256).astype(np.uint8))


def test_cifar10_train_concatenates_the_five_batches(cifar_root: Path):
    dataset = CIFARDataset(cifar_root, "train")
    assert len(dataset) == 10 and dataset.labels.tolist() == list(range(10))
    assert dataset.classes == [f"class{i}" for i in range(10)]
    sample = dataset[3]  # batch 2, row 1
    assert torch.equal(sample["image"], expected(1, 2))
    assert int(sample["label"]) == 3 and int(sample["index"]) == 3
    # Moving right adds 3, moving down adds 1: rows-first decoding of the 3072-byte rows.
    assert int(sample["image"][0, 0, 1]) - int(sample["image"][0, 0, 0]) == 3


def test_cifar10_test_split(cifar_root: Path):
    dataset = CIFARDataset(cifar_root, "test", labeled=False)
    assert dataset.labels.tolist() == [-1, -1, -1] and dataset.class_labels.tolist() == [9, 0, 5]
    assert torch.equal(dataset[2]["image"], expected(2, 50))


def test_cifar100_fine_labels(cifar_root: Path):
    dataset = CIFARDataset(cifar_root, "train", num_classes=100, augment="crop")
    assert dataset.labels.tolist() == [0, 99, 42, 42] and len(dataset.classes) == 100
    assert dataset[1]["image"].shape == (3, 32, 32)
    assert torch.equal(CIFARDataset(cifar_root, "test", num_classes=100)[0]["image"], expected(0, 9))


def test_missing_and_corrupt_files(cifar_root: Path, tmp_path: Path, formats):
    with pytest.raises(DataError, match="data root .*absent does not exist"):
        CIFARDataset(tmp_path / "absent")
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR pickle"):
        CIFARDataset(cifar_root, "train")
    formats.dump(cifar_root / "cifar-10-batches-py" / "test_batch", {"data": formats.cifar_rows(2, 0)})
    with pytest.raises(DataError, match=r"test_batch lacks 'data' or 'labels'"):
        CIFARDataset(cifar_root, "test")
    (cifar_root / "cifar-100-python" / "test").unlink()
    with pytest.raises(DataError, match=r"CIFAR batch file .*cifar-100-python/test does not exist"):
        CIFARDataset(cifar_root, "test", num_classes=100)


def test_bad_options(cifar_root: Path):
    with pytest.raises(DataError, match="10 or 100 classes"):
        CIFARDataset(cifar_root, "train", num_classes=20)
    with pytest.raises(DataError, match="unknown split 'unlabeled'"):
        CIFARDataset(cifar_root, "unlabeled")
