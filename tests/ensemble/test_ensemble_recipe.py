"""The ensemble recipes end to end on a tiny slice of real CIFAR-10, and one-line errors on bad pools."""
from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from xmodal.cli import main
from xmodal.models import build_model, load_backbone, save_backbone
from xmodal.models.checkpoint import read_checkpoint
from xmodal.tasks.distill import critic_weights

TINY = [
    "data.train.subset=100", "data.test.subset=50", "data.num_workers=0",
    "teachers.count=2", "teachers.model.options={width: 4}", "teachers.train.epochs=1", "teachers.train.batch_size=50",
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
    rows = {(r["method"], r["n_teachers"]) for r in report["results"]}
    assert rows == {("ce", 0)} | {(m, n) for m in METHODS[1:] for n in (1, 2)}
    assert all(set(r) == {"method", "protocol", "metric", "value", "n_teachers"} for r in report["results"])
    assert all(r["protocol"] == "test" and r["metric"] == "top1" and 0 <= r["value"] <= 100 for r in report["results"])
    assert set(report["teachers"]["ensemble_top1"]) == {"1", "2"} and len(report["teachers"]["members"]) == 2
    assert (out / "report.png").stat().st_size > 0 and (out / "teachers" / "teacher-1.safetensors").exists()
    history = json.loads((out / "stages" / "distill-crd_ensemble-m2-s0" / "result.json").read_text())["history"]
    assert {"ce", "crd_0", "crd_1"} <= set(history[0])  # every teacher's critic is logged
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
    assert main([*common, f"output_dir={tmp_path / 'split'}", "distill.split_crd_weight=true"]) == 0
    assert built == [pytest.approx([0.8, 0.8]), pytest.approx([0.4, 0.4])]


@pytest.mark.slow
def test_tiny_cross_modal_run_gives_each_teacher_its_own_view(cifar10_jpeg, tmp_path):
    out = tmp_path / "lab"
    args = ["run", "ensemble-lab", f"output_dir={out}", "data=imagefolder", f"data.root={cifar10_jpeg}",
            "distill.methods=[crd_ensemble]", *[a for a in TINY if not a.startswith("teachers.count")],
            "distill.n_teachers=[2]"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [m["view"] for m in report["teachers"]["members"]] == ["L", "rgb"]
    # the networks really were built for those views: 1 input channel for L, 3 for RGB
    assert [read_checkpoint(out / "teachers" / f"teacher-{i}.safetensors")["in_channels"] for i in range(2)] == [1, 3]
    assert [(r["method"], r["n_teachers"]) for r in report["results"]] == [("crd_ensemble", 2)]


def _checkpoint(path, num_classes: int, seed: int = 0, in_channels: int = 3):
    torch.manual_seed(seed)
    return save_backbone(path, build_model("resnet8", in_channels, num_classes, width=4))


@pytest.mark.parametrize("overrides, message", [
    (["teachers.count=0"], "teachers: the pool is empty"),
    (["teachers.count=2", "distill.n_teachers=[1,4]"], "asks for 4 teachers but the pool has 2"),
    (["teachers.count=2", "distill.n_teachers=[1,2]", "distill.teacher_weights=[1.0]"], "teacher_weights has 1 entries for a pool of 2"),
    (["teachers.members=[{seed: 3}, {}, {}, {}]"], "members[0] and [3] are the same network"),
    (["teachers.count=1", "teachers.members=[{}, {}]"], "members lists 2 teachers but teachers.count=1"),
    (["distill.methods=[ce,dml]"], "distill.methods"),
])
def test_bad_pool_is_one_line_exit_2(tmp_path, capsys, overrides, message):
    out = tmp_path / "x"
    assert main(["run", "ensemble-cifar", f"output_dir={out}", *overrides]) == 2
    assert message in _error(capsys)
    assert not out.exists()


def test_duplicate_and_foreign_checkpoints_are_refused(tmp_path, capsys):
    first, other = _checkpoint(tmp_path / "a.pt", 10), _checkpoint(tmp_path / "b.pt", 10, seed=1)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(first.read_bytes())
    hundred = _checkpoint(tmp_path / "c100.pt", 100)
    luminance = _checkpoint(tmp_path / "L.pt", 10, in_channels=1)
    out = tmp_path / "x"
    for members, message in [
        (f"[{{checkpoint: {first}}}, {{checkpoint: {other}}}, {{checkpoint: {first}}}]", "members[0] and [2] are the same checkpoint"),
        (f"[{{checkpoint: {first}}}, {{checkpoint: {copy}}}]", "members[0] and [1] are the same checkpoint"),
        (f"[{{checkpoint: {first}}}, {{checkpoint: {hundred}}}]", "classifies 100 classes but the data (synthetic train) has 10"),
        (f"[{{checkpoint: {luminance}}}]", "takes 1 input channels but its view 'rgb' has 3"),
    ]:
        assert main(["run", "ensemble-cifar", f"output_dir={out}", f"teachers.members={members}",
                     "distill.n_teachers=[1]"]) == 2
        assert message in _error(capsys)
        assert not out.exists()


def test_a_checkpoint_members_identity_is_its_file(tmp_path):
    # A student's stage records each teacher it learnt from; for a checkpoint that is the file's
    # content, so another file at the same path is another teacher, the same file elsewhere the same.
    from xmodal.schema import ModelConfig
    from xmodal.tasks.ensemble_pool import Member

    def member(path) -> Member:
        return Member(position=0, model=ModelConfig(arch="resnet8"), view="rgb", seed=0, checkpoint=str(path))

    path = _checkpoint(tmp_path / "t.pt", 10)
    first = member(path).identity
    assert "checkpoint" not in first and first["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    moved = tmp_path / "elsewhere" / "t.pt"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert member(moved).identity == first
    _checkpoint(path, 10, seed=1)
    assert member(path).identity["checkpoint_sha256"] != first["checkpoint_sha256"]
    trained = Member(position=1, model=ModelConfig(arch="resnet8"), view="rgb", seed=0, checkpoint=None)
    assert "checkpoint_sha256" not in trained.identity
    # a member reads its file once: identity and the weights it loads are those bytes, whatever is
    # put at the path later (before, the identity hashed the path at resolve time and the pool
    # loaded it again when it built the teachers)
    read = member(path)
    before = path.read_bytes()
    recorded = read.identity["checkpoint_sha256"]
    _checkpoint(path, 10, seed=2)
    assert path.read_bytes() != before
    assert read.identity["checkpoint_sha256"] == recorded == hashlib.sha256(before).hexdigest()
    loaded = load_backbone(read.file, "teacher 0").state_dict()
    original = torch.load(io.BytesIO(before), weights_only=True)["state_dict"]
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in loaded)


@pytest.mark.slow
def test_a_member_file_replaced_at_its_path_is_another_teacher(tmp_path, capsys):
    # The student stages of a run with a checkpoint member record the file's content: a run
    # into the same folder after the file was replaced is refused, not resumed as the old students.
    member = _checkpoint(tmp_path / "member.pt", 10)
    out = tmp_path / "run"
    args = ["run", "ensemble-cifar", f"output_dir={out}", "data.options={num_samples: 120}", "data.num_workers=0",
            f"teachers.members=[{{checkpoint: {member}}}]", "teachers.count=1", "distill.n_teachers=[1]",
            "distill.methods=[kd_ensemble]", "student.options={width: 4}", "distill.train.epochs=1",
            "distill.train.batch_size=40"]
    assert main(args) == 0
    recorded = json.loads((out / "report.json").read_text())["teachers"]["members"][0]["checkpoint_sha256"]
    assert recorded == hashlib.sha256(member.read_bytes()).hexdigest()
    _checkpoint(member, 10, seed=1)
    capsys.readouterr()
    assert main(args) == 2
    assert "of a run with another configuration" in capsys.readouterr().err.strip().splitlines()[-1]
