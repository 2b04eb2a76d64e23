"""bf16 on CPUs without bf16 kernels: the numerics of bf16 hardware, on float32 kernels.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` PyTorch runs convolutions and matrix
products on bf16 operands. With oneDNN's bf16 path (x86 with AVX512BW/VL/DQ; native with
AVX512-BF16 or AMX) and on GPUs such a kernel multiplies bf16 numbers, accumulates in float32
and rounds its result once to bf16. Without that path (e.g. an AVX2-only CPU) a bf16
convolution runs PyTorch's fallback (``aten::_slow_conv2d_*``: im2col and a bf16 matrix
product per image), several times slower than float32, and its weight gradient is summed image
by image in a bf16 buffer, one rounding per image: an error that grows with the batch
(``benchmarks/bf16_conv.py`` measures both).

:class:`EmulatedBf16` computes what the bf16 kernels compute, on float32 kernels: each operand
of a convolution is rounded to bf16 (as autocast would), the product is taken in float32 (the
product of two bf16 numbers is exact in float32, so only the summation order can differ from a
float32-accumulating bf16 kernel), and the result is rounded once to bf16. Autograd does the
same backwards: the gradients reaching the operands are rounded once to bf16, as a bf16
kernel's gradient outputs are. It runs at about float32's speed (``benchmarks/bf16_conv.py``
here: a training step 1.15 times fp32's, PyTorch's fallback 7.1 times); it saves a convolution's
input for backward in float32 (twice the bytes a bf16 kernel saves). Two small departures: a
weight used twice in one autocast region gets its two bf16-rounded gradients summed in float32
(autocast's cached bf16 copy sums them in bf16), and float64 operands pass through unchanged, as
autocast leaves them. Linear layers are not emulated: PyTorch's bf16 matrix products already sum
in float32 (tests/xmodal/test_precision.py checks it).

``cpu_bf16_convs`` (a run's key): ``auto`` emulates where :func:`cpu_bf16_kernels` says the
CPU lacks oneDNN's bf16 path and runs the native kernels elsewhere; ``emulated`` / ``native``
force one or the other.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from xmodal.errors import ConfigError

CPU_BF16_CONVS = ("auto", "emulated", "native")

# The ops autocast runs in bf16 whose fallback kernels sum in bf16 (conv*: image by image).
EMULATED_OPS: tuple[Callable[..., Any], ...] = (
    torch.conv1d, torch.conv2d, torch.conv3d,
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
)


def cpu_bf16_kernels() -> Optional[bool]:
    """Whether PyTorch's oneDNN bf16 kernels run on this CPU; None where torch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def resolve_cpu_bf16_convs(setting: str, mixed_precision: str, device: torch.device,
                           kernels: Optional[bool]) -> Optional[str]:
    """``"emulated"`` or ``"native"`` for a bf16 run on the CPU; None where the key does not apply.

    ``kernels``: what :func:`cpu_bf16_kernels` says of this CPU (``auto`` emulates only where it
    says False: a CPU whose torch cannot say keeps the native kernels).
    """
    if setting not in CPU_BF16_CONVS:
        raise ConfigError(f"cpu_bf16_convs={setting!r}: expected one of {', '.join(CPU_BF16_CONVS)}")
    if mixed_precision != "bf16" or device.type != "cpu":
        return None
    if setting == "auto":
        return "emulated" if kernels is False else "native"
    return setting


def _bf16_rounded(value: Any) -> Any:
    """A float32 copy of a CPU floating tensor's bf16 rounding (autograd passes through both casts)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == "cpu":
        return value.to(torch.bfloat16).float()
    return value


class EmulatedBf16(TorchFunctionMode):
    """While CPU bf16 autocast is on, run convolutions as bf16 kernels would, on float32 kernels.

    Outside CPU bf16 autocast (``torch.autocast(..., enabled=False)`` blocks such as the CRD core
    and ``fp32_stem``, or another dtype) every call passes through unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func not in EMULATED_OPS or not torch.is_autocast_enabled("cpu")
                or torch.get_autocast_dtype("cpu") != torch.bfloat16
                or any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves((args, kwargs)))):
            return func(*args, **kwargs)
        args, kwargs = tree_map(_bf16_rounded, (args, kwargs))
        with torch.autocast("cpu", enabled=False):
            out = func(*args, **kwargs)
        return out.to(torch.bfloat16)
