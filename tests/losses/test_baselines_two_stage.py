"""The two-stage losses AB, FT and FSP: their maths, their first stage, and what comes after it."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from losses import Features
from losses.ab import AB, activation_boundary_loss
from losses.fitnet import ConvReg
from losses.fsp import FSP
from losses.ft import FT

pytestmark = pytest.mark.usefixtures("single_thread")
f64 = torch.float64


def _decreases(loss_fn, parameters, steps: int = 8, lr: float = 1e-2) -> tuple[float, float]:
    """(first, last) value of ``loss_fn()`` over a few Adam steps on ``parameters``."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    values = []
    for _ in range(steps):
        loss = loss_fn()
        values.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return values[0], loss_fn().item()


def _leaf_maps(shapes, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in shapes]


def _preact_features(stages: list[torch.Tensor]) -> Features:
    """Features whose ``preact_maps[1:]`` are ``stages`` (AB's choice; the stem slot repeats stage 1)."""
    return Features(maps=[], pooled=stages[-1].mean((2, 3)), preact_maps=[stages[0], *stages])


# ----------------------------------------------------------------------------------------- AB
class TestAB:
    def test_hand_worked(self):
        # margin 1, per element (s, t):
        #   ( 0.5, -1): teacher off, s > -1      -> (0.5 + 1)² = 2.25
        #   (-2.0, -1): teacher off, s <= -1     -> 0
        #   ( 0.3,  1): teacher on,  s <= 1      -> (0.3 - 1)² = 0.49
        #   ( 2.0,  1): teacher on,  s > 1       -> 0
        #   (-1.0, -1): teacher off, s = -1 is not > -1 -> 0
        #   (-1.0,  1): teacher on,  s <= 1      -> (-1 - 1)² = 4
        # sum 6.74; one layer (weight 2^0 = 1), B = 1, × 3/1000 -> 0.02022
        s = torch.tensor([0.5, -2.0, 0.3, 2.0, -1.0, -1.0]).view(1, 6, 1, 1)
        t = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, 1.0]).view(1, 6, 1, 1)
        assert activation_boundary_loss(s, t).item() == pytest.approx(6.74)
        assert AB([s.shape], [t.shape])([s], [t]).item() == pytest.approx(0.02022)

    def test_layer_weights_and_batch_normalisation(self):
        # three stages: weights 1/4, 1/2, 1 (deepest weighs most); sums divided by B, × 3/1000
        shapes = [(4, 3, 4, 4), (4, 5, 2, 2), (4, 6, 1, 1)]
        g_s, g_t = [torch.randn(*s) for s in shapes], [torch.randn(*s) for s in shapes]
        loss = AB(shapes, shapes)
        assert loss.layer_weights == [0.25, 0.5, 1.0]
        expected = 0.0
        for weight, s, t in zip([0.25, 0.5, 1.0], g_s, g_t):
            per_element = [
                (a + 1) ** 2 if (b <= 0 and a > -1) else (a - 1) ** 2 if (b > 0 and a <= 1) else 0.0
                for a, b in zip(s.flatten().tolist(), t.flatten().tolist())
            ]
            expected += weight * sum(per_element) / 4 * 3 / 1000
        assert loss(g_s, g_t).item() == pytest.approx(expected, rel=1e-5)

    def test_connectors_follow_the_shapes(self):
        loss = AB([(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 8, 8, 8), (2, 32, 4, 4)])
        assert isinstance(loss.connectors[0], nn.Identity)
        assert isinstance(loss.connectors[1], ConvReg) and isinstance(loss.connectors[1].act, nn.Identity)

    def test_init_stage_decreases_and_trains_student_maps(self):
        s_shapes, t_shapes = [(4, 4, 8, 8), (4, 8, 4, 4)], [(4, 8, 8, 8), (4, 16, 4, 4)]
        preact_s = _leaf_maps(s_shapes)
        teacher = _preact_features([torch.randn(*s) for s in t_shapes])
        loss = AB.from_features(_preact_features(preact_s), teacher)
        assert AB.needs_init_stage and AB.init_stage_trains_student and not AB.distill_after_init
        init_loss = lambda: loss.init_stage_loss(_preact_features(preact_s), teacher)  # noqa: E731
        first, last = _decreases(init_loss, [*preact_s, *loss.parameters()])
        assert last < first

    def test_forward_features_after_init_is_a_connected_zero(self):
        shapes = [(2, 3, 4, 4), (2, 3, 4, 4)]
        pooled = torch.randn(2, 3, requires_grad=True)
        student = Features(maps=[], pooled=pooled, preact_maps=[torch.randn(*s) for s in shapes])
        loss = AB.from_features(student, student)
        value = loss.forward_features(student, student)
        assert value.item() == 0.0 and value.requires_grad
        value.backward()
        assert torch.equal(pooled.grad, torch.zeros_like(pooled))

    def test_gradcheck_through_connectors(self):
        loss = AB([(3, 2, 2, 2)], [(3, 3, 2, 2)]).double()
        teacher = _preact_features([torch.randn(3, 3, 2, 2, dtype=f64)])
        s = torch.randn(3, 2, 2, 2, dtype=f64, requires_grad=True)
        assert gradcheck(lambda x: loss.init_stage_loss(_preact_features([x]), teacher), (s,))

    def test_bad_input(self):
        no_preact = Features(maps=[torch.randn(2, 3, 4, 4)] * 2, pooled=torch.randn(2, 3))
        with pytest.raises(ValueError, match="preact_maps is None, but AB compares pre-activation maps"):
            AB.from_features(no_preact, no_preact)
        loss = AB([(2, 3, 4, 4)] * 2, [(2, 3, 4, 4)] * 2)
        three = Features(maps=[], pooled=torch.randn(2, 3), preact_maps=[torch.randn(2, 3, 4, 4)] * 4)
        with pytest.raises(ValueError, match="AB: got 3 map pairs, but the loss was built for 2"):
            loss.init_stage_loss(three, three)
        with pytest.raises(ValueError, match="2 student shapes but 1 teacher shapes"):
            AB([(2, 3, 4, 4)] * 2, [(2, 3, 4, 4)])


