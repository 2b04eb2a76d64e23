"""Scores of anchors against selected memory-bank rows, without the reference's big gather.

The critic needs ``x[b, j] = <bank[idx[b, j]], v[b]>`` for ``K + 1`` rows per anchor. The
reference gathers a ``(B, K+1, d)`` tensor per view and keeps it for backward (512 MiB at B=64,
K=16384, d=128). Two cheaper routes to the same numbers:

* ``"full"``: score every bank row with one matrix product ``v @ bank.T`` ``(B, N)`` and pick
  the ``K + 1`` columns. Pays when ``N`` is not much larger than ``K + 1`` (CIFAR, STL-10).
* ``"gather"``: gather rows in small batches of anchors, so at most a few MiB are live at once.

The gradient is ``dL/dv[b] = sum_j g[b, j] * bank[idx[b, j]]``: on the full route a scatter
into ``(B, N)`` and one matmul, on the gather route a weighted ``embedding_bag`` that never
materialises the gathered rows. The bank is saved for backward
without a copy; autograd's version counter turns any in-place bank update between forward and
backward into a loud error instead of a silently wrong gradient.

On the CPU the full route's two ``(N, B)`` scratch matrices (the scores before the column pick,
the scattered gradient) live in a :class:`ScoreWorkspace` owned by the loss and reused every
step. A fresh 12.8 MiB tensor (N = 50k) is handed back to the OS when freed and page-faulted
in again at the next step, which costs about as much as filling it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCORING_MODES = ("auto", "full", "gather")

# "auto" scores the whole bank when N <= FULL_SCORING_RATIO * (K + 1) (262k rows at K = 16384).
# From benchmarks/contrastive_core.py --scoring full|gather on the 2-core CPU (median step, B = 64,
# K = 16384): N = 105k full 0.179 s, gather 0.570 s; N = 1.28M full 1.89 s, gather 0.76 s. Full
# costs ~1.7 us per bank row, gather ~0.6-0.8 s flat: they cross near 350-450k rows.
FULL_SCORING_RATIO = 16
# Rows of (K+1) x d gathered at once on the gather route: about 8 MiB live at most.
_GATHER_CHUNK_ELEMENTS = 1 << 21


def choose_scoring(mode: str, n_data: int, k: int) -> str:
    """Resolve ``"auto"`` to ``"full"`` or ``"gather"`` for a bank of ``n_data`` rows."""
    if mode not in SCORING_MODES:
        raise ValueError(f"scoring={mode!r}: expected one of {SCORING_MODES}")
    if mode != "auto":
        return mode
    return "full" if n_data <= FULL_SCORING_RATIO * (k + 1) else "gather"


class ScoreWorkspace:
    """Scratch matrices of the full route, kept between steps (CPU only; see module docstring).

    Each buffer is dead once the call that filled it returns (the scores after the column pick,
    the gradient after its matmul), so the two directions of a critic and successive steps share
    them. Not part of any state: it holds nothing a checkpoint needs.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised ``shape`` tensor of ``like``'s dtype and device (reused on the CPU)."""
        if like.device.type != "cpu":  # the CUDA caching allocator already keeps its blocks
            return like.new_empty(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            buf = self._buffers[name] = like.new_empty(shape)
        return buf


class _BankScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors: Tensor, bank: Tensor, idx: Tensor, route: str, workspace) -> Tensor:
        ctx.save_for_backward(bank, idx)
        ctx.route = route
        ctx.workspace = workspace
        if route == "full":
            # (N, d) @ (d, B) rather than (B, d) @ (d, N): the same products, but the layout
            # BLAS runs fastest on this skinny shape (benchmarks/contrastive_core.py).
            scores = workspace.get("scores", (bank.shape[0], anchors.shape[0]), anchors)
            torch.mm(_as_dtype(bank, anchors, workspace), anchors.T, out=scores)
            return torch.gather(scores.T, 1, idx)
        out = anchors.new_empty(idx.shape)
        for rows, picked in _gathered_chunks(bank, idx, anchors.dtype):
            out[rows] = torch.bmm(picked, anchors[rows, :, None])[..., 0]
        return out

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        bank, idx = ctx.saved_tensors
        if ctx.route == "full":
            # Scatter the K+1 column gradients into a (B, N) matrix and use one matmul: at the
            # bank sizes where "full" is chosen this beats gathering B*(K+1) rows again.
            dense = ctx.workspace.get("grad", (idx.shape[0], bank.shape[0]), grad_scores).zero_()
            dense.scatter_add_(1, idx, grad_scores)
            grad_anchors = (_as_dtype(bank, dense, ctx.workspace).T @ dense.T).T
        elif bank.dtype == grad_scores.dtype:
            grad_anchors = F.embedding_bag(idx, bank, per_sample_weights=grad_scores, mode="sum")
        else:  # a low-precision bank: upcast only the rows in use
            grad_anchors = grad_scores.new_empty((idx.shape[0], bank.shape[1]))
            for rows, picked in _gathered_chunks(bank, idx, grad_scores.dtype):
                grad_anchors[rows] = torch.bmm(grad_scores[rows, None, :], picked)[:, 0]
        return grad_anchors, None, None, None, None


