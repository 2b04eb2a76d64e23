"""FT: factor transfer, paraphraser and translator (Kim, Park, Kwak, NeurIPS 2018)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses._shapes import check_ndim, check_same_batch, match_spatial, require
from losses.at import attention_map
from losses.base import DistillLoss
from losses.features import Features
from losses.registry import register


def _conv_stack(channels: list[int], use_bn: bool, transpose: bool = False) -> nn.Sequential:
    """3×3 stride-1 (transposed) convolutions between ``channels``, each followed by [BN,] LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        norm = nn.BatchNorm2d(c_out) if use_bn else nn.Identity()
        layers += [conv(c_in, c_out, 3, 1, 1), norm, nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Teacher-side autoencoder: ``(B, C_t, H, W)`` -> factor ``(B, ⌊k·C_t⌋, H, W)`` -> reconstruction.

    Trained alone, by reconstruction, before distillation; its encoder output is the teacher
    factor the student must match. Rate ``k = 0.5`` and no BatchNorm, as the reference.
    """

    def __init__(self, channels: int, rate: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        factor = int(channels * rate)
        self.encoder = _conv_stack([channels, channels, factor, factor], use_bn)
        self.decoder = _conv_stack([factor, factor, channels, channels], use_bn, transpose=True)

    def forward(self, f_t: Tensor) -> tuple[Tensor, Tensor]:
        """``(factor, reconstruction)`` of a teacher map."""
        factor = self.encoder(f_t)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Student-side encoder into the teacher's factor space: ``(B, C_s, H, W) -> (B, ⌊k·C_t⌋, H, W)``.

    Same layout as the paraphraser's encoder, with BatchNorm (as the reference).
    """

    def __init__(
        self, student_channels: int, teacher_channels: int, rate: float = 0.5, use_bn: bool = True
    ) -> None:
        super().__init__()
        factor = int(teacher_channels * rate)
        self.encoder = _conv_stack([student_channels, student_channels, factor, factor], use_bn)

    def forward(self, f_s: Tensor) -> Tensor:
        return self.encoder(f_s)


@register("ft")
class FT(DistillLoss):
    """Factor transfer: ``mean |F_s - F_t|^p2`` of the normalised factors ``F = Q(factor, p1)``.

    ``Q`` is AT's :func:`~losses.at.attention_map` applied to the factors: the translator's
    output for the student, the paraphraser's encoder output for the teacher (the larger factor
    map is average-pooled to the smaller). ``p1 = 2``, ``p2 = 1`` (L1), rate ``k = 0.5``.

    Feature choice (reference): the last stage's output, ``maps[-1]``, of both networks.

    What the training loop must do (reference ``train_student.py`` / ``helper/pretrain.py``):

    1. First stage, ``init_stage_loss`` = ``MSE(paraphraser(T), T)`` for 30 epochs
       (``--init_epochs``), training only the paraphraser (``paraphraser.parameters()``; the
       student is not touched, ``init_stage_trains_student = False``), SGD lr 0.01 for
       ResNet / WRN students (the main lr otherwise), momentum 0.9, weight decay 5e-4.
    2. Then distillation, γ = 1 CE + β = 200 · FT (α = 0): the translator trains with the
       student; the paraphraser is frozen — ``forward_features`` runs it without gradient.
    """

    default_weight = 200.0
    needs_init_stage = True
    init_stage_trains_student = False

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        p1: float = 2.0,
        p2: float = 1.0,
        rate: float = 0.5,
    ) -> None:
        super().__init__()
        self.paraphraser = Paraphraser(teacher_channels, rate)
        self.translator = Translator(student_channels, teacher_channels, rate)
        self.p1, self.p2 = p1, p2

    def forward(self, factor_s: Tensor, factor_t: Tensor) -> Tensor:
        """Loss between a translated student factor and a paraphrased teacher factor, ``(B, C, H, W)``."""
        check_ndim(factor_s, 4, "FT factor_s", "(B, C, H, W)")
        check_ndim(factor_t, 4, "FT factor_t", "(B, C, H, W)")
        check_same_batch(factor_s, factor_t, "FT")
        factor_s, factor_t = match_spatial(factor_s, factor_t)
        # abs() first: the same as the reference for p2 in {1, 2}, and a distance for any p2
        difference = attention_map(factor_s, self.p1) - attention_map(factor_t, self.p1)
        return difference.abs().pow(self.p2).mean()

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "FT":
        f_s, f_t = _last_maps(student, teacher)
        return cls(f_s.shape[1], f_t.shape[1], **options)

    def init_stage_loss(self, student: Optional[Features], teacher: Features) -> Tensor:
        """Reconstruction error of the paraphraser on the teacher's ``maps[-1]`` (student unused)."""
        f_t = teacher.maps[-1]
        self._check_channels(f_t, self.paraphraser.encoder[0], "teacher")
        _, reconstruction = self.paraphraser(f_t)
        return F.mse_loss(reconstruction, f_t)

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        f_s, f_t = _last_maps(student, teacher)
        self._check_channels(f_s, self.translator.encoder[0], "student")
        self._check_channels(f_t, self.paraphraser.encoder[0], "teacher")
        with torch.no_grad():  # the paraphraser was fitted in the first stage and stays fixed
            factor_t = self.paraphraser.encoder(f_t)
        return self(self.translator(f_s), factor_t)

    @staticmethod
    def _check_channels(f: Tensor, first_conv: nn.Conv2d, who: str) -> None:
        check_ndim(f, 4, f"FT {who} maps[-1]", "(B, C, H, W)")
        if f.shape[1] != first_conv.in_channels:
            raise ValueError(
                f"FT: {who} maps[-1] has {f.shape[1]} channels, but the loss was built for "
                f"{first_conv.in_channels}"
            )


def _last_maps(student: Features, teacher: Features) -> tuple[Tensor, Tensor]:
    why = "FT reads the last stage map"
    f_s = require(student.maps[-1] if student.maps else None, "student.maps[-1]", why)
    f_t = require(teacher.maps[-1] if teacher.maps else None, "teacher.maps[-1]", why)
    check_ndim(f_s, 4, "FT student maps[-1]", "(B, C, H, W)")
    check_ndim(f_t, 4, "FT teacher maps[-1]", "(B, C, H, W)")
    check_same_batch(f_s, f_t, "FT")
    return f_s, f_t
