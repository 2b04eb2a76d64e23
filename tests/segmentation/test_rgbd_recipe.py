"""The nyu-rgb2depth recipe end to end on the 18 real frames (tiny images, one epoch per stage)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from xmodal.cli import main

METHODS = ["random", "kd", "fitnet", "at", "crd"]
MODES = ["frozen"]  # finetune differs only in the freeze flag: tests/segmentation/test_seg_parts.py
LABELED = [1, 2, 9, 14, 15, 16, 17, 18]  # the mini set's labeled frames (all in the official test split)
TINY = ["data.options.size=[32,48]", "distill.train.epochs=1", "segmentation.train.epochs=1",
        "data.num_workers=0", f"segmentation.encoder_modes=[{','.join(MODES)}]"]


@pytest.fixture
def one_thread():
    """The test machines are shared: one thread spares OpenMP's waits on busy cores (4x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_tiny_run_on_the_real_frames_writes_rows_and_pictures(tmp_path, nyuv2_mini, capsys):
    out = tmp_path / "run"
    assert main(["run", "nyu-rgb2depth", f"data.root={nyuv2_mini}", f"output_dir={out}", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["encoder"], r["metric"]): r["value"] for r in report["results"]}
    assert set(rows) == {(m, e, k) for m in METHODS for e in MODES for k in ("pixel_acc", "miou")}
    assert all(r["protocol"] == "segmentation" for r in report["results"])
    assert all(0.0 <= v <= 100.0 for v in rows.values())

    split = report["segmentation_split"]
    assert split["split"] == "holdout" and len(split["train_frames"]) == 5 and len(split["test_frames"]) == 3
    assert sorted(split["train_frames"] + split["test_frames"]) == LABELED
    assert set(report["per_class_iou"]) == {f"{m} ({e})" for m in METHODS for e in MODES}
    assert len(report["per_class_iou"]["crd (frozen)"]) == 13
    assert "crd K = 17" in report["extra"]["distillation"]  # 18 frames: at most 17 negatives

    for method in METHODS:
        for mode in MODES:
            pictures = sorted(p.name for p in (out / "pictures" / f"{method}-{mode}").glob("*.png"))
            assert pictures == [f"{f:04d}.png" for f in split["test_frames"]]
    with Image.open(out / "pictures" / f"crd-frozen/{split['test_frames'][0]:04d}.png") as picture:
        assert picture.height > 32 and picture.width > 4 * 48  # four panels under their titles
    assert (out / "pictures" / "legend.png").stat().st_size > 0 and (out / "report.png").stat().st_size > 0
    assert "| crd (encoder=frozen) |" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_teacher_file_replaced_at_its_path_is_another_teacher(tmp_path, nyuv2_mini, capsys):
    # The depth student's stages record the teacher file's content: after the file at that path
    # is replaced, a run into the same folder is refused, not resumed as the old students.
    from xmodal.models import build_model, save_backbone

    teacher = tmp_path / "rgb.pt"
    torch.manual_seed(0)
    save_backbone(teacher, build_model("resnet8", 3, 10, width=4))
    out = tmp_path / "run"
    args = ["run", "nyu-rgb2depth", f"data.root={nyuv2_mini}", f"output_dir={out}", *TINY,
            "teacher.model={arch: resnet8, options: {width: 4}}", f"teacher.checkpoint={teacher}",
            "teacher.num_classes=10", "distill.methods=[crd]", "segmentation.encoder_modes=[frozen]"]
    assert main(args) == 0
    recorded = json.loads((out / "report.json").read_text())["teacher"]["checkpoint_sha256"]
    assert recorded == hashlib.sha256(teacher.read_bytes()).hexdigest()
    torch.manual_seed(1)
    save_backbone(teacher, build_model("resnet8", 3, 10, width=4))
    capsys.readouterr()
    assert main(args) == 2
    assert "of a run with another configuration" in capsys.readouterr().err.strip().splitlines()[-1]
