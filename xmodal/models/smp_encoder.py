"""segmentation-models-pytorch encoders as backbones, so a distilled encoder drops into U-Net/FPN.

``smp_resnet18`` / ``smp_resnet34`` are shorthands for ``smp:resnet18`` / ``smp:resnet34``; any
name from ``smp.encoders.get_encoder_names()`` (and ``tu-<timm model>``) works after ``smp:``.
``weights`` is passed to smp (e.g. ``"imagenet"``); smp DOWNLOADS those from the Hugging Face
hub, so they need internet once. The default, ``None``, is random initialisation.
"""
from __future__ import annotations

import difflib
from typing import Optional

import segmentation_models_pytorch as smp
from torch import Tensor
from torchvision.models import ResNet

from xmodal.errors import ConfigError
from xmodal.models.base import Backbone, download_failed, last_relu
from xmodal.models.registry import PREFIX_FACTORIES, register_model

DEPTH = 5  # five downsamplings: what smp's decoders expect by default


class SmpEncoderBackbone(Backbone):
    """Wraps ``encoder`` (the raw smp encoder, shared with :func:`build_segmenter`).

    ``maps`` = the encoder's features without the identity input: for ResNets the stem ReLU
    output (1/2 of the input), then layer1..layer4 (1/4 .. 1/32). ``pooled`` = GAP of the last.
    """

    def __init__(
        self, arch: str, encoder_name: str, in_channels: int, num_classes: int, weights: Optional[str]
    ) -> None:
        names = smp.encoders.get_encoder_names()
        if encoder_name not in names and not encoder_name.startswith("tu-"):
            near = difflib.get_close_matches(encoder_name, names, n=1, cutoff=0.0)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{arch}: smp has no encoder {encoder_name!r}{hint}")
        try:
            encoder = smp.encoders.get_encoder(
                encoder_name, in_channels=in_channels, depth=DEPTH, weights=weights
            )
        except KeyError as err:  # smp's message lists the weights it offers
            raise ConfigError(f"{arch}: {err.args[0]}") from None
        except OSError as err:  # the Hugging Face download of `weights` failed
            raise download_failed(arch, weights, err) from err
        super().__init__(arch, in_channels, encoder.out_channels[-1], num_classes)
        self.encoder_name = encoder_name
        self.encoder = encoder

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        return list(self.encoder(x)[1:])

    def preact_points(self) -> list[Optional[str]]:
        # smp's ResNet encoders are torchvision ResNets: same blocks, same final ReLUs.
        if not isinstance(self.encoder, ResNet):
            return super().preact_points()
        layers = [self.encoder.layer1, self.encoder.layer2, self.encoder.layer3, self.encoder.layer4]
        return ["encoder.relu"] + [last_relu(layer, f"encoder.layer{i}") for i, layer in enumerate(layers, 1)]


@register_model("smp_resnet18", "smp_resnet34")
def smp_encoder(
    arch: str, in_channels: int, num_classes: int, weights: Optional[str] = None
) -> SmpEncoderBackbone:
    """``smp_resnet18``, ``smp_resnet34`` or ``smp:<encoder_name>``, at depth 5.

    Maps of the ResNets at 64 px: ``(B, 64, 32, 32)``, ``(B, 64, 16, 16)``, ``(B, 128, 8, 8)``,
    ``(B, 256, 4, 4)``, ``(B, 512, 2, 2)``.
    """
    encoder_name = arch.removeprefix("smp:") if arch.startswith("smp:") else arch.removeprefix("smp_")
    return SmpEncoderBackbone(arch, encoder_name, in_channels, num_classes, weights)


PREFIX_FACTORIES["smp:"] = smp_encoder
