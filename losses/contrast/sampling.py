"""Negative sampling for the contrastive critic, vectorised on the bank's device.

For every anchor row ``i`` the sampler returns ``K + 1`` memory-bank rows: column 0 is the
positive, columns ``1..K`` are negatives drawn uniformly *without replacement* from the anchor's
pool:

* ``negatives="uniform"`` (unlabeled data: Lab, depth): every row except ``i`` itself;
* ``negatives="class"`` (labeled data): every row whose label differs from ``y_i``.

The positive is ``i`` itself (``positive="exact"``) or a random row of ``i``'s class
(``positive="relax"``, class-aware only), as in RepDistiller's ``CIFAR100InstanceSample``.

Both pools have the same shape: the rows of a fixed permutation ``order`` with one contiguous
block ``[start_i, start_i + len_i)`` cut out (the anchor alone for uniform; its class, with
``order`` sorted by label, for class-aware). A draw ``r`` in ``[0, pool_i)`` maps to
``order[r + len_i * (r >= start_i)]``, so one code path serves both.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

NEGATIVE_MODES = ("uniform", "class")
POSITIVE_MODES = ("exact", "relax")

# Above this many random keys (B x pool), the dense sampler works in row chunks.
_DENSE_CHUNK_ELEMENTS = 1 << 24


def sample_without_replacement(pool: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct integers from ``[0, pool_b)`` for each row ``b``, uniformly.

    Two exact strategies: when ``k`` is a large fraction of the pool, the ``k`` smallest of
    ``pool_b`` random keys (a uniformly random ``k``-subset); otherwise i.i.d. draws with
    replacement, keeping the first ``k`` distinct values in draw order — the same as drawing
    until ``k`` distinct values are seen, hence also a uniform ``k``-subset — in one sort.

    Args:
        pool: ``(B,)`` long, pool size per row; every entry must be ``>= k``.
        k: number of draws per row.
        generator: random source, on ``pool``'s device.

    Returns:
        ``(B, k)`` long.
    """
    if k == 0:
        return pool.new_zeros((pool.shape[0], 0))
    if 4 * k >= int(pool.min()):
        return _dense_keys(pool, k, generator)
    return _first_distinct(pool, k, generator)


