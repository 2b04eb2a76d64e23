"""A stage, the trainable unit of a recipe, and its identity: what a checkpoint must match to be
resumed or reloaded, and the one line that names what differs when it does not."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.schema import TrainConfig


def _canonical(obj: Any) -> str:
    """The one serialisation of a stage's config that its fingerprint and its kept identity share."""
    return json.dumps(obj, sort_keys=True, default=str)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (a stage's config)."""
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:16]


def as_json(obj: Any) -> Any:
    """``obj`` as its fingerprint reads it (tuples as lists, other objects as strings)."""
    return json.loads(_canonical(obj))


_MISSING = "(absent)"


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configs (a key on one side only too)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now))
        return [d for k in keys for d in _differences(saved.get(k, _MISSING), now.get(k, _MISSING), f"{prefix}{k}.")]
    return [] if saved == now else [prefix.rstrip(".") or "(the whole configuration)"]


def another_configuration(what: str, saved: Optional[Any], identity: Mapping[str, Any]) -> str:
    """The refusal of a stage trained otherwise, naming what differs where the folder recorded it."""
    if saved is None:  # folders from before the identity was kept beside the fingerprint
        return what
    keys = _differences(saved, as_json(identity))
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    ran = saved.get("precision", {}).get("cpu_bf16_convs") if isinstance(saved.get("precision"), dict) else None
    if "precision.cpu_bf16_convs" in keys and ran:
        # cpu_bf16_convs=auto resolves by the host's CPU: a folder begun on another machine says how to go on
        shown += f"; cpu_bf16_convs={ran} runs it as it ran"
    return f"{what} (it differs in {shown})" if keys else what


@dataclass
class Stage:
    """One trainable unit of a recipe.

    Attributes:
        name: folder name under ``<output_dir>/stages/`` (e.g. ``distill-crd``).
        module: everything trainable, in one module (DDP wraps it as a whole).
        step: ``step(module, batch) -> {"loss": total, term: value, ...}`` (autocast is on).
        dataset: yields dict samples.
        epochs, batch_size: the schedule; ``batch_size`` is global (all ranks together).
        optimizer: builds the optimizer from the module's trainable parameters.
        lr_lambda: epoch -> learning-rate factor.
        config: what defines this stage; a checkpoint of another config is refused.
        frozen: modules moved to the device and kept in eval mode (teachers).
        on_epoch_start: called with the epoch before its batches (e.g. ``dataset.set_epoch``).
        data_seed: the seed of its data order (``None``: the run's), e.g. each teacher of an
            ensemble its own.
    """

    name: str
    module: nn.Module
    step: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]]
    dataset: Dataset
    epochs: int
    batch_size: int
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    lr_lambda: Callable[[int], float] = lambda epoch: 1.0
    config: Mapping[str, Any] = field(default_factory=dict)
    frozen: Mapping[str, nn.Module] = field(default_factory=dict)
    on_epoch_start: Optional[Callable[[int], None]] = None
    data_seed: Optional[int] = None

    @classmethod
    def on_schedule(cls, train: TrainConfig, **fields: Any) -> "Stage":
        """A stage on ``train``'s schedule (epochs, batch size, optimizer, learning-rate curve);
        ``fields`` are the rest of the stage."""
        return cls(epochs=train.epochs, batch_size=train.batch_size, optimizer=train.optim.build,
                   lr_lambda=train.optim.lr_lambda(train.epochs), **fields)
