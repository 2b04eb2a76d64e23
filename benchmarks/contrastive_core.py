"""xmodal's contrastive core against the plain gather-then-bmm formulation of the same loss.

For B=64, K=16384, feat_dim=128 and several bank sizes N, one fwd+bwd step (heads, scoring,
NCE loss, backward, bank update) of each formulation, given the same ``contrast_idx`` (drawn
uniformly with replacement, as RepDistiller's AliasMethod does, so N < K works too). Each
(formulation, N) runs in a fresh subprocess so peak memory can be read from the OS: the figure
is the process's peak RSS during the steps (Linux ``VmHWM``, reset before the first step;
CUDA: ``max_memory_allocated``) minus what the banks, heads and inputs already held. Step
times are the median over ``--steps`` timed steps (after one warm-up step), with the fastest
and slowest step of xmodal's core beside them: on a shared CPU a mean of a few steps moves by
a third from run to run. The loss of the first step is printed for both, with their relative
difference.

    python benchmarks/contrastive_core.py                 # N = 5k, 50k, 105k, 1.28M
    python benchmarks/contrastive_core.py --n 50000 --steps 15
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

B, K, FEAT, DIM_S, DIM_T = 64, 16384, 128, 256, 256


def _status_bytes(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: str) -> int:
    """Start a new peak window; returns the memory in use now."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM (peak RSS) to VmRSS
    return _status_bytes("VmRSS")


def _peak(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def run_one(formulation: str, n_data: int, steps: int, device: str, scoring: str) -> dict:
    """One (formulation, N) measurement, in this process."""
    from losses.contrast.reference import PlainCRD
    from losses.crd import CRDLoss

    torch.manual_seed(0)
    crd = CRDLoss(DIM_S, DIM_T, n_data, feat_dim=FEAT, nce_k=K, replacement=True, scoring=scoring).to(device)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps + 1):
        index = torch.randperm(n_data, generator=g)[:B]
        contrast_idx = torch.randint(0, n_data, (B, K + 1), generator=g)
        contrast_idx[:, 0] = index
        batches.append((torch.randn(B, DIM_S, generator=g), torch.randn(B, DIM_T, generator=g), index, contrast_idx))
    batches = [tuple(t.to(device) for t in b) for b in batches]
    plain = PlainCRD(crd.state_dict(), n_data) if formulation == "plain" else None
    if plain is not None:
        for name in ("w_s", "b_s", "w_t", "b_t"):
            setattr(plain, name, getattr(plain, name).detach().to(device).requires_grad_())
        plain.memory_v1, plain.memory_v2 = plain.memory_v1.to(device), plain.memory_v2.to(device)
        del crd

    def step(batch):
        f_s, f_t, index, contrast_idx = (t.clone() for t in batch)
        f_s.requires_grad_()
        loss = plain(f_s, f_t, index, contrast_idx) if plain is not None else crd(f_s, f_t, index, contrast_idx)
        loss.backward()
        return float(loss)

    base = _reset_peak(device)  # banks, heads and inputs are allocated; no step has run
    first_loss = step(batches[0])  # also the warm-up: sets Z
    seconds = []
    for batch in batches[1:]:
        start = time.perf_counter()
        step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return {"loss": first_loss, "step_s": statistics.median(seconds), "min_s": seconds[0], "max_s": seconds[-1],
            "peak_mib": (_peak(device) - base) / 2**20}


def _measure(formulation: str, n_data: int, steps: int, device: str, scoring: str) -> dict:
    cmd = [sys.executable, __file__, "--child", formulation, "--n", str(n_data), "--steps", str(steps),
           "--device", device, "--scoring", scoring]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sampler_seconds(n_data: int, device: str) -> float | None:
    from losses.contrast.sampling import NegativeSampler

    if K > n_data - 1:
        return None
    sampler = NegativeSampler(n_data, K)
    index = torch.randperm(n_data)[:B].to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    sampler.sample(index, gen)
    start = time.perf_counter()
    for _ in range(5):
        sampler.sample(index, gen)
    return (time.perf_counter() - start) / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[5_000, 50_000, 105_000, 1_281_167])
    parser.add_argument("--steps", type=int, default=9, help="timed steps per run; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scoring", default="auto", choices=["auto", "full", "gather"])
    parser.add_argument("--child", choices=["xmodal", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.n[0], args.steps, args.device, args.scoring)))
        return
    from losses.contrast.scoring import choose_scoring

    print(f"B={B} K={K} feat_dim={FEAT} device={args.device} threads={torch.get_num_threads()} steps={args.steps}")
    header = f"{'N':>9} {'route':>6} {'xmodal s':>9} {'(min-max)':>13} {'plain s':>9} {'speed-up':>8} {'xmodal MiB':>10} {'plain MiB':>10} {'mem ratio':>9} {'loss rel diff':>13} {'sampler s':>9}"
    print(header)
    for n_data in args.n:
        ours = _measure("xmodal", n_data, args.steps, args.device, args.scoring)
        plain = _measure("plain", n_data, args.steps, args.device, args.scoring)
        rel = abs(ours["loss"] - plain["loss"]) / abs(plain["loss"])
        sampler = _sampler_seconds(n_data, args.device)
        route = choose_scoring(args.scoring, n_data, K)
        print(
            f"{n_data:>9} {route:>6} {ours['step_s']:>9.4f} {ours['min_s']:>6.3f}-{ours['max_s']:<6.3f} {plain['step_s']:>9.4f} "
            f"{plain['step_s'] / ours['step_s']:>7.1f}x {ours['peak_mib']:>10.1f} {plain['peak_mib']:>10.1f} "
            f"{plain['peak_mib'] / max(ours['peak_mib'], 0.1):>8.1f}x {rel:>13.2e} "
            f"{'n/a (K>N-1)' if sampler is None else f'{sampler:.4f}':>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()
