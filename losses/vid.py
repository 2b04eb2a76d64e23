"""VID: variational information distillation (Ahn et al., CVPR 2019)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses._bases import MapPairsLoss
from losses._shapes import match_spatial
from losses.features import Features
from losses.registry import register


class VariationalHead(nn.Module):
    """Gaussian ``q(t | s) = N(μ(s), diag σ²)`` of one teacher map given the student's map.

    ``μ``: three 1×1 convolutions without bias (ReLU between them), ``C_s -> C_mid -> C_mid -> C_t``;
    ``σ²_c = softplus(α_c) + eps``, one variance per teacher channel, initialised to
    ``init_pred_var`` (softplus keeps it positive; ``eps`` keeps it off zero).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
        )
        # inverse softplus, so that the initial variance is exactly init_pred_var
        alpha = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((out_channels,), alpha))
        self.eps = eps

    def pred_var(self) -> Tensor:
        """``σ²``, shape ``(C_t,)``."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``f_t`` under ``q(· | f_s)``, up to ``log 2π / 2``."""
        f_s, f_t = match_spatial(f_s, f_t)
        mean = self.regressor(f_s)
        var = self.pred_var().view(1, -1, 1, 1)
        return (0.5 * ((mean - f_t).pow(2) / var + var.log())).mean()


@register("vid")
class VID(MapPairsLoss):
    """Variational information distillation: ``Σ_layers mean(-log q(F_t | F_s))``.

    Maximising this variational lower bound on the mutual information ``I(t; s)`` asks the student
    map to predict the teacher's. One :class:`VariationalHead` per stage (``C_mid = C_t``, as
    the reference); the heads train with the student.

    Feature choice (reference): every stage output, ``maps[1:]``; the larger map of a pair is
    average-pooled to the smaller. Reference weight β = 1 (with γ = 1 CE, α = 0),
    ``init_pred_var = 5``, ``eps = 1e-5``.

    ``forward(g_s, g_t)`` takes equally long lists of ``(B, C, H, W)`` maps whose channel counts
    are the ones the loss was built for, and returns a scalar.
    """

    default_weight = 1.0

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        mid_channels: Optional[Sequence[int]] = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"VID: student_channels {list(student_channels)} and teacher_channels "
                f"{list(teacher_channels)} must be equally long (one entry per stage)"
            )
        mid_channels = teacher_channels if mid_channels is None else mid_channels
        self.heads = nn.ModuleList(
            VariationalHead(c_s, c_mid, c_t, init_pred_var, eps)
            for c_s, c_mid, c_t in zip(student_channels, mid_channels, teacher_channels)
        )
        self.num_pairs = len(self.heads)

    def check_pairs(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> None:
        super().check_pairs(g_s, g_t)
        for i, (f_s, f_t, head) in enumerate(zip(g_s, g_t, self.heads)):
            built = (head.regressor[0].in_channels, head.regressor[-1].out_channels)
            if (f_s.shape[1], f_t.shape[1]) != built:
                raise ValueError(
                    f"VID: map pair {i} has (student, teacher) channels {(f_s.shape[1], f_t.shape[1])}, "
                    f"but the loss was built for {built}"
                )

    def pair_loss(self, layer: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return self.heads[layer](f_s, f_t)

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "VID":
        g_s, g_t = cls.selected_pairs(student, teacher)
        return cls([f.shape[1] for f in g_s], [f.shape[1] for f in g_t], **options)
