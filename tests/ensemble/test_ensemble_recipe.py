"""The ensemble recipes end to end on a tiny slice of real CIFAR-10, and one-line errors on bad pools."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from xmodal.cli import main
from xmodal.models import build_model, save_backbone
from xmodal.models.checkpoint import read_checkpoint
from xmodal.tasks.distill import critic_weights

TINY = [
    "data.teacher.subset=100", "data.distill.subset=100", "data.probe_test.subset=50", "data.num_workers=0",
    "teachers=2", "teacher.model.options={width: 4}", "teacher.train.epochs=1", "teacher.train.batch_size=50",
    "student.options={width: 4}", "distill.n_teachers=[1,2]", "distill.train.epochs=1", "distill.train.batch_size=50",
    "distill.loss_options.crd.nce_k=32",
]
METHODS = ("ce", "kd_ensemble", "crd_ensemble", "crd_kd_ensemble")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_tiny_cifar_run_reports_every_method_and_teacher_count(cifar10_jpeg, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "ensemble-cifar", f"output_dir={out}", "data=imagefolder", f"data.root={cifar10_jpeg}", *TINY]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r.get("n_teachers")) for r in report["results"]}
    assert rows == {("ce", None)} | {(m, n) for m in METHODS[1:] for n in (1, 2)}
    assert all(r["protocol"] == "test" and r["metric"] == "top1" and 0 <= r["value"] <= 100 for r in report["results"])
    assert set(report["teachers"]["ensemble_top1"]) == {"1", "2"} and len(report["teachers"]["members"]) == 2
    # copy i of the teacher is seeded seed + i: two different networks
    assert [m["seed"] for m in report["teachers"]["members"]] == [0, 1]
    first, second = (read_checkpoint(out / "teachers" / f"teacher-{i}.safetensors")["state_dict"] for i in range(2))
    assert not torch.equal(first["fc.weight"], second["fc.weight"])
    # the averaged softmax of one teacher is that teacher
    assert report["teachers"]["ensemble_top1"]["1"] == report["teachers"]["members"][0]["top1"]
    assert (out / "report.png").stat().st_size > 0
    history = json.loads((out / "stages" / "distill-crd_ensemble-m2" / "result.json").read_text())["history"]
    assert {"ce", "crd_0", "crd_1"} <= set(history[0])  # every teacher's critic is logged
    assert set(json.loads((out / "stages" / "train-ce" / "result.json").read_text())["history"][0]) >= {"ce"}
    # running again resumes: every stage is finished, so nothing trains and the numbers repeat
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]


def test_critic_weights_paper_or_split():
    assert critic_weights(0.8, [1.0, 1.0, 1.0, 1.0], split=False) == pytest.approx([0.8] * 4)
    assert critic_weights(0.8, [1.0, 1.0, 1.0, 1.0], split=True) == pytest.approx([0.2] * 4)
    assert critic_weights(0.8, [3.0, 1.0], split=True) == pytest.approx([0.6, 0.2])
    assert critic_weights(0.8, [1.0], split=True) == pytest.approx([0.8])  # one teacher: the same either way
    assert critic_weights(0.8, [0.0, 0.0], split=True) == [0.0, 0.0]


@pytest.mark.slow
def test_split_crd_weight_reaches_the_critics(cifar10_jpeg, tmp_path, monkeypatch):
    from xmodal.distiller import Distiller

    built = []
    original = Distiller.build.__func__

    def spy(cls, *args, **kwargs):
        distiller = original(cls, *args, **kwargs)
        built.append([distiller.weights[f"crd_{i}"] for i in range(2)])
        return distiller

    monkeypatch.setattr(Distiller, "build", classmethod(spy))
    common = ["run", "ensemble-cifar", "data=imagefolder", f"data.root={cifar10_jpeg}", *TINY,
              "distill.methods=[crd_ensemble]", "distill.n_teachers=[2]"]
    assert main([*common, f"output_dir={tmp_path / 'paper'}"]) == 0
    paper, built[:] = list(built), []
    assert main([*common, f"output_dir={tmp_path / 'split'}", "distill.split_crd_weight=true"]) == 0
    assert paper and all(w == pytest.approx([0.8, 0.8]) for w in paper)
    assert built and all(w == pytest.approx([0.4, 0.4]) for w in built)


@pytest.mark.slow
def test_tiny_cross_modal_run_gives_each_teacher_its_own_view(cifar10_jpeg, tmp_path):
    out = tmp_path / "lab"
    tiny = [a for a in TINY if not a.startswith("teacher")] + [
        f"teachers.{i}.{key}" for i in range(2) for key in ("model.options={width: 4}", "train.epochs=1",
                                                            "train.batch_size=50")]
    args = ["run", "ensemble-lab", f"output_dir={out}", "data=imagefolder", f"data.root={cifar10_jpeg}",
            "distill.methods=[crd_ensemble]", *tiny, "distill.n_teachers=[2]"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [m["view"] for m in report["teachers"]["members"]] == ["L", "rgb"]
    # the networks really were built for those views: 1 input channel for L, 3 for RGB
    assert [read_checkpoint(out / "teachers" / f"teacher-{i}.safetensors")["in_channels"] for i in range(2)] == [1, 3]
    assert [(r["method"], r["n_teachers"]) for r in report["results"]] == [("crd_ensemble", 2)]


def _checkpoint(path, num_classes: int, seed: int = 0, in_channels: int = 3):
    torch.manual_seed(seed)
    return save_backbone(path, build_model("resnet8", in_channels, num_classes, width=4))


@pytest.mark.parametrize("recipe, overrides, message", [
    ("ensemble-cifar", ["teachers=0"], "teachers=0: give a number of copies of teacher >= 1"),
    ("ensemble-cifar", ["teachers=2", "distill.n_teachers=[1,4]"], "asks for 4 teachers but teachers lists 2"),
    ("ensemble-cifar", ["teachers=2", "distill.n_teachers=[1,2]", "distill.teacher_weights=[1.0]"],
     "teacher_weights has 1 entries for a pool of 2"),
    ("ensemble-cifar", ["teachers=[{}, {}]"], "teacher and a teachers list are both set"),
    ("ensemble-lab", ["teachers=[{seed: 3}, {}, {}, {}]"], "teachers[0] and teachers[3] are the same network"),
    ("ensemble-lab", ["teachers.2.train.epochs=1"], "teachers lists 2 entries; name one by its position 0..1"),
    ("ensemble-cifar", ["student_seeds=[0,1]"], "recipe key 'student_seeds' is now 'seeds"),
    ("ensemble-cifar", ["data.train.subset=10"], "recipe key 'data.train' is now 'data.teacher and data.distill'"),
    ("ensemble-cifar", ["distill.methods=[ce,dml]"], "unknown distillation method 'dml'"),
    ("ensemble-cifar", ["distill.methods=[crd]"], "protocol test scores the student's own classifier, but 'crd'"),
    ("ensemble-cifar", ["distill.methods=[random,ce]"], "but 'random' trains none over the 10 classes of "
                                                        "data.probe_test; drop it"),
    ("ensemble-cifar", ["distill.weights.ce=0", "distill.methods=[crd_ensemble]"], "set distill.weights.ce > 0"),
    ("ensemble-cifar", ["distill.ce_weight=0.3"], "distill.ce_weight: ce fixes its own CE weight; override it with "
                                                  "distill.weights.ce"),
    ("ensemble-cifar", ["teachers=2", "teacher.checkpoint=/nowhere.pt"], "teachers=2 copies teacher, whose checkpoint"),
    ("ensemble-cifar", ["teachers.1.train.epochs=0"], "teachers is 8, not a list"),
])
def test_bad_pool_is_one_line_exit_2(tmp_path, capsys, recipe, overrides, message):
    out = tmp_path / "x"
    assert main(["run", recipe, f"output_dir={out}", *overrides]) == 2
    assert message in _error(capsys)
    assert not out.exists()


def test_duplicate_and_foreign_checkpoints_are_refused(tmp_path, capsys):
    first, other = _checkpoint(tmp_path / "a.pt", 10), _checkpoint(tmp_path / "b.pt", 10, seed=1)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(first.read_bytes())
    hundred = _checkpoint(tmp_path / "c100.pt", 100)
    luminance = _checkpoint(tmp_path / "L.pt", 10, in_channels=1)
    out = tmp_path / "x"
    net = "model: {options: {width: 4}}"  # a checkpoint teacher's network is its section's, checked
    for files, message in [
        ([first, other, first], "teachers[0] and teachers[2] are the same network"),
        ([first, copy], "teachers[0] and teachers[1] are the same network"),
        ([first, hundred], "their classifiers have [10, 100] classes"),
        ([hundred], "the student has 10 classes, the teachers 100"),
        ([luminance], "in_channels=1"),
    ]:
        members = "[" + ", ".join(f"{{checkpoint: {f}, {net}}}" for f in files) + "]"
        assert main(["run", "ensemble-cifar", f"output_dir={out}", "teacher=null", f"teachers={members}",
                     f"distill.n_teachers=[{len(files)}]", "distill.methods=[kd_ensemble]"]) == 2
        assert message in _error(capsys)
        assert not out.exists()


@pytest.mark.slow
def test_a_member_file_replaced_at_its_path_is_another_teacher(tmp_path, capsys):
    # The student stages of a run with a checkpoint teacher record the file's content: a run
    # into the same folder after the file was replaced is refused, not resumed as the old students.
    member = _checkpoint(tmp_path / "member.pt", 10)
    out = tmp_path / "run"
    args = ["run", "ensemble-cifar", f"output_dir={out}", "data.options={num_samples: 120}", "data.num_workers=0",
            "teacher=null", f"teachers=[{{checkpoint: {member}, model: {{options: {{width: 4}}}}}}]", "distill.n_teachers=[1]",
            "distill.methods=[kd_ensemble]", "student.options={width: 4}", "distill.train.epochs=1",
            "distill.train.batch_size=40"]
    assert main(args) == 0
    recorded = json.loads((out / "report.json").read_text())["teachers"]["members"][0]["checkpoint_sha256"]
    assert recorded == hashlib.sha256(member.read_bytes()).hexdigest()
    _checkpoint(member, 10, seed=1)
    capsys.readouterr()
    assert main(args) == 2
    assert "of a run with another configuration" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_recipe_of_the_former_ensemble_task_is_told_what_it_now_is(tmp_path, capsys):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("task: ensemble\nteachers: {count: 4}\nstudent_seeds: [0, 1]\n")
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 2
    assert "now task 'transfer' with teachers: M (copies of teacher) or a list, and protocols: [test]" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_override_of_one_entry_leaves_the_entry_an_anchor_copied_alone():
    from xmodal.config import resolve
    from xmodal.tasks.transfer import TransferConfig

    schemas = {"transfer": TransferConfig}  # ensemble-lab makes teachers[1] from teachers[0] by a YAML anchor
    assert [t.train.epochs for t in resolve("ensemble-lab", ["teachers.1.train.epochs=0"], schemas).teachers] == [15, 0]
    assert [t.train.epochs for t in resolve("ensemble-lab", ["teachers.0.train.epochs=7"], schemas).teachers] == [7, 15]


def test_the_pools_of_different_run_seeds_share_no_teacher():
    from xmodal.config import resolve
    from xmodal.tasks.transfer import TransferConfig, _sections

    def seeds(*overrides):
        return [section.seed for section, _ in _sections(resolve("ensemble-cifar", list(overrides),
                                                                 {"transfer": TransferConfig}))]

    assert seeds("teachers=3") == [0, 1, 2] and seeds("teachers=3", "seed=1") == [3, 4, 5]
    assert seeds("teachers=2", "seed=1", "teacher.seed=10") == [10, 11]


def test_combined_seeds_average_the_teachers_ensemble_and_keep_each_pool():
    from xmodal.report import combine_seeds

    def report(value, pool):
        return {"results": [{"method": "ce", "protocol": "test", "metric": "top1", "value": value}],
                "teachers": {"members": [], "ensemble_top1": pool}}

    combined = combine_seeds([report(40.0, {"1": 10.0, "2": 14.0}), report(42.0, {"1": 12.0, "2": 16.0})], [0, 1])
    assert combined["teachers"]["ensemble_top1"] == {"1": 11.0, "2": 15.0}
    assert [s["teachers"]["ensemble_top1"]["2"] for s in combined["by_seed"]] == [14.0, 16.0]
    assert combined["results"][0]["value"] == 41.0


def test_a_ce_only_run_trains_no_teacher(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "ensemble-cifar", f"output_dir={out}", "data.options={num_samples: 120}", "data.num_workers=0",
                 "teachers=2", "distill.n_teachers=[1,2]", "distill.methods=[ce]", "student.options={width: 4}",
                 "distill.train.epochs=1", "distill.train.batch_size=40"]) == 0
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["train-ce"]
    report = json.loads((out / "report.json").read_text())
    assert [(r["method"], r["protocol"]) for r in report["results"]] == [("ce", "test")]
