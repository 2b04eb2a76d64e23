"""Distillation: a student learns from a frozen teacher through weighted loss terms.

A *method* is a set of registered losses with weights and options: ``crd`` = {crd: 0.8} with
warm banks and a per-batch Z, ``crd_paper`` the same term as the paper ran it, ``crd_kd`` =
{crd: 0.8, kd: 1.0} (CRD+KD), ``random`` = {} (no training: the student at its
initialisation, the reference point of every table). Any registered loss name is a method of
one term at its ``default_weight``. With labels, ``ce_weight`` adds cross-entropy (the paper's
gamma); unlabeled cross-modal runs have none. The labeled methods of the paper's ensemble table
(``ce``, ``kd_ensemble``, ``crd_ensemble``, ``crd_kd_ensemble``) fix their own gamma.

Losses with a first stage (AB, FT, FSP) get it here, as its own stage, before distillation.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn
from torch.utils.data import Dataset

import losses
from losses import DistillLoss, Features
from xmodal.distiller import Distiller
from xmodal.config import to_dict
from xmodal.engine import Engine
from xmodal.stage import Stage
from xmodal.errors import ConfigError
from xmodal.modalities import Modality
from xmodal.schema import DistillSection, TrainConfig

@dataclass(frozen=True)
class Method:
    """Loss terms with their weights, whether CRD's banks start from one inference pass, loss
    options the method fixes (laid over ``distill.loss_options`` for its terms), and the weight
    of cross-entropy on labels (``ce``; a method that fixes none takes ``distill.ce_weight``)."""

    terms: dict[str, float]
    warm_start: bool = False
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    ce: float = 0.0


#: Per-batch NCE normaliser: Z estimated from each batch instead of once from the first.
_BATCH_Z = {"normaliser": "ema", "z_momentum": 0.0}

#: Methods that are not a single registered loss, or that set a loss's options. ``crd`` is the
#: CRD this toolkit recommends: memory banks filled by one inference pass before training (instead
#: of random rows) and NCE's normaliser Z from each batch (instead of fixed by the first one, which
#: can pin the critic's scores); docs/notes/crd-variants.md measures both. ``*_paper`` are the
#: paper's settings, the reference bit for bit (cold banks, Z once): ``losses.CRDLoss``'s defaults.
PRESETS: dict[str, Method] = {
    "random": Method({}),
    "crd": Method({"crd": 0.8}, warm_start=True, options={"crd": _BATCH_Z}),
    "crd_paper": Method({"crd": 0.8}),
    "crd_kd": Method({"crd": 0.8, "kd": 1.0}, warm_start=True, options={"crd": _BATCH_Z}),
    "crd_kd_paper": Method({"crd": 0.8, "kd": 1.0}),
    # The same critic, banks and draws with InfoNCE (softmax over 1 + K) in place of NCE; it has no Z.
    "infonce": Method({"infonce": 0.8}, warm_start=True),
    "infonce_paper": Method({"infonce": 0.8}),
    # With labels, the CRD paper's ensemble table (RepDistiller's weights): gamma on CE, alpha on
    # KD from the averaged soft labels, beta on every teacher's critic. ``ce`` has no teacher.
    "ce": Method({}, ce=1.0),
    "kd_ensemble": Method({"kd": 0.9}, ce=0.1),
    "crd_ensemble": Method({"crd": 0.8}, ce=1.0),
    "crd_kd_ensemble": Method({"crd": 0.8, "kd": 1.0}, ce=1.0),
}
#: Former names, still accepted with a note: what each meant, and the name to use now.
DEPRECATED: dict[str, tuple[Method, str]] = {
    "crd_warm": (Method({"crd": 0.8}, warm_start=True), "crd (warm banks, Z from each batch)"),
    "crd_kd_warm": (Method({"crd": 0.8, "kd": 1.0}, warm_start=True), "crd_kd (warm banks, Z from each batch)"),
    "crd_batchz_warm": (PRESETS["crd"], "crd, which it now is"),
    "infonce_warm": (PRESETS["infonce"], "infonce, which it now is"),
}
_NOTED: set[str] = set()
def resolve_method(method: str, weights: Mapping[str, float], warm_start: bool = False,
                   ce_weight: float = 0.0) -> Method:
    """The terms, options and CE weight of ``method``; ``weights`` overrides a loss's default
    weight (``weights.ce`` the CE of a method that fixes its own).

    Any registered loss name is a method of one term at its ``default_weight``;
    ``warm_start=True`` warm-starts every method's banks; ``ce_weight`` is the CE of a method
    that fixes none.
    """
    if method in PRESETS:
        preset = PRESETS[method]
    elif method in DEPRECATED:
        preset, now = DEPRECATED[method]
        if method not in _NOTED:
            _NOTED.add(method)
            print(f"[xmodal] note: distillation method {method!r} is deprecated; use {now}", file=sys.stderr,
                  flush=True)
    elif method in losses.registry.RENAMED:
        raise ConfigError(f"distillation method {method!r} is now {losses.registry.RENAMED[method]!r}")
    elif method in losses.available():
        preset = Method({method: losses.get(method).default_weight})
    else:
        valid = sorted(set(PRESETS) | set(losses.available()))
        raise ConfigError(f"unknown distillation method {method!r}; expected one of {', '.join(valid)}")
    terms = {name: float(weights.get(name, weight)) for name, weight in preset.terms.items()}
    # ``random`` stays the untrained reference whatever ``distill.ce_weight`` says
    ce = float(weights.get("ce", preset.ce)) if preset.ce else float(ce_weight) if preset.terms else 0.0
    return Method(terms, warm_start=preset.warm_start or warm_start, options=preset.options, ce=ce)


def method_loss_options(spec: Method, loss_options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``distill.loss_options`` with the options ``spec`` fixes laid over its terms' entries."""
    merged = {name: dict(options) for name, options in loss_options.items()}
    for name, fixed in spec.options.items():
        merged[name] = {**merged.get(name, {}), **fixed}
    return merged


