"""RGB-D: the teacher sees RGB, the student a depth encoding (NYU-Depth-V2, CRD §4.3)."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.modalities.base import Modality, image_as_float, normalize_rgb, rgb_norm_stats

ENCODINGS = ("log", "inverse", "linear")
# Indoor Kinect depth lies in about [0.5, 10] m. Each encoding maps that range to roughly
# [-1.7, 1.7] (zero mean, unit variance for depths spread evenly in the encoded space).
_RANGE = (0.5, 10.0)


def encode_depth(depth: Tensor, encoding: str = "log") -> Tensor:
    """Depth in metres ``(B, 1, H, W)`` (0 = missing) -> a normalised single-channel image.

    ``log`` (default): equal steps for equal depth ratios, so a chair at 1 m and a wall at 4 m
    are as distinct as at 2 m and 8 m; near structure, where indoor objects are, keeps its
    detail and far noise is compressed. ``inverse`` (disparity, what a stereo camera measures)
    stresses near structure even more. ``linear`` is metres, rescaled. Missing pixels become 0,
    the encoding's mean, so they carry no fake geometry.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"depth encoding {encoding!r}: expected one of {ENCODINGS}")
    valid = depth > 0
    d = depth.clamp(*_RANGE)
    if encoding == "log":
        lo, hi, x = math.log(_RANGE[0]), math.log(_RANGE[1]), d.log()
    elif encoding == "inverse":
        lo, hi, x = 1 / _RANGE[1], 1 / _RANGE[0], d.reciprocal()
    else:
        lo, hi, x = _RANGE[0], _RANGE[1], d
    # A uniform variable on [lo, hi] has std (hi - lo) / sqrt(12).
    x = (x - (lo + hi) / 2) / ((hi - lo) / math.sqrt(12))
    return torch.where(valid, x, torch.zeros_like(x))


#: What each packaged pretrained network's weights expect as RGB input (``rgb_norm``); others: ImageNet's.
TEACHER_RGB_NORM = {"efficientnet_lite0": "lite0"}


class DepthModality(Modality):
    """Views ``rgb`` (3 channels, normalised as the teacher's weights expect: ``rgb_norm``) and
    ``depth`` (1 channel, encoded)."""

    name = "depth"
    channels = {"rgb": 3, "depth": 1}

    def __init__(self, teacher_view: str = "rgb", student_view: str = "depth", encoding: str = "log",
                 rgb_norm: str = "imagenet") -> None:
        super().__init__(teacher_view, student_view)
        if encoding not in ENCODINGS:
            raise ValueError(f"depth encoding {encoding!r}: expected one of {ENCODINGS}")
        rgb_norm_stats(rgb_norm)  # an unknown name fails here, not at the first batch
        self.encoding, self.rgb_norm = encoding, rgb_norm

    def check_pretrained(self, view: str, arch: str) -> None:
        expected = TEACHER_RGB_NORM.get(arch, "imagenet")
        if view == "rgb" and self.rgb_norm != expected:
            raise ConfigError(f"modality.options.rgb_norm={self.rgb_norm!r}, but the pretrained weights of teacher "
                              f"{arch!r} expect {expected!r} input normalisation")

    def compute(self, batch: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "rgb" in names:
            out["rgb"] = normalize_rgb(image_as_float(batch), self.rgb_norm)
        if "depth" in names:
            depth = batch["depth"].float()
            if depth.dim() != 4 or depth.shape[1] != 1:
                raise ValueError(f"batch['depth'] has shape {tuple(depth.shape)}: expected (B, 1, H, W) metres")
            out["depth"] = encode_depth(depth, self.encoding)
        return out
