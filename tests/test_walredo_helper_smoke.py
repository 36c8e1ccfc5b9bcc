"""Smoke test of the WAL-redo helper extension (pgxn/neon_walredo) on stock PG15.

Pages of a heap and a btree index are rebuilt from the cluster's own WAL through the helper's
B/P/A/G protocol and compared, after masking with the helper's 'M' message, with the pages the
stopped cluster wrote to its relation files. Then the error, EOF and logging behaviour.
Synchronous: plain subprocess pipes.
"""

from __future__ import annotations

import signal
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from neon.postgres.crc32c import crc32c
from neon.postgres.errors import WalDecodeError
from neon.postgres.pg_distrib import PgDistrib, PostgresUser
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walrecord import decode_record
from neon.utils.lsn import Lsn
from neon.walredo.launcher import helper_pg_control
from tests.fixtures.vanilla import VanillaPostgres
from tests.walredo_scratch import (
    BLCKSZ,
    BufferTag,
    WalRedoError,
    WalRedoHelper,
    build_walredo,
    encode_request,
    make_walredo_scratch,
    message,
    new_scratch_root,
    remove_scratch,
    walredo_command,
)

RM_HEAP_ID = 10
RM_BTREE_ID = 11
XLOG_HEAP_OPMASK = 0x70
# Heap record kinds that change a tuple (xmax or a new tuple): none of that is masked.
TUPLE_CHANGING_HEAP_OPS = (0x00, 0x10, 0x20, 0x40)  # INSERT, DELETE, UPDATE, HOT_UPDATE


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def walredo_so() -> Path:
    return build_walredo()


@pytest.fixture(scope="module")
def pg_control() -> bytes:
    return helper_pg_control()


class HelperFactory:
    def __init__(self, so: Path, pg_control: bytes) -> None:
        self.so = so
        self.pg_control = pg_control
        self.distrib = PgDistrib.default()
        self.user = PostgresUser.resolve()
        self.root = new_scratch_root()
        self.helpers: list[WalRedoHelper] = []
        self.n = 0

    def new_scratch(self) -> Path:
        self.n += 1
        return make_walredo_scratch(self.root / f"scratch{self.n}", self.pg_control, user=self.user)

    def start(self, gucs: dict[str, str] | None = None, scratch: Path | None = None) -> WalRedoHelper:
        scratch = scratch or self.new_scratch()
        cmd = walredo_command(self.distrib, scratch, so_path=self.so, gucs=gucs)
        helper = WalRedoHelper(cmd, self.user)
        self.helpers.append(helper)
        return helper

    def cleanup(self) -> None:
        for h in self.helpers:
            h.kill()
        remove_scratch(self.root)


@pytest.fixture
def helpers(walredo_so: Path, pg_control: bytes) -> Iterator[HelperFactory]:
    f = HelperFactory(walredo_so, pg_control)
    yield f
    f.cleanup()


def wait_for_exit(h: WalRedoHelper, timeout: float = 10) -> tuple[int, str]:
    try:
        rc = h.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"walredo did not exit; stderr:\n{h.stderr_text()}")
    return rc, h.stderr_text()


# --- the workload and the chains of records per block ------------------------------------------
@dataclass
class Chain:
    """The records to rebuild one block: from the last one that initialises it, to the end."""

    tag: BufferTag
    records: list[tuple[int, bytes]] = field(default_factory=list)  # (end_lsn, record)
    base_image: bytes | None = None  # the page image carried by records[0], if any
    last_info: int = 0
    last_rmid: int = 0


def run_workload(pg: VanillaPostgres) -> None:
    sql = pg.safe_psql
    sql("CREATE TABLE t (id int, k int, v text)")
    sql("CREATE INDEX t_k ON t (k)")
    sql("INSERT INTO t SELECT g, g % 997, repeat(md5(g::text), 3) FROM generate_series(1, 4000) g")
    sql("UPDATE t SET v = v || 'x' WHERE id % 10 = 0")  # HOT where there is room
    sql("UPDATE t SET k = k + 5000 WHERE id % 13 = 0")  # non-HOT: new index entries
    sql("DELETE FROM t WHERE id % 7 = 0")
    sql("VACUUM t")
    sql("CHECKPOINT")
    # After the checkpoint the first change of every page carries a full-page image.
    sql("UPDATE t SET v = 'after checkpoint ' || id WHERE id % 9 = 0")
    sql("UPDATE t SET k = -k, v = repeat(v, 12) WHERE id % 17 = 0")  # tuples move: two-page records
    sql("INSERT INTO t SELECT g, g % 31, 'late ' || g FROM generate_series(4001, 4600) g")
    sql("DELETE FROM t WHERE id % 11 = 0")
    sql("VACUUM t")  # prune/vacuum records, VISIBLE records naming a VM page, btree vacuum
    sql("UPDATE t SET v = 'final' WHERE id % 23 = 0")  # clears all-visible bits again


