"""Distillation losses: the CRD contrastive core and the baseline loss zoo.

``losses.build(name, **kwargs)`` constructs a loss by name; ``losses.available()`` lists names.
This package depends on torch only; it never imports ``xmodal``.
"""
from losses.base import DistillLoss
from losses.features import Features
from losses.registry import available, build, get, register
# The baseline loss zoo: importing each module registers its loss by name.
from losses import ab, at, cc, fitnet, fsp, ft, kd, nst, pkt, rkd, sp, vid  # noqa: F401
from losses.crd import CRDLoss, InfoNCELoss  # registers "crd" and "infonce"

__all__ = ["CRDLoss", "InfoNCELoss", "DistillLoss", "Features", "available", "build", "get", "register"]
