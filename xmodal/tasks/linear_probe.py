"""Linear probe: one linear layer on a frozen encoder's pooled features.

A frozen encoder's features do not change between epochs, so they are extracted once (one
inference pass over the train and test sets) and the probe trains on the cached tensors: each
epoch is then a few small matrix products instead of a pass through the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.engine import Engine
from xmodal.tasks.evaluation import ViewFn, extract, top1


@dataclass
class ProbeConfig:
    """Training of the linear layer on cached features (standardised with the train statistics)."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


def train_linear(train_x: Tensor, train_y: Tensor, num_classes: int, cfg: ProbeConfig, seed: int = 0,
                 batch_features: Optional[Callable[[Tensor], Tensor]] = None) -> nn.Linear:
    """SGD with a cosine schedule on ``(train_x, train_y)``; deterministic for a given seed.

    Args:
        train_x: ``(N, D)`` standardised features.
        train_y: ``(N,)`` labels in ``[0, num_classes)``.
        batch_features: ``rows -> (len(rows), D)`` features of those rows, used instead of
            ``train_x[rows]`` (``benchmarks/linear_probe.py`` recomputes them with the encoder to
            time the uncached probe on exactly this loop).
    """
    g = torch.Generator().manual_seed(seed)
    probe = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1.0 / train_x.shape[1] ** 0.5
        probe.weight.uniform_(-bound, bound, generator=g)
        probe.bias.zero_()
    opt = torch.optim.SGD(probe.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(train_x) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    features = batch_features or train_x.__getitem__
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train_x), generator=g)
        for rows in order.split(cfg.batch_size):
            loss = F.cross_entropy(probe(features(rows)), train_y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe


def standardise(train_x: Tensor, *others: Tensor) -> list[Tensor]:
    """Subtract the train mean and divide by the train std (per feature) in every set."""
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp_min(1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def linear_probe(engine: Engine, encoder: nn.Module, train_set: Dataset, test_set: Dataset, view: ViewFn,
                 num_classes: int, cfg: ProbeConfig, seed: int = 0, name: str = "probe") -> dict[str, float]:
    """Top-1 (percent) of a linear probe on ``encoder``'s pooled features of ``view``.

    Features are extracted once, on every rank's share, and gathered; the probe itself is tiny
    and trains identically on every rank from the same seed.
    """
    train_x, train_y, _ = extract(engine, encoder, train_set, view, desc=f"{name} features (train)")
    test_x, test_y, _ = extract(engine, encoder, test_set, view, desc=f"{name} features (test)")
    train_x, test_x = standardise(train_x, test_x)
    probe = train_linear(train_x, train_y, num_classes, cfg, seed)
    with torch.no_grad():
        return {"top1": top1(probe(test_x), test_y), "train_top1": top1(probe(train_x), train_y)}
