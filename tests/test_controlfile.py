"""pg_control, pg_filenode.map, SLRU, page/VM/FSM and checksum code against a real PG15 cluster.

Oracles: pg_controldata, pg_class/pg_relation_filenode, txid_current/xmin and
pg_get_multixact_members, pageinspect, pg_visibility, and the server's own data checksums.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from neon.postgres import page as pg_page
from neon.postgres import slru
from neon.postgres.controlfile import ControlFileData, DBState, WalLevel
from neon.postgres.errors import PgFormatError
from neon.postgres.relmapfile import RelMapFile, relmap_path
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres

BLCKSZ = 8192


# --- helpers ----------------------------------------------------------------------------------
def controldata(pg: VanillaPostgres, datadir: Path | None = None) -> tuple[dict[str, str], str]:
    """pg_controldata output as {label: value}, and its stderr (CRC warnings go there)."""
    proc = pg.user.run(
        [pg.pg_bin("pg_controldata"), datadir or pg.datadir],
        env={**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"},
    )
    out = {}
    for line in proc.stdout.splitlines():
        label, sep, value = line.partition(":")
        if sep:
            out[label.strip()] = value.strip()
    return out, proc.stderr


def ctime_utc(t: int) -> str:
    # pg_controldata prints pg_time_t values with strftime("%c") in local time (TZ=UTC here).
    return time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(t))


def expected_controldata(cf: ControlFileData) -> dict[str, str]:
    cp = cf.checkpoint_copy
    onoff = {True: "on", False: "off"}
    return {
        "pg_control version number": str(cf.pg_control_version),
        "Catalog version number": str(cf.catalog_version_no),
        "Database system identifier": str(cf.system_identifier),
        "Database cluster state": cf.state_name,
        "pg_control last modified": ctime_utc(cf.time),
        "Latest checkpoint location": str(Lsn(cf.checkpoint)),
        "Latest checkpoint's REDO location": str(Lsn(cp.redo)),
        "Latest checkpoint's TimeLineID": str(cp.this_timeline_id),
        "Latest checkpoint's PrevTimeLineID": str(cp.prev_timeline_id),
        "Latest checkpoint's full_page_writes": onoff[cp.full_page_writes],
        "Latest checkpoint's NextXID": f"{cp.next_xid_epoch}:{cp.next_xid_xid}",
        "Latest checkpoint's NextOID": str(cp.next_oid),
        "Latest checkpoint's NextMultiXactId": str(cp.next_multi),
        "Latest checkpoint's NextMultiOffset": str(cp.next_multi_offset),
        "Latest checkpoint's oldestXID": str(cp.oldest_xid),
        "Latest checkpoint's oldestXID's DB": str(cp.oldest_xid_db),
        "Latest checkpoint's oldestActiveXID": str(cp.oldest_active_xid),
        "Latest checkpoint's oldestMultiXid": str(cp.oldest_multi),
        "Latest checkpoint's oldestMulti's DB": str(cp.oldest_multi_db),
        "Latest checkpoint's oldestCommitTsXid": str(cp.oldest_commit_ts_xid),
        "Latest checkpoint's newestCommitTsXid": str(cp.newest_commit_ts_xid),
        "Time of latest checkpoint": ctime_utc(cp.time),
        "Fake LSN counter for unlogged rels": str(Lsn(cf.unlogged_lsn)),
        "Minimum recovery ending location": str(Lsn(cf.min_recovery_point)),
        "Min recovery ending loc's timeline": str(cf.min_recovery_point_tli),
        "Backup start location": str(Lsn(cf.backup_start_point)),
        "Backup end location": str(Lsn(cf.backup_end_point)),
        "End-of-backup record required": {True: "yes", False: "no"}[cf.backup_end_required],
        "wal_level setting": WalLevel(cf.wal_level).name.lower(),
        "wal_log_hints setting": onoff[cf.wal_log_hints],
        "max_connections setting": str(cf.max_connections),
        "max_worker_processes setting": str(cf.max_worker_processes),
        "max_wal_senders setting": str(cf.max_wal_senders),
        "max_prepared_xacts setting": str(cf.max_prepared_xacts),
        "max_locks_per_xact setting": str(cf.max_locks_per_xact),
        "track_commit_timestamp setting": onoff[cf.track_commit_timestamp],
        "Maximum data alignment": str(cf.max_align),
        "Database block size": str(cf.blcksz),
        "Blocks per segment of large relation": str(cf.relseg_size),
        "WAL block size": str(cf.xlog_blcksz),
        "Bytes per WAL segment": str(cf.xlog_seg_size),
        "Maximum length of identifiers": str(cf.name_data_len),
        "Maximum columns in an index": str(cf.index_max_keys),
        "Maximum size of a TOAST chunk": str(cf.toast_max_chunk_size),
        "Size of a large-object chunk": str(cf.loblksize),
        "Float8 argument passing": "by value" if cf.float8_by_val else "by reference",
        "Data page checksum version": str(cf.data_checksum_version),
        "Mock authentication nonce": cf.mock_authentication_nonce.hex(),
    }


def write_as_is(path: Path, data: bytes) -> None:
    """Overwrite in place, keeping the Postgres user's ownership and mode."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def read_slru_page(directory: Path, pageno: int) -> bytes:
    seg = directory / slru.segment_file_name(slru.segment_of_page(pageno))
    with open(seg, "rb") as f:
        f.seek(slru.page_offset_in_segment_file(pageno))
        data = f.read(BLCKSZ)
    assert len(data) == BLCKSZ, f"{seg} has no page {pageno}"
    return data


