"""Tenants with real Postgres: bootstrap by initdb as the unprivileged user, timeline deletion,
load-time cleanup of interrupted work, and tenant config persisted in the legacy config file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from neon.pageserver.metadata import load_metadata
from neon.pageserver.page_cache import MaterializedPageCache
from neon.pageserver.tenant import Tenant, TenantError, TimelineExists, TimelineNotFound
from neon.pageserver.tenant_config import TenantConfOverrides
from neon.postgres.constants import BLCKSZ
from neon.postgres.controlfile import ControlFileData
from neon.utils.id import TenantId, TimelineId
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from tests.fixtures.vanilla import make_test_root


@pytest.fixture
async def tenant() -> AsyncIterator[Tenant]:
    root = make_test_root(prefix="neon-tenant-")
    shm = Path(tempfile.mkdtemp(dir=scratch_parent())) if os.access("/dev/shm", os.W_OK) else root
    shm.chmod(0o755)
    tid = TenantId.generate()
    mgr = WalRedoManager(str(tid), PostgresRedoLauncher(shm / "walredo"), timeout=30)
    t = Tenant.create(root / "tenants", tid, walredo=mgr, page_cache=MaterializedPageCache(), scratch_dir=root)
    yield t
    await t.shutdown(flush=False)
    await mgr.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)


def reload(t: Tenant) -> Tenant:
    return Tenant.load(t.path, walredo=t.walredo, page_cache=MaterializedPageCache(), scratch_dir=t.scratch_dir)


async def test_bootstrap_runs_initdb_and_imports_it(tenant: Tenant) -> None:
    tl = await tenant.bootstrap_timeline(TimelineId.generate())
    md = load_metadata(tl.path)
    # Spec §1.8: disk_consistent at the end of the shutdown checkpoint record, prev at its start.
    assert md.initdb_lsn == md.latest_gc_cutoff_lsn == tl.prev_record_lsn
    assert md.disk_consistent_lsn == tl.last_record_lsn > md.initdb_lsn
    assert md.prev_record_lsn == tl.prev_record_lsn and md.ancestor_timeline is None and md.pg_version == 15
    cf = ControlFileData.decode(tl.get_control_file(tl.last_record_lsn))
    assert cf.checkpoint == md.initdb_lsn
    lsn = tl.last_record_lsn
    dbs = tl.list_dbdirs(lsn)
    assert (1664, 0) in dbs and (1663, 1) in dbs and len(dbs) == 4  # global, template1, template0, postgres
    rels = tl.list_rels(1663, 5, lsn)
    assert len(rels) > 200
    assert tl.calculate_logical_size(lsn) == sum(tl.get_db_size(*db, lsn) for db in dbs) > 20 * 1024 * 1024
    assert not list(tenant.timelines_path.glob("basebackup-*")) and not list(tenant.scratch_dir.glob("basebackup-*"))  # type: ignore[union-attr]
    # The initdb output was removed; a page of pg_class reads back as a page of pg_class.
    page = await tl.get_rel_page_at_lsn(sorted(rels)[0], 0, lsn)
    assert len(page) == BLCKSZ
    with pytest.raises(TimelineExists):
        await tenant.bootstrap_timeline(tl.timeline_id)


async def test_delete_timeline_and_branch_rules(tenant: Tenant, test_root: Path) -> None:
    main = await tenant.bootstrap_timeline(TimelineId.generate())
    child = await tenant.branch_timeline(TimelineId.generate(), main.timeline_id)
    with pytest.raises(TenantError, match="child timelines"):
        await tenant.delete_timeline(main.timeline_id)
    await tenant.delete_timeline(child.timeline_id)
    assert not child.path.exists()
    with pytest.raises(TimelineNotFound):
        tenant.get_timeline(child.timeline_id)
    t2 = reload(tenant)
    assert set(t2.timelines) == {main.timeline_id}
    await t2.shutdown()


async def test_load_cleans_up_interrupted_creation_and_deletion(tenant: Tenant) -> None:
    main = await tenant.bootstrap_timeline(TimelineId.generate())
    tdir = tenant.timelines_path
    # A creation that never finished, and a deletion that never finished.
    unfinished = TimelineId.generate()
    (tdir / str(unfinished)).mkdir()
    (tdir / f"{unfinished}___uninit").touch()
    deleted = await tenant.branch_timeline(TimelineId.generate(), main.timeline_id)
    (tdir / f"{deleted.timeline_id}___delete").touch()
    # Leftovers of interrupted writes inside a timeline directory.
    (main.path / "metadata.___temp").write_bytes(b"x")
    future = main.path / (
        "000000000000000000000000000000000000-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF__"
        f"{int(main.disk_consistent_lsn) + 8:016X}-{int(main.disk_consistent_lsn) + 0x1001:016X}"
    )
    future.write_bytes(b"never recorded in the metadata")
    await tenant.shutdown()
    t2 = reload(tenant)
    assert set(t2.timelines) == {main.timeline_id}
    assert sorted(p.name for p in tdir.iterdir()) == [str(main.timeline_id)]
    assert not (main.path / "metadata.___temp").exists()
    assert not future.exists() and future.with_name(future.name + ".old").exists()
    await t2.shutdown()


async def test_tenant_config_overrides_persist(tenant: Tenant) -> None:
    assert tenant.conf().checkpoint_distance == 256 * 1024 * 1024
    tenant.set_overrides(TenantConfOverrides(checkpoint_distance=1 << 20, gc_period="30s"))
    text = (tenant.path / "config").read_text()
    assert "[tenant_config]" in text and "checkpoint_distance = 1048576" in text and 'gc_period = "30s"' in text
    t2 = reload(tenant)
    assert t2.conf().checkpoint_distance == 1 << 20 and t2.conf().gc_period.total_seconds() == 30
    assert t2.conf().compaction_threshold == 10  # defaults for the rest
    (tenant.path / "config").write_text("[tenant_config]\ncheckpoint_distanse = 5\n")
    with pytest.raises(ValueError, match="checkpoint_distanse"):
        reload(tenant)
