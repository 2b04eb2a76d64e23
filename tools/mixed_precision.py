"""bf16 autocast against fp32, seed by seed: the Lab recipe's distillation and linear probe.

For every seed, three runs of the same command (docs/notes/mixed-precision-cpu-study.md):

* ``no``   fp32 (two threads on this machine),
* ``bf16`` ``mixed_precision=bf16``,
* ``t1``   fp32 again with ``OMP_NUM_THREADS=1``: the same maths summed in another order, the
  yardstick for how far fp32 moves from itself.

Runs whose ``report.json`` exists are read, not rerun, after checking that they ran this command
(seed, precision, method, epochs); a folder holding another run is an error. Prints one row per
seed, then for bf16 - fp32 and 1 thread - 2 threads: mean, median, standard deviation, mean
|difference|, how many seeds differ by more than 1 point, how many are below / above / equal, and
a 95 % bootstrap interval of the mean over seeds; then whether bf16 - fp32 is shown within
``--margin`` points (two one-sided tests on the mean, with the seeds a decision would need);
with ``--against PREFIX``, the bf16 runs set against PREFIX's bf16 runs of the same seeds (a
variant's runs against plain bf16, sharing the fp32 runs). ``--fp32-stem student|both`` makes the bf16 runs keep the
student's stem, or the student's and the teacher's, in fp32 (``student.fp32_stem=true``,
``teacher.model.fp32_stem=true``), and checks that the runs read did. ``--cpu-bf16-convs
emulated|native`` makes the bf16 runs run their convolutions as bf16 kernels would on float32
kernels, or through PyTorch's own bf16 kernels (``cpu_bf16_convs=...``; xmodal/precision.py),
and checks that the runs read did; without it the bf16 runs read must all have run one way
(reports from before the key existed ran PyTorch's kernels: ``native``). Draws
the differences per seed to ``--plot``.

``--reprobe`` splits bf16's effect between the distillation and the probe's feature pass: each
fp32 run's student is probed again with features extracted under bf16 autocast, and each bf16
run's student with features extracted in fp32 (one worker process per precision; the results are
kept beside each run in ``reprobe-<precision>.json``, keyed by the student checkpoint's sha256).
As a check that the worker rebuilds the run's probe faithfully, every fp32 run's student is also
probed in fp32 again and must reproduce its report's figure.

    python tools/mixed_precision.py --seeds 0-19 [--runs runs] [--report-only] [--reprobe]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple, Optional

import torch

PRECISIONS = {"no": ("no", None), "bf16": ("bf16", None), "t1": ("no", "1")}


def parse_seeds(text: str) -> list[int]:
    """``"0-4,7"`` -> ``[0, 1, 2, 3, 4, 7]``."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


def command(out: Path, seed: int, precision: str, args: argparse.Namespace) -> list[str]:
    student, teacher = wants_fp32_stem(precision, args)
    stem = ["student.fp32_stem=true"] * student + ["teacher.model.fp32_stem=true"] * teacher
    return [sys.executable, "-m", "xmodal", "run", "lab-color-transfer", f"output_dir={out}", f"seed={seed}",
            f"mixed_precision={precision}", f"teacher.checkpoint={args.teacher}",
            f"distill.methods=[{args.method}]", f"distill.train.epochs={args.epochs}", "protocols=[linear_probe]", *stem,
            *(["cpu=true"] if args.cpu else []),
            *([f"cpu_bf16_convs={args.cpu_bf16_convs}"] if precision == "bf16" and args.cpu_bf16_convs else [])]


def wants_fp32_stem(precision: str, args: argparse.Namespace) -> tuple[bool, bool]:
    """(student's, teacher's) stem in fp32 for this run. ``--fp32-stem`` applies to the bf16 runs:
    in fp32 a stem computes the same either way (tests/models/test_fp32_stem.py), so a variant
    shares the plain fp32 runs. ``both`` keeps every staged backbone's stem in fp32: the student's
    and the frozen teacher's it distils from."""
    if precision != "bf16" or not args.fp32_stem:
        return False, False
    return True, args.fp32_stem == "both"