def read_block(path: Path, blkno: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(blkno * BLCKSZ)
        data = f.read(BLCKSZ)
    assert len(data) == BLCKSZ
    return data


def nblocks(path: Path) -> int:
    size = path.stat().st_size
    assert size % BLCKSZ == 0
    return size // BLCKSZ


# --- pg_control -------------------------------------------------------------------------------
def test_pg_control_against_pg_controldata(vanilla_pg: VanillaPostgres) -> None:
    pg = vanilla_pg
    pg.start()
    pg.safe_psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
    pg.stop()
    path = pg.datadir / "global" / "pg_control"
    raw = path.read_bytes()
    assert len(raw) == 8192

    cf = ControlFileData.decode(raw)
    assert cf.state == DBState.SHUTDOWNED
    assert cf.checkpoint == cf.checkpoint_copy.redo  # a shutdown checkpoint
    actual, stderr = controldata(pg)
    assert not stderr
    assert {k: actual.get(k) for k in expected_controldata(cf)} == expected_controldata(cf)
    assert cf.encode() == raw

    # Edit fields of both parts (checkPointCopy, settings, state); pg_controldata must read the
    # new values and find the CRC good.
    edited = cf.replace(
        state=DBState.IN_PRODUCTION,
        max_connections=123,
        wal_level=WalLevel.LOGICAL,
        checkpoint_copy=cf.checkpoint_copy.replace(next_oid=54321, next_xid=(7 << 32) | 4242),
        unlogged_lsn=0x1_0000_2000,
    )
    write_as_is(path, edited.encode())
    actual, stderr = controldata(pg)
    assert not stderr, stderr
    assert actual["Database cluster state"] == "in production"
    assert actual["max_connections setting"] == "123"
    assert actual["wal_level setting"] == "logical"
    assert actual["Latest checkpoint's NextOID"] == "54321"
    assert actual["Latest checkpoint's NextXID"] == "7:4242"
    assert actual["Fake LSN counter for unlogged rels"] == "1/2000"
    assert {k: actual.get(k) for k in expected_controldata(edited)} == expected_controldata(edited)
    assert ControlFileData.read(path) == edited.replace(crc=ControlFileData.read(path).crc)

    # The server starts on our encoding; the changed setting only makes it log PARAMETER_CHANGE
    # and store its configured value again.
    write_as_is(path, cf.replace(max_connections=77).encode())
    pg.start()
    assert pg.safe_psql("SHOW max_connections") == [("100",)]
    assert pg.safe_psql("SELECT count(*) FROM t") == [(100,)]
    pg.stop()
    after = ControlFileData.read(path)
    assert after.max_connections == 100 and after.state == DBState.SHUTDOWNED
    assert after.checkpoint > cf.checkpoint


def test_pg_control_rejects_damage(vanilla_pg: VanillaPostgres) -> None:
    raw = (vanilla_pg.datadir / "global" / "pg_control").read_bytes()
    cf = ControlFileData.decode(raw)

    for off in (0, 17, 21, 40, 60, 101, 150, 287):  # fields and padding bytes are all under the CRC
        bad = bytearray(raw)
        bad[off] ^= 0x01
        with pytest.raises(PgFormatError, match="checksum"):
            ControlFileData.decode(bytes(bad))
        assert ControlFileData.decode(bytes(bad), verify=False).crc == cf.crc
    bad = bytearray(raw)
    bad[288] ^= 0x80  # the CRC itself
    with pytest.raises(PgFormatError, match="checksum"):
        ControlFileData.decode(bytes(bad))

    with pytest.raises(PgFormatError, match="version is 1301"):
        ControlFileData.decode(cf.replace(pg_control_version=1301).encode())
    with pytest.raises(PgFormatError, match="byte order"):
        ControlFileData.decode(
            cf.replace(pg_control_version=int.from_bytes((1300).to_bytes(4, "big"), "little")).encode()
        )
    with pytest.raises(PgFormatError, match="catalog version"):
        ControlFileData.decode(cf.replace(catalog_version_no=202107181).encode())
    with pytest.raises(PgFormatError, match="shorter"):
        ControlFileData.decode(raw[:200])
    with pytest.raises(PgFormatError, match="longer"):
        ControlFileData.decode(raw + b"\0")
    assert ControlFileData.decode(raw[:296]) == cf  # the server reads only sizeof(ControlFileData)
    with pytest.raises(PgFormatError, match="out of range"):
        cf.replace(max_connections=1 << 40).encode()
    with pytest.raises(PgFormatError, match="blcksz"):
        cf.replace(blcksz=16384).check_build_compatibility()


# --- pg_filenode.map --------------------------------------------------------------------------
def test_relmap_files_match_catalog(vanilla_pg: VanillaPostgres) -> None:
    pg = vanilla_pg
    pg.start()
    mapped_sql = (
        "SELECT oid::int, pg_relation_filenode(oid)::int FROM pg_class"
        " WHERE relfilenode = 0 AND relkind IN ('r', 'i', 't') AND relisshared = %s"
    )

    def catalog_maps() -> tuple[dict[int, int], dict[int, int]]:
        with pg.connect() as conn:
            shared = dict(conn.execute(mapped_sql, (True,)).fetchall())
            local = dict(conn.execute(mapped_sql, (False,)).fetchall())
        return shared, local

    def check(expected_shared: dict[int, int], expected_local: dict[int, int]) -> None:
        for path, expected in (
            (relmap_path(pg.datadir, 1664, 0), expected_shared),
            (relmap_path(pg.datadir, 1663, 5), expected_local),
        ):
            raw = Path(path).read_bytes()
            rm = RelMapFile.decode(raw)
            assert rm.as_dict() == expected
            assert rm.encode() == raw

    shared, local = catalog_maps()
    assert len(shared) == 48 and len(local) == 17  # a fresh PG15 cluster (spec §9)
    assert shared[1262] == 1262  # pg_database
    check(shared, local)

    # Rewriting mapped catalogs changes the maps (written at commit).
    pg.safe_psql("VACUUM FULL pg_class")
    pg.safe_psql("VACUUM FULL pg_database")
    shared2, local2 = catalog_maps()
    assert local2[1259] != local[1259] and shared2[1262] != 1262
    check(shared2, local2)
    pg.stop()

    raw = Path(relmap_path(pg.datadir, 1663, 5)).read_bytes()
    rm = RelMapFile.decode(raw)
    assert rm.filenode_of(1259) == local2[1259]
    assert rm.with_mapping(1259, 99999).filenode_of(1259) == 99999
    assert RelMapFile.decode(rm.with_mapping(424242, 5).encode()).as_dict() == {**local2, 424242: 5}
    for off in (0, 4, 8, 300, 503, 505):
        bad = bytearray(raw)
        bad[off] ^= 0x10
        with pytest.raises(PgFormatError):
            RelMapFile.decode(bytes(bad))
    with pytest.raises(PgFormatError, match="512"):
        RelMapFile.decode(raw[:511])
    too_many = RelMapFile.from_pairs((i, i) for i in range(62))
    with pytest.raises(PgFormatError, match="full"):
        too_many.with_mapping(1000, 1)


# --- SLRUs ------------------------------------------------------------------------------------
MXSTATUS = {"keysh": 0, "sh": 1, "fornokeyupd": 2, "forupd": 3, "nokeyupd": 4, "upd": 5}


def test_slru_statuses_and_multixacts(vanilla_pg: VanillaPostgres) -> None:
    pg = vanilla_pg
    pg.configure(["autovacuum = off"])
    pg.start()
    pg.safe_psql("CREATE EXTENSION pageinspect; CREATE TABLE x (v int)")
    ins = "INSERT INTO x VALUES (1) RETURNING xmin::text::bigint"
    expected: dict[int, int] = {}
    with pg.connect(autocommit=False) as conn:

        def q(sql: str) -> int:
            return conn.execute(sql).fetchone()[0]  # type: ignore[index]

        # committed and aborted top-level transactions; xid from txid_current() (epoch 0)
        a = q(ins)
        assert q("SELECT txid_current()") & 0xFFFFFFFF == a
        conn.commit()
        b = q(ins)
        assert q("SELECT txid_current()") & 0xFFFFFFFF == b
        conn.rollback()
        # released and rolled-back subtransactions inside a committed transaction
        c = q(ins)
        conn.execute("SAVEPOINT s1")
        d = q(ins)
        conn.execute("RELEASE s1")
        conn.execute("SAVEPOINT s2")
        e = q(ins)
        conn.execute("ROLLBACK TO s2")
        conn.commit()
        # a released subtransaction of an aborted transaction
        f = q(ins)
        conn.execute("SAVEPOINT s3")
        g = q(ins)
        conn.execute("RELEASE s3")
        conn.rollback()
    assert len({a, b, c, d, e, f, g}) == 7
    expected.update({a: 1, b: 2, c: 1, d: 1, e: 2, f: 2, g: 2})

    # Multixacts: one long-lived share locker, plus one short transaction per row, so that
    # every row gets its own two-member multixact; enough to span two offsets pages and three
    # members pages. One row also gets an update member.
    nrows = 2100
    pg.safe_psql(
        f"CREATE TABLE m (id int PRIMARY KEY, v int); INSERT INTO m SELECT g, 0 FROM generate_series(1, {nrows + 1}) g"
    )
    with pg.connect(autocommit=False) as locker, pg.connect() as other:
        locker.execute(f"SELECT id FROM m WHERE id <= {nrows} FOR SHARE").fetchall()
        locker.execute(f"SELECT id FROM m WHERE id = {nrows + 1} FOR KEY SHARE").fetchall()
        x1 = locker.execute("SELECT txid_current()").fetchone()[0] & 0xFFFFFFFF  # type: ignore[index]
        for i in range(1, nrows + 1):
            other.execute(f"BEGIN; SELECT 1 FROM m WHERE id = {i} FOR SHARE; COMMIT")
        other.execute(f"UPDATE m SET v = 1 WHERE id = {nrows + 1}")
        locker.commit()
    expected[x1] = 1
    rows = pg.safe_psql(
        "SELECT h.t_xmax::text::bigint FROM generate_series(0, pg_relation_size('m') / 8192 - 1) b,"
        " heap_page_items(get_raw_page('m', b::int)) h WHERE h.t_infomask & 4096 <> 0"  # XMAX_IS_MULTI
    )
    mxids = sorted({r[0] for r in rows})
    assert len(mxids) >= nrows
    members: dict[int, list[tuple[int, int]]] = {}
    with pg.connect() as conn:
        for mx, xid, mode in conn.execute(
            "SELECT mx, mm.xid::text::bigint, mm.mode FROM unnest(%s::bigint[]) mx,"
            " pg_get_multixact_members(mx::text::xid) mm",
            (mxids,),
        ):
            members.setdefault(mx, []).append((xid, MXSTATUS[mode]))
    assert set(members) == set(mxids)
    assert any(s == MXSTATUS["nokeyupd"] for ms in members.values() for _, s in ms)
    for ms in members.values():
        for xid, _ in ms:
            expected[xid] = 1  # every locker and the updater committed
    pg.safe_psql("CHECKPOINT")
    pg.stop()

    cf = ControlFileData.read(pg.datadir / "global" / "pg_control")
    cp = cf.checkpoint_copy

    # pg_xact
    xact = pg.datadir / "pg_xact"
    for xid, status in expected.items():
        assert slru.clog_get_status(read_slru_page(xact, slru.clog_page(xid)), xid) == status, xid
    nxt = cp.next_xid_xid
    assert slru.clog_get_status(read_slru_page(xact, slru.clog_page(nxt)), nxt) == slru.XidStatus.IN_PROGRESS
    for special in (0, 1, 2):
        assert slru.clog_get_status(read_slru_page(xact, 0), special) == 0

    # pg_multixact: offsets give each multixact's member range, members hold (xid, status).
    offsets_dir = pg.datadir / "pg_multixact" / "offsets"
    members_dir = pg.datadir / "pg_multixact" / "members"

    def offset_of(mx: int) -> int:
        return slru.get_multixact_offset(read_slru_page(offsets_dir, slru.mxoff_page(mx)), mx)

    assert {slru.mxoff_page(m) for m in mxids} == {0, 1}
    member_pages = set()
    for mx in mxids:
        start = offset_of(mx)
        count = (offset_of(slru.next_multixact_id(mx)) - start) & 0xFFFFFFFF
        got = []
        for o in range(start, start + count):
            member_pages.add(slru.member_page(o))
            got.append(slru.get_member(read_slru_page(members_dir, slru.member_page(o)), o))
        assert got == members[mx], mx
    assert member_pages == {0, 1, 2}
    # PG 15.20 pre-fills the entry of the next multixact with the next member offset (spec §4.6).
    assert offset_of(cp.next_multi) == cp.next_multi_offset
    assert max(mxids) == cp.next_multi - 1


def test_slru_arithmetic() -> None:
    # pg_xact (spec §7.1)
    assert slru.CLOG_XACTS_PER_PAGE == 32768
    assert (slru.clog_page(32768), slru.clog_byte_offset(32771), slru.clog_bit_shift(32771)) == (1, 0, 6)
    assert slru.clog_segment(1_048_576) == 1
    page = bytearray(BLCKSZ)
    for xid, st in ((5, 1), (6, 2), (7, 3), (8, 1), (32767, 2)):
        slru.clog_set_status(page, xid, st)
    assert [slru.clog_get_status(page, x) for x in range(4, 10)] == [0, 1, 2, 3, 1, 0]
    assert page[1] == 0b11100100 and page[2] == 0b01 and page[8191] == 0b10000000
    slru.clog_set_status(page, 7, 0)
    assert slru.clog_get_status(page, 7) == 0 and slru.clog_get_status(page, 6) == 2

    # multixact offsets and members (spec §7.2)
    assert (slru.mxoff_page(2047), slru.mxoff_page(2048), slru.mxoff_entry_offset(2049)) == (0, 1, 4)
    assert slru.MULTIXACT_MEMBERS_PER_PAGE == 1636
    assert slru.member_page(1635) == 0 and slru.member_page(1636) == 1
    assert slru.member_group_offset(1635) == 408 * 20 and slru.member_group_offset(1636) == 0
    assert (slru.member_flag_offset(7), slru.member_xid_offset(7)) == (23, 20 + 4 + 12)
    assert slru.member_segment(0xFFFFFFFF) == 82040 and slru.segment_file_name(82040) == "14078"
    assert slru.segment_file_name(0) == "0000" and slru.parse_segment_file_name("0FFF") == 0xFFF
    mpage = bytearray(BLCKSZ)
    for o in range(1636 * 3, 1636 * 3 + 9):
        slru.set_member(mpage, o, 1000 + o, o % 6)
    assert [slru.get_member(mpage, o) for o in range(1636 * 3, 1636 * 3 + 9)] == [
        (1000 + o, o % 6) for o in range(1636 * 3, 1636 * 3 + 9)
    ]
    assert slru.next_multixact_id(0xFFFFFFFF) == 1 and slru.previous_multixact_id(1) == 0xFFFFFFFF
    assert slru.member_segments_to_delete(0, 1636 * 32 * 2) == [0, 1]
    assert slru.member_segments_to_delete(0xFFFFFFFF, 5) == [82040]

    # wraparound-aware comparisons (spec §7.5)
    assert slru.transaction_id_precedes(3, 4) and not slru.transaction_id_precedes(4, 3)
    assert slru.transaction_id_precedes(0xFFFFFFF0, 10)  # across the wrap
    assert slru.transaction_id_precedes(2, 0xFFFFFFF0)  # special xids compare unsigned
    assert not slru.transaction_id_precedes(0xFFFFFFF0, 2)
    assert slru.multixact_id_precedes(0xFFFFFFFF, 1) and not slru.multixact_id_precedes(1, 0xFFFFFFFF)
    assert slru.clog_page_precedes(0, 1) and not slru.clog_page_precedes(1, 0)
    assert not slru.clog_page_precedes(5, 5)
    assert slru.clog_page_precedes(131071, 10)  # last page precedes early pages after a wrap
    assert slru.slru_may_delete_segment(0, 64) and not slru.slru_may_delete_segment(1, 40)
    assert slru.clog_segments_to_delete([0, 1, 2, 3], 3 * 32) == [0, 1, 2]
    assert slru.multixact_offset_page_precedes(0, 1) and not slru.multixact_offset_page_precedes(1, 1)
    assert slru.multixact_offset_segments_to_delete([0, 1, 2], 2 * 65536 + 1) == [0, 1]

    with pytest.raises(PgFormatError):
        slru.clog_get_status(b"\0" * 100, 3)
    with pytest.raises(PgFormatError):
        slru.clog_set_status(bytearray(BLCKSZ), 3, 4)
    with pytest.raises(PgFormatError):
        slru.clog_page(1 << 32)
    with pytest.raises(PgFormatError):
        slru.set_member(bytearray(BLCKSZ), 0, 1, 6)


# --- pages, VM, FSM ---------------------------------------------------------------------------
def test_heap_pages_and_visibility_map(vanilla_pg: VanillaPostgres) -> None:
    pg = vanilla_pg
    pg.configure(["autovacuum = off"])
    pg.start()
    sql = pg.safe_psql
    sql("CREATE EXTENSION pageinspect; CREATE EXTENSION pg_visibility")
    # ~12 pages frozen, ~8 more visible only, then a few pages dirtied again.
    sql("CREATE TABLE p (id int, pad text) WITH (fillfactor = 90)")
    sql("INSERT INTO p SELECT g, repeat('x', 500) FROM generate_series(1, 170) g")
    sql("VACUUM FREEZE p")
    sql("INSERT INTO p SELECT g, repeat('y', 500) FROM generate_series(171, 280) g")
    sql("VACUUM p")
    sql("UPDATE p SET id = -id WHERE id = 40")
    sql("DELETE FROM p WHERE id = 75")
    sql("INSERT INTO p VALUES (999, 'z')")
    sql("CHECKPOINT")
    relpath = pg.datadir / sql("SELECT pg_relation_filepath('p')")[0][0]
    n = nblocks(relpath)
    assert n >= 15

    for blk in range(n):
        page = read_block(relpath, blk)
        (lsn, checksum, flags, lower, upper, special, pagesize, version, prune_xid) = sql(
            f"SELECT lsn::text, checksum, flags, lower, upper, special, pagesize, version,"
            f" prune_xid::text::bigint FROM page_header(get_raw_page('p', {blk}))"
        )[0]
        hdr = pg_page.PageHeader.unpack(page)
        assert pg_page.page_get_lsn(page) == hdr.lsn == Lsn(lsn), blk
        assert (hdr.checksum, hdr.flags, hdr.lower, hdr.upper, hdr.special) == (
            checksum, flags, lower, upper, special,
        )  # fmt: skip
        assert (hdr.page_size, hdr.layout_version, hdr.prune_xid) == (pagesize, version, prune_xid)
        assert hdr.pack() == page[:24]
        items = sql(f"SELECT lp_off, lp_flags, lp_len FROM heap_page_items(get_raw_page('p', {blk})) ORDER BY lp")
        assert [(i.off, i.flags, i.len) for i in pg_page.page_item_ids(page)] == items
        first = pg_page.page_get_item(page, 1)
        assert len(first) == items[0][2]
    lsns = {pg_page.page_get_lsn(read_block(relpath, b)) for b in range(n)}
    assert len(lsns) > 1 and all(lsn >> 32 == 0 and lsn > 0x1000000 for lsn in lsns)

    # Visibility map bits against pg_visibility, for all three states.
    vm_path = relpath.with_name(relpath.name + "_vm")
    vm_page = read_block(vm_path, 0)
    states = set()
    for blkno, all_visible, all_frozen, pd_all_visible in sql(
        "SELECT blkno, all_visible, all_frozen, pd_all_visible FROM pg_visibility('p')"
    ):
        assert pg_page.vm_block(blkno) == 0
        bits = pg_page.vm_get_status(vm_page, blkno)
        assert bits == (pg_page.VISIBILITYMAP_ALL_VISIBLE * all_visible) | (
            pg_page.VISIBILITYMAP_ALL_FROZEN * all_frozen
        ), blkno
        hdr = pg_page.PageHeader.unpack(read_block(relpath, blkno))
        assert bool(hdr.flags & pg_page.PD_ALL_VISIBLE) == pd_all_visible
        states.add(bits)
    assert states == {0, 1, 3}
    vm_hdr = pg_page.PageHeader.unpack(vm_page)
    assert (vm_hdr.lower, vm_hdr.upper, vm_hdr.special, vm_hdr.pagesize_version) == (24, 8192, 8192, 0x2004)

    # Heap truncation by VACUUM: the VM page must equal our truncation of its earlier image.
    sql("CREATE TABLE q (id int, pad text)")
    sql("INSERT INTO q SELECT g, repeat('q', 700) FROM generate_series(1, 100) g")
    sql("VACUUM FREEZE q")
    sql("CHECKPOINT")
    qpath = pg.datadir / sql("SELECT pg_relation_filepath('q')")[0][0]
    qvm = qpath.with_name(qpath.name + "_vm")
    before_n = nblocks(qpath)
    keep = 6
    assert before_n >= 9
    before = bytearray(read_block(qvm, 0))
    assert all(pg_page.vm_get_status(before, b) == 3 for b in range(before_n))
    sql(f"DELETE FROM q WHERE (ctid::text::point)[0] >= {keep}")
    sql("VACUUM q")
    sql("CHECKPOINT")
    assert nblocks(qpath) == keep
    trunc = pg_page.vm_truncation(keep)
    assert (trunc.nblocks, trunc.partial_block) == (1, 0) == (nblocks(qvm), 0)
    expected = bytearray(before)
    pg_page.vm_truncate_page(expected, keep)
    assert expected[24:27] == bytes([0xFF, 0x0F, 0x00])
    assert read_block(qvm, 0)[24:] == expected[24:]
    fsm = qpath.with_name(qpath.name + "_fsm")
    assert nblocks(fsm) == pg_page.fsm_truncation(keep).nblocks == 3
    pg.stop()


def test_page_vm_fsm_arithmetic() -> None:
    # PageInit
    page = pg_page.page_init()
    assert page[:24] == bytes.fromhex("000000000000000000000000180000200020042000000000")
    assert pg_page.page_init(16)[12:18] == bytes.fromhex("1800f01ff01f")  # btree: special 8176
    assert pg_page.page_is_new(bytes(BLCKSZ)) and not pg_page.page_is_new(page)
    # pd_lsn is high half first (spec §5.1)
    pg_page.page_set_lsn(page, 0x1583D18)
    assert page[:8] == bytes.fromhex("00000000183d5801")
    pg_page.page_set_lsn(page, 0x0000000A_00000001)
    assert page[:8] == bytes.fromhex("0a00000001000000") and pg_page.page_get_lsn(page) == 0xA_00000001
    assert pg_page.page_get_max_offset_number(page) == 0
    with pytest.raises(PgFormatError):
        pg_page.page_get_item_id(page, 1)
    with pytest.raises(PgFormatError):
        pg_page.page_init(8200)
    iid = pg_page.ItemId.unpack(0x00B2_9F40)
    assert (iid.off, iid.flags, iid.len) == (0x1F40, 1, 0x59) and iid.pack() == 0x00B29F40

    # VM addressing (spec §6.1)
    assert pg_page.VM_HEAPBLOCKS_PER_PAGE == 32672
    assert (pg_page.vm_block(32672), pg_page.vm_byte_offset(32672), pg_page.vm_bit_shift(32672)) == (1, 24, 0)
    assert (pg_page.vm_byte_offset(9), pg_page.vm_bit_shift(9)) == (26, 2)
    vm = pg_page.page_init()
    vm[24:27] = bytes.fromhex("0ccc0d")  # observed: blocks 1, 5, 7, 9 visible+frozen, 8 visible
    assert [b for b in range(12) if pg_page.vm_get_status(vm, b) == 3] == [1, 5, 7, 9]
    assert [b for b in range(12) if pg_page.vm_get_status(vm, b) == 1] == [8]
    assert pg_page.vm_clear_bits(vm, 5) and not pg_page.vm_clear_bits(vm, 5)
    assert pg_page.vm_clear_bits(vm, 9, pg_page.VISIBILITYMAP_ALL_FROZEN) and pg_page.vm_get_status(vm, 9) == 1
    assert pg_page.vm_set_bits(vm, 0, 3) and vm[24:27] == bytes.fromhex("0fc005")
    assert pg_page.vm_truncation(32672) == pg_page.ForkTruncation(1, None)
    assert pg_page.vm_truncation(32673) == pg_page.ForkTruncation(2, 1)
    assert pg_page.vm_truncation(0) == pg_page.ForkTruncation(0, None)

    # FSM (spec §6.2)
    assert pg_page.FSM_SLOTS_PER_PAGE == 4069
    assert [pg_page.fsm_logical_to_physical(0, p) for p in (0, 1, 4068, 4069)] == [2, 3, 4070, 4072]
    assert pg_page.fsm_logical_to_physical(2, 0) == 0 and pg_page.fsm_logical_to_physical(1, 0) == 1
    assert pg_page.fsm_logical_to_physical(1, 1) == 4071
    assert pg_page.fsm_block_of_heap_block(4069) == 3
    assert pg_page.fsm_truncation(0) == pg_page.ForkTruncation(2, None)
    assert pg_page.fsm_truncation(1) == pg_page.ForkTruncation(3, 2)
    assert pg_page.fsm_truncation(4069) == pg_page.ForkTruncation(3, None)
    assert pg_page.fsm_truncation(4070) == pg_page.ForkTruncation(4, 3)


def test_data_checksums(test_root: Path) -> None:
    pg = VanillaPostgres(test_root / "checksums").init(initdb_args=["-k"])
    try:
        pg.start()
        pg.safe_psql(
            "CREATE TABLE c (id int PRIMARY KEY, body text);"
            "INSERT INTO c SELECT g, md5(g::text) FROM generate_series(1, 3000) g;"
            "UPDATE c SET body = 'u' WHERE id % 10 = 0; CHECKPOINT"
        )
        paths = [
            pg.datadir / r[0]
            for r in pg.safe_psql(
                "SELECT pg_relation_filepath(x) FROM unnest(ARRAY['c', 'c_pkey', 'pg_class',"
                " 'pg_attribute', 'pg_proc']::regclass[]) x"
            )
        ]
        pg.stop()
        cf = ControlFileData.read(pg.datadir / "global" / "pg_control")
        assert cf.data_checksum_version == 1
        checked = collisions = 0
        for path in paths:
            for fork in (path, path.with_name(path.name + "_fsm"), path.with_name(path.name + "_vm")):
                if not fork.exists():
                    continue
                for blk in range(nblocks(fork)):
                    page = read_block(fork, blk)
                    if pg_page.page_is_new(page):
                        continue
                    stored = pg_page.page_get_checksum(page)
                    assert pg_page.page_checksum(page, blk) == stored, (fork, blk)
                    collisions += pg_page.page_checksum(page, blk + 1) == stored
                    restamped = bytearray(page)
                    restamped[8:10] = b"\0\0"
                    pg_page.page_set_checksum(restamped, blk)
                    assert restamped == page
                    checked += 1
        assert checked >= 80
        assert collisions <= 2  # the block number is mixed in (a 16-bit sum may collide by chance)
    finally:
        pg.cleanup()
