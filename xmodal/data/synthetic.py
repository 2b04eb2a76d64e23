"""SyntheticShapes: the built-in default dataset (no download), generated from a seed.

Built for the Lab colour-transfer recipe (teacher sees L, student sees ab). Each 32x32 image
holds one of ten shapes near the centre (+-2 px), at a random scale and rotation:

- the object is filled with one random chroma and the background with another, the two hues
  at least 60 degrees apart, drawn independently of the class: the mean colour of a class is
  the mean colour of every class, so colour statistics alone do not give the class away;
- the luminance shows the same shape with random contrast and polarity, plus a mild
  low-frequency texture and pixel noise.

So an ab network can only name the class by recognising the *shape* from chroma edges, the
information it shares with luminance — exactly what an L teacher can teach through CRD.
The two flat colours of each image are chosen in Lab and converted to sRGB with kornia; the
images are stored as uint8 sRGB like any other dataset, and the recipe's modality adapter
converts them back to Lab on the device. Generation is vectorised: ~2 s for 10k images on
two CPU cores.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import lab_to_rgb
from torch import Tensor

from xmodal.data.augment import ImageAugment
from xmodal.data.base import ImageDataset, check_split
from xmodal.errors import DataError


def _disc(u: Tensor, v: Tensor) -> Tensor:
    return u**2 + v**2 < 0.9**2


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) < 0.72


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    # Equilateral, circumradius 1: inside the three edges whose normals point at -90/30/150 deg.
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    return (-v < 0.5) & (c * u + s * v < 0.5) & (-c * u + s * v < 0.5)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    return ((u.abs() < 0.3) & (v.abs() < 0.95)) | ((v.abs() < 0.3) & (u.abs() < 0.95))


def _ring(u: Tensor, v: Tensor) -> Tensor:
    r2 = u**2 + v**2
    return (r2 > 0.55**2) & (r2 < 0.95**2)


def _stripes(u: Tensor, v: Tensor) -> Tensor:
    return (u.abs() < 0.9) & (v.abs() > 0.2) & (v.abs() < 0.6)


def _star(u: Tensor, v: Tensor) -> Tensor:
    phase = torch.remainder(torch.atan2(v, u) * 5 / (2 * math.pi), 1.0)
    peak = 1 - 2 * (phase - 0.5).abs()  # 1 at a point's axis, 0 halfway between points
    return u**2 + v**2 < (0.4 + 0.6 * (1 - peak)) ** 2


def _l_shape(u: Tensor, v: Tensor) -> Tensor:
    return (u.abs() < 0.85) & (v.abs() < 0.85) & ~((u > -0.25) & (v > -0.25))


def _ellipse(u: Tensor, v: Tensor) -> Tensor:
    return (u / 0.95) ** 2 + (v / 0.5) ** 2 < 1


def _diamond(u: Tensor, v: Tensor) -> Tensor:
    return u.abs() / 0.95 + v.abs() / 0.55 < 1


SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "disc": _disc, "square": _square, "triangle": _triangle, "cross": _cross, "ring": _ring,
    "stripes": _stripes, "star": _star, "l_shape": _l_shape, "ellipse": _ellipse, "diamond": _diamond,
}
"""Shape membership in object coordinates (object radius = 1), in class order."""

CLASSES = list(SHAPES)
SPLITS = {"unlabeled": 5000, "train": 2000, "test": 2000}
"""Default number of images per split."""

_SPLIT_CODES = {"unlabeled": 0, "train": 1, "test": 2}


class ShapeBatch(NamedTuple):
    """``images`` (N, 3, R, R) uint8 sRGB, ``labels`` (N,) int64, ``masks`` (N, R, R) float32
    object coverage in [0, 1] (soft at the edges)."""

    images: Tensor
    labels: Tensor
    masks: Tensor


def _object_coords(res: int, centre: Tensor, angle: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel centres of ``k`` images in object coordinates (rotated, radius = 1): 2 x ``(k, R, R)``."""
    axis = torch.arange(res, dtype=torch.float32) + 0.5
    dx = axis[None, None, :] - centre[:, 0, None, None]
    dy = axis[None, :, None] - centre[:, 1, None, None]
    cos, sin, r = angle.cos()[:, None, None], angle.sin()[:, None, None], radius[:, None, None]
    return (cos * dx + sin * dy) / r, (cos * dy - sin * dx) / r


def _coverage(labels: Tensor, gen: torch.Generator, res: int, jitter: Optional[float] = None) -> Tensor:
    """Object masks ``(n, R, R)`` in [0, 1]: shapes at random pose, edges softened by one pixel.

    ``jitter``: the centre lies within ``jitter`` x R of the image centre on each axis (clipped so
    the object fits); ``None``: anywhere the object fits.
    """
    n = len(labels)
    radius = res * (0.25 + 0.12 * torch.rand(n, generator=gen))  # 8-12 px at 32 px
    free = res - 2 * radius[:, None]  # room for the centre on each axis
    if jitter is not None:
        free = free.clamp(max=2 * jitter * res)
    centre = res / 2 + free * (torch.rand(n, 2, generator=gen) - 0.5)
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    inside = torch.empty(n, res, res)
    for label, shape in enumerate(SHAPES.values()):
        rows = (labels == label).nonzero()[:, 0]  # one class at a time: no wasted shape tests
        inside[rows] = shape(*_object_coords(res, centre[rows], angle[rows], radius[rows])).float()
    return _soften(inside)