# A run folder made with a source patch instead of config keys holds it under this name; such a
# folder is read as an fp32-stem run.
SCRATCH_STEM_PATCH = "EXPERIMENT-fp32stem.patch"


class Run(NamedTuple):
    top1: float
    seconds: float
    threads: Optional[int]  # None: a report from before xmodal recorded them
    teacher_sha256: Optional[str]  # likewise
    convs: Optional[str]  # a bf16 CPU run's convolutions, "emulated" or "native"; None for the others


def ran_convs(report: dict) -> Optional[str]:
    """Which bf16 convolutions a CPU bf16 run ran: its report's ``cpu_bf16_convs``; a report
    from before that key existed ran PyTorch's own kernels (``native``). None for fp32, GPU runs."""
    if report["config"]["mixed_precision"] != "bf16" or not str(report.get("device", "cpu")).startswith("cpu"):
        return None
    return report.get("cpu_bf16_convs", "native")


def read_run(out: Path, seed: int, precision: str, args: argparse.Namespace,
             fp32_stem: Optional[tuple[bool, bool]] = None, threads: Optional[int] = None,
             convs: Optional[str] = None) -> Run:
    """The run's probe top-1, wall seconds, intra-op threads, teacher file's sha256 and bf16
    convolutions, after checking the folder holds this command's run (``fp32_stem``: the
    (student, teacher) stems it must have kept in fp32; ``threads``: the threads it must have
    run with, where its report says; ``convs``: a bf16 run's convolutions, ``emulated`` or
    ``native``; None: whichever)."""
    report = json.loads((out / "report.json").read_text())
    cfg = report["config"]
    # The teacher path may be written relative or absolute: its last two parts must agree.
    teacher = Path(cfg["teacher"]["checkpoint"] or "").parts[-2:]
    scratch = (out / SCRATCH_STEM_PATCH).exists()
    stem = (bool(cfg["student"].get("fp32_stem", False)) or scratch,
            bool(cfg["teacher"]["model"].get("fp32_stem", False)) or scratch)
    found = (cfg["seed"], cfg["mixed_precision"], cfg["distill"]["methods"], cfg["distill"]["train"]["epochs"], teacher, stem)
    wanted = (seed, precision, [args.method], args.epochs, args.teacher.parts[-2:], stem if fp32_stem is None else fp32_stem)
    if found != wanted:
        raise SystemExit(f"{out}: holds a run of (seed, mixed_precision, methods, epochs, teacher, fp32 stems of "
                         f"student and teacher) = {found}, "
                         f"not {wanted}; choose another --runs or --prefix")
    if convs is not None and precision == "bf16" and ran_convs(report) != convs:
        raise SystemExit(f"{out}: its bf16 convolutions ran {ran_convs(report)}, not {convs}; choose another "
                         "--runs or --prefix, or the --cpu-bf16-convs it ran with")
    if args.cpu and not cfg.get("cpu"):
        raise SystemExit(f"{out}: a run without cpu=true, where --cpu asks for CPU runs only")
    ran_with = report.get("threads")
    if threads is not None and ran_with is not None and ran_with != threads:
        raise SystemExit(f"{out}: ran with {ran_with} threads, not {threads}; choose another --runs or --prefix, "
                         "or the --threads it ran with")
    (row,) = [r for r in report["results"] if r["method"] == args.method and r["protocol"] == "linear_probe"]
    # top-1 is a count over the test set in percent, stored as float32: 2 decimals are exact
    # for up to 10,000 test images, and keep "1.00 points apart" from reading as beyond 1.
    return Run(round(float(row["value"]), 2), float(report["timings"]["total"]), ran_with,
               report["teacher"].get("checkpoint_sha256"), ran_convs(report))


def run_dir(args: argparse.Namespace, tag: str, seed: int) -> Path:
    return args.runs / f"{args.prefix}-{tag}-s{seed}"


