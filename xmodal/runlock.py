"""One run at a time per output folder: an advisory lock on ``<output_dir>/.xmodal.lock``.

The lock is ``flock`` on an open file, so the operating system drops it when the process that
holds it exits, however it exits: a lock file left by a killed run is not a lock, and the next
run takes it. The file records the holder's pid and host for the refusal message.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO, Optional

from xmodal.errors import ConfigError

LOCK_NAME = ".xmodal.lock"


def _busy(path: Path) -> ConfigError:
    """The refusal of a folder whose lock ``path`` another live run holds, naming that run."""
    try:
        holder = path.read_text().strip() or "another process"
    except OSError:
        holder = "another process"
    return ConfigError(f"output_dir {path.parent} is in use by another xmodal run ({holder}); wait for it to "
                       "finish or choose another output_dir")


class OutputLock:
    """Held while a run writes into ``folder``; ``release`` (or the process's exit) frees it."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._handle: Optional[IO[str]] = None

    @staticmethod
    def check(folder: Path) -> None:
        """ConfigError if another live process holds ``folder``'s lock (nothing is created)."""
        path = Path(folder) / LOCK_NAME
        if not path.exists():
            return
        with open(path, "r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(path) from None
            fcntl.flock(handle, fcntl.LOCK_UN)

    def acquire(self) -> None:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise _busy(self.path) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
