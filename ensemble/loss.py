"""The ensemble objective: ``γ·CE + Σ_i w_i·CRD(S, T_i) + α·KD(S, mean_i softmax(T_i / T))``.

Every term is returned, already weighted, under its own name (``ce``, ``crd_0`` ... ``crd_{M-1}``,
``kd``) next to their sum ``loss``, so a training loop logs each teacher's critic separately.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ensemble.critics import CriticEnsemble, Weights, per_teacher_weights
from losses.features import Features
from losses.kd import KD


def averaged_soft_logits(logits: Sequence[Tensor], T: float) -> Tensor:
    """Logits ``z`` whose softmax at temperature ``T`` is the teachers' averaged soft labels.

    ``z = T · log(mean_i softmax(z_i / T))`` gives ``softmax(z / T) = mean_i softmax(z_i / T)``,
    so :class:`losses.KD` fed ``z`` computes ``T² · KL(mean_i p_i ‖ p_s)``: KD from the averaged
    ensemble without a second KD implementation. Computed in log space (float32).

    Args:
        logits: M tensors ``(B, C)``, one per teacher.
        T: the KD temperature.

    Returns:
        ``(B, C)``.
    """
    if not logits:
        raise ValueError("logits is empty: averaging soft labels needs at least one teacher")
    log_p = torch.stack([F.log_softmax(z.float() / T, dim=1) for z in logits])
    return T * (torch.logsumexp(log_p, dim=0) - math.log(len(logits)))


def _check_teachers(student: Features, teachers: Sequence[Features], num_classes: Optional[int], kd: bool) -> None:
    if not teachers:
        raise ValueError("the teacher list is empty: ensemble distillation needs at least one teacher")
    for i, teacher in enumerate(teachers):
        classes = None if teacher.logits is None else teacher.logits.shape[1]
        if num_classes is not None and classes is not None and classes != num_classes:
            raise ValueError(f"teacher {i} has {classes} classes but the data has {num_classes}: "
                             "every teacher must classify the data's classes")
        if kd and classes is None:
            raise ValueError(f"teacher {i} has no classifier: KD from the averaged ensemble needs every teacher's logits")
    if kd and (student.logits is None or student.logits.shape[1] != teachers[0].logits.shape[1]):
        got = None if student.logits is None else student.logits.shape[1]
        raise ValueError(f"the student has {got} classes, the teachers {teachers[0].logits.shape[1]}: "
                         "KD needs a student classifier over the teachers' classes")


class EnsembleDistillLoss(nn.Module):
    """``γ·CE(y, S) + Σ_i w_i·crd_i + α·KD`` for one student and M teachers.

    Args:
        critics: the M CRD critics, or ``None`` for no contrastive term (CE, KD baselines).
        n_teachers: M (checked against the features given at each call).
        ce_weight: γ (1 in the paper's CRD runs, 0.1 in its KD runs).
        kd_weight: α on KD from the averaged soft labels (0: off).
        kd_T: the KD temperature (paper: 4).

    Call: ``loss(student, teachers, index, labels)`` with :class:`losses.Features` of the student
    and of each of the M teachers, ``index`` ``(B,)`` bank rows and ``labels`` ``(B,)`` classes
    -> ``{"loss", "ce", "crd_0", ..., "kd"}``, each term weighted; ``loss`` is their sum.
    """

    def __init__(self, critics: Optional[CriticEnsemble], n_teachers: int, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, kd_T: float = 4.0) -> None:
        super().__init__()
        if n_teachers < 0 or (critics is not None and critics.n_teachers != n_teachers):
            raise ValueError(f"n_teachers={n_teachers} does not match the {critics.n_teachers if critics else 0} critics")
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value}: expected a finite, non-negative weight")
        if kd_weight and n_teachers == 0:
            raise ValueError("kd_weight > 0 but there are no teachers to distil from")
        self.critics = critics
        self.n_teachers = n_teachers
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.kd = KD(kd_T)

    @classmethod
    def from_features(cls, student: Features, teachers: Sequence[Features], *, n_data: int,
                      num_classes: Optional[int] = None, crd_weights: Weights = 0.0, ce_weight: float = 1.0,
                      kd_weight: float = 0.0, kd_T: float = 4.0, seed: int = 0, **crd_options) -> "EnsembleDistillLoss":
        """Build the loss for these networks from one batch of their features.

        ``crd_weights`` is ``w_i`` per teacher or one number for all; all zero builds no
        critics. ``num_classes`` is the data's class count: a teacher that classifies another
        number of classes is refused. ``crd_options`` go to every :class:`losses.CRDLoss`.
        """
        _check_teachers(student, teachers, num_classes, kd=kd_weight > 0)
        critics = None
        if any(per_teacher_weights(crd_weights, len(teachers))):
            critics = CriticEnsemble(student.pooled.shape[1], [t.pooled.shape[1] for t in teachers], n_data,
                                     weights=crd_weights, seed=seed, **crd_options)
        return cls(critics, len(teachers), ce_weight, kd_weight, kd_T)

    def forward(self, student: Features, teachers: Sequence[Features], index: Tensor,
                labels: Optional[Tensor]) -> dict[str, Tensor]:
        if len(teachers) != self.n_teachers:
            raise ValueError(f"got {len(teachers)} teachers' features, expected {self.n_teachers}")
        terms: dict[str, Tensor] = {}
        if self.ce_weight:
            if labels is None or student.logits is None:
                raise ValueError("ce_weight > 0 needs labels and a student classifier")
            terms["ce"] = self.ce_weight * F.cross_entropy(student.logits, labels)
        if self.critics is not None:
            _, per_critic = self.critics(student.pooled, [t.pooled for t in teachers], index, labels=labels)
            for i, (w, crd) in enumerate(zip(self.critics.weights, per_critic)):
                terms[f"crd_{i}"] = w * crd
        if self.kd_weight:
            target = averaged_soft_logits([t.logits for t in teachers], self.kd.T)
            terms["kd"] = self.kd_weight * self.kd(student.logits, target)
        total = sum(terms.values()) if terms else student.pooled.sum() * 0.0
        return {"loss": total, **terms}


class EnsembleDistiller(nn.Module):
    """The student and its ensemble loss in one module, so DDP synchronises both.

    ``forward(student_input, teachers, index, labels)`` runs the student on its view and returns
    the loss terms (see :class:`EnsembleDistillLoss`). Teachers stay outside: they are frozen
    and their features are computed by the caller, each on its own view.
    """

    def __init__(self, student: nn.Module, loss: EnsembleDistillLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(self, student_input: Tensor, teachers: Sequence[Features], index: Tensor,
                labels: Optional[Tensor]) -> dict[str, Tensor]:
        return self.loss(self.student(student_input), teachers, index, labels)

    @torch.no_grad()
    def warm_start(self, student_input: Tensor, teachers: Sequence[Features], index: Tensor) -> None:
        """Fill every critic's banks from one batch (student in eval mode); no-op without critics."""
        if self.loss.critics is None:
            return
        was_training = self.student.training
        self.student.eval()
        f_s = self.student(student_input).pooled
        self.student.train(was_training)
        self.loss.critics.warm_start(f_s, [t.pooled for t in teachers], index)
