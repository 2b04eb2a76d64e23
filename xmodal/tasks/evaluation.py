"""Inference passes shared by the tasks: top-1 accuracy and pooled-feature extraction.

Each rank runs its share of every batch; results are gathered and put back in dataset order
by the samples' ``index``, so the numbers do not depend on the number of processes.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xmodal.engine import Engine

ViewFn = Callable[[Mapping[str, Tensor]], Tensor]


@torch.no_grad()
def extract(engine: Engine, model: nn.Module, dataset: Dataset, view: ViewFn, batch_size: int = 256,
            desc: str = "features") -> tuple[Tensor, Tensor, Tensor]:
    """Pooled features, logits-free, of every sample, in dataset order.

    Args:
        model: a backbone returning :class:`losses.Features`.
        view: batch -> the tensor ``model`` sees (e.g. the student view of a modality).

    Returns:
        ``features`` ``(N, D)`` float32 on the CPU, ``labels`` ``(N,)``, ``logits`` ``(N, C)`` or
        an empty ``(N, 0)`` tensor when the model has no classifier.
    """
    was_training = model.training
    model.eval().to(engine.device)
    rows, feats, labels, logits = [], [], [], []
    for batch in engine.batches(dataset, batch_size, desc):
        with engine.autocast():
            out = model(view(batch))
        rows.append(batch["index"])
        feats.append(out.pooled.float())
        labels.append(batch.get("label", torch.full_like(batch["index"], -1)))
        logits.append(out.logits.float() if out.logits is not None else out.pooled.new_zeros((len(batch["index"]), 0)))
    model.train(was_training)
    index = engine.gather_rows(torch.cat(rows))
    order = torch.argsort(index)
    return tuple(engine.gather_rows(torch.cat(t))[order].cpu() for t in (feats, labels, logits))  # type: ignore[return-value]


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent over rows with a label (``labels >= 0``)."""
    keep = labels >= 0
    if not bool(keep.any()):
        return float("nan")
    return 100.0 * float((logits[keep].argmax(1) == labels[keep]).float().mean())


def classify_top1(engine: Engine, model: nn.Module, dataset: Dataset, view: ViewFn, desc: str = "eval") -> float:
    """Top-1 accuracy (percent) of ``model``'s classifier on ``dataset``."""
    _, labels, logits = extract(engine, model, dataset, view, desc=desc)
    return top1(logits, labels)
