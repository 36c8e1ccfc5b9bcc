"""The storage oracle harness on its own: the workload does what it claims, and comparing
data directories finds exactly the differences there are (and none where there are none)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from neon.postgres import slru
from neon.postgres.constants import BLCKSZ, DEFAULTTABLESPACE_OID, MAIN_FORKNUM, RM_HEAP_ID
from neon.postgres.controlfile import ControlFileData
from neon.postgres.page import page_get_item_id, page_get_max_offset_number
from neon.postgres.walformat import parse_wal_file_name
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from neon.walredo.records import SlruKind
from tests.fixtures.vanilla import make_test_root
from tests.storage_oracle import (
    DatadirReader,
    RelTag,
    StorageReader,
    WorkloadRun,
    compare_with_datadir,
    copy_datadir,
    shutdown_checkpoint_end,
)

TENANT = "0123456789abcdef0123456789abcdef"
LP_NORMAL = 1


@pytest.fixture
def run(storage_workload: WorkloadRun) -> WorkloadRun:
    return storage_workload


@pytest.fixture
async def manager() -> AsyncIterator[WalRedoManager]:
    scratch = make_test_root(prefix="neon-redo-scratch-") if not os.access("/dev/shm", os.W_OK) else None
    base = scratch or Path(tempfile.mkdtemp(dir=scratch_parent()))
    base.chmod(0o755)
    mgr = WalRedoManager(TENANT, PostgresRedoLauncher(base / "walredo"), timeout=20)
    yield mgr
    await mgr.shutdown()
    shutil.rmtree(base, ignore_errors=True)


def _largest_heap(reader: DatadirReader, run: WorkloadRun, db: int) -> RelTag:
    rels = [
        t
        for t in reader.list_rels(DEFAULTTABLESPACE_OID, db, 0)
        if t.fork == MAIN_FORKNUM and run.rmids.get((t.spc, t.db, t.rel)) == RM_HEAP_ID
    ]
    return max(rels, key=lambda t: reader.get_rel_size(t, 0))


# --- the workload --------------------------------------------------------------------------------
def test_workload_did_what_it_claims(run: WorkloadRun) -> None:
    a, b = DatadirReader(run.snap_a.datadir), DatadirReader(run.snap_b.datadir)
    assert isinstance(a, StorageReader)

    # Snapshot A holds the prepared transaction left open; B (after COMMIT PREPARED) none.
    (xid,) = a.list_twophase_files(run.snap_a.lsn)
    assert a.get_twophase_file(xid, run.snap_a.lsn)  # its CRC checks out
    assert b.list_twophase_files(run.snap_b.lsn) == set()

    # The databases created in part 2 stay, with their relmaps and tables.
    dbdirs = b.list_dbdirs(run.snap_b.lsn)
    for name in ("db_keep_file_copy", "db_keep_wal_log", "db_wal_log"):
        db = run.databases[name]
        assert dbdirs[(DEFAULTTABLESPACE_OID, db)] is True, name
        user_rels = [t for t in b.list_rels(DEFAULTTABLESPACE_OID, db, 0) if t.rel >= 16384 and t.fork == 0]
        assert any(b.get_rel_size(t, 0) > 0 for t in user_rels), name
        assert (DEFAULTTABLESPACE_OID, db) not in a.list_dbdirs(0) or name == "db_wal_log"
    assert "db_file_copy" not in run.databases  # part 1 dropped it
    assert dbdirs[(1664, 0)] is True

    # The 1200-subtransaction transaction committed, its xids spanning two pg_xact pages.
    xids = [run.subxact_top_xid, *run.subxact_xids]
    pages = {slru.clog_page(x) for x in xids}
    assert len(run.subxact_xids) == 1200 and len(pages) == 2, pages
    for x in xids:
        page = slru.clog_page(x)
        image = b.read_slru_block(SlruKind.CLOG, slru.segment_of_page(page), slru.page_in_segment(page))
        assert slru.clog_get_status(image, x) == slru.XidStatus.COMMITTED, x

    # Multixacts from both parts.
    checkpoint = ControlFileData.read(run.snap_b.datadir / "global/pg_control").checkpoint_copy
    assert checkpoint.next_multi > 1200 and checkpoint.next_multi_offset > slru.MULTIXACT_MEMBERS_PER_PAGE
    assert b.get_slru_segment_size(SlruKind.MULTIXACT_MEMBERS, 0, 0) >= 2

    # Snapshot LSNs, WAL from initdb's segment on, rmids for catalogs and shared catalogs.
    assert run.snap_a.lsn < run.snap_b.lsn
    assert shutdown_checkpoint_end(run.snap_b.datadir) == run.snap_b.lsn
    initdb = ControlFileData.read(run.initdb_copy / "global/pg_control")
    seg_size = initdb.xlog_seg_size
    segnos = [parse_wal_file_name(p.name, seg_size)[1] for p in run.wal_files]
    assert segnos == list(range(initdb.checkpoint // seg_size, segnos[0] + len(segnos)))
    assert segnos[-1] == run.snap_b.lsn // seg_size
    assert not (run.initdb_copy / "postmaster.opts").exists()  # copied before the first start
    assert any(k[:2] == (1664, 0) for k in run.rmids)
    assert any(k[1] == run.databases["template0"] for k in run.rmids)
    for snap in (a, b):
        for key in snap.list_dbdirs(0):
            for t in snap.list_rels(*key, 0):
                assert (t.spc, t.db, t.rel) in run.rmids, t


# --- the comparison ------------------------------------------------------------------------------
async def test_a_snapshot_equals_itself(run: WorkloadRun, manager: WalRedoManager) -> None:
    b = DatadirReader(run.snap_b.datadir)
    notes: list[str] = []
    assert await compare_with_datadir(b, run.snap_b.lsn, b, run.rmids, manager.mask, notes=notes) == []
    assert int(notes[-1].split()[0]) > 5000, notes


async def test_the_other_snapshot_differs(run: WorkloadRun, manager: WalRedoManager) -> None:
    """Negative control: snapshot A served where B is expected differs in every respect."""
    a, b = DatadirReader(run.snap_a.datadir), DatadirReader(run.snap_b.datadir)
    found = await compare_with_datadir(a, run.snap_b.lsn, b, run.rmids, manager.mask, max_details=100000)
    categories = {m.split(":")[0] for m in found}
    assert {"dbdirs", "rels", "page", "slru", "twophase"} <= categories, found[:20]
    capped = await compare_with_datadir(a, run.snap_b.lsn, b, run.rmids, manager.mask, max_details=10)
    assert len(capped) == 11 and capped[-1].startswith("... and "), capped[-1]


async def test_one_flipped_heap_byte_is_reported(run: WorkloadRun, manager: WalRedoManager) -> None:
    b = DatadirReader(run.snap_b.datadir)
    tampered = DatadirReader(copy_datadir(run.snap_b.datadir, run.root / "tamper_heap"))
    try:
        tag = _largest_heap(b, run, run.databases["postgres"])
        blk = 1
        page = bytearray(tampered.read_rel_block(tag, blk))
        item = next(
            it
            for n in range(1, page_get_max_offset_number(page) + 1)
            if (it := page_get_item_id(page, n)).flags == LP_NORMAL and it.len > 24
        )
        page[item.off + item.len - 1] ^= 0x5A  # the tuple's last data byte
        with open(tampered.segment_path(tag), "r+b") as f:
            f.seek(blk * BLCKSZ)
            f.write(page)
        found = await compare_with_datadir(tampered, run.snap_b.lsn, b, run.rmids, manager.mask)
        assert len(found) == 1, found
        assert found[0].startswith(f"page: {tag} blk {blk} differs masked as rmid {RM_HEAP_ID}"), found
    finally:
        shutil.rmtree(tampered.datadir, ignore_errors=True)


async def test_a_changed_pg_xact_byte_is_reported(run: WorkloadRun, manager: WalRedoManager) -> None:
    b = DatadirReader(run.snap_b.datadir)
    tampered = DatadirReader(copy_datadir(run.snap_b.datadir, run.root / "tamper_xact"))
    try:
        path = tampered.slru_path(SlruKind.CLOG, 0)
        raw = bytearray(path.read_bytes())
        raw[BLCKSZ + 100] ^= 0x03  # page 1
        path.write_bytes(raw)
        found = await compare_with_datadir(tampered, run.snap_b.lsn, b, run.rmids, manager.mask)
        assert found == ["slru: pg_xact/0000 page 1 differs: 1 bytes differ, first at offset 100"], found
    finally:
        shutil.rmtree(tampered.datadir, ignore_errors=True)


async def test_trailing_zero_pages(run: WorkloadRun, manager: WalRedoManager) -> None:
    """Blocks of zeros in the data directory past the reader's end: a size mismatch that says so,
    accepted only when asked for."""
    b = DatadirReader(run.snap_b.datadir)
    longer = DatadirReader(copy_datadir(run.snap_b.datadir, run.root / "longer"))
    try:
        tag = _largest_heap(b, run, run.databases["db_keep_file_copy"])
        size = b.get_rel_size(tag, 0)
        with open(longer.segment_path(tag), "ab") as f:
            f.write(bytes(2 * BLCKSZ))
        found = await compare_with_datadir(b, run.snap_b.lsn, longer, run.rmids, manager.mask)
        assert found == [f"size: {tag} reader {size} blocks, datadir {size + 2}: the extra blocks are all zero"]
        notes: list[str] = []
        assert (
            await compare_with_datadir(
                b, run.snap_b.lsn, longer, run.rmids, manager.mask, allow_trailing_zero_pages=True, notes=notes
            )
            == []
        )
        assert any("trailing all-zero" in n for n in notes), notes
    finally:
        shutil.rmtree(longer.datadir, ignore_errors=True)
