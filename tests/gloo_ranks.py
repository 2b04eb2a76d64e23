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


def _rank_main(rank: int, world: int, store: str, out_dir: str, fn: Callable[[int, int], Any]) -> None:
    torch.set_num_threads(1)
    # A file store: no TCP port to race for, and no store server thread living in rank 0.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, world)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".part")
        os.replace(path + ".part", path)  # whole or absent
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[int, int], Any], world: int, out_dir: Path) -> list[Any]:
    """``fn(rank, world)`` on ``world`` spawned processes; returns each rank's result, rank order.

    ``fn`` must be a module-level function (the children import it by name). A process that
    dies in gloo's teardown after every rank wrote its result whole (a std::terminate at exit
    seen now and then on CPU) does not fail the run: the results are what the tests compare.
    """
    out_dir = Path(out_dir)
    paths = [out_dir / f"rank{rank}.pt" for rank in range(world)]
    try:
        mp.spawn(_rank_main, args=(world, str(out_dir / "gloo-store"), str(out_dir), fn), nprocs=world, join=True)
    except mp.ProcessExitedException:
        if not all(p.exists() for p in paths):
            raise
    return [torch.load(p, weights_only=False) for p in paths]


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
