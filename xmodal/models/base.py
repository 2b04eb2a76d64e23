"""The surface every backbone offers: ``forward(x, preact=False) -> Features``.

A backbone implements :meth:`Backbone.forward_maps` (stem, then one map per stage) and, where the
embedding is not simply the global average of the last map, :meth:`Backbone.forward_embedding`.
Pre-activation maps are captured by forward pre-hooks on the ReLU that ends each stage
(torchdistill's way), so no block is re-implemented to expose them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from losses.features import Features
from xmodal.errors import ConfigError


class Backbone(nn.Module, ABC):
    """A feature extractor with an optional linear classifier ``fc``.

    Attributes:
        arch: the registry name it was built under.
        in_channels: channels of the input, ``C`` in ``(B, C, H, W)``.
        num_features: width ``D`` of ``Features.pooled``.
        num_classes: outputs of ``fc``; 0 means no classifier and ``Features.logits is None``.
        build_kwargs: the architecture keywords it was built with (recorded in checkpoints).
    """

    def __init__(self, arch: str, in_channels: int, num_features: int, num_classes: int = 0) -> None:
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.num_features = num_features
        self.build_kwargs: dict[str, Any] = {}
        self.fc: Optional[nn.Linear] = None
        self.reset_classifier(num_classes)

    @abstractmethod
    def forward_maps(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W)`` -> ``[stem map, stage 1 map, ...]``, each ``(B, C_i, H_i, W_i)``."""

    def forward_embedding(self, last_map: Tensor) -> Tensor:
        """``(B, C, h, w)`` -> ``(B, num_features)``: the global average of the last map."""
        return last_map.mean(dim=(2, 3))

    def preact_points(self) -> list[Optional[str]]:
        """Per map, the name of the submodule whose last input is that map's pre-activation.

        ``None`` marks a map that has no activation of its own (its pre-activation is itself).
        Backbones that cannot provide pre-activations keep this default, which raises.
        """
        raise ValueError(f"{self.arch} cannot return pre-activation maps (preact=True)")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` by a new ``Linear(num_features, num_classes)``; 0 removes it.

        The new head lives on the device and dtype of the network's parameters.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        like = next((p for name, p in self.named_parameters() if not name.startswith("fc.")), None)
        placement = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.num_classes = num_classes
        self.pretrained_head = False  # a new head is untrained; adopt_classifier marks a pretrained one
        self.fc = nn.Linear(self.num_features, num_classes, **placement) if num_classes else None

    def forward(self, x: Tensor, preact: bool = False) -> Features:
        """``(B, in_channels, H, W)`` -> :class:`Features` (maps, pooled, logits, preact_maps)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.arch} expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if not preact:
            maps = self.forward_maps(x)
            pooled = self.forward_embedding(maps[-1])
            preact_maps = None
        else:
            points = [None if name is None else self.get_submodule(name) for name in self.preact_points()]
            with last_inputs([p for p in points if p is not None]) as captured:
                maps = self.forward_maps(x)
                pooled = self.forward_embedding(maps[-1])
            found = iter(captured)
            preact_maps = [m if p is None else next(found) for m, p in zip(maps, points, strict=True)]
        logits = None if self.fc is None else self.fc(pooled)
        return Features(maps=maps, pooled=pooled, logits=logits, preact_maps=preact_maps)


class StagedBackbone(Backbone):
    """``stem -> stages[0] -> ... -> stages[-1]``, maps after each; ``post`` runs before pooling.

    ``post`` exists for pre-activation networks (WRN), whose last stage output is a residual sum
    that the reference normalises and rectifies only for the embedding.

    ``fp32_stem`` (default False; set by :func:`keep_stem_fp32`): the stem runs in float32 even
    under mixed-precision autocast and hands the first stage a float32 map: autocast casts it down
    at the first convolution, while a residual sum with it stays float32 (WRN's first stage). A
    float32 run computes the same numbers either way.
    """

    fp32_stem = False

    def __init__(
        self,
        arch: str,
        in_channels: int,
        num_features: int,
        num_classes: int,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        post: Optional[nn.Module] = None,
        preact_points: Optional[Sequence[Optional[str]]] = None,
    ) -> None:
        super().__init__(arch, in_channels, num_features, num_classes)
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.post = post
        self._preact_points = None if preact_points is None else list(preact_points)

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        if self.fp32_stem:
            with torch.autocast(x.device.type, enabled=False):
                maps = [self.stem(x.float())]
        else:
            maps = [self.stem(x)]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return maps

    def forward_embedding(self, last_map: Tensor) -> Tensor:
        return super().forward_embedding(last_map if self.post is None else self.post(last_map))

    def preact_points(self) -> list[Optional[str]]:
        if self._preact_points is None:
            return super().preact_points()
        return list(self._preact_points)


def keep_stem_fp32(model: nn.Module, arch: str) -> None:
    """Run ``model``'s stem in float32 under autocast (``ModelConfig.fp32_stem``).

    Under CPU bf16 autocast the Lab recipe's ab student's first convolution carried a
    systematic gradient error; docs/notes/mixed-precision-cpu-study.md measures what keeping
    the stem in float32 does to the linear probe. Only backbones whose stem is their own
    module (:class:`StagedBackbone`: the CIFAR ResNets, WRNs and VGGs, torchvision's ResNets) can;
    the others run their stem inside a library's forward and get a :class:`ConfigError`.
    """
    if not isinstance(model, StagedBackbone):
        raise ConfigError(f"fp32_stem=true: {arch} runs its stem inside {type(model).__name__}'s own forward; "
                          "only staged backbones (the CIFAR ResNets, WRNs and VGGs, resnet18/resnet50) can keep it in float32")
    model.fp32_stem = True


def last_relu(module: nn.Module, prefix: str) -> str:
    """Name (under ``prefix``) of the last ``nn.ReLU`` registered in ``module``.

    In torchvision's blocks and in conv-BN-ReLU stacks the last registered ReLU is also the last
    one applied, so its input is the stage's pre-activation; the tests check
    ``maps == relu(preact_maps)`` for every backbone that relies on this.
    """
    names = [name for name, m in module.named_modules() if isinstance(m, nn.ReLU)]
    if not names:
        raise ValueError(f"{prefix} holds no nn.ReLU")
    return f"{prefix}.{names[-1]}" if names[-1] else prefix


def stage_relus(stem: nn.Module, stages: Sequence[nn.Module]) -> list[str]:
    """Pre-activation points of a :class:`StagedBackbone` whose stem and stages end in a ReLU."""
    return [last_relu(stem, "stem")] + [last_relu(s, f"stages.{i}") for i, s in enumerate(stages)]


@contextmanager
def last_inputs(modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Collect, per module, the first input of its last call inside the ``with`` block.

    A torchvision block calls its one ``relu`` several times; the last call is the stage's final
    activation. The input is cloned because that ReLU works in place.
    """
    captured: list[Optional[Tensor]] = [None] * len(modules)

    def keep(i: int):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured[i] = args[0].clone()

        return hook

    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        yield captured  # type: ignore[misc]  # filled by the hooks before it is read
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in captured):
        raise RuntimeError("a pre-activation point was not called during forward")


def init_weights(module: nn.Module) -> None:
    """The reference's initialisation: Kaiming-normal (fan_out) convs, BatchNorm at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def adopt_classifier(model: Backbone, pretrained_head: nn.Linear) -> None:
    """Keep a pretrained head when ``model.num_classes`` equals its output count."""
    if model.num_classes == pretrained_head.out_features:
        model.fc = pretrained_head
        model.pretrained_head = True


def download_failed(arch: str, weights: str, err: Exception) -> ConfigError:
    """The one-line error for pretrained weights that could not be fetched (no internet here)."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(f"{arch}: could not download weights {weights!r} (needs internet): {reason}")
