"""FSP: flow of solution procedure matrices (Yim et al., CVPR 2017)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from losses._bases import MapPairsLoss
from losses._shapes import graph_zero, match_spatial
from losses.features import Features
from losses.registry import register


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """``G_ij = mean_p top_i(p) · bottom_j(p)`` for two maps of one network: ``(B, C_top, C_bot)``.

    ``bottom`` ``(B, C_bot, H, W)`` and ``top`` ``(B, C_top, H', W')``; the larger map is
    average-pooled to the smaller, as the reference does for consecutive stages of different size.
    """
    bottom, top = match_spatial(bottom, top)
    positions = bottom.shape[2] * bottom.shape[3]
    return top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / positions


def fsp_matrices(maps: Sequence[Tensor]) -> list[Tensor]:
    """FSP matrices of every consecutive pair ``(maps[i], maps[i + 1])``."""
    return [fsp_matrix(bottom, top) for bottom, top in zip(maps[:-1], maps[1:])]


@register("fsp")
class FSP(MapPairsLoss):
    """``Σ_i mean((G_s,i - G_t,i)²)`` over the FSP matrices of consecutive maps, used (as in the
    reference) only to initialise the student.

    Feature choice (reference): all maps, stem included (``maps``); the matrix of each
    consecutive pair is taken after pooling the larger map to the smaller. The matrices must
    have equal shapes, so student and teacher need the same channel count at every map
    (e.g. resnet56 -> resnet20); ``from_features`` refuses other pairs. No parameters.

    What the training loop must do (reference ``train_student.py`` / ``helper/pretrain.py``):

    1. First stage, ``init_stage_loss`` alone (no CE, no KD) for 30 epochs (``--init_epochs``),
       SGD lr 0.05, momentum 0.9, weight decay 5e-4, over the student's feature layers
       (classifier excluded; ``init_stage_trains_student``).
    2. Then ordinary training, γ = 1 CE (α = 0). FSP adds no term there
       (``distill_after_init = False``): the loop skips it; ``forward_features`` returns a zero
       connected to the student's graph. Reference β = 50 therefore has no effect.

    ``forward(g_s, g_t)`` takes the two networks' full lists of ``(B, C, H, W)`` maps.
    """

    default_weight = 50.0
    needs_init_stage = True
    init_stage_trains_student = True
    distill_after_init = False
    feature_name = "maps"

    def __init__(self, channels: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.channels = None if channels is None else list(channels)
        self.num_pairs = None if channels is None else len(self.channels)

    @staticmethod
    def select_maps(features: Features) -> list[Tensor]:
        return list(features.maps)

    def check_pairs(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> None:
        super().check_pairs(g_s, g_t)
        if len(g_s) < 2:
            raise ValueError(f"FSP: got {len(g_s)} map; expected at least 2 (FSP relates consecutive maps)")
        c_s, c_t = [f.shape[1] for f in g_s], [f.shape[1] for f in g_t]
        if c_s != c_t:
            raise ValueError(
                f"FSP: student map channels {c_s} differ from teacher map channels {c_t}; FSP "
                "matrices are only comparable between networks of equal widths"
            )
        if self.channels is not None and c_s != self.channels:
            raise ValueError(f"FSP: map channels {c_s}, but the loss was built for {self.channels}")

    def layer_losses(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> list[Tensor]:
        """One term per consecutive pair of maps (``len(g_s) - 1`` terms)."""
        self.check_pairs(g_s, g_t)
        return [(s - t).pow(2).mean() for s, t in zip(fsp_matrices(g_s), fsp_matrices(g_t))]

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "FSP":
        g_s, g_t = cls.selected_pairs(student, teacher)
        loss = cls([f.shape[1] for f in g_s], **options)
        loss.check_pairs(g_s, g_t)
        return loss

    def init_stage_loss(self, student: Features, teacher: Features) -> Tensor:
        return self(*self.selected_pairs(student, teacher))

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return graph_zero(student.pooled)
