"""The durable write path with real processes: broker, three safekeepers, a pageserver following
them through the broker, and computes (stock PG15 + neon-walproposer).

* A commit returns only once a safekeeper quorum has it: with one safekeeper down commits go on;
  with two down a COMMIT blocks and returns once one comes back.
* No acknowledged commit is lost while safekeepers, the pageserver and the compute are killed
  with SIGKILL one after another; a new compute (sync-safekeepers → basebackup) has every row.
* WAL that only a partitioned safekeeper got is truncated when it rejoins; afterwards the three
  hold identical WAL.
* The pageserver switches to another safekeeper when the one it streams from stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from neon.compute import Endpoint
from neon.safekeeper.wal_storage import WalReader
from neon.utils.lsn import Lsn
from tests.fixtures.storage_env import Safekeeper, StorageEnv, wait_until

MAIN = "11" * 16


@pytest_asyncio.fixture
async def env(test_root: Path) -> AsyncIterator[StorageEnv]:
    e = await StorageEnv.start(test_root)
    try:
        yield e
        e.check_logs()
    finally:
        await e.stop()


async def new_timeline(env: StorageEnv) -> str:
    tenant = await env.create_tenant()
    await env.create_timeline(tenant, MAIN)
    return tenant


def sk_commit_lsns(env: StorageEnv, tenant: str) -> list[Lsn]:
    out = []
    for sk in env.safekeepers:
        st = sk.timeline_status(tenant, MAIN) if sk.running else None
        out.append(Lsn.parse(st["commit_lsn"]) if st else Lsn(0))
    return out


async def test_commit_is_acknowledged_by_the_quorum_and_read_back(env: StorageEnv) -> None:
    tenant = await new_timeline(env)
    ep = await env.started("ep", tenant, MAIN)
    ep.safe_psql("CREATE TABLE t (i int PRIMARY KEY, pad text)")
    ep.safe_psql("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g")
    flushed = ep.current_flush_lsn()
    # The commit returned: a quorum has flushed it, and they learn the commit LSN.
    await wait_until(
        "two safekeepers committing the insert", lambda: sum(c >= flushed for c in sk_commit_lsns(env, tenant)) >= 2
    )
    # The pageserver follows the safekeepers through the broker.
    await env.wait_for_last_record_lsn(tenant, MAIN, flushed)
    await ep.stop()

    again = await env.started("again", tenant, MAIN)
    assert again.safe_psql("SELECT count(*), sum(i) FROM t") == [(1000, 500500)]
    again.safe_psql("INSERT INTO t VALUES (1001, 'y')")
    out = again.run_client("pg_amcheck", ["--install-missing", "--heapallindexed", "postgres"])
    assert "error" not in out.lower(), out
    await again.stop()


class Committer(threading.Thread):
    """One statement in autocommit; `done` is set when its COMMIT returned (or it failed)."""

    def __init__(self, ep: Endpoint, sql: str) -> None:
        super().__init__(daemon=True)
        self.ep, self.sql = ep, sql
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.ep.connstr(), autocommit=True) as conn:
                conn.execute(self.sql.encode())
        except BaseException as e:
            self.error = e
        self.done.set()


async def test_quorum(env: StorageEnv) -> None:
    tenant = await new_timeline(env)
    ep = await env.started("ep", tenant, MAIN)
    ep.safe_psql("CREATE TABLE q (i int)")
    sk1, sk2, _ = env.safekeepers
    sk1.stop()
    ep.safe_psql("INSERT INTO q VALUES (1)")  # two of three: commits go on
    sk2.stop()
    blocked = Committer(ep, "INSERT INTO q VALUES (2)")
    blocked.start()
    # A negative check needs a bound: the COMMIT must still be waiting after a while.
    assert not await asyncio.to_thread(blocked.done.wait, 3.0), blocked.error
    sk2.start()
    assert await asyncio.to_thread(blocked.done.wait, 60.0)
    assert blocked.error is None, blocked.error
    sk1.start()
    assert ep.safe_psql("SELECT i FROM q ORDER BY i") == [(1,), (2,)]
    await ep.stop()


def kill_compute(ep: Endpoint) -> None:
    """SIGKILL the compute's postmaster (its backends notice and exit) and its proposer."""
    pid = int((ep.pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    ep.stop_proposer(signal.SIGKILL)
    ep.running = False


class Writer(threading.Thread):
    """Numbered rows in autocommit; `acked` are those whose COMMIT returned, `tried` every attempt.
    Reconnects after errors until halted (a killed compute ends it)."""

    def __init__(self, ep: Endpoint) -> None:
        super().__init__(daemon=True)
        self.ep = ep
        self.acked: list[int] = []
        self.tried = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with psycopg.connect(self.ep.connstr(), autocommit=True, connect_timeout=5) as conn:
                    while not self.halt.is_set():
                        self.tried += 1
                        conn.execute("INSERT INTO k VALUES (%s)", (self.tried,))
                        self.acked.append(self.tried)
            except Exception as e:
                self.errors = [*self.errors[-4:], f"{type(e).__name__}: {e}"]
                if self.halt.wait(0.05):  # back off before reconnecting (the compute may be dead)
                    return


@pytest.mark.slow
async def test_no_acknowledged_commit_is_lost(env: StorageEnv) -> None:
    tenant = await new_timeline(env)
    ep = await env.started("ep", tenant, MAIN)
    ep.safe_psql("CREATE TABLE k (i int PRIMARY KEY)")
    writer = Writer(ep)
    writer.start()

    async def progress(n: int = 100) -> None:
        target = len(writer.acked) + n
        try:
            await wait_until(f"{n} more acknowledged commits", lambda: len(writer.acked) >= target)
        except TimeoutError as e:
            raise AssertionError(f"{e}; the writer's last errors: {writer.errors}") from None

    try:
        await progress()
        for sk in env.safekeepers:  # one at a time: the other two keep the quorum
            sk.kill()
            await progress()
            sk.start()
            await sk.wait_ready()
            await progress()
        env.pageserver.stop(signal.SIGKILL)
        await progress()
        env.pageserver.start()
        await env.pageserver.wait_ready()
        await progress()
        kill_compute(ep)
    finally:
        writer.halt.set()
        await asyncio.to_thread(writer.join, 30)
    acked = set(writer.acked)
    assert len(acked) >= 700

    # A new compute starts where the safekeepers' quorum committed: every acknowledged row is there
    # (rows whose COMMIT never returned may or may not be).
    check = await env.started("check", tenant, MAIN)
    rows = {r[0] for r in check.safe_psql("SELECT i FROM k")}
    assert acked <= rows <= set(range(1, writer.tried + 1)), sorted(acked - rows)[:10]
    out = check.run_client("pg_amcheck", ["--install-missing", "--heapallindexed", "postgres"])
    assert "error" not in out.lower(), out
    await check.stop()


def timeline_wal(sk: Safekeeper, tenant: str, start: Lsn, end: Lsn) -> bytes:
    st = sk.timeline_status(tenant, MAIN)
    assert st is not None
    reader = WalReader(
        sk.datadir / tenant / MAIN,
        wal_seg_size=st["pg_info"]["wal_seg_size"],
        timeline_start_lsn=Lsn.parse(st["timeline_start_lsn"]),
        local_start_lsn=Lsn.parse(st["local_start_lsn"]),
    )
    return reader.read(start, end)


def flush_lsn(sk: Safekeeper, tenant: str) -> Lsn:
    st = sk.timeline_status(tenant, MAIN)
    return Lsn.parse(st["flush_lsn"]) if st else Lsn(0)


async def test_divergent_wal_is_truncated_when_a_partitioned_safekeeper_rejoins(env: StorageEnv) -> None:
    tenant = await new_timeline(env)
    sk1, sk2, sk3 = env.safekeepers
    ep = await env.started("ep", tenant, MAIN)
    ep.safe_psql("CREATE TABLE d (i int, pad text)")
    ep.safe_psql("INSERT INTO d VALUES (1, 'everywhere')")
    before = flush_lsn(sk1, tenant)
    # sk2 and sk3 go away: the next commit's WAL reaches sk1 only and is never acknowledged.
    sk2.kill()
    sk3.kill()
    lonely = Committer(ep, "INSERT INTO d SELECT g, repeat('lost', 50) FROM generate_series(100, 2000) g")
    lonely.start()
    await wait_until("sk1 to flush WAL nobody else has", lambda: flush_lsn(sk1, tenant) > before + 50_000)
    assert not lonely.done.is_set()
    diverged = flush_lsn(sk1, tenant)
    kill_compute(ep)
    sk1.kill()
    await asyncio.to_thread(lonely.join, 30)

    # A new term on sk2 + sk3 (a quorum) writes different WAL over the same LSNs.
    sk2.start()
    sk3.start()
    await sk2.wait_ready()
    await sk3.wait_ready()
    ep2 = await env.started("ep2", tenant, MAIN)
    ep2.safe_psql("INSERT INTO d SELECT g, repeat('kept', 50) FROM generate_series(5000, 7000) g")
    assert ep2.safe_psql("SELECT count(*) FROM d WHERE i < 5000") == [(1,)]  # the lost insert is not there
    end = ep2.current_flush_lsn()
    assert end > diverged

    # sk1 rejoins: the proposer truncates its divergent WAL and re-sends the term's WAL.
    sk1.start()
    await sk1.wait_ready()
    await wait_until(
        "all three safekeepers at the same flush LSN",
        lambda: len({flush_lsn(sk, tenant) for sk in env.safekeepers}) == 1,
    )
    final = flush_lsn(sk1, tenant)
    assert final >= end
    st = sk1.timeline_status(tenant, MAIN)
    assert st is not None
    histories = {
        json.dumps(sk.timeline_status(tenant, MAIN)["acceptor_state"]["term_history"]) for sk in env.safekeepers
    }
    assert len(histories) == 1, histories
    start = Lsn.parse(st["timeline_start_lsn"])
    wal = [timeline_wal(sk, tenant, start, final) for sk in env.safekeepers]
    assert wal[0] == wal[1] == wal[2]
    await ep2.stop()


async def test_pageserver_switches_safekeeper_when_its_source_stops(env: StorageEnv) -> None:
    tenant = await new_timeline(env)
    ep = await env.started("ep", tenant, MAIN)
    ep.safe_psql("CREATE TABLE s (i int)")
    ep.safe_psql("INSERT INTO s SELECT generate_series(1, 1000)")
    await env.wait_for_last_record_lsn(tenant, MAIN, ep.current_flush_lsn())

    async def source() -> int | None:
        status, body = await env.ps_http("GET", f"/v1/tenant/{tenant}/timeline/{MAIN}/wal_source")
        assert status == 200, body
        conn = (body.get("manager") or {}).get("connection")
        return conn["safekeeper_id"] if conn and conn["is_connected"] else None

    first = await source()
    assert first is not None
    by_id = {sk.id: sk for sk in env.safekeepers}
    by_id[first].stop()
    ep.safe_psql("INSERT INTO s SELECT generate_series(1001, 5000)")
    lsn = ep.current_flush_lsn()
    await env.wait_for_last_record_lsn(tenant, MAIN, lsn)
    second = await source()
    assert second not in (None, first), second
    by_id[first].start()
    await by_id[first].wait_ready()
    ep.safe_psql("INSERT INTO s VALUES (0)")
    await ep.stop()
    check = await env.started("check", tenant, MAIN)
    assert check.safe_psql("SELECT count(*), sum(i) FROM s") == [(5001, 5000 * 5001 // 2)]
    await check.stop()


async def test_safekeeper_away_longer_than_the_spool_catches_up(env: StorageEnv) -> None:
    """With a 64 KiB spool, a safekeeper that missed ~1 MB of WAL gets it over a catch-up
    connection to the compute; afterwards its WAL is identical to the others'."""
    tenant = await new_timeline(env)
    sk1, _, sk3 = env.safekeepers
    ep = await env.started("ep", tenant, MAIN, proposer_args=["--max-spool-mb", "0.0625"])
    ep.safe_psql("CREATE TABLE c (i int, pad text)")
    sk3.kill()
    ep.safe_psql("INSERT INTO c SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g")
    end = ep.current_flush_lsn()
    assert end - flush_lsn(sk1, tenant) < 1000  # (sk1 has it all; sk3 is far behind)
    sk3.start()
    await sk3.wait_ready()
    await wait_until("sk3 to catch up", lambda: flush_lsn(sk3, tenant) >= end)
    assert "catching up" in ep.proposer_log.read_text()
    st = sk1.timeline_status(tenant, MAIN)
    assert st is not None
    start, final = Lsn.parse(st["timeline_start_lsn"]), flush_lsn(sk3, tenant)
    assert timeline_wal(sk3, tenant, start, final) == timeline_wal(sk1, tenant, start, final)
    await ep.stop()


async def test_tenants_bootstrap_while_the_broker_client_streams(env: StorageEnv) -> None:
    """Regression: with the pageserver's broker subscription receiving safekeeper updates (a
    compute runs), gRPC's fork handlers crashed the forked initdb of the next timeline (HTTP 500,
    initdb exit -11)."""
    tenant = await new_timeline(env)
    ep = await env.started("ep", tenant, MAIN)
    ep.safe_psql("CREATE TABLE x (i int); INSERT INTO x VALUES (1)")
    await env.wait_for_last_record_lsn(tenant, MAIN, ep.current_flush_lsn())
    for _ in range(3):
        other = await env.create_tenant()
        await env.create_timeline(other, MAIN)
    await ep.stop()
