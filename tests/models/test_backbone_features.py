"""Every backbone's Features: shapes of every field, for 1/2/3 input channels and several sizes."""
from __future__ import annotations

import pytest
import torch

from xmodal.models import available_models, build_model

# arch: [(channels, downsampling factor)] per map, written from the papers / reference code.
CIFAR_RESNET = [(16, 1), (16, 1), (32, 2), (64, 4)]
CIFAR_RESNET_X4 = [(32, 1), (64, 1), (128, 2), (256, 4)]
WRN_K1 = [(16, 1), (16, 1), (32, 2), (64, 4)]
WRN_K2 = [(16, 1), (32, 1), (64, 2), (128, 4)]
VGG_32PX = [(64, 1), (128, 2), (256, 4), (512, 8), (512, 8)]  # no pool before block4 at 32 px
TV_SMALL = [(64, 1), (64, 1), (128, 2), (256, 4), (512, 8)]
SMP_RESNET = [(64, 2), (64, 4), (128, 8), (256, 16), (512, 32)]
EXPECTED = {
    **{f"resnet{d}": CIFAR_RESNET for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": CIFAR_RESNET_X4,
    "resnet32x4": CIFAR_RESNET_X4,
    "wrn_16_1": WRN_K1, "wrn_40_1": WRN_K1, "wrn_16_2": WRN_K2, "wrn_40_2": WRN_K2,
    "vgg8": VGG_32PX, "vgg11": VGG_32PX, "vgg13": VGG_32PX,
    "resnet18": TV_SMALL,
    "resnet50": [(64, 1), (256, 1), (512, 2), (1024, 4), (2048, 8)],
    "smp_resnet18": SMP_RESNET, "smp_resnet34": SMP_RESNET,
    "efficientnet_lite0": [(32, 2), (24, 4), (40, 8), (112, 16), (320, 32)],
    # Lite1 scales depth only; Lite2 widths x1.1 rounded to multiples of 8 (the stem stays 32 in Lite)
    "efficientnet_lite1": [(32, 2), (24, 4), (40, 8), (112, 16), (320, 32)],
    "efficientnet_lite2": [(32, 2), (24, 4), (48, 8), (120, 16), (352, 32)],
}
LARGE = {"resnet18", "resnet50", "smp_resnet34", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
         "resnet110", "resnet32x4", "vgg13"}
POOLED = {"efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280}  # the others pool their last map


def check_features(arch: str, in_channels: int, size: int, expected: list[tuple[int, int]], batch: int = 1,
                   **kwargs) -> None:
    model = build_model(arch, in_channels=in_channels, num_classes=7, **kwargs).eval()
    with torch.no_grad():
        feats = model(torch.randn(batch, in_channels, size, size))
    assert [tuple(m.shape) for m in feats.maps] == [(batch, c, size // s, size // s) for c, s in expected]
    width = POOLED.get(arch, expected[-1][0])
    assert model.num_features == width and model.in_channels == in_channels and model.arch == arch
    assert feats.pooled.shape == (batch, width)
    assert feats.logits.shape == (batch, 7)
    assert feats.preact_maps is None
    if arch not in POOLED and not arch.startswith("wrn"):  # WRN pools relu(bn(last map))
        torch.testing.assert_close(feats.pooled, feats.maps[-1].mean(dim=(2, 3)))


def test_every_registered_arch_is_covered():
    assert sorted(EXPECTED) == available_models()


@pytest.mark.parametrize("in_channels", [1, 2, 3])
@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_shapes_at_32px(arch, in_channels):
    check_features(arch, in_channels, 32, EXPECTED[arch], batch=1 if arch in LARGE else 2)


@pytest.mark.parametrize("arch,in_channels,size", [
    ("resnet18", 1, 64), ("resnet18", 2, 96), ("resnet50", 3, 64),
    ("smp_resnet18", 1, 64), ("smp_resnet18", 3, 96), ("smp_resnet34", 2, 96),
])
def test_shapes_at_64_and_96px(arch, in_channels, size):
    check_features(arch, in_channels, size, EXPECTED[arch])


@pytest.mark.parametrize("size", [64, 96])
def test_torchvision_standard_stem(size):
    """7x7/2 conv + max-pool: stem at 1/2, layer1 at 1/4 ... layer4 at 1/32."""
    check_features("resnet18", 2, size, [(64, 2), (64, 4), (128, 8), (256, 16), (512, 32)], small_input=False)


def test_vgg_pools_before_last_block_from_64px():
    """The reference pools before block4 only when the input is 64 px (8 x 8 after block3)."""
    check_features("vgg8", 3, 64, [(64, 1), (128, 2), (256, 4), (512, 8), (512, 16)], batch=2)


@pytest.mark.parametrize("arch,width,last", [("resnet8", 8, 32), ("resnet8x4", 8, 128), ("wrn_16_2", 8, 64),
                                             ("vgg8", 16, 128)])
def test_width_makes_small_variants(arch, width, last):
    model = build_model(arch, in_channels=2, width=width)
    feats = model(torch.randn(2, 2, 32, 32))
    assert model.num_features == last and feats.pooled.shape == (2, last)
    assert feats.logits is None and model.fc is None and model.num_classes == 0
