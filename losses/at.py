"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses._bases import MapPairsLoss
from losses._shapes import match_spatial
from losses.registry import register


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention ``Q = vec(mean_c f^p) / ‖vec(mean_c f^p)‖₂``: ``(B, C, H, W) -> (B, H·W)``.

    Averaging over channels makes maps of networks of different widths comparable; the L2
    normalisation makes the loss blind to the overall activation scale. FT reuses it for factors.
    """
    return F.normalize(f.pow(p).mean(dim=1).flatten(1), dim=1)


@register("at")
class AT(MapPairsLoss):
    """Attention transfer: ``Σ_layers mean((Q_s - Q_t)²)`` over batch and positions.

    Feature choice (reference): every stage output, ``maps[1:]`` (the stem is left out). Where a
    student and a teacher map differ in size the larger is average-pooled to the smaller.

    Reference: ``p = 2``, weight β = 1000 (with γ = 1 CE, α = 0). No parameters.

    ``forward(g_s, g_t)`` takes two equally long lists of ``(B, C, H, W)`` maps (channel counts
    may differ) and returns a scalar; ``layer_losses`` gives the per-layer terms.

    Example:
        >>> import torch
        >>> student_maps, teacher_maps = [torch.rand(2, 16, 8, 8)], [torch.rand(2, 64, 4, 4)]
        >>> AT()(student_maps, teacher_maps).shape
        torch.Size([])
    """

    default_weight = 1000.0

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def pair_loss(self, layer: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t)
        return (attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean()
