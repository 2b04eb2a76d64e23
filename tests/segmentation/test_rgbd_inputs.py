"""What RGB -> depth adds on top of the loaders (a transfer judged by segmentation): the teacher's
input normalisation, K capped to the frames, and one-line errors for recipes the data cannot
serve, before anything is written."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from xmodal.cli import main
from xmodal.config import resolve
from xmodal.errors import ConfigError
from xmodal.modalities import build_modality
from xmodal.schema import DistillSection
from xmodal.tasks.distill import recipe_loss_options
from xmodal.tasks.segmentation import segmentation_data
from xmodal.tasks.transfer import TransferConfig

TEST_FRAMES = [1, 2, 9, 14, 15, 16, 17, 18]


def test_rgb_view_is_normalised_as_the_lite0_weights_expect():
    image = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8)
    batch = {"image": image, "depth": torch.ones(2, 1, 5, 6)}
    lite0 = build_modality("depth", rgb_norm="lite0").views(batch, ["rgb"])["rgb"]
    # TF-Lite's preprocessing of the EfficientNet-Lite checkpoints: (pixel - 127) / 128.
    torch.testing.assert_close(lite0, (image.float() - 127.0) / 128.0)
    imagenet = build_modality("depth").views(batch, ["rgb"])["rgb"]
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    torch.testing.assert_close(imagenet, (image.float() / 255.0 - mean) / std)
    with pytest.raises(ConfigError, match="rgb_norm='tf'"):
        build_modality("depth", rgb_norm="tf")


def test_memory_bank_negatives_fit_the_data():
    capped = DistillSection(loss_options={"crd": {"nce_k": 16384, "nce_t": 0.1}}, cap_negatives=True)
    options = recipe_loss_options(capped, n_data=18)
    assert options["crd"] == {"nce_k": 17, "nce_t": 0.1} and options["infonce"] == {"nce_k": 17}
    assert recipe_loss_options(DistillSection(loss_options={"crd": {"nce_k": 5}}, cap_negatives=True), 18)["crd"]["nce_k"] == 5
    # without cap_negatives the recipe's K stands (and a K the data cannot supply is refused)
    assert recipe_loss_options(DistillSection(loss_options={"crd": {"nce_k": 16384}}), 18) == {"crd": {"nce_k": 16384}}


def _run_error(capsys, out: Path, *overrides: str) -> str:
    assert main(["run", "nyu-rgb2depth", f"output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists(), err
    return err


@pytest.mark.parametrize("overrides, message", [
    ((), "dataset 'nyu' needs a data root"),
    (("data.root=x", "modality.options.rgb_norm=imagenet"),
     "rgb_norm='imagenet', but the pretrained weights of teacher 'efficientnet_lite0' expect 'lite0'"),
    (("data.root=x", "teacher.model.options={}"), "teacher.train.epochs=0 with no teacher.checkpoint leaves the teacher untrained"),
    (("data.root=x", "distill.methods=[crd,kdd]"), "unknown distillation method 'kdd'"),
    (("data.root=x", "segmentation.encoder_modes=[frozen,tuned]"), "segmentation.encoder_modes"),
])
def test_recipe_errors_are_one_line(tmp_path, capsys, overrides, message):
    assert message in _run_error(capsys, tmp_path / "run", *overrides)


def test_holdout_that_leaves_no_test_frames(tmp_path, capsys, nyuv2_mini):
    err = _run_error(capsys, tmp_path / "run", f"data.root={nyuv2_mini}", "segmentation.holdout_train=8")
    assert "segmentation.holdout_train=8 leaves no test frames: there are 8 labeled frames to split" in err


def test_official_split_needs_labeled_train_frames(tmp_path, capsys, nyuv2_mini):
    err = _run_error(capsys, tmp_path / "run", f"data.root={nyuv2_mini}", "segmentation.split=official")
    assert "no labeled frames left" in err and "needs segmentation.split=holdout" in err


def test_batch_larger_than_the_decoder_training_frames(tmp_path, capsys, nyuv2_mini):
    err = _run_error(capsys, tmp_path / "run", f"data.root={nyuv2_mini}", "segmentation.train.batch_size=6")
    assert "segmentation.train.batch_size=6 exceeds the 5 frames it trains on" in err


def test_auto_split_is_the_official_one_when_train_frames_carry_labels(tmp_path, nyuv2_mini):
    root = tmp_path / "nyu"
    shutil.copytree(nyuv2_mini, root)
    for frame in (3, 4):  # official train frames, given labels (those of frame 1: only the split matters)
        shutil.copy(root / "label13" / "0001.png", root / "label13" / f"{frame:04d}.png")
    cfg = resolve("nyu-rgb2depth", [f"data.root={root}"], {"transfer": TransferConfig})
    train, test, info = segmentation_data(cfg.data, cfg.segmentation, cfg.seed)
    assert info == {"split": "official", "train_frames": [3, 4], "test_frames": TEST_FRAMES}
    assert len(train) == 2 and len(test) == 8


def test_auto_split_holds_out_labeled_test_frames_on_the_mini_set(nyuv2_mini):
    cfg = resolve("nyu-rgb2depth", [f"data.root={nyuv2_mini}"], {"transfer": TransferConfig})
    _, _, info = segmentation_data(cfg.data, cfg.segmentation, cfg.seed)
    assert info["split"] == "holdout" and "no labeled train frames" in info["why"]
    assert len(info["train_frames"]) == 5 and sorted(info["train_frames"] + info["test_frames"]) == TEST_FRAMES


def test_a_recipe_of_the_former_rgbd_task_is_told_what_it_now_is(tmp_path, error_line):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("task: rgbd\ndata: {name: nyu}\n")
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 2
    assert "now task 'transfer' with protocols: [segmentation]" in error_line()


def test_a_checkpoint_teacher_of_another_class_count_is_one_line(tmp_path, capsys):
    from xmodal.models import build_model, save_backbone

    teacher = tmp_path / "rgb.safetensors"
    save_backbone(teacher, build_model("resnet8", 3, 10, width=4))
    err = _run_error(capsys, tmp_path / "run", "data.root=x", f"teacher.checkpoint={teacher}",
                     "teacher.model={arch: resnet8, options: {width: 4}}")  # the recipe's num_classes: 1000
    assert "teacher.num_classes=1000, but teacher.checkpoint classifies 10 classes; remove teacher.num_classes" in err


@pytest.mark.parametrize("augment, on", [("crop", True), (True, True), ("none", False), (None, False), (False, False)])
def test_the_recipe_s_augment_turns_the_joint_augmentation_on_or_off(nyuv2_mini, augment, on):
    from xmodal.data import build_dataset

    assert build_dataset("nyu", nyuv2_mini, "all", augment=augment, labeled=False).augment is on
