"""The critic's objectives on a ``(B, K+1)`` score matrix, computed in log space.

With ``x = <bank_row, v> / tau`` and ``s = exp(x) / Z``, the reference (RepDistiller's
``ContrastLoss``) evaluates, for each anchor,

    -[ log(s_0 / (s_0 + K Pn + eps)) + sum_j log(K Pn / (s_j + K Pn + eps)) ],   Pn = 1 / N,

averaged over the batch. Written with ``log s = x - log Z`` and ``softplus`` this is the same
function, but it never forms ``exp(x)``: it stays finite for any cosine and any dtype the
inputs arrived in (``exp(1 / 0.07)`` = 1.6e6 overflows fp16).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.contrast.distributed import all_gather_rows

OBJECTIVES = ("nce", "infonce")
NORMALISERS = ("once", "ema")
# The reference's eps inside the NCE denominators.
NCE_EPS = 1e-7


class _NCE(torch.autograd.Function):
    """Sum over the batch of ``softplus(-t_0) + sum_j softplus(t_j)`` with a hand-written backward.

    ``softplus(-t_0) = softplus(t_0) - t_0``, so one softplus pass over the contiguous matrix
    serves both columns, and the gradient ``sigmoid(t) - [j = 0]`` is one more pass: no slicing
    copies, no zero-filled gradient buffers.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, shift: float) -> Tensor:
        t = logits - shift
        ctx.save_for_backward(t)
        return F.softplus(t).sum() - t[:, 0].sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (t,) = ctx.saved_tensors
        grad = torch.sigmoid(t)
        grad[:, 0] -= 1.0
        return grad.mul_(grad_out), None


def nce_loss(logits: Tensor, log_z: Tensor | float, n_data: int) -> Tensor:
    """CRD's NCE loss (Eq. 18 of the paper), mean over anchors.

    With ``c = K Pn + eps`` and ``t = log s - log c``, the reference's terms are
    ``-log D1 = softplus(-t_0)`` and ``-log D0_j = softplus(t_j) + log(c / (K Pn))``: one
    subtraction and one softplus per score, accurate where the reference's ``log(ratio)``
    loses digits (``s_j`` ~ 1/N makes each ratio 1 - 1e-5).

    Args:
        logits: ``(B, K+1)`` scores divided by the temperature; column 0 the positive.
        log_z: ``log Z``, the normalising constant's logarithm (scalar).
        n_data: N, the number of memory-bank rows (noise prior ``Pn = 1 / N``).
    """
    k = logits.shape[1] - 1
    noise = k / n_data
    shift = float(log_z) + math.log(noise + NCE_EPS)
    return _NCE.apply(logits, shift) / logits.shape[0] + k * math.log1p(NCE_EPS / noise)


def infonce_loss(logits: Tensor) -> Tensor:
    """InfoNCE: cross-entropy of the positive among the ``K + 1`` candidates, mean over anchors.

    Args:
        logits: ``(B, K+1)`` scores divided by the temperature; column 0 the positive.
    """
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def batch_log_z(logits: Tensor, n_data: int) -> Tensor:
    """``log Z`` of one batch, ``Z = mean(exp(logits)) * N``, agreed across processes.

    The mean is over the finite scores: a negative excluded from an anchor (scored -inf) is no
    entry.

    Every rank contributes its ``log sum exp`` and its entry count, so ranks holding different
    numbers of anchors still agree on the mean over all of them. Computed in float64.

    Args:
        logits: ``(B, K+1)`` scores divided by the temperature on this rank.
        n_data: N, the number of memory-bank rows.

    Returns:
        A float64 scalar, identical on every rank.
    """
    local = torch.stack([
        torch.logsumexp(logits.detach().double().flatten(), dim=0),
        logits.isfinite().sum().double().log(),  # entries scored -inf (excluded) do not count
    ])
    parts, _ = all_gather_rows(local[None])
    return torch.logsumexp(parts[:, 0], 0) - torch.logsumexp(parts[:, 1], 0) + math.log(n_data)


def update_log_z(log_z: Tensor, batch: Tensor, mode: str, momentum: float) -> Tensor:
    """The normaliser after one batch.

    ``"once"`` (paper default): set from the first batch, then fixed. ``"ema"``: start from the
    first batch, then ``Z <- m * Z + (1 - m) * Z_batch``. ``log_z`` is NaN while unset.
    """
    if bool(torch.isnan(log_z)):
        return batch
    if mode == "once":
        return log_z
    if momentum == 0.0:  # log(0): Z is the batch's own
        return batch
    return torch.logaddexp(log_z + math.log(momentum), batch + math.log1p(-momentum))