def recipe_loss_options(distill: DistillSection, n_data: int) -> dict[str, dict[str, Any]]:
    """``distill.loss_options``, each memory-bank loss's ``nce_k`` capped at ``n_data - 1`` when
    ``distill.cap_negatives`` (negatives are drawn without replacement among the other rows)."""
    options = {name: dict(values) for name, values in distill.loss_options.items()}
    if distill.cap_negatives:
        for name in losses.available():
            if losses.get(name).memory_bank:
                options[name] = losses.get(name).capped_options(options.get(name, {}), n_data)
    return options


def bank_sizes(methods: Sequence[str], weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]]) -> str:
    """``crd K = 17, ...``: the K in force of every memory-bank loss the methods use."""
    terms = {t for m in methods if m != "random" for t in resolve_method(m, weights).terms}
    return ", ".join(f"{name} K = {options[name]['nce_k']}" for name in sorted(terms)
                     if losses.get(name).memory_bank and "nce_k" in options.get(name, {}))


def reads_logits(spec: Method) -> bool:
    """Whether a term of ``spec`` reads the student's logits (KD)."""
    return any(losses.get(name).reads_logits for name in spec.terms)


def critic_weights(beta: float, teacher_weights: Sequence[float], split: bool) -> list[float]:
    """Weight of each of the M critics: ``β·w_i`` (paper), or with ``split`` ``β·w_i / Σ w``.

    The paper's ``L = CE - β Σ_i L_critic(T_i, S)`` gives every critic the full ``β``, so the
    contrastive share of the loss grows with M; ``split`` keeps it at ``β`` for every M.
    """
    total = sum(teacher_weights)
    if not split or total == 0:
        return [beta * w for w in teacher_weights]
    return [beta * w / total for w in teacher_weights]


def teacher_scales(distill: DistillSection, pool: int, m: int) -> Optional[list[float]]:
    """The scale of each of the first ``m`` teachers' own terms (:func:`critic_weights` with β = 1)
    from ``distill.teacher_weights`` (one per teacher of a pool of ``pool``) and
    ``distill.split_crd_weight``; ``None`` when neither is set (every teacher at 1)."""
    weights = distill.teacher_weights
    if weights is not None and len(weights) != pool:
        raise ConfigError(f"distill.teacher_weights has {len(weights)} entries for a pool of {pool} teachers; "
                          "expected one per teacher")
    if weights is None and not distill.split_crd_weight:
        return None
    return critic_weights(1.0, list(weights or [1.0] * pool)[:m], distill.split_crd_weight)


