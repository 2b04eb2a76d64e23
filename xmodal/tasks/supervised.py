"""Pieces every task shares: a seeded backbone, and a stage that trains it with labels."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.engine import Engine
from xmodal.stage import Stage
from xmodal.models import build_model, save_backbone
from xmodal.models.base import keep_stem_fp32
from xmodal.schema import ModelConfig, TrainConfig


def configured_model(model: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """``model``'s network as its config asks: the arch with its options, the stem in float32
    under autocast when ``model.fp32_stem``."""
    net = build_model(model.arch, in_channels=in_channels, num_classes=num_classes, **model.options)
    if model.fp32_stem:
        keep_stem_fp32(net, model.arch)
    return net


def build_backbone(model: ModelConfig, in_channels: int, num_classes: int, seed: int) -> nn.Module:
    """``model``'s backbone, initialised from ``seed`` (so every method's student starts alike)."""
    torch.manual_seed(seed)
    return configured_model(model, in_channels, num_classes)


def supervised_stage(name: str, model: nn.Module, dataset: Dataset, view: Callable[[Mapping[str, Tensor]], Tensor],
                     train: TrainConfig, record: Mapping[str, Any],
                     loss: Optional[Callable[[Any, Mapping[str, Tensor]], Tensor]] = None,
                     data_seed: Optional[int] = None) -> Stage:
    """A stage that trains ``model`` on ``view(batch)`` with ``loss(output, batch)``; by default
    cross-entropy of the classifier's logits against ``batch["label"]``. ``data_seed`` orders its
    data (the run's seed when ``None``)."""
    loss = loss or (lambda out, batch: F.cross_entropy(out.logits, batch["label"]))

    def step(wrapped, batch):
        value = loss(wrapped(view(batch)), batch)
        return {"loss": value, "ce": value}

    return Stage.on_schedule(train, name=name, module=model, step=step, dataset=dataset, config=dict(record),
                             on_epoch_start=getattr(dataset, "set_epoch", None), data_seed=data_seed)


def export(engine: Engine, name: str, model: nn.Module) -> None:
    """Write ``model`` to ``<output_dir>/<name>.safetensors`` (the main process, once): a backbone
    any safetensors reader opens, and that ``teacher.checkpoint=`` or ``load_backbone`` reads back."""
    path = engine.output_dir / f"{name}.safetensors"
    if engine.is_main and not path.exists():
        save_backbone(path, model)
