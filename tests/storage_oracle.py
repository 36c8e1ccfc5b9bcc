"""An oracle harness for the pageserver storage engine: compare what it serves with a stopped cluster.

`StorageReader` is the read interface the engine's Timeline exposes. `DatadirReader` implements
it over a stopped PostgreSQL data directory (ignoring the LSN), so the harness can be tested on
its own and used as a negative control. `run_storage_workload` produces the material: a pristine
copy of initdb's output, two clean-shutdown snapshots with the LSN right after their shutdown
checkpoint record, every WAL segment since initdb and the rmgr of every relation (for masking).
`compare_with_datadir` walks everything a base backup would hold (database directories and relmap
files, relations, fork sizes and blocks, pg_xact / pg_multixact segments and pages, two-phase
state) and describes each difference.

Two-phase state: as in Neon, the engine stores an XLOG_XACT_PREPARE record's main data, and a
base backup writes that plus its CRC-32C as `pg_twophase/<XID>`. `get_twophase_file` therefore
returns the main data; `DatadirReader` strips (and checks) the CRC of the state file.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from neon.postgres import slru
from neon.postgres.checkpoint import XLOG_CHECKPOINT_SHUTDOWN
from neon.postgres.constants import (
    BLCKSZ,
    DEFAULTTABLESPACE_OID,
    FSM_FORKNUM,
    GLOBALTABLESPACE_OID,
    INIT_FORKNUM,
    MAIN_FORKNUM,
    RELSEG_SIZE,
    RM_BRIN_ID,
    RM_BTREE_ID,
    RM_GIN_ID,
    RM_GIST_ID,
    RM_HASH_ID,
    RM_HEAP_ID,
    RM_SEQ_ID,
    RM_SPGIST_ID,
    RM_XLOG_ID,
    TABLESPACE_VERSION_DIRECTORY,
    VISIBILITYMAP_FORKNUM,
)
from neon.postgres.controlfile import ControlFileData, DBState
from neon.postgres.crc32c import crc32c
from neon.postgres.page import page_is_new
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walformat import parse_wal_file_name, wal_file_name
from neon.postgres.walrecord import decode_record
from neon.walredo.records import SlruKind
from tests.fixtures.vanilla import VanillaPostgres
from tests.walworkload import WORKLOAD_CONFIG, run_varied_workload

try:
    from neon.pageserver.key import RelTag
except ImportError:  # the engine's key module does not define it yet

    class RelTag(NamedTuple):  # type: ignore[no-redef]
        spc: int
        db: int
        rel: int
        fork: int


__all__ = [
    "AM_RMGR",
    "NOT_WAL_LOGGED",
    "DatadirReader",
    "RelTag",
    "Snapshot",
    "StorageReader",
    "WorkloadRun",
    "collect_rmids",
    "compare_with_datadir",
    "copy_datadir",
    "run_storage_workload",
    "shutdown_checkpoint_end",
]

RelKey = tuple[int, int, int]
"""(spcnode, dbnode, relfilenode)."""
Mask = Callable[[int, int, bytes], Awaitable[bytes]]
"""(rmid, blkno, page) -> the page masked by that rmgr's mask function."""

AM_RMGR = {
    "btree": RM_BTREE_ID,
    "hash": RM_HASH_ID,
    "gin": RM_GIN_ID,
    "gist": RM_GIST_ID,
    "spgist": RM_SPGIST_ID,
    "brin": RM_BRIN_ID,
}

# What PostgreSQL never WAL-logs, so that no redo can reproduce it (as in test_walredo_oracle):
# a sequence's page holds the last value handed out while WAL is written SEQ_LOG_VALS ahead, and
# the SP-GiST metapage caches the last-used pages without WAL. Predicates over (rmid, fork, blkno).
NOT_WAL_LOGGED: dict[str, Callable[[int, int, int], bool]] = {
    "sequence page (values are logged ahead)": lambda rmid, fork, blk: (
        rmid == RM_SEQ_ID and fork == MAIN_FORKNUM and blk == 0
    ),
    "SP-GiST metapage last-used page cache": lambda rmid, fork, blk: (
        rmid == RM_SPGIST_ID and fork == MAIN_FORKNUM and blk == 0
    ),
}

FORK_SUFFIX = {MAIN_FORKNUM: "", FSM_FORKNUM: "_fsm", VISIBILITYMAP_FORKNUM: "_vm", INIT_FORKNUM: "_init"}
_SUFFIX_FORK = {s: f for f, s in FORK_SUFFIX.items()}
RELMAP_FILE_NAME = "pg_filenode.map"
CLOG_TRAILER_SIZE = 8
TWOPHASE_DIR = "pg_twophase"
_PAGE_HEADER_LSN_AND_CHECKSUM = 10  # pd_lsn (8 bytes) + pd_checksum (2 bytes)


