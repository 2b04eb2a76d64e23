"""The contract between a distillation loss and the training loop."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from losses.features import Features


class DistillLoss(nn.Module):
    """Base class of every registered distillation criterion.

    A subclass keeps the reference's tensor-level ``forward`` (e.g. ``KD(logit_s, logit_t)``)
    and adds two adapters so the training loop stays loss-agnostic:

    * :meth:`from_features` builds the loss for a given pair of networks, reading the shapes it
      needs (channels of the hint layer, embedding widths, ...) from one batch of features;
    * :meth:`forward_features` picks the tensors it consumes out of :class:`Features`.

    Losses that need a first stage before distillation (AB, FT, FSP) set
    ``needs_init_stage = True`` and implement :meth:`init_stage_loss`.
    """

    registry_name: ClassVar[str] = ""
    #: β a recipe uses when it sets none: the reference's command-line default for this loss.
    default_weight: ClassVar[float] = 1.0
    #: True when the loss needs a first stage before distillation (AB, FT, FSP).
    needs_init_stage: ClassVar[bool] = False
    #: Whether that first stage trains the student (AB, FSP) or only the loss's own modules (FT).
    init_stage_trains_student: ClassVar[bool] = False
    #: Whether the loss adds a distillation term once the first stage is over. False for AB and
    #: FSP: the reference only uses them to initialise the student, so a loop may skip their
    #: ``forward_features`` after the first stage (it returns a graph-connected zero if called).
    distill_after_init: ClassVar[bool] = True
    #: Whether the loss reads the networks' logits (KD): the student then needs a classifier over
    #: the teacher's classes, and with several teachers it reads their averaged soft labels at the
    #: loss's temperature ``T`` (an attribute every such loss has).
    reads_logits: ClassVar[bool] = False
    #: Whether the loss reads pre-activation maps (AB): the networks must return ``preact_maps``.
    needs_preact: ClassVar[bool] = False
    #: Whether the loss keeps memory banks with one row per training sample (CRD, InfoNCE): it is
    #: built with ``n_data``, draws ``nce_k`` negatives among the other rows, takes a ``seed``
    #: for its banks and sampler, and can fill its banks by one inference pass (:meth:`warm_start`).
    memory_bank: ClassVar[bool] = False

    @classmethod
    def from_features(
        cls,
        student: Features,
        teacher: Features,
        *,
        n_data: Optional[int] = None,
        labels: Optional[Tensor] = None,
        **options,
    ) -> "DistillLoss":
        """Build the loss for networks that produce ``student`` and ``teacher`` features.

        ``n_data`` (dataset size) and ``labels`` (one class label per dataset row) are only
        used by losses with a memory bank; the others ignore them.
        """
        return cls(**options)

    def forward_features(
        self,
        student: Features,
        teacher: Features,
        index: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        """The loss for one batch, read from the two networks' features."""
        raise NotImplementedError

    @classmethod
    def capped_options(cls, options: dict, n_data: int) -> dict:
        """``options`` with what ``n_data`` training samples cannot supply lowered to what they can
        (a memory bank's ``nce_k`` negatives to ``n_data - 1``); unchanged for other losses."""
        return dict(options)

    @property
    def warm_rows(self) -> Optional[int]:
        """Samples a warm start must see to fill the memory (``None``: one whole pass)."""
        return None

    @torch.no_grad()
    def warm_start(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> None:
        """Fill the memory-bank rows ``index`` with this batch's pooled features (``memory_bank`` losses)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no memory bank to warm-start")

    def diagnostics(self) -> dict[str, Tensor]:
        """Figures of the last forward worth watching during training (not part of the loss).

        The training loop logs them beside the loss terms, prefixed with the loss's name.
        """
        return {}

    def init_stage_loss(self, student: Optional[Features], teacher: Features) -> Tensor:
        """The loss minimised during the first stage (only when ``needs_init_stage``).

        ``student`` is ``None`` when the first stage does not train the student
        (``init_stage_trains_student`` is False): the loop then skips the student's forward.
        """
        raise NotImplementedError(f"{type(self).__name__} has no first stage")
