"""The command line: listing, a tiny end-to-end run, and one-line errors on bad input."""
from __future__ import annotations

import functools
import hashlib
import json

import pytest
import safetensors.torch
import torch

from xmodal import __version__
from xmodal.cli import main
from xmodal.models import build_model, save_backbone

TINY = [
    "data.options={num_samples: 96}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
    "distill.methods=[random,crd,kd]", "distill.train.epochs=1", "distill.train.batch_size=32",
    "distill.loss_options.crd.nce_k=32", "linear_probe.epochs=2", "finetune.epochs=1",
    "finetune.batch_size=32", "student.options={width: 4}", "teacher.model.options={width: 4}",
    "data.num_workers=0",
]


def _write_teacher(path, seed: int) -> None:
    """A tiny L teacher checkpoint at ``path``, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    save_backbone(path, build_model("resnet8", 1, 10, width=4))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_version_and_recipes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out
    assert main(["recipes"]) == 0
    assert "lab-color-transfer" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_lab_run_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["protocol"]) for r in report["results"]}
    assert rows == {(m, p) for m in ("random", "crd", "kd") for p in ("linear_probe", "finetune")}
    assert all(r["metric"] == "top1" and 0 <= r["value"] <= 100 for r in report["results"])
    assert 0 <= report["teacher"]["top1"] <= 100 and report["config"]["distill"]["methods"] == ["random", "crd", "kd"]
    assert (out / "report.png").stat().st_size > 0 and "| crd |" in (out / "report.md").read_text()
    assert (out / "config.yaml").exists()
    assert report["threads"] == torch.get_num_threads() and report["torch"] == torch.__version__
    # each distilled student is exported before finetuning: any safetensors reader opens it, and its
    # tensors are the distillation stage's student
    final = torch.load(out / "stages" / "distill-crd" / "final.pt", weights_only=True)
    exported = safetensors.torch.load_file(out / "students" / "crd.safetensors")
    assert exported.keys() == {k.removeprefix("student.") for k in final if k.startswith("student.")}
    assert all(torch.equal(v, final[f"student.{k}"]) for k, v in exported.items())
    assert not (out / "students" / "random.safetensors").exists()  # nothing was trained
    # The teacher as stages record it keeps the keys folders of earlier versions hold, so they resume:
    # teacher.probe (a report) and an unset teacher.num_classes are not part of it.
    identity = json.loads((out / "stages" / "teacher" / "result.json").read_text())["identity"]
    assert set(identity["teacher"]) == {"model", "checkpoint", "train"}
    # running again resumes: every stage is finished, so nothing trains and the numbers repeat
    first = (out / "report.json").read_text()
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *TINY]) == 0
    assert json.loads(first)["results"] == json.loads((out / "report.json").read_text())["results"]
    # the trained teacher is exported and loads back as teacher.checkpoint, scoring the same
    again = tmp_path / "again"
    assert main(["run", "lab-color-transfer", f"output_dir={again}", *TINY, "distill.methods=[random]",
                 f"teacher.checkpoint={out / 'teacher.safetensors'}"]) == 0
    assert json.loads((again / "report.json").read_text())["teacher"]["top1"] == json.loads(first)["teacher"]["top1"]
    assert not (again / "stages" / "teacher").exists()


def test_misspelt_key_is_one_line_exit_2(tmp_path, capsys):
    assert main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'x'}", "distill.train.epoch=3"]) == 2
    assert "did you mean 'distill.train.epochs'" in _error(capsys)
    assert not (tmp_path / "x").exists()


def test_missing_data_root_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "x"
    code = main(["run", "lab-color-transfer", f"output_dir={out}", "data=imagefolder", f"data.root={tmp_path / 'nope'}"])
    assert code == 2
    assert f"data root {tmp_path / 'nope'} does not exist" in _error(capsys)
    assert not out.exists()


def test_empty_folder_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    code = main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'x'}", "data=imagefolder",
                 f"data.root={tmp_path / 'empty'}", "data.teacher.split=train", "data.distill.split=train"])
    assert code == 2
    assert f"no images found under {tmp_path / 'empty' / 'train'}" in _error(capsys)


def test_infonce_method_trains_and_checkpoints(tmp_path):
    # An InfoNCE critic has no normaliser; its state once held an "unset" NaN log Z, which the
    # engine's guard (rightly) refused to write into the epoch checkpoint.
    out = tmp_path / "run"
    args = [*TINY, "distill.methods=[infonce]", "distill.loss_options.infonce={nce_k: 32}", "protocols=[linear_probe]"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    assert [(r["method"], r["protocol"]) for r in rows] == [("infonce", "linear_probe")]


@pytest.mark.parametrize("bank", ["bank=queue", "shared_negatives=true"])
def test_large_n_bank_options_train_through_the_recipe_and_resume(tmp_path, bank):
    out = tmp_path / "run"
    args = [*TINY, "distill.methods=[crd]", f"distill.loss_options.crd.{bank}", "protocols=[linear_probe]"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0
    state = torch.load(out / "stages" / "distill-crd" / "final.pt", weights_only=True)
    queue = bank == "bank=queue"
    assert ("criteria.crd.memory.rows" in state) == queue  # the ring's samples: a queue's state
    assert state["criteria.crd.memory.student_bank"].shape[0] == (32 if queue else 96)
    final = (out / "stages" / "distill-crd" / "final.pt").read_bytes()
    rows = json.loads((out / "report.json").read_text())["results"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0  # finished: nothing retrains
    assert json.loads((out / "report.json").read_text())["results"] == rows
    assert (out / "stages" / "distill-crd" / "final.pt").read_bytes() == final


def test_crd_fixes_a_per_batch_normaliser_and_keeps_the_recipes_other_options(tmp_path):
    from xmodal.tasks.distill import method_loss_options, resolve_method

    recipe = {"crd": {"nce_k": 32, "nce_t": 0.1, "normaliser": "once"}, "kd": {"T": 2.0}}
    merged = method_loss_options(resolve_method("crd", {}), recipe)
    assert merged == {"crd": {"nce_k": 32, "nce_t": 0.1, "normaliser": "ema", "z_momentum": 0.0}, "kd": {"T": 2.0}}
    assert method_loss_options(resolve_method("crd_paper", {}), recipe) == recipe
    assert recipe["crd"]["normaliser"] == "once"  # the recipe's own mapping is not modified
    # Both in one run. Every method's student starts from the same seed and sees the same
    # batches, so with Z set once both critics would end holding the first batch's Z; crd's
    # critic must end with another (its last batch's).
    out = tmp_path / "run"
    args = [*TINY, "distill.methods=[crd_paper,crd]", "protocols=[linear_probe]"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["crd_paper", "crd"]
    log_z = [torch.load(out / "stages" / f"distill-{m}" / "final.pt", weights_only=True)["criteria.crd.memory.log_z"]
             for m in ("crd_paper", "crd")]
    assert torch.isfinite(log_z[1]).all() and not torch.allclose(log_z[0], log_z[1])


def test_method_names_crd_is_the_recommended_variant_and_paper_the_reference(capsys):
    # crd / crd_kd / infonce: warm banks (and, for NCE, Z from each batch); *_paper: the loss's own
    # defaults (cold banks, Z once), which the parity tests hold to the reference.
    from losses import CRDLoss
    from xmodal.tasks.distill import resolve_method

    crd, paper = resolve_method("crd", {}), resolve_method("crd_paper", {})
    assert crd.warm_start and crd.options == {"crd": {"normaliser": "ema", "z_momentum": 0.0}}
    assert not paper.warm_start and paper.options == {} and paper.terms == crd.terms == {"crd": 0.8}
    assert CRDLoss(8, 8, 16, nce_k=4).normaliser == "once"  # what crd_paper leaves in place
    kd, kd_paper = resolve_method("crd_kd", {}), resolve_method("crd_kd_paper", {})
    assert kd.terms == kd_paper.terms == {"crd": 0.8, "kd": 1.0} and kd.warm_start and not kd_paper.warm_start
    assert resolve_method("infonce", {}).warm_start and not resolve_method("infonce_paper", {}).warm_start
    capsys.readouterr()
    # the former names keep their meaning, with a note naming the new one (once per process)
    old = resolve_method("crd_warm", {})
    assert old.warm_start and old.options == {} and "'crd_warm' is deprecated; use crd" in capsys.readouterr().err
    assert resolve_method("crd_batchz_warm", {}) == crd


def test_changed_loss_option_is_not_resumed_as_the_old_stage(tmp_path, capsys):
    # A finished CRD stage trained at one temperature must not be reused for a run that asks for
    # another: loss options are part of the stage's identity (once they were not, and the old
    # student came back silently).
    out = tmp_path / "run"
    args = [*TINY, "distill.methods=[crd]", "protocols=[linear_probe]"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0
    stage = out / "stages" / "distill-crd" / "final.pt"
    before = stage.read_bytes()
    # the critic's positive and negative cosines are logged beside the loss, not added to it
    epoch = json.loads((out / "stages" / "distill-crd" / "result.json").read_text())["history"][0]
    assert -1 <= epoch["crd_neg_cos"] <= 1 and -1 <= epoch["crd_pos_cos"] <= 1
    assert epoch["loss"] == pytest.approx(epoch["crd"])
    capsys.readouterr()
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args, "distill.loss_options.crd.nce_t=0.2"]) == 2
    assert "'distill-crd' of a run with another configuration (it differs in" in (err := _error(capsys))
    assert "nce_t" in err  # the key that changed is named
    assert stage.read_bytes() == before  # nothing already written is lost
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0  # the same options still resume


def test_first_stage_identity_holds_its_own_schedule(tmp_path, capsys):
    # FT trains its paraphraser first (distill.init_train); that schedule is part of the first
    # stage's identity, so a run asking for another one is refused instead of reusing it.
    out = tmp_path / "run"
    args = [*TINY, "distill.methods=[ft]", "protocols=[linear_probe]", "distill.init_train.epochs=1"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0
    assert (out / "stages" / "distill-ft-ft-init" / "final.pt").exists()
    capsys.readouterr()
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args, "distill.init_train.epochs=2"]) == 2
    assert "'distill-ft-ft-init' of a run with another configuration" in _error(capsys)
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0


@pytest.mark.slow
def test_another_teacher_file_at_the_same_path_is_not_resumed_as_the_old_one(tmp_path, capsys):
    # A distilled student is the teacher file's, not its path's: a file replaced at the same path
    # once brought the students of the old one back as if they had learnt from it.
    teacher = tmp_path / "teacher.pt"
    write_teacher = functools.partial(_write_teacher, teacher)

    write_teacher(0)
    out = tmp_path / "run"
    args = ["run", "lab-color-transfer", f"output_dir={out}", *TINY, "distill.methods=[crd]", "protocols=[linear_probe]",
            f"teacher.checkpoint={teacher}"]
    assert main(args) == 0
    recorded = json.loads((out / "report.json").read_text())["teacher"]["checkpoint_sha256"]
    assert recorded == hashlib.sha256(teacher.read_bytes()).hexdigest()
    stage = out / "stages" / "distill-crd" / "final.pt"
    before = stage.read_bytes()
    # the same file reached by another path is the same teacher: the finished stage is reused
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    moved.write_bytes(teacher.read_bytes())
    written = stage.stat().st_mtime_ns
    assert main([*args[:-1], f"teacher.checkpoint={moved}"]) == 0
    assert stage.stat().st_mtime_ns == written  # not retrained (that would write it anew, same bytes or not)
    write_teacher(1)
    capsys.readouterr()
    assert main(args) == 2
    # the last line (the teacher is scored first, with a progress bar, before the stage is refused)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'distill-crd' of a run with another configuration (it differs in teacher.checkpoint_sha256)" in last
    assert stage.read_bytes() == before  # nothing already written is lost


@pytest.mark.slow
def test_a_teacher_file_replaced_during_the_run_is_neither_loaded_nor_recorded(tmp_path, monkeypatch):
    # The teacher file is read once: the sha256 the students record and the weights the teacher
    # loads are those bytes. Before, the path was hashed, then read again seconds later to load,
    # so a file put there in between taught the students under the first file's sha256.
    from xmodal.engine import Engine

    teacher = tmp_path / "teacher.pt"
    write_teacher = functools.partial(_write_teacher, teacher)

    args = [*TINY, "distill.methods=[kd]", "protocols=[linear_probe]", f"teacher.checkpoint={teacher}"]
    write_teacher(0)
    first = teacher.read_bytes()
    assert main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'plain'}", *args]) == 0

    real_first_batch = Engine.first_batch

    def replace_the_file_then_batch(self, *a, **k):  # after the recipe has read its teacher, before it loads it
        write_teacher(1)
        return real_first_batch(self, *a, **k)

    monkeypatch.setattr(Engine, "first_batch", replace_the_file_then_batch)
    assert main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'swapped'}", *args]) == 0
    assert teacher.read_bytes() != first  # the swap did happen
    plain, swapped = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("plain", "swapped"))
    assert swapped["teacher"]["checkpoint_sha256"] == hashlib.sha256(first).hexdigest()
    student = ("stages", "distill-kd", "final.pt")
    a, b = (torch.load(tmp_path.joinpath(d, *student), weights_only=True) for d in ("plain", "swapped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # taught by the first file's weights
    assert swapped["results"] == plain["results"]


@pytest.mark.slow
def test_seeds_run_each_seed_and_report_mean_and_sd(tmp_path, capsys):
    import statistics

    out = tmp_path / "run"
    args = ["run", "lab-color-transfer", f"output_dir={out}", *TINY, "distill.methods=[random,crd]",
            "protocols=[linear_probe]", "seeds=[3,4]"]
    assert main(args) == 0
    combined = json.loads((out / "report.json").read_text())
    per_seed = {s: json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (3, 4)}
    assert [per_seed[s]["seed"] for s in (3, 4)] == [3, 4] and combined["seeds"] == [3, 4]
    for row in combined["results"]:
        values = [next(r["value"] for r in per_seed[s]["results"] if r["method"] == row["method"]) for s in (3, 4)]
        assert row["n"] == 2 and row["value"] == pytest.approx(statistics.fmean(values))
        assert row["sd"] == pytest.approx(statistics.stdev(values))
    assert {r["method"] for r in combined["results"]} == {"random", "crd"}
    # each seed ran its own teacher: the two folders' teacher weights differ
    teachers = [torch.load(out / f"seed-{s}" / "stages" / "teacher" / "final.pt", weights_only=True) for s in (3, 4)]
    assert not torch.equal(teachers[0]["stem.0.weight"], teachers[1]["stem.0.weight"])
    assert " ± " in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 0
    # again: every seed's stages are finished, so the same table comes back
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["results"] == combined["results"]
    # runs made as separate jobs combine into the same table
    assert main(["combine", str(tmp_path / "joined"), str(out / "seed-3"), str(out / "seed-4")]) == 0
    joined = json.loads((tmp_path / "joined" / "report.json").read_text())
    assert joined["results"] == combined["results"] and joined["seeds"] == [3, 4]
    capsys.readouterr()
    assert main(["combine", str(tmp_path / "j2"), str(out / "seed-3"), str(out / "seed-3")]) == 2
    assert "seeds [3, 3] repeat" in _error(capsys)
    assert main(["combine", str(tmp_path / "j3"), str(out / "seed-3"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere/report.json does not exist" in _error(capsys)
    other = tmp_path / "other"
    assert main(["run", "lab-color-transfer", f"output_dir={other}", *TINY, "distill.methods=[random]",
                 "protocols=[linear_probe]", "seed=5"]) == 0
    capsys.readouterr()
    assert main(["combine", str(tmp_path / "j4"), str(out / "seed-3"), str(other)]) == 2
    assert "ran another configuration" in _error(capsys)
    # a run recorded before a key existed (here: log_with, distill.n_teachers) at its default is the
    # same experiment; a key that changes the result is not
    older = tmp_path / "older"
    older.mkdir()
    report = json.loads((out / "seed-4" / "report.json").read_text())
    report["config"].pop("log_with")
    report["config"]["distill"].pop("n_teachers")
    (older / "report.json").write_text(json.dumps(report))
    assert main(["combine", str(tmp_path / "j5"), str(out / "seed-3"), str(older)]) == 0
    report["config"]["distill"]["train"]["epochs"] = 9
    (older / "report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["combine", str(tmp_path / "j6"), str(out / "seed-3"), str(older)]) == 2
    assert "ran another configuration" in _error(capsys)
    for bad in ("seeds=[]", "seeds=[1,1]"):
        assert main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'bad'}", bad]) == 2
        assert "distinct seeds" in _error(capsys)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_unlabeled_set_sizes_run_every_method_at_every_size(tmp_path, capsys):
    # The CRD paper's Figure 3 axis: data.distill.subset as a list distils each method on a subset
    # of each size (its memory bank has that many rows); random reads no unlabeled image and runs once.
    out = tmp_path / "run"
    args = [*TINY, "distill.methods=[random,crd]", "data.distill.subset=[96,48]", "finetune.epochs=1"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    keys = {(r["method"], r["protocol"], r.get("n_unlabeled")) for r in report["results"]}
    assert keys == {(m, p, n) for p in ("linear_probe", "finetune")
                    for m, n in (("random", None), ("crd", 48), ("crd", 96))}
    for size in (48, 96):
        final = torch.load(out / "stages" / f"distill-crd-n{size}" / "final.pt", weights_only=True)
        assert final["criteria.crd.memory.student_bank"].shape[0] == size
        assert (out / "stages" / f"finetune-crd-n{size}" / "final.pt").exists()
    assert not (out / "stages" / "distill-crd").exists() and (out / "report.png").stat().st_size > 0
    capsys.readouterr()
    for sizes, message in (("[48,5000]", "data.distill.subset lists 5000, but split 'unlabeled' holds 96 images"),
                           ("[48,48]", "expected distinct positive sizes"), ("[0]", "expected distinct positive sizes")):
        bad = tmp_path / "bad"
        assert main(["run", "lab-color-transfer", f"output_dir={bad}", *args, f"data.distill.subset={sizes}"]) == 2
        assert message in _error(capsys)
        assert not bad.exists()


def test_tasks_are_listed_with_the_protocols_that_judge_them(capsys):
    from xmodal.tasks import PROTOCOLS, tasks

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    registered = tasks()
    assert set(registered) == {"transfer"}
    assert set(registered["transfer"].protocols) == set(PROTOCOLS)  # one task judges by every protocol
    assert "segmentation" in registered["transfer"].protocols  # RGB -> depth is a transfer
    for task in registered.values():
        assert task.name in out and set(task.protocols) <= set(PROTOCOLS)
        assert f"protocols: {', '.join(task.protocols)}" in out
    # a task module imported on its own first must not hide the others
    import subprocess
    import sys

    code = ("import xmodal.tasks.linear_probe\nfrom xmodal.tasks import tasks\n"
            "assert set(tasks()) == {'transfer'}, tasks()")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_a_task_registered_twice_is_refused():
    from xmodal.tasks import register_task, tasks

    transfer = tasks()["transfer"]
    with pytest.raises(ValueError, match="already registered"):
        register_task("transfer", transfer.schema, transfer.protocols)(lambda cfg, engine: {})
    with pytest.raises(ValueError, match="unknown protocols"):
        register_task("mine", transfer.schema, ("accuracy",))


def test_trackers_get_the_epoch_scalars_or_are_refused_in_one_line(tmp_path, error_line):
    import importlib.util

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    quiet = tmp_path / "quiet"
    args = [*TINY, "distill.methods=[crd]", "protocols=[linear_probe]"]
    assert main(["run", "lab-color-transfer", f"output_dir={quiet}", *args, "log_with=[]"]) == 0
    assert not (quiet / "tb").exists()
    logged = tmp_path / "logged"
    assert main(["run", "lab-color-transfer", f"output_dir={logged}", *args]) == 0  # tensorboard by default
    events = EventAccumulator(str(next((logged / "tb").rglob("events.out.tfevents.*")).parent)).Reload()
    assert {"teacher/loss", "distill-crd/loss", "distill-crd/crd"} <= set(events.Tags()["scalars"])
    assert main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'x'}", *args, "log_with=[tensorbored]"]) == 2
    assert "unknown tracker 'tensorbored'" in error_line()
    if importlib.util.find_spec("wandb") is None:
        assert main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'y'}", *args, "log_with=[wandb]"]) == 2
        assert error_line() == "xmodal: error: log_with=wandb needs its package: pip install wandb"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