# --- the read interface ------------------------------------------------------------------------
@runtime_checkable
class StorageReader(Protocol):
    """What the storage engine serves at an LSN (the engine's Timeline matches these exactly)."""

    def list_dbdirs(self, lsn: int) -> dict[tuple[int, int], bool]:
        """(spcnode, dbnode) -> whether its relmap file exists; (1664, 0) is the global one."""
        ...

    def list_rels(self, spc: int, db: int, lsn: int) -> set[RelTag]: ...

    def get_rel_size(self, tag: RelTag, lsn: int) -> int:
        """In blocks."""
        ...

    async def get_rel_page_at_lsn(self, tag: RelTag, blkno: int, lsn: int) -> bytes: ...

    def list_slru_segments(self, kind: SlruKind, lsn: int) -> set[int]: ...

    def get_slru_segment_size(self, kind: SlruKind, segno: int, lsn: int) -> int:
        """In blocks."""
        ...

    async def get_slru_page_at_lsn(self, kind: SlruKind, segno: int, blkno: int, lsn: int) -> bytes: ...

    def get_relmap_file(self, spc: int, db: int, lsn: int) -> bytes: ...

    def list_twophase_files(self, lsn: int) -> set[int]: ...

    def get_twophase_file(self, xid: int, lsn: int) -> bytes:
        """The PREPARE record's main data (the state file without its trailing CRC-32C)."""
        ...


# --- the reference implementation: a stopped data directory ---------------------------------
def _parse_rel_file(name: str) -> tuple[int, int, int] | None:
    """(relfilenode, fork, segno) of `<relnode>[_fsm|_vm|_init][.N]`, None for anything else
    (temp relations `t<backend>_<relnode>`, pg_internal.init, PG_VERSION, pg_filenode.map...)."""
    base, dot, seg = name.partition(".")
    if dot and not (seg.isdigit() and seg[0] != "0"):
        return None
    rel, us, fork = base.partition("_")
    if not rel.isdigit() or rel[0] == "0":
        return None
    forknum = _SUFFIX_FORK.get(us + fork)
    if forknum is None:
        return None
    return int(rel), forknum, int(seg) if dot else 0


