"""AB: distillation of activation boundaries formed by hidden neurons (Heo et al., AAAI 2019)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from losses._bases import MapPairsLoss
from losses._shapes import graph_zero, require
from losses.features import Features
from losses.fitnet import ConvReg
from losses.registry import register


def activation_boundary_loss(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Summed alternative (hinge-squared) loss that puts each neuron on the teacher's side of 0.

    Per element: ``(s + m)²`` where the teacher is off (``t ≤ 0``) but the student is not below
    ``-m``; ``(s - m)²`` where the teacher is on (``t > 0``) but the student is not above ``m``;
    0 otherwise. The margin keeps student pre-activations clear of the boundary.
    ``source``, ``target``: equal shapes, typically ``(B, C, H, W)``; returns a scalar.
    """
    teacher_on = target > 0
    push_down = (source > -margin) & ~teacher_on
    push_up = (source <= margin) & teacher_on
    return ((source + margin).pow(2) * push_down + (source - margin).pow(2) * push_up).sum()


def _connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """Identity where ``(C, H, W)`` already agree, else a ReLU-free :class:`ConvReg`."""
    if tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
        return nn.Identity()
    return ConvReg(student_shape, teacher_shape, use_relu=False)


@register("abound")
class AB(MapPairsLoss):
    """Activation-boundary transfer, used (as in the reference) only to initialise the student.

    Loss: ``Σ_l w_l · activation_boundary_loss(r_l(S_l), T_l) / B · 3/1000``, with ``r_l`` a
    connector per stage (identity or conv + BN) and ``w_l = 2^(l - L + 1)``: the deepest
    stage weighs 1, each shallower one half the next. Margin ``m = 1``.

    Feature choice (reference): the pre-activation stage maps, ``preact_maps[1:]``.

    What the training loop must do (reference ``train_student.py`` / ``helper/pretrain.py``):

    1. First stage, ``init_stage_loss`` alone (no CE, no KD) for 30 epochs (``--init_epochs``),
       SGD lr 0.05, momentum 0.9, weight decay 5e-4, over the student's feature layers
       (classifier excluded) and this loss's connectors (``init_stage_trains_student``).
    2. Then ordinary training, γ = 1 CE (α = 0). AB adds no term there
       (``distill_after_init = False``): the loop skips it; ``forward_features`` returns a zero
       connected to the student's graph, so a loop that calls it anyway still works. The
       connectors are not used again. Reference β = 1 therefore has no effect.
    """

    default_weight = 1.0
    needs_init_stage = True
    init_stage_trains_student = True
    distill_after_init = False
    needs_preact = True
    feature_name = "preact_maps[1:]"

    def __init__(
        self,
        student_shapes: Sequence[Sequence[int]],
        teacher_shapes: Sequence[Sequence[int]],
        margin: float = 1.0,
    ) -> None:
        super().__init__()
        if len(student_shapes) != len(teacher_shapes):
            raise ValueError(
                f"AB: {len(student_shapes)} student shapes but {len(teacher_shapes)} teacher shapes; "
                "expected one per stage for both"
            )
        self.connectors = nn.ModuleList(_connector(s, t) for s, t in zip(student_shapes, teacher_shapes))
        self.num_pairs = len(self.connectors)
        self.layer_weights = [2.0 ** (i - self.num_pairs + 1) for i in range(self.num_pairs)]
        self.margin = margin

    @staticmethod
    def select_maps(features: Features) -> list[Tensor]:
        why = "AB compares pre-activation maps: the backbone must expose them"
        return list(require(features.preact_maps, "preact_maps", why)[1:])

    def pair_loss(self, layer: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        """``f_s``: the connected student map, same shape as the teacher's ``f_t``."""
        if f_s.shape != f_t.shape:
            raise ValueError(
                f"AB: connected student map {layer} has shape {tuple(f_s.shape)}, teacher's has "
                f"{tuple(f_t.shape)}; expected equal shapes (apply the connectors first)"
            )
        boundary = activation_boundary_loss(f_s, f_t, self.margin)
        return self.layer_weights[layer] * boundary / f_s.shape[0] * 3 / 1000

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "AB":
        g_s, g_t = cls.selected_pairs(student, teacher)
        return cls([tuple(f.shape) for f in g_s], [tuple(f.shape) for f in g_t], **options)

    def init_stage_loss(self, student: Features, teacher: Features) -> Tensor:
        g_s, g_t = self.selected_pairs(student, teacher)
        self.check_pairs(g_s, g_t)
        return self([connect(f_s) for connect, f_s in zip(self.connectors, g_s)], g_t)

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return graph_zero(student.pooled)
