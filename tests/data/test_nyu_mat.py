"""NYUDepthV2Mat on small HDF5 files written in MATLAB v7.3's axis order."""
from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from xmodal.data.base import IGNORE_INDEX
from xmodal.data.nyu import NYUDepthV2Mat
from xmodal.errors import DataError


def test_frames_come_back_upright(nyu_mat: Path):
    dataset = NYUDepthV2Mat(nyu_mat, "all", num_classes=40, size=None)
    assert len(dataset) == 3 and dataset.frames.tolist() == [1, 2, 3]
    sample = dataset[1]
    assert set(sample) == {"image", "depth", "mask", "index"}
    image, depth, mask = sample["image"], sample["depth"], sample["mask"]
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8
    assert depth.shape == (1, 48, 64) and depth.dtype == torch.float32
    assert mask.shape == (48, 64) and mask.dtype == torch.int64
    # Top-left quadrant red: only right if (W, H) was transposed back to (H, W).
    assert image[:, :24, :32].flatten(1).unique(dim=1).tolist() == [[255], [0], [0]]
    assert bool((image[:, 24:, :] == 50).all()) and bool((image[:, :, 32:] == 50).all())
    assert bool((depth[0, 1:, :32] == 1.0).all()) and bool((depth[0, 1:, 32:] == 3.0).all())
    assert bool((depth[0, 0] == 0).all())


def test_raw_labels_map_to_40_and_13_classes(nyu_mat: Path):
    # Crafted mappings: raw k -> 40-class ((k-1) % 40)+1 -> 13-class ((j-1) % 13)+1, then 0-based.
    mask40 = NYUDepthV2Mat(nyu_mat, num_classes=40, size=None)[0]["mask"]
    assert mask40[:24, 1:].unique().tolist() == [20] and mask40[24:, 1:].unique().tolist() == [10]
    assert bool((mask40[:, 0] == IGNORE_INDEX).all())
    dataset13 = NYUDepthV2Mat(nyu_mat, num_classes=13, size=None)
    mask13 = dataset13[0]["mask"]
    assert mask13[:24, 1:].unique().tolist() == [7] and mask13[24:, 1:].unique().tolist() == [10]
    assert dataset13.classes[7] == "c13_7" and dataset13.num_classes == 13


def test_official_split_selects_frames(nyu_mat: Path):
    assert NYUDepthV2Mat(nyu_mat, "train").frames.tolist() == [1, 3]
    test = NYUDepthV2Mat(nyu_mat, "test", size=None)
    assert test.frames.tolist() == [2] and bool((test[0]["image"][:, 40, 40] == 50).all())


def test_eval_resize_and_joint_augmentation(nyu_mat: Path):
    small = NYUDepthV2Mat(nyu_mat, size=(24, 32))[0]
    assert small["image"].shape == (3, 24, 32) and small["mask"].shape == (24, 32)
    assert small["image"][:, 5, 5].tolist() == [255, 0, 0]
    dataset = NYUDepthV2Mat(nyu_mat, size=(24, 32), augment=True, seed=4)
    for index in range(3):
        sample = dataset[index]
        red = (sample["image"][0] > 200) & (sample["image"][1] < 50)
        top_class = sample["mask"] == 7  # the top half's label; the red quadrant lies inside it
        assert bool(top_class[red].float().mean() > 0.95)
        assert set(sample["depth"].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_file_opens_once_per_process_and_pickles_without_handle(nyu_mat: Path):
    dataset = NYUDepthV2Mat(nyu_mat, size=None)
    first = dataset[0]
    handle = dataset.file._file
    dataset[1]
    assert dataset.file._file is handle  # reused, not reopened per sample
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.file._file is None
    assert torch.equal(clone[0]["image"], first["image"])


def test_workers_read_the_same_samples(nyu_mat: Path):
    dataset = NYUDepthV2Mat(nyu_mat, size=(24, 32), augment=True)
    dataset[0]  # the parent holds an open handle; workers must open their own
    serial = next(iter(DataLoader(dataset, batch_size=3)))
    parallel = next(iter(DataLoader(dataset, batch_size=3, num_workers=2)))
    assert all(torch.equal(serial[key], parallel[key]) for key in serial)


def test_real_frames_keep_matlab_layout(nyuv2_mini: Path, tmp_path: Path, formats):
    """Real 480 x 640 frames stored as MATLAB does ((N, 3, 640, 480)) come back as the PNGs."""
    rgb = np.stack([np.asarray(Image.open(nyuv2_mini / "rgb" / f"{k:04d}.png")).transpose(2, 0, 1) for k in (1, 2)])
    depth = np.stack([np.asarray(Image.open(nyuv2_mini / "depth" / f"{k:04d}.png")) / 1000.0 for k in (1, 2)])
    path = formats.write_nyu_mat(tmp_path / "real.mat", rgb, depth.astype(np.float32))
    with h5py.File(path, "r") as file:
        assert file["images"].shape == (2, 3, 640, 480) and file["depths"].shape == (2, 640, 480)
    sample = NYUDepthV2Mat(path, size=None)[0]
    assert torch.equal(sample["image"], torch.from_numpy(rgb[0]))
    assert torch.allclose(sample["depth"][0], torch.from_numpy(depth[0]).float())
    assert bool((sample["mask"] == IGNORE_INDEX).all())  # no 'labels' dataset: all void


def test_missing_depths_names_the_key(tmp_path: Path, formats):
    path = formats.write_nyu_mat(tmp_path / "nodepth.mat", *formats.nyu_frames(), skip=("depths",))
    with pytest.raises(DataError, match=r"no dataset 'depths'; found keys \['images', 'labels'\]"):
        NYUDepthV2Mat(path)


def test_truncated_or_garbage_file(nyu_mat: Path, tmp_path: Path):
    data = nyu_mat.read_bytes()
    truncated = tmp_path / "truncated.mat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.mat.*truncated or corrupt"):
        NYUDepthV2Mat(truncated)[2]
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(1000))
    with pytest.raises(DataError, match=r"cannot read .*garbage\.mat as HDF5"):
        NYUDepthV2Mat(garbage)


