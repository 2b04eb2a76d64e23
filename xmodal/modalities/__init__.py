"""Modality adapters: ``views(batch) -> (teacher_view, student_view)`` on the device.

Adding a modality = one file here + one entry in ``MODALITIES`` + one recipe.
"""
from __future__ import annotations

import difflib

from xmodal.errors import ConfigError
from xmodal.modalities.base import Modality, view_fn
from xmodal.modalities.depth import DepthModality
from xmodal.modalities.edges import EdgesModality
from xmodal.modalities.identity import IdentityModality
from xmodal.modalities.lab import LabModality

MODALITIES: dict[str, type[Modality]] = {m.name: m for m in (LabModality, DepthModality, EdgesModality, IdentityModality)}


def build_modality(name: str, **options) -> Modality:
    """The adapter registered as ``name`` (``lab``, ``depth``, ``edges``, ``identity``)."""
    if name not in MODALITIES:
        near = difflib.get_close_matches(name, MODALITIES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown modality {name!r}{hint} Available: {', '.join(sorted(MODALITIES))}")
    return MODALITIES[name](**options)


def modality_from_config(config) -> Modality:
    """The adapter a recipe's ``modality:`` section (:class:`xmodal.schema.ModalityConfig`) names."""
    return build_modality(config.name, teacher_view=config.teacher_view, student_view=config.student_view,
                          **config.options)


__all__ = ["Modality", "MODALITIES", "build_modality", "modality_from_config", "view_fn", "LabModality", "DepthModality", "EdgesModality", "IdentityModality"]
