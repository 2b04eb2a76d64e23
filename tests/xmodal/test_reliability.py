"""Bad input, tried for real; docs/errors.md is the table this test makes.

Every case runs the command line against an output folder that already holds a finished run
(of the Lab recipe), and checks three things: the exit status is 2 (a user error, not a crash),
the message is one line that names the problem, and every file of the earlier run is
byte-for-byte unchanged (a case that damages the folder first is checked against the damaged
folder). Lab-recipe cases start from the tiny settings below; NYU-Depth-V2 and ensemble cases run
their own recipe, on files written in the official layouts.

The test never writes into the repository: it makes the table in a temporary folder and fails
when docs/errors.md says otherwise. ``XMODAL_WRITE_DOCS=1 python -m pytest
tests/xmodal/test_reliability.py`` rewrites docs/errors.md after a deliberate change.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.cli import main
from xmodal.models import build_model, save_backbone

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "errors.md"
TINY = [
    "data.options={num_samples: 64}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
    "distill.methods=[random,crd]", "distill.train.epochs=1", "distill.train.batch_size=32",
    "distill.loss_options.crd.nce_k=16", "linear_probe.epochs=1", "protocols=[linear_probe]",
    "student.options={width: 4}", "teacher.model.options={width: 4}", "data.num_workers=0",
]


LAB = "lab-color-transfer"
SMALL_BATCHES = ["distill.train.batch_size=2", "segmentation.train.batch_size=2"]
NYU_TINY = ["data.options.size=[32,48]", "distill.train.epochs=1", "segmentation.train.epochs=1", "data.num_workers=0"]
ENSEMBLE_TINY = [
    "data.teacher.subset=40", "data.distill.subset=40", "data.probe_test.subset=20", "data.num_workers=0",
    "teacher.model.options={width: 4}", "teacher.train.epochs=1", "teacher.train.batch_size=20",
    "student.options={width: 4}", "distill.train.epochs=1", "distill.train.batch_size=20", "distill.loss_options.crd.nce_k=8",
]


FOLDER_SPLITS = ["data.teacher.split=train", "data.distill.split=train", "data.probe_train.split=train",
                 "data.probe_test.split=test"]


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # data folder -> command-line arguments after the recipe
    expect: str  # a fragment the message must contain
    base: Callable[[Path], list[str]] = lambda d: []  # settings of the earlier, finished run too
    recipe: Union[str, Callable[[Path], str]] = LAB  # another recipe (or a file of the data folder) runs with
    # only its own arguments, into the Lab run's folder
    damage: Optional[Callable[[Path], None]] = None  # what happens to the finished run's folder first


class _Code:
    """Unpickling this object calls ``exec``: a crafted file that would run code if unpickled."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('a planted pickle ran')",))


