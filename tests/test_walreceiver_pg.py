"""The WAL receiver against a stock PG15 primary: it follows the primary as a replication client,
survives a primary restart, and ends with exactly the primary's data (storage oracle)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from neon.pageserver.page_cache import MaterializedPageCache
from neon.pageserver.tenant import Tenant
from neon.pageserver.timeline import Timeline
from neon.pageserver.walreceiver import WalReceiver, WalSource
from neon.utils.id import TenantId, TimelineId
from neon.utils.lsn import Lsn
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from tests.fixtures.vanilla import VanillaPostgres
from tests.storage_oracle import DatadirReader, collect_rmids, compare_with_datadir, shutdown_checkpoint_end
from tests.walworkload import WORKLOAD_CONFIG

WAIT = 60.0
Setup = tuple[VanillaPostgres, Tenant, Timeline, WalRedoManager]


@pytest.fixture
async def setup(test_root: Path) -> AsyncIterator[Setup]:
    pg = VanillaPostgres(test_root / "pg").init()
    pg.configure([*WORKLOAD_CONFIG, "wal_sender_timeout = '5s'"])
    initdb_copy = pg.copy_datadir(test_root / "initdb")
    shm = Path(tempfile.mkdtemp(dir=scratch_parent())) if os.access("/dev/shm", os.W_OK) else test_root
    shm.chmod(0o755)
    tid = TenantId.generate()
    mgr = WalRedoManager(str(tid), PostgresRedoLauncher(shm / "walredo"), timeout=30)
    tenant = Tenant.create(
        test_root / "tenants", tid, walredo=mgr, page_cache=MaterializedPageCache(), scratch_dir=test_root
    )
    tl = await tenant.import_timeline(TimelineId.generate(), initdb_copy)
    pg.start()
    yield pg, tenant, tl, mgr
    pg.cleanup()
    await tenant.shutdown(flush=False)
    await mgr.shutdown()
    shutil.rmtree(shm, ignore_errors=True)


async def test_follows_a_primary_across_restarts(
    setup: tuple[VanillaPostgres, Tenant, Timeline, WalRedoManager],
) -> None:
    pg, tenant, tl, mgr = setup
    receiver = WalReceiver(tl, WalSource(str(pg.sockdir), pg.port), backoff_initial=0.05, backoff_max=0.5)
    receiver.start()
    try:
        pg.pgbench(["-i", "-s", "1", "-q"])
        pg.safe_psql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        pg.safe_psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        await tl.wait_lsn(Lsn.parse(pg.current_wal_lsn()), WAIT)
        assert receiver.status.connected and receiver.status.connects == 1
        # The primary goes away and comes back: the receiver reconnects and resumes where it was.
        pg.restart()
        pg.safe_psql("UPDATE t SET v = v || 'x' WHERE id % 3 = 0; DELETE FROM t WHERE id % 7 = 0")
        pg.pgbench(["-c", "2", "-t", "100", "-n"])
        await tl.wait_lsn(Lsn.parse(pg.current_wal_lsn()), WAIT)
        assert receiver.status.connects >= 2
        rows = pg.safe_psql(
            "SELECT write_lsn, flush_lsn, replay_lsn FROM pg_stat_replication WHERE application_name = 'pageserver'"
        )
        assert rows, "the primary does not see the receiver"
        rmids = collect_rmids(pg)
        pg.stop()
        end = shutdown_checkpoint_end(pg.datadir)
        await tl.wait_lsn(end, WAIT)  # the walsender sends the shutdown checkpoint before it exits
    finally:
        await receiver.stop()
    assert tl.last_record_lsn == end
    mismatches = await compare_with_datadir(
        tl, end, DatadirReader(pg.datadir), rmids, mgr.mask, allow_trailing_zero_pages=True
    )
    assert mismatches == []
    assert tenant.compaction_errors == 0


async def test_refuses_another_system(
    setup: tuple[VanillaPostgres, Tenant, Timeline, WalRedoManager], test_root: Path
) -> None:
    _, _, tl, _ = setup
    other = VanillaPostgres(test_root / "other", port=5433).init().start()
    try:
        receiver = WalReceiver(tl, WalSource(str(other.sockdir), other.port), backoff_initial=0.05, backoff_max=0.2)
        receiver.start()
        other.safe_psql("CREATE TABLE x (i int); INSERT INTO x VALUES (1)")
        await asyncio.wait_for(receiver.connection_failed.wait(), WAIT)
        await receiver.stop()
        assert receiver.status.last_error and "belongs to system" in receiver.status.last_error
        assert not receiver.status.connected
    finally:
        other.cleanup()


async def test_wal_source_is_persisted_and_resumed_after_a_reload(setup: Setup) -> None:
    pg, tenant, tl, mgr = setup
    await tenant.set_wal_source(tl.timeline_id, WalSource.parse(f"host={pg.sockdir} port={pg.port} user=cloud_admin"))
    assert tenant.wal_source(tl.timeline_id) == WalSource(str(pg.sockdir), pg.port)
    pg.safe_psql("CREATE TABLE a (i int); INSERT INTO a SELECT generate_series(1, 1000)")
    await tl.wait_lsn(Lsn.parse(pg.current_wal_lsn()), WAIT)
    await tenant.shutdown()  # stops the receiver, flushes
    reloaded = Tenant.load(tenant.path, walredo=mgr, page_cache=MaterializedPageCache(), scratch_dir=tenant.scratch_dir)
    try:
        reloaded.start_background_loops()  # resumes streaming from disk_consistent_lsn
        tl2 = reloaded.get_timeline(tl.timeline_id)
        pg.safe_psql("INSERT INTO a SELECT generate_series(1001, 2000)")
        await tl2.wait_lsn(Lsn.parse(pg.current_wal_lsn()), WAIT)
        await reloaded.set_wal_source(tl.timeline_id, None)
        assert reloaded.wal_source(tl.timeline_id) is None and not reloaded.wal_receivers
    finally:
        await reloaded.shutdown()
    with pytest.raises(ValueError, match="unsupported connection string key"):
        WalSource.parse("host=/tmp sslmode=require")