def make_runs(todo: list[tuple[int, str]], args: argparse.Namespace) -> None:
    """Run the (seed, tag) runs in ``todo``, ``args.jobs`` at a time, each with ``args.threads``
    intra-op threads (the one-thread yardstick with one; unset: torch's default, which is every
    core). With one job at a time a run's progress bars show on stderr; with more, each run's
    output goes to ``<runs>/<folder>.log`` and a line per finished run gives the count, the time
    gone and an estimate of the time left. A failed run does not stop the others: they finish
    and are kept (the next call reads them), then the failures are named and the script exits."""
    if not todo:
        return
    args.runs.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def one(seed: int, tag: str) -> tuple[int, Optional[Path]]:
        precision, single = PRECISIONS[tag]
        out = run_dir(args, tag, seed)
        env = dict(os.environ)
        threads = single or (str(args.threads) if args.threads else None)
        if threads:
            env["OMP_NUM_THREADS"] = threads
        else:
            env.pop("OMP_NUM_THREADS", None)
        if args.jobs == 1:
            print(f"[mixed_precision] seed {seed} {tag}: running", file=sys.stderr, flush=True)
            return subprocess.run(command(out, seed, precision, args), env=env, stdout=subprocess.DEVNULL).returncode, None
        log = args.runs / f"{out.name}.log"
        with open(log, "w") as sink:
            code = subprocess.run(command(out, seed, precision, args), env=env, stdout=sink, stderr=subprocess.STDOUT)
        return code.returncode, log

    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(one, seed, tag): (seed, tag) for seed, tag in todo}
        for done, future in enumerate(as_completed(futures), 1):
            (seed, tag), (code, log) = futures[future], future.result()
            gone = time.perf_counter() - began
            status = "done" if code == 0 else f"FAILED with exit code {code}" + (f" (output: {log})" if log else "")
            print(f"[mixed_precision] {done}/{len(todo)} seed {seed} {tag}: {status}; {gone / 60:.1f} min gone, "
                  f"about {gone / done * (len(todo) - done) / 60:.1f} min left", file=sys.stderr, flush=True)
            if code:
                failed.append(f"seed {seed} {tag} (exit {code}" + (f", {log})" if log else ")"))
    if failed:
        raise SystemExit(f"{len(failed)} of {len(todo)} runs failed: {', '.join(failed)}; the runs that finished "
                         "are kept and the next call reads them")


RECORDED_HEADER = "| seed | fp32 | fp32, 1 thread | bf16 |"


def recorded_pairs(doc: Path) -> dict[int, float]:
    """bf16 - fp32 per seed from the first table of ``doc`` headed ``RECORDED_HEADER`` (the table
    docs/notes/mixed-precision-cpu-study.md keeps of runs no longer on disk)."""
    import re

    text = doc.read_text()
    if RECORDED_HEADER not in text:
        raise SystemExit(f"--recorded {doc}: no table headed {RECORDED_HEADER!r}")
    table = text[text.index(RECORDED_HEADER):].split("\n\n")[0]
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| [^|]+ \| ([\d.]+) \|", table, re.M)
    return {int(seed): round(float(bf16) - float(fp32), 2) for seed, fp32, bf16 in rows}


def check_one_teacher(teachers: dict[Path, Optional[str]]) -> None:
    """Refuse to compare runs that learnt from different teacher files (the path alone, checked
    by ``read_run``, does not say: a teacher retrained on other code lands at the same path).
    Reports from before xmodal recorded the file's sha256 (None) cannot be checked."""
    first: dict[str, Path] = {}
    for run, sha in teachers.items():
        if sha:
            first.setdefault(sha, run)
    if len(first) > 1:
        raise SystemExit("these runs learnt from different teacher files: "
                         + "; ".join(f"{run} from sha256 {sha[:12]}" for sha, run in first.items()))


