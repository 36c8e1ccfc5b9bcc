"""Crash-safe file writes: write a temp file, fsync it, rename over the target, fsync the dir."""

from __future__ import annotations

import os
from pathlib import Path

TEMP_SUFFIX = ".___temp"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Replace `path` with `data` so that after a crash it holds either the old or the new bytes.

    `owner` (uid, gid) is given to the file before it appears under its name."""
    target = Path(path)
    tmp = target.with_name(target.name + TEMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_path(target.parent)


def durable_mkdir(path: str | os.PathLike[str], mode: int = 0o700) -> None:
    """Create a directory (and missing parents) and make its entry durable."""
    target = Path(path)
    if target.is_dir():
        return
    missing: list[Path] = []
    p = target
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=mode)
        fsync_path(d.parent)
    fsync_path(target)


def remove_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove leftovers of interrupted durable writes; returns what was removed."""
    removed = []
    for p in Path(directory).glob("*" + TEMP_SUFFIX):
        p.unlink()
        removed.append(p)
    return removed
