"""Modality pairs that exist as a modality file and a recipe only, with no task code: the reverse
Lab pair (ab teacher -> L student) and RGB -> edges, each end to end; and the edge view's
properties, checked on images whose edges are known."""
from __future__ import annotations

import json

import pytest
import torch

from xmodal.cli import main
from xmodal.modalities import build_modality
from xmodal.modalities.edges import EDGE_MEAN, EDGE_STD

TINY = ["data.options={num_samples: 160}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
        "distill.train.batch_size=32", "distill.loss_options.crd.nce_k=32", "linear_probe.epochs=2",
        "finetune.batch_size=32", "data.num_workers=0"]


@pytest.mark.parametrize("recipe,teacher_view,student_view", [("lab-reverse", "ab", "L"), ("rgb-edges", "rgb", "edges")])
def test_a_pair_made_of_a_recipe_runs_end_to_end(tmp_path, recipe, teacher_view, student_view):
    out = tmp_path / recipe
    assert main(["run", recipe, "quick=true", f"output_dir={out}", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {(r["method"], r["protocol"]) for r in report["results"]} == {
        (m, p) for m in ("random", "kd", "crd") for p in ("linear_probe", "finetune")}
    assert report["teacher"]["view"] == teacher_view
    # the student read its own view: its stem has that view's channel count
    state = torch.load(out / "stages" / "distill-crd" / "final.pt", weights_only=True)
    stem = next(v for k, v in state.items() if k.startswith("student.") and v.dim() == 4)
    assert stem.shape[1] == {"L": 1, "edges": 1, "ab": 2}[student_view]


FLAT = 1.5e-3  # kornia's magnitude is sqrt(gx² + gy² + 1e-6): 1e-3 where nothing changes


def _edges(image: torch.Tensor) -> torch.Tensor:
    return build_modality("edges").views({"image": image}, ["edges"])["edges"] * EDGE_STD + EDGE_MEAN


def test_a_flat_image_has_no_edges_and_a_step_has_one_where_it_steps():
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert _edges(flat).abs().max() < FLAT
    step = flat.clone()
    step[..., 4:] = 0.9
    magnitude = _edges(step)[0, 0]
    assert magnitude[:, 3:5].min() > 0.1  # the two columns beside the step
    assert magnitude[:, :2].abs().max() < FLAT and magnitude[:, 6:].abs().max() < FLAT


def test_a_change_of_colour_at_equal_luminance_is_no_edge():
    """The student sees luminance edges only: red beside a grey of the same luminance is flat to it."""
    red = torch.tensor([1.0, 0.0, 0.0])
    grey = 0.299 * torch.ones(3)  # ITU-R 601 luminance of pure red
    image = torch.empty(1, 3, 8, 8)
    image[..., :4] = red[:, None, None]
    image[..., 4:] = grey[:, None, None]
    assert _edges(image).abs().max() < FLAT
    assert build_modality("edges").views({"image": image}, ["rgb"])["rgb"][0, :, 0, 0].ne(
        build_modality("edges").views({"image": image}, ["rgb"])["rgb"][0, :, 0, 7]).any()


def test_the_edge_standardisation_is_cifar10s(cifar10_jpeg):
    """EDGE_MEAN / EDGE_STD recomputed from 500 CIFAR-10 test JPEGs: the standardised edge view has
    about zero mean and unit spread there."""
    from xmodal.data import build_dataset

    data = build_dataset("imagefolder", str(cifar10_jpeg), "test", augment=None, labeled=True)
    images = torch.stack([data[i]["image"] for i in range(0, len(data), len(data) // 500)][:500])
    edges = build_modality("edges").views({"image": images}, ["edges"])["edges"]
    assert abs(float(edges.mean())) < 0.1 and abs(float(edges.std()) - 1.0) < 0.1