def probe_worker(precision: str, runs: list[Path]) -> None:
    """Print one JSON line per run: its distilled student's probe top-1 with features under ``precision``.

    Rebuilds the run's probe from its ``report.json`` (config) and its distillation stage's
    ``final.pt`` with the pieces ``run_transfer`` uses: the same splits, student, view, probe
    config and probe seed.
    """
    import tempfile

    from xmodal.config import from_dict
    from xmodal.engine import Engine
    from xmodal.modalities import modality_from_config, view_fn
    from xmodal.models.checkpoint import read_checkpoint
    from xmodal.tasks.linear_probe import linear_probe
    from xmodal.data.subset import open_split
    from xmodal.tasks.transfer import TransferConfig, build_student

    # "bf16-native" / "bf16-emulated": bf16 with that kind of convolutions (a CPU table's kind)
    mixed, _, convs = precision.partition("-")
    engine = Engine(Path(tempfile.mkdtemp(prefix="reprobe-")), mixed_precision=mixed, log=False, num_workers=0,
                    cpu_bf16_convs=convs or "auto")
    for run in runs:
        cfg = from_dict(TransferConfig, json.loads((run / "report.json").read_text())["config"])
        (method,) = cfg.distill.methods
        modality = modality_from_config(cfg.modality)
        d = cfg.data
        train = open_split(d, d.probe_train, cfg.seed, augment=False, labeled=True, role="probe_train")
        test = open_split(d, d.probe_test, cfg.seed, augment=False, labeled=True, role="probe_test")
        teacher_classes = int(read_checkpoint(cfg.teacher.checkpoint, role="teacher")["num_classes"])
        student = build_student(cfg, modality, method, teacher_classes)
        # The stage's final.pt holds the whole distillation module; the student is its "student." part.
        state = torch.load(student_checkpoint(run, method), map_location="cpu", weights_only=True)
        student.load_state_dict({k[len("student."):]: t for k, t in state.items() if k.startswith("student.")})
        top1 = linear_probe(engine, student, train, test, view_fn(modality, modality.student_view),
                            len(train.classes), cfg.linear_probe, seed=cfg.seed, name=f"reprobe {run.name}")["top1"]
        print(json.dumps({"run": str(run), "top1": round(float(top1), 2)}), flush=True)


def student_checkpoint(run: Path, method: str) -> Path:
    """The weights the run's distillation of ``method`` ended with (Engine.run writes them)."""
    from xmodal.engine import FINAL

    return run / "stages" / f"distill-{method}" / FINAL


def compare_runs(a: Path, b: Path, method: str) -> None:
    """Print whether two runs' distillation ended with the same weights, and both probes."""
    first, second = (torch.load(student_checkpoint(run, method), map_location="cpu", weights_only=True) for run in (a, b))
    if list(first) != list(second):
        raise SystemExit(f"{a} and {b}: their {method} distillations hold different tensors")
    gap = max(float((first[k].double() - second[k].double()).abs().max()) for k in first if first[k].numel())
    probes = [[r["value"] for r in json.loads((run / "report.json").read_text())["results"]
               if r["method"] == method and r["protocol"] == "linear_probe"][0] for run in (a, b)]
    print(f"{a.name} vs {b.name}: same tensor names, largest weight difference {gap:.3g}, "
          f"probe top-1 {probes[0]:.2f} / {probes[1]:.2f}")


@functools.lru_cache(maxsize=None)
def sha256(path: Path) -> str:
    from xmodal.models.checkpoint import checkpoint_sha256

    return checkpoint_sha256(path)


def reprobe(runs: list[Path], precision: str, method: str) -> dict[Path, float]:
    """Probe top-1 of each run's student with features under ``precision`` (``no``, ``bf16``, or
    ``bf16-native`` / ``bf16-emulated`` on the CPU), cached beside the run under that name."""
    found: dict[Path, float] = {}
    todo = []
    for run in runs:
        cache = run / f"reprobe-{precision}.json"
        kept = json.loads(cache.read_text()) if cache.exists() else {}
        if kept.get("sha256") == sha256(student_checkpoint(run, method)):
            found[run] = kept["top1"]
        else:
            todo.append(run)
    if todo:
        print(f"[mixed_precision] probing {len(todo)} students with features in {precision}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--probe-worker", precision, *map(str, todo)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                run = Path(row["run"])
                row.update(precision=precision, sha256=sha256(student_checkpoint(run, method)))
                (run / f"reprobe-{precision}.json").write_text(json.dumps(row) + "\n")
                found[run] = row["top1"]
    return found


def bootstrap_interval(d: torch.Tensor, level: float, resamples: int = 10_000) -> tuple[float, float]:
    """Central ``level`` percentile interval of the mean of ``d`` over resamples (fixed generator)."""
    g = torch.Generator().manual_seed(0)
    means = d[torch.randint(len(d), (resamples, len(d)), generator=g)].mean(1)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, tails).tolist()
    return lo, hi


