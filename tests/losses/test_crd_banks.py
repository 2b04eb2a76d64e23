"""The critic's two large-N options: ``bank="queue"`` and ``shared_negatives=True``.

Each is checked against a formulation that shares none of its code: the queue against the
reference's NCE arithmetic (exp, divide by Z, Eq. 18) written out over a queue kept by hand in a
Python list; the shared draw against the exact per-anchor route fed the same rows.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses.contrast.sampling import NegativeSampler
from losses.crd import CRDLoss

EPS = 1e-7


def _reference_nce(x: torch.Tensor, z: float, m: int, n: int) -> torch.Tensor:
    """RepDistiller's ContrastLoss on exp-scores ``x`` (B, m+1) already divided by Z."""
    pn = 1.0 / n
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + EPS))
    log_d0 = torch.log((m * pn) / (x[:, 1:] + m * pn + EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def test_queue_loss_matches_the_nce_arithmetic_over_a_hand_kept_queue():
    torch.manual_seed(3)
    n, k, bsz, tau = 40, 12, 5, 0.07
    # key_momentum=0: the keys are the heads themselves (the moving average is tested below).
    crd = CRDLoss(6, 7, n, feat_dim=4, nce_k=k, bank="queue", nce_t=tau, key_momentum=0.0)
    sd = crd.state_dict()
    queue_s = [row.clone() for row in sd["memory.student_bank"]]  # oldest first
    queue_t = [row.clone() for row in sd["memory.teacher_bank"]]
    rows = [-1] * k
    z = [None, None]
    seen_own = 0
    for step in range(9):
        # Rows repeat across steps so that anchors meet their own earlier entries in the queue.
        index = torch.randint(0, 12, (bsz,))
        f_s, f_t = torch.randn(bsz, 6), torch.randn(bsz, 7)
        loss = crd(f_s, f_t, index)
        with torch.no_grad():
            v_s = F.normalize(crd.embed_s(f_s), dim=1)
            v_t = F.normalize(crd.embed_t(f_t), dim=1)
        own = torch.tensor([[rows[j] == int(i) for j in range(k)] for i in index])
        seen_own += int(own.sum())
        total = 0.0
        for side, (anchor, positive, queue) in enumerate(((v_s, v_t, queue_t), (v_t, v_s, queue_s))):
            x = torch.exp(torch.cat([(anchor * positive).sum(1, keepdim=True), anchor @ torch.stack(queue).T], 1) / tau)
            x[:, 1:][own] = 0.0  # an excluded entry adds nothing (up to the eps term)
            if z[side] is None:
                z[side] = float(x[:, 0].sum() + x[:, 1:].sum()) / float(x.numel() - own.sum()) * k
            total = total + _reference_nce(x / z[side], z[side], k, k)
        assert math.isclose(float(loss.detach()), float(total), rel_tol=1e-5), step
        for i in range(bsz):  # enqueue: the oldest entry leaves
            queue_s.pop(0), queue_t.pop(0), rows.pop(0)
            queue_s.append(v_s[i]), queue_t.append(v_t[i]), rows.append(int(index[i]))
        state = crd.state_dict()
        order = [(int(state["memory.count"]) + j) % k for j in range(k)]  # oldest first
        torch.testing.assert_close(state["memory.student_bank"][order], torch.stack(queue_s))
        assert state["memory.rows"][order].tolist() == rows
    assert seen_own > 0  # the exclusion was exercised


def test_an_excluded_entry_changes_neither_loss_nor_gradient():
    torch.manual_seed(4)
    crd = CRDLoss(5, 5, 30, feat_dim=4, nce_k=6, bank="queue")  # Z fixed by this first batch:
    crd(torch.randn(6, 5), torch.randn(6, 5), torch.arange(6))  # the queue holds samples 0..5
    state = crd.state_dict()
    slot = int((state["memory.rows"] == 2).nonzero())
    f_s, f_t, index = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([2, 11, 12])
    results = []
    for replace in (False, True):
        crd.load_state_dict(state)
        if replace:  # sample 2's own entry: what it holds must not matter to anchor 0 (sample 2)
            crd.memory.teacher_bank[slot] = -crd.memory.teacher_bank[slot]
            crd.memory.student_bank[slot] = F.normalize(torch.randn(4), dim=0)
        x = f_s.clone().requires_grad_()
        loss = crd(x, f_t, index)
        loss.backward()
        results.append((loss.detach(), x.grad[0]))
    torch.testing.assert_close(results[0][1], results[1][1])
    assert int(crd.memory.own_entries(index).sum()) == 1


def test_queue_keys_are_moving_averages_of_the_heads_and_are_not_trained():
    torch.manual_seed(7)
    crd = CRDLoss(6, 6, 50, feat_dim=4, nce_k=10, bank="queue", key_momentum=0.9)
    opt = torch.optim.SGD([p for p in crd.parameters() if p.requires_grad], lr=0.5)
    assert not any(p.requires_grad for p in crd.key_s.parameters())
    for _ in range(3):
        before = crd.key_t.linear.weight.clone()
        head = crd.embed_t.linear.weight.detach().clone()
        f_t = torch.randn(4, 6)
        crd(torch.randn(4, 6), f_t, torch.randint(0, 50, (4,))).backward()
        torch.testing.assert_close(crd.key_t.linear.weight, 0.9 * before + 0.1 * head)
        slot = (int(crd.state_dict()["memory.count"]) - 1) % 10  # the last key enqueued
        torch.testing.assert_close(crd.memory.teacher_bank[slot], F.normalize(crd.key_t(f_t[-1:]), dim=1)[0])
        assert crd.key_t.linear.weight.grad is None
        opt.step()
        opt.zero_grad()
    assert "key_s.linear.weight" in crd.state_dict()


def test_queue_memory_does_not_grow_with_n():
    small = CRDLoss(8, 8, 1_000, feat_dim=16, nce_k=64, bank="queue")
    huge = CRDLoss(8, 8, 17_000_000, feat_dim=16, nce_k=64, bank="queue")
    size = [sum(t.numel() * t.element_size() for t in c.state_dict().values()) for c in (small, huge)]
    assert size[0] == size[1] < 16 * 1024  # two 64 x 16 float32 rings, their rows, the heads
    loss = huge(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 5, 16_999_999, 7]))
    assert torch.isfinite(loss)


