"""Losses registered by name, so a recipe can say ``methods: [kd, crd]``."""
from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}
#: Former registry names and the name each loss has now.
RENAMED = {"ab": "abound"}  # "ab" reads as the Lab modality's chrominance view

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register("kd")`` makes ``build("kd", ...)`` construct the class."""

    def wrap(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"loss name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def available() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[nn.Module]:
    """The class registered under ``name``; a ``ValueError`` names the nearest valid name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in RENAMED:
            raise ValueError(f"loss {name!r} is now registered as {RENAMED[name]!r}") from None
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown loss {name!r}{hint} Available: {', '.join(available())}") from None


def build(name: str, **kwargs) -> nn.Module:
    """Construct the loss registered under ``name`` with ``kwargs``."""
    return get(name)(**kwargs)
