"""EnsembleDistillLoss: every term against an independent computation, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ensemble import EnsembleDistillLoss, averaged_soft_logits
from losses.crd import CRDLoss
from losses.features import Features

N, B, C, K = 80, 8, 5, 12
LABELS = torch.arange(N) % C


def _features(dim: int, classes: int | None, g: torch.Generator, grad: bool = False) -> Features:
    pooled = torch.randn(B, dim, generator=g).requires_grad_(grad)
    logits = None if classes is None else (3 * torch.randn(B, classes, generator=g)).requires_grad_(grad)
    return Features(maps=[], pooled=pooled, logits=logits)


def test_averaged_soft_logits_soften_to_the_mean_of_the_teachers_soft_labels():
    g = torch.Generator().manual_seed(0)
    logits = [5 * torch.randn(B, C, generator=g) for _ in range(3)]
    for T in (1.0, 4.0):
        z = averaged_soft_logits(logits, T)
        expected = sum(torch.softmax(x / T, dim=1) for x in logits) / 3
        torch.testing.assert_close(torch.softmax(z / T, dim=1), expected)


def test_terms_match_an_independent_computation():
    g = torch.Generator().manual_seed(1)
    student = _features(6, C, g, grad=True)
    teachers = [_features(d, C, g) for d in (10, 7)]
    index = torch.randperm(N, generator=g)[:B]
    labels = LABELS[index]
    torch.manual_seed(4)
    loss = EnsembleDistillLoss.from_features(student, teachers, n_data=N, num_classes=C, crd_weights=[0.8, 0.5],
                                             ce_weight=1.0, kd_weight=0.9, kd_T=4.0, seed=3, nce_k=K,
                                             negatives="class", labels=LABELS, feat_dim=8)
    torch.manual_seed(4)
    singles = [CRDLoss(6, d, N, seed=3 + i, nce_k=K, negatives="class", labels=LABELS, feat_dim=8)
               for i, d in enumerate((10, 7))]
    contrast_idx = singles[0].sample_contrast(index)
    terms = loss(student, teachers, index, labels)
    assert set(terms) == {"loss", "ce", "crd_0", "crd_1", "kd"}
    torch.testing.assert_close(terms["ce"], F.cross_entropy(student.logits, labels))
    for i, (w, crd) in enumerate(zip((0.8, 0.5), singles)):
        torch.testing.assert_close(terms[f"crd_{i}"], w * crd(student.pooled, teachers[i].pooled, index, contrast_idx))
    # KD from the averaged ensemble, written out: T^2 * KL(mean_i p_i || p_s), mean over the batch
    T = 4.0
    p_avg = sum(torch.softmax(t.logits / T, dim=1) for t in teachers) / 2
    p_s = torch.softmax(student.logits / T, dim=1)
    kd = T**2 * (p_avg * (p_avg.log() - p_s.log())).sum() / B
    torch.testing.assert_close(terms["kd"], 0.9 * kd)
    torch.testing.assert_close(terms["loss"], sum(v for k, v in terms.items() if k != "loss"))
    terms["loss"].backward()
    assert student.pooled.grad is not None and student.logits.grad is not None


def test_baselines_build_no_critics():
    g = torch.Generator().manual_seed(2)
    student, teachers = _features(6, C, g), [_features(10, C, g)]
    kd_only = EnsembleDistillLoss.from_features(student, teachers, n_data=N, num_classes=C, ce_weight=0.1, kd_weight=0.9)
    assert kd_only.critics is None
    assert set(kd_only(student, teachers, torch.arange(B), LABELS[:B])) == {"loss", "ce", "kd"}
    ce_only = EnsembleDistillLoss(None, 0, ce_weight=1.0)
    assert set(ce_only(student, [], torch.arange(B), LABELS[:B])) == {"loss", "ce"}


def test_bad_input_is_refused_with_a_clear_message():
    g = torch.Generator().manual_seed(3)
    student = _features(6, C, g)
    common = dict(n_data=N, num_classes=C, crd_weights=0.8, nce_k=K)
    with pytest.raises(ValueError, match="teacher list is empty"):
        EnsembleDistillLoss.from_features(student, [], **common)
    with pytest.raises(ValueError, match="teacher 1 has 7 classes but the data has 5"):
        EnsembleDistillLoss.from_features(student, [_features(10, C, g), _features(10, 7, g)], **common)
    with pytest.raises(ValueError, match="weights has 3 entries for 2 teachers"):
        EnsembleDistillLoss.from_features(student, [_features(10, C, g)] * 2, **{**common, "crd_weights": [1, 1, 1]})
    with pytest.raises(ValueError, match="teacher 0 has no classifier"):
        EnsembleDistillLoss.from_features(student, [_features(10, None, g)], **{**common, "kd_weight": 1.0})
    loss = EnsembleDistillLoss.from_features(student, [_features(10, C, g)] * 2, **common)
    with pytest.raises(ValueError, match="got 1 teachers' features, expected 2"):
        loss(student, [_features(10, C, g)], torch.arange(B), LABELS[:B])
    assert math.isclose(loss.critics.weights[1], 0.8)
