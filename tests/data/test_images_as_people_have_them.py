"""Image folders as people have them: every kind of file becomes 8-bit RGB of one size, checked
against PIL's own conversions; datasets no classifier can be judged on are refused in one line
before anything trains."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from xmodal.cli import main
from xmodal.data.folder import ImageFolderDataset

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # H x W


def _kinds(folder: Path) -> dict[str, np.ndarray]:
    """One file of each kind in ``folder/x/``, with the 8-bit RGB pixels PIL makes of it."""
    (folder / "x").mkdir(parents=True)
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to view
    files = {
        "a_grey.png": image.convert("L"),
        "b_grey_alpha.png": image.convert("LA"),
        "c_palette.png": image.convert("P"),
        "d_rgba.png": image.convert("RGBA"),
        "e_cmyk.jpg": image.convert("CMYK"),
        "f_exif.jpg": image,
        "g_16bit.png": Image.fromarray(RGB[..., 0].astype(np.uint16) * 257),
    }
    expected = {}
    for name, picture in files.items():
        path = folder / "x" / name
        if name == "f_exif.jpg":
            picture.save(path, exif=exif, quality=95)
        else:
            picture.save(path)
        with Image.open(path) as reread:
            if name == "g_16bit.png":  # PIL's own 16-bit -> RGB conversion clips; the scale is 8 bits
                grey = np.round(np.asarray(reread, dtype=np.float64) / 257.0).astype(np.uint8)
                expected[name] = np.repeat(grey[..., None], 3, axis=2)
            else:
                expected[name] = np.asarray(ImageOps.exif_transpose(reread).convert("RGB"))
    return expected


def test_every_kind_of_file_is_read_as_8_bit_rgb(tmp_path):
    expected = _kinds(tmp_path)
    dataset = ImageFolderDataset(tmp_path, size=None)
    for i, name in enumerate(sorted(expected)):
        image = dataset.read_image(i).permute(1, 2, 0).numpy()
        want = expected[name]
        if want.shape == image.shape:
            np.testing.assert_allclose(image.astype(int), want.astype(int), atol=1, err_msg=name)
    # the rotated JPEG is 16 x 12 once turned; every image comes out at the first one's 12 x 16
    assert expected["f_exif.jpg"].shape == (16, 12, 3)
    shapes = {tuple(dataset[i]["image"].shape) for i in range(len(dataset))}
    assert shapes == {(3, 12, 16)}


def test_the_rotated_photo_is_turned_before_it_is_resized(tmp_path, capsys):
    expected = _kinds(tmp_path)
    dataset = ImageFolderDataset(tmp_path, size=None)
    exif_index = sorted(expected).index("f_exif.jpg")
    turned = dataset.read_image(exif_index)
    assert "resized to (12, 16)" in capsys.readouterr().err
    # against the PIL-turned picture resized the same way, not against the unturned one
    reference = TF.resize(torch.from_numpy(expected["f_exif.jpg"]).permute(2, 0, 1), [12, 16], antialias=True)
    unturned = TF.resize(torch.from_numpy(RGB).permute(2, 0, 1), [12, 16], antialias=True)
    near = (turned.int() - reference.int()).abs().float().mean()
    far = (turned.int() - unturned.int()).abs().float().mean()
    assert near < 6 < far


def _folder(root: Path, classes_train: dict[str, int], classes_test: dict[str, int]) -> Path:
    for split, classes in (("train", classes_train), ("test", classes_test)):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{k}.png")
    return root


SPLITS = ["data.teacher.split=train", "data.distill.split=train", "data.probe_train.split=train",
          "data.probe_test.split=test", "data.teacher.subset=null", "data.distill.subset=null",
          "teacher.train.epochs=1", "distill.methods=[random]", "protocols=[linear_probe]", "data.num_workers=0"]


@pytest.mark.parametrize("train,test,message", [
    ({"cat": 8}, {"cat": 4}, "data.probe_train holds 1 class ['cat']: a classifier needs at least two"),
    ({"cat": 8, "dog": 8}, {"cat": 4, "dog": 0}, "data.probe_test has no images of class ['dog']"),
    ({"cat": 8, "dog": 8}, {"cat": 4, "eel": 4}, "data.probe_train and data.probe_test hold different classes"),
    ({"cat": 8, "dog": 8, "eel": 8}, {"cat": 4, "dog": 4, "eel": 4},
     "data.probe_train has no images of class"),
])
def test_datasets_no_classifier_can_be_judged_on_are_refused(tmp_path, error_line, train, test, message):
    root = _folder(tmp_path / "data", train, test)
    out = tmp_path / "run"
    extra = ["data.probe_train.subset=2"] if len(train) == 3 else []  # fewer images than classes
    code = main(["run", "lab-color-transfer", f"output_dir={out}", "data=imagefolder", f"data.root={root}",
                 *SPLITS, *extra])
    assert code == 2 and message in error_line()
    assert not out.exists()