# ----------------------------------------------------------------------------------------- FT
def _factor_l1_by_loops(factor_s: torch.Tensor, factor_t: torch.Tensor) -> float:
    """Kim et al. eq. (3) with p = 1: mean |F_s/‖F_s‖ - F_t/‖F_t‖| of channel-mean squared factors."""
    total, count = 0.0, 0
    for fs, ft in zip(factor_s, factor_t):  # one sample at a time
        a_s = (fs**2).sum(0).flatten() / fs.shape[0]
        a_t = (ft**2).sum(0).flatten() / ft.shape[0]
        for x, y in zip((a_s / a_s.norm()).tolist(), (a_t / a_t.norm()).tolist()):
            total, count = total + abs(x - y), count + 1
    return total / count


class TestFT:
    def test_factor_loss_matches_loops(self):
        factor_s, factor_t = torch.randn(3, 4, 4, 4, dtype=f64), torch.randn(3, 6, 4, 4, dtype=f64)
        expected = _factor_l1_by_loops(factor_s, factor_t)
        assert FT(2, 2)(factor_s, factor_t).item() == pytest.approx(expected, rel=1e-10)

    def test_modules_follow_the_rate(self):
        loss = FT(student_channels=6, teacher_channels=10)
        assert loss.paraphraser(torch.randn(2, 10, 4, 4))[0].shape == (2, 5, 4, 4)
        assert loss.paraphraser(torch.randn(2, 10, 4, 4))[1].shape == (2, 10, 4, 4)
        assert loss.translator(torch.randn(2, 6, 4, 4)).shape == (2, 5, 4, 4)

    def test_init_stage_trains_only_the_paraphraser(self):
        f_s = torch.randn(4, 6, 4, 4, requires_grad=True)
        student = Features(maps=[f_s], pooled=f_s.mean((2, 3)))
        teacher = Features(maps=[torch.relu(torch.randn(4, 8, 4, 4))], pooled=torch.randn(4, 8))
        loss = FT.from_features(student, teacher)
        assert FT.needs_init_stage and not FT.init_stage_trains_student and FT.distill_after_init
        init_loss = lambda: loss.init_stage_loss(student, teacher)  # noqa: E731
        first, last = _decreases(init_loss, loss.paraphraser.parameters(), lr=3e-3)
        assert last < first
        assert f_s.grad is None and all(p.grad is None for p in loss.translator.parameters())

    def test_distillation_stage_trains_the_translator_not_the_paraphraser(self):
        f_s = torch.randn(4, 6, 4, 4, requires_grad=True)
        student = Features(maps=[f_s], pooled=f_s.mean((2, 3)))
        teacher = Features(maps=[torch.randn(4, 8, 2, 2)], pooled=torch.randn(4, 8))
        loss = FT.from_features(student, teacher)
        loss.forward_features(student, teacher).backward()
        assert f_s.grad is not None and all(p.grad is not None for p in loss.translator.parameters())
        assert all(p.grad is None for p in loss.paraphraser.parameters())

    def test_gradcheck(self):
        loss = FT(2, 4).double()
        f_s = torch.randn(3, 2, 2, 2, dtype=f64, requires_grad=True)
        teacher = Features(maps=[torch.randn(3, 4, 2, 2, dtype=f64)], pooled=torch.randn(3, 4, dtype=f64))
        assert gradcheck(lambda x: loss.forward_features(Features([x], x.mean((2, 3))), teacher), (f_s,))

    def test_bad_input(self):
        loss = FT(6, 8)
        student = Features(maps=[torch.randn(2, 6, 4, 4)], pooled=torch.randn(2, 6))
        wrong = Features(maps=[torch.randn(2, 9, 4, 4)], pooled=torch.randn(2, 9))
        with pytest.raises(ValueError, match=r"FT: teacher maps\[-1\] has 9 channels, but .* built for 8"):
            loss.forward_features(student, wrong)
        with pytest.raises(ValueError, match="FT: student batch size 2 != teacher batch size 3"):
            loss(torch.randn(2, 3, 4, 4), torch.randn(3, 4, 4, 4))


