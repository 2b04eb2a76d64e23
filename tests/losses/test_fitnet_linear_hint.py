"""FitNet against a teacher whose hint map is a linear projection (negative values allowed)."""
from __future__ import annotations

import pytest
import torch

from losses import Features
from losses.fitnet import FitNet


def _features(hint: torch.Tensor) -> Features:
    maps = [hint, hint, hint]
    return Features(maps=maps, pooled=hint.mean((2, 3)))


@pytest.mark.parametrize("use_relu, expected", [(True, 1.0), (False, 0.0)])
def test_regressor_reaches_negative_hints_only_without_relu(use_relu, expected):
    student = _features(torch.randn(2, 3, 4, 4))
    teacher = _features(torch.full((2, 5, 4, 4), -1.0))
    loss = FitNet.from_features(student, teacher, use_relu=use_relu).eval()
    with torch.no_grad():  # the regressor outputs the BN bias, -1, everywhere: ReLU clips it to 0
        loss.regressor.conv.weight.zero_()
        loss.regressor.conv.bias.zero_()
        loss.regressor.bn.weight.zero_()
        loss.regressor.bn.bias.fill_(-1.0)
    assert loss.forward_features(student, teacher).item() == pytest.approx(expected)
    assert FitNet.from_features(student, teacher).regressor.act.__class__.__name__ == "ReLU"  # the reference default
