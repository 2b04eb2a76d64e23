"""Lab colour space: the teacher sees luminance L, the student chrominance ab (CMC, CRD §4.3)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from xmodal.modalities.base import Modality, check_rgb, image_as_float, normalize_rgb

# Per-channel mean and std of L, a, b, measured on 1,000 CIFAR-10 training images
# (L 50.2 / 24.3, a 0.1 / 9.5, b 5.9 / 15.5), rounded: each view enters the network with
# roughly zero mean and unit variance.
LAB_MEAN = (50.0, 0.0, 5.0)
LAB_STD = (25.0, 10.0, 15.0)

# CIE Lab under D65 with kornia's constants (``kornia.color.rgb_to_lab``, which the tests hold
# this conversion to): sRGB primaries to XYZ, the reference white, and the cube-root threshold.
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)
_SRGB_KNEE = 0.04045
_CBRT_KNEE = 0.008856
_CBRT_SLOPE = 7.787
# (L, a, b) = _F_TO_LAB @ (f(x), f(y), f(z)) + (-16, 0, 0)
_F_TO_LAB = ((0.0, 116.0, 0.0), (500.0, -500.0, 0.0), (0.0, 200.0, -200.0))

# The two 3 x 3 maps of normalised_lab, in float64: linear RGB -> XYZ / white, and
# (f(x), f(y), f(z)) -> standardised Lab (with its offset).
_TO_XYZ = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64) / torch.tensor(_WHITE, dtype=torch.float64)[:, None]
_STD = torch.tensor(LAB_STD, dtype=torch.float64)
_TO_LAB = torch.tensor(_F_TO_LAB, dtype=torch.float64) / _STD[:, None]
_LAB_OFFSET = (torch.tensor((-16.0, 0.0, 0.0), dtype=torch.float64) - torch.tensor(LAB_MEAN, dtype=torch.float64)) / _STD


def _srgb_to_linear(v: Tensor) -> Tensor:
    """The sRGB transfer function inverted, for ``v`` in [0, 1] (float64 or float32)."""
    return torch.where(v > _SRGB_KNEE, ((v + 0.055).clamp(min=0.0) / 1.055) ** 2.4, v / 12.92)


_LINEAR_LUT: dict[torch.device, Tensor] = {}


def _linear_of_uint8(image: Tensor) -> Tensor:
    """Linear RGB of 8-bit sRGB: a 256-entry table (computed in float64), one lookup per value."""
    lut = _LINEAR_LUT.get(image.device)
    if lut is None:
        levels = torch.arange(256, dtype=torch.float64) / 255.0
        lut = _LINEAR_LUT[image.device] = _srgb_to_linear(levels).float().to(image.device)
    return lut.index_select(0, image.reshape(-1).int())


def normalised_lab(image: Tensor) -> Tensor:
    """``(B, 3, H, W)`` sRGB (uint8, or float in [0, 1]) → CIE Lab, each channel standardised.

    Returns float32 ``(Lab - LAB_MEAN) / LAB_STD``: the numbers of kornia's ``rgb_to_lab``
    followed by the standardisation (to ~1e-5), in about a dozen whole-tensor passes instead of
    kornia's few dozen: 8-bit input is linearised by table lookup, the white point is folded
    into the XYZ matrix, the standardisation into the final 3 × 3 map, and CIE's piecewise
    ``f(t)`` is written as ``cbrt(max(t, t0)) + 7.787 * min(t - t0, 0)``. That is the same
    function because CIE chose the linear piece to meet the cube root at ``t0``
    (``cbrt(t0) - 7.787 * t0 = 4 / 29``, here to 2e-7). Runs in float32 under any autocast.
    """
    b, _, h, w = check_rgb(image).shape
    with torch.autocast(image.device.type, enabled=False):
        if image.dtype == torch.uint8:
            linear = _linear_of_uint8(image)
        else:
            linear = _srgb_to_linear(image.float())
        linear = linear.view(b, 3, h * w)
        t = torch.matmul(_TO_XYZ.to(linear), linear)  # XYZ / white, (B, 3, HW)
        below = (t - _CBRT_KNEE).clamp_(max=0.0)
        f = t.clamp_(min=_CBRT_KNEE).log_().mul_(1.0 / 3.0).exp_().add_(below, alpha=_CBRT_SLOPE)
        out = torch.baddbmm(_LAB_OFFSET.to(f)[None, :, None].expand(b, 3, h * w), _TO_LAB.to(f).expand(b, 3, 3), f)
    return out.view(b, 3, h, w)


class LabModality(Modality):
    """Views ``L`` (1 channel), ``ab`` (2 channels), ``rgb`` (3, ImageNet-normalised) and ``L_grey``
    (1 channel: ``L / 50 - 1`` in [-1, 1], luminance as the grey image a TF-Lite ImageNet network
    reads, whose inputs are ``(v * 255 - 127) / 128``, with ``L / 100`` for the grey value ``v``).

    The conversion (:func:`normalised_lab`) runs on the whole batch on the device and gives
    kornia's ``rgb_to_lab`` (L in [0, 100], a and b in about [-128, 127]) standardised by
    ``LAB_MEAN`` / ``LAB_STD``.
    """

    name = "lab"
    channels = {"L": 1, "ab": 2, "rgb": 3, "L_grey": 1}

    def __init__(self, teacher_view: str = "L", student_view: str = "ab") -> None:
        super().__init__(teacher_view, student_view)

    def compute(self, batch: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if names & {"L", "ab", "L_grey"}:
            lab = normalised_lab(batch["image"])
            out["L"], out["ab"] = lab[:, :1], lab[:, 1:]
            # standardised L back to [0, 100], then to [-1, 1]
            out["L_grey"] = out["L"] * (LAB_STD[0] / 50.0) + (LAB_MEAN[0] / 50.0 - 1.0)
        if "rgb" in names:
            out["rgb"] = normalize_rgb(image_as_float(batch))
        return {name: out[name] for name in names}