# ---------------------------------------------------------------------------------------- FSP
def _fsp_by_loops(bottom: torch.Tensor, top: torch.Tensor) -> list:
    """G[b][j][i] = Σ_p top[b, j, p] · bottom[b, i, p] / P, for maps of equal size."""
    bot, tp = bottom.flatten(2).tolist(), top.flatten(2).tolist()
    positions = len(bot[0][0])

    def entry(b: int, j: int, i: int) -> float:
        return sum(x * y for x, y in zip(tp[b][j], bot[b][i])) / positions

    batch, c_top, c_bot = len(bot), len(tp[0]), len(bot[0])
    return [[[entry(b, j, i) for i in range(c_bot)] for j in range(c_top)] for b in range(batch)]


def _mean_squared(a: list, b: list) -> float:
    flat = [(x - y) ** 2 for sa, sb in zip(a, b) for ra, rb in zip(sa, sb) for x, y in zip(ra, rb)]
    return sum(flat) / len(flat)


class TestFSP:
    def test_matches_loops_with_pooling(self):
        # maps at 4×4, 4×4, 2×2: the second pair pools its 4×4 bottom map 2×2 first
        shapes = [(2, 3, 4, 4), (2, 3, 4, 4), (2, 5, 2, 2)]
        g_s, g_t = [torch.randn(*s, dtype=f64) for s in shapes], [torch.randn(*s, dtype=f64) for s in shapes]
        pooled = lambda x: x.reshape(2, -1, 2, 2, 2, 2).mean(dim=(3, 5))  # noqa: E731  (2×2 blocks)
        first = _mean_squared(_fsp_by_loops(g_s[0], g_s[1]), _fsp_by_loops(g_t[0], g_t[1]))
        second = _mean_squared(_fsp_by_loops(pooled(g_s[1]), g_s[2]), _fsp_by_loops(pooled(g_t[1]), g_t[2]))
        expected = first + second
        assert FSP()(g_s, g_t).item() == pytest.approx(expected, rel=1e-10)

    def test_init_stage_decreases_and_after_init_is_a_connected_zero(self):
        shapes = [(4, 4, 8, 8), (4, 4, 8, 8), (4, 8, 4, 4)]
        maps_s = _leaf_maps(shapes)
        teacher = Features(maps=[torch.randn(*s) for s in shapes], pooled=torch.randn(4, 8))
        student = lambda: Features(maps=maps_s, pooled=maps_s[-1].mean((2, 3)))  # noqa: E731
        loss = FSP.from_features(student(), teacher)
        assert FSP.needs_init_stage and FSP.init_stage_trains_student and not FSP.distill_after_init
        first, last = _decreases(lambda: loss.init_stage_loss(student(), teacher), maps_s)
        assert last < first
        value = loss.forward_features(student(), teacher)
        assert value.item() == 0.0 and value.requires_grad

    def test_gradcheck(self):
        g_s = _leaf_maps([(2, 2, 2, 2), (2, 3, 1, 1)], dtype=f64)
        g_t = [torch.randn(2, 2, 2, 2, dtype=f64), torch.randn(2, 3, 1, 1, dtype=f64)]
        assert gradcheck(lambda a, b: FSP()([a, b], g_t), tuple(g_s))

    def test_bad_input(self):
        student = Features(maps=[torch.randn(2, 3, 4, 4), torch.randn(2, 6, 2, 2)], pooled=torch.randn(2, 6))
        wider = Features(maps=[torch.randn(2, 3, 4, 4), torch.randn(2, 12, 2, 2)], pooled=torch.randn(2, 12))
        with pytest.raises(ValueError, match=r"map channels \[3, 6\] differ from teacher map channels \[3, 12\]"):
            FSP.from_features(student, wider)
        with pytest.raises(ValueError, match="FSP: got 1 map; expected at least 2"):
            FSP()([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)])
        other = [torch.randn(2, 3, 4, 4), torch.randn(2, 7, 2, 2)]
        with pytest.raises(ValueError, match=r"map channels \[3, 7\], but the loss was built for \[3, 6\]"):
            FSP([3, 6])(other, other)
