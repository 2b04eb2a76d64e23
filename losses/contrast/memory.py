"""The two memory banks of one contrastive critic, and their normalising constants.

``ContrastMemory`` is deliberately not an ``nn.Module`` and its banks are not buffers: DDP
broadcasts every buffer of the module it wraps from rank 0 at each forward, which for N = 1.28M
rows is wasteful and would hide a divergence instead of preventing it. The owning module
(:class:`losses.crd.CRDLoss`) moves it with ``.to()`` and writes it into its ``state_dict``.

Every process applies the same update: embeddings and indices are all-gathered first, so the
banks stay identical on every rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.contrast.distributed import all_gather_rows

STATE_KEYS = ("student_bank", "teacher_bank", "log_z")


def last_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Unique rows of ``index`` and, for each, the position of its last occurrence.

    An update that names a row twice (DistributedSampler pads ranks by repeating samples;
    ``index_copy_`` then keeps an arbitrary one) is resolved deterministically: the last
    occurrence in (rank, position) order wins, the same on every rank and every device.

    Args:
        index: ``(G,)`` long.

    Returns:
        ``rows`` ``(U,)`` sorted unique values and ``source`` ``(U,)`` positions into ``index``.
    """
    sorted_rows, source = torch.sort(index, stable=True)
    is_last = torch.ones_like(sorted_rows, dtype=torch.bool)
    is_last[:-1] = sorted_rows[1:] != sorted_rows[:-1]
    return sorted_rows[is_last], source[is_last]


class ContrastMemory:
    """Student and teacher memory banks (N x d unit vectors) with momentum updates.

    Args:
        n_data: number of rows N (the dataset size).
        dim: embedding width d.
        momentum: m in ``bank[i] <- normalize(m * bank[i] + (1 - m) * v_i)``.
        dtype: storage dtype of the banks (float32; float16/bfloat16 halve their memory).
        generator: random source for the initial rows, uniform in ``+-1/sqrt(d/3)``.
    """

    def __init__(
        self,
        n_data: int,
        dim: int,
        momentum: float = 0.5,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"nce_m={momentum}: expected a momentum in [0, 1)")
        self.n_data, self.dim, self.momentum = n_data, dim, momentum
        stdv = 1.0 / math.sqrt(dim / 3)
        self.student_bank = self._uniform(n_data, dim, stdv, generator).to(dtype)
        self.teacher_bank = self._uniform(n_data, dim, stdv, generator).to(dtype)
        # log Z for [student anchors vs teacher bank, teacher anchors vs student bank]; NaN = unset.
        self.log_z = torch.full((2,), float("nan"), dtype=torch.float64)
        self._pending: Optional[tuple[Tensor, Tensor, Tensor]] = None

    @staticmethod
    def _uniform(n: int, d: int, stdv: float, generator: Optional[torch.Generator]) -> Tensor:
        return torch.rand(n, d, generator=generator).mul_(2 * stdv).sub_(stdv)

    # ---------------------------------------------------------------- updates
    def queue_update(self, index: Tensor, student: Tensor, teacher: Tensor) -> None:
        """Record one step's embeddings; they are written before the banks are next read.

        Deferring the write to the next step keeps the banks unchanged until backward has used
        them, with no copy (the reference copies the gathered rows instead). Embeddings and
        indices are gathered from every rank now, while all ranks are in the same forward.

        Args:
            index: ``(B,)`` rows on this rank.
            student, teacher: ``(B, d)`` unit embeddings of the two views.
        """
        self.flush()
        index, _ = all_gather_rows(index)
        student, _ = all_gather_rows(student)
        teacher, _ = all_gather_rows(teacher)
        self._pending = (index, student, teacher)

    def flush(self) -> None:
        """Apply the queued update, if any (idempotent)."""
        if self._pending is None:
            return
        index, student, teacher = self._pending
        self._pending = None
        rows, source = last_occurrence(index)
        for bank, new in ((self.student_bank, student), (self.teacher_bank, teacher)):
            mixed = bank[rows].float().mul_(self.momentum).add_(new[source].float(), alpha=1 - self.momentum)
            bank.index_copy_(0, rows, F.normalize(mixed, dim=1).to(bank.dtype))

    def write(self, index: Tensor, student: Tensor, teacher: Tensor) -> None:
        """Overwrite rows with normalised embeddings, no momentum (warm start before training)."""
        self.flush()
        index, _ = all_gather_rows(index)
        student, _ = all_gather_rows(student)
        teacher, _ = all_gather_rows(teacher)
        rows, source = last_occurrence(index)
        for bank, new in ((self.student_bank, student), (self.teacher_bank, teacher)):
            bank.index_copy_(0, rows, F.normalize(new[source].float(), dim=1).to(bank.dtype))

    # ---------------------------------------------------------------- state
    def to(self, device: torch.device | str | None = None, dtype: Optional[torch.dtype] = None) -> "ContrastMemory":
        """Move banks (and any queued update) to ``device``; ``dtype`` re-types the banks."""
        self.student_bank = self.student_bank.to(device=device, dtype=dtype)
        self.teacher_bank = self.teacher_bank.to(device=device, dtype=dtype)
        self.log_z = self.log_z.to(device=device)
        if self._pending is not None:
            self._pending = tuple(t.to(device) for t in self._pending)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """Banks and normalisers after applying any queued update."""
        self.flush()
        return {"student_bank": self.student_bank, "teacher_bank": self.teacher_bank, "log_z": self.log_z}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore banks and normalisers; shapes must match this memory's (N, d)."""
        for key in ("student_bank", "teacher_bank"):
            if tuple(state[key].shape) != (self.n_data, self.dim):
                raise ValueError(
                    f"{key} in the checkpoint is {tuple(state[key].shape)}, expected "
                    f"(n_data={self.n_data}, feat_dim={self.dim})"
                )
        self._pending = None
        device = self.student_bank.device
        self.student_bank = state["student_bank"].to(device=device, dtype=self.student_bank.dtype).clone()
        self.teacher_bank = state["teacher_bank"].to(device=device, dtype=self.teacher_bank.dtype).clone()
        if "log_z" in state:  # absent for critics without a normaliser (InfoNCE)
            self.log_z = state["log_z"].to(device=device, dtype=torch.float64).clone()
