"""build_dataset by name, and augmentation that does not depend on worker count."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from xmodal.data import (
    CIFARDataset, ImageFolderDataset, NYUDepthV2Folder, NYUDepthV2Mat, STL10Dataset, SyntheticShapes,
    available_datasets, build_dataset,
)
from xmodal.errors import DataError


def test_available_names():
    assert available_datasets() == ["cifar10", "cifar100", "imagefolder", "nyu", "stl10", "synthetic"]


@pytest.mark.parametrize(
    "wrong, near", [("cifar", "cifar10"), ("nyuv2", "nyu"), ("stl-10", "stl10"), ("synth", "synthetic")]
)
def test_unknown_name_suggests_the_nearest(wrong: str, near: str):
    with pytest.raises(DataError, match=f"unknown dataset '{wrong}'; did you mean '{near}'"):
        build_dataset(wrong, "/data", "train")


def test_root_is_required_except_for_synthetic():
    with pytest.raises(DataError, match="'stl10' needs a data root"):
        build_dataset("stl10", None, "train")
    dataset = build_dataset("synthetic", None, "test", num_samples=30, augment="crop")
    assert isinstance(dataset, SyntheticShapes) and len(dataset) == 30


def test_unknown_option_is_a_data_error():
    with pytest.raises(DataError, match="'synthetic' does not take that option: .*'augmnet'"):
        build_dataset("synthetic", None, "train", augmnet="crop")


def test_builds_each_kind(stl10_root: Path, cifar_root: Path, nyu_mat: Path, tmp_path: Path):
    assert isinstance(build_dataset("stl10", stl10_root, "unlabeled"), STL10Dataset)
    assert isinstance(build_dataset("cifar10", cifar_root, "test"), CIFARDataset)
    assert build_dataset("cifar100", cifar_root, "train").num_classes == 100
    assert isinstance(build_dataset("nyu", nyu_mat, "train", num_classes=40), NYUDepthV2Mat)
    with pytest.raises(DataError, match="data root .*absent does not exist"):
        build_dataset("nyu", tmp_path / "absent", "train")


def test_imagefolder_split_is_a_subfolder(cifar10_jpeg: Path):
    test = build_dataset("imagefolder", cifar10_jpeg, "test", subset=20)
    assert isinstance(test, ImageFolderDataset) and test.root == cifar10_jpeg / "test"
    assert len(build_dataset("imagefolder", cifar10_jpeg / "test", "all")) == 10000
    with pytest.raises(DataError, match="no folder .*val for split 'val'"):
        build_dataset("imagefolder", cifar10_jpeg, "val")


def test_nyu_folder_dispatch(nyuv2_mini: Path):
    dataset = build_dataset("nyu", nyuv2_mini, "test", size=(60, 80))
    assert isinstance(dataset, NYUDepthV2Folder) and len(dataset) == 8


def epoch_batches(dataset: SyntheticShapes, epoch: int, workers: int) -> list[dict[str, torch.Tensor]]:
    dataset.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=16, num_workers=workers, shuffle=False))


def test_augmentation_is_the_same_for_any_number_of_workers():
    dataset = SyntheticShapes("unlabeled", num_samples=48, augment="crop", seed=5)
    for epoch in (0, 3):
        serial, parallel = epoch_batches(dataset, epoch, 0), epoch_batches(dataset, epoch, 2)
        for a, b in zip(serial, parallel):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    # Epochs differ, and the epoch set in the main process reached the (non-persistent) workers.
    first, later = epoch_batches(dataset, 0, 2), epoch_batches(dataset, 3, 2)
    assert not torch.equal(first[0]["image"], later[0]["image"])
    assert later[0]["label"].tolist() == [-1] * 16 and first[1]["index"].tolist() == list(range(16, 32))
