"""The CRD contrastive core against an independent formulation of RepDistiller's CRDLoss.

``PlainCRD`` (losses/contrast/reference.py) restates the reference's arithmetic step by step
(gather the K+1 rows, bmm, exp, divide by a Z set once from the first batch, Eq. 18,
index_copy_ momentum update) and shares no code path with the core under test.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses.contrast.memory import last_occurrence
from losses.contrast.objectives import infonce_loss, nce_loss
from losses.contrast.reference import PlainCRD
from losses.contrast.sampling import NegativeSampler, sample_without_replacement
from losses.contrast.scoring import ScoreWorkspace, bank_scores
from losses.crd import CRDLoss

EPS = 1e-7


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("scoring", ["full", "gather"])
def test_matches_reference_step_after_step(scoring):
    torch.manual_seed(1)
    n, k, ds, dt, bsz = 300, 64, 20, 36, 16
    crd = CRDLoss(ds, dt, n, feat_dim=32, nce_k=k, scoring=scoring)
    ref = PlainCRD(crd.state_dict(), n)
    for step in range(6):
        idx = torch.randperm(n)[:bsz]  # distinct rows: the reference's index_copy_ needs them
        contrast_idx = torch.randint(0, n, (bsz, k + 1))
        contrast_idx[:, 0] = idx
        f_s = torch.randn(bsz, ds, requires_grad=True)
        f_t = torch.randn(bsz, dt, requires_grad=True)
        loss = crd(f_s, f_t, idx, contrast_idx=contrast_idx)
        loss.backward()
        f_s2 = f_s.detach().clone().requires_grad_()
        f_t2 = f_t.detach().clone().requires_grad_()
        ref_loss = ref(f_s2, f_t2, idx, contrast_idx)
        ref_loss.backward()
        assert _rel(loss.detach(), ref_loss.detach()) < 1e-4, step
        assert _rel(f_s.grad, f_s2.grad) < 1e-4
        assert _rel(f_t.grad, f_t2.grad) < 1e-4
        assert _rel(crd.embed_s.linear.weight.grad, ref.w_s.grad) < 1e-4
        assert _rel(crd.embed_t.linear.bias.grad, ref.b_t.grad) < 1e-4
        sd = crd.state_dict()  # applies the queued bank update
        assert _rel(sd["memory.student_bank"], ref.memory_v1) < 1e-4
        assert _rel(sd["memory.teacher_bank"], ref.memory_v2) < 1e-4
        assert math.isclose(math.exp(sd["memory.log_z"][0]), ref.z_v1, rel_tol=1e-4)
        assert math.isclose(math.exp(sd["memory.log_z"][1]), ref.z_v2, rel_tol=1e-4)
        # Plain SGD on both sides keeps the heads equal, so the next step compares like for like.
        with torch.no_grad():
            for p, q in ((crd.embed_s.linear.weight, ref.w_s), (crd.embed_s.linear.bias, ref.b_s),
                         (crd.embed_t.linear.weight, ref.w_t), (crd.embed_t.linear.bias, ref.b_t)):
                p -= 0.5 * p.grad
                q -= 0.5 * q.grad
                p.grad = None
                q.grad = None


def test_full_and_gather_routes_agree():
    torch.manual_seed(2)
    anchors = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(90, 16, dtype=torch.float64), dim=1)
    idx = torch.randint(0, 90, (7, 11))
    weights = torch.randn(7, 11, dtype=torch.float64)
    grads = []
    for route in ("full", "gather"):
        a = anchors.clone().requires_grad_()
        scores = bank_scores(a, bank, idx, route)
        expected = torch.stack([torch.stack([bank[idx[b, j]] @ anchors[b] for j in range(11)]) for b in range(7)])
        torch.testing.assert_close(scores, expected)
        (scores * weights).sum().backward()
        grads.append(a.grad)
    # d/da sum_j w_j <bank[idx_j], a> = sum_j w_j bank[idx_j]
    expected_grad = torch.einsum("bj,bjd->bd", weights, bank[idx])
    torch.testing.assert_close(grads[0], expected_grad)
    torch.testing.assert_close(grads[1], expected_grad)


@pytest.mark.parametrize("bank_dtype", [torch.float64, torch.float16])
def test_reused_workspace_keeps_each_call_its_own_scores_and_gradient(bank_dtype):
    # Two banks scored through one workspace before a single backward (the two directions of a
    # critic, or two accumulated micro-batches): the scratch is overwritten between the calls,
    # so each call's scores and gradient must not depend on it afterwards. A float16 bank is
    # upcast into the workspace too.
    torch.manual_seed(5)
    workspace = ScoreWorkspace()
    banks = [torch.randn(50, 8, dtype=torch.float64).to(bank_dtype).double() for _ in range(2)]
    stored = [bank.to(bank_dtype) for bank in banks]
    idx = [torch.randint(0, 50, (6, 9)) for _ in range(2)]
    weights = [torch.randn(6, 9, dtype=torch.float64) for _ in range(2)]
    a = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    scores = [bank_scores(a, stored[i], idx[i], "full", workspace) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(scores[i], torch.einsum("bjd,bd->bj", banks[i][idx[i]], a.detach()))
    sum((s * w).sum() for s, w in zip(scores, weights)).backward()
    expected = sum(torch.einsum("bj,bjd->bd", weights[i], banks[i][idx[i]]) for i in range(2))
    torch.testing.assert_close(a.grad, expected)


@pytest.mark.parametrize("route", ["full", "gather"])
def test_bank_scores_gradcheck(route):
    torch.manual_seed(3)
    anchors = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(20, 6, dtype=torch.float64)
    idx = torch.randint(0, 20, (4, 5))
    assert torch.autograd.gradcheck(lambda a: bank_scores(a, bank, idx, route), (anchors,))


def test_crd_gradcheck_float64():
    torch.manual_seed(4)
    crd = CRDLoss(5, 7, 40, feat_dim=6, nce_k=8).double()
    idx = torch.arange(3)
    contrast_idx = torch.randint(0, 40, (3, 9))
    contrast_idx[:, 0] = idx
    crd(torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), idx, contrast_idx)  # sets Z
    f_s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    memory = {k: v.clone() for k, v in crd.memory.state_dict().items()}

    def fn(a, b):
        crd.memory.load_state_dict(memory)  # every evaluation sees the same banks
        return crd(a, b, idx, contrast_idx)

    assert torch.autograd.gradcheck(fn, (f_s, f_t))


def test_nce_loss_hand_worked():
    # One anchor, K = 2, N = 4: Pn = 1/4, K*Pn = 0.5. Scores s = exp(x)/Z with Z = 1, x = log s.
    s = torch.tensor([[2.0, 0.5, 1.5]])
    expected = -(math.log(2.0 / (2.0 + 0.5 + EPS)) + math.log(0.5 / (0.5 + 0.5 + EPS)) + math.log(0.5 / (1.5 + 0.5 + EPS)))
    assert math.isclose(float(nce_loss(s.log(), 0.0, 4)), expected, rel_tol=1e-6)
    # log Z shifts every score: Z = 2 halves them.
    expected_z2 = -(math.log(1.0 / 1.5) + math.log(0.5 / 0.75) + math.log(0.5 / 1.25))
    assert math.isclose(float(nce_loss(s.log(), math.log(2.0), 4)), expected_z2, rel_tol=1e-5)


def test_infonce_is_cross_entropy_of_the_positive():
    logits = torch.randn(5, 9)
    target = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(infonce_loss(logits), F.cross_entropy(logits, target))
    crd = losses.build("infonce", student_dim=4, teacher_dim=4, n_data=50, feat_dim=8, nce_k=6)
    assert crd.objective == "infonce"


def test_normaliser_once_and_ema():
    torch.manual_seed(5)
    n, k = 60, 10
    once = CRDLoss(6, 6, n, feat_dim=8, nce_k=k)
    ema = CRDLoss(6, 6, n, feat_dim=8, nce_k=k, normaliser="ema", z_momentum=0.9)
    ema.load_state_dict(once.state_dict())
    z_once, z_ema = [], []
    for step in range(3):
        idx = torch.randperm(n)[:8]
        cidx = torch.randint(0, n, (8, k + 1))
        cidx[:, 0] = idx
        f_s, f_t = torch.randn(8, 6), torch.randn(8, 6)
        with torch.no_grad():  # Z of this batch, by hand: mean(exp(<row, v>/tau)) * N
            once.memory.flush()
            v_s = once.embed_s(f_s)
            batch_z = float(torch.exp(torch.bmm(once.memory.teacher_bank[cidx], v_s[:, :, None]) / 0.07).mean() * n)
        once(f_s, f_t, idx, cidx)
        ema(f_s, f_t, idx, cidx)
        z_once.append(float(once.memory.log_z[0].exp()))
        z_ema.append(float(ema.memory.log_z[0].exp()))
        if step == 0:
            assert math.isclose(z_once[0], batch_z, rel_tol=1e-5)
            assert math.isclose(z_ema[0], batch_z, rel_tol=1e-5)
    assert z_once[0] == z_once[1] == z_once[2]  # set once, then fixed
    assert z_ema[1] != z_ema[0]  # the running estimate moves


def test_z_ema_follows_its_recursion():
    from losses.contrast.objectives import update_log_z

    log_z = torch.tensor(float("nan"), dtype=torch.float64)
    z = None
    for batch in (3.0, 5.0, 2.0):
        log_z = update_log_z(log_z, torch.tensor(math.log(batch), dtype=torch.float64), "ema", 0.99)
        z = batch if z is None else 0.99 * z + 0.01 * batch
        assert math.isclose(float(log_z.exp()), z, rel_tol=1e-12)


def test_loss_falls_as_student_aligns_with_teacher():
    torch.manual_seed(6)
    n, k, d = 400, 128, 24
    crd = CRDLoss(d, d, n, feat_dim=16, nce_k=k)
    crd.embed_s.load_state_dict(crd.embed_t.state_dict())  # one head for both views
    teacher = torch.randn(n, d)
    noise = torch.randn(n, d)
    crd.warm_start(teacher, teacher, torch.arange(n))  # banks hold the teacher's embeddings
    state = crd.state_dict()
    idx = torch.arange(64)
    cidx = crd.sampler.sample(idx, torch.Generator().manual_seed(0))
    values = []
    for alpha in (0.0, 0.3, 0.6, 0.9, 1.0):
        crd.load_state_dict(state)
        student = alpha * teacher[idx] + (1 - alpha) * noise[idx]
        values.append(float(crd(student, teacher[idx], idx, cidx).detach()))
    assert all(a > b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("objective", ["nce", "infonce"])
def test_state_dict_round_trip_continues_the_same_run(objective):
    torch.manual_seed(7)
    a = CRDLoss(8, 8, 100, feat_dim=8, nce_k=20, seed=3, objective=objective)
    batches = [(torch.randn(10, 8), torch.randn(10, 8), torch.randperm(100)[:10]) for _ in range(4)]
    for f_s, f_t, idx in batches[:2]:
        a(f_s, f_t, idx)
    # A checkpoint holds only finite numbers (the engine refuses to write NaN): InfoNCE has no
    # normaliser, so it carries no log Z rather than an "unset" NaN.
    state = a.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert ("memory.log_z" in state) == (objective == "nce")
    b = CRDLoss(8, 8, 100, feat_dim=8, nce_k=20, seed=99, objective=objective)
    b.load_state_dict(state)
    for f_s, f_t, idx in batches[2:]:
        assert torch.equal(a(f_s, f_t, idx), b(f_s, f_t, idx))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_load_rejects_banks_of_another_size():
    a = CRDLoss(8, 8, 100, feat_dim=8, nce_k=20)
    b = CRDLoss(8, 8, 120, feat_dim=8, nce_k=20)
    with pytest.raises(RuntimeError, match="n_data=120"):
        b.load_state_dict(a.state_dict())


def test_explicit_contrast_idx_is_used_as_given():
    torch.manual_seed(8)
    a = CRDLoss(8, 8, 100, feat_dim=8, nce_k=20, seed=1)
    b = CRDLoss(8, 8, 100, feat_dim=8, nce_k=20, seed=2)
    b.load_state_dict({k: v for k, v in a.state_dict().items()})
    f_s, f_t, idx = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6)
    cidx = torch.randint(0, 100, (6, 21))
    assert torch.equal(a(f_s, f_t, idx, cidx), b(f_s, f_t, idx, cidx))
    c = CRDLoss(8, 8, 100, feat_dim=8, nce_k=20, seed=1)
    c.load_state_dict(b.state_dict())
    other = torch.randint(0, 100, (6, 21))
    assert not torch.equal(b(f_s, f_t, idx, cidx), c(f_s, f_t, idx, other))


def test_seeded_sampling_reproduces():
    runs = []
    for _ in range(2):
        torch.manual_seed(9)
        crd = CRDLoss(8, 8, 500, feat_dim=8, nce_k=50, seed=11)
        runs.append([float(crd(torch.randn(5, 8), torch.randn(5, 8), torch.arange(5) * 3)) for _ in range(3)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_finite_and_close_to_fp32(dtype):
    torch.manual_seed(10)
    n, d = 200, 32
    crd = CRDLoss(d, d, n, feat_dim=16, nce_k=64)
    crd.embed_s.load_state_dict(crd.embed_t.state_dict())
    feats = torch.randn(n, d)
    crd.warm_start(feats, feats, torch.arange(n))  # positives now have cosine 1: exp(1/0.07)
    state = crd.state_dict()
    idx = torch.arange(32)
    cidx = crd.sampler.sample(idx, torch.Generator().manual_seed(0))
    backbone = torch.nn.Linear(d, d)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(d))
        backbone.bias.zero_()

    def run(autocast: bool):
        crd.load_state_dict(state)
        crd.zero_grad()
        backbone.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            f = backbone(feats[idx])  # a low-precision activation, as a network would hand over
            loss = crd(f, feats[idx], idx, cidx)
        loss.backward()
        return loss.detach(), backbone.weight.grad.clone()

    loss32, grad32 = run(False)
    loss_lp, grad_lp = run(True)
    assert torch.isfinite(loss_lp) and torch.isfinite(grad_lp).all()
    assert _rel(loss_lp, loss32) < 2e-2
    assert _rel(grad_lp, grad32) < 1e-1


def test_class_aware_sampling_never_returns_same_class():
    torch.manual_seed(11)
    labels = torch.randint(0, 5, (300,))
    sampler = NegativeSampler(300, 100, negatives="class", labels=labels)
    idx = torch.randint(0, 300, (40,))
    cidx = sampler.sample(idx, torch.Generator().manual_seed(0))
    assert torch.equal(cidx[:, 0], idx)
    assert (labels[cidx[:, 1:]] != labels[idx][:, None]).all()
    assert all(len(set(row.tolist())) == 100 for row in cidx[:, 1:])  # without replacement
    relax = NegativeSampler(300, 100, negatives="class", positive="relax", labels=labels)
    cidx = relax.sample(idx, torch.Generator().manual_seed(0))
    assert (labels[cidx[:, 0]] == labels[idx]).all()
    assert (labels[cidx[:, 1:]] != labels[idx][:, None]).all()


def test_uniform_sampling_excludes_the_anchor_and_is_uniform():
    n, k = 50, 10
    sampler = NegativeSampler(n, k)
    idx = torch.full((4000,), 7)
    cidx = sampler.sample(idx, torch.Generator().manual_seed(0))
    negatives = cidx[:, 1:]
    assert (negatives != 7).all()
    assert all(len(set(row.tolist())) == k for row in negatives[:200])
    counts = torch.bincount(negatives.flatten(), minlength=n).float()
    counts = torch.cat([counts[:7], counts[8:]])
    expected = 4000 * k / (n - 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100, chi2  # 48 degrees of freedom: the 1e-6 tail is near 95


@pytest.mark.parametrize("k,pool", [(5, 1000), (700, 1000), (1000, 1000)])
def test_sample_without_replacement_both_strategies(k, pool):
    draws = sample_without_replacement(torch.full((30,), pool), k, torch.Generator().manual_seed(1))
    assert draws.shape == (30, k)
    assert int(draws.min()) >= 0 and int(draws.max()) < pool
    assert all(len(set(row.tolist())) == k for row in draws)


def test_duplicate_indices_last_occurrence_wins():
    index = torch.tensor([4, 2, 4, 9, 2, 4])
    rows, source = last_occurrence(index)
    assert rows.tolist() == [2, 4, 9]
    assert source.tolist() == [4, 5, 3]
    crd = CRDLoss(4, 4, 12, feat_dim=4, nce_k=3, nce_m=0.5)
    bank_before = crd.memory.student_bank.clone()
    f = torch.randn(6, 4)
    crd(f, f, index)
    v = crd.embed_s(f).detach()
    bank = crd.state_dict()["memory.student_bank"]
    for row, last in ((2, 4), (4, 5), (9, 3)):
        expected = F.normalize(0.5 * bank_before[row] + 0.5 * v[last], dim=0)
        torch.testing.assert_close(bank[row], expected)
    untouched = [r for r in range(12) if r not in (2, 4, 9)]
    assert torch.equal(bank[untouched], bank_before[untouched])


def test_banks_are_not_buffers_but_are_in_state_dict():
    crd = CRDLoss(4, 4, 30, feat_dim=4, nce_k=5)
    assert list(crd.buffers()) == []  # nothing for DDP's broadcast_buffers to overwrite
    keys = set(crd.state_dict())
    assert {"memory.student_bank", "memory.teacher_bank", "memory.log_z", "sampler_state"} <= keys
    half = CRDLoss(4, 4, 30, feat_dim=4, nce_k=5, bank_dtype="bfloat16")
    assert half.memory.student_bank.dtype == torch.bfloat16
    loss = half(torch.randn(3, 4), torch.randn(3, 4), torch.arange(3))
    assert torch.isfinite(loss)


def test_initial_banks_follow_the_reference_range():
    crd = CRDLoss(4, 4, 5000, feat_dim=128, nce_k=5)
    stdv = 1 / math.sqrt(128 / 3)
    bank = crd.memory.student_bank
    assert float(bank.min()) >= -stdv and float(bank.max()) <= stdv
    assert abs(float(bank.mean())) < 1e-3
    assert math.isclose(float(bank.var()), (2 * stdv) ** 2 / 12, rel_tol=0.02)


# ------------------------------------------------------------------ bad input
def _crd(**kw):
    return CRDLoss(8, 6, 50, feat_dim=4, nce_k=10, **kw)


def test_bad_feature_width():
    with pytest.raises(ValueError, match=r"f_s has shape \(2, 9\): expected \(B, 8\)"):
        _crd()(torch.randn(2, 9), torch.randn(2, 6), torch.arange(2))
    with pytest.raises(ValueError, match=r"f_t has shape"):
        _crd()(torch.randn(2, 8), torch.randn(2, 5), torch.arange(2))


def test_bad_index():
    with pytest.raises(ValueError, match=r"index holds row 50: expected rows in \[0, n_data=50\)"):
        _crd()(torch.randn(2, 8), torch.randn(2, 6), torch.tensor([3, 50]))
    with pytest.raises(ValueError, match="contrast_idx has shape"):
        _crd()(torch.randn(2, 8), torch.randn(2, 6), torch.arange(2), torch.zeros(2, 5, dtype=torch.long))


def test_k_larger_than_available_negatives():
    with pytest.raises(ValueError, match=r"nce_k=50 negatives requested but only 49 rows"):
        CRDLoss(8, 6, 50, nce_k=50)
    labels = torch.arange(50) % 2
    with pytest.raises(ValueError, match=r"nce_k=30 .* leaves only 25 rows"):
        CRDLoss(8, 6, 50, nce_k=30, negatives="class", labels=labels)


def test_bad_z_momentum_and_momentum_zero():
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"z_momentum={bad}: expected a momentum in \[0, 1\)"):
            CRDLoss(8, 6, 50, nce_k=5, normaliser="ema", z_momentum=bad)
    # momentum 0: Z is each batch's own, the same as a fresh "once" normaliser set on that batch
    torch.manual_seed(2)
    ema = CRDLoss(8, 6, 50, nce_k=5, normaliser="ema", z_momentum=0.0)
    batches = [(torch.randn(4, 8), torch.randn(4, 6), torch.randperm(50)[:4]) for _ in range(2)]
    ema(*batches[0])
    once = CRDLoss(8, 6, 50, nce_k=5)
    once.load_state_dict({**ema.state_dict(), "memory.log_z": torch.full((2,), float("nan"), dtype=torch.float64)})
    torch.testing.assert_close(ema(*batches[1]), once(*batches[1]))


def test_class_aware_without_labels():
    with pytest.raises(ValueError, match="negatives='class' needs labels"):
        CRDLoss(8, 6, 50, nce_k=5, negatives="class")


def test_nan_features():
    f = torch.randn(2, 8)
    f[1, 3] = float("nan")
    with pytest.raises(ValueError, match="f_s contains NaN or Inf"):
        _crd()(f, torch.randn(2, 6), torch.arange(2))


def test_registry_builds_crd():
    assert {"crd", "infonce"} <= set(losses.available())
    crd = losses.build("crd", student_dim=3, teacher_dim=3, n_data=20, nce_k=4)
    assert isinstance(crd, CRDLoss) and crd.nce_k == 4
    with pytest.raises(ValueError, match="did you mean 'crd'"):
        losses.build("cdr")


@pytest.mark.parametrize("route", ["full", "gather"])
def test_diagnostics_are_the_mean_positive_and_negative_cosines(route):
    torch.manual_seed(11)
    crd = CRDLoss(6, 5, 40, feat_dim=8, nce_k=12, scoring=route)
    crd(torch.randn(8, 6), torch.randn(8, 5), torch.randperm(40)[:8])  # banks now hold real rows
    f_s, f_t, index = torch.randn(8, 6), torch.randn(8, 5), torch.randperm(40)[:8]
    idx = torch.randint(0, 40, (8, 13))
    idx[:, 0] = index
    crd.memory.flush()
    with torch.no_grad():  # written out: cosines of unit embeddings with unit bank rows, both ways
        v_s = F.normalize(crd.embed_s.linear(f_s), dim=1)
        v_t = F.normalize(crd.embed_t.linear(f_t), dim=1)
        cos_s = torch.stack([crd.memory.teacher_bank[idx[b]] @ v_s[b] for b in range(8)])
        cos_t = torch.stack([crd.memory.student_bank[idx[b]] @ v_t[b] for b in range(8)])
    crd(f_s, f_t, index, contrast_idx=idx)
    seen = crd.diagnostics()
    torch.testing.assert_close(seen["pos_cos"], (cos_s[:, 0].mean() + cos_t[:, 0].mean()) / 2)
    torch.testing.assert_close(seen["neg_cos"], (cos_s[:, 1:].mean() + cos_t[:, 1:].mean()) / 2)
