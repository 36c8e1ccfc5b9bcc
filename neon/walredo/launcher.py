"""Starting the real redo helper: its scratch data directory and command line.

The helper is the stock `postgres --single` with our extension `pgxn/neon_walredo` preloaded
(DESIGN §2.2). Its data directory needs only PG_VERSION, global/pg_control, empty config files
and a few empty directories; it lives on tmpfs when there is one, and is reused across restarts
of the same tenant's helper (Postgres then removes the dead process's shared memory itself).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neon.postgres.checkpoint import CheckPoint
from neon.postgres.constants import (
    BLCKSZ,
    CATALOG_VERSION_NO,
    DEFAULT_WAL_SEGMENT_SIZE,
    PG_CONTROL_VERSION,
    PG_MAJORVERSION,
    RELSEG_SIZE,
    XLOG_BLCKSZ,
)
from neon.postgres.controlfile import ControlFileData, DBState
from neon.postgres.pg_distrib import PgDistrib, PostgresUser
from neon.walredo.process import WalRedoProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXTENSION = REPO_ROOT / "pgxn" / "neon_walredo" / "neon_walredo.so"
SCRATCH_SUBDIRS = ("global", "base", "pg_notify", "pg_dynshmem")


def helper_pg_control() -> bytes:
    """A pg_control the helper accepts: it is only checked for version, CRC and build constants,
    since the helper takes over before WAL start-up would read its checkpoint."""
    first = 0x1000028
    cp = CheckPoint.initial(first)
    return ControlFileData(
        system_identifier=1,
        pg_control_version=PG_CONTROL_VERSION,
        catalog_version_no=CATALOG_VERSION_NO,
        state=DBState.SHUTDOWNED,
        time=0,
        checkpoint=first,
        checkpoint_copy=cp,
        unlogged_lsn=1000,
        min_recovery_point=0,
        min_recovery_point_tli=0,
        backup_start_point=0,
        backup_end_point=0,
        backup_end_required=False,
        wal_level=1,
        wal_log_hints=False,
        max_connections=100,
        max_worker_processes=8,
        max_wal_senders=10,
        max_prepared_xacts=0,
        max_locks_per_xact=64,
        track_commit_timestamp=False,
        max_align=8,
        float_format=1234567.0,
        blcksz=BLCKSZ,
        relseg_size=RELSEG_SIZE,
        xlog_blcksz=XLOG_BLCKSZ,
        xlog_seg_size=DEFAULT_WAL_SEGMENT_SIZE,
        name_data_len=64,
        index_max_keys=32,
        toast_max_chunk_size=1996,
        loblksize=2048,
        float8_by_val=True,
        data_checksum_version=0,
        mock_authentication_nonce=bytes(32),
        crc=0,
    ).encode()


def scratch_parent() -> Path:
    """tmpfs when there is one: redo creates and unlinks relation files (~50x cheaper there)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def make_scratch_dir(dest: Path, user: PostgresUser, pg_control: bytes | None = None) -> Path:
    """Create (or complete) the helper's data directory at `dest`, owned by `user`."""
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    user.own(dest, 0o700)
    for sub in SCRATCH_SUBDIRS:
        (dest / sub).mkdir(mode=0o700, exist_ok=True)
        user.own(dest / sub)
    files = {
        "PG_VERSION": f"{PG_MAJORVERSION}\n".encode(),
        "global/pg_control": pg_control or helper_pg_control(),
        "postgresql.conf": b"",
        "postgresql.auto.conf": b"",
    }
    for name, data in files.items():
        path = dest / name
        if not path.exists():
            path.write_bytes(data)
            user.own(path, 0o600)
    return dest


def helper_command(
    distrib: PgDistrib,
    scratch: Path,
    *,
    extension: Path = DEFAULT_EXTENSION,
    shared_buffers: str = "1MB",
    gucs: Mapping[str, str] | None = None,
) -> list[str]:
    settings = {
        "shared_preload_libraries": str(extension),
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


def install_extension(scratch: Path, extension: Path, user: PostgresUser) -> Path:
    """A copy of the helper library inside the scratch directory: the checkout holding the
    original may not be readable by the unprivileged user (a clone under /root)."""
    dest = scratch / extension.name
    src = extension.stat()
    try:
        st = dest.stat()
        if st.st_size == src.st_size and st.st_mtime_ns == src.st_mtime_ns:
            return dest
    except FileNotFoundError:
        pass
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy2(extension, tmp)
    user.own(tmp, 0o755)
    os.replace(tmp, dest)
    return dest


def _remove_stale_pid_file(scratch: Path) -> None:
    """A postmaster.pid naming a live process that is not a helper of ours (a reused pid) would
    make Postgres refuse to start; one naming a dead process is left for Postgres to clean up."""
    pid_file = scratch / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    pid_file.unlink(missing_ok=True)


@dataclass
class PostgresRedoLauncher:
    """Launches the helper for one tenant in `scratch_dir`; pass it to WalRedoManager."""

    scratch_dir: Path
    distrib: PgDistrib = field(default_factory=PgDistrib.default)
    extension: Path = DEFAULT_EXTENSION
    shared_buffers: str = "1MB"
    log_each_request: bool = False
    user: PostgresUser = field(default_factory=PostgresUser.resolve)

    def __post_init__(self) -> None:
        if not self.extension.exists():
            raise FileNotFoundError(f"WAL redo extension {self.extension} not built (run make setup)")

    async def __call__(self, log: Any) -> WalRedoProcess:
        make_scratch_dir(self.scratch_dir, self.user)
        _remove_stale_pid_file(self.scratch_dir)
        gucs = {"neon_walredo.log_each_request": "on"} if self.log_each_request else {}
        extension = install_extension(self.scratch_dir, self.extension, self.user)
        argv = helper_command(
            self.distrib, self.scratch_dir, extension=extension, shared_buffers=self.shared_buffers, gucs=gucs
        )
        env = {"LD_LIBRARY_PATH": str(self.distrib.lib_dir.resolve()), "LC_ALL": "C"}
        # Switch users with setpriv rather than the user/group arguments of process creation: the
        # daemon runs on uvloop, whose subprocess_exec does not take them.
        return await WalRedoProcess.launch(self.user.exec_argv(argv), env=env, log=log, cwd="/")
