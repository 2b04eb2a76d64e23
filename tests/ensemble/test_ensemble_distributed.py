"""Two gloo processes: every critic's banks identical on both ranks, and equal to one process."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gloo_ranks import run_on_ranks, sgd_on_my_share
from ensemble import EnsembleDistillLoss, EnsembleDistiller
from losses.features import Features

N, K, C, GLOBAL_BATCH, STEPS, TEACHER_DIMS = 64, 16, 4, 8, 5, (9, 7, 11)
LABELS = torch.arange(N) % C


class LinearStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Linear(10, 12), nn.Linear(12, C)

    def forward(self, x: torch.Tensor) -> Features:
        pooled = self.body(x)
        return Features(maps=[], pooled=pooled, logits=self.fc(pooled))


def _model() -> EnsembleDistiller:
    torch.manual_seed(0)
    student = LinearStudent()
    loss = EnsembleDistillLoss.from_features(
        student(torch.zeros(2, 10)), [Features([], torch.zeros(2, d), torch.zeros(2, C)) for d in TEACHER_DIMS],
        n_data=N, num_classes=C, crd_weights=0.8, kd_weight=0.5, feat_dim=8, nce_k=K, negatives="class",
        labels=LABELS, seed=5)
    return EnsembleDistiller(student, loss)


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        index = torch.randperm(N, generator=g)[:GLOBAL_BATCH]
        if step == 2:  # the same row on both ranks: every critic must resolve it identically
            index[GLOBAL_BATCH - 1] = index[0]
        teachers = [Features([], torch.randn(GLOBAL_BATCH, d, generator=g), torch.randn(GLOBAL_BATCH, C, generator=g))
                    for d in TEACHER_DIMS]
        out.append((torch.randn(GLOBAL_BATCH, 10, generator=g), teachers, index))
    return out


def _loss(wrapped: nn.Module, batch, rows: slice) -> torch.Tensor:
    x, teachers, index = batch
    mine = [Features([], t.pooled[rows], t.logits[rows]) for t in teachers]
    return wrapped(x[rows], mine, index[rows], LABELS[index[rows]])["loss"]


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    return sgd_on_my_share(_model(), _batches(), rank, world, _loss)


@pytest.mark.slow
def test_two_processes_hold_identical_banks_in_every_critic(tmp_path):
    rank0, rank1 = run_on_ranks(_train, 2, tmp_path)
    bank_keys = [k for k in rank0 if ".memory." in k or k.endswith("sampler_state")]
    assert len(bank_keys) == 4 * len(TEACHER_DIMS)  # two banks, log Z and the sampler per critic
    for key in bank_keys:
        assert float((rank0[key].double() - rank1[key].double()).abs().max()) == 0.0, key
    single = _train(0, 1)
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)
