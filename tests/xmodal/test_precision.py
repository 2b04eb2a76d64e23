"""Emulated bf16 convolutions (xmodal/precision.py) against independent float64 computations.

The reference for every check is a float64 convolution of the same bf16 numbers: a bf16 kernel
that sums in float32 and rounds once lands within one bf16 rounding of it, whatever the batch.
"""
from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F

from xmodal.cli import main
from xmodal.engine import Engine
from xmodal.errors import ConfigError
from xmodal.precision import EmulatedBf16, cpu_bf16_kernels, resolve_cpu_bf16_convs


def _bf16_autocast(emulated: bool) -> ExitStack:
    stack = ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if emulated:
        stack.enter_context(EmulatedBf16())
    return stack


def _conv_case(batch: int, channels: int = 8, size: int = 12, seed: int = 0):
    """bf16 numbers as float32 leaves (autocast's casts of them are exact), and a bf16 output gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g).relu().bfloat16().float()
    w = (torch.randn(channels, channels, 3, 3, generator=g) * 0.2).bfloat16().float()
    b = (torch.randn(channels, generator=g) * 0.1).bfloat16().float()
    grad_out = (torch.randn(batch, channels, size, size, generator=g) * 0.3 + 0.1).bfloat16()
    return x, w, b, grad_out


def _errors(batch: int, emulated: bool) -> dict[str, tuple[float, float]]:
    """Per result: (relative error against float64, relative error of the float64 result rounded once)."""
    x, w, b, grad_out = _conv_case(batch)
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    out_ref = F.conv2d(*ref, padding=1)
    out_ref.backward(grad_out.double())
    got = [t.clone().requires_grad_() for t in (x, w, b)]
    with _bf16_autocast(emulated):
        out = F.conv2d(*got, padding=1)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out)

    def rel(a, r):
        return float((a.detach().double() - r.detach()).norm() / r.detach().norm())

    pairs = {"output": (out, out_ref), "input grad": (got[0].grad, ref[0].grad),
             "weight grad": (got[1].grad, ref[1].grad), "bias grad": (got[2].grad, ref[2].grad)}
    return {name: (rel(a, r), rel(r.detach().bfloat16(), r)) for name, (a, r) in pairs.items()}


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_emulated_conv_is_one_bf16_rounding_from_exact(batch):
    # Output and every gradient within 2 % of the error of rounding the exact result once: the
    # float32 sum adds nothing visible, at any batch (PyTorch's fallback kernel does, below).
    for name, (error, once) in _errors(batch, emulated=True).items():
        assert error <= 1.02 * once + 1e-7, (name, error, once)


CONV_CALLS = {
    "conv1d": lambda x, w, b: F.conv1d(x.flatten(2), w[..., 1], b, padding=1),
    "conv2d groups=2 padding=same": lambda x, w, b: F.conv2d(x, w[:, : w.shape[1] // 2], b, padding="same", groups=2),
    "conv2d no bias, by keyword": lambda x, w, b: F.conv2d(input=x, weight=w, stride=2),
    "conv_transpose2d stride 2": lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
    "conv3d": lambda x, w, b: F.conv3d(x.unsqueeze(2), w.unsqueeze(2), b),
    "nn.Conv2d reflect padding": "reflect",
    "nn.Conv2d, bf16 input (a bf16 layer's output)": "zeros",
}


@pytest.mark.parametrize("call", list(CONV_CALLS))
def test_every_convolution_form_is_one_rounding_from_exact(call):
    # The emulated ops and the ways modules call them, against float64 on the same bf16 numbers.
    x, w, b, _ = _conv_case(4)
    if isinstance(CONV_CALLS[call], str):
        mode = CONV_CALLS[call]
        conv = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode=mode)
        with torch.no_grad():
            conv.weight.copy_(w), conv.bias.copy_(b)
        layer = lambda x_, w_, b_: F.conv2d(F.pad(x_, (1, 1, 1, 1), mode="reflect") if mode == "reflect" else x_,  # noqa: E731
                                             w_, b_, padding=0 if mode == "reflect" else 1)
        x = x if mode == "reflect" else x.bfloat16()
        leaves = [x.requires_grad_(), conv.weight, conv.bias]
        run = lambda: conv(x)  # noqa: E731
    else:
        layer = CONV_CALLS[call]
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        run = lambda: layer(*leaves)  # noqa: E731
    with _bf16_autocast(emulated=True):
        out = run()
    assert out.dtype == torch.bfloat16
    grad_out = (torch.randn(out.shape, generator=torch.Generator().manual_seed(3)) * 0.3 + 0.1).bfloat16()
    out.backward(grad_out)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    out_ref = layer(*ref)
    out_ref.backward(grad_out.double())
    for name, got, exact in [("output", out, out_ref)] + [(f"grad {i}", a.grad, r.grad) for i, (a, r) in
                                                          enumerate(zip(leaves, ref)) if r.grad is not None]:
        error = float((got.detach().double() - exact.detach()).norm() / exact.detach().norm())
        once = float((exact.detach().bfloat16().double() - exact.detach()).norm() / exact.detach().norm())
        assert error <= 1.02 * once + 1e-7, (call, name, error, once)


def test_float64_passes_through_as_autocast_leaves_it():
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with _bf16_autocast(emulated=True):
        out = F.conv2d(x, w)
    assert out.dtype == torch.float64 and torch.equal(out, F.conv2d(x, w))


@pytest.mark.parametrize("batch", [16, 4096])
def test_bf16_linear_layers_already_sum_in_float32(batch):
    # Why only convolutions are emulated: PyTorch's bf16 linear layer (no emulation) is within
    # one rounding of float64 on the same bf16 numbers, its weight gradient summed over the batch.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 64, generator=g).relu().bfloat16().float().requires_grad_()
    w = (torch.randn(64, 64, generator=g) * 0.2).bfloat16().float().requires_grad_()
    grad_out = (torch.randn(batch, 64, generator=g) * 0.3 + 0.1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.linear(x, w)
    out.backward(grad_out)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out_ref = F.linear(xr, wr)
    out_ref.backward(grad_out.double())
    for got, exact in ((out, out_ref), (w.grad, wr.grad), (x.grad, xr.grad)):
        exact = exact.detach()
        error = float((got.detach().double() - exact).norm() / exact.norm())
        assert error <= 1.05 * float((exact.bfloat16().double() - exact).norm() / exact.norm()) + 1e-7


@pytest.mark.skipif(cpu_bf16_kernels() is not False, reason="this CPU runs oneDNN's bf16 kernels, not the fallback")
def test_the_fallback_kernel_is_what_emulation_replaces():
    # Why emulation exists: on a CPU without oneDNN's bf16 path PyTorch's bf16 convolution adds
    # each image's weight gradient into a bf16 buffer; at 256 images its error is several roundings.
    error, once = _errors(256, emulated=False)["weight grad"]
    assert error > 4 * once


def test_emulated_gradients_are_bf16_numbers_like_a_bf16_kernels():
    x, w, b, grad_out = _conv_case(4)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with _bf16_autocast(emulated=True):
        F.conv2d(*leaves, padding=1).backward(grad_out)
    for leaf in leaves:
        assert leaf.grad.dtype == torch.float32
        assert torch.equal(leaf.grad, leaf.grad.bfloat16().float())  # rounded once to bf16, as autocast's cast back


def test_operands_are_rounded_to_bf16_first():
    # An input that bf16 cannot hold is rounded before the product, as autocast would cast it:
    # the emulated output equals the float64 convolution of the rounded operands, rounded once.
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    with _bf16_autocast(emulated=True):
        out = F.conv2d(x, w).double()
    exact = F.conv2d(x.bfloat16().double(), w.bfloat16().double())
    unrounded = F.conv2d(x.double(), w.double())
    assert ((out - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()  # within half a bf16 ulp of it
    # ... and nearer to it than to the product of the operands as given
    assert (out - exact).norm() < 0.8 * (out - unrounded).norm()


def test_outside_bf16_autocast_nothing_changes():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    plain = F.conv2d(x, w)
    with EmulatedBf16():  # no autocast: float32 as before, bit for bit
        assert torch.equal(F.conv2d(x, w), plain)
    with _bf16_autocast(emulated=True), torch.autocast("cpu", enabled=False):  # CRD core, fp32 stems
        assert torch.equal(F.conv2d(x, w), plain)
    with torch.autocast("cpu", dtype=torch.float16), EmulatedBf16():  # fp16 is not bf16's business
        assert F.conv2d(x, w).dtype == torch.float16


@pytest.mark.parametrize("setting,precision,kernels,expected", [
    ("auto", "bf16", False, "emulated"), ("auto", "bf16", True, "native"), ("auto", "bf16", None, "native"),
    ("native", "bf16", False, "native"), ("emulated", "bf16", True, "emulated"),
    ("auto", "no", False, None), ("emulated", "fp16", False, None),
])
def test_resolution(setting, precision, kernels, expected):
    assert resolve_cpu_bf16_convs(setting, precision, torch.device("cpu"), kernels) == expected
    assert resolve_cpu_bf16_convs(setting, precision, torch.device("cuda"), kernels) is None


def test_an_unknown_setting_is_named():
    with pytest.raises(ConfigError, match="cpu_bf16_convs='fast': expected one of auto, emulated, native"):
        resolve_cpu_bf16_convs("fast", "no", torch.device("cpu"), None)


@pytest.mark.parametrize("kernels,expected", [(False, "emulated"), (True, "native")])
def test_engine_autocast_runs_what_auto_resolves_to(tmp_path, monkeypatch, kernels, expected):
    import xmodal.engine as engine_module

    seen = []

    class Seen(EmulatedBf16):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    monkeypatch.setattr(engine_module, "cpu_bf16_kernels", lambda: kernels)
    monkeypatch.setattr(engine_module, "EmulatedBf16", Seen)
    engine = Engine(tmp_path, mixed_precision="bf16", cpu=True, log=False)
    assert engine.cpu_bf16_convs == expected
    x, w, _, _ = _conv_case(2)
    with engine.autocast():
        out = F.conv2d(x, w, padding=1)
    assert out.dtype == torch.bfloat16 and (torch.conv2d in seen) == (expected == "emulated")
    if expected == "emulated":  # x, w hold bf16 numbers: a float32 sum, rounded once
        assert torch.equal(out, F.conv2d(x, w, padding=1).bfloat16())
    assert Engine(tmp_path, mixed_precision="no", cpu=True, log=False).cpu_bf16_convs is None


@pytest.mark.slow
def test_precision_is_part_of_a_stage_and_the_report_records_the_convolutions(tmp_path, capsys):
    # A folder of fp32 stages never hands its students to a bf16 run (nor bf16 stages of one
    # kind of convolution to a run asking for the other), and the report says what ran.
    tiny = ["data.options={num_samples: 64}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
            "distill.methods=[kd]", "distill.train.epochs=1", "distill.train.batch_size=32",
            "linear_probe.epochs=1", "protocols=[linear_probe]", "student.options={width: 4}",
            "teacher.model.options={width: 4}", "data.num_workers=0", "cpu=true"]
    out = tmp_path / "run"
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *tiny]) == 0
    assert json.loads((out / "report.json").read_text())["cpu_bf16_convs"] is None
    teacher = (out / "stages" / "teacher" / "final.pt").read_bytes()
    capsys.readouterr()
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *tiny, "mixed_precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert "of a run with another configuration (it differs in precision)" in err, err
    assert (out / "stages" / "teacher" / "final.pt").read_bytes() == teacher  # nothing written is lost

    bf16 = tmp_path / "bf16"
    for convs in ("emulated", "native"):
        assert main(["run", "lab-color-transfer", f"output_dir={bf16}-{convs}", *tiny, "mixed_precision=bf16",
                     f"cpu_bf16_convs={convs}"]) == 0
        assert json.loads((bf16.parent / f"bf16-{convs}" / "report.json").read_text())["cpu_bf16_convs"] == convs
    capsys.readouterr()
    assert main(["run", "lab-color-transfer", f"output_dir={bf16}-emulated", *tiny, "mixed_precision=bf16",
                 "cpu_bf16_convs=native"]) == 2
    assert "it differs in precision.cpu_bf16_convs; cpu_bf16_convs=emulated runs it as it ran" in capsys.readouterr().err
