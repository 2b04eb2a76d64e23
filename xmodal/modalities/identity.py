"""One view for everyone: model compression and same-modality ensembles."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from xmodal.modalities.base import Modality, image_as_float, normalize_rgb


class IdentityModality(Modality):
    """The same ImageNet-normalised RGB tensor for teacher and student (view ``rgb``)."""

    name = "identity"
    channels = {"rgb": 3}

    def __init__(self, teacher_view: str = "rgb", student_view: str = "rgb") -> None:
        super().__init__(teacher_view, student_view)

    def compute(self, batch: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
        return {"rgb": normalize_rgb(image_as_float(batch))}