def summary(diffs: list[float], resamples: int = 10_000) -> str:
    """Mean, median, standard deviation, mean |d|, count beyond 1 point, signs and a bootstrap 95 %
    interval of the mean."""
    d = torch.tensor(diffs, dtype=torch.float64)
    lo, hi = bootstrap_interval(d, 0.95, resamples)
    median = float(torch.quantile(d, 0.5))  # torch.median would give the lower middle value
    sd = f"{d.std():.2f}" if len(d) > 1 else "-"
    return (f"n {len(d)}  mean {d.mean():+.2f}  median {median:+.2f}  sd {sd}  mean|d| {d.abs().mean():.2f}  "
            f"|d|>1: {int((d.abs().round(decimals=2) > 1).sum())}  below/above/equal {int((d < 0).sum())}/"
            f"{int((d > 0).sum())}/{int((d == 0).sum())}  95% bootstrap of the mean [{lo:+.2f}, {hi:+.2f}]")


def equivalence(diffs: list[float], margin: float = 1.0, resamples: int = 10_000) -> dict:
    """Is the mean difference within ``±margin``? Two one-sided tests at 5 % (TOST).

    Equivalence is shown when the 90 % interval of the mean lies inside ``(-margin, margin)``; a
    difference beyond the margin is shown when the 95 % interval lies wholly outside it. The
    interval is Student's t (``mean ± t(0.95, n-1) sd / sqrt(n)``); the bootstrap 90 % interval
    (percentiles of resampled means, as in ``summary``) is returned beside it as a second
    formulation. ``seeds`` is how many seeds would make the t half-width fit between the mean and
    the margin at this mean and sd (normal approximation; ``None`` when ``|mean| >= margin``).
    """
    import math

    from scipy import stats

    d = torch.tensor(diffs, dtype=torch.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"equivalence needs at least 2 differences, got {n}")
    mean, sd = float(d.mean()), float(d.std())
    half = {level: float(stats.t.ppf(level, n - 1)) * sd / math.sqrt(n) for level in (0.95, 0.975)}
    boot = bootstrap_interval(d, 0.90, resamples)
    t90 = (mean - half[0.95], mean + half[0.95])
    t95 = (mean - half[0.975], mean + half[0.975])
    if -margin < t90[0] and t90[1] < margin:
        verdict = "within"
    elif t95[0] > margin or t95[1] < -margin:
        verdict = "beyond"
    else:
        verdict = "undecided"
    room = margin - abs(mean)
    seeds = math.ceil((stats.norm.ppf(0.95) * sd / room) ** 2) if room > 0 else None
    return {"n": n, "mean": mean, "sd": sd, "t90": t90, "t95": t95, "bootstrap90": boot,
            "verdict": verdict, "seeds": seeds, "margin": margin}


