"""Collectives the contrastive core needs, written against ``torch.distributed`` directly.

``losses`` must not depend on Accelerate, so these helpers only ask whether a default process
group exists. With one process every function is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def all_gather_rows(tensor: Tensor) -> tuple[Tensor, int]:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order.

    Ranks may hold different numbers of rows (an uneven last batch): sizes are exchanged first
    and the rows padded to the largest. Gradients do not flow through the result.

    Args:
        tensor: ``(n_r, *)`` on this rank.

    Returns:
        ``(sum_r n_r, *)`` identical on every rank, and the row at which this rank's rows start.
    """
    size = world_size()
    if size == 1:
        return tensor.detach(), 0
    tensor = tensor.detach().contiguous()
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts_list = [int(c.item()) for c in counts]
    longest = max(counts_list)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    gathered = torch.cat([part[:n] for part, n in zip(parts, counts_list)])
    return gathered, sum(counts_list[: rank()])


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is not modified)."""
    if world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
