"""A MoCo-style queue of recent embeddings: the critic's negatives in memory flat in N.

The full memory (:class:`losses.contrast.memory.ContrastMemory`) keeps one row per training
sample, two ``N x d`` banks, which at N = 17M and d = 128 is 16.2 GiB in float32. The queue keeps
only the last ``K`` embeddings of each view, in a ring. Every anchor is scored against all
``K`` entries of the other view's queue (one ``(B, d) @ (d, K)`` product, no sampling and no
gather); its positive is the paired view's embedding of the same sample in the current batch.
An entry that came from the anchor's own sample (seen again within the last ``K`` samples) is
masked out: a sample is never its own negative, as with the full bank.

With several processes the embeddings of every rank are gathered and enqueued in rank order,
so each rank holds the same queue. The write of a step is deferred to the start of the next one
(or to ``state_dict``), like the full bank's update, so backward sees the queue that produced
the scores.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.contrast.memory import ContrastMemory

QUEUE_STATE_KEYS = ("student_bank", "teacher_bank", "rows", "count", "log_z")


class ContrastQueue(ContrastMemory):
    """Two rings of ``size`` unit embeddings (student view, teacher view) and the sample of each.

    The banks, their initial rows, the normalisers, the gathered and deferred update and the
    device moves are :class:`ContrastMemory`'s; what differs is where an update lands (the next
    ``size`` slots of the ring, no momentum) and that each slot remembers its sample.

    Args:
        size: entries per view, K (every anchor's negatives).
        dim: embedding width d.
        dtype: storage dtype of the rings.
        generator: random source for the initial entries (the full bank's initial rows); they
            are replaced as real embeddings arrive, or at once by a warm start.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> None:
        if size < 1:
            raise ValueError(f"nce_k={size}: a queue needs at least one entry")
        super().__init__(size, dim, 0.0, dtype, generator)
        self.size = size
        # The training sample behind each entry (-1: an initial random entry, no sample).
        self.rows = torch.full((size,), -1, dtype=torch.long)
        # Embeddings enqueued so far; the next write starts at count % size.
        self.count = torch.zeros((), dtype=torch.long)

    def write(self, index: Tensor, student: Tensor, teacher: Tensor) -> None:
        """Enqueue normalised embeddings now (warm start before training)."""
        self.queue_update(index, F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1))
        self.flush()

    def flush(self) -> None:
        """Apply the deferred write, if any (idempotent). Older entries are overwritten first."""
        if self._pending is None:
            return
        index, student, teacher = (t[-self.size :] for t in self._pending)  # more than fit: the last survive
        added = self._pending[0].shape[0]
        self._pending = None
        slots = (int(self.count) + torch.arange(index.shape[0], device=index.device)) % self.size
        self.student_bank.index_copy_(0, slots, student.to(self.student_bank.dtype))
        self.teacher_bank.index_copy_(0, slots, teacher.to(self.teacher_bank.dtype))
        self.rows.index_copy_(0, slots, index.to(self.rows.device).long())
        self.count += added

    def own_entries(self, index: Tensor) -> Tensor:
        """``(B, K)`` bool: entry ``j`` came from anchor ``b``'s own sample."""
        return self.rows[None, :] == index[:, None]

    def to(self, device: torch.device | str | None = None, dtype: Optional[torch.dtype] = None) -> "ContrastQueue":
        super().to(device, dtype)
        self.rows, self.count = self.rows.to(device=device), self.count.to(device=device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """Rings, their samples, the write position and the normalisers, after the deferred write."""
        return {**super().state_dict(), "rows": self.rows, "count": self.count}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a queue of the same length and width."""
        for key in ("student_bank", "teacher_bank"):
            if tuple(state[key].shape) != (self.size, self.dim):
                raise ValueError(f"{key} in the checkpoint is {tuple(state[key].shape)}, expected a queue of "
                                 f"(nce_k={self.size}, feat_dim={self.dim})")
        super().load_state_dict(state)
        self.rows = state["rows"].to(device=self.rows.device, dtype=torch.long).clone()
        self.count = state["count"].to(device=self.count.device, dtype=torch.long).clone()
