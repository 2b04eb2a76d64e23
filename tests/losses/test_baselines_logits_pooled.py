"""KD on logits and CC / RKD / PKT on pooled embeddings, checked against independent computations."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.autograd import gradcheck

from losses import Features
from losses.cc import CC
from losses.kd import KD
from losses.pkt import PKT
from losses.rkd import RKD

pytestmark = pytest.mark.usefixtures("single_thread")


def _orthogonal(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q


# ----------------------------------------------------------------------------------------- KD
def _kd_by_loops(logit_s: torch.Tensor, logit_t: torch.Tensor, T: float) -> float:
    """T² · KL(p_t ‖ p_s) summed over classes, averaged over the batch, in plain Python."""

    def log_softmax(row: list[float]) -> list[float]:
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        return [v - lse for v in row]

    total = 0.0
    for row_s, row_t in zip(logit_s.tolist(), logit_t.tolist()):
        log_p_s = log_softmax([v / T for v in row_s])
        log_p_t = log_softmax([v / T for v in row_t])
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_p_s, log_p_t))
    return total * T * T / len(logit_s)


class TestKD:
    @pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
    def test_matches_loops(self, T):
        logit_s, logit_t = torch.randn(2, 5, 7, dtype=torch.float64) * 3
        assert KD(T)(logit_s, logit_t).item() == pytest.approx(_kd_by_loops(logit_s, logit_t, T), rel=1e-10)

    def test_hand_worked(self):
        # p_t = softmax(ln 3, 0) = (3/4, 1/4), p_s = (1/2, 1/2), T = 1:
        # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.3040988 - 0.1732868 = 0.1308120
        loss = KD(T=1)(torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]))
        assert loss.item() == pytest.approx(0.1308120, abs=1e-6)

    def test_zero_for_equal_logits_and_positive_otherwise(self):
        logit_t = torch.randn(4, 10)
        assert KD()(logit_t.clone(), logit_t).item() == pytest.approx(0.0, abs=1e-6)
        # softmax ignores a per-row shift, so shifted logits are the same prediction
        assert KD()(logit_t + torch.randn(4, 1) * 5, logit_t).item() == pytest.approx(0.0, abs=1e-5)
        assert KD()(torch.randn(4, 10), logit_t).item() > 0

    @pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
    def test_gradient_is_T_times_probability_difference(self, T):
        # Hinton §2.1: ∂KL/∂z_s = (p_s - p_t) / T per sample; the T² factor makes it T (p_s - p_t)
        logit_s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
        logit_t = torch.randn(3, 6, dtype=torch.float64)
        KD(T)(logit_s, logit_t).backward()
        expected = T * (torch.softmax(logit_s.detach() / T, 1) - torch.softmax(logit_t / T, 1)) / 3
        torch.testing.assert_close(logit_s.grad, expected)

    def test_high_temperature_gradient_matches_logit_regression(self):
        # Hinton §2.1: for T ≫ |z| and zero-mean logits, T² ∂KL/∂z_s ≈ (z_s - z_t) / C, the same
        # for every T: the gradient scale does not depend on the temperature.
        classes, batch = 10, 2
        logit_s = torch.randn(batch, classes, dtype=torch.float64)
        logit_t = torch.randn(batch, classes, dtype=torch.float64)
        logit_s, logit_t = logit_s - logit_s.mean(1, keepdim=True), logit_t - logit_t.mean(1, keepdim=True)
        limit = (logit_s - logit_t) / (classes * batch)
        for T in (200.0, 2000.0):
            z = logit_s.clone().requires_grad_()
            KD(T)(z, logit_t).backward()
            torch.testing.assert_close(z.grad, limit, rtol=0, atol=float(limit.abs().max()) * 20 / T)

    def test_gradcheck(self):
        logit_s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        logit_t = torch.randn(3, 5, dtype=torch.float64)
        assert gradcheck(lambda z: KD(T=4)(z, logit_t), (logit_s,))

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"logit_s has shape \(4, 10\) but logit_t has \(4, 5\)"):
            KD()(torch.randn(4, 10), torch.randn(4, 5))
        with pytest.raises(ValueError, match=r"logit_s has shape \(4, 10\) but logit_t has \(3, 10\)"):
            KD()(torch.randn(4, 10), torch.randn(3, 10))
        with pytest.raises(ValueError, match=r"KD logit_s must be \(B, num_classes\), got shape \(10,\)"):
            KD()(torch.randn(10), torch.randn(10))
        with pytest.raises(ValueError, match="temperature T must be > 0, got 0"):
            KD(T=0)

    def test_from_features_checks_logits(self):
        pooled = torch.randn(2, 8)
        with_logits = Features(maps=[], pooled=pooled, logits=torch.randn(2, 10))
        without = Features(maps=[], pooled=pooled)
        with pytest.raises(ValueError, match="teacher.logits is None"):
            KD.from_features(with_logits, without)
        other_classes = Features(maps=[], pooled=pooled, logits=torch.randn(2, 100))
        with pytest.raises(ValueError, match="student has 10 classes, teacher has 100"):
            KD.from_features(with_logits, other_classes)
        assert KD.from_features(with_logits, with_logits, T=2).T == 2


# ----------------------------------------------------------------------------------------- CC
def _cc_by_loops(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """Mean over neighbouring samples i, i+1 of Σ_d |s_i - t_i|_d · |s_{i+1} - t_{i+1}|_d."""
    s, t = f_s.tolist(), f_t.tolist()
    terms = [
        sum(abs(s[i][d] - t[i][d]) * abs(s[i + 1][d] - t[i + 1][d]) for d in range(len(s[0])))
        for i in range(len(s) - 1)
    ]
    return sum(terms) / len(terms)


class TestCC:
    def test_hand_worked(self):
        # δ = 1, 2, 4 (one dimension): (1·2 + 2·4) / 2 = 5
        assert CC()(torch.tensor([[1.0], [2.0], [4.0]]), torch.zeros(3, 1)).item() == pytest.approx(5.0)

    def test_matches_loops(self):
        f_s, f_t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
        assert CC()(f_s, f_t).item() == pytest.approx(_cc_by_loops(f_s, f_t), rel=1e-12)

    def test_forward_features_embeds_both_widths(self):
        student = Features(maps=[], pooled=torch.randn(5, 12, dtype=torch.float64))
        teacher = Features(maps=[], pooled=torch.randn(5, 40, dtype=torch.float64))
        loss = CC.from_features(student, teacher, feat_dim=8).double()
        assert loss.embed_s.weight.shape == (8, 12) and loss.embed_t.weight.shape == (8, 40)
        e_s = student.pooled @ loss.embed_s.weight.detach().t() + loss.embed_s.bias.detach()
        e_t = teacher.pooled @ loss.embed_t.weight.detach().t() + loss.embed_t.bias.detach()
        expected = _cc_by_loops(e_s, e_t)
        assert loss.forward_features(student, teacher).item() == pytest.approx(expected, rel=1e-12)

    def test_gradcheck_through_embeddings(self):
        loss = CC(6, 9, feat_dim=4).double()
        f_t = torch.randn(4, 9, dtype=torch.float64)
        f_s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        assert gradcheck(lambda x: loss(loss.embed_s(x), loss.embed_t(f_t)), (f_s,))

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"CC: f_s has shape \(4, 3\), f_t has \(4, 5\); expected equal"):
            CC()(torch.randn(4, 3), torch.randn(4, 5))
        with pytest.raises(ValueError, match="CC: batch size is 1; expected at least 2"):
            CC()(torch.randn(1, 3), torch.randn(1, 3))
        with pytest.raises(ValueError, match="student batch size 4 != teacher batch size 3"):
            CC.from_features(Features([], torch.randn(4, 3)), Features([], torch.randn(3, 3)))


# ---------------------------------------------------------------------------------------- RKD
def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rkd_by_loops(f_s: torch.Tensor, f_t: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0) -> float:
    """Park et al. eq. (4)-(7) with Huber loss, mean over all B² pairs and B³ triplets."""
    s, t = f_s.tolist(), f_t.tolist()
    n = len(s)

    def distances(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    def angle(e, a, b, c):  # cosine at vertex a between a->b and a->c; 0 when degenerate
        if b == a or c == a:
            return 0.0
        u = [x - y for x, y in zip(e[b], e[a])]
        v = [x - y for x, y in zip(e[c], e[a])]
        return sum(x * y for x, y in zip(u, v)) / (math.hypot(*u) * math.hypot(*v))

    d_s, d_t = distances(s), distances(t)
    loss_d = sum(_huber(d_s[i][j] - d_t[i][j]) for i in range(n) for j in range(n)) / n**2
    triplets = list(itertools.product(range(n), repeat=3))
    loss_a = sum(_huber(angle(s, *abc) - angle(t, *abc)) for abc in triplets) / n**3
    return w_d * loss_d + w_a * loss_a


class TestRKD:
    def test_matches_loops(self):
        # spread-out teacher so some distance differences exceed 1 and exercise Huber's linear part
        f_s, f_t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        f_t[0] *= 6
        assert RKD()(f_s, f_t).item() == pytest.approx(_rkd_by_loops(f_s, f_t), rel=1e-9)

    def test_weights(self):
        f_s, f_t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        distance_only = RKD(distance_weight=1, angle_weight=0)(f_s, f_t).item()
        angle_only = RKD(distance_weight=0, angle_weight=1)(f_s, f_t).item()
        assert RKD()(f_s, f_t).item() == pytest.approx(25 * distance_only + 50 * angle_only)

    def test_invariant_to_scale_rotation_translation(self):
        f_s, f_t = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
        base = RKD()(f_s, f_t).item()
        assert base > 0
        assert RKD()(3.7 * f_s, 0.2 * f_t).item() == pytest.approx(base, rel=1e-9)
        assert RKD()(f_s @ _orthogonal(6), f_t @ _orthogonal(10)).item() == pytest.approx(base, rel=1e-9)
        shift = torch.randn(1, 6, dtype=torch.float64)
        assert RKD()(f_s + shift, f_t).item() == pytest.approx(base, rel=1e-9)

    def test_zero_for_a_similar_copy(self):
        f_t = torch.randn(6, 4, dtype=torch.float64)
        assert RKD()(2.5 * f_t @ _orthogonal(4) + 1.0, f_t).item() == pytest.approx(0.0, abs=1e-10)

    def test_teacher_gets_no_gradient(self):
        f_s = torch.randn(4, 3, requires_grad=True)
        f_t = torch.randn(4, 3, requires_grad=True)
        RKD()(f_s, f_t).backward()
        assert f_t.grad is None and f_s.grad is not None and torch.isfinite(f_s.grad).all()

    def test_gradcheck(self):
        f_s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        f_t = torch.randn(5, 4, dtype=torch.float64)
        assert gradcheck(lambda x: RKD()(x, f_t), (f_s,))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="RKD: batch size is 1; expected at least 2"):
            RKD()(torch.randn(1, 3), torch.randn(1, 3))
        with pytest.raises(ValueError, match="RKD: student batch size 4 != teacher batch size 5"):
            RKD()(torch.randn(4, 3), torch.randn(5, 3))
        with pytest.raises(ValueError, match=r"RKD f_s must be \(B, D\), got shape \(4, 3, 2, 2\)"):
            RKD()(torch.randn(4, 3, 2, 2), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------- PKT
def _pkt_by_loops(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> float:
    """Passalis & Tefas eq. (8)-(10): cosine kernel (cos + 1) / 2, row-normalised, KL(t ‖ s)."""

    def conditional(e):
        unit = [[x / (math.hypot(*row) + eps) for x in row] for row in e]
        kernel = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in unit] for u in unit]
        return [[k / sum(row) for k in row] for row in kernel]

    p_s, p_t = conditional(f_s.tolist()), conditional(f_t.tolist())
    n = len(p_s)
    total = sum(
        p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(n) for j in range(n)
    )
    return total / n**2


class TestPKT:
    def test_matches_loops(self):
        f_s, f_t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
        assert PKT()(f_s, f_t).item() == pytest.approx(_pkt_by_loops(f_s, f_t), rel=1e-9)

    def test_zero_for_equal_and_positive_otherwise(self):
        f_t = torch.randn(6, 5, dtype=torch.float64)
        assert PKT()(f_t.clone(), f_t).item() == 0.0
        assert PKT()(torch.randn(6, 5, dtype=torch.float64), f_t).item() > 0

    def test_invariant_to_per_sample_scale_and_rotation(self):
        f_s, f_t = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
        base = PKT()(f_s, f_t).item()
        scales = torch.rand(7, 1, dtype=torch.float64) * 5 + 0.5
        assert PKT()(f_s * scales, f_t).item() == pytest.approx(base, rel=1e-5)
        assert PKT()(f_s @ _orthogonal(5), f_t @ _orthogonal(8)).item() == pytest.approx(base, rel=1e-9)

    def test_gradcheck(self):
        f_s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        f_t = torch.randn(4, 5, dtype=torch.float64)
        assert gradcheck(lambda x: PKT()(x, f_t), (f_s,))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="PKT: student batch size 3 != teacher batch size 2"):
            PKT()(torch.randn(3, 4), torch.randn(2, 4))
        with pytest.raises(ValueError, match="PKT: batch size is 1"):
            PKT.from_features(Features([], torch.randn(1, 4)), Features([], torch.randn(1, 4)))
