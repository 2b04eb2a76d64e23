"""FitNet: regress the teacher's hint layer from the student's guided layer (Romero et al., 2015)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from losses._shapes import check_ndim, check_same_batch
from losses.base import DistillLoss
from losses.features import Features
from losses.registry import register


class ConvReg(nn.Module):
    """Convolutional regressor ``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)``: conv, BatchNorm, ReLU.

    The convolution is chosen by the spatial ratio, as in the reference: stride-2 3×3 when the
    student map is twice as large, stride-2 transposed 4×4 when it is half as large, otherwise a
    ``(1 + H_s - H_t) × (1 + W_s - W_t)`` valid convolution (1×1 for equal sizes).
    AB's connectors use it without the ReLU (``use_relu=False``).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        _, c_s, h_s, w_s = student_shape
        _, c_t, h_t, w_t = teacher_shape
        if (h_s, w_s) == (2 * h_t, 2 * w_t):
            self.conv: nn.Module = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif (2 * h_s, 2 * w_s) == (h_t, w_t):
            self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t and w_s >= w_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        else:
            raise ValueError(
                f"ConvReg: cannot map a student map of size {h_s}x{w_s} onto a teacher map of "
                f"{h_t}x{w_t}; expected the student map to be at least as large, or exactly half"
            )
        self.bn = nn.BatchNorm2d(c_t)
        self.act: nn.Module = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


@register("fitnet")
class FitNet(DistillLoss):
    """Hint loss: ``MSE(r(F_s), F_t)`` between the regressed student map and the teacher's hint.

    Feature choice (reference ``--hint_layer 2``): ``maps[hint_layer]`` of both networks, the
    output of the second stage. ``from_features`` builds the :class:`ConvReg` regressor ``r``
    from the two maps' shapes; it trains with the student. Its final ReLU suits post-ReLU hints
    (ResNets); ``use_relu=False`` drops it for a teacher whose hint map is a linear projection
    with negative values (EfficientNet's stages), which a ReLU output could never reach.

    Reference weight β = 100 (with γ = 1 CE, α = 0). The reference trains the regressor jointly
    with the student in a single stage (not FitNet's original two stages), and so does xmodal.

    ``forward(f_s, f_t)`` takes already-regressed ``(B, C_t, H_t, W_t)`` maps and returns a scalar.
    """

    default_weight = 100.0

    def __init__(self, regressor: Optional[nn.Module] = None, hint_layer: int = 2) -> None:
        super().__init__()
        self.regressor = regressor if regressor is not None else nn.Identity()
        self.hint_layer = hint_layer

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        if f_s.shape != f_t.shape:
            raise ValueError(
                f"FitNet: regressed student map has shape {tuple(f_s.shape)}, teacher hint has "
                f"{tuple(f_t.shape)}; expected equal shapes (build the loss with "
                "FitNet.from_features so it gets a regressor)"
            )
        return F.mse_loss(f_s, f_t)

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        hint_layer: int = 2,
        use_relu: bool = True,
        **options,
    ) -> "FitNet":
        f_s, f_t = _hints(student, teacher, hint_layer)
        return cls(regressor=ConvReg(f_s.shape, f_t.shape, use_relu=use_relu), hint_layer=hint_layer, **options)

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        f_s, f_t = _hints(student, teacher, self.hint_layer)
        return self(self.regressor(f_s), f_t)


def _hints(student: Features, teacher: Features, hint_layer: int) -> tuple[Tensor, Tensor]:
    """The guided student map and the teacher's hint map, both ``maps[hint_layer]``."""
    for who, feats in (("student", student), ("teacher", teacher)):
        if not -len(feats.maps) <= hint_layer < len(feats.maps):
            raise ValueError(
                f"FitNet: hint_layer={hint_layer} is out of range for the {who}'s "
                f"{len(feats.maps)} maps; expected 0 <= hint_layer < {len(feats.maps)}"
            )
    f_s, f_t = student.maps[hint_layer], teacher.maps[hint_layer]
    check_ndim(f_s, 4, "FitNet student hint map", "(B, C, H, W)")
    check_ndim(f_t, 4, "FitNet teacher hint map", "(B, C, H, W)")
    check_same_batch(f_s, f_t, "FitNet")
    return f_s, f_t
