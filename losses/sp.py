"""SP: similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses._bases import MapPairsLoss
from losses.features import Features
from losses.registry import register


def similarity_matrix(f: Tensor) -> Tensor:
    """Row-normalised batch Gram matrix ``G̃ = normalize_rows(Q Qᵀ)``: ``(B, *) -> (B, B)``.

    ``Q`` is ``f`` flattened per sample, so networks of any width give the same ``B × B`` shape.
    """
    q = f.flatten(1)
    return F.normalize(q @ q.t(), dim=1)


@register("sp")
class SP(MapPairsLoss):
    """Similarity preserving: ``Σ_layers ‖G̃_t - G̃_s‖_F² / B²``.

    Feature choice (reference): the last stage's output, ``maps[-1]``.
    Reference weight β = 3000 (with γ = 1 CE, α = 0). No parameters.

    ``forward(g_s, g_t)`` takes two equally long lists of ``(B, C, H, W)`` maps (shapes may
    differ between student and teacher) and returns a scalar.
    """

    default_weight = 3000.0
    feature_name = "maps[-1]"

    @staticmethod
    def select_maps(features: Features) -> list[Tensor]:
        return list(features.maps[-1:])

    def pair_loss(self, layer: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        batch = f_s.shape[0]
        return (similarity_matrix(f_t) - similarity_matrix(f_s)).pow(2).sum() / batch**2
