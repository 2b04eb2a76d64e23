"""Segmentation scores from two gloo processes, each scoring its share of the test images, equal
those of one process and of a per-pixel count over all images."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from gloo_ranks import run_on_ranks
from xmodal.engine import Engine
from xmodal.tasks.segmentation import evaluate_segmentation

NUM_CLASSES, IMAGES, BATCH = 4, 7, 4  # 7 images in global batches of 4: the last is split 2 / 1


class RandomScenes(Dataset):
    """Inputs and masks (with void) drawn from a fixed seed; ``index`` is the row."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(IMAGES, 2, 9, 11, generator=g)
        self.masks = torch.randint(0, NUM_CLASSES, (IMAGES, 9, 11), generator=g)
        self.masks[torch.rand(self.masks.shape, generator=g) < 0.25] = 255

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, i: int) -> dict:
        return {"x": self.inputs[i], "mask": self.masks[i], "index": torch.tensor(i)}


def _segmenter() -> nn.Module:
    torch.manual_seed(1)
    return nn.Conv2d(2, NUM_CLASSES, 3, padding=1)


def _score(engine: Engine) -> tuple[dict, list[int]]:
    seen: list[int] = []
    scores = evaluate_segmentation(engine, _segmenter(), RandomScenes(), lambda b: b["x"], NUM_CLASSES, BATCH,
                                   on_batch=lambda batch, _: seen.extend(batch["index"].tolist()))
    return scores, seen


def _worker(rank: int, world: int, out_dir: str) -> dict:
    # the gloo group is up (run_on_ranks); Accelerate reads the rank and world from the environment
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    engine = Engine(Path(out_dir) / "run", cpu=True, num_workers=0, log=False)
    assert engine.world == world, engine.world
    scores, seen = _score(engine)
    return {"scores": scores, "seen": seen}


def _counted() -> tuple[float, float]:
    """Pixel accuracy and mIoU counted pixel by pixel over all images in one go."""
    data = RandomScenes()
    with torch.no_grad():
        pred = _segmenter()(data.inputs).argmax(1).flatten()
    true = data.masks.flatten()
    keep = true != 255
    pred, true = pred[keep], true[keep]
    ious = []
    for c in range(NUM_CLASSES):
        union = int(((pred == c) | (true == c)).sum())
        if union:
            ious.append(int(((pred == c) & (true == c)).sum()) / union)
    return 100.0 * float((pred == true).double().mean()), 100.0 * sum(ious) / len(ious)


@pytest.mark.slow
def test_two_processes_score_like_one(tmp_path):
    # spawned, not forked: a forked worker would inherit this process's Accelerate state (one process).
    ranks = run_on_ranks(functools.partial(_worker, out_dir=str(tmp_path)), 2, tmp_path)
    seen = [set(r["seen"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == set(range(IMAGES))
    single, single_seen = _score(Engine(tmp_path / "one", cpu=True, num_workers=0, log=False))
    assert sorted(single_seen) == list(range(IMAGES))
    pixel_acc, miou = _counted()
    for scores in [r["scores"] for r in ranks] + [single]:
        assert scores["confusion"] == single["confusion"]
        assert scores["pixel_acc"] == pytest.approx(pixel_acc, abs=1e-9)
        assert scores["miou"] == pytest.approx(miou, abs=1e-9)
