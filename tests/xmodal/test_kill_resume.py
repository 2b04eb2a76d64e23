"""SIGKILL a run mid-epoch and while a checkpoint is being written; resume; same report.

The kills are real: the child process sends itself SIGKILL from inside a patched function
(a step of the second distillation epoch; the middle of writing a checkpoint file), so the
points are exact and nothing in xmodal knows it is being tested.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ARGS = [
    "data.options={num_samples: 96}", "teacher.train.epochs=2", "teacher.train.batch_size=32",
    "distill.methods=[crd,random]", "distill.train.epochs=3", "distill.train.batch_size=32",
    "distill.loss_options.crd.nce_k=32", "linear_probe.epochs=3", "finetune.epochs=1", "finetune.batch_size=32",
    "student.options={width: 4}", "teacher.model.options={width: 4}", "data.num_workers=0",
    # The claim is the CPU's: on an H100 two uninterrupted runs' teachers already differed (GPU
    # kernels are not bit-deterministic by default), so the test pins the CPU there too.
    "cpu=true",
]

PATCH = textwrap.dedent('''
    import os, signal, sys, torch
    import xmodal.engine as engine

    mode, target = sys.argv[1], int(sys.argv[2])
    count = {"n": 0}
    if mode == "step":  # die during the target-th training step of the run
        original = engine.Engine._check_finite
        def patched(self, terms, stage, epoch, step):
            count["n"] += 1
            if count["n"] == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, terms, stage, epoch, step)
        engine.Engine._check_finite = patched
    else:  # die halfway through writing the target-th checkpoint file
        original_save = torch.save
        def half_save(obj, handle, *args, **kwargs):
            count["n"] += 1
            if count["n"] == target and hasattr(handle, "write"):
                handle.write(b"PK half a checkpoint")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, handle, *args, **kwargs)
        torch.save = half_save
    from xmodal.cli import main
    sys.exit(main(sys.argv[3:]))
''')


def _run(out: Path, patch_dir: Path | None = None, mode: str = "", target: int = 0) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["run", "lab-color-transfer", f"output_dir={out}", *ARGS]
    if patch_dir is None:
        cmd = [sys.executable, "-m", "xmodal", *args]
    else:
        env["PYTHONPATH"] = f"{patch_dir}{os.pathsep}{env.get('PYTHONPATH', '')}"
        cmd = [sys.executable, str(patch_dir / "killpatch.py"), mode, str(target), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300).returncode


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_report(tmp_path):
    (tmp_path / "patch").mkdir()
    (tmp_path / "patch" / "killpatch.py").write_text(PATCH)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert _run(reference) == 0

    # 1. Killed in the middle of the 5th torch.save (teacher: 2 epochs + final; distill-crd epoch 2;
    #    the exported teacher.safetensors is written by safetensors, not torch.save).
    assert _run(killed, tmp_path / "patch", "save", 5) == -signal.SIGKILL
    ckpt = killed / "stages" / "distill-crd" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # the last good one is intact

    # 2. Resumed, then killed during a step of distill-crd's third epoch (3 steps per epoch).
    assert _run(killed, tmp_path / "patch", "step", 5) == -signal.SIGKILL
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2

    # 3. Resumed to the end: the report is the uninterrupted run's, number for number.
    assert _run(killed) == 0
    expected = json.loads((reference / "report.json").read_text())
    got = json.loads((killed / "report.json").read_text())
    assert got["results"] == expected["results"]
    assert got["teacher"] == expected["teacher"]
    assert expected["threads"] == got["threads"] == 1  # the report records OMP_NUM_THREADS=1's one thread
    for stage in ("teacher", "distill-crd", "finetune-crd"):
        a = torch.load(reference / "stages" / stage / "final.pt", weights_only=True)
        b = torch.load(killed / "stages" / stage / "final.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
