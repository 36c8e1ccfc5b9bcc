"""The redo manager with the real helper: reconstruction oracle, the stderr race, faults,
and Neon's own record kinds against a real cluster's VM, pg_xact and pg_multixact pages."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from neon.postgres import slru
from neon.postgres.constants import (
    BLCKSZ,
    RM_BRIN_ID,
    RM_BTREE_ID,
    RM_CLOG_ID,
    RM_GIN_ID,
    RM_GIST_ID,
    RM_HASH_ID,
    RM_HEAP_ID,
    RM_MULTIXACT_ID,
    RM_SEQ_ID,
    RM_SPGIST_ID,
    RM_XACT_ID,
    VISIBILITYMAP_FORKNUM,
)
from neon.postgres.crc32c import crc32c
from neon.postgres.errors import WalDecodeError
from neon.postgres.records import clog as clog_rec
from neon.postgres.records import multixact as mx_rec
from neon.postgres.records import xact as xact_rec
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walrecord import decode_record
from neon.walredo.launcher import PostgresRedoLauncher, scratch_parent
from neon.walredo.manager import WalRedoManager
from neon.walredo.process import WalRedoError
from neon.walredo.records import (
    BufferTag,
    ClogSetAborted,
    ClogSetCommitted,
    MultixactMembersCreate,
    MultixactOffsetCreate,
    PostgresRecord,
    SlruKind,
    SlruPage,
    WalRecord,
)
from tests.fixtures.vanilla import VanillaPostgres, make_test_root
from tests.redo_oracle import RedoHistories, collect_histories
from tests.storage_oracle import AM_RMGR, NOT_WAL_LOGGED
from tests.walworkload import WORKLOAD_CONFIG, run_varied_workload

TENANT = "0123456789abcdef0123456789abcdef"
# FSM pages are not WAL-logged at all and are never compared; NOT_WAL_LOGGED lists the rest of
# what PostgreSQL never WAL-logs (see tests/storage_oracle.py).
BULK_EXTENDED = "all-zero page without WAL (bulk relation extension)"


@dataclass
class Relation:
    name: str
    rmid: int
    path: Path


@dataclass
class Cluster:
    pg: VanillaPostgres
    histories: RedoHistories
    relations: dict[tuple[int, int, int], Relation]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = make_test_root(prefix="neon-redo-oracle-")
    pg = VanillaPostgres(root / "pg").init()
    pg.configure([*WORKLOAD_CONFIG, "wal_compression = lz4"])
    pg.start()
    try:
        run_varied_workload(pg)
        rows = pg.safe_psql(
            "SELECT c.relname, c.relkind, coalesce(a.amname, ''), pg_relation_filenode(c.oid),"
            " d.oid FROM pg_class c LEFT JOIN pg_am a ON a.oid = c.relam, pg_database d"
            " WHERE d.datname = current_database() AND pg_relation_filenode(c.oid) >= 16384"
            " AND c.relpersistence = 'p'"
        )
    finally:
        pg.stop()
    relations = {}
    for name, kind, am, filenode, db in rows:
        rmid = RM_SEQ_ID if kind == "S" else AM_RMGR.get(am, RM_HEAP_ID)
        relations[(1663, db, filenode)] = Relation(name, rmid, pg.datadir / "base" / str(db) / str(filenode))
    yield Cluster(pg, collect_histories(pg.wal_segments()), relations)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def manager() -> AsyncIterator[WalRedoManager]:
    scratch = make_test_root(prefix="neon-redo-scratch-") if not os.access("/dev/shm", os.W_OK) else None
    base = scratch or Path(__import__("tempfile").mkdtemp(dir=scratch_parent()))
    base.chmod(0o755)
    mgr = WalRedoManager(TENANT, PostgresRedoLauncher(base / "walredo"), timeout=20)
    yield mgr
    await mgr.shutdown()
    shutil.rmtree(base, ignore_errors=True)


FORK_SUFFIX = {0: "", 1: "_fsm", 2: "_vm"}


def read_block(rel: Relation, fork: int, blk: int) -> bytes | None:
    path = rel.path.with_name(rel.path.name + FORK_SUFFIX[fork])
    try:
        with open(path, "rb") as f:
            f.seek(blk * BLCKSZ)
            page = f.read(BLCKSZ)
    except FileNotFoundError:
        return None
    return page if len(page) == BLCKSZ else None


async def reconstruct(mgr: WalRedoManager, h, lsn: int) -> bytes:  # type: ignore[no-untyped-def]
    if not h.records:
        assert h.base is not None
        return h.base[1]
    return await mgr.request_redo(h.tag, lsn, h.base, h.records)


async def test_reconstruction_oracle(cluster: Cluster, manager: WalRedoManager) -> None:
    hist = cluster.histories
    compared: dict[str, int] = {}
    excepted: dict[str, int] = {}
    mismatches: list[str] = []
    missing: list[str] = []
    for key, rel in cluster.relations.items():
        for fork in (0, VISIBILITYMAP_FORKNUM):
            path = rel.path.with_name(rel.path.name + FORK_SUFFIX[fork])
            if not path.exists():
                continue
            if fork == VISIBILITYMAP_FORKNUM and key in hist.vm_truncated:
                continue
            for blk in range(path.stat().st_size // BLCKSZ):
                tag = BufferTag(*key, fork, blk)
                h = hist.blocks.get(tag)
                real = read_block(rel, fork, blk)
                assert real is not None
                if h is None:
                    if not any(real):
                        # A relation extended by several pages at once under contention (PG's bulk
                        # extension) gets the extra pages as zeros on disk without any WAL.
                        excepted[BULK_EXTENDED] = excepted.get(BULK_EXTENDED, 0) + 1
                    else:
                        missing.append(f"{rel.name} {tag}")
                    continue
                got = await reconstruct(manager, h, hist.end_lsn)
                if fork == VISIBILITYMAP_FORKNUM:
                    same = got == real  # no hint bits on VM pages: byte-exact
                else:
                    same = await manager.mask(rel.rmid, blk, got) == await manager.mask(rel.rmid, blk, real)
                kind = f"{rel.rmid}/{fork}"
                if same:
                    compared[kind] = compared.get(kind, 0) + 1
                    continue
                reason = next((r for r, f in NOT_WAL_LOGGED.items() if f(rel.rmid, fork, tag.blk)), None)
                if reason is not None:
                    excepted[reason] = excepted.get(reason, 0) + 1
                else:
                    mismatches.append(f"{rel.name} {tag} ({len(h.records)} records)")
    assert not missing, f"blocks without a WAL history: {missing[:20]}"
    assert not mismatches, f"{len(mismatches)} reconstructed pages differ: {mismatches[:20]}"
    for rmid in (RM_HEAP_ID, RM_BTREE_ID, RM_GIN_ID, RM_GIST_ID, RM_SPGIST_ID, RM_BRIN_ID, RM_HASH_ID):
        assert compared.get(f"{rmid}/0", 0) > 0, (rmid, compared)
    assert compared.get(f"{RM_HEAP_ID}/{VISIBILITYMAP_FORKNUM}", 0) > 0, compared
    assert sum(compared.values()) > 1000, compared
    bulk = excepted.pop(BULK_EXTENDED, 0)
    assert set(excepted) <= set(NOT_WAL_LOGGED) and sum(excepted.values()) <= 4, excepted
    assert bulk < 100, f"{bulk} all-zero pages without WAL"


async def test_a_dropped_record_is_detected(cluster: Cluster, manager: WalRedoManager) -> None:
    """Negative control: leaving out one record makes the comparison fail."""
    detected = 0
    for tag, h in cluster.histories.blocks.items():
        rel = cluster.relations.get((tag.spc, tag.db, tag.rel))
        if rel is None or rel.rmid != RM_HEAP_ID or tag.fork != 0 or len(h.records) < 3:
            continue
        real = read_block(rel, 0, tag.blk)
        if real is None:
            continue
        last = decode_record(h.records[-1][1].rec)  # type: ignore[union-attr]
        if last.rmid != RM_HEAP_ID or last.info & 0x70 not in (0x00, 0x10, 0x20, 0x40):
            continue
        got = await manager.request_redo(tag, cluster.histories.end_lsn, h.base, h.records[:-1])
        assert await manager.mask(RM_HEAP_ID, tag.blk, got) != await manager.mask(RM_HEAP_ID, tag.blk, real)
        detected += 1
        if detected == 5:
            break
    assert detected == 5


def _short_requests(cluster: Cluster, n: int) -> list[tuple[BufferTag, tuple[int, bytes] | None, list]]:
    out = []
    for tag, h in cluster.histories.blocks.items():
        if tag.fork == 0 and 1 <= len(h.records) <= 6 and all(isinstance(r, PostgresRecord) for _, r in h.records):
            out.append((tag, h.base, h.records))
            if len(out) == n:
                break
    return out


async def test_stderr_race_with_logging_helper(cluster: Cluster) -> None:
    """8+ tasks, thousands of requests, a helper that logs on every request: zero failures."""
    base = Path(__import__("tempfile").mkdtemp(dir=scratch_parent()))
    base.chmod(0o755)
    mgr = WalRedoManager(TENANT, PostgresRedoLauncher(base / "w", log_each_request=True), timeout=30)
    reqs = _short_requests(cluster, 200)
    expected = {}
    for tag, b, recs in reqs:
        expected[tag] = await mgr.request_redo(tag, 1, b, recs)
    n_tasks, per_task = 12, 250

    async def worker(i: int) -> None:
        for j in range(per_task):
            tag, b, recs = reqs[(i * 31 + j) % len(reqs)]
            assert await mgr.request_redo(tag, 1, b, recs) == expected[tag]

    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.gather(*(worker(i) for i in range(n_tasks)))
            proc = mgr.process
            assert proc is not None
            await mgr.shutdown()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert mgr.metrics.process_restarts.value == 0
    assert mgr.metrics.failures.value == 0
    lines = [e for e in logs if e["event"] == "received output"]
    request_lines = [e for e in lines if "GetPage" in e["output"] or "request" in e["output"].lower()]
    assert len(request_lines) >= n_tasks * per_task, (len(request_lines), lines[:3])
    assert all(e["pid"] == proc.pid and e["tenant_id"] == TENANT and e["pg_version"] == 15 for e in lines)


def _with_bad_data(rec: bytes) -> bytes:
    """The record with its main data (xl_heap_insert's offnum) made nonsense, CRC fixed up."""
    r = decode_record(rec)
    body = bytearray(rec)
    struct.pack_into("<H", body, r.main_data_off, 0x7FFF)
    struct.pack_into("<I", body, 20, crc32c(bytes(body[:20]), crc32c(bytes(body[24:]))))
    return bytes(body)


async def test_faults(cluster: Cluster, manager: WalRedoManager) -> None:
    reqs = _short_requests(cluster, 100)
    tag, b, recs = reqs[0]
    good = await manager.request_redo(tag, 1, b, recs)

    # SIGKILL while requests are in flight: they are retried on a fresh process.
    first = manager.process
    assert first is not None
    tasks = [asyncio.create_task(manager.request_redo(t, 1, bb, rr)) for t, bb, rr in reqs]
    await asyncio.sleep(0)
    os.kill(first.pid, signal.SIGKILL)
    results = await asyncio.gather(*tasks)
    assert results[0] == good
    assert manager.process is not None and manager.process.pid != first.pid

    # A record that makes the helper ERROR: a clear error, then the next valid request works.
    insert = next(
        (t, bb, rr)
        for t, bb, rr in reqs
        if any(decode_record(r.rec).rmid == RM_HEAP_ID and decode_record(r.rec).info & 0x70 == 0 for _, r in rr[1:])
    )
    t, bb, rr = insert
    k = next(
        i
        for i, (_, r) in enumerate(rr)
        if i and decode_record(r.rec).rmid == RM_HEAP_ID and decode_record(r.rec).info & 0x70 == 0
    )
    broken = [*rr[:k], (rr[k][0], PostgresRecord(False, _with_bad_data(rr[k][1].rec)))]
    with pytest.raises(WalRedoError, match=r"error applying \d+ WAL records .* n_attempts=1"):
        await manager.request_redo(t, 1, bb, broken)
    assert await manager.request_redo(tag, 1, b, recs) == good

    # Garbage bytes as a record: a clear error, no hang.
    junk = [(0x1000000, PostgresRecord(True, os.urandom(200)))]
    with pytest.raises(WalRedoError, match="error applying 1 WAL records"):
        await asyncio.wait_for(manager.request_redo(tag, 1, None, junk), 60)
    assert await manager.request_redo(tag, 1, b, recs) == good

    # A stopped helper: the request's attempt times out, the process is replaced.
    manager.timeout = 2.0
    stopped = manager.process
    assert stopped is not None
    stopped.stop_process()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await manager.request_redo(tag, 1, b, recs) == good
    assert loop.time() - t0 < 2.0 + 5
    assert stopped.proc.returncode is not None
    assert manager.process is not None and manager.process.pid != stopped.pid


# --- Neon's own record kinds -------------------------------------------------------------------
def neon_slru_records(files: list[Path]) -> dict[SlruPage, list[tuple[int, WalRecord] | tuple[int, None]]]:
    """What the pageserver's ingest stores for pg_xact and pg_multixact pages, from the WAL:
    (lsn, None) means "the page is zeroed here", else a Neon record to apply."""
    pages: dict[SlruPage, list] = {}

    def put(page: SlruPage, lsn: int, rec: WalRecord | None) -> None:
        pages.setdefault(page, []).append((lsn, rec))

    def slru_page(kind: SlruKind, pageno: int) -> SlruPage:
        return SlruPage(kind, slru.segment_of_page(pageno), slru.page_in_segment(pageno))

    try:
        for start, end, raw in read_wal_files(files):
            r = decode_record(raw, start)
            if r.rmid == RM_XACT_ID and r.info & 0x70 in (0x00, 0x20, 0x30, 0x40):
                x = xact_rec.XactCommitAbort.unpack(r.info, r.main_data)
                by_page: dict[int, list[int]] = {}
                for xid in x.decided_xids(r.xid):
                    by_page.setdefault(slru.clog_page(xid), []).append(xid)
                for pageno, xids in by_page.items():
                    rec = ClogSetCommitted(tuple(xids), x.xact_time) if x.is_commit else ClogSetAborted(tuple(xids))
                    put(slru_page(SlruKind.CLOG, pageno), end, rec)
            elif r.rmid == RM_CLOG_ID and r.info & 0xF0 == clog_rec.CLOG_ZEROPAGE:
                put(slru_page(SlruKind.CLOG, clog_rec.ClogZeroPage.unpack(r.main_data).pageno), end, None)
            elif r.rmid == RM_MULTIXACT_ID:
                op = r.info & 0xF0
                if op in (mx_rec.XLOG_MULTIXACT_ZERO_OFF_PAGE, mx_rec.XLOG_MULTIXACT_ZERO_MEM_PAGE):
                    z = mx_rec.MultiXactZeroPage.unpack(r.info, r.main_data)
                    kind = SlruKind.MULTIXACT_MEMBERS if z.members else SlruKind.MULTIXACT_OFFSETS
                    put(slru_page(kind, z.pageno), end, None)
                elif op == mx_rec.XLOG_MULTIXACT_CREATE_ID:
                    c = mx_rec.MultiXactCreate.unpack(r.main_data)
                    put(
                        slru_page(SlruKind.MULTIXACT_OFFSETS, slru.mxoff_page(c.mid)),
                        end,
                        MultixactOffsetCreate(c.mid, c.moff),
                    )
                    # PG 15.20 also pre-fills the next multixact's starting offset.
                    nxt = slru.next_multixact_id(c.mid)
                    put(
                        slru_page(SlruKind.MULTIXACT_OFFSETS, slru.mxoff_page(nxt)),
                        end,
                        MultixactOffsetCreate(nxt, (c.moff + c.nmembers) & 0xFFFFFFFF),
                    )
                    by_mpage: dict[int, list[tuple[int, tuple[int, int]]]] = {}
                    for i, m in enumerate(c.members):
                        off = (c.moff + i) & 0xFFFFFFFF
                        by_mpage.setdefault(slru.member_page(off), []).append((off, (m.xid, m.status)))
                    for mpage, items in by_mpage.items():
                        put(
                            slru_page(SlruKind.MULTIXACT_MEMBERS, mpage),
                            end,
                            MultixactMembersCreate(items[0][0], tuple(m for _, m in items)),
                        )
    except WalDecodeError:
        pass
    return pages


async def test_neon_records_rebuild_slru_pages(cluster: Cluster, manager: WalRedoManager) -> None:
    pages = neon_slru_records(cluster.pg.wal_segments())
    dirs = {
        SlruKind.CLOG: "pg_xact",
        SlruKind.MULTIXACT_OFFSETS: "pg_multixact/offsets",
        SlruKind.MULTIXACT_MEMBERS: "pg_multixact/members",
    }
    checked: dict[SlruKind, int] = {}
    for page, events in pages.items():
        # Replay from the last zeroing; pages never zeroed in the WAL start from zeros too
        # (initdb's bootstrap creates them without WAL).
        zeroed = [i for i, (_, rec) in enumerate(events) if rec is None]
        tail = events[zeroed[-1] + 1 :] if zeroed else events
        image = bytes(BLCKSZ)
        recs = [(lsn, rec) for lsn, rec in tail if rec is not None]
        if recs:
            image = await manager.request_redo(page, recs[-1][0], (0, image), recs)
        path = cluster.pg.datadir / dirs[page.kind] / slru.segment_file_name(page.segno)
        with open(path, "rb") as f:
            f.seek(page.blk * BLCKSZ)
            real = f.read(BLCKSZ)
        real = real.ljust(BLCKSZ, b"\0")
        assert image[:BLCKSZ] == real, f"{page} differs"
        if page.kind is SlruKind.CLOG and any(isinstance(r, ClogSetCommitted) for _, r in recs):
            assert len(image) == BLCKSZ + 8  # the commit-timestamp trailer
        checked[page.kind] = checked.get(page.kind, 0) + 1
    assert checked.get(SlruKind.CLOG, 0) >= 1
    assert checked.get(SlruKind.MULTIXACT_OFFSETS, 0) >= 1
    assert checked.get(SlruKind.MULTIXACT_MEMBERS, 0) >= 1
    # And the negative control: one commit left out changes the pg_xact page.
    page, events = next((p, e) for p, e in pages.items() if p.kind is SlruKind.CLOG)
    recs = [(lsn, r) for lsn, r in events if r is not None]
    partial = await manager.request_redo(page, 1, (0, bytes(BLCKSZ)), recs[:-1])
    path = cluster.pg.datadir / "pg_xact" / slru.segment_file_name(page.segno)
    assert partial[:BLCKSZ] != path.read_bytes()[page.blk * BLCKSZ : (page.blk + 1) * BLCKSZ]
