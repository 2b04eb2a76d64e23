"""ImageFolderDataset on a crafted tree and on the real CIFAR-10 JPEG set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.data.folder import ImageFolderDataset, balanced_subset
from xmodal.errors import DataError


def write_png(path: Path, value: int, size: tuple[int, int] = (8, 6)) -> None:
    """An RGB PNG (lossless) whose pixels are (value, value + 1, value + 2); size is (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.broadcast_to(np.array([value, value + 1, value + 2], np.uint8), (size[1], size[0], 3))
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{cat,ant,bee}/ with 3, 4, 5 images; names unsorted on purpose, plus a stray file."""
    for cls, count in (("cat", 3), ("ant", 4), ("bee", 5)):
        for k in reversed(range(count)):
            suffix = ".PNG" if k == 1 else ".png"
            write_png(tmp_path / cls / f"img{k}{suffix}", value=10 * k + {"ant": 0, "bee": 100, "cat": 200}[cls])
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


def test_listing_is_sorted_and_labeled(tree: Path):
    dataset = ImageFolderDataset(tree)
    assert dataset.classes == ["ant", "bee", "cat"]
    assert len(dataset) == 12
    assert dataset.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 3
    assert dataset.files[:2] == ["ant/img0.png", "ant/img1.PNG"]
    sample = dataset[5]  # bee/img1
    assert sample["image"].shape == (3, 6, 8) and sample["image"].dtype == torch.uint8
    assert sample["image"][:, 0, 0].tolist() == [110, 111, 112]
    assert int(sample["label"]) == 1 and int(sample["index"]) == 5


def test_unlabeled_reports_minus_one_but_keeps_classes(tree: Path):
    dataset = ImageFolderDataset(tree, labeled=False)
    assert int(dataset[0]["label"]) == -1 and bool((dataset.labels == -1).all())
    assert dataset.class_labels.tolist() == [0] * 4 + [1] * 5 + [2] * 3


def test_subset_is_balanced_deterministic_and_seeded(tree: Path):
    first = ImageFolderDataset(tree, subset=9, seed=1)
    assert torch.bincount(first.class_labels).tolist() == [3, 3, 3]
    assert first.files == ImageFolderDataset(tree, subset=9, seed=1).files
    assert any(ImageFolderDataset(tree, subset=9, seed=s).files != first.files for s in range(2, 6))


def test_subset_remainder_goes_to_seeded_classes():
    labels = torch.arange(3).repeat_interleave(10)
    for seed in range(4):
        picked = balanced_subset(labels, 8, seed)
        assert sorted(torch.bincount(labels[picked]).tolist()) == [2, 3, 3]
        assert torch.equal(picked, picked.sort().values)


def test_subset_larger_than_a_class_raises(tree: Path):
    with pytest.raises(DataError, match="class 2, which has 3"):
        ImageFolderDataset(tree, subset=12)


def test_size_resizes_images_of_any_shape(tree: Path):
    write_png(tree / "ant" / "wide.png", 7, size=(20, 10))
    dataset = ImageFolderDataset(tree, size=6)
    assert {tuple(dataset[i]["image"].shape) for i in range(len(dataset))} == {(3, 6, 6)}


def test_missing_root(tmp_path: Path):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def test_root_without_images(tmp_path: Path):
    with pytest.raises(DataError, match=r"no images found under .*expected .*/<class>/<image>\.jpg"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found under"):
        ImageFolderDataset(tmp_path)


def test_corrupt_image_is_named_at_decode_and_by_verify(tree: Path):
    bad = tree / "bee" / "img2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    dataset = ImageFolderDataset(tree)  # listing does not decode
    index = dataset.files.index("bee/img2.png")
    dataset[index - 1]
    with pytest.raises(DataError, match="img2.png"):
        dataset[index]
    with pytest.raises(DataError, match=r"1 of 12 images .* unreadable:\n  .*bee/img2\.png"):
        dataset.verify()


def test_verify_counts_good_files(tree: Path):
    assert ImageFolderDataset(tree).verify() == 12


class TestRealCifar10Jpeg:
    def test_layout_and_counts(self, cifar10_jpeg: Path):
        train = ImageFolderDataset(cifar10_jpeg / "train")
        test = ImageFolderDataset(cifar10_jpeg / "test")
        assert train.classes[:3] == ["airplane", "automobile", "bird"] and len(train.classes) == 10
        assert torch.bincount(train.labels).tolist() == [5000] * 10
        assert torch.bincount(test.labels).tolist() == [1000] * 10

    def test_pixels_match_cifar10_statistics(self, cifar10_jpeg: Path):
        dataset = ImageFolderDataset(cifar10_jpeg / "train", subset=1000, seed=0)
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).float() / 255
        assert images.shape == (1000, 3, 32, 32)
        mean, std = images.mean((0, 2, 3)), images.std((0, 2, 3))
        print(f"CIFAR-10 JPEG, 1000 train images: mean {mean.tolist()}, std {std.tolist()}")
        # Official per-channel statistics of the original pickles; JPEG re-encoding moves them little.
        assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.015)
        assert torch.allclose(std, torch.tensor([0.2470, 0.2435, 0.2616]), atol=0.015)

    def test_verify_and_augment(self, cifar10_jpeg: Path):
        dataset = ImageFolderDataset(cifar10_jpeg / "test", subset=500, augment="crop", seed=3)
        assert dataset.verify() == 500
        first = dataset[0]["image"]
        assert first.shape == (3, 32, 32) and torch.equal(first, dataset[0]["image"])


def test_cache_decodes_once_and_matches_reading_from_disk(cifar10_jpeg):
    from xmodal.data import build_dataset

    lazy = build_dataset("imagefolder", cifar10_jpeg, "test", subset=40, augment="crop", seed=3)
    cached = build_dataset("imagefolder", cifar10_jpeg, "test", subset=40, augment="crop", seed=3, cache=True)
    assert cached.cached is not None and len(cached.cached) == 40
    for epoch in (0, 1):
        lazy.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in (0, 17, 39):
            assert torch.equal(lazy[i]["image"], cached[i]["image"])


def test_cache_reports_a_corrupt_file_before_training(tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match="bad.jpg"):
        ImageFolderDataset(tmp_path, cache=True)
