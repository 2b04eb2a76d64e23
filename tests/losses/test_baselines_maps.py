"""FitNet, AT, SP, VID and NST on feature maps, checked against independent computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from losses import Features
from losses.at import AT
from losses.fitnet import ConvReg, FitNet
from losses.nst import NST
from losses.sp import SP
from losses.vid import VID

pytestmark = pytest.mark.usefixtures("single_thread")
f64 = torch.float64


def _block_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C, H/r, W/r)`` by averaging r×r blocks (adaptive pooling, integer ratio)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // r, r, w // r, r).mean(dim=(3, 5))


def _features(maps: list[torch.Tensor]) -> Features:
    return Features(maps=maps, pooled=maps[-1].mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------- FitNet
class TestConvReg:
    @pytest.mark.parametrize(
        "student_hw, teacher_hw, conv_type, kernel",
        [
            (16, 8, nn.Conv2d, (3, 3)),  # twice as large: stride-2 3×3
            (8, 16, nn.ConvTranspose2d, (4, 4)),  # half as large: stride-2 transposed 4×4
            (10, 8, nn.Conv2d, (3, 3)),  # otherwise a valid (1 + 10 - 8)² convolution
            (8, 8, nn.Conv2d, (1, 1)),
        ],
    )
    def test_picks_the_reference_convolution(self, student_hw, teacher_hw, conv_type, kernel):
        regressor = ConvReg((2, 6, student_hw, student_hw), (2, 10, teacher_hw, teacher_hw))
        assert type(regressor.conv) is conv_type and regressor.conv.kernel_size == kernel
        out = regressor(torch.randn(2, 6, student_hw, student_hw))
        assert out.shape == (2, 10, teacher_hw, teacher_hw) and (out >= 0).all()

    def test_refuses_a_smaller_student_map(self):
        with pytest.raises(ValueError, match="student map of size 5x5 onto a teacher map of 16x16"):
            ConvReg((2, 6, 5, 5), (2, 10, 16, 16))


class TestFitNet:
    def test_forward_features_matches_explicit_regression(self):
        # regressor = 1×1 conv + BatchNorm (training mode: batch statistics, biased variance) + ReLU
        f_s, f_t = torch.randn(2, 3, 4, 4, dtype=f64), torch.randn(2, 5, 4, 4, dtype=f64)
        student, teacher = _features([f_s, f_s, f_s]), _features([f_t, f_t, f_t])
        loss = FitNet.from_features(student, teacher).double()
        with torch.no_grad():
            loss.regressor.bn.weight.uniform_(0.5, 2.0)
            loss.regressor.bn.bias.uniform_(-0.5, 0.5)
        conv, bn = loss.regressor.conv, loss.regressor.bn
        y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], f_s) + conv.bias.view(1, -1, 1, 1)
        mean = y.mean(dim=(0, 2, 3), keepdim=True)
        var = (y - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        y = torch.relu(y)
        expected = sum((a - b) ** 2 for a, b in zip(y.flatten().tolist(), f_t.flatten().tolist())) / y.numel()
        assert loss.forward_features(student, teacher).item() == pytest.approx(expected, rel=1e-10)

    def test_hint_layer_option(self):
        maps_s = [torch.randn(2, c, s, s) for c, s in ((4, 8), (4, 8), (8, 4), (16, 2))]
        maps_t = [torch.randn(2, c, s, s) for c, s in ((8, 8), (8, 8), (16, 4), (32, 2))]
        loss = FitNet.from_features(_features(maps_s), _features(maps_t), hint_layer=3)
        assert loss.hint_layer == 3 and loss.regressor.conv.out_channels == 32
        assert loss.forward_features(_features(maps_s), _features(maps_t)).shape == ()

    def test_gradcheck(self):
        f_s = torch.randn(3, 2, 2, 2, dtype=f64, requires_grad=True)
        f_t = torch.randn(3, 3, 1, 1, dtype=f64)
        loss = FitNet(ConvReg(f_s.shape, f_t.shape), hint_layer=0).double()
        assert gradcheck(lambda x: loss.forward_features(_features([x]), _features([f_t])), (f_s,))

    def test_bad_input(self):
        student = _features([torch.randn(2, 3, 4, 4)] * 3)
        with pytest.raises(ValueError, match="hint_layer=5 is out of range for the student's 3 maps"):
            FitNet.from_features(student, student, hint_layer=5)
        with pytest.raises(ValueError, match=r"map has shape \(2, 3, 4, 4\), teacher hint has \(2, 6, 4, 4\)"):
            FitNet()(torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4))
        with pytest.raises(ValueError, match="FitNet: student batch size 2 != teacher batch size 5"):
            FitNet.from_features(student, _features([torch.randn(5, 3, 4, 4)] * 3))


# ----------------------------------------------------------------------------------------- AT
def _attention_by_loops(f: torch.Tensor) -> list[list[float]]:
    """Q[b][p] = mean_c f[b, c, p]², divided by its L2 norm over positions p."""
    b, c, h, w = f.shape
    rows = []
    for sample in f.reshape(b, c, h * w).tolist():
        a = [sum(sample[ch][p] ** 2 for ch in range(c)) / c for p in range(h * w)]
        norm = math.sqrt(sum(v * v for v in a))
        rows.append([v / norm for v in a])
    return rows


def _at_by_loops(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    q_s, q_t = _attention_by_loops(f_s), _attention_by_loops(f_t)
    diffs = [(a - b) ** 2 for row_s, row_t in zip(q_s, q_t) for a, b in zip(row_s, row_t)]
    return sum(diffs) / len(diffs)


class TestAT:
    def test_matches_loops_with_pooling(self):
        # stage 1: equal sizes; stage 2: the student map is twice as large and is pooled 2×2
        g_s = [torch.randn(2, 3, 4, 4, dtype=f64), torch.randn(2, 4, 8, 8, dtype=f64)]
        g_t = [torch.randn(2, 6, 4, 4, dtype=f64), torch.randn(2, 5, 4, 4, dtype=f64)]
        expected = _at_by_loops(g_s[0], g_t[0]) + _at_by_loops(_block_mean(g_s[1], 2), g_t[1])
        assert AT()(g_s, g_t).item() == pytest.approx(expected, rel=1e-10)
        layers = AT().layer_losses(g_s, g_t)
        assert layers[0].item() == pytest.approx(_at_by_loops(g_s[0], g_t[0]), rel=1e-10)

    def test_invariances(self):
        f_s, f_t = torch.randn(3, 4, 5, 5, dtype=f64), torch.randn(3, 7, 5, 5, dtype=f64)
        base = AT()([f_s], [f_t]).item()
        per_sample_scale = torch.rand(3, 1, 1, 1, dtype=f64) * 4 + 0.1
        assert AT()([f_s * per_sample_scale], [f_t]).item() == pytest.approx(base, rel=1e-10)
        assert AT()([f_s[:, torch.randperm(4)]], [f_t]).item() == pytest.approx(base, rel=1e-10)
        assert AT()([f_t * 3], [f_t]).item() == pytest.approx(0.0, abs=1e-15)

    def test_gradcheck(self):
        f_s = torch.randn(2, 3, 4, 4, dtype=f64, requires_grad=True)
        f_t = torch.randn(2, 5, 2, 2, dtype=f64)
        assert gradcheck(lambda x: AT()([x], [f_t]), (f_s,))

    def test_bad_input(self):
        g = [torch.randn(2, 3, 4, 4)] * 3
        with pytest.raises(ValueError, match="AT maps\\[1:\\]: student gives 3 maps, teacher gives 2"):
            AT.from_features(_features(g + [g[0]]), _features(g))
        with pytest.raises(ValueError, match=r"AT \(map 0\): student batch size 2 != teacher batch size 4"):
            AT()(g[:1], [torch.randn(4, 3, 4, 4)])
        with pytest.raises(ValueError, match=r"AT: student map 0 must be \(B, C, H, W\), got shape \(2, 3\)"):
            AT()([torch.randn(2, 3)], g[:1])


# ----------------------------------------------------------------------------------------- SP
def _sp_by_loops(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """Tung & Mori eq. (2)-(4): row-normalised Gram matrices, squared Frobenius distance / B²."""

    def normalised_gram(f):
        q = f.flatten(1).tolist()
        g = [[sum(a * b for a, b in zip(u, v)) for v in q] for u in q]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in g]

    g_s, g_t = normalised_gram(f_s), normalised_gram(f_t)
    n = len(g_s)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


class TestSP:
    def test_matches_loops(self):
        f_s, f_t = torch.randn(5, 3, 4, 4, dtype=f64), torch.randn(5, 8, 2, 2, dtype=f64)
        assert SP()([f_s], [f_t]).item() == pytest.approx(_sp_by_loops(f_s, f_t), rel=1e-10)

    def test_forward_features_reads_the_last_map(self):
        maps_s = [torch.randn(4, 2, 4, 4, dtype=f64), torch.randn(4, 3, 2, 2, dtype=f64)]
        maps_t = [torch.randn(4, 5, 4, 4, dtype=f64), torch.randn(4, 6, 2, 2, dtype=f64)]
        loss = SP.from_features(_features(maps_s), _features(maps_t))
        value = loss.forward_features(_features(maps_s), _features(maps_t)).item()
        assert value == pytest.approx(_sp_by_loops(maps_s[-1], maps_t[-1]), rel=1e-10)

    def test_invariances(self):
        f_s, f_t = torch.randn(6, 4, 3, 3, dtype=f64), torch.randn(6, 5, 3, 3, dtype=f64)
        base = SP()([f_s], [f_t]).item()
        assert SP()([f_s * 7.5], [f_t]).item() == pytest.approx(base, rel=1e-10)
        assert SP()([f_s[:, torch.randperm(4)]], [f_t]).item() == pytest.approx(base, rel=1e-10)
        # any orthogonal map of the flattened features keeps the Gram matrix
        q, _ = torch.linalg.qr(torch.randn(36, 36, dtype=f64))
        rotated = (f_s.flatten(1) @ q).reshape(6, 36, 1, 1)
        assert SP()([rotated], [f_t]).item() == pytest.approx(base, rel=1e-9)

    def test_gradcheck(self):
        f_s = torch.randn(4, 2, 3, 3, dtype=f64, requires_grad=True)
        f_t = torch.randn(4, 3, 2, 2, dtype=f64)
        assert gradcheck(lambda x: SP()([x], [f_t]), (f_s,))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="SP \\(map 0\\): student batch size 4 != teacher batch size 3"):
            SP()([torch.randn(4, 2, 3, 3)], [torch.randn(3, 2, 3, 3)])


# ---------------------------------------------------------------------------------------- VID
def _vid_by_hand(head, f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """Gaussian NLL 0.5·((μ - t)²/σ² + log σ²), μ: three 1×1 convs, σ² = softplus(α) + eps."""
    w1, w2, w3 = (head.regressor[i].weight.detach()[:, :, 0, 0] for i in (0, 2, 4))
    hidden = torch.relu(torch.einsum("oc,bchw->bohw", w1, f_s))
    hidden = torch.relu(torch.einsum("oc,bchw->bohw", w2, hidden))
    mean = torch.einsum("oc,bchw->bohw", w3, hidden)
    var = [math.log1p(math.exp(a)) + head.eps for a in head.log_scale.tolist()]
    b, c, h, w = f_t.shape
    total = 0.0
    for ch in range(c):
        diff = (mean[:, ch] - f_t[:, ch]).flatten().tolist()
        total += sum(0.5 * (d * d / var[ch] + math.log(var[ch])) for d in diff)
    return total / f_t.numel()


class TestVID:
    def test_initial_variance(self):
        loss = VID([3, 4], [5, 6], init_pred_var=5.0)
        for head in loss.heads:
            torch.testing.assert_close(head.pred_var(), torch.full_like(head.pred_var(), 5.0))

    def test_matches_hand_computation_with_pooling(self):
        # stage 2: the teacher map is twice as large and is pooled 2×2 before comparison
        g_s = [torch.randn(2, 3, 4, 4, dtype=f64), torch.randn(2, 4, 2, 2, dtype=f64)]
        g_t = [torch.randn(2, 5, 4, 4, dtype=f64), torch.randn(2, 6, 4, 4, dtype=f64)]
        loss = VID.from_features(_features([g_s[0]] + g_s), _features([g_t[0]] + g_t)).double()
        with torch.no_grad():
            loss.heads[1].log_scale.uniform_(-1.0, 2.0)  # distinct variances per channel
        expected = _vid_by_hand(loss.heads[0], g_s[0], g_t[0])
        expected += _vid_by_hand(loss.heads[1], g_s[1], _block_mean(g_t[1], 2))
        assert loss(g_s, g_t).item() == pytest.approx(expected, rel=1e-10)

    def test_gradcheck(self):
        loss = VID([2], [3]).double()
        f_t = torch.randn(2, 3, 2, 2, dtype=f64)
        f_s = torch.randn(2, 2, 2, 2, dtype=f64, requires_grad=True)
        assert gradcheck(lambda x: loss([x], [f_t]), (f_s,))

    def test_bad_input(self):
        loss = VID([3, 4], [5, 6])
        g_s = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)]
        g_t = [torch.randn(2, 5, 4, 4), torch.randn(2, 6, 2, 2)]
        with pytest.raises(ValueError, match="VID: got 1 map pairs, but the loss was built for 2"):
            loss(g_s[:1], g_t[:1])
        with pytest.raises(ValueError, match=r"pair 1 has .* channels \(4, 7\), but .* built for \(4, 6\)"):
            loss(g_s, [g_t[0], torch.randn(2, 7, 2, 2)])
        with pytest.raises(ValueError, match="must be equally long"):
            VID([3, 4], [5])


# ---------------------------------------------------------------------------------------- NST
def _nst_by_loops(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """MMD² with k(x, y) = (xᵀy)² between the spatially L2-normalised channel vectors."""

    def channels(f):
        out = []
        for sample in f.flatten(2).tolist():
            out.append([[v / math.sqrt(sum(x * x for x in ch)) for v in ch] for ch in sample])
        return out

    def kernel_mean(a, b):
        values = [sum(x * y for x, y in zip(u, v)) ** 2 for sa, sb in zip(a, b) for u in sa for v in sb]
        return sum(values) / len(values)

    s, t = channels(f_s), channels(f_t)
    return kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)


class TestNST:
    def test_hand_worked(self):
        # student channels e1, e2 over 2 positions, teacher one channel e1:
        # mean k(t,t) = 1; mean k(s,s) = (1 + 0 + 0 + 1)/4 = 0.5; mean k(s,t) = (1 + 0)/2 = 0.5
        # MMD² = 1 + 0.5 - 2·0.5 = 0.5
        f_s = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
        f_t = torch.tensor([[[[2.0, 0.0]]]])  # (1, 1, 1, 2)
        assert NST()([f_s], [f_t]).item() == pytest.approx(0.5)

    def test_matches_loops_with_pooling(self):
        g_s = [torch.randn(2, 3, 4, 4, dtype=f64), torch.randn(2, 2, 2, 2, dtype=f64)]
        g_t = [torch.randn(2, 5, 2, 2, dtype=f64), torch.randn(2, 4, 2, 2, dtype=f64)]
        expected = _nst_by_loops(_block_mean(g_s[0], 2), g_t[0]) + _nst_by_loops(g_s[1], g_t[1])
        assert NST()(g_s, g_t).item() == pytest.approx(expected, rel=1e-10)

    def test_invariances(self):
        f_s, f_t = torch.randn(2, 4, 3, 3, dtype=f64), torch.randn(2, 6, 3, 3, dtype=f64)
        base = NST()([f_s], [f_t]).item()
        channel_scale = torch.rand(1, 4, 1, 1, dtype=f64) * 3 + 0.2
        assert NST()([f_s * channel_scale], [f_t]).item() == pytest.approx(base, rel=1e-10)
        assert NST()([f_s[:, torch.randperm(4)]], [f_t]).item() == pytest.approx(base, rel=1e-10)
        positions = torch.randperm(9)
        permute = lambda f: f.flatten(2)[:, :, positions].reshape(f.shape)  # noqa: E731
        assert NST()([permute(f_s)], [permute(f_t)]).item() == pytest.approx(base, rel=1e-10)
        assert NST()([f_t * 2], [f_t]).item() == pytest.approx(0.0, abs=1e-12)

    def test_gradcheck(self):
        f_s = torch.randn(2, 3, 2, 2, dtype=f64, requires_grad=True)
        f_t = torch.randn(2, 4, 2, 2, dtype=f64)
        assert gradcheck(lambda x: NST()([x], [f_t]), (f_s,))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="NST: got no feature maps"):
            NST()([], [])
