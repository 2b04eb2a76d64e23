"""One distillation step, for one teacher or several: :class:`Distiller`.

A :class:`Distiller` holds a student, M frozen teachers (each with the view of the batch it
reads), and the criteria. ``training_step(batch)`` converts the batch into every view once, runs
each teacher once, runs the student, and returns the weighted loss terms and their sum.

With M teachers, a loss that reads logits (KD) is built once and reads the teachers' averaged
soft labels at its temperature (CRD §4.4's ensemble KD); every other loss is built once per
teacher (``crd_0`` ... ``crd_{M-1}``: one critic per teacher, each at the method's weight, as in
the paper's ``L = CE - β Σ_i L_critic(T_i, S)``). With one teacher each loss keeps its own name.
What a loss needs (logits, pre-activation maps, a memory bank) it declares on
:class:`losses.DistillLoss`; nothing here names a loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable, ContextManager, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import losses
from ensemble.loss import averaged_soft_logits
from losses import DistillLoss, Features
from losses.contrast.distributed import world_size
from xmodal.errors import ConfigError
from xmodal.modalities import Modality

#: Where a criterion reads its teacher features: one teacher's index, or the averaged teachers.
AVERAGED = -1


def view_names(student_view: str, teachers: Sequence[tuple[nn.Module, str]]) -> list[str]:
    """The views one batch is converted into: the student's, then each teacher's, each once."""
    return list(dict.fromkeys([student_view, *(view for _, view in teachers)]))


def term_names(terms: Mapping[str, float], n_teachers: int) -> dict[str, tuple[str, int]]:
    """``term name -> (loss name, teacher index or AVERAGED)`` for ``terms`` over ``n_teachers``."""
    names: dict[str, tuple[str, int]] = {}
    for loss in terms:
        if n_teachers == 1:
            names[loss] = (loss, 0)
        elif losses.get(loss).reads_logits:
            names[loss] = (loss, AVERAGED)
        else:
            names.update({f"{loss}_{i}": (loss, i) for i in range(n_teachers)})
    return names


class Distiller(nn.Module):
    """A student, M frozen (teacher, view) pairs and the criteria; ``training_step(batch) -> terms``.

    The teachers stay outside the module tree: they neither train nor enter a checkpoint, and
    DDP synchronises the student and the criteria only. ``criteria`` are keyed by term name
    (:func:`term_names`); ``weights`` by loss name. ``teacher_weights`` scales each teacher's own
    terms (``crd_i`` weighs ``weights["crd"] * teacher_weights[i]``; the averaged KD is not scaled).
    ``ce_weight`` adds cross-entropy on the batch's labels where every sample carries one.
    """

    def __init__(self, student: nn.Module, student_view: str, teachers: Sequence[tuple[nn.Module, str]],
                 modality: Modality, criteria: Mapping[str, DistillLoss], weights: Mapping[str, float],
                 ce_weight: float = 0.0, teacher_weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("a Distiller needs at least one teacher")
        self.student = student
        self.criteria = nn.ModuleDict(dict(criteria))
        self.sources = term_names(weights, len(teachers))
        if set(self.sources) != set(self.criteria):
            raise ValueError(f"criteria {sorted(self.criteria)} do not match the terms {sorted(self.sources)}")
        scale = list(teacher_weights) if teacher_weights is not None else [1.0] * len(teachers)
        if len(scale) != len(teachers):
            raise ValueError(f"teacher_weights has {len(scale)} entries for {len(teachers)} teachers")
        self.weights = {name: float(weights[loss]) * (1.0 if source == AVERAGED else scale[source])
                        for name, (loss, source) in self.sources.items()}
        self.ce_weight = float(ce_weight)
        self.teachers = [teacher for teacher, _ in teachers]  # a plain list: not submodules
        self.teacher_views = [view for _, view in teachers]
        self.student_view = student_view
        self.view_names = view_names(student_view, teachers)
        self.modality = modality
        self.preact = any(c.needs_preact for c in self.criteria.values())

    @classmethod
    def build(cls, student: nn.Module, student_view: str, teachers: Sequence[tuple[nn.Module, str]],
              modality: Modality, terms: Mapping[str, float], sample: Mapping[str, Tensor], *, n_data: int,
              labels: Optional[Tensor] = None, options: Mapping[str, Mapping[str, Any]] = (),
              ce_weight: float = 0.0, teacher_weights: Optional[Sequence[float]] = None) -> "Distiller":
        """Construct each criterion for these networks from one batch of their features (eval mode).

        A memory-bank loss of teacher ``i`` is seeded ``seed + i``, so its banks and negatives
        differ from the other critics'. A bad option is a :class:`ConfigError` naming its recipe key.
        """
        options = dict(options)
        preact = any(losses.get(name).needs_preact for name in terms)
        names = term_names(terms, len(teachers))
        views = modality.views(sample, view_names(student_view, teachers))
        modes = [student.training] + [t.training for t, _ in teachers]
        with torch.no_grad():
            student.eval()
            for teacher, _ in teachers:
                teacher.eval()
            try:
                s_feats = student(views[student_view], preact=preact)
                taught = [teacher(views[view], preact=preact) for teacher, view in teachers]
            except ValueError as err:  # a backbone without pre-activation maps, given a loss that reads them
                needing = [name for name in terms if losses.get(name).needs_preact]
                raise ConfigError(f"{', '.join(needing)} reads pre-activation maps: {err}") from None
            student.train(modes[0])
            for (teacher, _), mode in zip(teachers, modes[1:]):
                teacher.train(mode)
        criteria: dict[str, DistillLoss] = {}
        for name, (loss, source) in names.items():
            loss_cls = losses.get(loss)
            given = dict(options.get(loss, {}))
            if loss_cls.memory_bank and len(teachers) > 1:
                given["seed"] = int(given.get("seed", 0)) + source
            if loss_cls.reads_logits:
                check_logits(s_feats, taught, loss)
            t_feats = taught[source] if source != AVERAGED else taught[0]
            try:
                criteria[name] = loss_cls.from_features(s_feats, t_feats, n_data=n_data, labels=labels, **given)
            except (TypeError, ValueError, OverflowError) as err:  # losses/ raises plain errors; name the recipe key
                raise ConfigError(f"distill.loss_options.{loss}: {err}") from None
        return cls(student, student_view, teachers, modality, criteria, terms, ce_weight, teacher_weights)

    # ------------------------------------------------------------------ one step
    def inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, list[Features]]:
        """The student's view of ``batch`` and every teacher's features (each view converted once)."""
        views = self.modality.views(batch, self.view_names)
        with torch.no_grad():
            taught = [teacher(views[view], preact=self.preact).detach()
                      for teacher, view in zip(self.teachers, self.teacher_views)]
        return views[self.student_view], taught

    def teacher_of(self, name: str, taught: Sequence[Features]) -> Features:
        """The features term ``name`` reads: its teacher's, or the averaged soft labels for a logit loss."""
        source = self.sources[name][1]
        if source != AVERAGED:
            return taught[source]
        temperature = self.criteria[name].T
        return replace(taught[0], logits=averaged_soft_logits([t.logits for t in taught], temperature))

    def terms(self, student: Features, taught: Sequence[Features], index: Tensor,
              labels: Optional[Tensor]) -> dict[str, Tensor]:
        """Each weighted term, the criteria's diagnostics, and the sum of the terms under ``loss``."""
        terms: dict[str, Tensor] = {}
        watched: dict[str, Tensor] = {}  # logged beside the terms, never summed into the loss
        if self.ce_weight and labels is not None and student.logits is not None and bool((labels >= 0).all()):
            terms["ce"] = self.ce_weight * F.cross_entropy(student.logits, labels)
        for name, criterion in self.criteria.items():
            if self.weights[name]:
                terms[name] = self.weights[name] * criterion.forward_features(
                    student, self.teacher_of(name, taught), index, labels)
                watched.update({f"{name}_{key}": value for key, value in criterion.diagnostics().items()})
        total = sum(terms.values()) if terms else student.pooled.sum() * 0.0
        return {"loss": total, **terms, **watched}

    def training_step(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The loss terms of one batch (``image``, ``index``, optionally ``label``)."""
        student_in, taught = self.inputs(batch)
        return self.terms(self.student(student_in, preact=self.preact), taught, batch["index"], batch.get("label"))

    forward = training_step  # DDP calls forward

    @torch.no_grad()
    def warm_start(self, batches: Iterable[Mapping[str, Tensor]],
                   autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        """Fill every memory bank from one inference pass over ``batches`` (student in eval mode),
        so the first epoch's positives are real embeddings rather than random rows. The pass stops
        once every bank is full (a queue of K entries after K samples, of every process)."""
        banks = {name: c for name, c in self.criteria.items() if c.memory_bank}
        if not banks:
            return
        rows = [c.warm_rows for c in banks.values()]
        needed = float("inf") if None in rows else max(rows)
        seen = 0
        was_training = self.student.training
        self.student.eval()
        for batch in batches:
            with autocast():
                student_in, taught = self.inputs(batch)
                pooled = self.student(student_in).pooled
            for name, critic in banks.items():
                critic.warm_start(pooled, self.teacher_of(name, taught).pooled, batch["index"])
            seen += batch["index"].shape[0] * world_size()
            if seen >= needed:
                break
        self.student.train(was_training)


def check_logits(student: Features, taught: Sequence[Features], loss: str) -> None:
    """A logit loss needs every teacher's classifier, all over one class set, and the student's over it."""
    classes = [None if t.logits is None else t.logits.shape[1] for t in taught]
    if None in classes:
        raise ConfigError(f"{loss} reads logits, but teacher {classes.index(None)} has no classifier")
    if len(set(classes)) > 1:
        raise ConfigError(f"{loss} averages the teachers' soft labels, but their classifiers have {classes} classes; "
                          "expected one class set")
    got = None if student.logits is None else student.logits.shape[1]
    if got != classes[0]:
        raise ConfigError(f"{loss}: the student has {got} classes, the teachers {classes[0]}; KD needs a student "
                          "classifier over the teachers' classes")
