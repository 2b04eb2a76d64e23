"""Backbones for distillation: every one returns :class:`losses.features.Features`.

``build_model(arch, in_channels, num_classes, **kwargs)`` builds by name
(``available_models()`` lists them; ``timm:<name>``, ``tv:<name>`` and ``smp:<encoder>`` take any
network of those libraries); :mod:`xmodal.models.checkpoint` saves and reloads them;
:func:`build_segmenter` puts a distilled smp encoder under a U-Net / FPN decoder.
"""
from xmodal.models import cifar, ecosystem, efficientnet, smp_encoder, torchvision_resnet  # noqa: F401  (register)
from xmodal.models.base import Backbone
from xmodal.models.checkpoint import load_backbone, load_weights_into, save_backbone
from xmodal.models.ecosystem import from_module
from xmodal.models.registry import available_models, build_model, register_model
from xmodal.models.segmentation import build_segmenter

__all__ = [
    "Backbone",
    "available_models",
    "build_model",
    "build_segmenter",
    "from_module",
    "load_backbone",
    "load_weights_into",
    "register_model",
    "save_backbone",
]
