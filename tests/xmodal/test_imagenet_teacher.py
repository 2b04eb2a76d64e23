"""The paper's cross-modal setting: a frozen ImageNet luminance teacher (used as built) teaches an
ab student on another dataset's images; the recipe end to end on real CIFAR-10 JPEGs, and its
bad input."""
from __future__ import annotations

import json

import pytest
import torch

from xmodal.cli import main

SMALL = ["data.distill.subset=200", "data.probe_train.subset=200", "data.probe_test.subset=200",
         "distill.methods=[random,kd,crd]", "distill.train.batch_size=32", "distill.loss_options.crd.nce_k=64",
         "finetune.batch_size=32", "linear_probe.epochs=3", "data.num_workers=0"]


@pytest.mark.slow
def test_imagenet_teacher_recipe_runs_on_real_images(tmp_path, cifar10_jpeg):
    out = tmp_path / "run"
    assert main(["run", "lab-imagenet-teacher", "quick=true", f"data.root={cifar10_jpeg}", f"output_dir={out}",
                 *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["protocol"]): r["value"] for r in report["results"]}
    assert set(rows) == {("teacher", "linear_probe")} | {(m, p) for m in ("random", "kd", "crd")
                                                         for p in ("linear_probe", "finetune")}
    assert all(0 <= v <= 100 for v in rows.values())
    # 1000 ImageNet classes are not CIFAR-10's ten: the teacher is probed, not scored
    teacher = report["teacher"]
    assert teacher["top1"] is None and teacher["classes"] is None and teacher["trained_here"] is False
    assert teacher["input_size"] == 64 and teacher["view"] == "L_grey"
    assert not (out / "stages" / "teacher").exists() and not (out / "teacher.pt").exists()
    # KD distils the 1000-way soft labels into a 1000-way student head
    kd = torch.load(out / "stages" / "distill-kd" / "final.pt", weights_only=True)
    assert kd["student.fc.weight"].shape[0] == 1000
    assert "| teacher |" in (out / "report.md").read_text()


@pytest.mark.parametrize("overrides,message", [
    (["teacher.model.options={pretrained: false, input_size: 64}"], "leaves the teacher untrained"),
    (["teacher.num_classes=10"], "pretrained classifier has another number of classes"),
    (["teacher.train.epochs=2"], "teacher.num_classes is for a teacher used as built"),
    (["teacher.model.arch=efficientnet_lite9"], "unknown arch 'efficientnet_lite9'"),
    (["teacher.model.options={pretrained: true, input_size: 2}"], "input_size=2"),
])
def test_bad_teacher_is_one_line_exit_2(tmp_path, error_line, cifar10_jpeg, overrides, message):
    out = tmp_path / "run"
    code = main(["run", "lab-imagenet-teacher", "quick=true", f"data.root={cifar10_jpeg}", f"output_dir={out}",
                 *SMALL, *overrides])
    assert code == 2 and message in error_line()
    assert not out.exists()


def test_the_recipe_asks_for_its_images(tmp_path, error_line):
    assert main(["run", "lab-imagenet-teacher", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "root" in error_line()
