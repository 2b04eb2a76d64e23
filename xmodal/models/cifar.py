"""The CIFAR zoo of the CRD paper: RepDistiller's ResNets, Wide ResNets and VGGs (with BN).

Structures and parameter counts follow RepDistiller ``models/resnet.py``, ``wrn.py`` and
``vgg.py``; the blocks come from torchvision (ResNet ``BasicBlock``), timm (pre-activation
``PreActBasic`` for WRN) and torchvision's ``Conv2dNormActivation`` (VGG). ``width`` scales every
layer from the reference's base width, so small CPU variants exist (``width=8``).

``maps`` equals the reference's ``is_feat=True`` list minus its last element, so the reference's
layer choices for the baseline losses carry over. One reference quirk is kept on purpose: a WRN
stage output is a residual sum without activation, so for WRN ``maps[i]`` is not
``relu(preact_maps[i])``; its ``preact_maps`` are, as in the reference, the next BatchNorm's
output (the input of the ReLU that follows), and ``pooled`` is the average of
``relu(bn(maps[-1]))``.
"""
from __future__ import annotations

from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.resnetv2 import DownsampleConv, PreActBasic
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock
from torchvision.ops import Conv2dNormActivation

from xmodal.errors import ConfigError
from xmodal.models.base import StagedBackbone, init_weights, stage_relus
from xmodal.models.registry import register_model

# name: (depth, stage widths as multiples of the base width, 16 in the reference)
RESNETS = {
    "resnet8": (8, (1, 1, 2, 4)),
    "resnet14": (14, (1, 1, 2, 4)),
    "resnet20": (20, (1, 1, 2, 4)),
    "resnet32": (32, (1, 1, 2, 4)),
    "resnet44": (44, (1, 1, 2, 4)),
    "resnet56": (56, (1, 1, 2, 4)),
    "resnet110": (110, (1, 1, 2, 4)),
    "resnet8x4": (8, (2, 4, 8, 16)),  # 32, 64, 128, 256 channels
    "resnet32x4": (32, (2, 4, 8, 16)),
}
# name: (depth, widen factor)
WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
# name: convs per block (block0 .. block4), widths 1, 2, 4, 8, 8 x base (64 in the reference)
VGGS = {"vgg8": (1, 1, 1, 1, 1), "vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2)}


def _check_width(arch: str, width: int, multiple: int = 1) -> None:
    if width < 1 or width % multiple:
        raise ConfigError(f"{arch}: width must be a positive multiple of {multiple}, got {width}")


def _resnet_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; the first changes width/stride through a 1x1 conv + BN shortcut."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@register_model(*RESNETS)
def cifar_resnet(arch: str, in_channels: int, num_classes: int, width: int = 16) -> StagedBackbone:
    """RepDistiller ResNet (depth 6n+2): 3x3 stem, three stages of n BasicBlocks, strides 1/2/2.

    Maps at 32 px: stem ``(B, w0, 32, 32)``, stages ``(B, w1, 32, 32)``, ``(B, w2, 16, 16)``,
    ``(B, w3, 8, 8)`` where ``(w0..w3) = (1, 1, 2, 4) * width``, or ``(2, 4, 8, 16) * width``
    for the x4 variants (``width=16``: 32, 64, 128, 256 as in the reference).
    """
    depth, multiples = RESNETS[arch]
    _check_width(arch, width)
    blocks = (depth - 2) // 6
    w = [m * width for m in multiples]
    stem = Conv2dNormActivation(in_channels, w[0], kernel_size=3, bias=False)
    stages = [_resnet_stage(w[i], w[i + 1], blocks, 1 if i == 0 else 2) for i in range(3)]
    model = StagedBackbone(
        arch, in_channels, w[3], num_classes, stem, stages, preact_points=stage_relus(stem, stages)
    )
    init_weights(model)
    return model


def _wrn_stage(in_chs: int, out_chs: int, blocks: int, stride: int) -> nn.Sequential:
    # timm's PreActBasic is the WRN block: BN-ReLU before each conv, and a 1x1 shortcut taken
    # from the activated input when the width changes.
    block = dict(conv_layer=create_conv2d, norm_layer=BatchNormAct2d, proj_layer=DownsampleConv)
    return nn.Sequential(
        *(PreActBasic(in_chs if i == 0 else out_chs, out_chs, stride=stride if i == 0 else 1, **block)
          for i in range(blocks))
    )


@register_model(*WRNS)
def wide_resnet(arch: str, in_channels: int, num_classes: int, width: int = 16) -> StagedBackbone:
    """RepDistiller WRN-d-k: 3x3 conv stem, three pre-activation stages of widths
    ``(k, 2k, 4k) * width``, strides 1/2/2; BN-ReLU before pooling.

    ``width`` must be a multiple of 8 (timm's block rounds channels to multiples of 8).
    Maps at 32 px: ``(B, width, 32, 32)``, ``(B, k*width, 32, 32)``, ``(B, 2k*width, 16, 16)``,
    ``(B, 4k*width, 8, 8)``.
    """
    depth, k = WRNS[arch]
    _check_width(arch, width, multiple=8)
    blocks = (depth - 4) // 6
    w = [width, k * width, 2 * k * width, 4 * k * width]
    stem = nn.Conv2d(in_channels, w[0], 3, padding=1, bias=False)
    stages = [_wrn_stage(w[i], w[i + 1], blocks, 1 if i == 0 else 2) for i in range(3)]
    # The reference's pre-activations: the BN that opens the next stage, then the final BN.
    points = [None, "stages.1.0.norm1.act", "stages.2.0.norm1.act", "post.act"]
    model = StagedBackbone(arch, in_channels, w[3], num_classes, stem, stages, BatchNormAct2d(w[3]), points)
    init_weights(model)
    return model


class MaxPoolFrom(nn.Module):
    """2x2 max-pool applied only to maps at least ``min_size`` high.

    The reference pools before VGG's last block only for 64 px inputs (an 8 px map there), so at
    32 px the last two blocks both see 4 x 4 maps; this keeps that rule for any input size.
    """

    def __init__(self, min_size: int = 8) -> None:
        super().__init__()
        self.min_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2) if x.shape[-2] >= self.min_size else x


