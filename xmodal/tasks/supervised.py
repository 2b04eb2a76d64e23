"""Pieces every task shares: a seeded backbone, and a stage that trains it with labels."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.engine import Stage
from xmodal.models import build_model
from xmodal.schema import ModelConfig, TrainConfig


def build_backbone(model: ModelConfig, in_channels: int, num_classes: int, seed: int) -> nn.Module:
    """``model``'s backbone, initialised from ``seed`` (so every method's student starts alike)."""
    torch.manual_seed(seed)
    return build_model(model.arch, in_channels=in_channels, num_classes=num_classes, **model.options)


def supervised_stage(name: str, model: nn.Module, dataset: Dataset, view: Callable[[Mapping[str, Tensor]], Tensor],
                     train: TrainConfig, record: Mapping[str, Any]) -> Stage:
    """A stage that trains ``model``'s classifier and body with cross-entropy on ``view``."""

    def step(wrapped, batch):
        loss = F.cross_entropy(wrapped(view(batch)).logits, batch["label"])
        return {"loss": loss, "ce": loss}

    return Stage(name=name, module=model, step=step, dataset=dataset, epochs=train.epochs,
                 batch_size=train.batch_size, optimizer=train.optim.build,
                 lr_lambda=train.optim.lr_lambda(train.epochs), config=record,
                 on_epoch_start=getattr(dataset, "set_epoch", None))