def format_equivalence(e: dict) -> str:
    words = {"within": f"shown within ±{e['margin']:g} point",
             "beyond": f"shown beyond {e['margin']:g} point (95% t interval outside the margin)",
             "undecided": "undecided"}
    need = (f"if mean and sd held, about {e['seeds']} seeds would show it within" if e["seeds"]
            else f"|mean| is not below {e['margin']:g}: at this mean no number of seeds shows it within")
    return (f"equivalence at ±{e['margin']:g} (two one-sided tests, 5%): 90% t interval of the mean "
            f"[{e['t90'][0]:+.2f}, {e['t90'][1]:+.2f}], bootstrap [{e['bootstrap90'][0]:+.2f}, "
            f"{e['bootstrap90'][1]:+.2f}] -> {words[e['verdict']]}; {need}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="mpinfo", help="run folders are <runs>/<prefix>-<no|bf16|t1>-s<seed>")
    parser.add_argument("--teacher", type=Path, default=Path("runs/lab-color-transfer/teacher.safetensors"),
                        help="the default run's exported teacher (xmodal run lab-color-transfer)")
    parser.add_argument("--method", default="infonce_warm")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--report-only", action="store_true", help="read the runs that exist; start none")
    parser.add_argument("--no-one-thread", action="store_true", help="start only the fp32 and bf16 runs")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (a machine with many cores: cores / --threads); each run's output "
                             "then goes to <runs>/<folder>.log")
    parser.add_argument("--cpu", action="store_true",
                        help="runs with cpu=true: on the CPU where a GPU is present (a GPU machine's cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the fp32 and bf16 runs (default: torch's, every core); runs "
                             "read must have recorded this count")
    parser.add_argument("--recorded", type=Path, default=None, metavar="DOC",
                        help="also pool the bf16 - fp32 pairs of DOC's first per-seed table (e.g. "
                             "docs/notes/mixed-precision-cpu-study.md: seeds 0-39, runs no longer on disk) with the runs read")
    parser.add_argument("--plot", type=Path, default=None, help="default: <runs>/<prefix>.png")
    parser.add_argument("--margin", type=float, default=1.0, help="equivalence margin in points")
    parser.add_argument("--against", metavar="PREFIX", default=None,
                        help="also set this prefix's bf16 runs against PREFIX's bf16 runs of the same seeds")
    parser.add_argument("--fp32-stem", choices=["student", "both"], default=None,
                        help="bf16 runs keep the student's stem in fp32 (student.fp32_stem=true), or the "
                             "student's and the teacher's (both)")
    parser.add_argument("--cpu-bf16-convs", choices=["emulated", "native"], default=None,
                        help="bf16 runs with cpu_bf16_convs=emulated (bf16 numerics on float32 kernels) or native "
                             "(PyTorch's bf16 kernels); default: the recipe's auto, and runs read all of one kind")
    parser.add_argument("--reprobe", action="store_true",
                        help="also probe fp32 students with bf16 features and bf16 students with fp32 features")
    parser.add_argument("--same-run", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"),
                        help="only compare two run folders: largest difference of their distilled students' "
                             "weights and their probe top-1 (e.g. a config key against a scratch patch)")
    parser.add_argument("--probe-worker", nargs="+", metavar=("PRECISION", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_worker:
        probe_worker(args.probe_worker[0], [Path(r) for r in args.probe_worker[1:]])
        return
    if args.same_run:
        compare_runs(*args.same_run, args.method)
        return
    seeds = parse_seeds(args.seeds)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit(f"--jobs {args.jobs} --threads {args.threads}: both must be at least 1")
    if args.jobs > 1 and args.threads is None:
        raise SystemExit(f"--jobs {args.jobs} needs --threads: {args.jobs} runs each on every core would "
                         "fight for them (e.g. --threads 2 with cores / 2 jobs)")
    if not args.report_only and not args.teacher.is_file():
        raise SystemExit(f"--teacher {args.teacher}: no such file; run `xmodal run lab-color-transfer` first, "
                         "or point --teacher at its runs/lab-color-transfer/teacher.safetensors")

    run = functools.partial(run_dir, args)
    if not args.report_only:
        make_runs([(s, tag) for s in seeds for tag in PRECISIONS
                   if not (run(tag, s) / "report.json").exists() and not (tag == "t1" and args.no_one_thread)], args)

    top1: dict[str, dict[int, float]] = {tag: {} for tag in PRECISIONS}
    seconds: dict[str, list[float]] = {tag: [] for tag in PRECISIONS}
    threads_of: dict[str, set] = {tag: set() for tag in PRECISIONS}
    teachers: dict[Path, Optional[str]] = {}
    convs_of: dict[Optional[str], Path] = {}  # the bf16 runs' convolutions: the first run of each kind
    for seed in seeds:
        for tag, (precision, one) in PRECISIONS.items():
            if (run(tag, seed) / "report.json").exists():
                got = read_run(run(tag, seed), seed, precision, args, wants_fp32_stem(precision, args),
                               1 if one else args.threads, args.cpu_bf16_convs)
                top1[tag][seed] = got.top1
                seconds[tag].append(got.seconds)
                threads_of[tag].add(got.threads)
                teachers[run(tag, seed)] = got.teacher_sha256
                if tag == "bf16":
                    convs_of.setdefault(got.convs, run(tag, seed))
    if len(convs_of) > 1:
        raise SystemExit("the bf16 runs read ran different convolutions: " + "; ".join(
            f"{path} {kind}" for kind, path in convs_of.items()) + "; give --cpu-bf16-convs to name the one to read")
    other: dict[int, float] = {}  # --against: that prefix's bf16 runs of the seeds paired here
    other_convs: set = set()  # ... and their convolutions, named in the header
    if args.against:
        for s in seeds:
            path = args.runs / f"{args.against}-bf16-s{s}"
            if s in top1["bf16"] and s in top1["no"] and (path / "report.json").exists():
                got = read_run(path, s, "bf16", args)
                other[s], teachers[path] = got.top1, got.teacher_sha256
                other_convs.add(got.convs)
    if args.teacher.is_file():  # the file named now must be the one the runs learnt from
        from xmodal.models.checkpoint import checkpoint_sha256

        teachers[args.teacher] = checkpoint_sha256(args.teacher)
    check_one_teacher(teachers)
    # fp32 and bf16 runs must have summed with the same threads (the yardstick is the 1-thread run).
    counts = (threads_of["no"] | threads_of["bf16"]) - {None}
    if len(counts) > 1:
        raise SystemExit(f"the fp32 and bf16 runs under {args.runs}/{args.prefix}-* ran with different thread "
                         f"counts {sorted(counts)}; give --threads to name the one to read")
    many = f"{min(counts)}" if counts and None not in threads_of["no"] else "n"

    # Each kind of pair against the fp32 run of the same seed, computed once for table, summary and plot.
    diffs = {tag: {s: top1[tag][s] - top1["no"][s] for s in seeds if s in top1[tag] and s in top1["no"]}
             for tag in ("bf16", "t1")}
    cell = lambda table, s, spec: format(table[s], spec) if s in table else "-"  # noqa: E731
    kind = "".join(f", bf16 convolutions {k}" for k in convs_of if k)
    print(f"{args.method}, {args.epochs} epochs, linear probe top-1 (runs under {args.runs}/{args.prefix}-*{kind})")
    print(f"{'seed':>4s} {'fp32':>7s} {'1 thread':>9s} {'bf16':>7s} {'bf16-fp32':>10s} {f'1t-{many}t':>7s}")
    for s in seeds:
        print(f"{s:>4d} {cell(top1['no'], s, '.2f'):>7s} {cell(top1['t1'], s, '.2f'):>9s} "
              f"{cell(top1['bf16'], s, '.2f'):>7s} {cell(diffs['bf16'], s, '+.2f'):>10s} {cell(diffs['t1'], s, '+.2f'):>7s}")
    # The yardstick's name says what the fp32 runs' reports recorded (n: reports from before they did).
    for tag, name in (("bf16", "bf16 - fp32"), ("t1", f"1 thread - {many} threads")):
        print(f"{name:22s} {summary(list(diffs[tag].values())) if diffs[tag] else 'no pairs'}")
    if len(diffs["bf16"]) > 1:
        print("bf16 - fp32 " + format_equivalence(equivalence(list(diffs["bf16"].values()), args.margin)))
    if args.recorded:
        if "emulated" in convs_of:  # the recorded table's bf16 runs predate the key: PyTorch's own kernels
            raise SystemExit(f"--recorded {args.recorded}: its bf16 runs ran PyTorch's own (native) convolutions, "
                             "the runs read emulated ones; pool runs of one kind")
        kept = recorded_pairs(args.recorded)
        both = sorted(set(kept) & set(diffs["bf16"]))
        if both:
            raise SystemExit(f"--recorded {args.recorded} and the runs read both hold seeds {both}: pool disjoint seeds")
        pooled = [*kept.values(), *diffs["bf16"].values()]
        print(f"with the {len(kept)} seeds recorded in {args.recorded} ({min(kept)}-{max(kept)}; bf16 convolutions "
              "native), bf16 - fp32:")
        print(f"    recorded   {summary(list(kept.values()))}")
        print(f"    all        {summary(pooled)}")
        print("    all " + format_equivalence(equivalence(pooled, args.margin)))
    if args.against:
        missing = (f" ({len(diffs['bf16']) - len(other)} of these seeds have no {args.against} bf16 run)"
                   if len(other) < len(diffs["bf16"]) else "")
        kinds = "".join(f", bf16 convolutions {k}" for k in sorted(other_convs - {None}))
        print(f"against {args.against}{kinds}: bf16 - fp32 of its runs on the same seeds, then bf16 ({args.prefix}) - "
              f"bf16 ({args.against}){missing}")
        print(f"    {summary([other[s] - top1['no'][s] for s in other])}")
        print(f"    {summary([top1['bf16'][s] - other[s] for s in other])}")
    print("mean wall seconds per run (report.json timings.total): " + ", ".join(
        f"{tag} {sum(s) / len(s):.0f} s" for tag, s in seconds.items() if s))
    if args.reprobe:
        report_reprobe(args, top1, [s for s in seeds if s in diffs["bf16"]], next(iter(convs_of), None))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4))
    for dx, tag, label in ((-0.15, "bf16", "bf16 - fp32"), (0.15, "t1", f"fp32 1 thread - fp32 {many} threads")):
        ax.bar([s + dx for s in diffs[tag]], list(diffs[tag].values()), width=0.3, label=label)
    ax.axhspan(-1, 1, color="0.9", zorder=0, label="within 1 point")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("seed")
    ax.set_ylabel("linear-probe top-1 difference (points)")
    ax.set_title(f"{args.method}, {args.epochs} epochs: precision and summation order against fp32")
    ax.legend(fontsize=8)
    plot = args.plot or args.runs / f"{args.prefix}.png"
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    print(f"plot: {plot}")


