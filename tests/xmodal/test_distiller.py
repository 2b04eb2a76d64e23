"""The one distillation step (:class:`xmodal.distiller.Distiller`), checked against each loss
computed on its own: one critic per teacher is the critic alone, KD from several teachers is KD
from their averaged softmax written out by hand, views and teachers run once per batch, and what a
loss needs comes from the loss's own declaration."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import CRDLoss, DistillLoss
from losses.registry import _REGISTRY
from xmodal.distiller import Distiller, term_names
from xmodal.errors import ConfigError
from xmodal.modalities import build_modality
from xmodal.models import build_model
from xmodal.tasks.distill import reads_logits, resolve_method

N = 40


def _batch(seed: int = 0, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(size, 3, 16, 16, generator=g), "index": torch.randperm(N, generator=g)[:size]}


def _nets(classes=(10, 10)):
    torch.manual_seed(0)
    student = build_model("resnet8", in_channels=2, num_classes=10, width=4)
    teachers = [(build_model("resnet8", in_channels=1, num_classes=c, width=4 + 2 * i).eval(), "L")
                for i, c in enumerate(classes)]
    return student, teachers


def _distiller(terms, classes=(10, 10), options=None) -> Distiller:
    student, teachers = _nets(classes)
    lab = build_modality("lab", teacher_view="L", student_view="ab")
    return Distiller.build(student, "ab", teachers, lab, terms, _batch(), n_data=N,
                           options=options or {"crd": {"nce_k": 16}})


def test_term_names_one_critic_per_teacher_and_one_averaged_kd():
    assert term_names({"kd": 0.9, "crd": 0.8}, 1) == {"kd": ("kd", 0), "crd": ("crd", 0)}
    assert term_names({"kd": 0.9, "crd": 0.8}, 3) == {"kd": ("kd", -1), "crd_0": ("crd", 0), "crd_1": ("crd", 1),
                                                      "crd_2": ("crd", 2)}


def test_each_critic_computes_what_it_computes_alone():
    distiller = _distiller({"crd": 0.8})
    batch = _batch(1)
    student_in, taught = distiller.inputs(batch)
    alone = []
    for i, t in enumerate(taught):  # seed + i: its own banks and draws
        critic = CRDLoss(distiller.criteria["crd_0"].student_dim, t.pooled.shape[1], N, nce_k=16, seed=i)
        critic.load_state_dict(distiller.criteria[f"crd_{i}"].state_dict())  # the same heads (drawn under another RNG)
        alone.append(critic)
    assert not torch.equal(alone[0].memory.teacher_bank, alone[1].memory.teacher_bank)
    f_s = distiller.student(student_in).pooled
    terms = distiller.terms(distiller.student(student_in), taught, batch["index"], None)
    for i, t in enumerate(taught):
        assert torch.allclose(terms[f"crd_{i}"], 0.8 * alone[i](f_s, t.pooled, batch["index"]), atol=1e-6)


def test_kd_from_several_teachers_is_kd_from_their_averaged_softmax():
    distiller = _distiller({"kd": 0.9})
    batch = _batch(2)
    student_in, taught = distiller.inputs(batch)
    student = distiller.student(student_in)
    got = distiller.terms(student, taught, batch["index"], None)["kd"]
    T = 4.0
    p_t = torch.stack([F.softmax(t.logits / T, dim=1) for t in taught]).mean(0)
    by_hand = (p_t * (p_t.log() - F.log_softmax(student.logits / T, dim=1))).sum(1).mean() * T * T
    assert torch.allclose(got, 0.9 * by_hand, rtol=1e-5, atol=1e-6)


def test_each_view_and_each_teacher_run_once_per_batch(monkeypatch):
    distiller = _distiller({"kd": 0.9, "crd": 0.8})
    views, calls = [], [0, 0]
    compute = distiller.modality.compute
    monkeypatch.setattr(distiller.modality, "compute", lambda batch, names: views.append(names) or compute(batch, names))
    for i, teacher in enumerate(distiller.teachers):
        teacher.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    out = distiller.training_step(_batch(3))
    assert len(views) == 1 and views[0] == {"L", "ab"} and calls == [1, 1]
    assert set(out) >= {"loss", "kd", "crd_0", "crd_1"}
    assert torch.allclose(out["loss"], out["kd"] + out["crd_0"] + out["crd_1"])


def test_teachers_stay_out_of_the_checkpoint_and_one_teacher_keeps_the_loss_names():
    student, teachers = _nets((10,))
    lab = build_modality("lab", teacher_view="L", student_view="ab")
    one = Distiller.build(student, "ab", teachers, lab, {"crd": 0.8, "kd": 0.9}, _batch(), n_data=N,
                          options={"crd": {"nce_k": 16}})
    roots = {key.split(".")[0] + "." + key.split(".")[1] if key.startswith("criteria") else key.split(".")[0]
             for key in one.state_dict()}
    # the layout a single-teacher stage's checkpoint always had: student.* and criteria.<loss>.* (KD holds no state)
    assert roots == {"student", "criteria.crd"}


def test_warm_start_fills_each_critic_from_its_own_teacher():
    distiller = _distiller({"crd": 0.8})
    batches = [{"image": torch.rand(N, 3, 16, 16), "index": torch.arange(N)}]
    distiller.warm_start(batches)
    student_in, taught = distiller.inputs(batches[0])
    for i, critic in enumerate(distiller.criteria[f"crd_{i}"] for i in range(2)):
        v_t = F.normalize(critic.embed_t(taught[i].pooled), dim=1)
        assert torch.allclose(critic.memory.teacher_bank.float(), v_t, atol=1e-5)


def test_warm_start_stops_once_every_bank_is_full():
    # A queue of 16 is full after 16 samples; the full bank of another run needs all N = 40 rows.
    for options, expected in (({"crd": {"nce_k": 16, "bank": "queue"}}, 2), ({"crd": {"nce_k": 16}}, 5)):
        distiller = _distiller({"crd": 0.8}, classes=(10,), options=options)
        initial = distiller.criteria["crd"].memory.student_bank.clone()
        read = []

        def batches():
            for i in range(5):  # 5 batches of 8 = N
                read.append(i)
                yield {"image": torch.rand(8, 3, 16, 16), "index": torch.arange(8 * i, 8 * i + 8)}

        distiller.warm_start(batches())
        assert len(read) == expected, options
        assert (distiller.criteria["crd"].memory.student_bank != initial).any(dim=1).all()  # every row written


def test_kd_refuses_teachers_of_different_class_sets():
    with pytest.raises(ConfigError, match=r"classifiers have \[10, 7\] classes"):
        _distiller({"kd": 0.9}, classes=(10, 7))


@pytest.fixture
def toy_logit_loss():
    """A loss registered for this test only: it reads logits, so the registry's declaration alone
    must give the student a classifier and several teachers an averaged target."""

    @losses.register("toy_logits")
    class ToyLogits(DistillLoss):
        reads_logits = True
        T = 2.0

        def forward_features(self, student, teacher, index=None, labels=None):
            return (student.logits - teacher.logits).pow(2).mean()

    yield ToyLogits
    del _REGISTRY["toy_logits"]


def test_a_new_logit_loss_is_handled_from_its_declaration(toy_logit_loss):
    assert reads_logits(resolve_method("toy_logits", {})) and not reads_logits(resolve_method("crd", {}))
    distiller = _distiller({"toy_logits": 1.0})
    assert set(distiller.criteria) == {"toy_logits"}  # one term for the averaged teachers, not one per teacher
    batch = _batch(4)
    student_in, taught = distiller.inputs(batch)
    target = distiller.teacher_of("toy_logits", taught).logits
    p = torch.stack([F.softmax(t.logits / 2.0, dim=1) for t in taught]).mean(0)
    assert torch.allclose(F.softmax(target / 2.0, dim=1), p, atol=1e-6)


def test_the_ab_loss_is_renamed_abound():
    assert losses.get("abound").needs_preact
    with pytest.raises(ValueError, match="now registered as 'abound'"):
        losses.get("ab")
