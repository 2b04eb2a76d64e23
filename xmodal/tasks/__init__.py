"""Tasks by name. A recipe's ``task:`` picks one; each module of this package that defines a task
registers it with :func:`register_task`, so adding a task is one file here.

A task is a config schema (a dataclass of :mod:`xmodal.schema` sections), a runner
``run(cfg, engine) -> report`` and the evaluation protocols its rows report (:data:`PROTOCOLS`).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

#: How a student is judged, by the ``protocol`` its report rows carry.
PROTOCOLS = {
    "linear_probe": "a linear classifier on the student's frozen pooled features of its own view",
    "finetune": "the whole student trained with labels from its distilled weights, scored on the test split",
    "segmentation": "the student's encoder under a U-Net/FPN decoder (frozen or finetuned): pixel accuracy, mIoU",
    "test": "the student's own classifier, trained with the distillation, scored on the test split (top-1)",
}


@dataclass(frozen=True)
class Task:
    """A registered task: its schema, runner and the protocols its rows report (``report.png`` is
    :func:`xmodal.report.plot` for every task)."""

    name: str
    schema: type
    run: Callable[..., dict[str, Any]]
    protocols: tuple[str, ...]

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0] if self.run.__doc__ else ""


_REGISTRY: dict[str, Task] = {}


def register_task(name: str, schema: type, protocols: tuple[str, ...]) -> Callable:
    """Decorator on a task's runner: ``@register_task("transfer", TransferConfig, ("linear_probe", ...))``."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"task {name!r}: unknown protocols {unknown}; expected among {sorted(PROTOCOLS)}")

    def wrap(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in _REGISTRY and _REGISTRY[name].run is not run:
            raise ValueError(f"task {name!r} is already registered by {_REGISTRY[name].run.__module__}")
        _REGISTRY[name] = Task(name, schema, run, tuple(protocols))
        return run

    return wrap


def tasks() -> dict[str, Task]:
    """Every registered task, by name. Every module of the package is imported (once; a module
    imported earlier on its own registered only its own task)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(_REGISTRY)