def report_reprobe(args: argparse.Namespace, top1: dict[str, dict[int, float]], seeds: list[int],
                   convs: Optional[str]) -> None:
    """Split bf16 - fp32 into what the distillation changed and what the probe's feature pass
    changed (``convs``: the bf16 runs' convolutions, which the bf16 feature pass uses too)."""
    run = functools.partial(run_dir, args)
    fp32_students = {s: run("no", s) for s in seeds}
    bf16_students = {s: run("bf16", s) for s in seeds}
    again = reprobe(list(fp32_students.values()), "no", args.method)
    in_bf16 = reprobe(list(fp32_students.values()), f"bf16-{convs}" if convs else "bf16", args.method)
    in_fp32 = reprobe(list(bf16_students.values()), "no", args.method)
    same = sum(again[fp32_students[s]] == top1["no"][s] for s in seeds)
    print(f"reprobe: fp32 students probed in fp32 again reproduce their reports on {same} of {len(seeds)} seeds")
    print(f"{'seed':>4s} {'fp32':>7s} {'bf16':>7s} {'fp32 st., bf16 feats':>21s} {'bf16 st., fp32 feats':>21s}")
    for s in seeds:
        print(f"{s:>4d} {top1['no'][s]:>7.2f} {top1['bf16'][s]:>7.2f} {in_bf16[fp32_students[s]]:>21.2f} "
              f"{in_fp32[bf16_students[s]]:>21.2f}")
    rows = (("distillation: bf16 - fp32 students, both probed in fp32",
             [in_fp32[bf16_students[s]] - top1["no"][s] for s in seeds]),
            ("probe features: bf16 - fp32, fp32 students", [in_bf16[fp32_students[s]] - top1["no"][s] for s in seeds]),
            ("probe features: bf16 - fp32, bf16 students", [top1["bf16"][s] - in_fp32[bf16_students[s]] for s in seeds]))
    for name, d in rows:
        print(f"{name}\n    {summary(d)}")


if __name__ == "__main__":
    main()
