"""Your own network, distilled by xmodal's step: ``xmodal.models.from_module`` names which of its
layers give the stage maps, and the :class:`xmodal.distiller.Distiller` trains it from a teacher
on another view of the same images (here L teaches ab, the Lab pair), one CRD critic.

    python examples/own_module.py            # random images, a few steps: shows the moving parts
    python examples/own_module.py --tiny     # what CI runs
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from xmodal.distiller import Distiller
from xmodal.modalities import build_modality
from xmodal.models import build_model, from_module


class MyNet(nn.Module):
    """A network of your own, written with no thought of xmodal."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)).mean(dim=(2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a handful of steps on 64 images")
    args = parser.parse_args()
    n, steps = (64, 3) if args.tiny else (512, 20)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)  # your RGB images, uint8 or [0, 1]

    lab = build_modality("lab", teacher_view="L", student_view="ab")
    student = from_module(MyNet(in_channels=2), maps=["block1.2", "block2.2"], in_channels=2)
    teacher = build_model("resnet8", in_channels=1, width=8).eval()  # a trained L network in practice
    batch = {"image": images[:32], "index": torch.arange(32)}
    distiller = Distiller.build(student, "ab", [(teacher, "L")], lab, {"crd": 0.8}, batch, n_data=n,
                                options={"crd": {"nce_k": min(256, n - 1), "normaliser": "ema", "z_momentum": 0.0}})
    distiller.warm_start({"image": images[i:i + 32], "index": torch.arange(i, i + 32)} for i in range(0, n, 32))
    optimiser = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)  # student and critic heads
    for step in range(steps):
        index = torch.randperm(n)[:32]
        terms = distiller.training_step({"image": images[index], "index": index})
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
        print(f"step {step}: loss {terms['loss'].item():.4f}")


if __name__ == "__main__":
    main()
