"""Files written atomically (a crash never leaves half of one) and state files read as tensors only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from xmodal.safeload import load_tensors


def atomic_write(path: Path, mode: str, write: Callable[[Any], None]) -> None:
    """``write(handle)`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A process killed at any point leaves either the old file or the new one, never a torn one.
    """
    atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def read_state_file(path: Path, remedy: str, map_location: Any = "cpu") -> Any:
    """A file a stage wrote, as tensors and plain data only (:func:`xmodal.safeload.load_tensors`)."""
    return load_tensors(path, str(path), remedy, map_location)


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""
    atomic_write(path, "w", lambda handle: handle.write(text))
