"""The official NYU split and class mappings, read from the real metadata files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from xmodal.data.nyu_meta import (
    NYU13_CLASSES, apply_lut, identity_lut, load_mapping13, load_mapping40, load_splits, raw_label_lut,
)
from xmodal.errors import DataError


def test_official_split(nyuv2_mini: Path):
    splits = load_splits(nyuv2_mini / "meta" / "splits.mat")
    assert (len(splits["train"]), len(splits["test"])) == (795, 654)
    assert sorted(np.concatenate([splits["train"], splits["test"]]).tolist()) == list(range(1, 1450))
    assert splits["test"][:8].tolist() == [1, 2, 9, 14, 15, 16, 17, 18]


def test_13_class_mapping_maps_40_classes(nyuv2_mini: Path):
    mapping, names = load_mapping13(nyuv2_mini / "meta" / "class13Mapping.mat")
    assert tuple(names) == NYU13_CLASSES and mapping.shape == (40,)
    _, names40 = load_mapping40(nyuv2_mini / "meta" / "classMapping40.mat")
    assert names40[:3] == ["wall", "floor", "cabinet"]
    pairs = {names40[j]: names[mapping[j] - 1] for j in range(40)}
    assert pairs["wall"] == "wall" and pairs["floor"] == "floor" and pairs["cabinet"] == "furniture"
    assert pairs["television"] == "tv" and pairs["bed"] == "bed" and pairs["otherprop"] == "objects"


@pytest.mark.parametrize("raw_name, name40, name13", [
    ("wall", "wall", "wall"), ("floor", "floor", "floor"), ("ceiling", "ceiling", "ceiling"),
    ("bed", "bed", "bed"), ("television", "television", "tv"), ("window", "window", "window"),
])
def test_raw_classes_reach_the_right_names(nyuv2_mini: Path, raw_name: str, name40: str, name13: str):
    meta = nyuv2_mini / "meta"
    raw_names = [str(cell[0]) for cell in scipy.io.loadmat(meta / "classMapping40.mat")["allClassName"].ravel()]
    raw = raw_names.index(raw_name) + 1  # stored labels are 1-based
    lut40, classes40 = raw_label_lut(40, meta / "classMapping40.mat")
    lut13, classes13 = raw_label_lut(13, meta / "classMapping40.mat", meta / "class13Mapping.mat")
    assert lut40.shape == lut13.shape == (895,) and lut40[0] == lut13[0] == 255
    assert classes40[lut40[raw]] == name40 and classes13[lut13[raw]] == name13


def test_apply_lut_rejects_labels_outside_the_class_set():
    lut = identity_lut(13)
    assert apply_lut(np.array([[0, 1], [13, 7]], np.uint8), lut, "x").tolist() == [[255, 0], [12, 6]]
    with pytest.raises(DataError, match="frame.png holds label 14, outside the class set 0..13"):
        apply_lut(np.array([[14]], np.uint8), lut, "frame.png")


def test_broken_meta_files(tmp_path: Path, formats):
    formats.write_mappings(tmp_path, length40=40)
    with pytest.raises(DataError, match="mapClass has 40 entries, expected 894"):
        load_mapping40(tmp_path / "classMapping40.mat")
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1]])})
    with pytest.raises(DataError, match=r"has no variable 'testNdxs'; found \['trainNdxs'\]"):
        load_splits(tmp_path / "splits.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk" * 10)
    with pytest.raises(DataError, match="cannot read MATLAB file .*junk.mat"):
        load_splits(tmp_path / "junk.mat")
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "absent.mat")
