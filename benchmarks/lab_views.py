"""Lab views: xmodal's batched on-device conversion against per-image conversion in workers.

Both paths start from the same uint8 images and end with the normalised L and ab tensors a
teacher and a student consume, batch by batch:

* xmodal: DataLoader workers only hand over uint8 images; ``LabModality`` converts the whole
  batch on the device (``normalised_lab``: table lookup for 8-bit sRGB, a few fused passes);
* kornia, for reference: the same batches through ``kornia.color.rgb_to_lab`` and the same
  standardisation (what ``LabModality`` ran before ``normalised_lab``);
* per-image (as CMC and most public colour-transfer code do): each worker converts every image
  with ``skimage.color.rgb2lab`` in float64 numpy, normalises, splits L / ab, and the loader
  collates float tensors.

Measured on the built-in synthetic images (in memory, so decoding does not blur the
comparison) and, when given ``--jpeg-root``, on a JPEG ImageFolder where both paths also
decode files in the workers.

    pip install -e ".[bench]"     # scikit-image
    python benchmarks/lab_views.py [--jpeg-root /path/to/cifar10/train] [--workers 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xmodal.data import build_dataset
from xmodal.modalities.base import image_as_float
from xmodal.modalities.lab import LAB_MEAN, LAB_STD, LabModality


class PerImageLab(Dataset):
    """Wraps an xmodal dataset: each sample converted to (L, ab) float tensors in the worker."""

    def __init__(self, base: Dataset) -> None:
        from skimage.color import rgb2lab

        self.base, self.rgb2lab = base, rgb2lab
        self.mean, self.std = np.array(LAB_MEAN), np.array(LAB_STD)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image = self.base[i]["image"].permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        lab = (self.rgb2lab(image) - self.mean) / self.std
        lab = torch.from_numpy(lab.transpose(2, 0, 1).astype(np.float32))
        return lab[:1], lab[1:]


def _images_per_second(loader: DataLoader, convert, epochs: int, device: str) -> float:
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            teacher, student = convert(batch)
            count += teacher.shape[0]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: count them before the clock stops
    return count / (time.perf_counter() - start)


def compare(dataset: Dataset, workers: int, batch_size: int, epochs: int,
            device: str) -> tuple[float, float, float, float]:
    from kornia.color import rgb_to_lab

    lab = LabModality()
    mean = torch.tensor(LAB_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(LAB_STD, device=device)[None, :, None, None]
    # Workers persist across epochs and each loader has a warm-up epoch, so the timed epochs
    # measure steady throughput, not process start-up (which dominates a fast path's short epoch).
    options = dict(batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                   pin_memory=torch.device(device).type == "cuda")  # pinned, as the engine's loaders on a GPU
    batched = DataLoader(dataset, **options)
    per_image = DataLoader(PerImageLab(dataset), **options)

    def on_device(batch):
        return lab({"image": batch["image"].to(device)})

    def with_kornia(batch):
        lab_image = (rgb_to_lab(image_as_float({"image": batch["image"].to(device)})) - mean) / std
        return lab_image[:, :1], lab_image[:, 1:]

    def moved(batch):
        return batch[0].to(device), batch[1].to(device)

    def uint8_only(batch):  # the batched path's ceiling: what the workers hand over, on the device
        image = batch["image"].to(device)
        return image, image

    # Same numbers either way (xmodal, kornia and skimage implement the same CIE Lab):
    first = next(iter(batched))
    theirs_first = [PerImageLab(dataset)[i] for i in range(len(first["image"]))]
    ours_first = on_device(first)
    gap = max(float((ours_first[0].cpu() - torch.stack([t[0] for t in theirs_first])).abs().max()),
              float((ours_first[1].cpu() - torch.stack([t[1] for t in theirs_first])).abs().max()))
    print(f"  max |xmodal - skimage| over one batch, normalised units: {gap:.2e}")
    _images_per_second(batched, on_device, 1, device)  # warm-up: worker start-up, first kernels
    _images_per_second(batched, with_kornia, 1, device)
    _images_per_second(per_image, moved, 1, device)
    ours = _images_per_second(batched, on_device, epochs, device)
    kornia_rate = _images_per_second(batched, with_kornia, epochs, device)
    theirs = _images_per_second(per_image, moved, epochs, device)
    loader = _images_per_second(batched, uint8_only, epochs, device)
    return ours, kornia_rate, theirs, loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--resolution", type=int, default=96, help="synthetic image side (STL-10: 96)")
    parser.add_argument("--jpeg-root", default=None, help="an ImageFolder tree of JPEGs (e.g. cifar10/train)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device={args.device} workers={args.workers} batch={args.batch_size} threads={torch.get_num_threads()}")
    print(f"{'data':28s} {'xmodal img/s':>13s} {'kornia img/s':>13s} {'per-image img/s':>16s} {'speed-up':>9s}"
          f" {'uint8 loader alone img/s':>25s}")
    sets = [(f"synthetic {args.resolution}px (in memory)",
             build_dataset("synthetic", None, "unlabeled", num_samples=args.images, resolution=args.resolution))]
    if args.jpeg_root:
        sets.append(("JPEG ImageFolder", build_dataset("imagefolder", args.jpeg_root, "all", subset=args.images)))
    for name, dataset in sets:
        ours, kornia_rate, theirs, loader = compare(dataset, args.workers, args.batch_size, args.epochs, args.device)
        print(f"{name:28s} {ours:>13.0f} {kornia_rate:>13.0f} {theirs:>16.0f} {ours / theirs:>8.1f}x {loader:>25.0f}",
              flush=True)


if __name__ == "__main__":
    main()
