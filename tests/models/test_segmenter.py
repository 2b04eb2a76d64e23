"""The segmenter shares the distilled encoder object."""
from __future__ import annotations

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.models import build_model, build_segmenter


@pytest.mark.parametrize("decoder", ["unet", "fpn"])
def test_segmenter_shares_the_encoder(decoder):
    student = build_model("smp_resnet18", in_channels=1)
    seg = build_segmenter(student, decoder, num_classes=13).eval()
    assert seg.encoder is student.encoder
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        before = seg(x)
        student.encoder.layer1[0].conv1.weight.add_(1.0)  # a change made through the backbone...
        after = seg(x)
    assert before.shape == (1, 13, 64, 64)
    assert not torch.allclose(before, after)  # ...shows in the segmenter
    key = "encoder.layer1.0.conv1.weight"
    assert torch.equal(seg.state_dict()[key], student.state_dict()[key])


def test_freeze_encoder_keeps_weights_and_statistics():
    student = build_model("smp:resnet18", in_channels=1)
    seg = build_segmenter(student, "fpn", num_classes=3, freeze_encoder=True).train()
    stats = student.encoder.bn1.running_mean.clone()
    seg(torch.randn(2, 1, 64, 64)).mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in student.encoder.parameters())
    assert all(p.grad is not None for p in seg.decoder.parameters() if p.requires_grad)
    assert torch.equal(student.encoder.bn1.running_mean, stats)


def test_segmenter_needs_an_smp_encoder():
    with pytest.raises(ConfigError, match="resnet8"):
        build_segmenter(build_model("resnet8"), "unet", num_classes=2)
    with pytest.raises(ConfigError, match="deeplab"):
        build_segmenter(build_model("smp_resnet18"), "deeplab", num_classes=2)
