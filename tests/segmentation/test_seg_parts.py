"""The segmentation protocol's parts: padding, loss, encoder modes, the holdout split."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.errors import ConfigError
from xmodal.models import build_model
from xmodal.tasks.segmentation import PaddedSegmenter, holdout_split, masked_cross_entropy, segmenter_for

VOID = 255


def test_padded_segmenter_takes_any_size_and_crops_back():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return x.repeat(1, 3, 1, 1)

    x = torch.randn(2, 1, 40, 50)
    out = PaddedSegmenter(Probe())(x)
    assert seen == [(64, 64)] and out.shape == (2, 3, 40, 50) and torch.equal(out[:, :1], x)


def test_masked_cross_entropy_ignores_void_and_survives_an_all_void_batch():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[0, :2] = VOID
    keep = mask != VOID
    want = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], mask[keep])
    assert masked_cross_entropy(logits, mask).item() == pytest.approx(want.item(), rel=1e-6)
    empty = masked_cross_entropy(logits, torch.full((2, 4, 4), VOID))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()


class Frames(Dataset):
    def __init__(self, frames):
        self.frames = frames

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        return {"index": torch.tensor(i)}


def test_holdout_split_is_deterministic_disjoint_and_complete():
    pool = Frames([1, 2, 9, 14, 15, 16, 17, 18])
    train, test = holdout_split(pool, pool, 5, seed=0)
    again_train, _ = holdout_split(pool, pool, 5, seed=0)
    assert torch.equal(train.keep, again_train.keep) and len(train) == 5 and len(test) == 3
    assert sorted(train.keep.tolist() + test.keep.tolist()) == list(range(8))


@pytest.mark.parametrize("n_train, missing", [(8, "test"), (9, "test")])
def test_holdout_split_that_leaves_no_test_frames_is_refused(n_train, missing):
    pool = Frames(list(range(8)))
    with pytest.raises(ConfigError, match=f"holdout_train={n_train} leaves no {missing} frames.*expected 1..7"):
        holdout_split(pool, pool, n_train, seed=0)


def test_each_encoder_mode_gets_its_own_copy_of_the_distilled_encoder():
    student = build_model("smp_resnet18", in_channels=1)
    frozen = segmenter_for(student, "fpn", 13, "frozen")
    tuned = segmenter_for(student, "fpn", 13, "finetune")
    for segmenter in (frozen, tuned):
        assert segmenter.model.encoder is not student.encoder
        for (name, theirs), mine in zip(student.encoder.state_dict().items(), segmenter.model.encoder.state_dict().values()):
            assert torch.equal(theirs, mine), name
    assert not any(p.requires_grad for p in frozen.model.encoder.parameters())
    assert all(p.requires_grad for p in tuned.model.encoder.parameters())
    assert all(p.requires_grad for p in frozen.model.decoder.parameters())
