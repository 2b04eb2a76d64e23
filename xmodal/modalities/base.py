"""The modality adapter: a whole batch on the device -> the views teachers and students see."""
from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import torch
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.models.efficientnet import LITE0_MEAN, LITE0_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: RGB normalisations a pretrained network may expect, as (mean, std) on RGB in [0, 1]:
#: torchvision / timm / smp ImageNet weights use ``imagenet``; the packaged TF-Lite weights of
#: ``efficientnet_lite0`` use ``lite0``, i.e. ``(rgb * 255 - 127) / 128``.
RGB_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "lite0": (LITE0_MEAN, LITE0_STD)}


class Modality:
    """Turns a batch into named views, e.g. ``{"L": ..., "ab": ...}`` for Lab.

    Subclasses declare ``channels`` (view name -> channel count) and implement
    :meth:`compute`. A run picks one view for the teacher and one for the student; ensembles
    may give each teacher its own view. The adapter runs on the device, on the whole batch,
    after the DataLoader: workers only decode.

    Args:
        teacher_view: view name the teacher sees.
        student_view: view name the student sees.
    """

    name: ClassVar[str] = ""
    channels: ClassVar[Mapping[str, int]] = {}

    def __init__(self, teacher_view: str, student_view: str) -> None:
        for role, view in (("teacher_view", teacher_view), ("student_view", student_view)):
            self._check_view(role, view)
        self.teacher_view, self.student_view = teacher_view, student_view

    def _check_view(self, role: str, view: str) -> None:
        if view not in self.channels:
            raise ConfigError(
                f"{role}={view!r} is not a view of modality {self.name!r}; expected one of {sorted(self.channels)}"
            )

    @property
    def teacher_channels(self) -> int:
        return self.channels[self.teacher_view]

    @property
    def student_channels(self) -> int:
        return self.channels[self.student_view]

    def compute(self, batch: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
        """The requested views of ``batch``, each ``(B, C_view, H, W)`` float."""
        raise NotImplementedError

    def check_pretrained(self, view: str, arch: str) -> None:
        """ConfigError when ``view`` is not normalised as ``arch``'s packaged pretrained weights
        expect; every view fits any weights unless a modality knows otherwise."""

    def views(self, batch: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
        """Views by name, each computed once even when several consumers ask for it."""
        for name in names:
            self._check_view("view", name)
        return self.compute(batch, set(names))

    def __call__(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(teacher_view, student_view)`` of ``batch``."""
        out = self.views(batch, [self.teacher_view, self.student_view])
        return out[self.teacher_view], out[self.student_view]


def check_rgb(image: Tensor) -> Tensor:
    """``image`` itself, once it is known to be a ``(B, 3, H, W)`` RGB batch (ValueError otherwise)."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"batch['image'] has shape {tuple(image.shape)}: expected (B, 3, H, W) RGB")
    return image


def image_as_float(batch: Mapping[str, Tensor]) -> Tensor:
    """``batch["image"]`` as float RGB in [0, 1], ``(B, 3, H, W)`` (uint8 input is divided by 255)."""
    image = check_rgb(batch["image"])
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


def rgb_norm_stats(norm: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the :data:`RGB_NORMS` entry ``norm``; ConfigError for an unknown name."""
    if norm not in RGB_NORMS:
        raise ConfigError(f"rgb_norm={norm!r}: expected one of {sorted(RGB_NORMS)}")
    return RGB_NORMS[norm]


def normalize_rgb(rgb: Tensor, norm: str = "imagenet") -> Tensor:
    """RGB in [0, 1] ``(B, 3, H, W)`` -> ``(rgb - mean) / std`` with the :data:`RGB_NORMS` entry ``norm``."""
    mean, std = (rgb.new_tensor(v)[None, :, None, None] for v in rgb_norm_stats(norm))
    return (rgb - mean) / std


def view_fn(modality: Modality, view: str) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``batch -> that batch's view`` for one consumer (a teacher or the student)."""
    return lambda batch: modality.views(batch, [view])[view]
