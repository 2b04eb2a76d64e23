"""Pictures of segmentation results: RGB | depth | ground truth | prediction, one PNG per frame.

Classes are drawn with one fixed palette (:data:`PALETTE`, void black), so a colour means the
same class in every picture of every run; ``legend.png`` names them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch import Tensor  # noqa: E402

from xmodal.data.base import IGNORE_INDEX  # noqa: E402

#: RGB colours of the 13 NYU classes in label order (bed, books, ceiling, chair, floor,
#: furniture, objects, picture, sofa, table, tv, wall, window).
PALETTE = np.array([
    (0, 0, 255), (232, 88, 47), (0, 217, 0), (148, 0, 240), (222, 241, 23), (255, 205, 205),
    (0, 223, 228), (106, 135, 204), (116, 28, 41), (240, 35, 235), (0, 166, 156), (249, 139, 0),
    (225, 228, 194),
], dtype=np.uint8)
VOID_COLOUR = (0, 0, 0)
PANELS = ("RGB", "depth", "ground truth", "prediction")
_GAP, _HEADER = 4, 14


def colour_labels(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` class ids (255 = void) -> ``(H, W, 3)`` uint8 with :data:`PALETTE`.

    Ids beyond the palette (more than 13 classes) reuse its colours cyclically.
    """
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    void = mask == IGNORE_INDEX
    out[~void] = PALETTE[mask[~void] % len(PALETTE)]
    out[void] = VOID_COLOUR
    return out


def colour_depth(depth: np.ndarray) -> np.ndarray:
    """``(H, W)`` metres (0 = missing) -> ``(H, W, 3)`` uint8, near dark to far bright (viridis),
    stretched over this frame's valid range; missing pixels black."""
    valid = depth > 0
    out = np.zeros((*depth.shape, 3), dtype=np.uint8)
    if valid.any():
        low, high = float(depth[valid].min()), float(depth[valid].max())
        scaled = (depth - low) / max(high - low, 1e-6)
        out[valid] = (matplotlib.colormaps["viridis"](scaled[valid])[:, :3] * 255).astype(np.uint8)
    return out


def compose(image: Tensor, depth: Tensor, mask: Tensor, prediction: Tensor) -> Image.Image:
    """Four panels side by side with a title above each.

    Args:
        image: ``(3, H, W)`` uint8 RGB; depth: ``(1, H, W)`` metres; mask, prediction: ``(H, W)``.
    """
    panels = [
        image.permute(1, 2, 0).cpu().numpy().astype(np.uint8),
        colour_depth(depth[0].float().cpu().numpy()),
        colour_labels(mask.cpu().numpy()),
        colour_labels(prediction.cpu().numpy()),
    ]
    height, width = panels[0].shape[:2]
    canvas = Image.new("RGB", (4 * width + 3 * _GAP, height + _HEADER), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, PANELS)):
        left = i * (width + _GAP)
        canvas.paste(Image.fromarray(panel), (left, _HEADER))
        draw.text((left + 2, 1), title, fill=(0, 0, 0))
    return canvas


def save_pictures(folder: Path, frames: Sequence[int], batch: dict, prediction: Tensor) -> None:
    """One ``NNNN.png`` per sample of ``batch`` (``frames`` maps its ``index`` to a frame number)."""
    folder.mkdir(parents=True, exist_ok=True)
    # One device-to-host copy per batch, not four per picture.
    image, depth, mask, prediction = (t.cpu() for t in (batch["image"], batch["depth"], batch["mask"], prediction))
    for row, index in enumerate(batch["index"].tolist()):
        picture = compose(image[row], depth[row], mask[row], prediction[row])
        picture.save(folder / f"{frames[index]:04d}.png")


def save_legend(path: Path, classes: Sequence[str]) -> None:
    """The palette with class names, ``path`` a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handles = [Patch(color=PALETTE[i % len(PALETTE)] / 255, label=name) for i, name in enumerate(classes)]
    handles.append(Patch(color=np.array(VOID_COLOUR) / 255, label="void (not scored)"))
    fig = plt.figure(figsize=(2.6, 0.25 * len(handles) + 0.3))
    fig.legend(handles=handles, loc="center", frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
