"""ImageFolder trees: ``root/<class>/<image>.jpg|png``, e.g. the CIFAR-10 JPEG set."""
from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import functional as TF

from xmodal.data.augment import ImageAugment
from xmodal.data.base import ImageDataset, PathLike, existing_dir
from xmodal.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""Suffixes (any case) that torchvision's decoder reads; other files are ignored."""


def list_image_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """``(classes, files, labels)`` of an ImageFolder tree, both levels sorted by name.

    ``files`` are paths relative to ``root`` (short strings keep a 1M-image list small).
    """
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        names = sorted(
            entry.name
            for entry in os.scandir(root / name)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        files += [f"{name}/{file}" for file in names]
        labels += [label] * len(names)
    if not files:
        raise DataError(
            f"no images found under {root}, expected {root}/<class>/<image>.jpg "
            f"(one folder per class; suffixes {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, files, labels


def balanced_subset(labels: Tensor, num_samples: int, seed: int) -> Tensor:
    """Sorted indices of ``num_samples`` samples, as equal per class as possible.

    Each class gives ``num_samples // C`` samples, and ``num_samples % C`` classes (chosen by
    ``seed``) one more; which samples is also chosen by ``seed``.
    """
    classes = torch.unique(labels)
    if not 0 < num_samples <= len(labels):
        raise DataError(f"subset of {num_samples} images requested from a set of {len(labels)}")
    gen = torch.Generator().manual_seed(seed)
    quota = torch.full((len(classes),), num_samples // len(classes))
    quota[torch.randperm(len(classes), generator=gen)[: num_samples % len(classes)]] += 1
    picked = []
    for cls, count in zip(classes.tolist(), quota.tolist()):
        members = (labels == cls).nonzero()[:, 0]
        if count > len(members):
            raise DataError(f"subset of {num_samples} needs {count} images of class {cls}, which has {len(members)}")
        picked.append(members[torch.randperm(len(members), generator=gen)[:count]])
    return torch.cat(picked).sort().values


def decode_file(path: Path) -> Tensor:
    """``(3, H, W)`` uint8 RGB of one image file; DataError naming the file if it is unreadable.

    Images as people have them become 8-bit RGB: grey, grey + alpha, palette and RGBA files are
    converted (alpha dropped), CMYK JPEGs converted to RGB, 16-bit PNGs scaled to 8 bits (rounded),
    and a JPEG's EXIF orientation applied, as a photo viewer shows it.
    """
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, OSError, ValueError) as error:
        # torchvision's messages carry a C++ source location; keep only the reason after it.
        reason = re.sub(r"^.*?\.cpp:\d+,\s*", "", str(error).splitlines()[0]).split(". ")[0].rstrip(".")
        raise DataError(f"cannot decode image {path}: expected a valid JPEG/PNG/WebP file ({reason})") from error
    if image.dtype == torch.uint16:  # 16-bit PNG: 0..65535 -> 0..255, rounded
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image


@functools.lru_cache(maxsize=4)
def decode_all(paths: tuple[Path, ...]) -> tuple[Tensor, ...]:
    """Every file of ``paths`` decoded (see :func:`decode_file`), memoised per process."""
    return tuple(decode_file(path) for path in paths)


class ImageFolderDataset(ImageDataset):
    """Images in ``root/<class>/<image>`` with the class index (sorted folder names) as label.

    Args:
        root: the tree's root, e.g. ``/data/cifar10/train``.
        labeled: report labels; False gives -1 (``class_labels`` keeps the true classes).
        subset: keep a deterministic, class-balanced subset of this many images.
        seed: chooses the subset and seeds the augmentation.
        augment, size: see :class:`~xmodal.data.augment.ImageAugment`. Images of different
            sizes need ``size`` to be batched.
        cache: decode every image once, now, and keep the uint8 pixels in memory (CIFAR-sized
            sets: 50,000 images take 150 MB and spare each epoch 50,000 JPEG decodes; a corrupt
            file is then reported before training starts). The decode is shared by every
            dataset of this process that reads the same files (a recipe's stages open the same
            split several times).
    """

    def __init__(
        self,
        root: PathLike,
        labeled: bool = True,
        subset: Optional[int] = None,
        seed: int = 0,
        augment: Union[ImageAugment, str, None] = None,
        size: Optional[int] = None,
        cache: bool = False,
    ) -> None:
        self.root = existing_dir(root)
        classes, files, labels = list_image_folder(self.root)
        class_labels = torch.tensor(labels, dtype=torch.int64)
        if subset is not None:
            keep = balanced_subset(class_labels, subset, seed)
            files, class_labels = [files[i] for i in keep.tolist()], class_labels[keep]
        super().__init__(class_labels, classes, labeled, augment, size, seed)
        self.files = files
        self.cached: Optional[tuple[Tensor, ...]] = None
        if cache:
            self.cached = decode_all(tuple(self.path(i) for i in range(len(files))))
        # Without a size, a batch needs one shape: images of another size than the first are
        # resized to it (said once per process when it happens).
        self.image_size: Optional[tuple[int, int]] = None
        if size is None:
            first = self.cached[0] if self.cached is not None else decode_file(self.path(0))
            self.image_size = (int(first.shape[-2]), int(first.shape[-1]))
        self._said = False

    def path(self, index: int) -> Path:
        """The file of sample ``index``."""
        return self.root / self.files[index]

    def read_image(self, index: int) -> Tensor:
        image = self.cached[index] if self.cached is not None else decode_file(self.path(index))
        if self.image_size is not None and tuple(image.shape[-2:]) != self.image_size:
            if not self._said:
                self._said = True
                print(f"[xmodal] note: {self.path(index)} is {tuple(image.shape[-2:])}, not {self.image_size} like "
                      f"the first image of {self.root}: images of other sizes are resized to {self.image_size} "
                      "(set data.options.size to choose the size)", file=sys.stderr, flush=True)
            image = TF.resize(image, list(self.image_size), antialias=True)
        return image

    def verify(self) -> int:
        """Check every file's header (fast: nothing is decoded); returns the number checked.

        Raises:
            DataError: listing the unreadable files (the first ten by name).
        """
        bad = []
        for name in self.files:
            try:
                with Image.open(self.root / name) as image:
                    image.verify()
            except (OSError, SyntaxError, ValueError) as error:
                bad.append(f"{self.root / name} ({error})")
        if bad:
            shown = "\n  ".join(bad[:10])
            raise DataError(f"{len(bad)} of {len(self.files)} images under {self.root} are unreadable:\n  {shown}")
        return len(self.files)
