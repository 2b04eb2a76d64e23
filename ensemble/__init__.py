"""Ensemble distillation: M teachers, one student, one CRD critic per teacher (CRD §3.4).

``CriticEnsemble`` holds one :class:`losses.CRDLoss` per teacher (own heads, own banks) and draws
the negatives once per step for all of them; ``EnsembleDistillLoss`` adds cross-entropy and KD
from the teachers' averaged soft labels and reports every term; ``EnsembleDistiller`` puts the
student and the loss in one module for the training loop. Depends on ``losses`` only.

Example:
    >>> from ensemble import EnsembleDistillLoss
    >>> loss = EnsembleDistillLoss.from_features(s_feats, [t1_feats, t2_feats], n_data=len(train),
    ...     num_classes=10, crd_weights=0.8, negatives="class", labels=train.labels, nce_k=4096)
    >>> terms = loss(s_feats, [t1_feats, t2_feats], index, labels)   # loss, ce, crd_0, crd_1
"""
from ensemble.critics import CriticEnsemble, per_teacher_weights
from ensemble.loss import EnsembleDistiller, EnsembleDistillLoss, averaged_soft_logits

__all__ = ["CriticEnsemble", "EnsembleDistillLoss", "EnsembleDistiller", "averaged_soft_logits", "per_teacher_weights"]
