"""RGB -> edges: the teacher sees the colour image, the student only where its luminance changes.

A modality pair judged by classification like Lab, added as this file and one recipe
(``rgb-edges``): the student must recognise objects from their outlines, with neither colour
nor shading, and a teacher that saw both tells it what matters.
"""
from __future__ import annotations

from typing import Mapping

import kornia
from torch import Tensor

from xmodal.modalities.base import Modality, image_as_float, normalize_rgb

#: Mean and standard deviation of the Sobel magnitude over CIFAR-10 test images (32 px), which put
#: the edge view on about the scale of the standardised RGB view; tests/xmodal/test_modality_pairs.py
#: recomputes them from the JPEG files.
EDGE_MEAN, EDGE_STD = 0.069, 0.072


class EdgesModality(Modality):
    """Views ``rgb`` (ImageNet-normalised, 3 channels) and ``edges`` (1 channel): the Sobel
    gradient magnitude of the image's luminance (ITU-R 601), standardised by fixed constants so
    a sample's view never depends on the rest of its batch."""

    name = "edges"
    channels = {"rgb": 3, "edges": 1}

    def __init__(self, teacher_view: str = "rgb", student_view: str = "edges") -> None:
        super().__init__(teacher_view, student_view)

    def compute(self, batch: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
        rgb = image_as_float(batch)
        out: dict[str, Tensor] = {}
        if "rgb" in names:
            out["rgb"] = normalize_rgb(rgb)
        if "edges" in names:
            out["edges"] = (kornia.filters.sobel(kornia.color.rgb_to_grayscale(rgb)) - EDGE_MEAN) / EDGE_STD
        return out
