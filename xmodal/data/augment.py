"""Deterministic, geometric-only augmentation for the data workers.

Every random choice is drawn from a random source seeded by ``(seed, epoch, index)``
(:func:`sample_generator`), so a sample's augmentation is a pure function of those three
numbers: it never depends on the worker, the rank or the number of processes, and a resumed
run replays exactly the same crops. No colour maths happens here: the Lab conversion runs
later, on the device, on the whole batch.

Two families:

- :class:`ImageAugment` for classification/colour sets (32-96 px): random crop with zero
  padding + horizontal flip (CIFAR style), or random-resized-crop + flip (CMC style on STL-10).
- :class:`RGBDAugment` for NYU-Depth-V2: one random scale/crop/flip applied jointly to RGB
  (bilinear), depth (nearest, so missing zeros never blur into valid depths) and the
  segmentation mask (nearest).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from xmodal.errors import DataError

IMAGE_MODES = ("none", "crop", "resized_crop")
# NEAREST_EXACT samples pixel centres like bilinear does; legacy NEAREST is off by half a
# pixel, which would misalign depth/mask against the RGB image.
_NEAREST = InterpolationMode.NEAREST_EXACT


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a 64-bit mixing function (adjacent inputs -> unrelated outputs)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_generator(seed: int, epoch: int, index: int) -> random.Random:
    """A random source that depends only on ``(seed, epoch, index)``.

    The triple is hashed (chained SplitMix64), so neighbouring indices or epochs get unrelated
    streams (a plain ``seed + index`` would make sample i of epoch e+1 repeat sample i+1 of
    epoch e). Python's ``random.Random`` rather than a ``torch.Generator``: a handful of draws
    per image costs about a microsecond instead of tens, which matters in the per-sample path.
    """
    if min(seed, epoch, index) < 0:
        raise DataError(f"augmentation seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    state = 0
    for part in (seed, epoch, index):
        state = _splitmix64(state ^ part)
    return random.Random(state)


def _coin(generator: random.Random) -> bool:
    return generator.random() < 0.5


def default_padding(side: int) -> int:
    """CIFAR's 4 px of padding at 32 px, scaled with the image side (12 px at 96 px)."""
    return max(1, round(4 * side / 32))


def random_crop_flip(image: Tensor, generator: random.Random, padding: Optional[int] = None) -> Tensor:
    """Random crop of the zero-padded image back to its size, then a coin-flip mirror.

    Args:
        image: ``(C, H, W)``, any dtype.
        padding: pixels of zero padding on every side; ``None`` = :func:`default_padding`.

    Returns:
        ``(C, H, W)``, same dtype.
    """
    height, width = image.shape[-2:]
    pad = default_padding(min(height, width)) if padding is None else padding
    top, left = generator.randint(-pad, pad), generator.randint(-pad, pad)
    # The box [top, top + H) x [left, left + W) of the zero-padded image: copy the part that
    # overlaps the image into zeros (two slices; no padded copy of the whole image).
    out = torch.zeros_like(image)
    rows = slice(max(0, -top), min(height, height - top))
    cols = slice(max(0, -left), min(width, width - left))
    out[..., rows, cols] = image[..., max(0, top) : max(0, top) + rows.stop - rows.start,
                                 max(0, left) : max(0, left) + cols.stop - cols.start]
    return out.flip(-1) if _coin(generator) else out


def resized_crop_box(
    height: int, width: int, generator: random.Random, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random box covering ``scale`` of the area with aspect in ``ratio``.

    The same rule as torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre
    crop), but drawn from ``generator`` instead of the global RNG.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * generator.uniform(*scale)
        aspect = math.exp(generator.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return generator.randint(0, height - h), generator.randint(0, width - w), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(
    image: Tensor,
    generator: random.Random,
    size: int,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """CMC-style random-resized-crop to ``size`` x ``size`` (bilinear, antialiased) + mirror.

    ``(C, H, W)`` -> ``(C, size, size)``, same dtype.
    """
    top, left, h, w = resized_crop_box(*image.shape[-2:], generator, scale, ratio)
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    return TF.horizontal_flip(out) if _coin(generator) else out


def resize_center(image: Tensor, size: Optional[int]) -> Tensor:
    """Deterministic eval view: shorter side to ``size``, then the centre ``size`` x ``size``.

    ``(C, H, W)`` -> ``(C, size, size)``; returned unchanged when ``size`` is ``None`` or the
    image already is ``size`` x ``size``.
    """
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])


