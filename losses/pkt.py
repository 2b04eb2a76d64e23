"""PKT: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)."""
from __future__ import annotations

import torch
from torch import Tensor

from losses._bases import PooledLoss
from losses.registry import register


def cosine_conditional(f: Tensor, eps: float = 1e-7) -> Tensor:
    """``p(j | i) = K(i, j) / Σ_k K(i, k)``, cosine kernel ``K = (cos + 1) / 2``: ``(B, D) -> (B, B)``.

    The shifted cosine lies in ``[0, 1]``, so it can serve as an unnormalised affinity without
    a bandwidth to tune (the reason PKT prefers it to a Gaussian kernel).
    """
    unit = f / (f.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@register("pkt")
class PKT(PooledLoss):
    """``mean_{i,j} p_t(j|i) · log((p_t(j|i) + eps) / (p_s(j|i) + eps))``: KL of the teacher's
    conditional sample affinities to the student's, averaged over the ``B × B`` entries.

    Only cosine similarities within each network enter, so widths may differ.
    Feature choice (reference): ``pooled``. Reference weight β = 30000 (with γ = 1 CE, α = 0),
    ``eps = 1e-7``. No parameters.

    ``forward(f_s, f_t)`` takes ``(B, D_s)`` and ``(B, D_t)`` and returns a scalar.
    """

    default_weight = 30000.0

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        self.check_pooled(f_s, f_t)
        p_s = cosine_conditional(f_s, self.eps)
        p_t = cosine_conditional(f_t, self.eps)
        return torch.mean(p_t * torch.log((p_t + self.eps) / (p_s + self.eps)))
