"""Two gloo processes: every critic's banks identical on both ranks, and equal to one process."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    model = _model()
    wrapped = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    share = GLOBAL_BATCH // world
    for x, teachers, index in _batches():
        rows = slice(rank * share, (rank + 1) * share)
        mine = [Features([], t.pooled[rows], t.logits[rows]) for t in teachers]
        terms = wrapped(x[rows], mine, index[rows], LABELS[index[rows]])
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_train(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_hold_identical_banks_in_every_critic(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    bank_keys = [k for k in rank0 if ".memory." in k or k.endswith("sampler_state")]
    assert len(bank_keys) == 4 * len(TEACHER_DIMS)  # two banks, log Z and the sampler per critic
    for key in bank_keys:
        assert float((rank0[key].double() - rank1[key].double()).abs().max()) == 0.0, key
    single = _train(0, 1)
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)
