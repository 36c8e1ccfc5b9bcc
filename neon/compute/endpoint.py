"""A compute endpoint: a stock PG15 primary whose data directory is a pageserver basebackup and whose
WAL reaches the pageserver (DESIGN §2.3-§2.4; spec control-plane §1.7).

With safekeepers (`safekeepers=["host:port", …]`, the normal set-up) the WAL path is Neon's:
`create()` first runs `neon-walproposer --sync-safekeepers` for the LSN to start from and takes
the basebackup there; `start()` starts Postgres with `synchronous_standby_names = 'walproposer'`
and then the WAL proposer beside it, so every COMMIT waits for a safekeeper quorum; the
pageserver follows the safekeepers through the broker. `stop()` stops Postgres (its shutdown
checkpoint is acknowledged by the quorum before it exits), then the proposer.

Without safekeepers the pageserver streams straight from the compute (the stage before the
safekeepers existed, still used by tests of the pageserver alone):

Lifecycle, mirroring `neon_local endpoint create/start/stop` without compute_ctl, the neon
extension or safekeepers:

* `create(lsn)` fetches `basebackup <tenant> <timeline> [lsn]` over the page service, untars it
  into `<workdir>/pgdata` (owned by the unprivileged Postgres user; absolute paths, `..` and
  anything but regular files and directories are refused), and writes `postgresql.conf`. The
  parameters recorded in pg_control (`max_connections`, `max_prepared_transactions`, …) are copied
  from the untarred `global/pg_control`: a different value would make the compute log an
  XLOG_PARAMETER_CHANGE record at its first start.
* `start()` runs `pg_ctl start` as the user, then points the pageserver's WAL receiver at the
  compute's unix socket (`PUT …/wal_source`).
* `stop()` shuts Postgres down first, so its walsender ships everything up to the shutdown
  checkpoint (it exits once the receiver reports that position as flushed, which the pageserver
  does as soon as it has ingested it), waits until the pageserver has ingested that checkpoint,
  then detaches the WAL source.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import psycopg
import structlog

from neon.postgres.controlfile import ControlFileData, WalLevel
from neon.postgres.pg_distrib import PgDistrib, PostgresUser
from neon.pq.client import connect
from neon.utils.http_json import request_json
from neon.utils.lsn import Lsn
from neon.utils.pidfile import process_alive

log = structlog.get_logger("compute")

HTTP_TIMEOUT = 30.0
SUPERUSER = "cloud_admin"


class EndpointError(RuntimeError):
    """The endpoint cannot be created, started or stopped as asked."""


class WalSourceUnavailable(EndpointError):
    """The pageserver has no `PUT …/wal_source` route (an older pageserver)."""


class Endpoint:
    def __init__(
        self,
        workdir: Path,
        *,
        tenant_id: str,
        timeline_id: str,
        pageserver_pg: tuple[str, int],
        pageserver_http: tuple[str, int],
        pg_port: int,
        distrib: PgDistrib | None = None,
        user: PostgresUser | None = None,
        safekeepers: Sequence[str] | None = None,
        proposer_args: Sequence[str] = (),
        listen_addresses: str = "",
    ) -> None:
        self.workdir = Path(workdir)
        self.tenant_id = str(tenant_id)
        self.timeline_id = str(timeline_id)
        self.pageserver_pg = pageserver_pg
        self.pageserver_http = pageserver_http
        self.pg_port = pg_port
        self.distrib = distrib or PgDistrib.default()
        self.user = user or PostgresUser.resolve()
        self.pgdata = self.workdir / "pgdata"
        self.sockdir = self.workdir / "sock"
        self.logfile = self.workdir / "postgres.log"
        self.running = False
        self.wal_source_attached = False
        self.basebackup_lsn: Lsn | None = None
        """The LSN the basebackup was taken at (the start of its synthesized shutdown checkpoint)."""
        self.safekeepers = list(safekeepers or [])
        self.proposer_args = list(proposer_args)  # more `neon-walproposer` flags (normal mode)
        # The proposer's pid, so that a later process (a CLI invocation) can stop it.
        self.proposer_pid_file = self.workdir / "walproposer.pid"
        self.listen_addresses = listen_addresses  # TCP besides the unix socket ('' = socket only)
        self.proposer: subprocess.Popen[bytes] | None = None
        self.proposer_log = self.workdir / "walproposer.log"

    def __repr__(self) -> str:
        return f"Endpoint({self.workdir}, timeline={self.timeline_id}, port={self.pg_port})"

    # --- create ------------------------------------------------------------------------------------
    async def create(self, lsn: Lsn | str | None = None) -> Endpoint:
        """Fetch the timeline's basebackup (at `lsn`, else its last record) and configure a primary."""
        if self.pgdata.exists():
            raise EndpointError(f"{self.pgdata} already exists: an endpoint is created from a fresh basebackup")
        self.user.make_dir(self.workdir, 0o755)
        # 0755 so the root pageserver can reach the socket for replication.
        self.user.make_dir(self.sockdir, 0o755)
        if self.safekeepers and lsn is None:
            # The safekeepers' committed end is where this compute must start (0/0: a timeline they
            # have no WAL for yet, which starts at the pageserver's last record).
            synced = await self.sync_safekeepers()
            lsn = synced if synced else None
        tar_path = self.workdir / "basebackup.tar"
        try:
            await self._download_basebackup(tar_path, None if lsn is None else Lsn(lsn))
            await asyncio.to_thread(self._extract, tar_path)
        except BaseException:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            raise
        finally:
            tar_path.unlink(missing_ok=True)
        control = ControlFileData.read(self.pgdata / "global" / "pg_control")
        self.basebackup_lsn = Lsn(control.checkpoint)
        for signal_file in ("standby.signal", "recovery.signal"):
            # A primary: a signal file would start it in recovery.
            (self.pgdata / signal_file).unlink(missing_ok=True)
        self._write_config(control)
        return self

    def _proposer_argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "neon.compute.walproposer_main",
            "--safekeepers",
            ",".join(self.safekeepers),
            "--tenant-id",
            self.tenant_id,
            "--timeline-id",
            self.timeline_id,
            *extra,
        ]

    async def sync_safekeepers(self, *, timeout: float = 120.0) -> Lsn:
        """`neon-walproposer --sync-safekeepers`: the LSN the safekeepers have committed."""
        with open(self.proposer_log, "ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                *self._proposer_argv("--sync-safekeepers"), stdout=asyncio.subprocess.PIPE, stderr=logf
            )
            try:
                async with asyncio.timeout(timeout):
                    out, _ = await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise EndpointError(
                    f"sync-safekeepers did not finish in {timeout:.0f} s (no safekeeper quorum?)"
                ) from None
        if proc.returncode != 0:
            tail = self.proposer_log.read_text(errors="replace").strip().splitlines()[-3:]
            raise EndpointError(f"sync-safekeepers failed (exit {proc.returncode}): {' | '.join(tail)}")
        try:
            return Lsn.parse(out.decode().strip())
        except ValueError:
            raise EndpointError(f"sync-safekeepers printed {out!r}, not an LSN") from None

    async def _download_basebackup(self, dest: Path, lsn: Lsn | None) -> None:
        host, port = self.pageserver_pg
        cmd = f"basebackup {self.tenant_id} {self.timeline_id}" + ("" if lsn is None else f" {lsn}")
        conn = await connect(host, port, SUPERUSER)
        try:
            stream = await conn.copy_out(cmd)
            # Spooled to disk rather than held in memory: a basebackup is a whole data directory.
            with open(dest, "wb") as f:
                while (chunk := await stream.read()) is not None:
                    f.write(chunk)
            # The command's completion (or a late ErrorResponse, raised here) ends the copy.
            await stream.finish()
        finally:
            await conn.close()

    def _extract(self, tar_path: Path) -> None:
        self.user.make_dir(self.pgdata, 0o700)
        root = self.pgdata.resolve()
        with tarfile.open(tar_path, mode="r:*") as tar:
            for member in tar:
                parts = [p for p in PurePosixPath(member.name).parts if p != "."]
                if member.name.startswith("/") or ".." in parts:
                    raise EndpointError(f"basebackup member {member.name!r} escapes the data directory")
                if not parts:
                    continue
                dest = root.joinpath(*parts)
                self._make_parents(dest.parent, root)
                if member.isdir():
                    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                        raise EndpointError(f"basebackup directory {member.name!r} collides with a file")
                    self.user.make_dir(dest, 0o700)
                elif member.isreg():
                    src = tar.extractfile(member)
                    assert src is not None
                    # O_NOFOLLOW: a member never writes through a link planted by an earlier one.
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                        if out.tell() != member.size:
                            raise EndpointError(f"basebackup member {member.name!r} is truncated")
                    self.user.own(dest, 0o600)
                else:
                    raise EndpointError(f"basebackup member {member.name!r} is not a file or directory")
        if not (self.pgdata / "global" / "pg_control").is_file():
            raise EndpointError("the basebackup has no global/pg_control")

    def _make_parents(self, path: Path, root: Path) -> None:
        """Create missing directories between `root` and `path` (tar streams may omit them)."""
        missing = []
        while path != root and not path.exists():
            missing.append(path)
            path = path.parent
        for p in reversed(missing):
            self.user.make_dir(p, 0o700)

    def _write_config(self, control: ControlFileData) -> None:
        wal_level = WalLevel(max(control.wal_level, WalLevel.REPLICA)).name.lower()

        def on(flag: bool) -> str:
            return "on" if flag else "off"

        lines = [
            "# Written by neon.compute.endpoint: a primary streaming its WAL to the pageserver.",
            f"listen_addresses = '{self.listen_addresses}'",
            f"unix_socket_directories = '{self.sockdir}'",
            f"port = {self.pg_port}",
            # The pg_control parameters, as recorded by the timeline's initdb: any change would be
            # WAL-logged (XLOG_PARAMETER_CHANGE) at the first start.
            f"wal_level = {wal_level}",
            f"max_connections = {control.max_connections}",
            f"max_worker_processes = {control.max_worker_processes}",
            f"max_wal_senders = {max(control.max_wal_senders, 1)}",
            f"max_prepared_transactions = {control.max_prepared_xacts}",
            f"max_locks_per_transaction = {control.max_locks_per_xact}",
            f"track_commit_timestamp = {on(control.track_commit_timestamp)}",
            f"wal_log_hints = {on(control.wal_log_hints)}",
            "max_replication_slots = 10",
            *(
                # Commits wait for the proposer's quorum acknowledgement; its slot keeps the WAL a
                # safekeeper may still need (spec §2.6.8-§2.6.9).
                ["synchronous_standby_names = 'walproposer'", "wal_keep_size = 0"]
                if self.safekeepers
                # The pageserver streams without a slot and resumes at its disk_consistent_lsn
                # after a crash: the compute must still have that WAL.
                else ["wal_keep_size = '1GB'"]
            ),
            "wal_sender_timeout = '10s'",
            "fsync = on",
            "shared_buffers = '16MB'",
            "restart_after_crash = off",
            "hot_standby = on",
            "log_line_prefix = '%m [%p] '",
            "log_min_messages = info",
            "log_connections = off",
            "logging_collector = off",
        ]
        conf = self.pgdata / "postgresql.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.user.own(conf, 0o600)

    # --- start / stop ------------------------------------------------------------------------------
    async def start(self, *, attach_wal_source: bool = True) -> Endpoint:
        """Start Postgres, then make the pageserver stream its WAL (raises WalSourceUnavailable
        with Postgres left running when the pageserver has no wal_source route)."""
        if self.running:
            raise EndpointError(f"{self} is already running")
        if not (self.pgdata / "PG_VERSION").exists():
            raise EndpointError(f"{self} has no data directory: create() it first")
        if not self.logfile.exists():
            self.logfile.touch()
            self.user.own(self.logfile, 0o644)
        pg_ctl = self.distrib.bin("pg_ctl")
        await asyncio.to_thread(
            self.user.run, [pg_ctl, "-D", self.pgdata, "-l", self.logfile, "-w", "-t", "60", "start"]
        )
        self.running = True
        if self.safekeepers:
            self.start_proposer()
            await self.wait_proposer_streaming()
        elif attach_wal_source:
            await self.attach_wal_source()
        return self

    def start_proposer(self) -> None:
        """The WAL proposer beside Postgres (its output in walproposer.log)."""
        if self.proposer is not None and self.proposer.poll() is None:
            raise EndpointError(f"{self}: the WAL proposer is already running")
        lsn = self.basebackup_lsn
        extra = ["--pg-host", str(self.sockdir), "--pg-port", str(self.pg_port), "--pg-user", SUPERUSER]
        if lsn is not None:
            extra += ["--basebackup-lsn", str(lsn)]
        extra += self.proposer_args
        with open(self.proposer_log, "ab") as logf:
            # Its own session: it outlives a terminal's Ctrl-C, and the command that started it.
            self.proposer = subprocess.Popen(
                self._proposer_argv(*extra), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
        self.proposer_pid_file.write_text(f"{self.proposer.pid}\n")

    async def wait_proposer_streaming(self, timeout: float = 60.0) -> None:
        """Until Postgres streams to the proposer as its synchronous standby: the proposer won an
        election, so commits can be acknowledged (and a shutdown checkpoint will be)."""
        deadline = time.monotonic() + timeout
        query = (
            "SELECT count(*) FROM pg_stat_replication"
            " WHERE application_name = 'walproposer' AND state = 'streaming' AND sync_state = 'sync'"
        )
        while True:
            if self.proposer is None or self.proposer.poll() is not None:
                tail = self.proposer_log.read_text(errors="replace").strip().splitlines()[-3:]
                raise EndpointError(f"{self}: the WAL proposer exited: {' | '.join(tail)}")
            if self.safe_psql(query) == [(1,)]:
                return
            if time.monotonic() > deadline:
                raise EndpointError(f"{self}: the WAL proposer is not streaming after {timeout:.0f} s (no quorum?)")
            await asyncio.sleep(0.05)  # the election runs in another process: poll its visible effect

    def stop_proposer(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the proposer (ours, or one an earlier process started: found by its pid file);
        its exit status when it was our child."""
        proc, self.proposer = self.proposer, None
        try:
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(sig)
                try:
                    return proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()
            pid = self.proposer_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + timeout
                while process_alive(pid, "walproposer"):
                    if time.monotonic() > deadline:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                        break
                    time.sleep(0.05)  # not our child: nothing to wait on but its /proc entry
            return None
        finally:
            self.proposer_pid_file.unlink(missing_ok=True)

    def proposer_pid(self) -> int | None:
        """The running proposer's pid from the pid file (None when none runs)."""
        try:
            pid = int(self.proposer_pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if process_alive(pid, "walproposer") else None

    async def attach_wal_source(self) -> None:
        """Point the pageserver's WAL receiver for this timeline at the compute's socket."""
        connstr = f"host={self.sockdir} port={self.pg_port} user={SUPERUSER}"
        await self._put_wal_source(connstr)
        self.wal_source_attached = True

    async def detach_wal_source(self) -> None:
        await self._put_wal_source(None)
        self.wal_source_attached = False

    async def _put_wal_source(self, connstr: str | None) -> None:
        status, body = await self.http("PUT", f"{self._timeline_path}/wal_source", {"connstr": connstr})
        if status == 404 and isinstance(body, dict) and body.get("msg") == "page not found":
            raise WalSourceUnavailable(
                "the pageserver has no PUT /v1/tenant/{tenant_id}/timeline/{timeline_id}/wal_source route"
            )
        if status not in (200, 201, 204):
            raise EndpointError(f"PUT wal_source {connstr!r} failed: {status} {body}")

    async def stop(self, mode: str = "fast", *, timeout: float = 60.0) -> None:
        """Stop Postgres; with a WAL source attached, wait for the pageserver to ingest the
        shutdown checkpoint (not in "immediate" mode, which writes none), then detach it."""
        if not self.running:
            return
        pg_ctl = self.distrib.bin("pg_ctl")
        deadline = time.monotonic() + timeout
        await asyncio.to_thread(
            self.user.run, [pg_ctl, "-D", self.pgdata, "-m", mode, "-w", "-t", str(int(timeout)), "stop"]
        )
        self.running = False
        if self.safekeepers:
            self.stop_proposer()
            if mode != "immediate":
                final = Lsn(ControlFileData.read(self.pgdata / "global" / "pg_control").checkpoint)
                await self.wait_pageserver_lsn(final + 1, timeout=max(1.0, deadline - time.monotonic()))
            return
        if not self.wal_source_attached:
            return
        if mode != "immediate":
            # The shutdown checkpoint record starts at pg_control's checkPoint; the pageserver has it
            # once its last_record_lsn is past that.
            final = Lsn(ControlFileData.read(self.pgdata / "global" / "pg_control").checkpoint)
            await self.wait_pageserver_lsn(final + 1, timeout=max(1.0, deadline - time.monotonic()))
        await self.detach_wal_source()

    def destroy(self, *, remove: bool = True) -> None:
        """Stop Postgres (and the proposer) at once if they run, and remove the endpoint's directory
        (unless `remove` is False: its logs are then still there to read)."""
        if self.running:
            with contextlib.suppress(Exception):
                self.user.run([self.distrib.bin("pg_ctl"), "-D", self.pgdata, "-m", "immediate", "-w", "stop"])
            self.running = False
        self.stop_proposer(signal.SIGKILL)
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- clients -----------------------------------------------------------------------------------
    def connstr(self, dbname: str = "postgres") -> str:
        host = self.listen_addresses.split(",")[0].strip() if self.listen_addresses else str(self.sockdir)
        return f"host={host} port={self.pg_port} user={SUPERUSER} dbname={dbname}"

    def connect(self, dbname: str = "postgres", autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.connstr(dbname), autocommit=autocommit)

    def safe_psql(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run statements (separated by ';' in one string) and return the last result's rows."""
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def current_flush_lsn(self) -> Lsn:
        return Lsn.parse(self.safe_psql("SELECT pg_current_wal_flush_lsn()::text")[0][0])

    def run_client(self, name: str, args: list[str]) -> str:
        """Run a client binary (psql, pg_amcheck, …) as the Postgres user against this endpoint."""
        proc = self.user.run(
            [self.distrib.bin(name), "-h", self.sockdir, "-p", str(self.pg_port), "-U", SUPERUSER, *args]
        )
        return proc.stdout

    # --- the pageserver ----------------------------------------------------------------------------
    @property
    def _timeline_path(self) -> str:
        return f"/v1/tenant/{self.tenant_id}/timeline/{self.timeline_id}"

    async def http(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        return await asyncio.to_thread(self._http, method, path, body)

    def _http(self, method: str, path: str, body: object | None) -> tuple[int, Any]:
        host, port = self.pageserver_http
        return request_json(host, port, method, path, body, timeout=HTTP_TIMEOUT)

    async def timeline_info(self) -> dict[str, Any]:
        status, info = await self.http("GET", self._timeline_path)
        if status != 200 or not isinstance(info, dict):
            raise EndpointError(f"GET timeline {self.timeline_id} failed: {status} {info}")
        return info

    async def wait_pageserver_lsn(self, lsn: Lsn, *, timeout: float = 30.0) -> Lsn:
        """Until the pageserver's last_record_lsn for this timeline is ≥ `lsn`; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            last = Lsn.parse((await self.timeline_info())["last_record_lsn"])
            if last >= lsn:
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pageserver's last_record_lsn {last} did not reach {lsn} in {timeout}s")
            await asyncio.sleep(0.05)  # ingest progress has no notification over HTTP

    async def wait_caught_up(self, *, timeout: float = 30.0) -> Lsn:
        """Until the pageserver has ingested everything the compute has flushed; returns that LSN."""
        lsn = self.current_flush_lsn()
        await self.wait_pageserver_lsn(lsn, timeout=timeout)
        return lsn
