"""Lab colour space: the teacher sees luminance L, the student chrominance ab (CMC, CRD §4.3)."""
from __future__ import annotations

from typing import Mapping

import kornia
from torch import Tensor

from xmodal.modalities.base import Modality, image_as_float, normalize_rgb

# Per-channel mean and std of L, a, b, measured on 1,000 CIFAR-10 training images
# (L 50.2 / 24.3, a 0.1 / 9.5, b 5.9 / 15.5), rounded: each view enters the network with
# roughly zero mean and unit variance.
LAB_MEAN = (50.0, 0.0, 5.0)
LAB_STD = (25.0, 10.0, 15.0)


class LabModality(Modality):
    """Views ``L`` (1 channel), ``ab`` (2 channels) and ``rgb`` (3, ImageNet-normalised).

    The conversion is kornia's ``rgb_to_lab`` on the whole batch on the device; it expects RGB
    in [0, 1] and returns L in [0, 100] and a, b in about [-128, 127].
    """

    name = "lab"
    channels = {"L": 1, "ab": 2, "rgb": 3}

    def __init__(self, teacher_view: str = "L", student_view: str = "ab") -> None:
        super().__init__(teacher_view, student_view)

    def compute(self, batch: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
        rgb = image_as_float(batch)
        out: dict[str, Tensor] = {}
        if names & {"L", "ab"}:
            lab = kornia.color.rgb_to_lab(rgb)
            mean = lab.new_tensor(LAB_MEAN)[None, :, None, None]
            std = lab.new_tensor(LAB_STD)[None, :, None, None]
            lab = (lab - mean) / std
            out["L"], out["ab"] = lab[:, :1], lab[:, 1:]
        if "rgb" in names:
            out["rgb"] = normalize_rgb(rgb)
        return {name: out[name] for name in names}