class DatadirReader:
    """`StorageReader` over a stopped data directory; every `lsn` argument is ignored."""

    def __init__(self, datadir: str | os.PathLike[str]) -> None:
        self.datadir = Path(datadir)

    # --- paths -----------------------------------------------------------------------------
    def db_path(self, spc: int, db: int) -> Path:
        if spc == GLOBALTABLESPACE_OID:
            if db != 0:
                raise KeyError(f"global tablespace has only dbnode 0, not {db}")
            return self.datadir / "global"
        if spc == DEFAULTTABLESPACE_OID:
            return self.datadir / "base" / str(db)
        return self.datadir / "pg_tblspc" / str(spc) / TABLESPACE_VERSION_DIRECTORY / str(db)

    def segment_path(self, tag: RelTag, segno: int = 0) -> Path:
        name = f"{tag.rel}{FORK_SUFFIX[tag.fork]}"
        return self.db_path(tag.spc, tag.db) / (f"{name}.{segno}" if segno else name)

    def slru_path(self, kind: SlruKind, segno: int) -> Path:
        return self.datadir / kind.value / slru.segment_file_name(segno)

    def twophase_path(self, xid: int) -> Path:
        return self.datadir / TWOPHASE_DIR / f"{xid:08X}"

    # --- relations -------------------------------------------------------------------------
    def list_dbdirs(self, lsn: int) -> dict[tuple[int, int], bool]:
        out: dict[tuple[int, int], bool] = {}
        glob = self.datadir / "global"
        if glob.is_dir():
            out[(GLOBALTABLESPACE_OID, 0)] = (glob / RELMAP_FILE_NAME).is_file()
        parents = [(DEFAULTTABLESPACE_OID, self.datadir / "base")]
        tblspc = self.datadir / "pg_tblspc"
        if tblspc.is_dir():
            parents += [(int(p.name), p / TABLESPACE_VERSION_DIRECTORY) for p in tblspc.iterdir() if p.name.isdigit()]
        for spc, parent in parents:
            if not parent.is_dir():
                continue
            for d in parent.iterdir():
                if d.name.isdigit() and d.is_dir():
                    out[(spc, int(d.name))] = (d / RELMAP_FILE_NAME).is_file()
        return out

    def list_rels(self, spc: int, db: int, lsn: int) -> set[RelTag]:
        out: set[RelTag] = set()
        for name in os.listdir(self.db_path(spc, db)):
            parsed = _parse_rel_file(name)
            if parsed is not None:
                out.add(RelTag(spc, db, parsed[0], parsed[1]))
        return out

    def get_rel_size(self, tag: RelTag, lsn: int) -> int:
        """As mdnblocks: whole blocks of the first segment that is not full, plus full segments."""
        segno = 0
        while True:
            try:
                nbytes = self.segment_path(tag, segno).stat().st_size
            except FileNotFoundError:
                if segno == 0:
                    raise KeyError(f"relation {tag} does not exist in {self.datadir}") from None
                return segno * RELSEG_SIZE
            blocks = nbytes // BLCKSZ
            if blocks < RELSEG_SIZE:
                return segno * RELSEG_SIZE + blocks
            segno += 1

    def read_rel_block(self, tag: RelTag, blkno: int) -> bytes:
        segno, blk = divmod(blkno, RELSEG_SIZE)
        with open(self.segment_path(tag, segno), "rb") as f:
            f.seek(blk * BLCKSZ)
            page = f.read(BLCKSZ)
        if len(page) != BLCKSZ:
            raise KeyError(f"block {blkno} of {tag} is beyond the end of the relation")
        return page

    async def get_rel_page_at_lsn(self, tag: RelTag, blkno: int, lsn: int) -> bytes:
        return self.read_rel_block(tag, blkno)

    def get_relmap_file(self, spc: int, db: int, lsn: int) -> bytes:
        return (self.db_path(spc, db) / RELMAP_FILE_NAME).read_bytes()

    # --- SLRUs -----------------------------------------------------------------------------
    def list_slru_segments(self, kind: SlruKind, lsn: int) -> set[int]:
        out: set[int] = set()
        d = self.datadir / kind.value
        for name in os.listdir(d) if d.is_dir() else ():
            try:
                segno = slru.parse_segment_file_name(name)
            except slru.SlruError:
                continue
            if (d / name).is_file():
                out.add(segno)
        return out

    def get_slru_segment_size(self, kind: SlruKind, segno: int, lsn: int) -> int:
        try:
            return self.slru_path(kind, segno).stat().st_size // BLCKSZ
        except FileNotFoundError:
            raise KeyError(f"{kind.value} segment {segno:04X} does not exist") from None

    def read_slru_block(self, kind: SlruKind, segno: int, blkno: int) -> bytes:
        with open(self.slru_path(kind, segno), "rb") as f:
            f.seek(blkno * BLCKSZ)
            page = f.read(BLCKSZ)
        if len(page) != BLCKSZ:
            raise KeyError(f"block {blkno} of {kind.value} segment {segno:04X} is beyond its end")
        return page

    async def get_slru_page_at_lsn(self, kind: SlruKind, segno: int, blkno: int, lsn: int) -> bytes:
        return self.read_slru_block(kind, segno, blkno)

    # --- two-phase state -------------------------------------------------------------------
    def list_twophase_files(self, lsn: int) -> set[int]:
        d = self.datadir / TWOPHASE_DIR
        if not d.is_dir():
            return set()
        return {int(p.name, 16) for p in d.iterdir() if len(p.name) == 8 and _is_hex(p.name) and p.is_file()}

    def get_twophase_state_file(self, xid: int) -> bytes:
        """`pg_twophase/<XID>` as on disk: the PREPARE record's main data then its CRC-32C."""
        return self.twophase_path(xid).read_bytes()

    def get_twophase_file(self, xid: int, lsn: int) -> bytes:
        raw = self.get_twophase_state_file(xid)
        data, crc = raw[:-4], raw[-4:]
        if len(raw) < 4 or crc32c(data) != int.from_bytes(crc, "little"):
            raise ValueError(f"{self.twophase_path(xid)}: bad CRC")
        return data


def _is_hex(s: str) -> bool:
    return all(c in "0123456789ABCDEF" for c in s)


# --- the workload ------------------------------------------------------------------------------
@dataclass
class Snapshot:
    datadir: Path
    lsn: int
    """End of the shutdown checkpoint record of the clean stop (where the next record goes)."""


@dataclass
class WorkloadRun:
    root: Path
    initdb_copy: Path
    """initdb's output (configured), copied before the first start."""
    snap_a: Snapshot
    snap_b: Snapshot
    wal_files: list[Path]
    """Every WAL segment from initdb's to the one holding snap_b.lsn, in order."""
    rmids: dict[RelKey, int]
    """(spc, db, relfilenode) -> rmgr id, for every relation of every database at either stop."""
    databases: dict[str, int] = field(default_factory=dict)
    """Database name -> oid at snap_b."""
    subxact_top_xid: int = 0
    """The top-level xid of part 2's 1200-subtransaction transaction."""
    subxact_xids: list[int] = field(default_factory=list)
    """The xids of its subtransactions (the rows' xmin), sorted."""


RMID_QUERY = (
    "SELECT c.relkind, coalesce(a.amname, ''), pg_relation_filenode(c.oid), c.reltablespace, c.relisshared"
    " FROM pg_class c LEFT JOIN pg_am a ON a.oid = c.relam"
    " WHERE pg_relation_filenode(c.oid) IS NOT NULL AND c.relpersistence <> 't'"
)


def _rmid_of(relkind: str, amname: str) -> int:
    return RM_SEQ_ID if relkind == "S" else AM_RMGR.get(amname, RM_HEAP_ID)