def _uniform_below(bound: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform integers in ``[0, bound)`` elementwise.

    float64 keys: the rounding bias is below ``bound / 2**53``, and ``u < 1`` keeps the product
    strictly below ``bound`` for any bound under ``2**52``.
    """
    u = torch.rand(bound.shape, generator=generator, device=bound.device, dtype=torch.float64)
    return (u * bound).long()


def _draws_for_distinct(pool: int, k: int) -> int:
    """How many i.i.d. draws from ``pool`` values give ``k`` distinct ones with margin.

    ``n`` draws show ``pool * (1 - exp(-n / pool))`` distinct values on average; add six
    standard deviations (at most ``sqrt(k)``) so a shortfall, which triggers a redraw of that
    row, is rare.
    """
    return int(math.ceil(-pool * math.log1p(-k / pool) + 6 * math.sqrt(k) + 16))


def _first_distinct(pool: Tensor, k: int, generator: torch.Generator) -> Tensor:
    n = max(_draws_for_distinct(int(p), k) for p in pool.unique().tolist())
    draws = _uniform_below(pool[:, None].expand(-1, n), generator)  # (B, n) in draw order
    values, drawn_at = draws.sort(dim=1, stable=True)
    first = torch.ones_like(values, dtype=torch.bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]
    # Each distinct value is known by its first draw; keep the k drawn earliest.
    rank = torch.where(first, drawn_at, torch.full_like(drawn_at, n))
    chosen = rank.topk(k, dim=1, largest=False, sorted=False).indices
    out = values.gather(1, chosen)
    short = first.sum(dim=1) < k
    if bool(short.any()):  # too few distinct values in this row: redraw it from scratch
        out[short] = _first_distinct(pool[short], k, generator)
    return out


def _dense_keys(pool: Tensor, k: int, generator: torch.Generator) -> Tensor:
    width = int(pool.max())
    rows_per_chunk = max(1, _DENSE_CHUNK_ELEMENTS // width)
    columns = torch.arange(width, device=pool.device)
    out = []
    for chunk in pool.split(rows_per_chunk):
        keys = torch.rand((chunk.shape[0], width), generator=generator, device=pool.device)
        keys.masked_fill_(columns[None, :] >= chunk[:, None], 2.0)  # outside the pool: never chosen
        out.append(keys.topk(k, dim=1, largest=False, sorted=False).indices)
    return torch.cat(out)


class NegativeSampler:
    """Draws ``contrast_idx`` (B x (K+1), column 0 the positive) for a batch of anchors.

    Args:
        n_data: number of memory-bank rows N.
        k: negatives per anchor K.
        negatives: ``"uniform"`` or ``"class"``.
        positive: ``"exact"`` or ``"relax"`` (``"relax"`` needs class-aware sampling).
        labels: ``(N,)`` class of every bank row, required for ``negatives="class"``.
        replacement: draw negatives with replacement, as RepDistiller's AliasMethod does for
            uniform sampling; then ``k`` may exceed the pool.
    """

    def __init__(
        self,
        n_data: int,
        k: int,
        negatives: str = "uniform",
        positive: str = "exact",
        labels: Optional[Tensor] = None,
        replacement: bool = False,
    ) -> None:
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives={negatives!r}: expected one of {NEGATIVE_MODES}")
        if positive not in POSITIVE_MODES:
            raise ValueError(f"positive={positive!r}: expected one of {POSITIVE_MODES}")
        if positive == "relax" and negatives != "class":
            raise ValueError("positive='relax' draws a same-class row: it needs negatives='class'")
        if k < 1:
            raise ValueError(f"nce_k={k}: expected at least one negative")
        self.n_data, self.k = n_data, k
        self.negatives, self.positive, self.replacement = negatives, positive, replacement
        self._order: Optional[Tensor] = None
        self._labels: Optional[Tensor] = None
        if negatives == "class":
            self._set_labels(labels)
        elif k > n_data - 1 and not replacement:
            raise ValueError(
                f"nce_k={k} negatives requested but only {n_data - 1} rows are available "
                f"(n_data={n_data} minus the anchor); expected nce_k <= {n_data - 1}"
            )

    def _set_labels(self, labels: Optional[Tensor]) -> None:
        if labels is None:
            raise ValueError(
                "negatives='class' needs labels: a tensor with the class of each of the "
                f"{self.n_data} bank rows, got None"
            )
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() != self.n_data:
            raise ValueError(f"labels has {labels.numel()} entries, expected n_data={self.n_data}")
        if bool((labels < 0).any()):
            raise ValueError("labels contains negative (unlabeled) entries; class-aware sampling needs a class for every row")
        counts = torch.bincount(labels)
        smallest_pool = self.n_data - int(counts.max())
        if smallest_pool < 1 or self.k > smallest_pool and not self.replacement:
            worst = int(counts.argmax())
            raise ValueError(
                f"nce_k={self.k} negatives requested but class {worst} leaves only {smallest_pool} "
                f"rows of other classes; expected nce_k <= {smallest_pool}"
            )
        self._labels = labels
        self._order = torch.sort(labels, stable=True).indices
        self._class_start = torch.cumsum(counts, 0) - counts
        self._class_count = counts

    def to(self, device: torch.device) -> "NegativeSampler":
        """Move the label tables to ``device`` (in place; returns self)."""
        if self._labels is not None:
            self._labels = self._labels.to(device)
            self._order = self._order.to(device)
            self._class_start = self._class_start.to(device)
            self._class_count = self._class_count.to(device)
        return self

    @property
    def labels(self) -> Optional[Tensor]:
        """``(N,)`` class of every row, or ``None`` for uniform sampling."""
        return self._labels

    def sample(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """``(B, K+1)`` long bank rows for anchors ``index`` ``(B,)``; column 0 the positive."""
        if self.negatives == "uniform":
            start, length, order = index, torch.ones_like(index), None
        else:
            assert self._labels is not None and self._order is not None
            cls = self._labels[index]
            start, length, order = self._class_start[cls], self._class_count[cls], self._order
        pool = self.n_data - length
        if self.replacement:
            draws = _uniform_below(pool[:, None].expand(-1, self.k), generator)
        else:
            draws = sample_without_replacement(pool, self.k, generator)
        position = draws + length[:, None] * (draws >= start[:, None])
        negatives = position if order is None else order[position]
        if self.positive == "exact":
            positive = index
        else:
            offset = _uniform_below(length, generator)
            positive = order[start + offset]
        return torch.cat([positive[:, None], negatives], dim=1)

    def sample_shared(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """``(K,)`` bank rows, one draw for the whole batch: negatives of every anchor in ``index``.

        Uniform over the rows that are no anchor of the batch (so no anchor meets its own row),
        without replacement unless the sampler draws with replacement. A draw ``r`` in
        ``[0, N - u)`` maps to the ``r``-th row outside the ``u`` batch rows:
        ``r + #{i : s_i - i <= r}`` over the sorted batch rows ``s_i``.
        """
        if self.negatives != "uniform" or self.positive != "exact":
            raise ValueError("shared_negatives draws uniform negatives for exact positives: "
                             "it does not combine with negatives='class' or positive='relax'")
        batch = torch.unique(index)  # sorted
        pool = self.n_data - batch.numel()
        if pool < (1 if self.replacement else self.k):
            raise ValueError(f"nce_k={self.k} shared negatives requested but only {pool} rows lie outside "
                             f"the batch (n_data={self.n_data}); expected nce_k <= {pool}")
        bound = torch.tensor([pool], device=index.device)
        if self.replacement:
            draws = _uniform_below(bound.expand(self.k), generator)
        else:
            draws = sample_without_replacement(bound, self.k, generator)[0]
        skips = batch - torch.arange(batch.numel(), device=index.device)
        return draws + torch.searchsorted(skips, draws, right=True)