@dataclass(frozen=True)
class ImageAugment:
    """Augmentation of one ``(3, H, W)`` uint8 image of a classification/colour set.

    Attributes:
        mode: ``"none"``; ``"crop"`` = padded random crop + flip (at ``size`` when given);
            ``"resized_crop"`` = random-resized-crop to ``size`` + flip (``size`` required).
        size: output side in pixels; ``None`` keeps the stored size. Eval views are resized
            (shorter side) and centre-cropped to it.
        padding: zero padding for ``"crop"``; ``None`` = 4 px per 32 px of image side.
        scale: area fraction range for ``"resized_crop"`` (CMC uses (0.3, 1)).
    """

    mode: str = "none"
    size: Optional[int] = None
    padding: Optional[int] = None
    scale: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise DataError(f"unknown augmentation {self.mode!r}; expected one of {IMAGE_MODES}")
        if self.mode == "resized_crop" and self.size is None:
            raise DataError("augmentation 'resized_crop' needs a target size (e.g. size=64)")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise DataError(f"resized_crop scale must satisfy 0 < low <= high <= 1, got {self.scale}")

    @classmethod
    def of(cls, spec: Union["ImageAugment", str, None], size: Optional[int] = None) -> "ImageAugment":
        """Accept a mode name, ``None`` (no augmentation) or an instance; ``size`` overrides."""
        if isinstance(spec, ImageAugment):
            return spec if size is None else replace(spec, size=size)
        return cls(mode=spec or "none", size=size)

    @property
    def random(self) -> bool:
        """Whether this augmentation draws random numbers (needs a generator)."""
        return self.mode != "none"

    def __call__(self, image: Tensor, generator: Optional[random.Random] = None) -> Tensor:
        """``(3, H, W)`` uint8 -> ``(3, S, S)`` uint8 (S = ``size`` or the input side).

        Without a generator the deterministic eval view is returned.
        """
        if generator is None or self.mode == "none":
            return resize_center(image, self.size)
        if self.mode == "crop":
            return random_crop_flip(resize_center(image, self.size), generator, self.padding)
        return random_resized_crop_flip(image, generator, self.size, self.scale)


def _window(src: tuple[int, int], out: tuple[int, int], zoom: float) -> tuple[int, int]:
    """Height and width of the largest source window with the output's aspect, shrunk by ``zoom``."""
    fit = min(src[0] / out[0], src[1] / out[1])
    return max(1, round(out[0] * fit / zoom)), max(1, round(out[1] * fit / zoom))


def _resized_crop_rgbd(
    image: Tensor, depth: Tensor, mask: Tensor, box: tuple[int, int, int, int], size: tuple[int, int], flip: bool
) -> tuple[Tensor, Tensor, Tensor]:
    top, left, h, w = box
    image = TF.resized_crop(image, top, left, h, w, list(size), antialias=True)
    depth = TF.resized_crop(depth, top, left, h, w, list(size), interpolation=_NEAREST)
    mask = TF.resized_crop(mask[None], top, left, h, w, list(size), interpolation=_NEAREST)[0]
    if flip:
        image, depth, mask = TF.horizontal_flip(image), TF.horizontal_flip(depth), TF.horizontal_flip(mask)
    return image, depth, mask


@dataclass(frozen=True)
class RGBDAugment:
    """Joint geometry for one NYU frame: RGB ``(3, H, W)`` uint8, depth ``(1, H, W)`` float32,
    mask ``(H, W)`` int64.

    Eval: the centre window with the target aspect (the whole frame when aspects match),
    resized to ``size``. Train: the same window shrunk by a random zoom in ``scale`` (i.e. the
    frame scaled up by that factor), placed at random, resized to ``size``, mirrored on a coin
    flip — one draw for all three tensors, so they stay pixel-aligned.

    Attributes:
        size: ``(H, W)`` of the output, e.g. ``(240, 320)``; ``None`` keeps the frame's size.
        scale: zoom range for training (>= 1; 1 = no zoom).
    """

    size: Optional[tuple[int, int]] = (240, 320)
    scale: tuple[float, float] = (1.0, 1.5)

    def __post_init__(self) -> None:
        if not 1 <= self.scale[0] <= self.scale[1]:
            raise DataError(f"RGB-D zoom range must satisfy 1 <= low <= high, got {self.scale}")

    def __call__(
        self, image: Tensor, depth: Tensor, mask: Tensor, generator: Optional[random.Random] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(image, depth, mask)`` at ``size``; eval view when ``generator`` is None."""
        src = (int(image.shape[-2]), int(image.shape[-1]))
        size = src if self.size is None else tuple(self.size)
        zoom = 1.0 if generator is None else generator.uniform(*self.scale)
        h, w = _window(src, size, zoom)
        if generator is None:
            if (h, w) == src == size:
                return image, depth, mask
            box, flip = ((src[0] - h) // 2, (src[1] - w) // 2, h, w), False
        else:
            box = (generator.randint(0, src[0] - h), generator.randint(0, src[1] - w), h, w)
            flip = _coin(generator)
        return _resized_crop_rgbd(image, depth, mask, box, size, flip)
