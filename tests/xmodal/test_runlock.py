"""One run at a time per output folder; a lock left by a dead process is no lock."""
from __future__ import annotations

import subprocess
import sys

import pytest

from xmodal.cli import main
from xmodal.runlock import LOCK_NAME, OutputLock

TINY = [
    "data.options={num_samples: 64}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
    "distill.methods=[random]", "linear_probe.epochs=1", "protocols=[linear_probe]",
    "teacher.model.options={width: 4}", "student.options={width: 4}", "data.num_workers=0",
]
HOLD = ("import sys, time; from pathlib import Path; from xmodal.runlock import OutputLock; "
        "lock = OutputLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(120)")


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_is_refused_and_a_dead_holder_frees_it(tmp_path, error_line):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", "lab-color-transfer", f"output_dir={out}", *TINY]) == 2
        message = error_line()
        assert f"output_dir {out} is in use by another xmodal run (pid {holder.pid} on" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its file is still there, its lock is not
    assert (out / LOCK_NAME).exists()
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *TINY]) == 0
    assert not (out / LOCK_NAME).exists() and (out / "report.json").exists()


def test_the_lock_is_exclusive_and_released(tmp_path):
    first, second = OutputLock(tmp_path), OutputLock(tmp_path)
    first.acquire()
    with pytest.raises(Exception, match="is in use by another xmodal run"):
        second.acquire()
    with pytest.raises(Exception, match="is in use by another xmodal run"):
        OutputLock.check(tmp_path)
    first.release()
    OutputLock.check(tmp_path)
    second.acquire()
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()
