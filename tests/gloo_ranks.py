"""Run a function on several CPU processes joined by a gloo process group (multi-process tests)."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel


def free_port() -> int:
    """A TCP port free on localhost now (torchrun's rendezvous does not accept port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn: Callable[[int, int], Any]) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[int, int], Any], world: int, out_dir: Path) -> list[Any]:
    """``fn(rank, world)`` on ``world`` spawned processes; returns each rank's result, rank order.

    ``fn`` must be a module-level function (the children import it by name).
    """
    mp.spawn(_rank_main, args=(world, free_port(), str(out_dir), fn), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def sgd_on_my_share(model: torch.nn.Module, batches, rank: int, world: int,
                    loss_of: Callable[[torch.nn.Module, Any, slice], torch.Tensor], lr: float = 0.5) -> dict:
    """Train ``model`` (DDP-wrapped when ``world > 1``) with SGD on this rank's rows of each batch.

    ``loss_of(wrapped, batch, rows)`` gives the loss of ``rows`` (this rank's share of the global
    batch, ``len(batch[0]) // world`` rows). Returns a copy of the final state dict.
    """
    wrapped = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(wrapped.parameters(), lr=lr)
    for batch in batches:
        assert len(batch[0]) % world == 0, f"a global batch of {len(batch[0])} does not split over {world} ranks"
        share = len(batch[0]) // world
        loss = loss_of(wrapped, batch, slice(rank * share, (rank + 1) * share))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}