def collect_rmids(pg: VanillaPostgres) -> dict[RelKey, int]:
    """The rmgr of every relation with storage in every database of a running cluster.

    Databases that refuse connections (template0) are initdb's FILE_COPY of template1 and are
    given template1's relations."""
    out: dict[RelKey, int] = {}
    dbs = pg.safe_psql("SELECT oid, datname, datallowconn, dattablespace FROM pg_database")
    rows_by_db: dict[str, list[tuple]] = {}
    for _oid, name, allow, _spc in dbs:
        if allow:
            rows_by_db[name] = pg.safe_psql(RMID_QUERY, dbname=name)
    for oid, name, allow, dattablespace in dbs:
        rows = rows_by_db[name] if allow else rows_by_db["template1"]
        for relkind, amname, filenode, reltablespace, shared in rows:
            key = (GLOBALTABLESPACE_OID, 0, filenode) if shared else (reltablespace or dattablespace, oid, filenode)
            out[key] = _rmid_of(relkind, amname)
    return out


def shutdown_checkpoint_end(datadir: Path) -> int:
    """The end LSN of the shutdown checkpoint record a clean stop wrote (pg_control's checkPoint)."""
    cf = ControlFileData.read(datadir / "global" / "pg_control")
    if cf.state != DBState.SHUTDOWNED:
        raise AssertionError(f"{datadir} was not shut down cleanly: {cf.state_name}")
    seg_size, tli = cf.xlog_seg_size, cf.checkpoint_copy.this_timeline_id
    segno = cf.checkpoint // seg_size
    files = [datadir / "pg_wal" / wal_file_name(tli, s, seg_size) for s in (segno, segno + 1)]
    files = [p for p in files if p.exists()]
    records = read_wal_files(files, start_lsn=cf.checkpoint, seg_size=seg_size)
    try:
        start, end, raw = next(records)
    finally:
        records.close()
    r = decode_record(raw, start)
    if start != cf.checkpoint or r.rmid != RM_XLOG_ID or r.info & 0xF0 != XLOG_CHECKPOINT_SHUTDOWN:
        raise AssertionError(f"no shutdown checkpoint record at {cf.checkpoint:X} in {files[0]}")
    return end


def _snapshot(pg: VanillaPostgres, dest: Path) -> Snapshot:
    pg.copy_datadir(dest)
    return Snapshot(dest, shutdown_checkpoint_end(dest))


def _make_multixacts(pg: VanillaPostgres, table: str, *, rows: int = 40, lockers: int = 4, rounds: int = 5) -> None:
    """Rounds of sessions share-locking rows at once. Locker i skips the rows with id % lockers
    == i, so rows get different member sets (a backend reuses a multixact for the same set)."""
    pg.safe_psql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, v int);"
        f" INSERT INTO {table} SELECT g, g FROM generate_series(1, {rows}) g"
    )
    for _ in range(rounds):
        barrier = threading.Barrier(lockers)
        errors: list[BaseException] = []

        def locker(i: int, barrier: threading.Barrier = barrier, errors: list[BaseException] = errors) -> None:
            try:
                with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
                    cur.execute(f"SELECT * FROM {table} WHERE id % {lockers} <> {i} FOR SHARE")
                    barrier.wait(timeout=30)  # all hold their share locks at once
                    conn.commit()
            except BaseException as e:  # surfaced below
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=locker, args=(i,)) for i in range(lockers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]


def _make_subxact_multixacts(pg: VanillaPostgres, table: str, *, rows: int = 1200) -> None:
    """A transaction key-share-locks every row, then updates each in its own subtransaction: a
    multixact (parent locker + subtransaction updater) per row, enough members to fill a page."""
    pg.safe_psql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, v int);"
        f" INSERT INTO {table} SELECT g, g FROM generate_series(1, {rows}) g"
    )
    pg.safe_psql(
        f"DO $$ BEGIN PERFORM * FROM {table} FOR KEY SHARE; FOR i IN 1..{rows} LOOP"
        f" BEGIN UPDATE {table} SET v = v + 1 WHERE id = i; EXCEPTION WHEN others THEN RAISE; END;"
        " END LOOP; END $$"
    )


N_SUBXACTS = 1200