def collect_chains(pg: VanillaPostgres, rels: dict[str, tuple[int, int, int]], wal_end: int) -> dict[BufferTag, Chain]:
    """Chains for every block of rels, from the WAL up to at least wal_end."""
    wanted = set(rels.values())
    refs: dict[BufferTag, list[tuple[int, bytes, bool, int, int]]] = {}
    try:
        for _start, end, raw in read_wal_files(pg.wal_segments()):
            rec = decode_record(raw, end)
            for blk in rec.blocks:
                if blk.forknum != 0 or blk.rel not in wanted:
                    continue
                tag = (0, *blk.rel, blk.blkno)
                inits = blk.apply_image or blk.will_init
                refs.setdefault(tag, []).append((end, raw, inits, rec.rmid, rec.info))
    except WalDecodeError as e:
        # The end of the valid WAL, which must lie beyond everything the workload wrote.
        assert e.lsn is not None and e.lsn >= wal_end, f"WAL decoding failed early: {e}"
    chains: dict[BufferTag, Chain] = {}
    for tag, lst in refs.items():
        inits = [i for i, r in enumerate(lst) if r[2]]
        assert inits, f"no record initialises block {tag}"
        first = inits[-1]
        chain = Chain(tag, [(end, raw) for end, raw, *_ in lst[first:]])
        rec = decode_record(lst[first][1])
        for blk in rec.blocks:
            if (0, *blk.rel, blk.blkno) == tag and blk.apply_image:
                chain.base_image = rec.block_image(blk)
        chain.last_rmid, chain.last_info = lst[-1][3], lst[-1][4]
        chains[tag] = chain
    return chains


def page_lsn(page: bytes) -> int:
    hi, lo = struct.unpack_from("<II", page, 0)
    return hi << 32 | lo


# --- the tests --------------------------------------------------------------------------------
def test_reconstruct_heap_and_btree_pages(vanilla_pg: VanillaPostgres, helpers: HelperFactory) -> None:
    pg = vanilla_pg
    pg.configure(["autovacuum = off", "wal_keep_size = '1GB'", "max_wal_size = '1GB'"])
    pg.start()
    run_workload(pg)
    db_oid = pg.safe_psql("SELECT oid FROM pg_database WHERE datname = current_database()")[0][0]
    rels: dict[str, tuple[int, int, int]] = {}
    for name in ("t", "t_k"):
        filenode = pg.safe_psql(f"SELECT pg_relation_filenode('{name}')")[0][0]
        rels[name] = (1663, db_oid, filenode)
    wal_end = Lsn(pg.current_wal_lsn())
    pg.stop()

    chains = collect_chains(pg, rels, wal_end)
    h = helpers.start()

    mismatches = []
    compared = {"t": 0, "t_k": 0}
    with_base_image = 0
    longest = 0
    for name, rel in rels.items():
        rmid = RM_HEAP_ID if name == "t" else RM_BTREE_ID
        data = (pg.datadir / "base" / str(rel[1]) / str(rel[2])).read_bytes()
        nblocks = len(data) // BLCKSZ
        assert nblocks >= 3, f"{name} has only {nblocks} blocks"
        for blkno in range(nblocks):
            tag: BufferTag = (0, *rel, blkno)
            chain = chains[tag]
            real = data[blkno * BLCKSZ : (blkno + 1) * BLCKSZ]
            want = h.mask(rmid, blkno, real)
            longest = max(longest, len(chain.records))

            # 1. No base image: the first record initialises the page (FPI or WILL_INIT).
            got = h.request(tag, None, chain.records)
            if h.mask(rmid, blkno, got) != want:
                mismatches.append((name, blkno, "records only"))
            if page_lsn(got) != page_lsn(real):
                mismatches.append((name, blkno, f"lsn {page_lsn(got):X} != {page_lsn(real):X}"))

            # 2. The full-page image pushed as the base image, then the later records.
            if chain.base_image is not None:
                with_base_image += 1
                got = h.request(tag, chain.base_image, chain.records[1:])
                if h.mask(rmid, blkno, got) != want:
                    mismatches.append((name, blkno, "base image + records"))
            compared[name] += 1

    assert not mismatches, f"reconstructed pages differ: {mismatches}"
    assert compared["t"] >= 10 and compared["t_k"] >= 3, compared
    assert with_base_image >= 5, "the workload should leave full-page images after the checkpoint"
    assert longest >= 5, "some block should need a chain of several records"

    # The comparison detects a missing record: drop a chain's last record when it changes a tuple.
    detected = 0
    for tag, chain in chains.items():
        if tag[3] != rels["t"][2] or len(chain.records) < 2 or chain.last_rmid != RM_HEAP_ID:
            continue
        if chain.last_info & XLOG_HEAP_OPMASK not in TUPLE_CHANGING_HEAP_OPS:
            continue
        data = (pg.datadir / "base" / str(tag[2]) / str(tag[3])).read_bytes()
        real = data[tag[4] * BLCKSZ : (tag[4] + 1) * BLCKSZ]
        got = h.request(tag, None, chain.records[:-1])
        assert h.mask(RM_HEAP_ID, tag[4], got) != h.mask(RM_HEAP_ID, tag[4], real), tag
        detected += 1
        if detected == 5:
            break
    assert detected >= 1, "no heap block ends with a tuple-changing record to test with"

    rc, err = wait_for_exit(h)
    assert rc == 0, err
    assert "neon_walredo: ready" in err

    # A record that neither initialises the target nor has a base image to build on.
    chain = next(c for c in chains.values() if len(c.records) >= 2)
    h2 = helpers.start()
    h2.send(encode_request(chain.tag, None, chain.records[1:2]))
    rc, err = wait_for_exit(h2)
    assert rc == 1 and "no base image" in err, err


