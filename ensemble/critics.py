"""One CRD critic per teacher, with the negatives drawn once per step for all of them.

The paper's ensemble objective sums one critic per teacher, ``L = CE(y, S) - β Σ_i
L_critic(T_i, S)``; a critic's NCE loss is minus its bound, so here the sum reads
``Σ_i w_i · crd_i`` with ``w_i = β = 0.8`` by default. Every critic is a plain
:class:`losses.CRDLoss` with its own embedding heads ``g_S^i``, ``g_T^i`` and its own two memory
banks: a critic inside the ensemble computes exactly what it would compute alone.

What is shared is the sample of negatives. All critics index the same N rows with the same
labels, so one ``contrast_idx`` per step serves them all: sampling, after scoring the largest
cost of a critic step, is paid once rather than M times, and what remains (heads, scoring,
NCE, bank update) grows linearly in M. Each critic's loss keeps its expectation; the critics'
sampling noise becomes correlated within a step, as in any shared-negatives estimator.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from losses.crd import CRDLoss

Weights = Union[float, Sequence[float]]


def per_teacher_weights(weights: Weights, n_teachers: int) -> tuple[float, ...]:
    """``weights`` as one finite, non-negative float per teacher (a scalar is repeated)."""
    if isinstance(weights, (int, float)):
        values = (float(weights),) * n_teachers
    else:
        values = tuple(float(w) for w in weights)
        if len(values) != n_teachers:
            raise ValueError(f"weights has {len(values)} entries for {n_teachers} teachers: expected one per teacher")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"weights {list(values)}: expected finite, non-negative numbers, got {bad[0]}")
    return values


class CriticEnsemble(nn.Module):
    """M CRD critics between one student and M teachers, sharing each step's negatives.

    Args:
        student_dim: width of the student feature ``f_s``.
        teacher_dims: width of each teacher's feature, one entry per teacher (M >= 1).
        n_data: N, memory-bank rows (the dataset size).
        weights: ``w_i`` per critic, or one number for all (paper: β = 0.8).
        seed: critic ``i`` is seeded ``seed + i`` (its initial banks); critic 0's generator
            draws the shared negatives.
        **options: the rest of :class:`losses.CRDLoss` (``nce_k``, ``negatives``, ``labels``...),
            the same for every critic, since they share ``contrast_idx``.

    Call: ``ensemble(f_s, f_ts, index, contrast_idx=None, labels=None)`` with ``f_s`` ``(B, D_s)``,
    ``f_ts`` a sequence of M ``(B, D_i)``, ``index`` ``(B,)`` -> ``(Σ_i w_i · crd_i, [crd_i])``,
    the per-critic losses unweighted.

    Example:
        >>> ens = CriticEnsemble(8, [16, 12], n_data=100, nce_k=10)
        >>> total, per_critic = ens(torch.randn(4, 8), [torch.randn(4, 16), torch.randn(4, 12)], torch.arange(4))
        >>> len(per_critic)
        2
    """

    def __init__(self, student_dim: int, teacher_dims: Sequence[int], n_data: int, weights: Weights = CRDLoss.default_weight,
                 seed: int = 0, **options) -> None:
        super().__init__()
        teacher_dims = list(teacher_dims)
        if not teacher_dims:
            raise ValueError("teacher_dims is empty: an ensemble needs at least one teacher")
        self.weights = per_teacher_weights(weights, len(teacher_dims))
        self.critics = nn.ModuleList(
            CRDLoss(student_dim, dim, n_data, seed=seed + i, **options) for i, dim in enumerate(teacher_dims)
        )

    @property
    def n_teachers(self) -> int:
        return len(self.critics)

    def sample(self, index: Tensor) -> Tensor:
        """The step's shared ``contrast_idx`` ``(B, K+1)``, drawn by critic 0.

        Critic 0's step counter advances and is saved in its ``state_dict``, so a resumed run
        draws the same negatives as an uninterrupted one.
        """
        return self.critics[0].sample_contrast(index)

    def forward(self, f_s: Tensor, f_ts: Sequence[Tensor], index: Tensor, contrast_idx: Tensor | None = None,
                labels: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        if len(f_ts) != self.n_teachers:
            raise ValueError(f"got features of {len(f_ts)} teachers, expected {self.n_teachers} (one per critic)")
        if contrast_idx is None:
            contrast_idx = self.sample(index)
        per_critic = [critic(f_s, f_t, index, contrast_idx, labels) for critic, f_t in zip(self.critics, f_ts)]
        total = sum(w * loss for w, loss in zip(self.weights, per_critic))
        return total, per_critic

    @torch.no_grad()
    def warm_start(self, f_s: Tensor, f_ts: Sequence[Tensor], index: Tensor) -> None:
        """Fill every critic's bank rows ``index`` with this batch's embeddings (see CRDLoss)."""
        if len(f_ts) != self.n_teachers:
            raise ValueError(f"got features of {len(f_ts)} teachers, expected {self.n_teachers} (one per critic)")
        for critic, f_t in zip(self.critics, f_ts):
            critic.warm_start(f_s, f_t, index)
