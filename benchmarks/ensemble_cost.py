"""What each added teacher costs in ensemble distillation: time per step and memory-bank bytes.

For M = 1, 2, 4, 8 teachers, at the CIFAR settings of ``recipes/ensemble-cifar.yaml`` (B = 64,
K = 4096, class-aware negatives over 10 classes, N = 20,000 rows, 128-d embeddings):

* ``critics``: the critic computation alone (heads, negatives, scoring, NCE, backward, bank
  update) of :class:`ensemble.CriticEnsemble`, which draws the negatives once per step, next to
  M independent ``losses.CRDLoss`` that each draw their own;
* ``step``: a whole training step: student (resnet8, width 8) forward and backward, M frozen
  teachers' forwards (resnet8, width 16), cross-entropy and the M critics.

Each figure is the median over ``--steps`` steps after two warm-up steps, in the current process
(``--threads`` torch threads, 1 by default). On a machine shared with other jobs, wall time
measures the neighbours as much as the code, so the default clock is this process's CPU time
(``--clock cpu``; with one thread it equals wall time on an idle machine). The last columns divide the extra time over M = 1 by the
teachers added: a constant or falling figure means the cost grows no worse than linearly in M.

    python benchmarks/ensemble_cost.py
    python benchmarks/ensemble_cost.py --n 50000 --k 16384 --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ensemble import CriticEnsemble
from losses.crd import CRDLoss

CLASSES, FEAT = 10, 128


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _median_seconds(step: Callable[[int], None], steps: int, clock: Callable[[], float]) -> float:
    for i in range(2):  # warm-up: sets Z, allocates the scoring buffers
        step(i)
    times = []
    for i in range(steps):
        began = clock()
        step(2 + i)
        times.append(clock() - began)
    return statistics.median(times)


def _batch(n_data: int, batch: int, dims: list[int], student_dim: int, step: int):
    g = torch.Generator().manual_seed(step)
    index = torch.randperm(n_data, generator=g)[:batch]
    return index, torch.randn(batch, student_dim, generator=g), [torch.randn(batch, d, generator=g) for d in dims]


def critic_seconds(m: int, shared: bool, args, labels: torch.Tensor) -> tuple[float, int]:
    """Median seconds of one critic step for M critics, and the bytes their banks hold."""
    dims = [64] * m  # a width-16 resnet8 teacher's pooled width
    options = dict(feat_dim=FEAT, nce_k=args.k, negatives="class", labels=labels)
    if shared:
        critics = CriticEnsemble(32, dims, args.n, **options)
        modules = list(critics.critics)
    else:
        modules = [CRDLoss(32, d, args.n, seed=i, **options) for i, d in enumerate(dims)]

    def step(i: int) -> None:
        index, f_s, f_ts = _batch(args.n, args.batch, dims, 32, i)
        f_s.requires_grad_()
        if shared:
            loss, _ = critics(f_s, f_ts, index)
        else:
            loss = sum(CRDLoss.default_weight * crd(f_s, f_t, index) for crd, f_t in zip(modules, f_ts))
        loss.backward()

    seconds = _median_seconds(step, args.steps, CLOCKS[args.clock])
    bank_bytes = sum(c.memory.student_bank.nbytes + c.memory.teacher_bank.nbytes for c in modules)
    return seconds, bank_bytes


def whole_step_seconds(m: int, args, labels: torch.Tensor) -> float:
    """Median seconds of one training step of a width-8 student with M width-16 teachers."""
    from xmodal.models import build_model

    torch.manual_seed(0)
    student = build_model("resnet8", 3, CLASSES, width=8)
    teachers = [build_model("resnet8", 3, CLASSES, width=16).eval().requires_grad_(False) for _ in range(m)]
    critics = CriticEnsemble(student.num_features, [t.num_features for t in teachers], args.n, feat_dim=FEAT,
                             nce_k=args.k, negatives="class", labels=labels)
    opt = torch.optim.SGD(list(student.parameters()) + list(critics.parameters()), lr=0.01, momentum=0.9)

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        index = torch.randperm(args.n, generator=g)[:args.batch]
        images = torch.randn(args.batch, 3, 32, 32, generator=g)
        with torch.no_grad():
            taught = [t(images).pooled for t in teachers]
        out = student(images)
        crd, _ = critics(out.pooled, taught, index)
        loss = F.cross_entropy(out.logits, labels[index]) + crd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _median_seconds(step, args.steps, CLOCKS[args.clock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labels = torch.arange(args.n) % CLASSES
    print(f"N={args.n} K={args.k} B={args.batch} feat_dim={FEAT} class-aware negatives, threads={args.threads}, "
          f"median {args.clock} time of {args.steps} steps (ms); per added teacher = (t(M) - t(1)) / (M - 1)")
    print(f"{'M':>3} {'bank MiB':>9} {'critics shared':>15} {'critics own draw':>17} {'whole step':>11} "
          f"{'per added: critics':>19} {'own draw':>9} {'step':>7}")
    base: dict[str, float] = {}
    for m in args.m:
        shared, bank_bytes = critic_seconds(m, True, args, labels)
        own, _ = critic_seconds(m, False, args, labels)
        whole = whole_step_seconds(m, args, labels)
        now = {"shared": shared, "own": own, "step": whole}
        if not base:
            base = dict(now)
        added = {k: (v - base[k]) / (m - args.m[0]) * 1e3 if m > args.m[0] else float("nan") for k, v in now.items()}
        print(f"{m:>3} {bank_bytes / 2**20:>9.1f} {shared * 1e3:>15.1f} {own * 1e3:>17.1f} {whole * 1e3:>11.1f} "
              f"{added['shared']:>19.1f} {added['own']:>9.1f} {added['step']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
