"""RKD: relational knowledge distillation, distance and angle (Park et al., CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._bases import PooledLoss
from losses.registry import register


def pairwise_distance(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances ``‖e_i - e_j‖`` of ``(B, D)`` rows, ``(B, B)``, zero on the diagonal.

    Built from the Gram matrix; the squared distance is clamped at ``eps`` before the square
    root, whose gradient is infinite at 0 (rounding can make it slightly negative, too).
    """
    squared_norm = e.pow(2).sum(dim=1)
    squared = (squared_norm.unsqueeze(1) + squared_norm.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    off_diagonal = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return squared.sqrt() * off_diagonal


def distance_potential(e: Tensor) -> Tensor:
    """``ψ_D(e_i, e_j) = ‖e_i - e_j‖ / μ``, ``μ`` the mean distance over pairs ``i ≠ j``: ``(B, B)``.

    Dividing by ``μ`` makes the potential blind to the scale of the embedding space, so a student
    is not asked to match the teacher's magnitudes.
    """
    d = pairwise_distance(e)
    batch = len(e)
    mean_distance = d.sum() / (batch * (batch - 1))
    return d / mean_distance


def angle_potential(e: Tensor) -> Tensor:
    """``ψ_A(e_i, e_j, e_k) = cos ∠(e_j - e_i, e_k - e_i)`` for all triplets, ``(B, B, B)``.

    Entries with ``j = i`` or ``k = i`` are 0 (the zero difference normalises to 0).
    """
    unit_differences = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return unit_differences @ unit_differences.transpose(1, 2)


@register("rkd")
class RKD(PooledLoss):
    """``w_D · Huber(ψ_D(s), ψ_D(t)) + w_A · Huber(ψ_A(s), ψ_A(t))``, each a mean over its entries.

    Student and teacher relations are compared, not the embeddings themselves, so the two
    may have different widths. The teacher's potentials carry no gradient.

    Feature choice (reference): ``pooled``. Reference weights: ``w_D = 25``, ``w_A = 50`` inside
    the loss and β = 1 outside (with γ = 1 CE, α = 0). No parameters.

    ``forward(f_s, f_t)`` takes ``(B, D_s)`` and ``(B, D_t)``, ``B ≥ 2``, and returns a scalar.
    Memory is ``O(B² · D + B³)`` for the angles (fine at the reference's ``B = 64``).
    """

    default_weight = 1.0

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        self.check_pooled(f_s, f_t)
        with torch.no_grad():
            distance_t, angle_t = distance_potential(f_t), angle_potential(f_t)
        loss_d = F.smooth_l1_loss(distance_potential(f_s), distance_t)
        loss_a = F.smooth_l1_loss(angle_potential(f_s), angle_t)
        return self.distance_weight * loss_d + self.angle_weight * loss_a
