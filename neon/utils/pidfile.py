"""A daemon's pid file, locked (fcntl) for the daemon's lifetime: a second daemon on the same
directory is refused with a clear message naming the holder's pid."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class PidFileLocked(Exception):
    """Another live process holds the lock."""


class PidFile:
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what  # "pageserver (workdir)", for the message
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            other = self.path.read_text().strip() or "?"
            raise PidFileLocked(f"{self.path} is locked: another {self.what} (pid {other})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
