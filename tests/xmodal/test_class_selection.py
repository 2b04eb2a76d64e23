"""``data.<split>.classes``: a split cut to some classes and relabelled in the order given (a
teacher trained on another label set than the probe's), and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xmodal.cli import main
from xmodal.data import build_dataset
from xmodal.data.synthetic import CLASSES
from xmodal.errors import ConfigError
from xmodal.modalities import build_modality
from xmodal.models.checkpoint import load_weights_into
from xmodal.schema import ImageDataConfig, ModelConfig, SplitConfig
from xmodal.data.subset import open_split
from xmodal.tasks.supervised import build_backbone

# A run small enough for a test: both networks 4 wide, one epoch each, two probe epochs.
TINY = ["data.options={num_samples: 96}", "teacher.train.epochs=1", "teacher.model.options={width: 4}",
        "student.options={width: 4}", "distill.train.epochs=1", "distill.train.batch_size=32",
        "linear_probe.epochs=2", "data.num_workers=0"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


DATA = ImageDataConfig(name="synthetic", augment="none", options={"num_samples": 60})


def _split(part: SplitConfig, labeled: bool = True, data: ImageDataConfig = DATA):
    return open_split(data, part, seed=3, augment=False, labeled=labeled, role="teacher")


def test_selection_keeps_those_classes_in_order_and_relabels_by_position():
    base = build_dataset("synthetic", None, "train", num_samples=60, seed=3)
    names = list(base.classes)
    wanted = [names[7], "2", names[4]]  # a name, an index, a name; not in class order
    chosen = _split(SplitConfig("train", classes=wanted))
    # Written out from the full split: its images of classes 7, 2, 4, in their original order.
    expected = [i for i in range(len(base)) if int(base[i]["label"]) in (7, 2, 4)]
    assert len(chosen) == len(expected) > 0
    assert chosen.classes == [names[7], names[2], names[4]]
    for row, i in enumerate(expected):
        sample, original = chosen[row], base[i]
        assert torch.equal(sample["image"], original["image"])
        assert int(sample["label"]) == [7, 2, 4].index(int(original["label"]))
        assert int(sample["index"]) == row  # memory-bank rows renumbered
    assert chosen.labels.tolist() == [int(chosen[r]["label"]) for r in range(len(chosen))]
    assert chosen.class_labels.tolist() == chosen.labels.tolist()


def test_unlabeled_reading_keeps_minus_one_and_maps_the_known_classes():
    chosen = _split(SplitConfig("train", classes=["0", "1"]), labeled=False)
    assert bool((chosen.labels == -1).all()) and int(chosen[0]["label"]) == -1
    assert set(chosen.class_labels.tolist()) == {0, 1}


def test_subset_is_balanced_over_the_selected_classes_only():
    chosen = _split(SplitConfig("train", subset=8, classes=["5", "6"]))
    assert len(chosen) == 8 and chosen.classes == [CLASSES[5], CLASSES[6]]
    assert torch.bincount(chosen.labels, minlength=2).tolist() == [4, 4]


@pytest.mark.parametrize("classes, message", [
    (["hexagon"], "data.teacher.classes: unknown class 'hexagon'; the split's classes are"),
    (["10"], "unknown class '10'"),
    (["-1"], "unknown class '-1'"),
    (["1", CLASSES[1]], f"class {CLASSES[1]!r} listed twice"),
    ([], "data.teacher.classes: empty"),
])
def test_bad_class_lists_name_the_key(classes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _split(SplitConfig("train", classes=classes))


def test_a_split_without_classes_cannot_be_selected_from(stl10_root: Path):
    data = ImageDataConfig(name="stl10", root=str(stl10_root), augment="none")
    with pytest.raises(ConfigError, match="data.teacher.classes: this split's images carry no classes"):
        _split(SplitConfig("unlabeled", classes=["0"]), data=data)


def test_probe_splits_in_different_label_spaces_are_refused(tmp_path, capsys, nyuv2_mini):
    args = ["run", "lab-color-transfer", f"output_dir={tmp_path / 'x'}", "data.probe_train.classes=[0,1]"]
    assert main(args) == 2
    assert "data.probe_train.classes=['0', '1'] and data.probe_test.classes=None differ" in _error(capsys)
    assert main(["run", "ensemble-cifar", f"output_dir={tmp_path / 'y'}", "data.probe_test.classes=[3]"]) == 2
    assert "data.distill.classes=None and data.probe_test.classes=['3'] differ" in _error(capsys)
    assert main(["run", "nyu-rgb2depth", f"output_dir={tmp_path / 'z'}", f"data.root={nyuv2_mini}",
                 "data.distill.classes=[3]"]) == 2
    assert "data.distill.classes: this split's images carry no classes to select from" in _error(capsys)


@pytest.mark.slow
def test_teacher_of_another_label_set_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    # Eight teacher epochs: a teacher at chance would score 50 % under either labelling, and
    # the written-out top-1 below could not tell a swapped relabelling from the right one.
    args = [*TINY, "teacher.train.batch_size=8", "teacher.train.epochs=8", "distill.methods=[kd]",
            "protocols=[linear_probe]", f"data.teacher.classes=[{CLASSES[3]},{CLASSES[1]}]"]
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["classes"] == [CLASSES[3], CLASSES[1]]
    # Its top-1, written out: the test images of classes 3 and 1 (labelled 0 and 1), L view.
    teacher = build_backbone(ModelConfig("resnet8", {"width": 4}), 1, 2, 0)
    load_weights_into(teacher, out / "teacher.safetensors", role="teacher")
    test = build_dataset("synthetic", None, "test", num_samples=96, seed=0)
    rows = [test[i] for i in range(len(test)) if int(test[i]["label"]) in (3, 1)]
    images = torch.stack([r["image"] for r in rows])
    truth = torch.tensor([0 if int(r["label"]) == 3 else 1 for r in rows])
    with torch.no_grad():
        (light,) = build_modality("lab").views({"image": images}, ["L"]).values()
        predicted = teacher.eval()(light).logits.argmax(1)
    assert report["teacher"]["top1"] == pytest.approx(100.0 * float((predicted == truth).float().mean()), abs=1e-4)
    # The teacher classifies its two classes; KD's student copies those two logits; the probe
    # still reads all ten classes.
    final = torch.load(out / "stages" / "teacher" / "final.pt", weights_only=True)
    heads = [v for k, v in final.items() if k.endswith("fc.weight") or k.endswith("classifier.weight")]
    assert heads and heads[0].shape[0] == 2
    assert [(r["method"], r["protocol"]) for r in report["results"]] == [("kd", "linear_probe")]
    # The exported teacher loads back with the same classes, and scores the same on them; with
    # another number of classes it is refused before anything trains.
    again = tmp_path / "again"
    reuse = [*args, f"teacher.checkpoint={out / 'teacher.safetensors'}", "distill.methods=[random]"]
    assert main(["run", "lab-color-transfer", f"output_dir={again}", *reuse]) == 0
    assert json.loads((again / "report.json").read_text())["teacher"]["top1"] == report["teacher"]["top1"]
    # Without data.teacher.classes it teaches, but its two classes are not the test split's ten:
    # no top-1 is made up for it.
    other = tmp_path / "other"
    assert main(["run", "lab-color-transfer", f"output_dir={other}", *TINY, "distill.methods=[kd]",
                 "protocols=[linear_probe]", f"teacher.checkpoint={out / 'teacher.safetensors'}"]) == 0
    unscored = json.loads((other / "report.json").read_text())
    assert unscored["teacher"]["top1"] is None and unscored["teacher"]["classes"] is None
    assert [r["method"] for r in unscored["results"]] == ["kd"]
    capsys.readouterr()
    assert main(["run", "lab-color-transfer", f"output_dir={tmp_path / 'bad'}", *reuse,
                 "data.teacher.classes=[0,1,2]"]) == 2
    assert "classifies 2 classes, but data.teacher.classes lists 3" in _error(capsys)
