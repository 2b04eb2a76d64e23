"""The one structure every network hands to the distillation losses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class Features:
    """What a backbone exposes to distillation criteria.

    The layout follows RepDistiller's ``is_feat=True`` list, so the reference's layer choices
    (FitNet's ``hint_layer=2``, AT on ``maps[1:]``, SP on ``maps[-1]``) carry over unchanged.

    Attributes:
        maps: intermediate feature maps, shallow to deep: ``maps[0]`` is the stem's output, then
            one map per stage, each ``(B, C_i, H_i, W_i)``, after the stage's activation.
        pooled: ``(B, D)`` global average of the last map, the embedding before the classifier.
        logits: ``(B, num_classes)``, or ``None`` for a backbone without a classifier.
        preact_maps: the same maps taken before each stage's final ReLU (needed by AB), or
            ``None`` when the backbone cannot provide them.
    """

    maps: list[Tensor]
    pooled: Tensor
    logits: Optional[Tensor] = None
    preact_maps: Optional[list[Tensor]] = None

    def detach(self) -> "Features":
        """A copy whose tensors carry no autograd history (for frozen teachers)."""
        return Features(
            maps=[m.detach() for m in self.maps],
            pooled=self.pooled.detach(),
            logits=None if self.logits is None else self.logits.detach(),
            preact_maps=None if self.preact_maps is None else [m.detach() for m in self.preact_maps],
        )