def distill_stages(
    engine: Engine,
    method: str,
    student: nn.Module,
    teachers: Sequence[tuple[nn.Module, str]],
    modality: Modality,
    dataset: Dataset,
    cfg: TrainConfig,
    *,
    weights: Mapping[str, float],
    loss_options: Mapping[str, Mapping[str, Any]],
    ce_weight: float = 0.0,
    init_cfg: Optional[TrainConfig] = None,
    warm_start: bool = False,
    record: Mapping[str, Any] = (),
    sample: Optional[Mapping[str, Tensor]] = None,
    tag: str = "",
    teacher_weights: Optional[Sequence[float]] = None,
) -> list[Stage]:
    """The stages that distill ``teachers`` (frozen, each with the view it reads) into ``student``
    with ``method`` (first stage first); the student reads ``modality.student_view``.

    ``record`` is the part of the recipe that defines these stages (their checkpoint key).
    ``sample``: a batch of ``dataset`` on the device (:meth:`Engine.first_batch`), from which the losses
    read the feature shapes; fetched here when not given. ``tag`` ends the stages' names (one
    method distilled on unlabeled sets of several sizes: ``distill-crd-n2500``).
    ``teacher_weights`` scales each teacher's own terms (:class:`Distiller`).
    """
    spec = resolve_method(method, weights, warm_start, ce_weight)
    terms, ce_weight = spec.terms, spec.ce
    loss_options = method_loss_options(spec, loss_options)
    first = [name for name in terms if losses.get(name).needs_init_stage]
    if first and len(teachers) > 1:
        raise ConfigError(f"distillation method {method!r}: {', '.join(first)} has a first stage that reads one "
                          f"teacher, but {len(teachers)} teachers are given")
    sample = engine.first_batch(dataset) if sample is None else sample
    student.to(engine.device)
    for teacher, _ in teachers:
        teacher.to(engine.device)
    distiller = Distiller.build(student, modality.student_view, teachers, modality, terms, sample, n_data=len(dataset),
                                labels=getattr(dataset, "labels", None), options=loss_options, ce_weight=ce_weight,
                                teacher_weights=teacher_weights)

    def on_epoch_start(epoch: int) -> None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if spec.warm_start and epoch == 0:
            distiller.warm_start(engine.batches(dataset, 256, "warm start"), engine.autocast)

    # A stage's identity holds everything that changes what it trains: the terms and their
    # weights, each term's loss options (K, temperature, momentum, ...), CE on labels, warm banks.
    record = {**dict(record), "method": method, "terms": terms, "warm_start": spec.warm_start, "ce_weight": ce_weight,
              "loss_options": {name: dict(loss_options.get(name, {})) for name in sorted(terms)}}
    if teacher_weights is not None:
        record["teacher_weights"] = list(teacher_weights)
    stages = []
    for name, criterion in distiller.criteria.items():
        if criterion.needs_init_stage:
            stages.append(_init_stage(f"{method}{tag}", name, criterion, distiller, dataset, init_cfg or cfg, record))
            if not criterion.distill_after_init:
                distiller.weights[name] = 0.0
    frozen = {"teacher": teachers[0][0]} if len(teachers) == 1 else {f"teacher_{i}": t for i, (t, _) in enumerate(teachers)}
    stages.append(Stage.on_schedule(
        cfg, name=f"distill-{method}{tag}", module=distiller, step=lambda wrapped, batch: wrapped(batch),
        dataset=dataset, config=record, frozen=frozen, on_epoch_start=on_epoch_start,
    ))
    return stages


class InitStageModule(nn.Module):
    """A loss's first stage as one module (student included when that stage trains it)."""

    def __init__(self, name: str, criterion: DistillLoss, student: nn.Module, preact: bool) -> None:
        super().__init__()
        self.name, self.preact = name, preact
        self.criterion = criterion
        if criterion.init_stage_trains_student:
            self.student = student
        else:  # kept out of the module tree: its weights neither train nor enter the checkpoint
            self.__dict__["student"] = student

    def forward(self, student_view: Tensor, teacher: Features) -> dict[str, Tensor]:
        trains_student = self.criterion.init_stage_trains_student
        student = self.student(student_view, preact=self.preact) if trains_student else None
        loss = self.criterion.init_stage_loss(student, teacher)
        return {"loss": loss, f"{self.name}_init": loss}


def _init_stage(method: str, name: str, criterion: DistillLoss, distiller: Distiller, dataset: Dataset,
                cfg: TrainConfig, record: Mapping[str, Any]) -> Stage:
    """The first stage of AB / FT / FSP: train the student (AB, FSP) or the loss's modules (FT)."""
    holder = InitStageModule(name, criterion, distiller.student, distiller.preact)

    def step(wrapped: nn.Module, batch) -> dict[str, Tensor]:
        student_in, taught = distiller.inputs(batch)
        return wrapped(student_in, taught[0])

    return Stage.on_schedule(
        cfg, name=f"distill-{method}-{name}-init", module=holder, step=step,
        dataset=dataset, config={**dict(record), "init": name, "init_train": to_dict(cfg)},
        on_epoch_start=getattr(dataset, "set_epoch", None),
    )
