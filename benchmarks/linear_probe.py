"""Linear probe on cached features against recomputing the frozen encoder every epoch.

Both train the same linear layer with the same SGD schedule, the same initialisation and the
same mini-batch order on the same frozen encoder (eval mode, no augmentation), so they differ
only in where the features come from: a tensor filled by one inference pass (xmodal's
``linear_probe``), or the encoder run again on every batch of every epoch (what a probe written
as an ordinary training loop does). Prints wall time, speed-up and both test accuracies.

    python benchmarks/linear_probe.py [--epochs 30] [--arch resnet8 --width 16]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from xmodal.data import build_dataset
from xmodal.modalities import build_modality
from xmodal.models import build_model
from xmodal.tasks.linear_probe import ProbeConfig, standardise, train_linear


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, view, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([encoder(view({"image": images[i : i + batch_size]})).pooled
                      for i in range(0, len(images), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = ProbeConfig(epochs=args.epochs)
    view = build_modality("lab").views
    ab = lambda batch: view(batch, ["ab"])["ab"]  # noqa: E731
    train = build_dataset("synthetic", None, "train", num_samples=args.train)
    test = build_dataset("synthetic", None, "test", num_samples=args.test)
    train_images = torch.stack([train[i]["image"] for i in range(len(train))])
    test_images = torch.stack([test[i]["image"] for i in range(len(test))])
    train_y, test_y = train.labels, test.labels
    torch.manual_seed(args.seed)
    encoder = build_model(args.arch, in_channels=2, width=args.width).eval()

    start = time.perf_counter()
    train_x, test_x = encode(encoder, train_images, ab), encode(encoder, test_images, ab)
    train_s, test_s = standardise(train_x, test_x)
    probe = train_linear(train_s, train_y, 10, cfg, args.seed)
    cached_s = time.perf_counter() - start
    cached_acc = 100 * float((probe(test_s).argmax(1) == test_y).float().mean())

    # The uncached probe: the same loop, initialisation and batch order (train_linear), but each
    # batch's features come from a fresh encoder pass, as in an ordinary training loop.
    start = time.perf_counter()
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)

    @torch.no_grad()
    def recompute(rows: torch.Tensor) -> torch.Tensor:
        return (encoder(ab({"image": train_images[rows]})).pooled - mean) / std

    probe2 = train_linear(train_s, train_y, 10, cfg, args.seed, batch_features=recompute)
    test_again = (encode(encoder, test_images, ab) - mean) / std
    recompute_s = time.perf_counter() - start
    recompute_acc = 100 * float((probe2(test_again).argmax(1) == test_y).float().mean())

    print(f"{args.arch} width {args.width}, ab view, {args.train} train / {args.test} test synthetic images, "
          f"{args.epochs} probe epochs, threads={torch.get_num_threads()}")
    print(f"{'':22s} {'seconds':>8s} {'top-1':>7s}")
    print(f"{'cached features':22s} {cached_s:>8.2f} {cached_acc:>7.2f}")
    print(f"{'encoder every epoch':22s} {recompute_s:>8.2f} {recompute_acc:>7.2f}")
    print(f"speed-up {recompute_s / cached_s:.1f}x, accuracy difference {abs(cached_acc - recompute_acc):.2f} points")


if __name__ == "__main__":
    main()
