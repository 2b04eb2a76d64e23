"""A distilled smp encoder inside an smp U-Net or FPN, for the NYU segmentation evaluation."""
from __future__ import annotations

import segmentation_models_pytorch as smp
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.base import Backbone
from xmodal.models.smp_encoder import DEPTH, SmpEncoderBackbone

DECODERS: dict[str, type[smp.base.SegmentationModel]] = {"unet": smp.Unet, "fpn": smp.FPN}


def build_segmenter(
    backbone: Backbone, decoder: str = "unet", num_classes: int = 1, freeze_encoder: bool = False
) -> nn.Module:
    """An smp model whose ``encoder`` IS ``backbone.encoder`` (same object, same weights).

    Takes ``(B, in_channels, H, W)`` with ``H, W`` divisible by 32 and returns logits
    ``(B, num_classes, H, W)``. ``freeze_encoder`` uses smp's ``freeze_encoder()``: no gradients
    and BatchNorm statistics kept fixed even under ``model.train()``.

    Example:
        >>> student = build_model("smp_resnet18", in_channels=1)
        >>> seg = build_segmenter(student, "fpn", num_classes=13)
        >>> seg.encoder is student.encoder
        True
    """
    if not isinstance(backbone, SmpEncoderBackbone):
        raise ConfigError(
            f"build_segmenter needs an smp encoder backbone (smp_resnet18, smp:<name>), got {backbone.arch}"
        )
    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    # encoder_weights=None: smp's default ("imagenet") would download weights we then discard.
    model = DECODERS[decoder](
        encoder_name=backbone.encoder_name,
        encoder_depth=DEPTH,
        encoder_weights=None,
        in_channels=backbone.in_channels,
        classes=num_classes,
    )
    model.encoder = backbone.encoder
    if freeze_encoder:
        model.freeze_encoder()
    return model
