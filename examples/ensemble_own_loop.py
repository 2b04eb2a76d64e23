"""Several teachers into one student in your own loop: ``ensemble.EnsembleDistillLoss`` keeps one
CRD critic per teacher (own heads and banks, one shared draw of negatives) and adds cross-entropy
and KD from the teachers' averaged soft labels.

    python examples/ensemble_own_loop.py            # random labeled images, a few steps
    python examples/ensemble_own_loop.py --tiny     # what CI runs

Features are given as ``losses.Features``: here only ``pooled`` and ``logits`` of torchvision
ResNets (the critics read ``pooled``, CE and KD read ``logits``).
"""
from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn

from ensemble import EnsembleDistillLoss
from losses import Features


def features(net: nn.Module, x: torch.Tensor) -> Features:
    """A torchvision ResNet's pooled features and logits as ``losses.Features``."""
    body = nn.Sequential(*list(net.children())[:-1])
    pooled = torch.flatten(body(x), 1)
    return Features(maps=[], pooled=pooled, logits=net.fc(pooled))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a few images and steps (CI)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, size, classes = (64, 32, 4) if args.tiny else (256, 64, 10)
    images, labels = torch.rand(n, 3, size, size), torch.randint(0, classes, (n,))
    teachers = [torchvision.models.resnet18(num_classes=classes).eval().requires_grad_(False) for _ in range(2)]
    student = torchvision.models.resnet18(num_classes=classes)

    with torch.no_grad():
        sample = [features(t, images[:8]) for t in teachers]
    loss_fn = EnsembleDistillLoss.from_features(features(student, images[:8]), sample, n_data=n, num_classes=classes,
                                                crd_weights=0.8, kd_weight=1.0, nce_k=min(4096, n // 2),
                                                negatives="class", labels=labels)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(loss_fn.parameters()), lr=0.005, momentum=0.9)
    for step, start in enumerate(range(0, n, 16)):
        index = torch.arange(start, start + 16)
        x, y = images[index], labels[index]
        with torch.no_grad():
            teacher_feats = [features(t, x) for t in teachers]
        terms = loss_fn(features(student, x), teacher_feats, index, y)  # {"loss", "ce", "kd", "crd_0", "crd_1"}
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        print(f"step {step + 1}: loss {terms['loss'].item():.4f} " +
              " ".join(f"{k} {v.item():.3f}" for k, v in terms.items() if k != "loss"))


if __name__ == "__main__":
    main()
