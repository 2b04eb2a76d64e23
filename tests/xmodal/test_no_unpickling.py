"""Nothing xmodal reads is unpickled as code: a crafted pickle planted in every place it reads
(teacher checkpoint, ensemble member, each stage's final and resume checkpoints, a CIFAR batch)
runs nothing, and the run stops with one line and exit 2, leaving every other file as it was.

Each planted file is first shown to run its code under a plain ``torch.load(weights_only=False)``
/ ``pickle.load``, so the tests would fail on a reader that unpickles."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch

from xmodal.cli import main
from xmodal.data.cifar import CIFARDataset
from xmodal.errors import DataError

TINY = [
    "data.options={num_samples: 96}", "teacher.train.epochs=1", "teacher.train.batch_size=32",
    "distill.methods=[random,crd]", "distill.train.epochs=1", "distill.train.batch_size=32",
    "distill.loss_options.crd.nce_k=32", "linear_probe.epochs=2", "protocols=[linear_probe]",
    "student.options={width: 4}", "teacher.model.options={width: 4}", "data.num_workers=0",
]


class _Payload:
    """Unpickling this object calls ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _plant(path: Path, marker: Path, as_torch: bool = True) -> None:
    """A crafted file at ``path`` (torch's zip format, or a bare pickle) that creates ``marker``
    when unpickled; checked to do so under an unsafe load, then the marker is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_torch:
        torch.save({"state_dict": _Payload(marker)}, path)
        torch.load(path, weights_only=False)
    else:
        path.write_bytes(pickle.dumps({"data": _Payload(marker)}, protocol=2))
        pickle.loads(path.read_bytes())
    assert marker.exists(), "the planted file must run code under an unsafe load"
    marker.unlink()


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_planted_teacher_checkpoint_runs_nothing(tmp_path, error_line):
    marker, planted = tmp_path / "ran", tmp_path / "teacher.pt"
    _plant(planted, marker)
    out = tmp_path / "run"
    code = main(["run", "lab-color-transfer", f"output_dir={out}", f"teacher.checkpoint={planted}", *TINY])
    assert code == 2 and not marker.exists()
    assert "teacher checkpoint" in error_line()
    assert not out.exists()


def test_a_planted_ensemble_member_runs_nothing(tmp_path, error_line):
    marker, planted = tmp_path / "ran", tmp_path / "member.pt"
    _plant(planted, marker)
    out = tmp_path / "run"
    code = main(["run", "ensemble-cifar", f"output_dir={out}", "teacher=null",
                 f"teachers=[{{checkpoint: {planted}}}, {{checkpoint: {planted}}}]", "distill.n_teachers=[1]"])
    assert code == 2 and not marker.exists()
    assert "member.pt" in error_line()


@pytest.mark.slow
def test_planted_stage_files_run_nothing_and_touch_nothing(tmp_path, capsys, error_line):
    marker, out = tmp_path / "ran", tmp_path / "run"
    assert main(["run", "lab-color-transfer", f"output_dir={out}", *TINY]) == 0
    capsys.readouterr()
    finals = sorted(out.glob("stages/*/final.pt"))
    assert {p.parent.name for p in finals} == {"teacher", "distill-crd"}
    for final in finals:  # a finished stage's weights
        kept = final.read_bytes()
        _plant(final, marker)
        before = _digests(out)
        assert main(["run", "lab-color-transfer", f"output_dir={out}", *TINY]) == 2
        assert not marker.exists()
        message = error_line()
        assert str(final) in message and "never unpickles code" in message and "delete" in message
        assert _digests(out) == before  # nothing else written, nothing removed
        final.write_bytes(kept)
    # a resume checkpoint of an unfinished stage
    fresh = tmp_path / "fresh"
    _plant(fresh / "stages" / "teacher" / "checkpoint.pt", marker)
    assert main(["run", "lab-color-transfer", f"output_dir={fresh}", *TINY]) == 2
    assert not marker.exists()
    assert "checkpoint.pt holds objects other than tensors" in error_line()


def test_a_planted_cifar_batch_runs_nothing(cifar_root: Path, tmp_path):
    marker = tmp_path / "ran"
    _plant(cifar_root / "cifar-10-batches-py" / "test_batch", marker, as_torch=False)
    with pytest.raises(DataError, match=r"test_batch is not a readable CIFAR pickle \(it asks for \S*\.exec,"):
        CIFARDataset(cifar_root, "test")
    assert not marker.exists()
