"""The neon_walredo helper for tests: build it, make its scratch data directory, start it, and a
small synchronous client for its B/P/A/G (+ M) pipe protocol (pgxn/neon_walredo/README.md).

The scratch directory needs only PG_VERSION, global/pg_control (from any initdb of the same
PostgreSQL build), empty postgresql.conf and postgresql.auto.conf, and empty base/, pg_notify/
and pg_dynshmem/. It lives on tmpfs (/dev/shm) when one is available: relation files are
created there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from neon.postgres.pg_distrib import PgDistrib, PostgresUser
from neon.walredo import protocol
from neon.walredo.launcher import (
    DEFAULT_EXTENSION,
    REPO_ROOT,
    helper_command,
    install_extension,
    make_scratch_dir,
    scratch_parent,
)

WALREDO_SO = DEFAULT_EXTENSION
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_walredo.sh"

# (forknum, spcnode, dbnode, relnode, blkno), the order of the protocol's buffer tag
BufferTag = tuple[int, int, int, int, int]
BLCKSZ = protocol.PAGE_SIZE


def build_walredo() -> Path:
    """Build the extension if its sources changed; the path of the .so."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build_walredo.sh failed:\n{proc.stdout}{proc.stderr}")
    return WALREDO_SO


def new_scratch_root(prefix: str = "neon-walredo-") -> Path:
    """A fresh directory (under tmpfs when possible) the Postgres user can traverse."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_parent()))
    root.chmod(0o755)
    return root


def make_walredo_scratch(dest: Path, pg_control: bytes | None = None, *, user: PostgresUser | None = None) -> Path:
    """Create the helper's data directory at dest (which must not exist yet), owned by user."""
    if dest.exists():
        raise FileExistsError(dest)
    return make_scratch_dir(dest, user or PostgresUser.resolve(), pg_control)


def walredo_command(
    distrib: PgDistrib,
    scratch: Path,
    *,
    so_path: Path = WALREDO_SO,
    shared_buffers: str = "1MB",
    gucs: Mapping[str, str] | None = None,
) -> list[str]:
    so = install_extension(scratch, so_path, PostgresUser.resolve())
    return helper_command(distrib, scratch, extension=so, shared_buffers=shared_buffers, gucs=gucs)


def _tag(t: BufferTag) -> protocol.BufferTag:
    fork, spc, db, rel, blk = t
    return protocol.BufferTag(spc, db, rel, fork, blk)


def encode_request(tag: BufferTag, base_image: bytes | None, records: Iterable[tuple[int, bytes]]) -> bytes:
    """B, P (if there is a base image), one A per (end_lsn, record), G."""
    return protocol.redo_request(_tag(tag), base_image, records)


def encode_mask(rmid: int, blkno: int, page: bytes) -> bytes:
    return protocol.mask_page(rmid, blkno, page)


def encode_tag(tag: BufferTag) -> bytes:
    return protocol.encode_tag(_tag(tag))


message = protocol.message


class WalRedoError(RuntimeError):
    pass


class WalRedoHelper:
    """One helper process, used synchronously: write a request, read its 8192-byte answer.
    stderr is drained by a thread into `stderr_text()`."""

    def __init__(self, cmd: Sequence[str], user: PostgresUser | None = None) -> None:
        user = user or PostgresUser.resolve()
        self.proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            close_fds=True,
            **user.popen_kwargs(),
        )
        self._stderr: list[bytes] = []
        self._stderr_lock = threading.Lock()
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(16384):
            with self._stderr_lock:
                self._stderr.append(chunk)

    def stderr_text(self) -> str:
        with self._stderr_lock:
            return b"".join(self._stderr).decode("utf-8", "replace")

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WalRedoError(f"walredo closed its stdin; stderr:\n{self.wait_stderr()}") from None

    def read_page(self) -> bytes:
        assert self.proc.stdout is not None
        buf = self.proc.stdout.read(BLCKSZ)
        if len(buf) != BLCKSZ:
            raise WalRedoError(f"walredo returned {len(buf)} bytes instead of a page; stderr:\n{self.wait_stderr()}")
        return buf

    def request(self, tag: BufferTag, base_image: bytes | None, records: Iterable[tuple[int, bytes]]) -> bytes:
        self.send(encode_request(tag, base_image, records))
        return self.read_page()

    def mask(self, rmid: int, blkno: int, page: bytes) -> bytes:
        self.send(encode_mask(rmid, blkno, page))
        return self.read_page()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()

    def wait(self, timeout: float = 10) -> int:
        self.close_stdin()
        rc = self.proc.wait(timeout)
        self._stderr_thread.join(timeout)
        return rc

    def wait_stderr(self, timeout: float = 10) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout)
        return self.stderr_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr_thread.join(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
