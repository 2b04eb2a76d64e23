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
    assert not (out / "stages" / "teacher").exists() and not (out / "teacher.safetensors").exists()
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


ENSEMBLE = ["data.distill.subset=128", "data.probe_train.subset=100", "data.probe_test.subset=100",
            "distill.train.batch_size=32", "distill.loss_options.crd.nce_k=32", "linear_probe.epochs=2",
            "data.num_workers=0"]


@pytest.mark.slow
def test_ensemble_of_imagenet_teachers_runs_on_real_images(tmp_path, cifar10_jpeg):
    out = tmp_path / "run"
    assert main(["run", "ensemble-lab-imagenet", "quick=true", f"data.root={cifar10_jpeg}", f"output_dir={out}",
                 *ENSEMBLE]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r.get("n_teachers")): r["value"] for r in report["results"]}
    assert set(rows) == ({(f"teacher-{i}", None) for i in range(3)} | {("random", None)}
                         | {(m, k) for m in ("kd", "crd") for k in (1, 2, 3)})
    assert [t["arch"] for t in report["teachers"]["members"]] == [f"efficientnet_lite{k}" for k in range(3)]
    # M = 3: one critic per teacher, each with its own banks, and one 1000-way KD head
    crd = torch.load(out / "stages" / "distill-crd-m3" / "final.pt", weights_only=True)
    assert {k.split(".")[1] for k in crd if k.startswith("criteria.")} == {"crd_0", "crd_1", "crd_2"}
    assert torch.load(out / "stages" / "distill-kd-m2" / "final.pt", weights_only=True)["student.fc.weight"].shape[0] == 1000
    assert "teacher-2: efficientnet_lite2 on L_grey at 64 px, used as built" in (out / "report.md").read_text()


def test_one_teacher_of_a_list_distils_exactly_as_the_single_teacher(tmp_path, cifar10_jpeg):
    """``teachers: [X]`` at M = 1 is the single-teacher run of X: the same student weights."""
    lite0 = "{model: {arch: efficientnet_lite0, options: {pretrained: true, input_size: 32}}, num_classes: 1000, train: {epochs: 0}}"
    common = ["quick=true", f"data.root={cifar10_jpeg}", *ENSEMBLE, "distill.methods=[crd]", "protocols=[linear_probe]"]
    assert main(["run", "ensemble-lab-imagenet", *common, f"output_dir={tmp_path / 'list'}", f"teachers=[{lite0}]",
                 "distill.n_teachers=[1]"]) == 0
    assert main(["run", "lab-imagenet-teacher", *common, f"output_dir={tmp_path / 'one'}",
                 "teacher.model.options={pretrained: true, input_size: 32}", "teacher.probe=false",
                 "distill.train.epochs=1", "linear_probe={epochs: 2, batch_size: 256, lr: 0.1}"]) == 0
    listed = torch.load(tmp_path / "list" / "stages" / "distill-crd-m1" / "final.pt", weights_only=True)
    single = torch.load(tmp_path / "one" / "stages" / "distill-crd" / "final.pt", weights_only=True)
    assert listed.keys() == single.keys()
    assert all(torch.equal(listed[k], single[k]) for k in listed)


@pytest.mark.parametrize("overrides,message", [
    (["teacher.probe=true"], "teacher and a teachers list are both set"),
    (["distill.n_teachers=[1,4]"], "distill.n_teachers asks for 4 teachers but teachers lists 3"),
    (["distill.n_teachers=[0]"], "expected distinct teacher counts >= 1"),
    (["teachers=[{model: {arch: efficientnet_lite0, options: {pretrained: true}}, num_classes: 1000, "
      "train: {epochs: 0}, view: depth}]"], "teachers[0].view='depth' is not a view of modality 'lab'"),
    (["teachers=[{model: {arch: efficientnet_lite0, options: {pretrained: true}}, num_classes: 1000, train: {epochs: 0}},"
      " {model: {arch: resnet8}, train: {epochs: 1}}]", "distill.n_teachers=[2]"],
     "kd averages the teachers' soft labels, but their classifiers have [1000, 10] classes"),
    (["distill.methods=[ab]"], "distillation method 'ab' is now 'abound'"),
    (["distill.methods=[abound]"], "abound reads pre-activation maps: efficientnet_lite0 cannot return"),
    (["distill.methods=[ft]", "distill.n_teachers=[2]"], "ft has a first stage that reads one teacher, but 2"),
])
def test_bad_teacher_list_is_one_line_exit_2(tmp_path, error_line, cifar10_jpeg, overrides, message):
    out = tmp_path / "run"
    code = main(["run", "ensemble-lab-imagenet", "quick=true", f"data.root={cifar10_jpeg}", f"output_dir={out}",
                 *ENSEMBLE, *overrides])
    assert code == 2 and message in error_line()
    assert not out.exists()