def test_queue_state_dict_round_trip_continues_the_same_run():
    torch.manual_seed(5)
    make = lambda: CRDLoss(6, 6, 50, feat_dim=4, nce_k=10, bank="queue", normaliser="ema", z_momentum=0.0)  # noqa: E731
    a = make()
    batches = [(torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 50, (4,))) for _ in range(6)]
    for batch in batches[:3]:
        a(*batch)
    b = make()
    b.load_state_dict(a.state_dict())
    for batch in batches[3:]:
        assert torch.equal(a(*batch), b(*batch))
    with pytest.raises(RuntimeError, match="expected a queue of"):
        CRDLoss(6, 6, 50, feat_dim=4, nce_k=11, bank="queue").load_state_dict(a.state_dict())


def test_warm_start_fills_the_queue_with_real_embeddings():
    crd = CRDLoss(6, 6, 50, feat_dim=4, nce_k=8, bank="queue")
    crd.warm_start(torch.randn(10, 6), torch.randn(10, 6), torch.arange(10))
    state = crd.state_dict()
    assert sorted(state["memory.rows"].tolist()) == list(range(2, 10))  # the last 8 of 10
    torch.testing.assert_close(state["memory.teacher_bank"].norm(dim=1), torch.ones(8))


def test_shared_draw_avoids_the_batch_is_distinct_and_uniform():
    sampler = NegativeSampler(30, 20)
    index = torch.tensor([3, 4, 17, 29, 3])
    counts = torch.zeros(30)
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        rows = sampler.sample_shared(index, g)
        assert rows.numel() == 20 and rows.unique().numel() == 20
        counts += torch.bincount(rows, minlength=30)
    assert counts[[3, 4, 17, 29]].sum() == 0
    others = counts[[i for i in range(30) if i not in (3, 4, 17, 29)]]
    expected = 3000 * 20 / 26
    assert float((others - expected).abs().max()) < 5 * math.sqrt(expected)  # 26 rows drawn alike
    with pytest.raises(ValueError, match="only 26 rows lie outside"):
        NegativeSampler(30, 29).sample_shared(index, g)


def test_shared_negatives_equal_the_exact_route_given_the_same_rows():
    torch.manual_seed(6)
    shared = CRDLoss(6, 7, 80, feat_dim=8, nce_k=16, shared_negatives=True, normaliser="ema", z_momentum=0.0)
    exact = CRDLoss(6, 7, 80, feat_dim=8, nce_k=16, normaliser="ema", z_momentum=0.0)
    exact.load_state_dict(shared.state_dict())
    for step in range(4):
        index = torch.randperm(80)[:6]
        f_s = torch.randn(6, 6, requires_grad=True)
        f_t = torch.randn(6, 7)
        contrast_idx = shared.sample_contrast(index)
        assert (contrast_idx[:, 1:] == contrast_idx[:1, 1:]).all()
        assert not torch.isin(contrast_idx[:, 1:], index).any()
        a = shared(f_s, f_t, index, contrast_idx=contrast_idx)
        f_s2 = f_s.detach().clone().requires_grad_()
        b = exact(f_s2, f_t, index, contrast_idx=contrast_idx)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(f_s.grad, f_s2.grad)
        torch.testing.assert_close(shared.embed_t.linear.weight.grad, exact.embed_t.linear.weight.grad)
    for key, value in shared.state_dict().items():
        if key.startswith("memory."):
            torch.testing.assert_close(value, exact.state_dict()[key])
    bad = contrast_idx.clone()
    bad[0, 1] = bad[1, 2]
    with pytest.raises(ValueError, match="same negatives"):
        shared(f_s, f_t, index, contrast_idx=bad)


@pytest.mark.parametrize("options", [
    {"bank": "queue", "negatives": "class", "labels": torch.zeros(20, dtype=torch.long)},
    {"bank": "queue", "shared_negatives": True},
    {"bank": "ring"},
])
def test_bad_bank_options(options):
    with pytest.raises(ValueError, match="bank"):
        CRDLoss(4, 4, 20, feat_dim=4, nce_k=5, **options)


def test_queue_refuses_a_contrast_idx():
    crd = CRDLoss(4, 4, 20, feat_dim=4, nce_k=5, bank="queue")
    with pytest.raises(ValueError, match="contrast_idx does not apply"):
        crd(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]), contrast_idx=torch.zeros(2, 6, dtype=torch.long))


def test_warm_rows_each_kind_of_memory_declares():
    from losses import DistillLoss

    class OwnBank(DistillLoss):  # a memory-bank loss that says nothing: a warm start reads one whole pass
        memory_bank = True

    assert OwnBank().warm_rows is None
    assert CRDLoss(4, 4, 20, feat_dim=4, nce_k=5).warm_rows == 20  # every bank row
    assert CRDLoss(4, 4, 20, feat_dim=4, nce_k=5, bank="queue").warm_rows == 5  # the queue's K
