"""Every baseline loss built from, and applied to, realistic ResNet-like features by name."""
from __future__ import annotations

import pytest
import torch

import losses
from losses import Features

pytestmark = pytest.mark.usefixtures("single_thread")

BASELINES = ["abound", "at", "cc", "fitnet", "fsp", "ft", "kd", "nst", "pkt", "rkd", "sp", "vid"]

# β of RepDistiller's scripts/run_cifar_distill.sh (KD: α = 0.9 with γ = 0.1 CE)
REFERENCE_WEIGHTS = {
    "kd": 0.9, "fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "vid": 1, "rkd": 1,
    "pkt": 30000, "abound": 1, "ft": 200, "fsp": 50, "nst": 50,
}
# (init_stage_trains_student, distill_after_init)
TWO_STAGE = {"abound": (True, False), "ft": (False, True), "fsp": (True, False)}


def resnet_features(widths: tuple[int, ...], batch: int = 4, size: int = 16, classes: int = 10) -> Features:
    """Features shaped like a CIFAR ResNet: stem and first stage at ``size``, then halving per stage.

    Built from leaf pre-activations, so a test can check that a loss's gradient reaches them.
    """
    sizes = [size, size] + [size // 2**i for i in range(1, len(widths) - 1)]
    preact = [torch.randn(batch, c, s, s, requires_grad=True) for c, s in zip(widths, sizes)]
    maps = [torch.relu(p) for p in preact]
    pooled = maps[-1].mean(dim=(2, 3))
    logits = pooled @ torch.randn(widths[-1], classes)
    return Features(maps=maps, pooled=pooled, logits=logits, preact_maps=preact)


def _pair(name: str) -> tuple[Features, Features]:
    """Student resnet8x4-like vs a wider teacher; FSP needs equal widths (resnet20 vs resnet56)."""
    if name == "fsp":
        return resnet_features((16, 16, 32, 64)), resnet_features((16, 16, 32, 64))
    return resnet_features((16, 16, 32, 64)), resnet_features((32, 64, 128, 256))


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(losses.available())


@pytest.mark.parametrize("name", BASELINES)
def test_default_weight_and_stages_follow_the_reference(name):
    cls = losses.get(name)
    assert cls.default_weight == pytest.approx(REFERENCE_WEIGHTS[name])
    assert cls.needs_init_stage == (name in TWO_STAGE)
    trains_student, distils_after = TWO_STAGE.get(name, (False, True))
    assert cls.init_stage_trains_student == trains_student
    assert cls.distill_after_init == distils_after


@pytest.mark.parametrize("name", BASELINES)
def test_from_features_then_forward_features(name):
    student, teacher = _pair(name)
    teacher = teacher.detach()
    dataset_labels = torch.zeros(100, dtype=torch.long)  # ignored by the baselines, accepted all the same
    loss = losses.get(name).from_features(student, teacher, n_data=100, labels=dataset_labels)
    if loss.needs_init_stage:
        init = loss.init_stage_loss(student, teacher)
        assert init.shape == () and torch.isfinite(init) and init.item() > 0
    value = loss.forward_features(student, teacher, index=torch.arange(4), labels=dataset_labels[:4])
    assert value.shape == () and torch.isfinite(value)
    target = init if (loss.needs_init_stage and not loss.distill_after_init) else value
    target.backward()
    grads = [p.grad for p in student.preact_maps if p.grad is not None]
    if name != "ft":  # FT's first stage fits the teacher-side paraphraser only
        assert grads and any(g.abs().sum() > 0 for g in grads), f"{name}: no gradient reached the student"


@pytest.mark.parametrize("name", BASELINES)
def test_batch_mismatch_is_refused_up_front(name):
    student, _ = _pair(name)
    teacher = _pair(name)[1 if name != "fsp" else 0]
    small_teacher = Features(
        maps=[m[:3] for m in teacher.maps],
        pooled=teacher.pooled[:3],
        logits=teacher.logits[:3],
        preact_maps=[m[:3] for m in teacher.preact_maps],
    )
    with pytest.raises(ValueError, match="student batch size 4 != teacher batch size 3"):
        losses.get(name).from_features(student, small_teacher)


@pytest.mark.parametrize("name", ["at", "nst", "vid", "abound", "fsp"])
def test_a_teacher_with_one_more_stage_is_refused(name):
    student = resnet_features((16, 16, 32, 64))
    teacher = resnet_features((16, 16, 32, 64, 64) if name == "fsp" else (32, 64, 128, 256, 256))
    stages = 4 if name == "fsp" else 3  # FSP reads the stem too
    with pytest.raises(ValueError, match=f"student gives {stages} maps, teacher gives {stages + 1}"):
        losses.get(name).from_features(student, teacher)


@pytest.mark.parametrize("name", ["kd", "at", "sp", "nst", "pkt", "rkd", "cc"])
def test_parameter_free_losses_build_by_name(name):
    student = resnet_features((8, 8, 16, 32))
    value = losses.build(name).forward_features(student, student.detach())
    assert torch.isfinite(value)
