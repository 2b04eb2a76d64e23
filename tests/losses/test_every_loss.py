"""One tester template every registered loss passes through (kornia's pattern): registering a loss
gets it built from features, differentiated (gradcheck in float64), run under autocast, saved and
restored, and fed a bad batch, with no test written for it by name."""
from __future__ import annotations

import copy

import pytest
import torch

import losses
from losses import Features

pytestmark = pytest.mark.usefixtures("single_thread")

N = 24  # memory-bank rows


def _features(batch: int = 4, widths=(4, 4, 8, 8), size: int = 8, classes: int = 5, dtype=torch.float32,
              seed: int = 0) -> Features:
    """CIFAR-ResNet-shaped features (stem and first stage at ``size``, then halving) from leaf
    pre-activations, so the gradient can be followed back to them."""
    g = torch.Generator().manual_seed(seed)
    sizes = [size, size] + [size // 2**i for i in range(1, len(widths) - 1)]
    preact = [torch.randn(batch, c, s, s, generator=g, dtype=dtype).requires_grad_() for c, s in zip(widths, sizes)]
    maps = [torch.relu(p) for p in preact]
    pooled = maps[-1].mean(dim=(2, 3))
    logits = pooled @ torch.randn(widths[-1], classes, generator=g, dtype=dtype)
    return Features(maps=maps, pooled=pooled, logits=logits, preact_maps=preact)


def _build(name: str, seed: int = 0, dtype=torch.float32):
    cls = losses.get(name)
    torch.manual_seed(seed)
    options = {"nce_k": 8, "seed": seed} if cls.memory_bank else {}
    loss = cls.from_features(_features(dtype=dtype), _features(dtype=dtype, seed=1), n_data=N, **options)
    return loss.to(dtype)


def _value(loss, student: Features, teacher: Features, index: torch.Tensor) -> torch.Tensor:
    """The loss's training objective on one batch: its first stage's where it only has that one."""
    if loss.needs_init_stage and not loss.distill_after_init:
        return loss.init_stage_loss(student if loss.init_stage_trains_student else None, teacher)
    return loss.forward_features(student, teacher, index)


INDEX = torch.tensor([3, 7, 11, 20])


@pytest.fixture(params=losses.available())
def name(request) -> str:
    return request.param


def test_declarations_are_consistent(name):
    cls = losses.get(name)
    assert cls.registry_name == name and cls.default_weight >= 0
    if cls.reads_logits:  # with several teachers it reads their soft labels averaged at its temperature
        assert float(_build(name).T) > 0
    assert not (cls.init_stage_trains_student and not cls.needs_init_stage)


def test_a_scalar_whose_gradient_reaches_the_student(name):
    loss = _build(name)
    student, teacher = _features(), _features(seed=1)
    value = _value(loss, student, teacher.detach(), INDEX)
    assert value.dim() == 0 and torch.isfinite(value)
    if loss.needs_init_stage and not loss.init_stage_trains_student and not loss.distill_after_init:
        return  # a first stage that trains only the loss's own modules
    value.backward()
    reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.preact_maps]
    assert any(reached), f"{name}: no gradient reached the student's features"


def test_gradcheck_in_float64(name):
    """The analytic gradient against finite differences; each evaluation on a fresh copy of the
    loss after one step, so a memory bank's update from one evaluation cannot leak into the next.
    That first step fixes what the loss fixes once and then holds constant (NCE's Z, as the paper).
    """
    built = _build(name, dtype=torch.float64)
    teacher = _features(dtype=torch.float64, seed=1).detach()
    _value(built, _features(dtype=torch.float64, seed=9), teacher, INDEX)
    leaves = tuple(_features(dtype=torch.float64).preact_maps)

    def f(*preact):
        loss = copy.deepcopy(built)
        maps = [torch.relu(p) for p in preact]
        pooled = maps[-1].mean(dim=(2, 3))
        s = Features(maps=maps, pooled=pooled, logits=pooled @ torch.ones(pooled.shape[1], 5, dtype=torch.float64),
                     preact_maps=list(preact))
        return _value(loss, s, teacher, INDEX)

    # ReLU kinks: nudge pre-activations away from 0 so finite differences do not straddle one
    nudged = tuple((p + 0.05 * torch.sign(p.detach())).detach().requires_grad_() for p in leaves)
    assert torch.autograd.gradcheck(f, nudged, eps=1e-6, atol=1e-4, rtol=1e-3, fast_mode=True)


def test_autocast_gives_a_finite_float32_close_to_full_precision(name):
    student, teacher = _features(), _features(seed=1).detach()
    full = _value(_build(name), student, teacher, INDEX)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _value(_build(name), student, teacher, INDEX)
    assert torch.isfinite(mixed)
    assert torch.allclose(mixed.float(), full, rtol=0.1, atol=1e-3 + 0.05 * float(full.abs()))


def test_state_dict_round_trip_reproduces_the_next_step(name):
    first, second = _build(name, seed=0), _build(name, seed=3)
    student, teacher = _features(seed=5), _features(seed=6).detach()
    _value(first, student, teacher, INDEX)  # move the state on (banks, Z, sampler step) before saving
    second.load_state_dict(first.state_dict())
    a = _value(first, _features(seed=7), teacher, INDEX)
    b = _value(second, _features(seed=7), teacher, INDEX)
    assert torch.equal(a, b)


def test_a_batch_mismatch_is_a_value_error(name):
    loss = _build(name)
    student, teacher = _features(batch=4), _features(batch=3, seed=1).detach()
    with pytest.raises(ValueError):
        _value(loss, student, teacher, INDEX)
