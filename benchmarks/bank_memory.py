"""Memory-bank storage: bytes, step time and score error for float32 / float16 / bfloat16 banks.

For each bank size N (up to ImageNet's 1.28M rows) and storage dtype: the memory the critic's
two banks take (bytes of the tensors held), the fwd+bwd step time of the critic at B=64,
K=16384, and the largest relative gap, over the steps, between its loss and the loss of a
float32 critic that started from the same heads, rows, sampler state and inputs.

    python benchmarks/bank_memory.py [--n 5000 50000 1281167] [--steps 3]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from losses.crd import CRDLoss

B, K, FEAT = 64, 16384, 128


def measure(n_data: int, dtype: str, steps: int, initial: dict | None) -> dict:
    """Run ``steps`` + 1 critic steps; ``initial`` (a float32 critic's state before its first
    step) makes every dtype start from the same heads, rows and sampler state."""
    torch.manual_seed(0)
    crd = CRDLoss(256, 256, n_data, feat_dim=FEAT, nce_k=K, replacement=True, bank_dtype=dtype)
    if initial is None:  # the float32 reference: keep its starting state for the other dtypes
        initial = {k: v.clone() for k, v in crd.state_dict().items()}
    else:
        crd.load_state_dict(initial)  # rounded to this dtype on load
    g = torch.Generator().manual_seed(1)
    losses = []
    start = None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        index = torch.randperm(n_data, generator=g)[:B]
        f_s, f_t = torch.randn(B, 256, generator=g, requires_grad=True), torch.randn(B, 256, generator=g)
        loss = crd(f_s, f_t, index)
        loss.backward()
        losses.append(float(loss.detach()))
    seconds = (time.perf_counter() - start) / steps
    bank_bytes = crd.memory.student_bank.element_size() * crd.memory.student_bank.numel() * 2
    return {"bank_mib": bank_bytes / 2**20, "step_s": seconds, "losses": losses, "initial": initial}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[5_000, 50_000, 105_000, 1_281_167])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"two banks of N x {FEAT}; critic step at B={B}, K={K}, threads={torch.get_num_threads()}")
    print(f"{'N':>9} {'dtype':>9} {'banks MiB':>10} {'step s':>8} {'max loss gap to fp32':>21}")
    for n_data in args.n:
        reference = measure(n_data, "float32", args.steps, None)
        rows = [("float32", reference)]
        for dtype in ("float16", "bfloat16"):
            rows.append((dtype, measure(n_data, dtype, args.steps, reference["initial"])))
        for dtype, row in rows:
            gap = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], reference["losses"]))
            print(f"{n_data:>9} {dtype:>9} {row['bank_mib']:>10.1f} {row['step_s']:>8.3f} {gap:>21.2e}", flush=True)
        del reference, rows
        gc.collect()


if __name__ == "__main__":
    main()
