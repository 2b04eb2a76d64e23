"""Distillation under fp16 and bf16 autocast: really low precision, and finite throughout."""
from __future__ import annotations

import json

import pytest
import torch

from xmodal.cli import main
from xmodal.engine import Engine

TINY = [
    "data.options={num_samples: 64}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
    "distill.methods=[crd,kd,fitnet]", "distill.train.epochs=2", "distill.train.batch_size=32",
    "distill.loss_options.crd.nce_k=32", "linear_probe.epochs=2", "protocols=[linear_probe]",
    "student.options={width: 4}", "teacher.model.options={width: 4}", "data.num_workers=0", "cpu=true",
]


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_engine_autocast_is_really_low_precision(tmp_path, precision, dtype):
    engine = Engine(tmp_path, mixed_precision=precision, cpu=True, log=False)
    with engine.autocast():
        out = torch.nn.Conv2d(2, 4, 3)(torch.randn(1, 2, 8, 8))
    assert out.dtype == dtype


@pytest.mark.slow
@pytest.mark.parametrize("precision,convs", [("fp16", "auto"), ("bf16", "native"), ("bf16", "emulated")])
def test_distillation_stays_finite(tmp_path, precision, convs):
    # bf16 with PyTorch's own convolutions and with xmodal's emulated ones (xmodal/precision.py)
    out = tmp_path / precision
    assert main(["run", "lab-color-transfer", f"output_dir={out}", f"mixed_precision={precision}",
                 f"cpu_bf16_convs={convs}", *TINY]) == 0
    for method in ("crd", "kd", "fitnet"):
        history = json.loads((out / "stages" / f"distill-{method}" / "result.json").read_text())["history"]
        assert len(history) == 2
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history), (method, history)
        final = torch.load(out / "stages" / f"distill-{method}" / "final.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


@pytest.mark.slow
def test_student_stem_in_fp32_is_a_recipe_key(tmp_path, capsys):
    out = tmp_path / "stem"
    assert main(["run", "lab-color-transfer", f"output_dir={out}", "mixed_precision=bf16", "student.fp32_stem=true",
                 *TINY]) == 0
    assert json.loads((out / "report.json").read_text())["config"]["student"]["fp32_stem"] is True
    history = json.loads((out / "stages" / "distill-crd" / "result.json").read_text())["history"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    # A backbone whose stem runs inside a library's forward is refused before anything is written.
    refused = tmp_path / "refused"
    code = main(["run", "lab-color-transfer", f"output_dir={refused}", "mixed_precision=bf16", "student.fp32_stem=true",
                 "student.arch=smp_resnet18", "student.options={}", *[a for a in TINY if not a.startswith("student.")]])
    assert code == 2 and not refused.exists()
    assert "fp32_stem=true: smp_resnet18 runs its stem inside" in capsys.readouterr().err