def _soften(mask: Tensor) -> Tensor:
    """Separable [1, 2, 1] / 4 blur of ``(n, R, R)``: soft edges at a quarter of supersampling's cost."""
    for dim in (1, 2):
        padded = torch.cat([mask.narrow(dim, 0, 1), mask, mask.narrow(dim, -1, 1)], dim)
        size = mask.shape[dim]
        mask = (padded.narrow(dim, 0, size) + 2 * mask + padded.narrow(dim, 2, size)) / 4
    return mask


def _lab_colours(gen: torch.Generator, n: int) -> Tensor:
    """Object and background colours of ``n`` images, ``(n, 3, 1, 2)`` sRGB in [0, 1].

    Hues are uniform and independent of the class; the two hues differ by at least 60 deg and
    the two lightnesses by 12-30 L units of random sign, so both L and ab show the edge.
    """
    light_bg = 30 + 45 * torch.rand(n, generator=gen)
    polarity = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    light_obj = (light_bg + polarity * (12 + 18 * torch.rand(n, generator=gen))).clamp(10, 95)
    hue_obj = 2 * math.pi * torch.rand(n, generator=gen)
    hue_bg = hue_obj + math.pi / 3 + (4 * math.pi / 3) * torch.rand(n, generator=gen)
    hue = torch.stack([hue_obj, hue_bg], 1)
    chroma = 15 + 20 * torch.rand(n, 2, generator=gen)
    lab = torch.stack([torch.stack([light_obj, light_bg], 1), chroma * hue.cos(), chroma * hue.sin()], 1)
    return lab_to_rgb(lab[:, :, None, :], clip=True)


def _paint(mask: Tensor, gen: torch.Generator) -> Tensor:
    """``(n, R, R)`` masks -> ``(n, 3, R, R)`` uint8 sRGB images.

    Only the two flat colours go through Lab; blending, a grey low-frequency texture and
    pixel noise are added in sRGB, which is ~10x cheaper than converting every pixel.
    """
    n, res = mask.shape[0], mask.shape[-1]
    colours = _lab_colours(gen, n)
    texture = F.interpolate(0.035 * torch.randn(n, 1, 8, 8, generator=gen), size=res, mode="bilinear")
    rgb = torch.randn(n, 3, res, res, generator=gen).mul_(0.012).add_(texture).add_(colours[..., 1:])
    rgb.addcmul_(mask[:, None], colours[..., :1] - colours[..., 1:])
    return rgb.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


@functools.lru_cache(maxsize=8)
def generate_shapes(num_samples: int, seed: int, resolution: int = 32, jitter: Optional[float] = None) -> ShapeBatch:
    """Render ``num_samples`` images deterministically from ``seed`` (same seed, same bytes).

    Classes are exactly balanced when ``num_samples`` is a multiple of 10. ``jitter``: see
    :class:`SyntheticShapes`. Cached: callers must not modify the returned tensors.
    """
    if num_samples < 1 or resolution < 8:
        raise DataError(f"synthetic shapes need num_samples >= 1 and resolution >= 8, got {num_samples}, {resolution}")
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num_samples) % len(SHAPES))[torch.randperm(num_samples, generator=gen)]
    masks = _coverage(labels, gen, resolution, jitter)
    return ShapeBatch(_paint(masks, gen), labels, masks)


def split_seed(seed: int, split: str) -> int:
    """Independent seed of one split, so the splits never share an image."""
    return int(np.random.SeedSequence([seed, _SPLIT_CODES[split]]).generate_state(1, np.uint32)[0])


class SyntheticShapes(ImageDataset):
    """Ten shape classes, coloured so that only shape (not colour) tells the class.

    Args:
        split: ``"unlabeled"`` (for distillation), ``"train"`` (labeled, for probe/finetune)
            or ``"test"``.
        num_samples: images in the split; default :data:`SPLITS`.
        labeled: report labels; default False for ``"unlabeled"`` (its classes are still in
            ``class_labels``), True otherwise.
        seed: generation seed (each split derives its own) and augmentation seed.
        resolution: image side in pixels.
        jitter: the object's centre stays within ``jitter`` x side of the image centre on each
            axis (default 0.06: +-2 px at 32 px); ``None``: anywhere the object fits (up to
            +-0.25 x side). A position shared by both views is the easiest cue for telling
            images apart, which a contrastive critic can learn instead of shape: with ``None``,
            CRD's ab student (warm banks) probed at 13.75 % in one run of the default recipe and
            49.65 % in another (random init 15.6 %); with 0.06, 54.45-60.15 % in three runs
            (random 17.65 %). README.md has the commands.
        augment, size: see :class:`~xmodal.data.augment.ImageAugment` (e.g. ``"crop"``).
    """

    def __init__(
        self,
        split: str = "unlabeled",
        num_samples: Optional[int] = None,
        labeled: Optional[bool] = None,
        seed: int = 0,
        resolution: int = 32,
        jitter: Optional[float] = 0.06,
        augment: Union[ImageAugment, str, None] = None,
        size: Optional[int] = None,
    ) -> None:
        check_split(split, list(SPLITS), "synthetic shapes")
        if jitter is not None and not 0 <= jitter <= 0.5:
            raise DataError(f"synthetic shapes: jitter must be in [0, 0.5] (a fraction of the side), got {jitter}")
        batch = generate_shapes(num_samples or SPLITS[split], split_seed(seed, split), resolution,
                                None if jitter is None else float(jitter))
        labeled = split != "unlabeled" if labeled is None else labeled
        super().__init__(batch.labels, CLASSES, labeled, augment, size, seed)
        self.split = split
        self.images = batch.images

    def read_image(self, index: int) -> Tensor:
        return self.images[index]