def _as_dtype(bank: Tensor, like: Tensor, workspace: ScoreWorkspace) -> Tensor:
    """``bank`` in ``like``'s dtype; a low-precision bank is upcast into the workspace.

    Backward upcasts again rather than keeping the forward's copy: the buffer is shared by the
    critic's two banks, and holding both in float32 would undo what half-size banks save.
    """
    if bank.dtype == like.dtype:
        return bank
    return workspace.get("bank", tuple(bank.shape), like).copy_(bank)


def _gathered_chunks(bank: Tensor, idx: Tensor, dtype: torch.dtype):
    """Yield ``(rows, bank[idx[rows]])`` for slices of anchors, each ``(b, K+1, d)`` and small.

    One buffer is reused for every slice: a fresh multi-MiB tensor per slice costs page faults
    that, on the CPU, take longer than the copy itself.
    """
    step = max(1, _GATHER_CHUNK_ELEMENTS // (idx.shape[1] * bank.shape[1]))
    buffer = bank.new_empty((step * idx.shape[1], bank.shape[1]))
    for start in range(0, idx.shape[0], step):
        rows = slice(start, start + step)
        flat = idx[rows].reshape(-1)
        picked = torch.index_select(bank, 0, flat, out=buffer[: flat.numel()])
        yield rows, picked.view(-1, idx.shape[1], bank.shape[1]).to(dtype)


def dense_scores(anchors: Tensor, positives: Tensor, negatives: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Scores of each anchor against its own positive and against one set of negatives shared by all.

    The routes of a shared negative set (a queue, or one draw of bank rows per batch): one
    ``(B, d) @ (d, K)`` product and no per-anchor gather. ``positives`` and ``negatives`` are
    constants (as bank rows are); gradients flow to ``anchors`` only.

    Args:
        anchors: ``(B, d)``.
        positives: ``(B, d)``, anchor ``b``'s positive in row ``b``.
        negatives: ``(K, d)`` in any float dtype (a low-precision bank is upcast).
        exclude: ``(B, K)`` bool, negatives that must not count for that anchor (scored -inf:
            they add nothing to either objective or to its gradient).

    Returns:
        ``(B, K+1)`` in ``anchors``' dtype, column 0 the positive.
    """
    positives, negatives = positives.detach().to(anchors.dtype), negatives.detach().to(anchors.dtype)
    scores = anchors @ negatives.T
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return torch.cat([(anchors * positives).sum(1, keepdim=True), scores], dim=1)


def bank_scores(anchors: Tensor, bank: Tensor, idx: Tensor, route: str, workspace: ScoreWorkspace | None = None) -> Tensor:
    """Inner products of each anchor with its selected bank rows.

    Args:
        anchors: ``(B, d)`` embeddings (gradients flow to these).
        bank: ``(N, d)`` memory bank (treated as a constant).
        idx: ``(B, K+1)`` long, rows of ``bank`` per anchor.
        route: ``"full"`` or ``"gather"`` (see :func:`choose_scoring`).
        workspace: scratch kept between calls (a loss owns one); ``None``: a fresh one.

    Returns:
        ``(B, K+1)`` scores in ``anchors``' dtype.
    """
    return _BankScores.apply(anchors, bank.detach(), idx, route, workspace or ScoreWorkspace())
