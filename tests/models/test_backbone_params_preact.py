"""Parameter counts against closed-form counts of the architectures, and pre-activation maps."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from xmodal.models import build_model


def conv(c_in: int, c_out: int, k: int, bias: bool = False) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running stats are buffers


def fc(d: int, classes: int) -> int:
    return d * classes + classes


def cifar_resnet_params(depth: int, widths: tuple[int, int, int, int], c_in: int, classes: int) -> int:
    """He et al.'s CIFAR ResNet (6n+2): 3x3 stem, 3 stages of n basic blocks, 1x1 projection shortcut
    (with BN, as in RepDistiller) whenever width or stride changes."""
    n = (depth - 2) // 6
    total = conv(c_in, widths[0], 3) + bn(widths[0])
    for stage, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        total += conv(a, b, 3) + bn(b) + conv(b, b, 3) + bn(b)
        if a != b or stage > 0:
            total += conv(a, b, 1) + bn(b)
        total += (n - 1) * (2 * conv(b, b, 3) + 2 * bn(b))
    return total + fc(widths[-1], classes)


def wrn_params(depth: int, k: int, c_in: int, classes: int) -> int:
    """Zagoruyko & Komodakis' WRN-d-k: pre-activation blocks (BN, conv, BN, conv), a bias-free
    1x1 shortcut when the width changes, BN before pooling."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = conv(c_in, 16, 3)
    for a, b in zip(widths[:-1], widths[1:]):
        for i in range(n):
            c = a if i == 0 else b
            total += bn(c) + conv(c, b, 3) + bn(b) + conv(b, b, 3) + (conv(c, b, 1) if c != b else 0)
    return total + bn(widths[-1]) + fc(widths[-1], classes)


def vgg_bn_params(convs: tuple[int, ...], c_in: int, classes: int) -> int:
    """RepDistiller's CIFAR VGG: 3x3 convs (with bias) + BN, widths 64..512, one linear layer."""
    total, c = 0, c_in
    for block, width in zip(convs, (64, 128, 256, 512, 512)):
        for _ in range(block):
            total += conv(c, width, 3, bias=True) + bn(width)
            c = width
    return total + fc(512, classes)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,expected,ballpark", [
    # ballpark: the totals the CRD paper and RepDistiller report (CIFAR-100, 100 classes)
    ("resnet20", cifar_resnet_params(20, (16, 16, 32, 64), 3, 100), 0.28e6),
    ("resnet56", cifar_resnet_params(56, (16, 16, 32, 64), 3, 100), 0.86e6),
    ("resnet110", cifar_resnet_params(110, (16, 16, 32, 64), 3, 100), 1.74e6),
    ("resnet8x4", cifar_resnet_params(8, (32, 64, 128, 256), 3, 100), 1.23e6),
    ("resnet32x4", cifar_resnet_params(32, (32, 64, 128, 256), 3, 100), 7.43e6),
    ("wrn_16_2", wrn_params(16, 2, 3, 100), 0.70e6),
    ("wrn_40_2", wrn_params(40, 2, 3, 100), 2.26e6),
    ("vgg8", vgg_bn_params((1, 1, 1, 1, 1), 3, 100), 3.96e6),
    ("vgg13", vgg_bn_params((2, 2, 2, 2, 2), 3, 100), 9.46e6),
])
def test_cifar_parameter_counts(arch, expected, ballpark):
    model = build_model(arch, in_channels=3, num_classes=100)
    assert n_params(model) == expected
    assert abs(expected - ballpark) / ballpark < 0.02


def test_parameter_counts_follow_in_channels():
    expected = cifar_resnet_params(8, (16, 16, 32, 64), 2, 10)
    assert n_params(build_model("resnet8", in_channels=2, num_classes=10)) == expected
    assert n_params(build_model("wrn_16_1", in_channels=1)) == wrn_params(16, 1, 1, 0)


def test_library_backbones_match_published_counts():
    # torchvision's ResNet-18 (ImageNet head): 11,689,512; smp's encoder is it without the head.
    assert n_params(build_model("resnet18", num_classes=1000, small_input=False)) == 11_689_512
    assert n_params(build_model("smp_resnet18")) == 11_689_512 - fc(512, 1000)
    # timm / TF EfficientNet-Lite0: 4,652,008
    assert n_params(build_model("efficientnet_lite0", num_classes=1000)) == 4_652_008


@pytest.mark.parametrize("arch,kwargs", [
    ("resnet8", {"width": 8}), ("resnet8x4", {"width": 8}), ("vgg8", {"width": 8}),
    ("resnet18", {}), ("resnet18", {"small_input": False}), ("smp_resnet18", {}),
])
def test_preact_maps_differ_only_where_relu_clips(arch, kwargs):
    model = build_model(arch, in_channels=2, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        plain, pre = model(x), model(x, preact=True)
    assert len(pre.preact_maps) == len(pre.maps)
    for m, p, q in zip(plain.maps, pre.maps, pre.preact_maps):
        assert torch.equal(m, p)  # capturing changes nothing
        assert torch.equal(m, F.relu(q))
        assert (q < 0).any()  # a real pre-activation, not the map itself
    torch.testing.assert_close(pre.pooled, plain.pooled)
    torch.testing.assert_close(pre.logits, plain.logits)


def test_wrn_preact_is_the_reference_bn_output():
    """RepDistiller: preact f1, f2, f3 = the BN that opens block2, block3, and the final BN."""
    model = build_model("wrn_16_2", in_channels=1, width=8).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 1, 32, 32), preact=True)
    bns = [model.stages[1][0].norm1, model.stages[2][0].norm1, model.post]
    assert torch.equal(feats.preact_maps[0], feats.maps[0])  # the stem conv has no activation
    for m, q, norm in zip(feats.maps[1:], feats.preact_maps[1:], bns):
        expected = F.batch_norm(m, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)
        torch.testing.assert_close(q, expected)
    torch.testing.assert_close(feats.pooled, F.relu(feats.preact_maps[-1]).mean(dim=(2, 3)))


def test_preact_updates_batchnorm_statistics_once():
    """RepDistiller's WRN re-applies a BN for preact, counting the batch twice in training."""
    model = build_model("wrn_16_1", in_channels=1, width=8).train()
    model(torch.randn(4, 1, 32, 32), preact=True)
    assert {int(m.num_batches_tracked) for m in model.modules() if hasattr(m, "num_batches_tracked")} == {1}


def test_preact_gradients_flow():
    model = build_model("resnet8", in_channels=1, width=8)
    feats = model(torch.randn(2, 1, 32, 32), preact=True)
    sum(q.sum() for q in feats.preact_maps).backward()
    assert model.stem[0].weight.grad is not None


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "smp:mobilenet_v2"])
def test_preact_unsupported_raises_naming_arch(arch):
    model = build_model(arch)
    with pytest.raises(ValueError, match=arch):
        model(torch.randn(1, 3, 32, 32), preact=True)
