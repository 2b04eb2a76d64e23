"""SyntheticShapes: deterministic, balanced, and colour carries shape but not class."""
from __future__ import annotations

import pytest
import torch
from kornia.color import rgb_to_lab
from kornia.filters import sobel

from xmodal.data.synthetic import CLASSES, SPLITS, SyntheticShapes, generate_shapes, split_seed
from xmodal.errors import DataError


def test_same_seed_same_bytes_and_other_seed_differs():
    first = generate_shapes.__wrapped__(300, 7)  # bypass the cache: really generate twice
    again = generate_shapes.__wrapped__(300, 7)
    other = generate_shapes.__wrapped__(300, 8)
    assert first.images.numpy().tobytes() == again.images.numpy().tobytes()
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


def test_sample_format_and_sizes():
    dataset = SyntheticShapes("train", num_samples=50)
    sample = dataset[3]
    assert set(sample) == {"image", "label", "index"}
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.uint8
    assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0
    assert int(sample["index"]) == 3 and int(sample["label"]) == int(dataset.labels[3])
    assert len(dataset) == 50 and dataset.classes == CLASSES and len(CLASSES) == 10
    assert SPLITS == {"unlabeled": 5000, "train": 2000, "test": 2000}


def test_classes_are_balanced():
    labels = SyntheticShapes("train", num_samples=1000).labels
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 100))


def test_unlabeled_split_hides_labels_but_keeps_classes():
    dataset = SyntheticShapes("unlabeled", num_samples=100)
    assert int(dataset[0]["label"]) == -1 and bool((dataset.labels == -1).all())
    assert torch.equal(torch.bincount(dataset.class_labels), torch.full((10,), 10))
    assert int(SyntheticShapes("unlabeled", num_samples=100, labeled=True)[0]["label"]) >= 0


def test_splits_never_share_an_image():
    hashes = {}
    for split in SPLITS:
        images = SyntheticShapes(split, num_samples=500).images
        hashes[split] = {bytes(image.numpy().tobytes()) for image in images}
        assert len(hashes[split]) == 500
    assert not (hashes["unlabeled"] & hashes["train"]) and not (hashes["train"] & hashes["test"])
    assert len({split_seed(0, split) for split in SPLITS}) == 3


def test_augmentation_follows_epoch():
    dataset = SyntheticShapes("train", num_samples=20, augment="crop")
    first = dataset[5]["image"]
    assert torch.equal(first, dataset[5]["image"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[5]["image"])


def test_unknown_split_raises():
    with pytest.raises(DataError, match="unknown split 'val'"):
        SyntheticShapes("val")


@pytest.fixture(scope="module")
def lab_train():
    batch = generate_shapes(2000, split_seed(0, "train"))
    return rgb_to_lab(batch.images.float() / 255), batch.labels, batch.masks


def test_mean_colour_does_not_give_the_class_away(lab_train):
    lab, labels, _ = lab_train
    mean_ab = lab[:, 1:].mean((2, 3))  # (N, 2) per-image mean chroma
    spread = mean_ab.std(0)  # ~14 ab units: hues are random per image
    for cls in range(10):
        members = mean_ab[labels == cls]
        class_mean = members.mean(0)
        # Within 4 standard errors of zero, i.e. no class has its own colour.
        assert bool((class_mean.abs() < 4 * spread / len(members) ** 0.5).all()), (CLASSES[cls], class_mean)
    assert bool((spread > 10).all())


def edge_correlation(edges: torch.Tensor, mask_edges: torch.Tensor) -> float:
    """Median over images of the Pearson correlation of two (N, H, W) edge maps."""
    a, b = edges.flatten(1), mask_edges.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).median())


def test_luminance_and_chroma_both_show_the_object_outline(lab_train):
    lab, _, masks = lab_train
    mask_edges = sobel(masks[:, None])[:, 0]
    l_edges = sobel(lab[:, :1] / 100)[:, 0]
    ab_edges = sobel(lab[:, 1:] / 100).norm(dim=1)
    assert edge_correlation(l_edges, mask_edges) > 0.85
    assert edge_correlation(ab_edges, mask_edges) > 0.85
    on_outline = mask_edges > 0.1
    assert l_edges[on_outline].mean() > 3 * l_edges[~on_outline].mean()
    assert ab_edges[on_outline].mean() > 3 * ab_edges[~on_outline].mean()


def _disc_centroids(jitter):
    batch = generate_shapes.__wrapped__(400, 3, 32, jitter)
    masks = batch.masks[batch.labels == CLASSES.index("disc")]  # symmetric: centroid = centre
    axis = torch.arange(32, dtype=torch.float32) + 0.5
    weight = masks.sum((1, 2))
    return torch.stack([(masks.sum(1) * axis).sum(1) / weight, (masks.sum(2) * axis).sum(1) / weight], 1)


def test_jitter_bounds_the_object_position():
    near = (_disc_centroids(0.06) - 16).abs()
    anywhere = (_disc_centroids(None) - 16).abs()
    assert float(near.max()) <= 0.06 * 32 + 0.05  # +-1.92 px (the soft edge is symmetric)
    assert float(anywhere.max()) > 4.0  # the objects' room at radius 8-12 px: up to +-8 px
    assert SyntheticShapes("train", num_samples=20).images.shape == (20, 3, 32, 32)
    with pytest.raises(DataError, match=r"jitter must be in \[0, 0.5\].*got 0.7"):
        SyntheticShapes("train", num_samples=20, jitter=0.7)
