"""Pixel accuracy and mIoU against a per-class loop written here."""
from __future__ import annotations

import math

import pytest
import torch

from xmodal.errors import DataError
from xmodal.tasks.segmentation import confusion_matrix, segmentation_scores

VOID = 255


def loop_scores(predictions: list[torch.Tensor], targets: list[torch.Tensor], num_classes: int) -> dict:
    """Textbook definitions, one class at a time, over every labelled pixel of every image."""
    pred = torch.cat([p.flatten() for p in predictions]).tolist()
    true = torch.cat([t.flatten() for t in targets]).tolist()
    pairs = [(t, p) for t, p in zip(true, pred) if t != VOID]
    correct = sum(t == p for t, p in pairs)
    iou = []
    for c in range(num_classes):
        tp = sum(t == c and p == c for t, p in pairs)
        fp = sum(t != c and p == c for t, p in pairs)
        fn = sum(t == c and p != c for t, p in pairs)
        iou.append(100.0 * tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    present = [v for v in iou if not math.isnan(v)]
    return {
        "pixel_acc": 100.0 * correct / len(pairs) if pairs else float("nan"),
        "miou": sum(present) / len(present) if present else float("nan"),
        "iou": iou,
    }


def scores_over_batches(predictions, targets, num_classes, batch: int = 2) -> dict:
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(predictions), batch):
        confusion += confusion_matrix(torch.stack(predictions[start:start + batch]),
                                      torch.stack(targets[start:start + batch]), num_classes)
    return segmentation_scores(confusion)


def assert_same(got: dict, want: dict) -> None:
    for key in ("pixel_acc", "miou"):
        assert got[key] == pytest.approx(want[key], abs=1e-9, nan_ok=True), key
    assert got["iou"] == pytest.approx(want["iou"], abs=1e-9, nan_ok=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_maps_match_the_loop(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes = 5
    predictions = [torch.randint(0, num_classes, (6, 7), generator=g) for _ in range(5)]
    targets = [torch.randint(0, num_classes, (6, 7), generator=g) for _ in range(5)]
    for target in targets:  # about a fifth void
        target[torch.rand(target.shape, generator=g) < 0.2] = VOID
    assert_same(scores_over_batches(predictions, targets, num_classes), loop_scores(predictions, targets, num_classes))


def test_void_pixels_count_nowhere_whatever_is_predicted_there():
    target = torch.tensor([[0, 1, VOID, VOID]])
    right = torch.tensor([[0, 1, 0, 0]])
    wrong_on_void = torch.tensor([[0, 1, 2, 1]])
    for prediction in (right, wrong_on_void):
        scores = scores_over_batches([prediction], [target], 3)
        assert scores["pixel_acc"] == 100.0 and scores["miou"] == 100.0
        assert math.isnan(scores["iou"][2])  # class 2 predicted only on void: absent, not a false positive


def test_absent_classes_leave_the_mean_but_false_positives_do_not():
    target = torch.tensor([[0, 0, 1, 1]])
    prediction = torch.tensor([[0, 0, 1, 3]])  # class 3 never true, predicted once; class 2 absent
    scores = scores_over_batches([prediction], [target], 4)
    assert scores["iou"][:2] == pytest.approx([100.0, 50.0]) and math.isnan(scores["iou"][2]) and scores["iou"][3] == 0.0
    assert scores["miou"] == pytest.approx((100.0 + 50.0 + 0.0) / 3)
    assert scores["pixel_acc"] == pytest.approx(75.0)
    assert_same(scores, loop_scores([prediction], [target], 4))


def test_all_void_image_adds_nothing_and_alone_scores_nan():
    g = torch.Generator().manual_seed(3)
    prediction, target = torch.randint(0, 3, (4, 4), generator=g), torch.randint(0, 3, (4, 4), generator=g)
    void = torch.full((4, 4), VOID)
    with_void = scores_over_batches([prediction, torch.zeros(4, 4, dtype=torch.long)], [target, void], 3)
    assert_same(with_void, scores_over_batches([prediction], [target], 3))
    alone = segmentation_scores(confusion_matrix(prediction, void, 3))
    assert math.isnan(alone["pixel_acc"]) and math.isnan(alone["miou"])


def test_labels_outside_the_class_set_are_refused():
    with pytest.raises(DataError, match="target holds class 7: expected 0..3 or 255"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, VOID]]), 4)
