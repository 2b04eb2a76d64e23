"""torchvision ResNet-18/50 as backbones, with a stem for 32-96 px inputs.

``small_input=True`` (default) replaces the 7x7/2 conv and the max-pool by one 3x3 stride-1
conv, the usual CIFAR/STL adaptation; ``small_input=False`` keeps torchvision's stem.
``weights`` (e.g. ``"IMAGENET1K_V1"``) loads torchvision's ImageNet weights: that DOWNLOADS from
download.pytorch.org unless the file is already in ``$TORCH_HOME/hub/checkpoints``, so it needs
internet once. It requires the standard stem; with ``in_channels != 3`` the RGB stem kernels are
adapted by timm's ``adapt_input_conv`` (summed for 1 channel, repeated and rescaled otherwise).
"""
from __future__ import annotations

from typing import Optional

import torchvision
from timm.models import adapt_input_conv
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.base import StagedBackbone, download_failed, adopt_classifier, init_weights, stage_relus
from xmodal.models.registry import register_model


def _pretrained(arch: str, weights: Optional[str]) -> Optional[torchvision.models.WeightsEnum]:
    if weights is None:
        return None
    options = torchvision.models.get_model_weights(arch)
    try:
        return options[weights]
    except KeyError:
        offered = ", ".join(options.__members__)
        raise ConfigError(f"{arch}: unknown weights {weights!r}; torchvision offers {offered}") from None


def _stem_conv(net: torchvision.models.ResNet, in_channels: int, small_input: bool) -> nn.Conv2d:
    kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
    conv = nn.Conv2d(in_channels, net.conv1.out_channels, kernel, stride=stride, padding=padding, bias=False)
    init_weights(conv)
    return conv


@register_model("resnet18", "resnet50")
def torchvision_resnet(
    arch: str, in_channels: int, num_classes: int, small_input: bool = True, weights: Optional[str] = None
) -> StagedBackbone:
    """torchvision ``resnet18`` / ``resnet50``; maps = [stem, layer1, layer2, layer3, layer4].

    Maps at 32 px with ``small_input``: ``(B, 64, 32, 32)``, then ``(B, C, 32/16/8/4)`` with
    ``C = 64, 128, 256, 512`` (x4 for resnet50). With the standard stem the stem map is at 1/2
    and layer1 at 1/4 of the input (the max-pool opens stage 1).
    ``num_classes=1000`` with ``weights`` keeps the ImageNet classifier.
    """
    enum = _pretrained(arch, weights)
    if enum is not None and small_input:
        raise ConfigError(
            f"{arch}: weights={weights!r} need small_input=False (the 3x3 stem has no ImageNet kernels)"
        )
    try:
        net = getattr(torchvision.models, arch)(weights=enum)
    except OSError as err:  # urllib's URLError is an OSError
        raise download_failed(arch, weights, err) from err
    if small_input or in_channels != 3:
        rgb_kernels = net.conv1.weight.detach()
        net.conv1 = _stem_conv(net, in_channels, small_input)
        if enum is not None:  # only the standard stem can be pretrained (checked above)
            net.conv1.weight.data.copy_(adapt_input_conv(in_channels, rgb_kernels))
    if small_input:
        net.maxpool = nn.Identity()
    stem = nn.Sequential(net.conv1, net.bn1, net.relu)
    stages = [nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3, net.layer4]
    model = StagedBackbone(
        arch, in_channels, net.fc.in_features, num_classes, stem, stages,
        preact_points=stage_relus(stem, stages),
    )
    if enum is not None:
        adopt_classifier(model, net.fc)
    return model
