"""Bad input, tried for real; the table in docs/reliability.md is written by this test.

Every case runs the command line against an output folder that already holds a finished run,
and checks three things: the exit status is 2 (a user error, not a crash), the message is one
line that names the problem, and every file of the earlier run is byte-for-byte unchanged.
"""
from __future__ import annotations

import hashlib
import io
import shutil
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.cli import main
from xmodal.models import build_model, save_backbone

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
TINY = [
    "data.options={num_samples: 64}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
    "distill.methods=[random,crd]", "distill.train.epochs=1", "distill.train.batch_size=32",
    "distill.loss_options.crd.nce_k=16", "linear_probe.epochs=1", "protocols=[linear_probe]",
    "student.options={width: 4}", "teacher.model.options={width: 4}", "data.num_workers=0",
]


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # data folder -> command-line arguments after the recipe
    expect: str  # a fragment the message must contain
    base: Callable[[Path], list[str]] = lambda d: []  # settings of the earlier, finished run too


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


def _checkpoint(path: Path, arch: str, width: int) -> Path:
    save_backbone(path, build_model(arch, in_channels=1, num_classes=10, width=width))
    return path


CASES = [
    Case("data root that does not exist", lambda d: ["data=imagefolder", f"data.root={d / 'missing'}"],
         "does not exist"),
    Case("empty image folder", lambda d: ["data=imagefolder", f"data.root={d / 'empty'}"], "no images found"),
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
    Case("teacher checkpoint of another architecture",
         lambda d: [f"teacher.checkpoint={_checkpoint(d / 'wrong.pt', 'resnet20', 4)}"], "resnet20"),
    Case("teacher checkpoint that is not a checkpoint",
         lambda d: [f"teacher.checkpoint={d / 'garbage.pt'}"], "garbage.pt"),
    Case("split folder that does not exist",
         lambda d: ["data=imagefolder", f"data.root={d / 'corrupt'}", "data.teacher.split=train"], "no folder"),
    Case("dataset option the recipe sets itself", lambda d: ["data.options={num_samples: 64, labeled: false}"],
         "data.options.labeled"),
    Case("unknown dataset name", lambda d: ["data=cifar11", "data.root=/tmp"], "did you mean"),
    Case("output folder holding a run of another configuration", lambda d: ["teacher.train.epochs=2"],
         "another configuration"),
    Case("a non-finite loss (finetune learning rate 1e30)",
         lambda d: ["protocols=[linear_probe,finetune]", "finetune.optim.lr=1e30", "finetune.batch_size=32"],
         "not finite"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "empty" / "train").mkdir(parents=True)
    _image_folder(root / "corrupt", corrupt=True)
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
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
        before = _snapshot(out)
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            code = main(["run", "lab-color-transfer", f"output_dir={out}", *TINY, *base, *case.args(data)])
        # Progress bars share stderr; the error itself must be one line, and the last.
        lines = [line for line in stderr.getvalue().replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("xmodal: error:")]
        message = errors[-1] if errors else "(none)"
        kept = _snapshot(out)
        intact = all(kept.get(name) == digest for name, digest in before.items())
        ok = code == 2 and len(errors) == 1 and lines[-1] == message and case.expect in message and intact
        if not ok:
            failures.append(f"{case.name}: exit {code}, intact={intact}, message={message!r}")
        shown = message.replace(str(tmp_path), "<tmp>").replace(str(data), "<data>").replace("|", "\\|")
        rows.append(f"| {case.name} | `{shown}` | {code} | {'yes' if intact else 'NO'} |")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(
        "# Bad input: what xmodal says\n\n"
        "Generated by `tests/xmodal/test_reliability.py` (run the test suite to refresh it). Each row ran\n"
        "`xmodal run lab-color-transfer output_dir=<a folder holding a finished run> <tiny settings> <the bad\n"
        "input>`; \"earlier output intact\" means every file of that finished run was byte-for-byte unchanged\n"
        "afterwards. Exit code 2 is xmodal's code for a user error (a crash would be 1).\n\n"
        "| bad input | message (stderr, one line) | exit code | earlier output intact |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    assert not failures, "\n".join(failures)
