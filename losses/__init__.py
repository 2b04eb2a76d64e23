"""Distillation losses: the CRD contrastive core and the baseline loss zoo.

``losses.build(name, **kwargs)`` constructs a loss by name; ``losses.available()`` lists names.
This package depends on torch only; it never imports ``xmodal``.
"""
from losses.base import DistillLoss
from losses.features import Features
from losses.registry import available, build, get, register

__all__ = ["DistillLoss", "Features", "available", "build", "get", "register"]
