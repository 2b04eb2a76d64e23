"""What a CPU's bf16 convolutions cost: the kernel PyTorch picks, its speed, and its error.

Where oneDNN's bf16 path is unavailable (on x86 it needs AVX512BW/VL/DQ; AVX512-BF16 or AMX make
it native), PyTorch runs a bf16 ``conv2d`` through its own fallback (``aten::_slow_conv2d_*``:
im2col, then a bf16 matrix product per image) instead of oneDNN. This script prints, for the
machine it runs on:

1. whether oneDNN's bf16 path is available (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``)
   and which kernels a bf16 autocast forward and backward of a two-convolution stack runs
   (``torch.profiler``, the three ops with most self time);
2. the time of one training step (``resnet8``, width 8, ``B`` images of 32 x 32, ab in, an L
   teacher's forward beside it, as in the recipe's distillation) in fp32 and under bf16
   autocast, median of ``--steps``, and their ratio;
3. the error of a bf16 convolution's output, weight gradient and input gradient, each against
   a float64 reference computed **from the same bf16-rounded input, weight and output
   gradient** (so only the kernel's arithmetic is measured, not the rounding of its inputs),
   beside the error of rounding that exact float64 result once to bf16 — what a kernel that
   accumulates in float32 and rounds once would show. ``|g| ratio - 1`` is the bias of the
   weight gradient's size (sum of |g| over the reference's), which a kernel that drops small
   addends into a large bf16 sum would push below zero. The inputs are ReLU outputs (>= 0) and
   output gradients with a common component, as in a network, rather than zero-mean noise;
4. the weight gradient's error against the batch size at one layer shape: a kernel that adds
   each image's contribution into a bf16 buffer (one rounding per image) shows an error growing
   with the batch, one that accumulates in float32 and rounds once does not;
5. 2-4 again for xmodal's emulated bf16 convolutions (:class:`xmodal.precision.EmulatedBf16`,
   ``cpu_bf16_convs=emulated``: bf16-rounded operands, float32 kernels, results rounded once),
   beside PyTorch's own (``native``); and, as the reason only convolutions are emulated, the same
   errors for a bf16 ``linear`` layer at growing batch (its weight gradient sums over the batch
   inside one matrix product).

    python benchmarks/bf16_conv.py [--batch 64] [--steps 20]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from xmodal.precision import EmulatedBf16

KERNELS = ("native", "emulated")


def bf16_autocast(kernel: str):
    """bf16 autocast with PyTorch's own convolutions (``native``) or xmodal's emulated ones."""
    from contextlib import ExitStack

    stack = ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if kernel == "emulated":
        stack.enter_context(EmulatedBf16())
    return stack


def step_time(precision: str, batch: int, steps: int) -> float:
    """Median seconds of one SGD step of the recipe's student (teacher forward included);
    ``precision``: ``no`` or one of :data:`KERNELS` (bf16)."""
    from xmodal.models import build_model

    torch.manual_seed(0)
    student = build_model("resnet8", 2, 10, width=8)
    teacher = build_model("resnet8", 1, 10, width=8).eval().requires_grad_(False)
    ab, lum = torch.randn(batch, 2, 32, 32), torch.randn(batch, 1, 32, 32)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)

    def one() -> None:
        context = bf16_autocast(precision) if precision in KERNELS else torch.autocast("cpu", enabled=False)
        with context:
            with torch.no_grad():
                target = teacher(lum).pooled.float()
            out = student(ab)
            loss = F.mse_loss(out.pooled.float(), target) + out.logits.float().logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        one()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def conv_kernels(batch: int) -> list[str]:
    """The three ops with most self CPU time in two bf16 autocast steps of a conv stack."""
    from torch.profiler import ProfilerActivity, profile

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(batch, 2, 32, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                net(x).float().sum().backward()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [e.key for e in ops[:3]]


def layer_errors(batch: int, channels: int, size: int, kernel: str = "native", seed: int = 0) -> dict[str, float]:
    """Relative errors (Frobenius) of a bf16 3x3 conv (``size`` > 0) or linear layer (``size`` 0)
    under bf16 autocast with ``kernel`` convolutions, against float64 on the same rounded numbers.

    The layer's float32 input and weight hold bf16 numbers, so autocast's casts are exact and
    only the kernel's arithmetic (and its rounding of the results) is measured."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, size, size) if size else (batch, channels)
    x = torch.randn(*shape, generator=g).relu().bfloat16()
    w = (torch.randn(channels, channels, *((3, 3) if size else ()), generator=g) * 0.2).bfloat16()
    grad_out = (torch.randn(*shape, generator=g) * 0.3 + 0.1).bfloat16()
    layer = functools.partial(F.conv2d, padding=1) if size else F.linear

    ref = [t.double().requires_grad_() for t in (x, w)]
    out_ref = layer(*ref)
    out_ref.backward(grad_out.double())
    got = [t.float().requires_grad_() for t in (x, w)]
    with bf16_autocast(kernel):
        out = layer(*got)
    assert out.dtype == torch.bfloat16, out.dtype
    out.backward(grad_out)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm())

    names = (("output", out, out_ref), ("weight grad", got[1].grad, ref[1].grad), ("input grad", got[0].grad, ref[0].grad))
    row = {name: rel(a, b) for name, a, b in names}
    row.update({f"{name} rounded once": rel(b.bfloat16(), b) for name, _, b in names})
    row["|g| ratio - 1"] = float(got[1].grad.double().abs().sum() / ref[1].grad.abs().sum() - 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; oneDNN bf16 path available: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"bf16 autocast conv step, most self time: {', '.join(conv_kernels(args.batch))}")
    times = {p: step_time(p, args.batch, args.steps) for p in ("no", *KERNELS)}
    print(f"training step (resnet8 w8, B={args.batch}, 32x32, teacher forward included), median of {args.steps}: "
          f"fp32 {times['no'] * 1e3:.1f} ms, " + ", ".join(
              f"bf16 {k} {times[k] * 1e3:.1f} ms ({times[k] / times['no']:.2f} x fp32)" for k in KERNELS))
    print("bf16 layers against float64 on the same rounded numbers (relative error; in brackets: the exact result "
          "rounded once to bf16)")
    print(f"{'convs':>8s} {'B x C x H':>12s} {'output':>22s} {'weight grad':>22s} {'input grad':>22s} {'|g| ratio - 1':>14s}")
    for kernel in KERNELS:
        for channels, size in ((8, 32), (16, 16), (32, 8)):
            e = layer_errors(args.batch, channels, size, kernel)
            cells = [f"{e[n]:.2e} [{e[n + ' rounded once']:.2e}]" for n in ("output", "weight grad", "input grad")]
            print(f"{kernel:>8s} {f'{args.batch}x{channels}x{size}':>12s} {cells[0]:>22s} {cells[1]:>22s} "
                  f"{cells[2]:>22s} {e['|g| ratio - 1']:>+14.1e}")
    for kernel in KERNELS:
        sweep = {b: layer_errors(b, 16, 16, kernel) for b in (1, 4, 16, 64, 256)}
        print(f"conv weight grad error against the batch (C=16, 16x16), {kernel}: " + ", ".join(
            f"B={b} {e['weight grad']:.2e} [{e['weight grad rounded once']:.2e}]" for b, e in sweep.items()))
    sweep = {b: layer_errors(b, 64, 0) for b in (16, 256, 4096)}
    print("linear layer (64 -> 64) weight grad error against the batch, PyTorch's bf16 kernel: " + ", ".join(
        f"B={b} {e['weight grad']:.2e} [{e['weight grad rounded once']:.2e}]" for b, e in sweep.items()))


if __name__ == "__main__":
    main()
