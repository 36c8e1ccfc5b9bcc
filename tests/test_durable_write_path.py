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
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest_asyncio

from neon.compute import Endpoint
from neon.utils.lsn import Lsn
from tests.fixtures.storage_env import StorageEnv, wait_until

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
    """One INSERT in autocommit; `done` is set when its COMMIT returned."""

    def __init__(self, ep: Endpoint, value: int) -> None:
        super().__init__(daemon=True)
        self.ep, self.value = ep, value
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.ep.connstr(), autocommit=True) as conn:
                conn.execute("INSERT INTO q VALUES (%s)", (self.value,))
            self.done.set()
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
    blocked = Committer(ep, 2)
    blocked.start()
    # A negative check needs a bound: the COMMIT must still be waiting after a while.
    assert not await asyncio.to_thread(blocked.done.wait, 3.0), blocked.error
    sk2.start()
    assert await asyncio.to_thread(blocked.done.wait, 60.0)
    assert blocked.error is None, blocked.error
    sk1.start()
    assert ep.safe_psql("SELECT i FROM q ORDER BY i") == [(1,), (2,)]
    await ep.stop()
