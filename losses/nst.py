"""NST: neuron selectivity transfer (Huang & Wang, 2017)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses._bases import MapPairsLoss
from losses._shapes import match_spatial
from losses.registry import register


def polynomial_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """``mean_{b, i, j} (a_{b,i} · b_{b,j})²`` for ``(B, C_a, N)`` and ``(B, C_b, N)`` vectors."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


@register("nst")
class NST(MapPairsLoss):
    """Neuron selectivity transfer: per layer, ``MMD²`` between the sets of channel activations.

    Each channel's spatial activation pattern ``(H·W,)`` is L2-normalised, the student's and the
    teacher's channels are treated as samples of two distributions, and the squared maximum
    mean discrepancy with the degree-2 polynomial kernel ``k(x, y) = (xᵀy)²`` is
    ``mean k(t, t) + mean k(s, s) - 2 mean k(s, t)``. The teacher-only term is a constant; it
    is kept (without gradient) so the loss is the full MMD², 0 when the sets coincide.

    Feature choice (reference): every stage output, ``maps[1:]``; the larger map of a pair is
    average-pooled to the smaller. Reference weight β = 50 (with γ = 1 CE, α = 0).
    No parameters; channel counts may differ.
    """

    default_weight = 50.0

    def pair_loss(self, layer: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t)
        s = F.normalize(f_s.flatten(2), dim=2)
        t = F.normalize(f_t.flatten(2), dim=2)
        return (
            polynomial_kernel_mean(t, t).detach()
            + polynomial_kernel_mean(s, s)
            - 2 * polynomial_kernel_mean(s, t)
        )
