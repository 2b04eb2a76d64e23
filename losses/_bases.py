"""Two shared shapes of baseline loss: one term per pair of stage maps, or one on pooled vectors.

They hold the plumbing (which features a loss reads, the shape guards, summing the per-layer
terms) so each loss file is left with its own mathematics.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

from torch import Tensor

from losses._shapes import check_map_pairs, check_ndim, check_same_batch
from losses.base import DistillLoss
from losses.features import Features


class MapPairsLoss(DistillLoss):
    """A loss summed over student/teacher feature-map pairs, one term per stage.

    Subclasses set :attr:`feature_name` and :meth:`select_maps` (which maps of
    :class:`Features` they read) and implement :meth:`pair_loss` (FSP, whose terms relate
    consecutive maps, overrides :meth:`layer_losses` instead). Those with one module per pair
    set ``self.num_pairs`` so a list of the wrong length is refused.
    """

    #: how the selected maps are named in error messages, e.g. ``"maps[1:]"``
    feature_name: ClassVar[str] = "maps[1:]"
    num_pairs: Optional[int] = None

    @staticmethod
    def select_maps(features: Features) -> list[Tensor]:
        """The maps this loss reads: by default every stage output, ``maps[1:]`` (no stem)."""
        return list(features.maps[1:])

    def pair_loss(self, layer: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        """The term for one pair: student ``(B, C_s, H_s, W_s)``, teacher ``(B, C_t, H_t, W_t)``."""
        raise NotImplementedError

    def check_pairs(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> None:
        check_map_pairs(g_s, g_t, type(self).__name__, self.num_pairs)

    def layer_losses(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> list[Tensor]:
        """One scalar per pair of maps (the reference's ``loss_group``)."""
        self.check_pairs(g_s, g_t)
        return [self.pair_loss(i, f_s, f_t) for i, (f_s, f_t) in enumerate(zip(g_s, g_t))]

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
        """Sum of :meth:`layer_losses` over two equally long lists of ``(B, C, H, W)`` maps."""
        return sum(self.layer_losses(g_s, g_t))

    @classmethod
    def selected_pairs(cls, student: Features, teacher: Features) -> tuple[list[Tensor], list[Tensor]]:
        """The selected maps of both networks, checked to pair up."""
        g_s, g_t = cls.select_maps(student), cls.select_maps(teacher)
        check_map_pairs(g_s, g_t, f"{cls.__name__} {cls.feature_name}")
        return g_s, g_t

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "MapPairsLoss":
        cls.selected_pairs(student, teacher)
        return cls(**options)

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return self(*self.selected_pairs(student, teacher))


class PooledLoss(DistillLoss):
    """A loss on the pooled embeddings ``(B, D_s)`` and ``(B, D_t)`` (RepDistiller's ``feat[-1]``)."""

    #: smallest batch for which the loss is defined (relations need at least two samples)
    min_batch: ClassVar[int] = 2

    def check_pooled(self, f_s: Tensor, f_t: Tensor) -> None:
        name = type(self).__name__
        check_ndim(f_s, 2, f"{name} f_s", "(B, D)")
        check_ndim(f_t, 2, f"{name} f_t", "(B, D)")
        check_same_batch(f_s, f_t, name)
        if f_s.shape[0] < self.min_batch:
            raise ValueError(
                f"{name}: batch size is {f_s.shape[0]}; expected at least {self.min_batch} "
                "samples, the loss compares samples with each other"
            )

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "PooledLoss":
        loss = cls(**options)
        loss.check_pooled(student.pooled, teacher.pooled)
        return loss

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return self(student.pooled, teacher.pooled)