def _vgg_block(in_chs: int, out_chs: int, convs: int) -> list[nn.Module]:
    # The reference keeps conv biases even before BN; they count in its parameter totals.
    return [Conv2dNormActivation(in_chs if i == 0 else out_chs, out_chs, 3, bias=True) for i in range(convs)]


@register_model(*VGGS)
def cifar_vgg(arch: str, in_channels: int, num_classes: int, width: int = 64) -> StagedBackbone:
    """RepDistiller VGG with BN (``vgg*_bn`` there): five conv-BN-ReLU blocks of widths
    ``(1, 2, 4, 8, 8) * width``, max-pools between them, global average pool.

    Maps at 32 px: ``(B, w, 32, 32)``, ``(B, 2w, 16, 16)``, ``(B, 4w, 8, 8)``, ``(B, 8w, 4, 4)``,
    ``(B, 8w, 4, 4)``.
    """
    _check_width(arch, width)
    convs = VGGS[arch]
    w = [width, 2 * width, 4 * width, 8 * width, 8 * width]
    stem = nn.Sequential(*_vgg_block(in_channels, w[0], convs[0]))
    pools = [nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2), MaxPoolFrom(8)]
    stages = [nn.Sequential(pools[i - 1], *_vgg_block(w[i - 1], w[i], convs[i])) for i in range(1, 5)]
    model = StagedBackbone(
        arch, in_channels, w[4], num_classes, stem, stages, preact_points=stage_relus(stem, stages)
    )
    init_weights(model)
    return model
