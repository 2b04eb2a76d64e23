"""tools/mixed_precision.py's run-maker: several runs at once, each with its thread count, a
failed run named without losing the others, and reports checked for the threads they ran with.

The recipe is replaced by a stand-in command that writes a report of the same shape (its probe
figure derived from the seed) and records when it ran and with which OMP_NUM_THREADS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

FAKE_RUN = r'''
import json, os, sys, time
from pathlib import Path
out, seed, precision = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
began = time.time()
# Rendezvous: wait (up to 5 s) until two runs have started, so that runs meant to overlap do
# however slowly Python starts on a busy machine; a lone run (one job at a time) goes on after 5 s.
started = out.parent / ".started"
started.mkdir(parents=True, exist_ok=True)
(started / out.name).touch()
while len(list(started.iterdir())) < 2 and time.time() - began < 5:
    time.sleep(0.02)
time.sleep(0.2)
print("progress of", out.name, file=sys.stderr)
if seed == 13:
    sys.exit(3)
out.mkdir(parents=True, exist_ok=True)
threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
report = {"config": {"seed": seed, "mixed_precision": precision, "teacher": {"checkpoint": "runs/x/teacher.pt",
          "model": {}}, "student": {}, "distill": {"methods": ["infonce_warm"], "train": {"epochs": 3}}},
          "results": [{"method": "infonce_warm", "protocol": "linear_probe", "metric": "top1",
                       "value": 40.0 + seed + (0.5 if precision == "bf16" else 0.0)}],
          "timings": {"total": 1.0}, "threads": threads, "teacher": {"checkpoint_sha256": "ab" * 32}}
(out / "report.json").write_text(json.dumps(report))
(out / "span.json").write_text(json.dumps([began, time.time()]))
'''


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(runs=tmp_path / "runs", prefix="mp", teacher=Path("runs/x/teacher.pt"), method="infonce_warm",
                epochs=3, fp32_stem=None, jobs=2, threads=3, cpu=False, cpu_bf16_convs=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture()
def fake(bench, tmp_path, monkeypatch):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    monkeypatch.setattr(bench, "command", lambda out, seed, precision, args: [
        sys.executable, str(script), str(out), str(seed), precision])
    return bench


def test_runs_in_parallel_with_their_threads_and_logs(fake, tmp_path):
    args = _args(tmp_path)
    todo = [(s, tag) for s in (1, 2) for tag in ("no", "bf16", "t1")]
    fake.make_runs(todo, args)
    spans = []
    for seed, tag in todo:
        out = fake.run_dir(args, tag, seed)
        got = fake.read_run(out, seed, fake.PRECISIONS[tag][0], args, threads=1 if tag == "t1" else 3)
        assert got.top1 == 40.0 + seed + (0.5 if tag == "bf16" else 0.0)
        assert got.threads == (1 if tag == "t1" else 3)  # OMP_NUM_THREADS as each run was given it
        assert f"progress of {out.name}" in (args.runs / f"{out.name}.log").read_text()
        spans.append(json.loads((out / "span.json").read_text()))
    # Two at a time: some runs overlap, and no instant is inside three runs.
    starts = sorted(a for a, _ in spans)
    inside = [sum(a <= t < b for a, b in spans) for t in starts]
    assert max(inside) == 2


def test_a_failed_run_is_named_and_the_others_are_kept(fake, tmp_path):
    args = _args(tmp_path)
    with pytest.raises(SystemExit, match=r"1 of 4 runs failed: seed 13 bf16 \(exit 3, .*mp-bf16-s13\.log\)"):
        fake.make_runs([(12, "no"), (12, "bf16"), (13, "bf16"), (14, "no")], args)
    for seed, tag in ((12, "no"), (12, "bf16"), (14, "no")):
        assert (fake.run_dir(args, tag, seed) / "report.json").exists()
    assert "progress of mp-bf16-s13" in (args.runs / "mp-bf16-s13.log").read_text()


def test_a_run_made_with_other_threads_is_refused(fake, tmp_path):
    args = _args(tmp_path, jobs=1)
    fake.make_runs([(5, "no")], args)
    out = fake.run_dir(args, "no", 5)
    with pytest.raises(SystemExit, match="ran with 3 threads, not 2"):
        fake.read_run(out, 5, "no", args, threads=2)
    assert fake.read_run(out, 5, "no", args, threads=None)[0] == 45.0  # no count asked: read as it is


def test_cpu_runs_are_checked(fake, tmp_path):
    args = _args(tmp_path, jobs=1, cpu=True)
    fake.make_runs([(6, "no")], args)
    with pytest.raises(SystemExit, match="a run without cpu=true"):  # the stand-in's config has no cpu key
        fake.read_run(fake.run_dir(args, "no", 6), 6, "no", args)


def test_cpu_runs_are_asked_for(bench, tmp_path):
    args = _args(tmp_path)
    for cpu in (False, True):
        args.cpu = cpu
        assert ("cpu=true" in bench.command(tmp_path, 6, "bf16", args)) == cpu


def test_runs_of_different_teacher_files_are_not_compared(bench, tmp_path):
    same = {tmp_path / "a": "ab" * 32, tmp_path / "b": "ab" * 32, tmp_path / "old": None}
    bench.check_one_teacher(same)  # one file, and a report from before the digest was recorded
    with pytest.raises(SystemExit, match=r"different teacher files: .*a from sha256 abababababab; .*c from sha256 cdcdcdcdcdcd"):
        bench.check_one_teacher({**same, tmp_path / "c": "cd" * 32})


def test_recorded_pairs_read_the_first_per_seed_table_only(bench, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n\n| seed | fp32 | fp32, 1 thread | bf16 | bf16 − fp32 | 1 thread − 2 threads |\n"
                   "|---|---|---|---|---|---|\n| 0 | 50.30 | 49.20 | 50.60 | +0.30 | −1.10 |\n"
                   "| 3 | 44.80 | — | 47.05 | +2.25 | — |\n\ntext\n\n"
                   "| seed | fp32 | fp32, 1 thread | bf16 | bf16 − fp32 | 1 thread − 2 threads |\n"
                   "|---|---|---|---|---|---|\n| 9 | 10.00 | — | 20.00 | +10.00 | — |\n")
    assert bench.recorded_pairs(doc) == {0: 0.30, 3: 2.25}  # bf16 - fp32 from the figures, second table ignored
    doc.write_text("no table here\n")
    with pytest.raises(SystemExit, match="no table headed"):
        bench.recorded_pairs(doc)


def test_bf16_convolutions_are_asked_for_checked_and_never_mixed(fake, tmp_path, monkeypatch, capsys):
    args = _args(tmp_path, jobs=1, cpu_bf16_convs="emulated")
    fake.make_runs([(s, tag) for s in (1, 2) for tag in ("no", "bf16")], args)
    bf16 = fake.run_dir(args, "bf16", 2)
    # The stand-in's reports predate the key: a CPU bf16 run of then ran PyTorch's kernels.
    with pytest.raises(SystemExit, match="its bf16 convolutions ran native, not emulated"):
        fake.read_run(bf16, 2, "bf16", args, convs="emulated")
    assert fake.read_run(bf16, 2, "bf16", args, convs="native").convs == "native"
    assert fake.read_run(fake.run_dir(args, "no", 2), 2, "no", args, convs="emulated").convs is None  # fp32
    report = json.loads((bf16 / "report.json").read_text())
    (bf16 / "report.json").write_text(json.dumps({**report, "cpu_bf16_convs": "emulated"}))
    assert fake.read_run(bf16, 2, "bf16", args, convs="emulated").convs == "emulated"
    # One table never holds bf16 runs of both kinds.
    monkeypatch.setattr(sys, "argv", ["mixed_precision.py", "--seeds", "1-2", "--runs", str(args.runs), "--prefix", "mp",
                                      "--teacher", "runs/x/teacher.pt", "--report-only", "--threads", "3"])
    with pytest.raises(SystemExit, match=r"bf16 runs read ran different convolutions: .*mp-bf16-s1 native; .*mp-bf16-s2 emulated"):
        fake.main()


def test_bf16_convolutions_reach_the_command(bench, tmp_path):
    for convs in (None, "emulated", "native"):
        args = _args(tmp_path, cpu_bf16_convs=convs)
        wanted = [f"cpu_bf16_convs={convs}"] if convs else []
        assert [a for a in bench.command(tmp_path, 6, "bf16", args) if a.startswith("cpu_bf16")] == wanted
        assert not [a for a in bench.command(tmp_path, 6, "no", args) if a.startswith("cpu_bf16")]