def _burn_xids_to_page_boundary(pg: VanillaPostgres, before: int) -> None:
    """Consume xids (aborted subtransactions that each insert a row) until the next xid is about
    `before` short of a pg_xact page boundary."""
    pg.safe_psql("CREATE TABLE xid_burner (i int)")
    nxt = (int(pg.safe_psql("SELECT txid_current()")[0][0]) & 0xFFFFFFFF) + 1
    boundary = (nxt // slru.CLOG_XACTS_PER_PAGE + 1) * slru.CLOG_XACTS_PER_PAGE
    n = boundary - before - nxt - 1  # the DO block's own top-level xid is one more
    if n > 0:
        pg.safe_psql(
            "DO $$ BEGIN FOR i IN 1.." + str(n) + " LOOP"
            " BEGIN INSERT INTO xid_burner VALUES (i); RAISE EXCEPTION 'burn';"
            " EXCEPTION WHEN raise_exception THEN NULL; END; END LOOP; END $$"
        )


def _many_subxacts(pg: VanillaPostgres) -> tuple[int, list[int]]:
    pg.safe_psql("CREATE TABLE subx_many (i int)")
    _burn_xids_to_page_boundary(pg, N_SUBXACTS // 2)
    body = "".join(f"SAVEPOINT s{i}; INSERT INTO subx_many VALUES ({i});" for i in range(N_SUBXACTS))
    with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT txid_current()")
        row = cur.fetchone()
        assert row is not None
        top = int(row[0]) & 0xFFFFFFFF
        cur.execute(body)
        conn.commit()
    xids = sorted(int(x) for (x,) in pg.safe_psql("SELECT xmin::text::bigint FROM subx_many"))
    if len(xids) != N_SUBXACTS or len(set(xids)) != N_SUBXACTS:
        raise AssertionError(f"expected {N_SUBXACTS} subtransaction xids, got {len(set(xids))}")
    return top, xids


def _part2(pg: VanillaPostgres) -> tuple[int, list[int]]:
    sql = pg.safe_psql
    sql("COMMIT PREPARED 'left_open'")
    top, xids = _many_subxacts(pg)
    sql("CREATE DATABASE db_keep_file_copy STRATEGY FILE_COPY")
    sql(
        "CREATE TABLE kept (id int PRIMARY KEY, t text); INSERT INTO kept SELECT g, md5(g::text)"
        " FROM generate_series(1, 500) g",
        dbname="db_keep_file_copy",
    )
    sql("CREATE DATABASE db_keep_wal_log STRATEGY WAL_LOG")
    sql("CREATE TABLE kept2 (id int); INSERT INTO kept2 SELECT generate_series(1, 100)", dbname="db_keep_wal_log")
    for stmt in (
        "CREATE TABLE drop_me AS SELECT g, md5(g::text) AS t FROM generate_series(1, 2000) g",
        "CREATE INDEX drop_me_idx ON drop_me (g)",
        "CHECKPOINT",
        "DROP TABLE drop_me",
        "CREATE TABLE trunc_keep AS SELECT g FROM generate_series(1, 3000) g",
        "TRUNCATE trunc_keep",
        "INSERT INTO trunc_keep SELECT generate_series(1, 10)",
        "CREATE TABLE vm_t (id int, v int) WITH (fillfactor = 50)",
        "INSERT INTO vm_t SELECT g, g FROM generate_series(1, 20000) g",
        "VACUUM (FREEZE) vm_t",
        "UPDATE vm_t SET v = v + 1 WHERE id % 1000 = 0",
        "DELETE FROM vm_t WHERE id % 2999 = 0",
    ):
        sql(stmt)
    _make_multixacts(pg, "mx_b", rounds=2)
    _make_subxact_multixacts(pg, "mx_sub")
    return top, xids


def _wal_files(pg: VanillaPostgres, first_segno: int, end_lsn: int, seg_size: int) -> list[Path]:
    """Segments first_segno..the one holding end_lsn (preallocated segments past it are left out)."""
    by_segno = {parse_wal_file_name(p.name, seg_size)[1]: p for p in pg.wal_segments()}
    last = end_lsn // seg_size
    if end_lsn % seg_size == 0 and last not in by_segno:
        last -= 1
    missing = [s for s in range(first_segno, last + 1) if s not in by_segno]
    if missing:
        raise AssertionError(f"WAL segments were removed: {missing[:5]}")
    return [by_segno[s] for s in range(first_segno, last + 1)]


def run_storage_workload(root: Path, *, extra_config: Sequence[str] = ()) -> WorkloadRun:
    """initdb, copy, then two parts of workload each ended by a clean stop and a snapshot."""
    pg = VanillaPostgres(root / "pg").init()
    pg.configure([*WORKLOAD_CONFIG, *extra_config])
    initdb_copy = pg.copy_datadir(root / "initdb")
    initdb_cf = ControlFileData.read(initdb_copy / "global" / "pg_control")
    rmids: dict[RelKey, int] = {}
    try:
        pg.start()
        run_varied_workload(pg)
        pg.safe_psql("BEGIN; INSERT INTO big VALUES (-4, 'left open'); PREPARE TRANSACTION 'left_open'")
        rmids |= collect_rmids(pg)
        pg.stop()
        snap_a = _snapshot(pg, root / "snap_a")
        if not DatadirReader(snap_a.datadir).list_twophase_files(snap_a.lsn):
            raise AssertionError("snapshot A has no pg_twophase file for 'left_open'")

        pg.start()
        top, xids = _part2(pg)
        rmids |= collect_rmids(pg)
        databases = {name: oid for oid, name in pg.safe_psql("SELECT oid, datname FROM pg_database")}
        pg.stop()
        snap_b = _snapshot(pg, root / "snap_b")
    finally:
        pg.cleanup()
    seg_size = initdb_cf.xlog_seg_size
    wal_files = _wal_files(pg, initdb_cf.checkpoint // seg_size, snap_b.lsn, seg_size)
    return WorkloadRun(root, initdb_copy, snap_a, snap_b, wal_files, rmids, databases, top, xids)


# --- the comparison ----------------------------------------------------------------------------
class _Report:
    def __init__(self, max_details: int) -> None:
        self.max_details = max_details
        self.details: list[str] = []
        self.counts: Counter[str] = Counter()

    def add(self, category: str, msg: str) -> None:
        self.counts[category] += 1
        if len(self.details) < self.max_details:
            self.details.append(f"{category}: {msg}")

    def result(self) -> list[str]:
        total = sum(self.counts.values())
        if not total:
            return []
        out = list(self.details)
        if total > len(out):
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            out.append(f"... and {total - len(out)} more not shown ({total} mismatches: {counts})")
        return out


def _first_diff(a: bytes, b: bytes) -> str:
    n = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"{n} bytes differ, first at offset {first}"


def _zero_lsn_and_checksum(page: bytes) -> bytes:
    return bytes(_PAGE_HEADER_LSN_AND_CHECKSUM) + page[_PAGE_HEADER_LSN_AND_CHECKSUM:]


def _chunks(n: int, size: int) -> Iterator[range]:
    for lo in range(0, n, size):
        yield range(lo, min(lo + size, n))


async def _gather_pages(fetch: Callable[[int], Awaitable[bytes]], blocks: Iterable[int]) -> list[bytes | BaseException]:
    return await asyncio.gather(*(fetch(b) for b in blocks), return_exceptions=True)


def _trailing(pages: Sequence[bytes]) -> str:
    nonzero = sum(any(p) for p in pages)
    return "all zero" if not nonzero else f"{nonzero} of them not all-zero"


async def compare_with_datadir(
    reader: StorageReader,
    lsn: int,
    expected: DatadirReader,
    rmids: dict[RelKey, int],
    mask: Mask,
    *,
    allow_trailing_zero_pages: bool = False,
    max_details: int = 50,
    notes: list[str] | None = None,
) -> list[str]:
    """Differences between what `reader` serves at `lsn` and the data directory `expected`.

    Each entry is "<category>: <description>" (categories dbdirs, relmap, rels, size, page, slru,
    twophase, error); at most `max_details` are listed, then one line counting the rest and all
    mismatches per category. Empty means equal.

    Pages are compared after masking with the relation's rmgr (`rmids`; heap when unknown), VM
    pages with pd_lsn and pd_checksum zeroed, FSM forks by size only; the NOT_WAL_LOGGED pages are
    exempt. SLRU pages and two-phase state must be byte-equal. Blocks of `expected` beyond the
    reader's size are a "size" mismatch (saying whether they are all zero) unless
    `allow_trailing_zero_pages` and they are. `notes` (if given) collects what was exempted or
    assumed, and the number of pages compared."""
    rep = _Report(max_details)
    info: list[str] = notes if notes is not None else []
    excepted: Counter[str] = Counter()
    unknown_rmid: set[RelKey] = set()
    compared = 0

    def call(what: str, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except Exception as e:
            rep.add("error", f"{what}: {type(e).__name__}: {e}")
            return None

    # Database directories and relmap files.
    exp_dbs = expected.list_dbdirs(lsn)
    got_dbs = call("list_dbdirs", reader.list_dbdirs, lsn)
    if not isinstance(got_dbs, dict):
        return rep.result()
    for key in sorted(exp_dbs.keys() - got_dbs.keys()):
        nrels = len(expected.list_rels(*key, lsn))
        rep.add("dbdirs", f"{key} missing from the reader ({nrels} relation forks in the datadir)")
    for key in sorted(got_dbs.keys() - exp_dbs.keys()):
        rep.add("dbdirs", f"{key} served by the reader but not in the datadir")
    common_dbs = sorted(exp_dbs.keys() & got_dbs.keys())
    for key in common_dbs:
        if exp_dbs[key] != got_dbs[key]:
            rep.add("dbdirs", f"{key} relmap exists: reader {got_dbs[key]}, datadir {exp_dbs[key]}")
        elif exp_dbs[key]:
            got_map = call(f"get_relmap_file{key}", reader.get_relmap_file, *key, lsn)
            exp_map = expected.get_relmap_file(*key, lsn)
            if got_map is not None and got_map != exp_map:
                rep.add("relmap", f"{key} pg_filenode.map differs: {_first_diff(got_map, exp_map)}")  # type: ignore[arg-type]

    # Relations.
    for spc, db in common_dbs:
        exp_rels = expected.list_rels(spc, db, lsn)
        got_rels = call(f"list_rels({spc}, {db})", reader.list_rels, spc, db, lsn)
        if not isinstance(got_rels, set):
            continue
        for tag in sorted(exp_rels - got_rels):
            if tag.fork == FSM_FORKNUM:
                # Postgres creates and extends FSM forks without WAL (fsm_extend): nothing replaying
                # the WAL can know of one that no record references.
                excepted["FSM fork never referenced by WAL (FSM is not WAL-logged)"] += 1
                continue
            rep.add("rels", f"{tag} missing from the reader ({expected.get_rel_size(tag, lsn)} blocks in the datadir)")
        for tag in sorted(got_rels - exp_rels):
            rep.add("rels", f"{tag} served by the reader but not in the datadir")
        for tag in sorted(exp_rels & got_rels):
            compared += await _compare_fork(
                reader, lsn, expected, tag, rmids, mask, rep, allow_trailing_zero_pages, info, excepted, unknown_rmid
            )

    # SLRUs and two-phase state.
    for kind in SlruKind:
        compared += await _compare_slru(reader, lsn, expected, kind, rep, allow_trailing_zero_pages, info, call)
    exp_2pc = expected.list_twophase_files(lsn)
    got_2pc = call("list_twophase_files", reader.list_twophase_files, lsn)
    if isinstance(got_2pc, set):
        for xid in sorted(exp_2pc - got_2pc):
            rep.add("twophase", f"xid {xid} missing from the reader")
        for xid in sorted(got_2pc - exp_2pc):
            rep.add("twophase", f"xid {xid} served by the reader but not in the datadir")
        for xid in sorted(exp_2pc & got_2pc):
            got = call(f"get_twophase_file({xid})", reader.get_twophase_file, xid, lsn)
            exp = expected.get_twophase_file(xid, lsn)
            if got is None or got == exp:
                continue
            hint = (
                " (the reader returned the state file with its CRC)"
                if got == exp + crc32c(exp).to_bytes(4, "little")
                else ""
            )
            rep.add("twophase", f"xid {xid} content differs: {_first_diff(got, exp)}{hint}")  # type: ignore[arg-type]

    for reason, n in sorted(excepted.items()):
        info.append(f"{n} differing page(s) exempt: {reason}")
    if unknown_rmid:
        info.append(
            f"{len(unknown_rmid)} relation(s) without a known rmid, masked as heap: {sorted(unknown_rmid)[:10]}"
        )
    info.append(f"{compared} pages compared")
    return rep.result()


async def _compare_fork(
    reader: StorageReader,
    lsn: int,
    expected: DatadirReader,
    tag: RelTag,
    rmids: dict[RelKey, int],
    mask: Mask,
    rep: _Report,
    allow_trailing_zero_pages: bool,
    info: list[str],
    excepted: Counter[str],
    unknown_rmid: set[RelKey],
) -> int:
    esize = expected.get_rel_size(tag, lsn)
    try:
        gsize = reader.get_rel_size(tag, lsn)
    except Exception as e:
        rep.add("error", f"get_rel_size{tuple(tag)}: {type(e).__name__}: {e}")
        return 0
    if tag.fork == FSM_FORKNUM:
        # Neither FSM contents nor FSM extension are WAL-logged; only a reader that has more FSM
        # blocks than the cluster ever wrote would be wrong.
        if gsize > esize:
            rep.add("size", f"{tag} (FSM) reader {gsize} blocks, datadir {esize}")
        elif gsize != esize:
            excepted["FSM fork size (FSM extension is not WAL-logged)"] += 1
        return 0
    if esize > gsize:
        extra = [expected.read_rel_block(tag, b) for b in range(gsize, esize)]
        zero = not any(any(p) for p in extra)
        if zero and allow_trailing_zero_pages:
            info.append(f"{tag}: {esize - gsize} trailing all-zero block(s) in the datadir beyond the reader's {gsize}")
        else:
            rep.add("size", f"{tag} reader {gsize} blocks, datadir {esize}: the extra blocks are {_trailing(extra)}")
    elif gsize > esize:
        rep.add("size", f"{tag} reader {gsize} blocks, datadir {esize}")

    relkey = (tag.spc, tag.db, tag.rel)
    rmid = rmids.get(relkey)
    if rmid is None:
        rmid = RM_HEAP_ID
    compared = 0
    for blocks in _chunks(min(esize, gsize), 64):
        got_pages = await _gather_pages(lambda b: reader.get_rel_page_at_lsn(tag, b, lsn), blocks)
        for blk, got in zip(blocks, got_pages, strict=True):
            if isinstance(got, BaseException):
                rep.add("error", f"get_rel_page_at_lsn({tag}, {blk}): {type(got).__name__}: {got}")
                continue
            exp = expected.read_rel_block(tag, blk)
            compared += 1
            if got == exp:
                continue
            if len(got) != BLCKSZ:
                rep.add("page", f"{tag} blk {blk}: reader returned {len(got)} bytes")
                continue
            if tag.fork == VISIBILITYMAP_FORKNUM:
                g, e = _zero_lsn_and_checksum(got), _zero_lsn_and_checksum(exp)
            elif page_is_new(got) or page_is_new(exp):
                g, e = got, exp  # a new page against an initialised one: nothing to mask
            else:
                if relkey not in rmids:
                    unknown_rmid.add(relkey)
                try:
                    g, e = await mask(rmid, blk, got), await mask(rmid, blk, exp)
                except Exception as ex:
                    rep.add("error", f"masking {tag} blk {blk} with rmid {rmid}: {type(ex).__name__}: {ex}")
                    continue
            if g == e:
                continue
            if tag.fork == VISIBILITYMAP_FORKNUM and not any(got[24:]) and any(exp[24:]):
                # CREATE DATABASE ... STRATEGY WAL_LOG logs every copied page as a standard-layout
                # FPI; on a VM page the bitmap lies in the "hole" between pd_lower and pd_upper, so the
                # WAL carries the page with no bits set. All bits clear is always a valid VM state.
                excepted["VM page whose bits the WAL never carried (page_std FPI of a copied VM page)"] += 1
                continue
            reason = next((r for r, f in NOT_WAL_LOGGED.items() if f(rmid, tag.fork, blk)), None)
            if reason is not None:
                excepted[reason] += 1
                continue
            how = "with pd_lsn/pd_checksum zeroed" if tag.fork == VISIBILITYMAP_FORKNUM else f"masked as rmid {rmid}"
            unknown = "" if relkey in rmids or tag.fork == VISIBILITYMAP_FORKNUM else " (rmid unknown)"
            rep.add("page", f"{tag} blk {blk} differs {how}{unknown}: {_first_diff(g, e)}")
    return compared


async def _compare_slru(
    reader: StorageReader,
    lsn: int,
    expected: DatadirReader,
    kind: SlruKind,
    rep: _Report,
    allow_trailing_zero_pages: bool,
    info: list[str],
    call: Callable[..., object],
) -> int:
    exp_segs = expected.list_slru_segments(kind, lsn)
    got_segs = call(f"list_slru_segments({kind.name})", reader.list_slru_segments, kind, lsn)
    if not isinstance(got_segs, set):
        return 0
    for segno in sorted(exp_segs - got_segs):
        rep.add("slru", f"{kind.value} segment {segno:04X} missing from the reader")
    for segno in sorted(got_segs - exp_segs):
        rep.add("slru", f"{kind.value} segment {segno:04X} served by the reader but not in the datadir")
    compared = 0
    for segno in sorted(exp_segs & got_segs):
        name = f"{kind.value}/{segno:04X}"
        esize = expected.get_slru_segment_size(kind, segno, lsn)
        gsize = call(f"get_slru_segment_size({name})", reader.get_slru_segment_size, kind, segno, lsn)
        if not isinstance(gsize, int):
            continue
        if esize > gsize:
            extra = [expected.read_slru_block(kind, segno, b) for b in range(gsize, esize)]
            zero = not any(any(p) for p in extra)
            if zero and allow_trailing_zero_pages:
                info.append(f"{name}: {esize - gsize} trailing all-zero page(s) in the datadir")
            else:
                rep.add("slru", f"{name} reader {gsize} pages, datadir {esize}: the extra pages are {_trailing(extra)}")
        elif gsize > esize:
            rep.add("slru", f"{name} reader {gsize} pages, datadir {esize}")
        blocks = range(min(esize, gsize))
        got_pages = await _gather_pages(lambda b: reader.get_slru_page_at_lsn(kind, segno, b, lsn), blocks)  # noqa: B023
        for blk, got in zip(blocks, got_pages, strict=True):
            if isinstance(got, BaseException):
                rep.add("error", f"get_slru_page_at_lsn({name}, {blk}): {type(got).__name__}: {got}")
                continue
            exp = expected.read_slru_block(kind, segno, blk)
            compared += 1
            if kind == SlruKind.CLOG and len(got) == BLCKSZ + CLOG_TRAILER_SIZE:
                # Neon keeps the latest commit timestamp after a CLOG page (for LSN-by-timestamp
                # lookups); the page itself is the first 8192 bytes, which basebackup writes out.
                got = got[:BLCKSZ]
            if got != exp:
                size = f" (reader returned {len(got)} bytes)" if len(got) != BLCKSZ else ""
                rep.add("slru", f"{name} page {blk} differs{size}: {_first_diff(got, exp)}")
    return compared


def copy_datadir(src: Path, dest: Path, *, with_wal: bool = False) -> Path:
    """A copy of a snapshot to tamper with (pg_wal left out unless asked for)."""
    ignore = None if with_wal else (lambda d, names: ["pg_wal"] if Path(d) == src else [])
    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return dest
