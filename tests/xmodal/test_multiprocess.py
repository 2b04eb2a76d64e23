"""Two CPU processes (gloo) at global batch B train like one process at batch B.

Runs the Lab recipe's teacher and distillation stages with ``torchrun --nproc_per_node 2``
(Accelerate picks up the process group; ``accelerate launch`` starts CPU process groups only
through MPI, torchrun needs nothing installed) and once in a single process, and traces both:
after every optimizer step the parameters, and during every training forward the sign of each
ReLU input (rank r holds rows r*B/2 .. (r+1)*B/2 - 1 of the global batch).

Float32 sums taken in another order differ by ~1e-7, and now and then that moves one ReLU input
across zero (8e-7 in one run, -4e-6 in the other was seen). From that step on the two runs take
different subgradients: one flipped pixel in the last stage moves the weights by ~1e-4, and the
runs part further from there. That is arithmetic at a kink, not a fault of the multi-process
code, and on the built-in data it happened within the first three steps. So:

- with every ReLU replaced by GELU in both runs (smooth: rounding cannot switch anything), every
  step's parameters and every weight, BatchNorm statistic and memory-bank row of the finished
  stages must agree to 1e-5 (measured: <= 5.4e-7 over 26 steps);
- with the real ReLU, the parameters must agree to 1e-5 at every step before the first step at
  which some ReLU sign differs between the runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gloo_ranks import free_port

ARGS = [
    "data.options={num_samples: 64}", "teacher.train.epochs=1", "teacher.train.batch_size=16",
    "distill.methods=[crd,kd]", "distill.train.epochs=2", "distill.train.batch_size=16",
    "distill.loss_options.crd.nce_k=16", "protocols=[linear_probe]", "linear_probe.epochs=3",
    "student.options={width: 4}", "teacher.model.options={width: 4}", "data.num_workers=0", "cpu=true",
]


# Run inside each process: trace parameters after every optimizer step and ReLU signs in every
# training forward, then save the trace as trace<rank>.pt in $TRACE_DIR.
TRACER = textwrap.dedent('''
    import atexit, os, sys, torch
    import torch.nn.functional as F
    from torch import nn

    steps, signs = [], []
    relu = F.gelu if os.environ.get("SMOOTH") else F.relu
    def traced_relu(x, inplace=False):
        if torch.is_grad_enabled():
            signs.append(x.detach() > 0)
        return relu(x)
    F.relu = traced_relu
    nn.ReLU.forward = lambda self, x: traced_relu(x, self.inplace)
    step = torch.optim.SGD.step
    def traced_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        params = [p.detach().clone() for group in self.param_groups for p in group["params"]]
        steps.append({"params": params, "signs": list(signs)})
        signs.clear()
        return out
    torch.optim.SGD.step = traced_step
    atexit.register(lambda: torch.save(steps, os.path.join(os.environ["TRACE_DIR"],
                                                           f"trace{os.environ.get('RANK', '0')}.pt")))
    from xmodal.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _run(prefix: list[str], out: Path, tracer: Path, smooth: bool) -> list[list[dict]]:
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRACE_DIR": str(out), "SMOOTH": "1" if smooth else ""}
    cmd = [*prefix, str(tracer), "run", "lab-color-transfer", f"output_dir={out / 'run'}", *ARGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(path, weights_only=False) for path in sorted(out.glob("trace*.pt"))]


def _first_sign_difference(two: list[list[dict]], one: list[dict]) -> int | None:
    """The first step at which some ReLU input has another sign in the two runs."""
    for step, reference in enumerate(one):
        for layer, signs in enumerate(reference["signs"]):
            joined = torch.cat([rank[step]["signs"][layer] for rank in two])
            if not torch.equal(joined, signs):
                return step
    return None


def _traced_runs(tmp_path: Path, smooth: bool) -> tuple[list[list[dict]], list[dict]]:
    tracer = tmp_path / "tracer.py"
    tracer.write_text(TRACER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    two = _run(torchrun, tmp_path / "two", tracer, smooth)
    (one,) = _run([sys.executable], tmp_path / "one", tracer, smooth)
    assert len(two) == 2 and len(two[0]) == len(two[1]) == len(one) > 0
    for rank in two:
        assert [len(s["signs"]) for s in rank] == [len(s["signs"]) for s in one]
    return two, one


def _assert_steps_agree(two: list[list[dict]], one: list[dict], steps: int) -> None:
    for step in range(steps):
        for p_two, p_one in zip(two[0][step]["params"], one[step]["params"]):
            torch.testing.assert_close(p_two, p_one, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Smooth activations: every step, and every tensor of the finished stages, to 1e-5."""
    two, one = _traced_runs(tmp_path, smooth=True)
    _assert_steps_agree(two, one, len(one))
    compared = set()
    for stage in ("teacher", "distill-crd", "distill-kd"):
        final_two = torch.load(tmp_path / "two/run/stages" / stage / "final.pt", weights_only=True)
        final_one = torch.load(tmp_path / "one/run/stages" / stage / "final.pt", weights_only=True)
        assert final_two.keys() == final_one.keys()
        compared |= set(final_one)
        for key, value in final_one.items():
            if value.is_floating_point():
                torch.testing.assert_close(final_two[key], value, rtol=1e-5, atol=1e-5, msg=f"{stage}: {key}")
            else:
                assert torch.equal(final_two[key], value), f"{stage}: {key}"
    assert {"criteria.crd.memory.student_bank", "criteria.crd.memory.teacher_bank"} <= compared
    report_two = json.loads((tmp_path / "two/run/report.json").read_text())
    report_one = json.loads((tmp_path / "one/run/report.json").read_text())
    assert report_two["processes"] == 2 and report_one["processes"] == 1
    assert len(report_two["results"]) == len(report_one["results"]) > 0
    for a, b in zip(report_two["results"], report_one["results"]):
        assert a["method"] == b["method"] and abs(a["value"] - b["value"]) <= 1.0


@pytest.mark.slow
def test_with_relu_the_runs_agree_until_a_relu_sign_differs(tmp_path):
    two, one = _traced_runs(tmp_path, smooth=False)
    flip = _first_sign_difference(two, one)
    print(f"{len(one)} optimizer steps; first ReLU sign difference at step {flip}")
    _assert_steps_agree(two, one, len(one) if flip is None else flip)
