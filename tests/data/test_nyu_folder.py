"""NYUDepthV2Folder on the 18 real frames of the mini set, and on crafted broken folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xmodal.data.base import IGNORE_INDEX
from xmodal.data.nyu import NYUDepthV2Folder
from xmodal.data.nyu_meta import NYU13_CLASSES
from xmodal.errors import DataError

TEST_FRAMES = [1, 2, 9, 14, 15, 16, 17, 18]


def test_official_split_membership(nyuv2_mini: Path):
    assert NYUDepthV2Folder(nyuv2_mini, "all").frames.tolist() == list(range(1, 19))
    assert NYUDepthV2Folder(nyuv2_mini, "test").frames.tolist() == TEST_FRAMES
    train = NYUDepthV2Folder(nyuv2_mini, "train")
    assert train.frames.tolist() == [3, 4, 5, 6, 7, 8, 10, 11, 12, 13] and not train.has_labels.any()
    assert NYUDepthV2Folder(nyuv2_mini, "all", labeled_only=True).frames.tolist() == TEST_FRAMES
    assert NYUDepthV2Folder(nyuv2_mini).classes == list(NYU13_CLASSES)


def test_frame_0001_depth_range(nyuv2_mini: Path):
    sample = NYUDepthV2Folder(nyuv2_mini, "test", size=None)[0]
    depth = sample["depth"][0]
    valid = depth[depth > 0]
    print(f"frame 0001 depth: {valid.min():.3f}..{valid.max():.3f} m, missing {1 - valid.numel() / depth.numel():.4f}")
    assert depth.shape == (480, 640) and sample["image"].shape == (3, 480, 640)
    assert abs(float(valid.min()) - 1.798) < 1e-3 and abs(float(valid.max()) - 3.615) < 1e-3
    assert valid.numel() == depth.numel()  # the labeled set's depth is in-painted: nothing missing


def test_all_frames_have_indoor_depths(nyuv2_mini: Path):
    dataset = NYUDepthV2Folder(nyuv2_mini, "all", size=None)
    for index in range(len(dataset)):
        depth = dataset[index]["depth"]
        valid = depth[depth > 0]
        assert 0.5 < float(valid.min()) and float(valid.max()) < 10.0, dataset.frames[index]


def test_frame_0001_label_histogram(nyuv2_mini: Path):
    mask = NYUDepthV2Folder(nyuv2_mini, "test", size=None)[0]["mask"]
    ids, counts = mask.unique(return_counts=True)
    fractions = dict(zip(ids.tolist(), (counts / mask.numel()).tolist()))
    print("frame 0001 classes:", {NYU13_CLASSES[k] if k < 13 else "void": round(v, 4) for k, v in fractions.items()})
    # ceiling, chair, floor, furniture, objects, table, wall; then void.
    assert sorted(fractions) == [2, 3, 4, 5, 6, 9, 11, IGNORE_INDEX]
    assert abs(fractions[IGNORE_INDEX] - 0.0710) < 1e-3
    assert max(fractions, key=fractions.get) == 11 and abs(fractions[11] - 0.4082) < 1e-3  # wall


def test_ceiling_above_floor(nyuv2_mini: Path):
    """Orientation: a flipped or transposed label map would put the ceiling below the floor."""
    dataset = NYUDepthV2Folder(nyuv2_mini, "test", size=None)
    rows = torch.arange(480)[:, None].expand(480, 640)
    checked = 0
    for index in range(len(dataset)):
        mask = dataset[index]["mask"]
        if (mask == 2).sum() > 1000 and (mask == 4).sum() > 1000:
            assert rows[mask == 2].float().mean() < 160 < 320 < rows[mask == 4].float().mean()
            checked += 1
    assert checked >= 3


def boundary(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:] |= labels[1:] != labels[:-1]
    return edge


def test_depth_edges_follow_label_edges(nyuv2_mini: Path):
    """Depth discontinuities (>5 % jump) lie near label boundaries far more often than near the
    boundaries of a label map shifted by 8 px, and at least as often as for a 4-px shift."""
    dataset = NYUDepthV2Folder(nyuv2_mini, "test", size=None)
    shifts = [(0, 0), (4, 0), (-4, 0), (0, 4), (0, -4), (8, 0), (-8, 0), (0, 8), (0, -8)]
    hits, total = torch.zeros(len(shifts)), 0
    for index in range(len(dataset)):
        sample = dataset[index]
        log_depth = sample["depth"][0].log()
        jumps = torch.zeros_like(log_depth, dtype=torch.bool)
        jumps[:, 1:] |= log_depth.diff(dim=1).abs() > 0.05
        jumps[1:] |= log_depth.diff(dim=0).abs() > 0.05
        total += int(jumps.sum())
        # Within 2 px of a label boundary; rolling commutes with the dilation, so dilate once.
        near = F.max_pool2d(boundary(sample["mask"])[None, None].float(), 5, 1, 2)[0, 0] > 0
        for k, shift in enumerate(shifts):
            hits[k] += float((jumps & torch.roll(near, shift, (0, 1))).sum())
    rates = hits / total
    print("depth-edge pixels near label edges, aligned then shifted:", [round(r, 3) for r in rates.tolist()])
    assert rates[0] == rates.max()
    assert rates[0] > 1.3 * rates[5:].max()


def test_joint_augmentation_on_real_frames(nyuv2_mini: Path):
    dataset = NYUDepthV2Folder(nyuv2_mini, "test", size=(120, 160), augment=True, seed=1)
    sample = dataset[0]
    assert sample["image"].shape == (3, 120, 160) and sample["depth"].shape == (1, 120, 160)
    assert sample["mask"].shape == (120, 160)
    assert set(sample["mask"].unique().tolist()) <= {2, 3, 4, 5, 6, 9, 11, IGNORE_INDEX}
    full_depth = NYUDepthV2Folder(nyuv2_mini, "test", size=None)[0]["depth"]
    assert set(sample["depth"].unique().tolist()) <= set(full_depth.unique().tolist())  # nearest: no new depths
    dataset.set_epoch(1)
    assert not torch.equal(sample["image"], dataset[0]["image"])


def test_unlabeled_frame_gets_a_void_mask(nyuv2_mini: Path):
    sample = NYUDepthV2Folder(nyuv2_mini, "train", size=(60, 80))[0]
    assert sample["mask"].shape == (60, 80) and bool((sample["mask"] == IGNORE_INDEX).all())


def write_frame(root: Path, frame: int, rgb_hw=(6, 8), depth_hw=(6, 8), label: int | None = 3) -> None:
    for kind in ("rgb", "depth", "label13"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*rgb_hw, 3), 90, np.uint8)).save(root / "rgb" / f"{frame:04d}.png")
    Image.fromarray(np.full(depth_hw, 2500, np.uint16)).save(root / "depth" / f"{frame:04d}.png")
    if label is not None:
        Image.fromarray(np.full(rgb_hw, label, np.uint8)).save(root / "label13" / f"{frame:04d}.png")


def test_crafted_folder_reads_millimetres_and_labels(tmp_path: Path):
    write_frame(tmp_path, 1)
    sample = NYUDepthV2Folder(tmp_path, size=None)[0]
    assert bool((sample["depth"] == 2.5).all()) and bool((sample["mask"] == 2).all())


def test_rgb_and_depth_of_different_sizes(tmp_path: Path):
    write_frame(tmp_path, 7, depth_hw=(5, 8))
    with pytest.raises(DataError, match=r"frame 7: .*rgb/0007\.png is \(6, 8\) but .*depth/0007\.png is \(5, 8\)"):
        NYUDepthV2Folder(tmp_path)[0]


def test_label_outside_13_classes(tmp_path: Path):
    write_frame(tmp_path, 2, label=14)
    with pytest.raises(DataError, match=r"label13/0002\.png holds label 14, outside the class set 0\.\.13"):
        NYUDepthV2Folder(tmp_path)[0]


def test_folder_errors(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        NYUDepthV2Folder(tmp_path / "absent")
    write_frame(tmp_path, 1)
    with pytest.raises(DataError, match="13-class labels .* only"):
        NYUDepthV2Folder(tmp_path, num_classes=40)
    with pytest.raises(DataError, match="split 'test' needs the official splits.mat"):
        NYUDepthV2Folder(tmp_path, "test")
    (tmp_path / "depth" / "0001.png").unlink()
    with pytest.raises(DataError, match=r"depth of frame 1 .*depth/0001\.png does not exist"):
        NYUDepthV2Folder(tmp_path)
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "depth" / "0001.png")
    with pytest.raises(DataError, match=r"depth/0001\.png is a L image, expected a 16-bit PNG"):
        NYUDepthV2Folder(tmp_path)[0]
