"""Modality adapters: ``views(batch) -> (teacher_view, student_view)`` on the device.

Adding a modality = one file here + one entry in ``MODALITIES`` + one recipe.
"""
from __future__ import annotations

import difflib

from xmodal.errors import ConfigError
from xmodal.modalities.base import Modality, view_fn
from xmodal.modalities.depth import DepthModality
from xmodal.modalities.identity import IdentityModality
from xmodal.modalities.lab import LabModality

MODALITIES: dict[str, type[Modality]] = {m.name: m for m in (LabModality, DepthModality, IdentityModality)}


def build_modality(name: str, **options) -> Modality:
    """The adapter registered as ``name`` (``lab``, ``depth``, ``identity``)."""
    if name not in MODALITIES:
        near = difflib.get_close_matches(name, MODALITIES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown modality {name!r}{hint} Available: {', '.join(sorted(MODALITIES))}")
    return MODALITIES[name](**options)


__all__ = ["Modality", "MODALITIES", "build_modality", "view_fn", "LabModality", "DepthModality", "IdentityModality"]
