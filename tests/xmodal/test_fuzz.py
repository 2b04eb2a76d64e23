"""Property-based: whatever the overrides, and however an earlier run's files are cut short,
``xmodal run`` finishes (exit 0) or says what is wrong in one line with exit 2 — never a
traceback, and never a changed file of the earlier run when it refuses.

The base run is tiny (64 built-in images, a teacher loaded from a checkpoint, 1-epoch stages of
4-wide networks) so that a valid draw finishes in about a second; the draws are bounded in count
and the whole file in time.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from xmodal.cli import main
from xmodal.models import build_model, save_backbone

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BASE = [
    "data.options={num_samples: 64}", "distill.methods=[random,kd]", "protocols=[linear_probe]",
    "linear_probe.epochs=1", "distill.train.epochs=1", "distill.train.batch_size=32",
    "distill.loss_options.crd.nce_k=16", "student.options={width: 4}", "teacher.model.options={width: 4}",
    "data.num_workers=0", "finetune.epochs=1", "finetune.batch_size=32",
]
KEYS = [
    "seed", "seeds", "quick", "mixed_precision", "cpu_bf16_convs", "protocols", "distill.methods",
    "distill.train.epochs", "distill.train.batch_size", "distill.train.optim.lr", "distill.train.optim.name",
    "distill.train.optim.schedule", "distill.weights", "distill.weights.crd", "distill.loss_options.crd",
    "distill.loss_options.crd.nce_k", "distill.loss_options.crd.nce_t", "distill.ce_weight", "distill.warm_start",
    "data", "data.distill.subset", "data.probe_train.subset", "data.probe_train.classes", "data.options",
    "linear_probe.lr", "linear_probe.epochs", "modality.teacher_view", "modality.student_view", "student.arch",
    "teacher.num_classes", "teacher.probe", "teacher.train.epochs", "unknown.key", "distill",
    "distill.loss_options.crd.bank", "distill.loss_options.crd.shared_negatives", "distill.loss_options.crd.key_momentum",
    "distill.cap_negatives",
]
VALUES = [
    "0", "1", "2", "-1", "32", "1000000", "0.5", "-0.5", ".nan", ".inf", "-.inf", "true", "false", "null", "''",
    "abc", "[]", "[0,1]", "[1,1]", "[random,kd]", "[crd]", "[crd_paper,kd]", "[bogus]", "{}", "{nce_k: 8}",
    "{crd: 2.0}", "[disc,square]", "fp16", "bf16", "synthetic", "imagefolder", "ab", "L", "rgb", "resnet8",
    "[linear_probe,finetune]", "1e400", "[[1]]", "{a: {b: c}}", "queue", "full", "[segmentation]",
]
# CI draws the same 150 cases every time (about 30 s); XMODAL_FUZZ_EXAMPLES=1000 explores new ones.
EXPLORE = os.environ.get("XMODAL_FUZZ_EXAMPLES")
EXAMPLES = int(EXPLORE or 150)
CUTS = ["stages/distill-kd/final.pt", "stages/distill-kd/result.json", "config.yaml", "report.json"]


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished tiny run, and the settings that made it (its teacher loaded from a file)."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    teacher = save_backbone(root / "teacher.pt", build_model("resnet8", 1, 10, width=4))
    base = [*BASE, f"teacher.checkpoint={teacher}"]
    assert main(["run", "lab-color-transfer", f"output_dir={root / 'run'}", *base]) == 0
    return root / "run", base


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXPLORE is None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.tuples(st.sampled_from(CUTS), st.floats(0.0, 0.99))))
def test_any_overrides_finish_or_fail_in_one_line(earlier, tmp_path_factory, overrides, cut):
    folder, base = earlier
    out = tmp_path_factory.mktemp("case") / "run"
    shutil.copytree(folder, out)
    if cut is not None:
        name, fraction = cut
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: int(len(data) * fraction)])
    before = _digests(out)
    stderr, stdout = io.StringIO(), io.StringIO()
    args = [f"{key}={value}" for key, value in overrides]
    with redirect_stderr(stderr), redirect_stdout(stdout):
        try:
            code = main(["run", "lab-color-transfer", f"output_dir={out}", *base, *args])
        except SystemExit as exit_:  # argparse: exit 2 with its usage line
            code = exit_.code
    lines = [line for line in stderr.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("xmodal: error:")]
    assert not any("Traceback" in line for line in lines), (args, cut, stderr.getvalue()[-2000:])
    assert code in (0, 2), (args, cut, code)
    if code == 2:
        assert len(errors) == 1, (args, cut, lines[-5:])
        after = _digests(out)
        assert all(after.get(name) == digest for name, digest in before.items()), (args, cut)
    shutil.rmtree(out.parent, ignore_errors=True)
