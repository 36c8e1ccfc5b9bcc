"""The neon_walredo helper for tests: build it, make its scratch data directory, start it, and a
small synchronous client for its B/P/A/G (+ M) pipe protocol (pgxn/neon_walredo/README.md).

The scratch directory needs only PG_VERSION, global/pg_control (from any initdb of the same
PostgreSQL build), empty postgresql.conf and postgresql.auto.conf, and empty base/, pg_notify/
and pg_dynshmem/. It lives on tmpfs (/dev/shm) when one is available: relation files are
created there.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from neon.postgres.pg_distrib import PgDistrib, PostgresUser, initdb

REPO_ROOT = Path(__file__).resolve().parents[1]
WALREDO_DIR = REPO_ROOT / "pgxn" / "neon_walredo"
WALREDO_SO = WALREDO_DIR / "neon_walredo.so"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_walredo.sh"

BLCKSZ = 8192
SCRATCH_SUBDIRS = ("global", "base", "pg_notify", "pg_dynshmem")

# (forknum, spcnode, dbnode, relnode, blkno)
BufferTag = tuple[int, int, int, int, int]
_tag = struct.Struct(">BIIII")
_len = struct.Struct(">i")


def build_walredo() -> Path:
    """Build the extension if its sources changed; the path of the .so."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build_walredo.sh failed:\n{proc.stdout}{proc.stderr}")
    return WALREDO_SO


def scratch_parent() -> Path:
    """tmpfs when there is one (file creation is ~50x cheaper than on ext4)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def new_scratch_root(prefix: str = "neon-walredo-") -> Path:
    """A fresh directory (under tmpfs when possible) the Postgres user can traverse."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_parent()))
    root.chmod(0o755)
    return root


def template_pg_control(distrib: PgDistrib, user: PostgresUser, cache_dir: Path) -> bytes:
    """global/pg_control of a throw-away initdb in cache_dir (run once, then reused)."""
    control = cache_dir / "pgdata" / "global" / "pg_control"
    if not control.exists():
        user.make_dir(cache_dir, 0o755)
        initdb(distrib, user, cache_dir / "pgdata")
    return control.read_bytes()


def make_walredo_scratch(
    dest: Path, pg_control: bytes, *, user: PostgresUser | None = None, pg_version: str = "15"
) -> Path:
    """Create the helper's data directory at dest (which must not exist yet), owned by user."""
    user = user or PostgresUser.resolve()
    dest.mkdir(mode=0o700)
    for sub in SCRATCH_SUBDIRS:
        (dest / sub).mkdir(mode=0o700)
    (dest / "PG_VERSION").write_text(pg_version + "\n")
    (dest / "global" / "pg_control").write_bytes(pg_control)
    (dest / "postgresql.conf").write_bytes(b"")
    (dest / "postgresql.auto.conf").write_bytes(b"")
    for root, dirs, files in os.walk(dest):
        for name in [*dirs, *files]:
            user.own(os.path.join(root, name))
    user.own(dest, 0o700)
    return dest


def walredo_command(
    distrib: PgDistrib,
    scratch: Path,
    *,
    so_path: Path = WALREDO_SO,
    shared_buffers: str = "1MB",
    gucs: Mapping[str, str] | None = None,
) -> list[str]:
    """The helper's command line."""
    settings = {
        "shared_preload_libraries": str(so_path),
        "shared_buffers": shared_buffers,
        "max_connections": "1",
        "max_worker_processes": "0",
        "max_wal_senders": "0",
        "max_replication_slots": "0",
        "max_prepared_transactions": "0",
        "max_locks_per_transaction": "16",
        "dynamic_shared_memory_type": "mmap",
        "huge_pages": "off",
        "listen_addresses": "",
        **(gucs or {}),
    }
    cmd = [str(distrib.bin("postgres")), "--single", "-D", str(scratch), "-F"]
    for name, value in settings.items():
        cmd += ["-c", f"{name}={value}"]
    return cmd


# --- protocol ---------------------------------------------------------------------------------
def message(kind: bytes, payload: bytes) -> bytes:
    return kind + _len.pack(4 + len(payload)) + payload


def encode_tag(tag: BufferTag) -> bytes:
    return _tag.pack(*tag)


def encode_request(tag: BufferTag, base_image: bytes | None, records: Iterable[tuple[int, bytes]]) -> bytes:
    """B, P (if there is a base image), one A per (end_lsn, record), G."""
    t = encode_tag(tag)
    parts = [message(b"B", t)]
    if base_image is not None:
        assert len(base_image) == BLCKSZ
        parts.append(message(b"P", t + base_image))
    for end_lsn, rec in records:
        parts.append(message(b"A", struct.pack(">Q", end_lsn) + rec))
    parts.append(message(b"G", t))
    return b"".join(parts)


def encode_mask(rmid: int, blkno: int, page: bytes) -> bytes:
    assert len(page) == BLCKSZ
    return message(b"M", struct.pack(">BI", rmid, blkno) + page)


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
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def wait(self, timeout: float = 10) -> int:
        self.close_stdin()
        rc = self.proc.wait(timeout)
        self._stderr_thread.join(timeout)
        return rc

    def wait_stderr(self, timeout: float = 10) -> str:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.stderr_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr_thread.join(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
