"""CriticEnsemble against M independently constructed CRD critics, and its shared sampling."""
from __future__ import annotations

import pytest
import torch

from ensemble import CriticEnsemble
from losses.crd import CRDLoss

N, K, B, DS, DTS = 120, 24, 10, 12, (16, 9, 20)
LABELS = torch.arange(N) % 4
OPTIONS = dict(feat_dim=8, nce_k=K, negatives="class", labels=LABELS)


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    index = torch.randperm(N, generator=g)[:B]
    f_s = torch.randn(B, DS, generator=g)
    f_ts = [torch.randn(B, d, generator=g) for d in DTS]
    return f_s, f_ts, index


def test_equals_the_weighted_sum_of_independent_critics_step_after_step():
    weights = (0.8, 0.3, 1.5)
    torch.manual_seed(3)
    ens = CriticEnsemble(DS, DTS, N, weights=weights, seed=11, **OPTIONS)
    torch.manual_seed(3)  # same head initialisation, drawn in the same order
    singles = [CRDLoss(DS, d, N, seed=11 + i, **OPTIONS) for i, d in enumerate(DTS)]
    sampler = CRDLoss(DS, DTS[0], N, seed=11, **OPTIONS)  # draws contrast_idx for the singles
    for step in range(4):
        f_s, f_ts, index = _batch(step)
        contrast_idx = sampler.sample_contrast(index)
        a = f_s.clone().requires_grad_()
        total, per_critic = ens(a, f_ts, index, labels=LABELS[index])
        total.backward()
        b = f_s.clone().requires_grad_()
        alone = [crd(b, f_t, index, contrast_idx) for crd, f_t in zip(singles, f_ts)]
        expected = sum(w * loss for w, loss in zip(weights, alone))
        expected.backward()
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.stack(per_critic), torch.stack(alone), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
        for critic, crd in zip(ens.critics, singles):  # banks and Z after the update
            mine, theirs = critic.state_dict(), crd.state_dict()
            for key in ("memory.student_bank", "memory.teacher_bank", "memory.log_z", "embed_s.linear.weight"):
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-6, atol=1e-7, msg=key)


def test_shared_sampling_gives_every_critic_the_same_negatives_drawn_once(monkeypatch):
    ens = CriticEnsemble(DS, DTS, N, seed=5, **OPTIONS)
    draws, seen = [], []
    for critic in ens.critics:
        original = critic.sampler.sample
        monkeypatch.setattr(critic.sampler, "sample", lambda *a, _o=original: draws.append(1) or _o(*a))
        forward = critic.forward
        monkeypatch.setattr(critic, "forward", lambda *a, _f=forward, **k: seen.append(a[3]) or _f(*a, **k))
    alone = CRDLoss(DS, DTS[0], N, seed=5, **OPTIONS)
    for step in range(3):
        f_s, f_ts, index = _batch(step)
        seen.clear()
        ens(f_s, f_ts, index)
        assert len(seen) == len(DTS) and all(torch.equal(s, seen[0]) for s in seen)
        # the shared draw is the one critic 0 would make on its own
        assert torch.equal(seen[0], alone.sample_contrast(index))
        negatives = seen[0][:, 1:]
        assert bool((LABELS[negatives] != LABELS[index][:, None]).all())
        assert bool((seen[0][:, 0] == index).all())
    assert len(draws) == 3  # one draw per step, not one per critic


def test_resumed_ensemble_continues_the_same_run():
    ens = CriticEnsemble(DS, DTS, N, seed=2, **OPTIONS)
    for step in range(2):
        f_s, f_ts, index = _batch(step)
        ens(f_s, f_ts, index)
    state = ens.state_dict()
    resumed = CriticEnsemble(DS, DTS, N, seed=99, **OPTIONS)
    resumed.load_state_dict(state)
    f_s, f_ts, index = _batch(2)
    total, _ = ens(f_s, f_ts, index)
    again, _ = resumed(f_s, f_ts, index)
    torch.testing.assert_close(total, again)


def test_weights_and_teacher_count_are_checked():
    with pytest.raises(ValueError, match="teacher_dims is empty"):
        CriticEnsemble(DS, [], N, **OPTIONS)
    with pytest.raises(ValueError, match="weights has 2 entries for 3 teachers"):
        CriticEnsemble(DS, DTS, N, weights=[0.8, 0.8], **OPTIONS)
    with pytest.raises(ValueError, match="non-negative"):
        CriticEnsemble(DS, DTS, N, weights=[0.8, -1.0, 0.8], **OPTIONS)
    ens = CriticEnsemble(DS, DTS, N, **OPTIONS)
    f_s, f_ts, index = _batch(0)
    with pytest.raises(ValueError, match="features of 2 teachers, expected 3"):
        ens(f_s, f_ts[:2], index)
