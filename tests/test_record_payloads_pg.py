"""Oracle test: payloads parsed from real PG15 WAL, rendered the way pg_waldump describes them,
must equal pg_waldump's own description of every record we interpret.

A stock cluster runs a workload touching every interpreted record type (DDL, DML on frozen
pages, savepoints, >64 subtransactions, two-phase commit, multixacts, both CREATE DATABASE
strategies, DROP DATABASE, VACUUM, TRUNCATE, VACUUM FULL pg_class, logical messages, replication
origins, a backup, WAL switches, checkpoints). Records come from our WAL decoder; the main data
goes through `neon.postgres.records`; the rendered text is compared with pg_waldump's line for
the same LSN. Heap records also check `vm_bits_cleared` against the §4.9 table applied to
pg_waldump's flags and block references.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from neon.postgres.constants import (
    RM_CLOG_ID,
    RM_DBASE_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_SMGR_ID,
    RM_XLOG_ID,
    rmgr_name,
)
from neon.postgres.errors import WalDecodeError
from neon.postgres.records import (
    RelFileNode,
    clog,
    dbase,
    describe,
    heap,
    logicalmsg,
    misc,
    multixact,
    relmap,
    smgr,
    standby,
    xact,
    xlog,
)
from neon.postgres.waldecoder import WalStreamDecoder
from neon.postgres.walformat import parse_wal_file_name
from neon.postgres.walrecord import DecodedRecord, decode_record
from tests.fixtures.vanilla import VanillaPostgres

SEG_SIZE = 16 * 1024 * 1024

# --- workload ------------------------------------------------------------------------------


def run_workload(pg: VanillaPostgres) -> None:
    def sql(*stmts: str, dbname: str = "postgres") -> None:
        for s in stmts:  # one statement per call: VACUUM and friends refuse implicit transactions
            pg.safe_psql(s, dbname)

    sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'x' || g FROM generate_series(1, 1000) g",
        "VACUUM (FREEZE) t",  # all pages all-visible + all-frozen: later changes clear VM bits
        "UPDATE t SET v = 'y' WHERE id = 5",  # cross-page update: clears old and new page bits
        "DELETE FROM t WHERE id = 500",
        "INSERT INTO t VALUES (1001, 'z') ON CONFLICT DO NOTHING",  # speculative insert + CONFIRM
    )
    with pg.connect(autocommit=False) as c:
        c.execute("SELECT * FROM t WHERE id = 900 FOR UPDATE")  # LOCK on an all-frozen page
        c.commit()
    with pg.connect(autocommit=False) as c:
        c.execute("INSERT INTO t VALUES (3000, 'a')")
        c.execute("SAVEPOINT s1")
        c.execute("INSERT INTO t VALUES (3001, 'b')")
        c.execute("ROLLBACK TO s1")  # ABORT record for the subxact
        c.execute("INSERT INTO t VALUES (3002, 'c')")
        c.commit()
    # More than 64 subtransactions in one transaction: XACT ASSIGNMENT.
    sql(
        "DO $$ BEGIN FOR i IN 1..70 LOOP BEGIN INSERT INTO t VALUES (4000 + i, 's'); "
        "EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$"
    )
    with pg.connect() as c, c.cursor() as cur, cur.copy("COPY t FROM STDIN") as cp:
        for i in range(2000, 2100):
            cp.write_row((i, "c"))  # MULTI_INSERT
    with pg.connect() as c:
        c.execute("CREATE TABLE tdrop (a int)")
        c.execute("BEGIN")
        c.execute("CREATE TABLE tp (a int)")
        c.execute("SAVEPOINT a")
        c.execute("INSERT INTO tp VALUES (1)")
        c.execute("RELEASE a")
        c.execute("DROP TABLE tdrop")
        c.execute("PREPARE TRANSACTION 'x'")
        c.execute("COMMIT PREPARED 'x'")
        c.execute("BEGIN")
        c.execute("CREATE TABLE tq (a int)")
        c.execute("PREPARE TRANSACTION 'y'")
        c.execute("ROLLBACK PREPARED 'y'")
    # Multixacts: two lockers of one row; then a key-share lock on a row being updated, which
    # follows the update chain (LOCK_UPDATED) and makes a (keysh, nokeyupd) multixact.
    with psycopg.connect(pg.connstr()) as a, psycopg.connect(pg.connstr()) as b:
        a.execute("SELECT * FROM t WHERE id = 100 FOR SHARE")
        b.execute("SELECT * FROM t WHERE id = 100 FOR SHARE")
        a.commit()
        b.commit()
        b.execute("UPDATE t SET v = 'u' WHERE id = 102")
        a.execute("SELECT * FROM t WHERE id = 102 FOR KEY SHARE")
        b.commit()
        a.commit()
    sql(
        "CREATE DATABASE d1 STRATEGY FILE_COPY",
        "CREATE DATABASE d2 STRATEGY WAL_LOG",
        "DROP DATABASE d1",
        "CREATE TABLE t2 (a int)",
        "INSERT INTO t2 SELECT generate_series(1, 100)",
        "TRUNCATE t2",
        "CREATE TABLE t3 (a int)",
        "DROP TABLE t3",
        "DELETE FROM t WHERE id > 2000",
        "VACUUM t",  # PRUNE, VACUUM, VISIBLE, SMGR TRUNCATE of the emptied tail
        "VACUUM FULL pg_class",  # RELMAP UPDATE for database 5
        "SELECT pg_logical_emit_message(true, 'neon-test', 'hello')",
        "SELECT pg_logical_emit_message(false, 'pfx', '\\x00ff'::bytea)",
        "SELECT pg_create_restore_point('rp1')",
    )
    with pg.connect() as c:
        c.execute("BEGIN")
        c.execute("CREATE TABLE td (a int)")
        c.execute("SAVEPOINT a")
        c.execute("INSERT INTO td VALUES (1)")
        c.execute("RELEASE a")
        c.execute("DROP TABLE t2")
        c.execute("COMMIT")  # rels + subxacts + dropped stats in one commit
        c.execute("SELECT pg_replication_origin_create('o1')")
        c.execute("SELECT pg_replication_origin_session_setup('o1')")
        c.execute("BEGIN")
        c.execute("SELECT pg_replication_origin_xact_setup('0/12345678', '2024-01-02 03:04:05.678901+00')")
        c.execute("INSERT INTO t VALUES (5001, 'o')")
        c.execute("COMMIT")  # HAS_ORIGIN
        c.execute("SELECT pg_replication_origin_session_reset()")
        c.execute("SELECT pg_replication_origin_advance('o1', '0/AABBCCDD')")
        c.execute("SELECT pg_replication_origin_drop('o1')")
        c.execute("SELECT pg_backup_start('b', true)")
        c.execute("SELECT * FROM pg_backup_stop(false)")  # BACKUP_END
        c.execute("SELECT pg_switch_wal()")
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (3500, 'kept')")
        # Left prepared (last, so it holds back no VACUUM above): its pg_twophase file is checked.
        c.execute("PREPARE TRANSACTION 'keep'")
    sql("CHECKPOINT")


# --- reading WAL and pg_waldump ------------------------------------------------------------


def decode_all(segments: list[Path]) -> dict[int, DecodedRecord]:
    start = parse_wal_file_name(segments[0].name)[1] * SEG_SIZE
    dec = WalStreamDecoder(start)
    out: dict[int, DecodedRecord] = {}
    try:
        for seg in segments:
            dec.feed(seg.read_bytes())
            for lsn, _end, rec in dec.records():
                out[lsn] = decode_record(rec, lsn)
    except WalDecodeError:
        pass  # the end of valid WAL
    return out


_LINE = re.compile(
    r"^rmgr: (\S+)\s+len \(rec/tot\):\s*\d+/\s*\d+, tx:\s*(\d+), lsn: ([0-9A-F]+)/([0-9A-F]+), "
    r"prev [0-9A-F]+/[0-9A-F]+, desc: (.*)$"
)
_BLKREF = re.compile(r"blkref #(\d+): rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk (\d+)")


def waldump(pg: VanillaPostgres, segments: list[Path]) -> dict[int, tuple[str, str, dict[int, int]]]:
    """lsn -> (rmgr name, description without block refs, {block id: block number})."""
    proc = subprocess.run(
        [str(pg.pg_bin("pg_waldump")), "-p", str(pg.wal_dir), segments[0].name, segments[-1].name],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC"},  # timestamps print in the process's zone
    )
    out = {}
    for line in proc.stdout.splitlines():
        m = _LINE.match(line)
        assert m, f"unexpected pg_waldump line: {line!r}"
        rmgr, _xid, hi, lo, desc = m.groups()
        text, _, refs = desc.partition(", blkref #")
        blocks = {int(b[0]): int(b[5]) for b in _BLKREF.findall("blkref #" + refs)} if refs else {}
        out[(int(hi, 16) << 32) | int(lo, 16)] = (rmgr, text.rstrip(), blocks)
    assert out, proc.stderr
    return out


# --- rendering our parse as pg_waldump text ------------------------------------------------


def lsn(v: int) -> str:
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def ts(v: int) -> str:
    t = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=v)
    return t.strftime("%Y-%m-%d %H:%M:%S") + f".{t.microsecond:06d} UTC"


def onoff(b: bool) -> str:
    return "on" if b else "off"


FORK_SUFFIX = {0: "", 1: "_fsm", 2: "_vm", 3: "_init"}
WAL_LEVELS = {0: "minimal", 1: "replica", 2: "logical"}


def relpath(rn: RelFileNode, fork: int = 0) -> str:
    return rn.path() + FORK_SUFFIX[fork]


def invals(msgs: bytes, db: int = 0, ts_id: int = 0, init_file: bool = False) -> str:
    if not msgs:
        return ""
    out = f"; relcache init file inval dbid {db} tsid {ts_id}" if init_file else ""
    out += "; inval msgs:"
    for i in range(0, len(msgs), 16):
        (kind,) = struct.unpack_from("<b", msgs, i)
        db_id, oid = struct.unpack_from("<II", msgs, i + 4)
        if kind >= 0:
            out += f" catcache {kind}"
        else:
            out += {
                -1: f" catalog {oid}",
                -2: f" relcache {oid}",
                -3: " smgr",
                -4: f" relmap db {db_id}",
                -5: f" snapshot {oid}",
            }.get(kind, f" unrecognized id {kind}")
    return out


def xids(label: str, values: tuple[int, ...]) -> str:
    return f"; {label}:" + "".join(f" {x}" for x in values) if values else ""


def rels(label: str, values: tuple[RelFileNode, ...]) -> str:
    return f"; {label}:" + "".join(f" {relpath(r)}" for r in values) if values else ""


def stats(label: str, items: tuple[xact.XactStatsItem, ...]) -> str:
    return f"; {label}:" + "".join(f" {s.kind}/{s.dboid}/{s.objoid}" for s in items) if items else ""


INFOBITS = ((0x01, "IS_MULTI"), (0x02, "LOCK_ONLY"), (0x04, "EXCL_LOCK"), (0x08, "KEYSHR_LOCK"), (0x10, "KEYS_UPDATED"))


def infobits(bits: int) -> str:
    return "".join(f" {name}" for bit, name in INFOBITS if bits & bit)


CHECKPOINT_NAMES = {0x00: "CHECKPOINT_SHUTDOWN", 0x10: "CHECKPOINT_ONLINE"}


def render(rec: DecodedRecord, p: object) -> tuple[str, str]:
    """(record type name as pg_waldump identifies it, its description text)."""
    info = rec.info
    match p:
        case xlog.CheckPoint():
            name = CHECKPOINT_NAMES[info & 0xF0]
            return name, (
                f"{name} redo {lsn(p.redo)}; tli {p.this_timeline_id}; prev tli {p.prev_timeline_id}; "
                f"fpw {str(p.full_page_writes).lower()}; xid {p.next_xid_epoch}:{p.next_xid_xid}; "
                f"oid {p.next_oid}; multi {p.next_multi}; offset {p.next_multi_offset}; "
                f"oldest xid {p.oldest_xid} in DB {p.oldest_xid_db}; "
                f"oldest multi {p.oldest_multi} in DB {p.oldest_multi_db}; "
                f"oldest/newest commit timestamp xid: {p.oldest_commit_ts_xid}/{p.newest_commit_ts_xid}; "
                f"oldest running xid {p.oldest_active_xid}; {'shutdown' if name.endswith('SHUTDOWN') else 'online'}"
            )
        case xlog.NextOid():
            return "NEXTOID", f"NEXTOID {p.next_oid}"
        case xlog.Switch():
            return "SWITCH", "SWITCH"
        case xlog.BackupEnd():
            return "BACKUP_END", f"BACKUP_END {lsn(p.start_lsn)}"
        case xlog.ParameterChange():
            return "PARAMETER_CHANGE", (
                f"PARAMETER_CHANGE max_connections={p.max_connections} "
                f"max_worker_processes={p.max_worker_processes} max_wal_senders={p.max_wal_senders} "
                f"max_prepared_xacts={p.max_prepared_xacts} max_locks_per_xact={p.max_locks_per_xact} "
                f"wal_level={WAL_LEVELS[p.wal_level]} wal_log_hints={onoff(p.wal_log_hints)} "
                f"track_commit_timestamp={onoff(p.track_commit_timestamp)}"
            )
        case xlog.RestorePoint():
            return "RESTORE_POINT", f"RESTORE_POINT {p.rp_name}"
        case xlog.FpwChange():
            return "FPW_CHANGE", f"FPW_CHANGE {str(p.full_page_writes).lower()}"
        case xact.XactCommitAbort():
            name = xact.XACT_OPCODE_NAMES[p.opcode]
            text = f"{name} " + (f"{p.twophase_xid}: " if p.xinfo & xact.XACT_XINFO_HAS_TWOPHASE else "")
            text += ts(p.xact_time) + rels("rels", p.rels) + xids("subxacts", p.subxacts)
            text += stats("dropped stats", p.stats_items)
            if p.is_commit:
                init_file = bool(p.xinfo & xact.XACT_COMPLETION_UPDATE_RELCACHE_FILE)
                text += invals(p.invals, p.db_id, p.ts_id, init_file)
                if p.xinfo & xact.XACT_COMPLETION_APPLY_FEEDBACK:
                    text += "; apply_feedback"
                if p.xinfo & xact.XACT_COMPLETION_FORCE_SYNC_COMMIT:
                    text += "; sync"
            if p.xinfo & xact.XACT_XINFO_HAS_ORIGIN:
                text += f"; origin: node {rec.origin}, lsn {lsn(p.origin_lsn)}, at {ts(p.origin_timestamp)}"
            return name, text
        case xact.XactPrepare():
            text = f"PREPARE gid {p.gid}: {ts(p.prepared_at)}"
            text += rels("rels(commit)", p.commit_rels) + rels("rels(abort)", p.abort_rels)
            text += stats("commit dropped stats", p.commit_stats) + stats("abort dropped stats", p.abort_stats)
            text += xids("subxacts", p.subxacts)
            off = 72 + sum(-(-n * size // 8) * 8 for n, size in _prepare_sections(p))
            text += invals(p.raw[off : off + 16 * p.ninvalmsgs], p.database, 0, p.initfileinval)
            return "PREPARE", text
        case xact.XactAssignment():
            return "ASSIGNMENT", f"ASSIGNMENT xtop {p.xtop}: subxacts:" + "".join(f" {x}" for x in p.subxacts)
        case xact.XactInvalidations():
            return "INVALIDATION", "INVALIDATION " + invals(p.msgs)
        case smgr.SmgrCreate():
            return "CREATE", f"CREATE {relpath(p.rnode, p.fork_num)}"
        case smgr.SmgrTruncate():
            return "TRUNCATE", f"TRUNCATE {relpath(p.rnode)} to {p.blkno} blocks flags {p.flags}"
        case dbase.DbaseCreateFileCopy():
            return "CREATE_FILE_COPY", (
                f"CREATE_FILE_COPY copy dir {p.src_tablespace_id}/{p.src_db_id} to {p.tablespace_id}/{p.db_id}"
            )
        case dbase.DbaseCreateWalLog():
            return "CREATE_WAL_LOG", f"CREATE_WAL_LOG create dir {p.tablespace_id}/{p.db_id}"
        case dbase.DbaseDrop():
            return "DROP", "DROP dir" + "".join(f" {t}/{p.db_id}" for t in p.tablespace_ids)
        case clog.ClogZeroPage():
            return "ZEROPAGE", f"ZEROPAGE page {p.pageno}"
        case multixact.MultiXactZeroPage():
            name = "ZERO_MEM_PAGE" if p.members else "ZERO_OFF_PAGE"
            return name, f"{name} {p.pageno}"
        case multixact.MultiXactCreate():
            members = "".join(f"{m.xid} ({multixact.MULTIXACT_STATUS_NAMES[m.status]}) " for m in p.members)
            return "CREATE_ID", f"CREATE_ID {p.mid} offset {p.moff} nmembers {p.nmembers}: {members}".rstrip()
        case relmap.RelmapUpdate():
            return "UPDATE", f"UPDATE database {p.dbid} tablespace {p.tsid} size {p.nbytes}"
        case standby.StandbyLocks():
            return "LOCK", "LOCK " + "".join(f"xid {x.xid} db {x.db_oid} rel {x.rel_oid} " for x in p.locks).rstrip()
        case standby.RunningXacts():
            text = (
                f"RUNNING_XACTS nextXid {p.next_xid} latestCompletedXid {p.latest_completed_xid} "
                f"oldestRunningXid {p.oldest_running_xid}"
            )
            if p.xids:
                text += f"; {p.xcnt} xacts:" + "".join(f" {x}" for x in p.xids)
            if p.subxid_overflow:
                text += "; subxid overflowed"
            if p.subxids:
                text += f"; {p.subxcnt} subxacts:" + "".join(f" {x}" for x in p.subxids)
            return "RUNNING_XACTS", text
        case standby.StandbyInvalidations():
            return "INVALIDATIONS", "INVALIDATIONS " + invals(p.msgs, p.db_id, p.ts_id, p.relcache_init_file_inval)
        case logicalmsg.LogicalMessage():
            kind = "transactional" if p.transactional else "non-transactional"
            payload = "".join(f" {b:02X}" for b in p.message)
            return "MESSAGE", f'MESSAGE {kind}, prefix "{p.prefix}"; payload ({len(p.message)} bytes):{payload}'
        case misc.CommitTsZeroPage():
            return "ZEROPAGE", f"ZEROPAGE {p.pageno}"
        case misc.ReplOriginSet():
            return "SET", f"SET set {p.node_id}; lsn {lsn(p.remote_lsn)}; force: {int(p.force)}"
        case misc.ReplOriginDrop():
            return "DROP", f"DROP drop {p.node_id}"
    return render_heap(rec, p)


def _prepare_sections(p: xact.XactPrepare) -> list[tuple[int, int]]:
    return [
        (p.gidlen, 1),
        (p.nsubxacts, 4),
        (p.ncommitrels, 12),
        (p.nabortrels, 12),
        (p.ncommitstats, 12),
        (p.nabortstats, 12),
    ]


def render_heap(rec: DecodedRecord, p: object) -> tuple[str, str]:
    init = "+INIT" if rec.info & heap.XLOG_HEAP_INIT_PAGE else ""
    match p:
        case heap.HeapInsert():
            return "INSERT", f"INSERT{init} off {p.offnum} flags 0x{p.flags:02X}"
        case heap.HeapDelete():
            return "DELETE", f"DELETE off {p.offnum} flags 0x{p.flags:02X}{infobits(p.infobits_set)}"
        case heap.HeapUpdate():
            name = heap.HEAP_OPCODE_NAMES[rec.info & heap.XLOG_HEAP_OPMASK]
            return name, (
                f"{name}{init} off {p.old_offnum} xmax {p.old_xmax} flags 0x{p.flags:02X}"
                f"{infobits(p.old_infobits_set)} ; new off {p.new_offnum} xmax {p.new_xmax}"
            )
        case heap.HeapLock():
            return "LOCK", f"LOCK off {p.offnum}: xid {p.locking_xid}: flags 0x{p.flags:02X}{infobits(p.infobits_set)}"
        case heap.HeapConfirm():
            return "CONFIRM", f"HEAP_CONFIRM off {p.offnum}"  # pg_waldump's name for it
        case heap.HeapInplace():
            return "INPLACE", f"INPLACE off {p.offnum}"
        case heap.HeapTruncate():
            assert p.flags == 0, "workload truncates without CASCADE / RESTART IDENTITY"
            return "TRUNCATE", f"TRUNCATE nrelids {len(p.relids)} relids" + "".join(f" {r}" for r in p.relids)
        case heap.HeapPrune():
            return "PRUNE", (
                f"PRUNE latestRemovedXid {p.latest_removed_xid} nredirected {p.nredirected} ndead {p.ndead}"
            )
        case heap.HeapVacuum():
            return "VACUUM", f"VACUUM nunused {p.nunused}"
        case heap.HeapFreezePage():
            return "FREEZE_PAGE", f"FREEZE_PAGE cutoff xid {p.cutoff_xid} ntuples {p.ntuples}"
        case heap.HeapVisible():
            return "VISIBLE", f"VISIBLE cutoff xid {p.cutoff_xid} flags 0x{p.flags:02X}"
        case heap.HeapMultiInsert():
            return "MULTI_INSERT", f"MULTI_INSERT{init} {p.ntuples} tuples flags 0x{p.flags:02X}"
        case heap.HeapLockUpdated():
            return "LOCK_UPDATED", (
                f"LOCK_UPDATED off {p.offnum}: xmax {p.xmax}: flags 0x{p.flags:02X}{infobits(p.infobits_set)}"
            )
    raise AssertionError(f"no renderer for {p!r}")


# --- VM clears from pg_waldump's own text (spec §4.9 table) ---------------------------------

_FLAGS = re.compile(r"flags 0x([0-9A-F]{2})")


def expected_vm_clears(rmid: int, info: int, text: str, blocks: dict[int, int]) -> list[tuple[int, int]]:
    m = _FLAGS.search(text)
    flags = int(m.group(1), 16) if m else 0
    op = info & 0x70
    if rmid == RM_HEAP_ID and op in (0x20, 0x40):
        out = []
        if flags & 0x01:
            out.append((blocks.get(1, blocks[0]), 0x03))
        if flags & 0x02 and (blocks[0], 0x03) not in out:
            out.append((blocks[0], 0x03))
        return out
    rule = {
        (RM_HEAP_ID, 0x00): 0x03,
        (RM_HEAP_ID, 0x10): 0x03,
        (RM_HEAP_ID, 0x60): 0x02,
        (RM_HEAP2_ID, 0x50): 0x03,
        (RM_HEAP2_ID, 0x60): 0x02,
    }.get((rmid, op))
    return [(blocks[0], rule)] if rule and flags & 0x01 else []


# --- the test ------------------------------------------------------------------------------

# (rmgr, record type) pairs the workload must produce and the comparison must have covered.
REQUIRED = {
    ("XLOG", "CHECKPOINT_SHUTDOWN"),
    ("XLOG", "CHECKPOINT_ONLINE"),
    ("XLOG", "NEXTOID"),
    ("XLOG", "SWITCH"),
    ("XLOG", "BACKUP_END"),
    ("XLOG", "RESTORE_POINT"),
    ("Transaction", "COMMIT"),
    ("Transaction", "ABORT"),
    ("Transaction", "PREPARE"),
    ("Transaction", "COMMIT_PREPARED"),
    ("Transaction", "ABORT_PREPARED"),
    ("Transaction", "ASSIGNMENT"),
    ("Storage", "CREATE"),
    ("Storage", "TRUNCATE"),
    ("Database", "CREATE_FILE_COPY"),
    ("Database", "CREATE_WAL_LOG"),
    ("Database", "DROP"),
    ("CLOG", "ZEROPAGE"),
    ("MultiXact", "ZERO_MEM_PAGE"),
    ("MultiXact", "CREATE_ID"),
    ("RelMap", "UPDATE"),
    ("Standby", "LOCK"),
    ("Standby", "RUNNING_XACTS"),
    ("Standby", "INVALIDATIONS"),
    ("LogicalMessage", "MESSAGE"),
    ("ReplicationOrigin", "SET"),
    ("ReplicationOrigin", "DROP"),
    *(("Heap", n) for n in ("INSERT", "DELETE", "UPDATE", "HOT_UPDATE", "LOCK", "INPLACE", "CONFIRM")),
    *(("Heap2", n) for n in ("PRUNE", "VACUUM", "FREEZE_PAGE", "VISIBLE", "MULTI_INSERT", "LOCK_UPDATED")),
}
REQUIRED_LOGICAL = {("Transaction", "INVALIDATION"), ("Heap", "TRUNCATE")}
# Heap records whose VM clear the workload must exercise.
REQUIRED_CLEARS = {("Heap", "INSERT"), ("Heap", "DELETE"), ("Heap", "UPDATE"), ("Heap", "LOCK")}


@pytest.mark.parametrize("wal_level", ["replica", "logical"])
def test_payloads_match_pg_waldump(vanilla_pg: VanillaPostgres, wal_level: str) -> None:
    started = time.monotonic()
    pg = vanilla_pg
    extra = ["track_commit_timestamp = on"] if wal_level == "logical" else []
    pg.configure(
        [
            f"wal_level = {wal_level}",
            "max_prepared_transactions = 5",
            "wal_keep_size = 1024",  # keep every segment since initdb for the comparison
            *extra,
        ]
    )
    pg.start()
    run_workload(pg)
    pg.stop()
    segments = pg.wal_segments()

    records = decode_all(segments)
    dump = waldump(pg, segments)
    assert set(records) == set(dump), "our decoder and pg_waldump disagree about which records exist"

    covered: Counter[tuple[str, str]] = Counter()
    clears: set[tuple[str, str]] = set()
    gids: dict[str, str | None] = {}
    prepares: dict[int, bytes] = {}
    for at, rec in sorted(records.items()):
        rmgr, text, blocks = dump[at]
        assert rmgr == rmgr_name(rec.rmid)
        parsed = describe(rec.rmid, rec.info, rec.main_data)
        if parsed is None:
            continue
        name, ours = render(rec, parsed)
        assert ours.rstrip() == text, f"{rmgr} record at {lsn(at)}"
        covered[(rmgr, name)] += 1
        if rec.rmid in (RM_HEAP_ID, RM_HEAP2_ID):
            assert {b.block_id: b.blkno for b in rec.blocks} == blocks
            got = heap.vm_bits_cleared(rec.rmid, rec.info, rec.main_data, blocks)
            assert got == expected_vm_clears(rec.rmid, rec.info, text, blocks), f"{rmgr} {text} at {lsn(at)}"
            if got:
                clears.add((rmgr, name))
        if isinstance(parsed, xact.XactCommitAbort):
            if parsed.is_prepared:
                assert rec.xid == 0
                gids[xact.XACT_OPCODE_NAMES[parsed.opcode]] = parsed.gid
            assert parsed.decided_xid(rec.xid) == (parsed.twophase_xid if parsed.is_prepared else rec.xid)
        if isinstance(parsed, xact.XactPrepare):
            assert parsed.xid == rec.xid
            prepares[parsed.xid] = rec.main_data
        if rec.rmid in (RM_XLOG_ID, RM_SMGR_ID, RM_DBASE_ID, RM_CLOG_ID, RM_MULTIXACT_ID, RM_RELMAP_ID):
            assert not rec.blocks  # these payloads are fully described by main data

    required = REQUIRED | (REQUIRED_LOGICAL if wal_level == "logical" else set())
    assert required <= set(covered), f"not exercised: {sorted(required - set(covered))}"
    assert clears >= REQUIRED_CLEARS, f"no VM clear seen for {sorted(REQUIRED_CLEARS - clears)}"
    # The GID is logged in COMMIT/ABORT PREPARED only with wal_level=logical.
    if wal_level == "logical":
        assert gids == {"COMMIT_PREPARED": "x", "ABORT_PREPARED": "y"}
    else:
        assert gids == {"COMMIT_PREPARED": None, "ABORT_PREPARED": None}

    # The transaction left prepared: its pg_twophase file (written at CHECKPOINT) is the PREPARE
    # record's main data plus CRC-32C.
    files = sorted((pg.datadir / "pg_twophase").iterdir())
    assert len(files) == 1
    xid = int(files[0].name, 16)
    assert files[0].read_bytes() == xact.twophase_file_bytes(prepares[xid])
    assert xact.XactPrepare.unpack(prepares[xid]).gid == "keep"
    assert time.monotonic() - started < 30