def _bogus_record(*, good_crc: bool, tot_len_delta: int = 0) -> bytes:
    """A heap record without block references (main data only)."""
    main = b"\x01\x00\x00\x00"
    body = bytes([255, len(main)]) + main  # XLR_BLOCK_ID_DATA_SHORT
    tot_len = 24 + len(body)
    hdr = struct.pack("<IIQBB2x", tot_len + tot_len_delta, 1000, 0x1000000, 0, RM_HEAP_ID)
    crc = crc32c(hdr[:20], crc32c(body)) if good_crc else 0xDEADBEEF
    return hdr + struct.pack("<I", crc) + body


TAG: BufferTag = (0, 1663, 5, 16384, 0)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("length", "does not match message size"),
        ("crc", "incorrect CRC"),
        ("no_target", "does not reference the target block"),
        ("msgtype", "invalid message type"),
        ("truncated", "unexpected end of input"),
    ],
)
def test_bogus_input_exits_with_error(helpers: HelperFactory, case: str, expect: str) -> None:
    h = helpers.start()
    t = struct.pack(">BIIII", *TAG)
    lsn = struct.pack(">Q", 0x1000100)
    if case == "length":
        data = message(b"B", t) + message(b"A", lsn + _bogus_record(good_crc=True, tot_len_delta=8))
    elif case == "crc":
        data = message(b"B", t) + message(b"A", lsn + _bogus_record(good_crc=False))
    elif case == "no_target":
        data = message(b"B", t) + message(b"A", lsn + _bogus_record(good_crc=True))
    elif case == "msgtype":
        data = message(b"X", b"")
    else:
        data = message(b"B", t)[:10]
    h.send(data)
    rc, err = wait_for_exit(h)
    assert rc == 1, f"exit code {rc}; stderr:\n{err}"
    assert expect in err, err


def test_eof_exits_cleanly(helpers: HelperFactory) -> None:
    h = helpers.start()
    page = bytes(BLCKSZ)
    assert h.request(TAG, page, []) == page
    rc, err = wait_for_exit(h)
    assert rc == 0, err
    assert "neon_walredo: ready" in err
    assert "ERROR" not in err and "FATAL" not in err, err


def test_log_each_request(helpers: HelperFactory) -> None:
    page = bytearray(BLCKSZ)
    struct.pack_into("<IIHHHHHHI", page, 0, 0, 0x5000, 0, 0, 24, BLCKSZ, BLCKSZ, 0x2004, 0)
    n = 7
    for on in (True, False):
        h = helpers.start({"neon_walredo.log_each_request": "on" if on else "off"})
        for i in range(n):
            tag: BufferTag = (0, 1663, 5, 16384 + i % 2, i)
            assert h.request(tag, bytes(page), []) == page
        rc, err = wait_for_exit(h)
        assert rc == 0, err
        lines = [line for line in err.splitlines() if "neon_walredo: request for" in line]
        assert len(lines) == (n if on else 0), err
        assert err.count("neon_walredo: ready") == 1


def test_protocol_misuse(helpers: HelperFactory) -> None:
    """GetPage with nothing to build on is an error, not a zero page."""
    h = helpers.start()
    h.send(encode_request(TAG, None, []))
    with pytest.raises(WalRedoError, match="no page to return"):
        h.read_page()


def test_signals_and_restart_in_same_scratch(helpers: HelperFactory) -> None:
    """SIGKILL leaves postmaster.pid behind; a new helper in the same directory still starts.
    SIGTERM while waiting for input ends the helper with an error exit."""
    scratch = helpers.new_scratch()
    page = bytes(BLCKSZ)
    for _ in range(2):
        h = helpers.start(scratch=scratch)
        assert h.request(TAG, page, []) == page
        h.proc.send_signal(signal.SIGKILL)
        assert h.proc.wait(10) == -signal.SIGKILL
        assert (scratch / "postmaster.pid").exists()
    h = helpers.start(scratch=scratch)
    assert h.request(TAG, page, []) == page
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(10) == 1
    h.wait()
    assert "terminating" in h.stderr_text()
    assert not (scratch / "postmaster.pid").exists()