def _plant(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _Code()}, path)
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _image_folder(root: Path, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(24):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    if corrupt:
        (root / "train" / "dog" / "5.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


def _checkpoint(path: Path, arch: str, width: int, in_channels: int = 1, num_classes: int = 10,
                seed: Optional[int] = None) -> Path:
    if seed is not None:
        torch.manual_seed(seed)
    save_backbone(path, build_model(arch, in_channels=in_channels, num_classes=num_classes, width=width))
    return path


def _nyu_files(root: Path, formats) -> None:
    """Broken NYU-Depth-V2 inputs: labeled .mat files (MATLAB layout) and converted frame folders."""
    images, depths, labels = formats.nyu_frames()
    good = root / "nyu-good"
    formats.write_splits(good, [1, 3], [2])
    formats.write_mappings(good)
    formats.write_nyu_mat(good / "nyu_depth_v2_labeled.mat", images, depths, labels)
    nodepth = root / "nyu-nodepth"
    shutil.copytree(good, nodepth)
    formats.write_nyu_mat(nodepth / "nyu_depth_v2_labeled.mat", images, depths, labels, skip=("depths",))
    truncated = root / "nyu-truncated"
    shutil.copytree(good, truncated)
    whole = (good / "nyu_depth_v2_labeled.mat").read_bytes()
    (truncated / "nyu_depth_v2_labeled.mat").write_bytes(whole[: len(whole) // 2])
    badmap = root / "nyu-badmap"
    shutil.copytree(good, badmap)
    formats.write_mappings(badmap, length40=100)
    for name, depth_hw, label in (("nyu-sizes", (30, 40), 3), ("nyu-labels", (32, 40), 14)):
        for kind in ("rgb", "depth", "label13"):
            (root / name / kind).mkdir(parents=True)
        formats.write_splits(root / name / "meta", [1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
        for frame in range(1, 11):
            Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(root / name / "rgb" / f"{frame:04d}.png")
            Image.fromarray(np.full(depth_hw, 2500, np.uint16)).save(root / name / "depth" / f"{frame:04d}.png")
            Image.fromarray(np.full((32, 40), label, np.uint8)).save(root / name / "label13" / f"{frame:04d}.png")


def _nyu(folder: str, *more: str) -> Callable[[Path], list[str]]:
    return lambda d: [f"data.root={d / folder}", *NYU_TINY, *more]


def _ensemble(*more: str) -> Callable[[Path], list[str]]:
    return lambda d: ["data=imagefolder", f"data.root={d / 'corrupt'}", "data.teacher.split=test",
                      "data.distill.split=test", *ENSEMBLE_TINY, *more]


CASES = [
    Case("data root that does not exist", lambda d: ["data=imagefolder", f"data.root={d / 'missing'}"],
         "does not exist"),
    Case("empty image folder", lambda d: ["data=imagefolder", f"data.root={d / 'empty'}", "data.teacher.split=train",
                                          "data.distill.split=train"], "no images found"),
    Case("image folder without the recipe's split", lambda d: ["data=imagefolder", f"data.root={d / 'empty'}"],
         "empty/unlabeled for split 'unlabeled'"),
    # The earlier run trained its teacher on the clean split; this one reaches the corrupt file
    # during distillation, after that finished stage was reloaded.
    Case("corrupt JPEG met during training", lambda d: ["distill.methods=[random,crd]", "distill.train.batch_size=48"],
         "5.jpg",
         base=lambda d: ["data=imagefolder", f"data.root={d / 'corrupt'}", "data.options={}", "data.teacher.split=test",
                         "data.probe_train.split=test", "data.probe_test.split=test", "data.distill.split=train",
                         "distill.methods=[random]"]),
    Case("misspelt recipe key", lambda d: ["distill.train.epoch=3"], "did you mean 'distill.train.epochs'"),
    Case("value of the wrong type", lambda d: ["distill.train.epochs=many"], "must be an integer"),
    Case("unknown distillation method", lambda d: ["distill.methods=[crd,kdd]"], "unknown distillation method 'kdd'"),
    Case("K larger than the negatives available", lambda d: ["distill.loss_options.crd.nce_k=5000"],
         "nce_k=5000 negatives requested but only 63 rows"),
    Case("segmentation protocol on images without per-pixel labels", lambda d: ["protocols=[segmentation]"],
         "segmentation scores per-pixel labels, and dataset 'synthetic' has none"),
    Case("a queue with class-aware negatives", lambda d: ["distill.loss_options.crd.bank=queue",
                                                          "distill.loss_options.crd.negatives=class"],
         "bank='queue' scores every queue entry of other samples"),
    Case("teacher checkpoint of another architecture",
         lambda d: [f"teacher.checkpoint={_checkpoint(d / 'wrong.pt', 'resnet20', 4)}"], "resnet20"),
    Case("teacher checkpoint whose class count differs from data.teacher.classes",
         lambda d: [f"teacher.checkpoint={_checkpoint(d / 'ten.pt', 'resnet8', 4)}", "data.teacher.classes=[0,1]"],
         "classifies 10 classes, but data.teacher.classes lists 2"),
    Case("class list naming a class the data lacks", lambda d: ["data.teacher.classes=[disc,hexagon]"],
         "data.teacher.classes: unknown class 'hexagon'"),
    Case("teacher checkpoint that is not a checkpoint",
         lambda d: [f"teacher.checkpoint={d / 'garbage.pt'}"], "garbage.pt"),
    Case("split folder that does not exist",
         lambda d: ["data=imagefolder", f"data.root={d / 'corrupt'}", "data.teacher.split=train"], "no folder"),
    Case("dataset option the recipe sets itself", lambda d: ["data.options={num_samples: 64, labeled: false}"],
         "data.options.labeled"),
    Case("unknown dataset name", lambda d: ["data=cifar11", "data.root=/tmp"], "unknown dataset 'cifar11'; did you mean 'cifar10'"),
    Case("output folder holding a run of another configuration", lambda d: ["teacher.train.epochs=2"],
         "another configuration"),
    Case("unknown bf16 convolution kind", lambda d: ["mixed_precision=bf16", "cpu_bf16_convs=fast"],
         "cpu_bf16_convs='fast': expected one of auto, emulated, native"),
    # The folder holds the fp32 run's stages; a bf16 run must not be handed its students.
    Case("output folder of an fp32 run, run again in bf16", lambda d: ["mixed_precision=bf16"],
         "it differs in precision"),
    # The earlier run learnt from one file; this one finds another file at the same path.
    Case("teacher checkpoint replaced by another file at the same path",
         lambda d: [f"teacher.checkpoint={_checkpoint(d / 'swapped.pt', 'resnet8', 4, seed=1)}"],
         "another configuration",
         base=lambda d: [f"teacher.checkpoint={_checkpoint(d / 'swapped.pt', 'resnet8', 4, seed=0)}"]),
    Case("a non-finite loss (finetune learning rate 1e30)",
         lambda d: ["protocols=[linear_probe,finetune]", "finetune.optim.lr=1e30", "finetune.batch_size=32"],
         "not finite"),
    # Run folders are data, not code; damaged ones are named, never half-read.
    Case("teacher checkpoint that holds code (a crafted pickle)",
         lambda d: [f"teacher.checkpoint={_plant(d / 'planted.pt')}"], "planted.pt"),
    Case("finished stage's final.pt replaced by a crafted pickle", lambda d: [],
         "never unpickles code", damage=lambda out: _plant(out / "stages" / "distill-crd" / "final.pt")),
    Case("finished stage's final.pt truncated", lambda d: [], "final.pt cannot be read",
         damage=lambda out: _truncate(out / "stages" / "teacher" / "final.pt")),
    Case("finished stage's final.pt empty", lambda d: [], "final.pt cannot be read",
         damage=lambda out: (out / "stages" / "teacher" / "final.pt").write_bytes(b"")),
    Case("finished stage's result.json truncated", lambda d: [], "result.json is not a readable result file",
         damage=lambda out: _truncate(out / "stages" / "distill-crd" / "result.json")),
    Case("finished stage's result.json of another program", lambda d: [], "is not an xmodal stage result",
         damage=lambda out: (out / "stages" / "teacher" / "result.json").write_text("[1, 2, 3]")),
    Case("resume checkpoint that holds code (a crafted pickle)", lambda d: ["distill.methods=[random,crd,kd]"],
         "checkpoint.pt holds objects other than tensors",
         damage=lambda out: _plant(out / "stages" / "distill-kd" / "checkpoint.pt")),
    # Recipe values
    Case("repeated seeds", lambda d: ["seeds=[1,1]"], "distinct seeds"),
    Case("unlabeled set sizes beyond the split", lambda d: ["data.distill.subset=[32,5000]"],
         "data.distill.subset lists 5000, but split 'unlabeled' holds 64 images"),
    Case("teacher used as built without pretrained weights", lambda d: ["teacher.train.epochs=0"],
         "leaves the teacher untrained"),
    Case("unknown teacher architecture", lambda d: ["teacher.model.arch=efficientnet_lite9"],
         "unknown arch 'efficientnet_lite9'"),
    Case("ImageNet teacher whose head is not 1000-way", lambda d: [
        "teacher.train.epochs=0", "teacher.num_classes=10", "modality.teacher_view=L_grey",
        "teacher.model={arch: efficientnet_lite0, options: {pretrained: true, input_size: 32}}"],
         "pretrained classifier has another number of classes"),
    Case("batch larger than the unlabeled set", lambda d: ["distill.train.batch_size=1000"],
         "distill.train.batch_size=1000 exceeds the 64 unlabeled images"),
    # Malformed recipes and values
    Case("recipe that is a folder", lambda d: [], "is a folder", recipe=lambda d: str(d / "empty")),
    Case("recipe file of binary bytes", lambda d: [], "is not a text file", recipe=lambda d: str(d / "binary.yaml")),
    Case("recipe whose quick block is not a mapping", lambda d: ["quick=true"], "must be a mapping of keys to values",
         recipe=lambda d: str(d / "quicklist.yaml")),
    Case("recipe that is not YAML", lambda d: [], "is not valid YAML", recipe=lambda d: str(d / "broken.yaml")),
    Case("output_dir that is a file", lambda d: [f"output_dir={d / 'garbage.pt'}"], "is a file; choose a folder"),
    Case("override without '='", lambda d: ["distill.train.epochs"], "is not of the form key=value"),
    Case("NaN learning rate", lambda d: ["distill.train.optim.lr=.nan"], "must be a finite number, got nan"),
    Case("infinite probe learning rate", lambda d: ["linear_probe.lr=.inf"], "must be a finite number, got inf"),
    Case("NaN loss weight", lambda d: ["distill.weights.crd=.nan"], "distill.weights.crd must be a finite number"),
    Case("loss weight that is not a number", lambda d: ["distill.weights={crd: much}"], "must be a number"),
    Case("zero learning rate", lambda d: ["distill.train.optim.lr=0"], "expected a positive learning rate"),
    Case("negative epochs", lambda d: ["distill.train.epochs=-3"], "expected epochs >= 0"),
    Case("negative seed", lambda d: ["seed=-1"], "expected a seed in 0 .. 2**32 - 1"),
    Case("unknown optimizer", lambda d: ["distill.train.optim.name=lamb"], "optim.name='lamb'"),
    Case("unknown learning-rate schedule", lambda d: ["distill.train.optim.schedule=linear"], "optim.schedule='linear'"),
    Case("unknown precision", lambda d: ["mixed_precision=fp8"], "mixed_precision='fp8'"),
    Case("unknown modality", lambda d: ["modality.name=hsv"], "unknown modality 'hsv'"),
    Case("view the modality does not have", lambda d: ["modality.teacher_view=depth"], "teacher_view='depth'"),
    Case("unknown evaluation protocol", lambda d: ["protocols=[probe]"], "protocols: unknown ['probe']"),
    Case("probe and test splits of different classes", lambda d: ["data.probe_train.classes=[disc,square]"],
         "data.probe_train.classes=['disc', 'square'] and data.probe_test.classes=None differ"),
    Case("image folder of one class", lambda d: ["data=imagefolder", f"data.root={d / 'oneclass'}", *FOLDER_SPLITS],
         "holds 1 class ['cat']: a classifier needs at least two"),
    Case("image folder whose test split has other classes",
         lambda d: ["data=imagefolder", f"data.root={d / 'otherclasses'}", *FOLDER_SPLITS], "hold different classes"),
    # NYU-Depth-V2 (nyu-rgb2depth recipe)
    Case("NYU: labeled .mat without `depths`", _nyu("nyu-nodepth/nyu_depth_v2_labeled.mat"), "no dataset 'depths'",
         recipe="nyu-rgb2depth"),
    Case("NYU: truncated HDF5 file", _nyu("nyu-truncated/nyu_depth_v2_labeled.mat"), "truncated or corrupt",
         recipe="nyu-rgb2depth"),
    Case("NYU: 40-class mapping of the wrong length", _nyu("nyu-badmap/nyu_depth_v2_labeled.mat"), "classMapping40",
         recipe="nyu-rgb2depth"),
    Case("NYU: RGB and depth of different sizes", _nyu("nyu-sizes", *SMALL_BATCHES), "must be pixel-aligned",
         recipe="nyu-rgb2depth"),
    Case("NYU: label outside the 13 classes", _nyu("nyu-labels", *SMALL_BATCHES), "outside the class set",
         recipe="nyu-rgb2depth"),
    Case("NYU: data root that does not exist", _nyu("nyu-missing"), "does not exist", recipe="nyu-rgb2depth"),
    # Ensembles (ensemble-cifar recipe, on the 2-class JPEG folder)
    Case("ensemble: no teachers", _ensemble("teachers=0"), "teachers=0: give a number of copies of teacher >= 1",
         recipe="ensemble-cifar"),
    Case("ensemble: teacher whose class count differs from the data's",
         lambda d: _ensemble("teacher=null", "distill.n_teachers=[1]", f"teachers=[{{checkpoint: "
                             f"{_checkpoint(d / 't10.pt', 'resnet8', 4, 3, 10)}, model: {{options: {{width: 4}}}}}}]")(d),
         "the student has 2 classes, the teachers 10", recipe="ensemble-cifar"),
    Case("ensemble: the same teacher checkpoint twice",
         lambda d: _ensemble("teacher=null", "distill.n_teachers=[1,2]",
                             f"teachers=[{{checkpoint: {_checkpoint(d / 't2.pt', 'resnet8', 4, 3, 2)}}}, "
                             f"{{checkpoint: {d / 't2.pt'}}}]")(d),
         "teachers[0] and teachers[1] are the same network", recipe="ensemble-cifar"),
    Case("ensemble: the former ensemble task's student seeds", _ensemble("student_seeds=[0,1]"),
         "recipe key 'student_seeds' is now 'seeds", recipe="ensemble-cifar"),
    Case("ensemble: critic weights that do not match the pool",
         _ensemble("teachers=2", "distill.n_teachers=[1,2]", "distill.teacher_weights=[1.0]"),
         "teacher_weights has 1 entries for a pool of 2", recipe="ensemble-cifar"),
    Case("ensemble: a key of the former recipe dialect", _ensemble("distill.crd.nce_k=8"),
         "recipe key 'distill.crd' is now 'distill.loss_options.crd'", recipe="ensemble-cifar"),
    Case("ensemble: per-method weights of the former dialect", _ensemble("distill.weights={crd_ensemble: {crd: 0.5}}"),
         "distill.weights.crd_ensemble", recipe="ensemble-cifar"),
    Case("several-teacher key given to a one-teacher recipe", lambda d: ["distill.teacher_weights=[1.0]"],
         "distill.teacher_weights is about several teachers; list them under teachers"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory, formats) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "empty" / "train").mkdir(parents=True)
    _image_folder(root / "corrupt", corrupt=True)
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (root / "quicklist.yaml").write_text("task: transfer\nquick_overrides: [1, 2]\n")
    (root / "broken.yaml").write_text("task: transfer\n  bad: [indent\n")
    for name, test_classes in (("oneclass", ("cat",)), ("otherclasses", ("cat", "eel"))):
        for split, classes in (("train", ("cat",) if name == "oneclass" else ("cat", "dog")), ("test", test_classes)):
            for cls in classes:
                (root / name / split / cls).mkdir(parents=True)
                for i in range(4):
                    Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / name / split / cls / f"{i}.png")
    _nyu_files(root, formats)
    return root


@pytest.mark.slow
def test_bad_inputs_fail_cleanly_and_lose_nothing(tmp_path, data):
    earlier: dict[tuple, Path] = {}
    rows, failures = [], []
    for i, case in enumerate(CASES):
        base = case.base(data)
        if tuple(base) not in earlier:
            run = tmp_path / f"earlier{len(earlier)}"
            assert main(["run", "lab-color-transfer", f"output_dir={run}", *TINY, *base]) == 0
            earlier[tuple(base)] = run
        out = tmp_path / f"case{i}"
        shutil.copytree(earlier[tuple(base)], out)
        if case.damage is not None:
            case.damage(out)
        before = _snapshot(out)
        stderr = io.StringIO()
        recipe = case.recipe(data) if callable(case.recipe) else case.recipe
        settings = [*TINY, *base] if recipe == LAB else []
        with redirect_stderr(stderr):
            code = main(["run", recipe, f"output_dir={out}", *settings, *case.args(data)])
        # Progress bars share stderr; the error itself must be one line, and the last.
        lines = [line for line in stderr.getvalue().replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("xmodal: error:")]
        message = errors[-1] if errors else "(none)"
        kept = _snapshot(out)
        intact = all(kept.get(name) == digest for name, digest in before.items())
        crashed = any(line.startswith("Traceback") for line in lines)
        ok = (code == 2 and len(errors) == 1 and lines[-1] == message and case.expect in message and intact
              and not crashed)
        if not ok:
            failures.append(f"{case.name}: exit {code}, intact={intact}, message={message!r}")
        shown = message.replace(str(tmp_path), "<tmp>").replace(str(data), "<data>").replace("|", "\\|")
        shown_recipe = recipe.replace(str(data), "<data>")
        rows.append(f"| {case.name} | `{shown_recipe}` | `{shown}` | {code} | {'yes' if intact else 'NO'} |")
    table = (
        "# Bad input: what xmodal says\n\n"
        "Generated by `tests/xmodal/test_reliability.py`, which fails when this file no longer says what\n"
        "xmodal does (`XMODAL_WRITE_DOCS=1 python -m pytest tests/xmodal/test_reliability.py` rewrites it).\n"
        "Each row ran `xmodal run <recipe> output_dir=<a folder holding a finished run> <tiny settings>\n"
        "<the bad input>`; \"earlier output intact\" means every file of that finished run (as damaged, for\n"
        "the rows that damage it) was byte-for-byte unchanged afterwards. Exit code 2 is xmodal's code for a\n"
        "user error; a crash (a traceback, exit 1) fails the test. The finished run is a tiny Lab run; the\n"
        "NYU-Depth-V2 and ensemble rows run their own recipe into that same folder. NYU-Depth-V2 inputs are\n"
        "small files written in the official layouts (MATLAB v7.3 labeled .mat with `splits.mat` and the\n"
        "class mappings beside it; rgb/ depth/ label13/ frame folders). Planted files would run code if\n"
        "unpickled.\n\n"
        "| bad input | recipe | message (stderr, one line) | exit code | earlier output intact |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    (tmp_path / "errors.md").write_text(table)
    assert not failures, "\n".join(failures)
    if os.environ.get("XMODAL_WRITE_DOCS") == "1":
        DOC.write_text(table)
    assert DOC.exists() and DOC.read_text() == table, (
        f"docs/errors.md differs from what xmodal says now ({tmp_path / 'errors.md'}); after a deliberate change "
        "run XMODAL_WRITE_DOCS=1 python -m pytest tests/xmodal/test_reliability.py")
