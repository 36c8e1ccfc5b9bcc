"""Pid files: a daemon's, locked (fcntl) for its lifetime so a second daemon on the same directory
is refused with a clear message naming the holder's pid; and `process_alive` for plain pid files
of processes started by an earlier command."""

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


def process_alive(pid: int, cmdline_contains: str) -> bool:
    """`pid` exists, is not a zombie, and runs the expected program (a recycled pid does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and cmdline_contains in cmdline
