"""KD: knowledge distillation from softened logits (Hinton, Vinyals, Dean, 2015)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from losses._shapes import check_ndim, check_same_batch, require
from losses.base import DistillLoss
from losses.features import Features
from losses.registry import register


@register("kd")
class KD(DistillLoss):
    """``T² · KL(p_t ‖ p_s)`` with ``p = softmax(logits / T)``, summed over classes, mean over the batch.

    The soft targets' gradient shrinks as ``1/T²`` (Hinton §2.1); the ``T²`` factor undoes that,
    so the weight needs no retuning when ``T`` changes: ``∂L/∂z_s = T (p_s - p_t) / B``.

    Reference (RepDistiller ``run_cifar_distill.sh``): ``T = 4`` and the student trains with
    ``0.1·CE + 0.9·KD``, i.e. γ = 0.1, α = 0.9. ``default_weight`` is that α; the loop owns γ.

    Inputs: ``logit_s``, ``logit_t`` of shape ``(B, num_classes)``; output: a scalar.

    Example:
        >>> import torch
        >>> KD(T=4)(torch.zeros(2, 10), torch.zeros(2, 10))
        tensor(0.)
    """

    default_weight = 0.9
    reads_logits = True

    def __init__(self, T: float = 4.0) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"KD temperature T must be > 0, got {T}")
        self.T = float(T)

    def forward(self, logit_s: Tensor, logit_t: Tensor) -> Tensor:
        check_ndim(logit_s, 2, "KD logit_s", "(B, num_classes)")
        check_ndim(logit_t, 2, "KD logit_t", "(B, num_classes)")
        if logit_s.shape != logit_t.shape:
            raise ValueError(
                f"KD: logit_s has shape {tuple(logit_s.shape)} but logit_t has "
                f"{tuple(logit_t.shape)}; expected the same batch size and number of classes"
            )
        log_p_s = F.log_softmax(logit_s / self.T, dim=1)
        # log-space target: exact where p_t underflows to 0 (0·log 0 handled without nan)
        log_p_t = F.log_softmax(logit_t / self.T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        return kl * self.T**2 / logit_s.shape[0]

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "KD":
        logit_s, logit_t = _logits(student, teacher)
        check_same_batch(logit_s, logit_t, "KD")
        if logit_s.shape[1:] != logit_t.shape[1:]:
            raise ValueError(
                f"KD: student has {logit_s.shape[1]} classes, teacher has {logit_t.shape[1]}; "
                "KD needs both classifiers over the same classes"
            )
        return cls(**options)

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        return self(*_logits(student, teacher))


def _logits(student: Features, teacher: Features) -> tuple[Tensor, Tensor]:
    why = "KD distils logits: give the network a classifier head"
    return require(student.logits, "student.logits", why), require(teacher.logits, "teacher.logits", why)
