"""xmodal's contrastive core against the plain gather-then-bmm formulation of the same loss.

Table 1, for B=64, K=16384, feat_dim=128 and several bank sizes N: one fwd+bwd step (heads,
scoring, NCE loss, backward, bank update) of each formulation, given the same ``contrast_idx``
(drawn uniformly with replacement, as RepDistiller's AliasMethod does, so N < K works too), and
the exact route's memory-traffic floor: every step must read the B x (K+1) selected rows of each
bank at least once (2 x B x (K+1) x 512 B), at the read bandwidth this machine shows in the same
run (a sum over a 256 MiB tensor, best of five).

Table 2, the bank kinds for N = 50k, 1.28M and 17M: ``full`` (the paper's per-anchor negatives,
sampled by the critic), ``shared`` (``shared_negatives=True``: one draw of K rows per batch) and
``queue`` (``bank="queue"``: the last K embeddings of each view): what the banks hold, step time
and peak memory. A full bank that would take more than half of the memory available is computed,
not allocated. Table 3: a small distillation (a linear student learning a linear teacher's view of
shared latents) with each bank kind: final loss and held-out retrieval top-1 of the student's
embedding among the teacher's.

Each (formulation, N) runs in a fresh subprocess so peak memory can be read from the OS: the figure
is the process's peak RSS during the steps (Linux ``VmHWM``, reset before the first step;
CUDA: ``max_memory_allocated``) minus what the banks, heads and inputs already held. Step
times are the median over ``--steps`` timed steps (after one warm-up step), with the fastest
and slowest step of xmodal's core beside them: on a shared CPU a mean of a few steps moves by
a third from run to run. The loss of the first step is printed for both, with their relative
difference.

    python benchmarks/contrastive_core.py                 # N = 5k, 50k, 105k, 1.28M; then tables 2, 3
    python benchmarks/contrastive_core.py --n 50000 --steps 15 --banks 50000
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


BANK_KINDS = {"full": {}, "shared": {"shared_negatives": True}, "queue": {"bank": "queue"}}


def run_one(formulation: str, n_data: int, steps: int, device: str, scoring: str) -> dict:
    """One (formulation, N) measurement, in this process.

    ``xmodal`` and ``plain`` score a given ``contrast_idx``; the bank kinds of table 2 draw their
    own negatives (or, for the queue, need none), as in training.
    """
    from losses.contrast.reference import PlainCRD
    from losses.crd import CRDLoss

    torch.manual_seed(0)
    kind = BANK_KINDS.get(formulation, {})
    crd = CRDLoss(DIM_S, DIM_T, n_data, feat_dim=FEAT, nce_k=K, replacement=True, scoring=scoring, **kind).to(device)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps + 1):
        index = torch.randint(0, n_data, (B,), generator=g)
        contrast_idx = torch.randint(0, n_data, (B, K + 1), generator=g) if formulation in ("xmodal", "plain") else None
        if contrast_idx is not None:
            contrast_idx[:, 0] = index
        batches.append((torch.randn(B, DIM_S, generator=g), torch.randn(B, DIM_T, generator=g), index, contrast_idx))
    batches = [tuple(None if t is None else t.to(device) for t in b) for b in batches]
    plain = PlainCRD(crd.state_dict(), n_data) if formulation == "plain" else None
    if plain is not None:
        for name in ("w_s", "b_s", "w_t", "b_t"):
            setattr(plain, name, getattr(plain, name).detach().to(device).requires_grad_())
        plain.memory_v1, plain.memory_v2 = plain.memory_v1.to(device), plain.memory_v2.to(device)
        del crd
    held = 0 if plain is not None else sum(t.numel() * t.element_size() for k, t in crd.state_dict().items() if k.startswith("memory."))

    def step(batch):
        f_s, f_t, index, contrast_idx = (None if t is None else t.clone() for t in batch)
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
    out = {"loss": first_loss, "step_s": statistics.median(seconds), "min_s": seconds[0], "max_s": seconds[-1],
           "peak_mib": (_peak(device) - base) / 2**20, "held_mib": held / 2**20}
    if formulation == "xmodal":
        out["row_read_s"] = _row_read_seconds(crd, batches[1][3], device)
    return out


def _row_read_seconds(crd, contrast_idx, device: str) -> float:
    """One read of the selected rows of both banks by the fastest scattered-row reader PyTorch has
    (``embedding_bag``, a weighted sum: as little arithmetic per row as a read allows), median of 5."""
    weights = torch.ones(contrast_idx.shape, device=device)
    seconds = []
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for bank in (crd.memory.student_bank, crd.memory.teacher_bank):
            torch.nn.functional.embedding_bag(contrast_idx, bank, per_sample_weights=weights.to(bank.dtype), mode="sum")
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def read_bandwidth(device: str) -> float:
    """Bytes per second this device reads a 256 MiB float32 tensor at (a sum), best of five."""
    x = torch.ones(64 * 2**20, device=device)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def exact_floor_bytes() -> int:
    """Bytes the exact route must read per step: the B x (K+1) selected rows of each of two banks."""
    return 2 * B * (K + 1) * FEAT * 4


def _memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


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


def small_run(kind: str, seed: int = 0, n_data: int = 4096, steps: int = 600) -> dict:
    """A linear student distilled from a linear teacher with one bank kind; loss and retrieval.

    Latents z (16-d) are seen by the teacher as ``A z + 4 e`` (48-d) and by the student as
    ``C z + 4 e'`` (48-d), with unit Gaussian noise e, e' (enough that retrieval is not trivial). After ``steps`` SGD steps at B = 64 (K = 1024, tau = 0.07, Z from
    each batch, warm banks), each of 1,000 held-out samples' student embedding is matched to
    the nearest teacher embedding: top-1 is the fraction matched to their own sample.
    """
    from losses.crd import CRDLoss

    g = torch.Generator().manual_seed(100)  # the same data and views for every kind
    a_t, a_s = torch.randn(16, 48, generator=g), torch.randn(16, 48, generator=g)
    z = torch.randn(n_data + 1000, 16, generator=g)
    x_t = z @ a_t + 4.0 * torch.randn(n_data + 1000, 48, generator=g)
    x_s = z @ a_s + 4.0 * torch.randn(n_data + 1000, 48, generator=g)
    torch.manual_seed(seed)
    student = torch.nn.Linear(48, 32)
    crd = CRDLoss(32, 48, n_data, feat_dim=32, nce_k=1024, nce_t=0.07, normaliser="ema", z_momentum=0.0, seed=seed, **BANK_KINDS[kind])
    opt = torch.optim.SGD([*student.parameters(), *crd.parameters()], lr=0.1, momentum=0.9)
    with torch.no_grad():
        for rows in torch.arange(n_data).split(256):
            crd.warm_start(student(x_s[rows]), x_t[rows], rows)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, n_data, (64,), generator=order)
        loss = crd(student(x_s[rows]), x_t[rows], rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held_out = torch.arange(n_data, n_data + 1000)
        v_s, v_t = crd.embed_s(student(x_s[held_out])), crd.embed_t(x_t[held_out])
        top1 = float((torch.nn.functional.normalize(v_s, dim=1) @ torch.nn.functional.normalize(v_t, dim=1).T).argmax(1).eq(torch.arange(1000)).float().mean())
    return {"loss": float(loss.detach()), "top1": top1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[5_000, 50_000, 105_000, 1_281_167])
    parser.add_argument("--banks", type=int, nargs="*", default=[50_000, 1_281_167, 17_000_000],
                        help="N of table 2 (none: skip it)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per run; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scoring", default="auto", choices=["auto", "full", "gather"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of table 3 (0: skip it)")
    parser.add_argument("--child", choices=["xmodal", "plain", *BANK_KINDS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.n[0], args.steps, args.device, args.scoring)))
        return
    from losses.contrast.scoring import choose_scoring

    bandwidth = read_bandwidth(args.device)
    floor_s = exact_floor_bytes() / bandwidth
    print(f"B={B} K={K} feat_dim={FEAT} device={args.device} threads={torch.get_num_threads()} steps={args.steps}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; exact route's floor: {exact_floor_bytes() / 2**20:.0f} MiB "
          f"of selected rows per step = {floor_s:.4f} s")
    print("x floor: xmodal's step over the floor; rows s: one scattered read of the selected rows of both banks "
          "(embedding_bag), the floor at the rate this machine reads scattered rows; x rows: the step over it")
    header = f"{'N':>9} {'route':>6} {'xmodal s':>9} {'(min-max)':>13} {'plain s':>9} {'speed-up':>8} {'x floor':>7} {'rows s':>7} {'x rows':>6} {'xmodal MiB':>10} {'plain MiB':>10} {'mem ratio':>9} {'loss rel diff':>13} {'sampler s':>9}"
    print(header)
    plain_s = {}
    for n_data in args.n:
        ours = _measure("xmodal", n_data, args.steps, args.device, args.scoring)
        plain = _measure("plain", n_data, args.steps, args.device, args.scoring)
        plain_s[n_data] = plain["step_s"]
        rel = abs(ours["loss"] - plain["loss"]) / abs(plain["loss"])
        sampler = _sampler_seconds(n_data, args.device)
        route = choose_scoring(args.scoring, n_data, K)
        print(
            f"{n_data:>9} {route:>6} {ours['step_s']:>9.4f} {ours['min_s']:>6.3f}-{ours['max_s']:<6.3f} {plain['step_s']:>9.4f} "
            f"{plain['step_s'] / ours['step_s']:>7.1f}x {ours['step_s'] / floor_s:>6.1f}x {ours['row_read_s']:>7.4f} "
            f"{ours['step_s'] / ours['row_read_s']:>5.1f}x {ours['peak_mib']:>10.1f} {plain['peak_mib']:>10.1f} "
            f"{plain['peak_mib'] / max(ours['peak_mib'], 0.1):>8.1f}x {rel:>13.2e} "
            f"{'n/a (K>N-1)' if sampler is None else f'{sampler:.4f}':>9}",
            flush=True,
        )
    if args.banks:
        print(f"\nbank kinds (the critic draws its own negatives; 'vs plain': the plain formulation's step at that N "
              f"over this one; 'x floor': this step over the exact route's floor, {floor_s:.4f} s)")
        print(f"{'N':>10} {'bank':>7} {'held MiB':>9} {'step s':>8} {'vs plain':>8} {'x floor':>7} {'peak MiB':>9}")
        for n_data in args.banks:
            full_bytes = 2 * n_data * FEAT * 4
            for kind in BANK_KINDS:
                if kind != "queue" and full_bytes > _memory_available() / 2:
                    print(f"{n_data:>10} {kind:>7} {full_bytes / 2**20:>9.0f} {'not allocated: the banks exceed half the free memory':>30}", flush=True)
                    continue
                row = _measure(kind, n_data, args.steps, args.device, args.scoring)
                versus = f"{plain_s[n_data] / row['step_s']:.1f}x" if n_data in plain_s else "-"
                print(f"{n_data:>10} {kind:>7} {row['held_mib']:>9.1f} {row['step_s']:>8.4f} {versus:>8} "
                      f"{row['step_s'] / floor_s:>6.1f}x {row['peak_mib']:>9.1f}", flush=True)
    if args.seeds:
        print(f"\nsmall run, {args.seeds} seeds (N = 4096, K = 1024, 600 steps): mean +- sd")
        print(f"{'bank':>7} {'final loss':>16} {'retrieval top-1':>18}")
        for kind in BANK_KINDS:
            runs = [small_run(kind, seed) for seed in range(args.seeds)]
            loss = [r["loss"] for r in runs]
            top1 = [100 * r["top1"] for r in runs]
            sd = statistics.stdev if len(runs) > 1 else (lambda _v: 0.0)
            print(f"{kind:>7} {statistics.mean(loss):>9.3f} +- {sd(loss):<5.3f} {statistics.mean(top1):>10.2f} +- {sd(top1):<5.2f}", flush=True)


if __name__ == "__main__":
    main()
