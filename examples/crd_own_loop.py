"""CRD in your own training loop, on your own torchvision models: a frozen teacher, a student,
and ``losses.CRDLoss`` between their pooled features. No xmodal config, engine or recipe.

    python examples/crd_own_loop.py            # random images, a few steps: shows the moving parts
    python examples/crd_own_loop.py --tiny     # what CI runs

The dataset must return each image's row index (the memory banks hold one row per image).
``normaliser="ema", z_momentum=0.0`` and the warm-start pass are what xmodal's ``crd`` method
does; drop both for the paper's settings (``crd_paper``).
"""
from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset

import losses


class Indexed(Dataset):
    """Any dataset, with each sample's row index beside it."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def pooled(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's globally pooled features (everything before ``fc``)."""
    return torch.flatten(nn.Sequential(*list(net.children())[:-1])(x), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a few images and steps (CI)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, size, epochs = (64, 32, 1) if args.tiny else (512, 64, 2)
    data = Indexed(torch.rand(n, 3, size, size))
    loader = DataLoader(data, batch_size=16, shuffle=True, drop_last=True)

    teacher = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)  # yours, trained
    student = torchvision.models.resnet18(num_classes=10)
    crd = losses.CRDLoss(student_dim=512, teacher_dim=512, n_data=len(data), nce_k=min(4096, n - 1),
                         normaliser="ema", z_momentum=0.0)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(crd.parameters()), lr=0.05, momentum=0.9)

    with torch.no_grad():  # warm start: fill both memory banks with one inference pass
        student.eval()
        for x, index in DataLoader(data, batch_size=64):
            crd.warm_start(pooled(student, x), pooled(teacher, x), index)
        student.train()

    for epoch in range(epochs):
        for x, index in loader:
            with torch.no_grad():
                f_t = pooled(teacher, x)
            loss = 0.8 * crd(pooled(student, x), f_t, index)  # + your task loss, if you have labels
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: crd loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
