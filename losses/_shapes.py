"""Cheap shape guards and spatial matching shared by the baseline losses.

The guards run before any maths so a user's mistake (networks fed different batches, a teacher
with one stage more than the student) surfaces as one ``ValueError`` naming the argument, the
value and what was expected, instead of a broadcasting error deep inside torch.
"""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import torch.nn.functional as F
from torch import Tensor

_T = TypeVar("_T")


def require(value: Optional[_T], name: str, why: str) -> _T:
    """``value`` itself, or a ``ValueError`` saying that ``name`` is missing and ``why`` it is needed."""
    if value is None:
        raise ValueError(f"{name} is None, but {why}")
    return value


def check_ndim(x: Tensor, ndim: int, name: str, layout: str) -> None:
    """Raise unless ``x`` has ``ndim`` dimensions; ``layout`` spells them, e.g. ``'(B, C, H, W)'``."""
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def check_same_batch(student: Tensor, teacher: Tensor, what: str) -> None:
    """Raise unless student and teacher tensors describe the same number of samples."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{what}: student batch size {student.shape[0]} != teacher batch size "
            f"{teacher.shape[0]}; both networks must see the same batch"
        )


def check_map_pairs(
    g_s: Sequence[Tensor], g_t: Sequence[Tensor], what: str, expected: Optional[int] = None
) -> None:
    """Raise unless ``g_s`` and ``g_t`` are equally long lists of ``(B, C, H, W)`` maps, same ``B``.

    ``expected`` is the number of pairs a loss with per-layer modules was built for.
    """
    if len(g_s) != len(g_t):
        raise ValueError(
            f"{what}: student gives {len(g_s)} maps, teacher gives {len(g_t)}; "
            "the loss pairs the maps stage by stage, so the counts must be equal"
        )
    if expected is not None and len(g_s) != expected:
        raise ValueError(f"{what}: got {len(g_s)} map pairs, but the loss was built for {expected}")
    if not g_s:
        raise ValueError(f"{what}: got no feature maps; expected at least one (B, C, H, W) pair")
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        check_ndim(f_s, 4, f"{what}: student map {i}", "(B, C, H, W)")
        check_ndim(f_t, 4, f"{what}: teacher map {i}", "(B, C, H, W)")
        check_same_batch(f_s, f_t, f"{what} (map {i})")


def pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``x`` ``(B, C, H, W)`` average-pooled to ``size`` (a no-op when it already has it)."""
    return x if tuple(x.shape[2:]) == size else F.adaptive_avg_pool2d(x, size)


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps average-pooled to the smaller height and width of the two.

    The reference pools the larger map to ``(H, H)`` of the smaller one (it assumes square
    maps); taking height and width separately is the same for square maps and also right for
    rectangular ones.
    """
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    return pool_to(a, size), pool_to(b, size)


def graph_zero(reference: Tensor) -> Tensor:
    """A scalar 0 that depends on ``reference``, so ``backward()`` works even when it is the only term."""
    return reference.sum() * 0.0
