"""What an ImageNet luminance teacher's soft labels mean at each input size, and what it costs.

KD distils the teacher's predictions; a 32 px image upsampled to 64 px is far from the 224 px
ImageNet photos the weights know, so its soft labels may be noise. For each ``input_size`` this
prints, on the luminance of CIFAR-10 test images (the Lab modality's ``L_grey`` view):

- ``agree``: how often the top-1 class equals the same network's top-1 on the RGB image at its
  ImageNet resolution (what the teacher would answer at its best);
- ``classes``: distinct top-1 classes over the images (a few hundred for 1,000 images: noise);
- ``p_max``: the mean probability of the top class;
- ``img/s``: teacher forward throughput on this machine (no grad, batch 100), with the ratio to
  the smallest size.

    python benchmarks/teacher_input_size.py --root /tmp/data/cifar10 [--arch efficientnet_lite0] [--images 1000]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from xmodal.modalities import build_modality
from xmodal.modalities.base import normalize_rgb
from xmodal.models import build_model
from xmodal.models.efficientnet import VARIANTS


def _images(root: Path, count: int) -> torch.Tensor:
    folders = sorted(p for p in (root / "test").iterdir() if p.is_dir())
    per = -(-count // len(folders))
    files = [f for folder in folders for f in sorted(folder.glob("*.jpg"))[:per]][:count]
    return torch.stack([pil_to_tensor(Image.open(f).convert("RGB")) for f in files])


@torch.no_grad()
def _predict(model, x: torch.Tensor, batch: int = 100) -> tuple[torch.Tensor, float]:
    out, began = [], time.perf_counter()
    for i in range(0, len(x), batch):
        out.append(model(x[i : i + batch]).logits.softmax(dim=1))
    return torch.cat(out), len(x) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="CIFAR-10 as an ImageFolder (train/, test/)")
    parser.add_argument("--arch", default="efficientnet_lite0", choices=sorted(VARIANTS))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128, 160, 224])
    args = parser.parse_args()
    torch.manual_seed(0)
    images = _images(args.root, args.images)
    grey = build_modality("lab").views({"image": images}, ["L_grey"])["L_grey"]
    native = VARIANTS[args.arch]
    rgb_net = build_model(args.arch, 3, 1000, pretrained=True, input_size=native).eval()
    rgb = normalize_rgb(images.float() / 255.0, "lite0")
    reference, _ = _predict(rgb_net, rgb)
    answer = reference.argmax(dim=1)
    print(f"{args.arch}, {len(images)} CIFAR-10 test images, threads {torch.get_num_threads()}; reference: "
          f"RGB at {native} px ({answer.unique().numel()} distinct top-1 classes, p_max {reference.max(1).values.mean():.2f})")
    print(f"{'input_size':>10} {'agree %':>8} {'classes':>8} {'p_max':>6} {'img/s':>8} {'cost':>6}")
    first = None
    for size in args.sizes:
        net = build_model(args.arch, 1, 1000, pretrained=True, input_size=size).eval()
        probs, speed = _predict(net, grey)
        first = first or speed
        top = probs.argmax(dim=1)
        print(f"{size:>10} {100 * (top == answer).float().mean():>8.1f} {top.unique().numel():>8} "
              f"{probs.max(1).values.mean():>6.2f} {speed:>8.0f} {first / speed:>5.1f}x")
    # The same network on grey RGB (three equal channels) gives the one-channel net's answers.
    check = build_model(args.arch, 3, 1000, pretrained=True, input_size=64).eval()
    one = build_model(args.arch, 1, 1000, pretrained=True, input_size=64).eval()
    with torch.no_grad():
        gap = (check(grey[:8].expand(-1, 3, -1, -1)).logits - one(grey[:8]).logits).abs().max()
    print(f"one-channel stem vs RGB network on the grey image: largest logit difference {gap:.1e}")


if __name__ == "__main__":
    main()