def test_corrupt_chunk_is_reported_at_read_time(nyu_mat: Path):
    with h5py.File(nyu_mat, "r") as file:
        chunk = file["depths"].id.get_chunk_info(2)  # frame 3's compressed depth
    data = bytearray(nyu_mat.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = bytes(chunk.size)
    nyu_mat.write_bytes(bytes(data))
    dataset = NYUDepthV2Mat(nyu_mat)
    dataset[0]
    with pytest.raises(DataError, match=r"cannot read frame 3 of .*nyu_depth_v2_labeled\.mat"):
        dataset[2]


def test_rgb_and_depth_of_different_sizes(tmp_path: Path, formats):
    images, depths, labels = formats.nyu_frames()
    path = formats.write_nyu_mat(tmp_path / "sizes.mat", images, depths[:, :40], labels)
    with pytest.raises(DataError, match=r"'depths' is \(3, 64, 40\) but 'images' is \(3, 3, 64, 48\)"):
        NYUDepthV2Mat(path)


def test_raw_label_outside_the_894_classes(tmp_path: Path, formats):
    images, depths, labels = formats.nyu_frames()
    labels[1, 5, 5] = 900
    formats.write_splits(tmp_path, [1], [2, 3])
    formats.write_mappings(tmp_path)
    dataset = NYUDepthV2Mat(formats.write_nyu_mat(tmp_path / "labels.mat", images, depths, labels))
    dataset[0]
    with pytest.raises(DataError, match=r"labels\.mat frame 2 holds label 900, outside the class set 0\.\.894"):
        dataset[1]


def test_mapping_of_wrong_length(tmp_path: Path, formats):
    formats.write_mappings(tmp_path, length40=893)
    path = formats.write_nyu_mat(tmp_path / "nyu.mat", *formats.nyu_frames())
    with pytest.raises(DataError, match="mapClass has 893 entries, expected 894"):
        NYUDepthV2Mat(path, num_classes=40)


def test_missing_meta_files(tmp_path: Path, formats):
    path = formats.write_nyu_mat(tmp_path / "nyu.mat", *formats.nyu_frames())
    with pytest.raises(DataError, match="needs classMapping40.mat"):
        NYUDepthV2Mat(path)
    formats.write_mappings(tmp_path / "meta")
    assert len(NYUDepthV2Mat(path)) == 3  # found in ./meta
    with pytest.raises(DataError, match="split 'train' needs the official splits.mat"):
        NYUDepthV2Mat(path, "train")


def test_split_beyond_the_file(tmp_path: Path, formats):
    formats.write_splits(tmp_path, [1, 795], [2])
    formats.write_mappings(tmp_path)
    path = formats.write_nyu_mat(tmp_path / "nyu.mat", *formats.nyu_frames())
    with pytest.raises(DataError, match=r"train frames up to 795, but the data holds frames 1\.\.3"):
        NYUDepthV2Mat(path, "train")


def test_bad_options(nyu_mat: Path):
    with pytest.raises(DataError, match="13 or 40 classes"):
        NYUDepthV2Mat(nyu_mat, num_classes=894)
    with pytest.raises(DataError, match="unknown split 'val'"):
        NYUDepthV2Mat(nyu_mat, "val")
