"""Compute endpoints against a real `neon-pageserver` process: a stock PG15 primary started from the
pageserver's basebackup streams its WAL back; a fresh endpoint from a new basebackup sees what the
first one wrote (and pg_amcheck is clean), branches isolate their writes in both directions, and a
pageserver stopped by SIGTERM or SIGKILL in the middle of a write workload catches up after its
restart (from disk_consistent_lsn, out of the compute's retained WAL) without losing a committed row."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from neon.compute import Endpoint, EndpointError, WalSourceUnavailable
from neon.utils.lsn import Lsn
from tests.test_pageserver_daemon import Daemon, free_port

MAIN = "11" * 16
RECOVERY_SIGNS = ("redo starts", "was not properly shut down", "automatic recovery")

Pageserver = Daemon


@dataclass
class Env:
    root: Path
    ps: Daemon
    endpoints: list[Endpoint] = field(default_factory=list)

    async def http(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        return await asyncio.to_thread(self.ps.http, method, path, body)

    async def create_tenant(self) -> str:
        status, tenant_id = await self.http("POST", "/v1/tenant", {})
        assert status == 201 and isinstance(tenant_id, str), tenant_id
        return tenant_id

    async def create_timeline(self, tenant_id: str, timeline_id: str, **branch: str) -> dict[str, object]:
        status, info = await self.http(
            "POST", f"/v1/tenant/{tenant_id}/timeline", {"new_timeline_id": timeline_id, **branch}
        )
        assert status == 201 and isinstance(info, dict), info
        return info

    def endpoint(self, name: str, tenant_id: str, timeline_id: str) -> Endpoint:
        ep = Endpoint(
            self.root / name,
            tenant_id=tenant_id,
            timeline_id=timeline_id,
            pageserver_pg=("127.0.0.1", self.ps.pg_port),
            pageserver_http=("127.0.0.1", self.ps.http_port),
            pg_port=free_port(),
        )
        self.endpoints.append(ep)
        return ep

    async def started(self, name: str, tenant_id: str, timeline_id: str, lsn: Lsn | None = None) -> Endpoint:
        """A new endpoint from a fresh basebackup, running and streaming to the pageserver."""
        ep = self.endpoint(name, tenant_id, timeline_id)
        await ep.create(lsn)
        try:
            await ep.start()
        except WalSourceUnavailable as e:
            pytest.skip(f"pageserver lacks the wal_source API: {e}")
        log = ep.logfile.read_text()
        assert not any(s in log for s in RECOVERY_SIGNS), log[-2000:]
        return ep


@pytest_asyncio.fixture
async def env(test_root: Path) -> AsyncIterator[Env]:
    ps = Pageserver(test_root / "ps")
    init = ps.init()
    assert init.returncode == 0, init.stderr
    ps.start()
    e = Env(test_root, ps)
    try:
        await ps.wait_ready()
        yield e
        assert "Traceback" not in ps.log.read_text(), ps.log.read_text()[-3000:]
    finally:
        for ep in e.endpoints:
            ep.destroy()
        if ps.proc is not None and ps.proc.poll() is None:
            ps.proc.kill()
            ps.proc.wait()


def count_sum(ep: Endpoint, table: str = "t") -> tuple[int, int]:
    (row,) = ep.safe_psql(f"SELECT count(*), coalesce(sum(i), 0) FROM {table}")
    return int(row[0]), int(row[1])


def ids(ep: Endpoint, table: str = "t") -> list[int]:
    return [r[0] for r in ep.safe_psql(f"SELECT i FROM {table} ORDER BY i")]


async def test_write_stop_and_read_back(env: Env) -> None:
    tenant = await env.create_tenant()
    await env.create_timeline(tenant, MAIN)
    a = await env.started("a", tenant, MAIN)
    # A primary: it writes, and is not in recovery.
    assert a.safe_psql("SELECT pg_is_in_recovery()") == [(False,)]
    assert not (a.pgdata / "standby.signal").exists()
    a.safe_psql("CREATE TABLE t (i int, v text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
    expected = count_sum(a)
    assert expected == (1000, 500500)
    flush = a.current_flush_lsn()
    assert await a.wait_pageserver_lsn(flush) >= flush
    await a.stop()
    # The pageserver has everything up to the shutdown checkpoint, and the source is detached.
    status, source = await env.http("GET", f"/v1/tenant/{tenant}/timeline/{MAIN}/wal_source")
    assert status == 200 and isinstance(source, dict) and source["connstr"] is None, source

    # pg_control's parameters were kept: no PARAMETER_CHANGE record after the basebackup's checkpoint.
    dump = subprocess.run(
        [str(a.distrib.bin("pg_waldump")), "-p", str(a.pgdata / "pg_wal"), "-s", str(a.basebackup_lsn)],
        capture_output=True,
        text=True,
    )
    assert "CHECKPOINT_SHUTDOWN" in dump.stdout and "PARAMETER_CHANGE" not in dump.stdout, dump.stdout[-2000:]

    b = await env.started("b", tenant, MAIN)
    assert count_sum(b) == expected
    assert b.safe_psql("SELECT v FROM t WHERE i = 777") == [("row 777",)]
    b.run_client("pg_amcheck", ["--all", "--install-missing"])  # raises with its output on corruption
    await b.stop()


async def test_branch_isolation(env: Env) -> None:
    tenant = await env.create_tenant()
    await env.create_timeline(tenant, MAIN)
    main = await env.started("main", tenant, MAIN)
    main.safe_psql("CREATE TABLE t (i int, v text); INSERT INTO t SELECT g, 'main' FROM generate_series(1, 100) g")
    # X: a record boundary the pageserver has reached, after rows 1..100 and before 101..200.
    x = await main.wait_pageserver_lsn(main.current_flush_lsn())
    main.safe_psql("INSERT INTO t SELECT g, 'main' FROM generate_series(101, 200) g")
    await main.wait_caught_up()

    branch = "22" * 16
    info = await env.create_timeline(tenant, branch, ancestor_timeline_id=MAIN, ancestor_start_lsn=str(x))
    assert info["ancestor_lsn"] == str(x)
    br = await env.started("branch", tenant, branch)
    assert ids(br) == list(range(1, 101))
    # Writes on each side after the branch point.
    br.safe_psql("INSERT INTO t SELECT g, 'branch' FROM generate_series(1001, 1050) g")
    main.safe_psql("INSERT INTO t SELECT g, 'main' FROM generate_series(201, 250) g")
    await br.wait_caught_up()
    await main.wait_caught_up()
    await br.stop()
    await main.stop()

    main2 = await env.started("main2", tenant, MAIN)
    assert ids(main2) == list(range(1, 251))
    br2 = await env.started("branch2", tenant, branch)
    assert ids(br2) == [*range(1, 101), *range(1001, 1051)]
    assert br2.safe_psql("SELECT DISTINCT v FROM t WHERE i > 1000") == [("branch",)]
    await br2.stop()
    await main2.stop()


def log_events(path: Path) -> list[dict[str, object]]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # not a structured log line (a traceback, a Postgres message)
    return events


class Writer(threading.Thread):
    """Inserts numbered rows in autocommit and records the ones whose COMMIT returned."""

    def __init__(self, connstr: str) -> None:
        super().__init__(daemon=True)
        self.connstr = connstr
        self.acked: list[int] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.connstr, autocommit=True) as conn:
                n = 0
                while not self.halt.is_set():
                    n += 1
                    conn.execute("INSERT INTO k VALUES (%s, repeat('x', 200))", (n,))
                    self.acked.append(n)
        except BaseException as e:  # reported by the test
            self.error = e


async def wait_until(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `cond` until it holds; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_pageserver_stop_mid_workload(env: Env, sig: signal.Signals) -> None:
    tenant = await env.create_tenant()
    await env.create_timeline(tenant, MAIN)
    ep = await env.started("w", tenant, MAIN)
    ep.safe_psql("CREATE TABLE k (i int PRIMARY KEY, pad text)")
    writer = Writer(ep.connstr())
    writer.start()

    def acked_beyond(n: int) -> Callable[[], bool]:
        return lambda: len(writer.acked) >= n or writer.error is not None

    try:
        # The pageserver ingests while the workload runs...
        await wait_until("300 committed rows", acked_beyond(300))
        await ep.wait_caught_up(timeout=60)
        before = Lsn.parse((await ep.timeline_info())["last_record_lsn"])
        # ... and is stopped in the middle of it: SIGTERM flushes and exits 0, SIGKILL just dies.
        assert env.ps.stop(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        killed_at = len(writer.acked)
        # The compute keeps committing with no pageserver (its WAL waits in wal_keep_size).
        await wait_until("commits while the pageserver is down", acked_beyond(killed_at + 200))
        env.ps.start()
        await env.ps.wait_ready()
        restarted_at = len(writer.acked)
        await wait_until("commits after the restart", acked_beyond(restarted_at + 200))
    finally:
        writer.halt.set()
        await asyncio.to_thread(writer.join, 30)
    assert writer.error is None, writer.error
    # The persisted wal_source restarted the receiver, which reconnected and caught up.
    await ep.wait_caught_up(timeout=60)
    status, source = await env.http("GET", f"/v1/tenant/{tenant}/timeline/{MAIN}/wal_source")
    assert status == 200 and isinstance(source, dict) and source["connects"] >= 1, source
    starts = [Lsn.parse(e["start_lsn"]) for e in log_events(env.ps.log) if e.get("event") == "streaming WAL"]
    assert len(starts) >= 2, starts
    if sig == signal.SIGTERM:
        # The clean shutdown flushed everything ingested: streaming resumes at or after it.
        assert starts[-1] >= before, (starts, before)
    else:
        # The open layer died with the process: streaming resumes below what had been ingested,
        # at disk_consistent_lsn, and that WAL comes again from the compute.
        assert starts[-1] < before, (starts, before)
    await ep.stop()

    check = await env.started("check", tenant, MAIN)
    assert ids(check, "k") == writer.acked
    await check.stop()


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "base/../../escape"])
def test_unsafe_basebackup_member_is_refused(test_root: Path, name: str) -> None:
    tar_path = test_root / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    ep = Endpoint(
        test_root / "ep",
        tenant_id="0" * 32,
        timeline_id=MAIN,
        pageserver_pg=("x", 1),
        pageserver_http=("x", 1),
        pg_port=1,
    )
    ep.user.make_dir(ep.workdir, 0o755)
    with pytest.raises(EndpointError, match="escapes"):
        ep._extract(tar_path)
    assert not (test_root / "escape").exists() and not Path("/etc/escape").exists()


def test_links_in_basebackup_are_refused(test_root: Path) -> None:
    tar_path = test_root / "link.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("pg_wal")
        info.type = tarfile.SYMTYPE
        info.linkname = "/tmp"
        tar.addfile(info)
    ep = Endpoint(
        test_root / "ep",
        tenant_id="0" * 32,
        timeline_id=MAIN,
        pageserver_pg=("x", 1),
        pageserver_http=("x", 1),
        pg_port=1,
    )
    ep.user.make_dir(ep.workdir, 0o755)
    with pytest.raises(EndpointError, match="not a file or directory"):
        ep._extract(tar_path)
