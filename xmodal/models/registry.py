"""Backbones registered by name, so a recipe can say ``teacher: {arch: resnet32x4}``.

A factory has the signature ``factory(arch, in_channels, num_classes, **arch_keywords)``;
:func:`build_model` checks the keywords against it and records them, defaults filled in, on
the model (``build_kwargs``) so a checkpoint can rebuild the same network.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, TypeVar

from xmodal.errors import ConfigError
from xmodal.models.base import Backbone

Factory = Callable[..., Backbone]
F = TypeVar("F", bound=Factory)

_FACTORIES: dict[str, Factory] = {}
# "smp:<encoder_name>" builds any segmentation-models-pytorch encoder; see smp_encoder.py.
PREFIX_FACTORIES: dict[str, Factory] = {}
# Keywords that only choose initial weights: a checkpoint's state dict replaces them anyway.
INIT_ONLY_KWARGS: dict[str, Any] = {"pretrained": False, "weights": None}
_FIXED = ("arch", "in_channels", "num_classes")


def register_model(*names: str) -> Callable[[F], F]:
    """Decorator: ``@register_model("resnet8", "resnet20")`` registers one factory under names."""

    def wrap(factory: F) -> F:
        for name in names:
            if name in _FACTORIES and _FACTORIES[name] is not factory:
                raise ValueError(f"model name {name!r} is already registered")
            _FACTORIES[name] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted; ``smp:<encoder_name>`` is also accepted."""
    return sorted(_FACTORIES)


def _factory(arch: str) -> Factory:
    prefix = arch.split(":", 1)[0] + ":" if ":" in arch else None
    if prefix in PREFIX_FACTORIES:
        return PREFIX_FACTORIES[prefix]
    if arch in _FACTORIES:
        return _FACTORIES[arch]
    near = difflib.get_close_matches(arch, _FACTORIES, n=1, cutoff=0.0)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    names = ", ".join(available_models())
    raise ConfigError(f"unknown arch {arch!r}{hint} Available: {names}, smp:<encoder>, timm:<model>, tv:<model>")


def resolve_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the factory's defaults filled in; unknown keywords raise ConfigError."""
    params = inspect.signature(_factory(arch)).parameters
    accepted = [name for name in params if name not in _FIXED]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) or "nothing"
        raise ConfigError(f"{arch} does not take {', '.join(unknown)}; it takes: {takes}")
    defaults = {name: params[name].default for name in accepted}
    return {**defaults, **kwargs}


def build_model(arch: str, in_channels: int = 3, num_classes: int = 0, **kwargs: Any) -> Backbone:
    """The backbone registered as ``arch``, taking ``(B, in_channels, H, W)`` input.

    Example:
        >>> net = build_model("resnet8", in_channels=2, width=8)
        >>> net(torch.randn(4, 2, 32, 32)).pooled.shape
        torch.Size([4, 32])
    """
    if in_channels < 1:
        raise ConfigError(f"{arch}: in_channels must be >= 1, got {in_channels}")
    resolved = resolve_kwargs(arch, kwargs)
    model = _factory(arch)(arch=arch, in_channels=in_channels, num_classes=num_classes, **resolved)
    model.build_kwargs = resolved
    return model
