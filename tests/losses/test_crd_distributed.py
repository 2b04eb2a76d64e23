"""Two gloo processes: banks (full, shared draw, queue) identical on both ranks, and equal to one
process at the same batch."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from gloo_ranks import run_on_ranks, sgd_on_my_share
from losses.crd import CRDLoss

N, K, GLOBAL_BATCH, STEPS = 64, 20, 8, 5


class Student(nn.Module):
    """A linear 'student' and its CRD critic, wrapped together as a training loop would."""

    def __init__(self, **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(10, 12)
        self.crd = CRDLoss(12, 9, N, feat_dim=8, nce_k=K, seed=5, **options)

    def forward(self, x, f_t, index):
        return self.crd(self.body(x), f_t, index)


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        index = torch.randperm(N, generator=g)[:GLOBAL_BATCH]
        if step == 2:  # the same row on both ranks: the update must resolve it identically
            index[GLOBAL_BATCH - 1] = index[0]
        out.append((torch.randn(GLOBAL_BATCH, 10, generator=g), torch.randn(GLOBAL_BATCH, 9, generator=g), index))
    return out


def _train(rank: int, world: int, options: dict) -> dict[str, torch.Tensor]:
    return sgd_on_my_share(Student(**options), _batches(), rank, world,
                           lambda wrapped, b, rows: wrapped(b[0][rows], b[1][rows], b[2][rows]))


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"shared_negatives": True}, {"bank": "queue"}], ids=["full", "shared", "queue"])
def test_two_processes_hold_identical_banks_equal_to_one_process(tmp_path, options):
    train = functools.partial(_train, options=options)
    rank0, rank1 = run_on_ranks(train, 2, tmp_path)
    memory = [key for key in rank0 if key.startswith("crd.memory.") or key == "crd.sampler_state"]
    assert len(memory) == (6 if options.get("bank") == "queue" else 4)
    for key in memory:
        assert float((rank0[key].double() - rank1[key].double()).abs().max()) == 0.0, key
    single = train(0, 1)
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)
