"""CC: correlation congruence (Peng et al., ICCV 2019), as distributed with RepDistiller."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from losses._bases import PooledLoss
from losses.features import Features
from losses.registry import register


@register("cc")
class CC(PooledLoss):
    """Correlation congruence on linear embeddings of the pooled features.

    With ``δ_i = |f_s,i - f_t,i|`` (element-wise, ``(B, D)``), the loss is
    ``mean_i Σ_d δ_i,d · δ_{i+1},d`` over the ``B - 1`` neighbouring pairs of the batch: the
    author's code (which RepDistiller ships) correlates consecutive samples only, not the
    paper's full kernel matrix; xmodal keeps the code's definition.

    Feature choice (reference): ``pooled`` of both networks, each through its own trainable
    ``Linear(D, feat_dim)`` embedding (``feat_dim = 128``) so different widths meet in one space.
    Both embeddings train with the student (the teacher network itself stays frozen).

    Reference weight β = 0.02 (with γ = 1 CE, α = 0).

    ``forward(f_s, f_t)`` takes already-embedded ``(B, D)`` vectors and returns a scalar.
    """

    default_weight = 0.02

    def __init__(
        self, student_dim: Optional[int] = None, teacher_dim: Optional[int] = None, feat_dim: int = 128
    ) -> None:
        super().__init__()
        # without dimensions the loss compares the pooled features directly (equal widths)
        self.embed_s: nn.Module = nn.Linear(student_dim, feat_dim) if student_dim else nn.Identity()
        self.embed_t: nn.Module = nn.Linear(teacher_dim, feat_dim) if teacher_dim else nn.Identity()

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        self.check_pooled(f_s, f_t)
        if f_s.shape != f_t.shape:
            raise ValueError(
                f"CC: f_s has shape {tuple(f_s.shape)}, f_t has {tuple(f_t.shape)}; expected equal "
                "shapes (build with CC.from_features to embed different widths)"
            )
        delta = (f_s - f_t).abs()
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        feat_dim: int = 128,
        **options,
    ) -> "CC":
        loss = cls(student.pooled.shape[-1], teacher.pooled.shape[-1], feat_dim=feat_dim, **options)
        loss.check_pooled(student.pooled, teacher.pooled)
        return loss

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        self.check_pooled(student.pooled, teacher.pooled)
        return self(self.embed_s(student.pooled), self.embed_t(teacher.pooled))
