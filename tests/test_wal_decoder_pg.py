"""The WAL decoder against pg_waldump on real PG15 WAL, with each wal_compression method."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from neon.postgres import waldecoder
from neon.postgres.constants import BLCKSZ, rmgr_name
from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walformat import skip_page_header
from neon.postgres.walrecord import decode_record
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres, make_test_root
from tests.waldump_oracle import Dump, pg_waldump
from tests.walworkload import WORKLOAD_CONFIG, run_varied_workload

COMPRESSIONS = ["pglz", "lz4", "zstd"]


class WalRun:
    def __init__(self, pg: VanillaPostgres, compression: str) -> None:
        self.pg = pg
        self.compression = compression
        self.files = pg.wal_segments()
        self.dump: Dump = pg_waldump(pg.pg_bin("pg_waldump"), self.files)


@pytest.fixture(scope="module", params=COMPRESSIONS)
def wal_run(request: pytest.FixtureRequest) -> Iterator[WalRun]:
    root = make_test_root(prefix=f"neon-walrun-{request.param}-")
    pg = VanillaPostgres(root / "pg").init()
    pg.configure([*WORKLOAD_CONFIG, f"wal_compression = {request.param}"])
    pg.start()
    try:
        run_varied_workload(pg)
    finally:
        pg.stop()
    yield WalRun(pg, request.param)
    shutil.rmtree(root, ignore_errors=True)


def _decode_all(
    files: list[Path], native: bool | None = None
) -> tuple[list[tuple[int, int, bytes]], WalDecodeError | None]:
    records = []
    err = None
    try:
        for rec in read_wal_files(files, native=native):
            records.append(rec)
    except WalDecodeError as e:
        err = e
    return records, err


def test_records_match_pg_waldump(wal_run: WalRun) -> None:
    records, err = _decode_all(wal_run.files)
    dump = wal_run.dump
    assert len(dump.records) > 10000
    assert len(records) == len(dump.records)
    stats: Counter[str] = Counter()
    # Each record's end LSN is where the next one starts (past a page header), or after an
    # XLOG_SWITCH, the start of the next segment.
    for (_, end, _), (next_start, _, _) in itertools.pairwise(records):
        assert skip_page_header(end) == next_start, f"end {end:X} then {next_start:X}"
    for (start, end, rec), ref in zip(records, dump.records, strict=True):
        r = decode_record(rec, start)
        where = f"record at {start:X}"
        assert start == ref.lsn, where
        assert r.prev == ref.prev, where
        assert rmgr_name(r.rmid) == ref.rmgr, where
        assert r.xid == ref.xid, where
        assert r.tot_len == ref.tot_len, where
        assert r.tot_len - sum(b.image_len for b in r.blocks) == ref.rec_len, where
        assert end > start and end % 8 == 0, where
        assert [b.block_id for b in r.blocks] == [b.block_id for b in ref.blocks], where
        for ours, theirs in zip(r.blocks, ref.blocks, strict=True):
            assert ours.rel == theirs.rel, where
            assert ours.forknum == theirs.fork, where
            assert ours.blkno == theirs.blk, where
            assert ours.has_image == theirs.has_image, where
            assert ours.apply_image == theirs.apply_image, where
            if ours.has_image:
                assert ours.hole_offset == theirs.hole_offset, where
                assert ours.hole_length == theirs.hole_length, where
                stats[theirs.method or "none"] += 1
        # pg_waldump shows will_init only through "+INIT" on heap records.
        if ref.rmgr in ("Heap", "Heap2") and "+INIT" in ref.desc:
            assert r.blocks[0].will_init, where
        stats["block_refs"] += len(r.blocks)
        stats["crosses_page"] += (start // BLCKSZ) != ((start + r.tot_len - 1) // BLCKSZ)
        stats["crosses_segment"] += (start >> 24) != ((start + r.tot_len - 1) >> 24)
        stats["header_split"] += BLCKSZ - start % BLCKSZ < 24
        stats["bigger_than_page"] += r.tot_len > BLCKSZ
        stats[f"rmgr:{ref.rmgr}"] += 1
        stats["switch"] += ref.rmgr == "XLOG" and ref.desc.startswith("SWITCH")
    # End of WAL found at the same place as pg_waldump.
    assert err is not None and dump.error is not None
    m = re.search(r" at ([0-9A-F]+/[0-9A-F]+)", dump.error)
    assert m and err.lsn == Lsn(m[1]), (str(err), dump.error)
    assert err.source and Path(err.source).name == f"{1:08X}{0:08X}{err.lsn >> 24:08X}"
    # The workload produced every shape we mean to test.
    assert stats[wal_run.compression] > 0, stats
    for shape in ("crosses_page", "crosses_segment", "header_split", "bigger_than_page", "switch"):
        assert stats[shape] > 0, (shape, stats)
    for rmgr in (
        "Btree",
        "Gin",
        "Gist",
        "SPGist",
        "BRIN",
        "Hash",
        "Sequence",
        "MultiXact",
        "Database",
        "Storage",
        "RelMap",
        "Standby",
        "CLOG",
        "Heap2",
        "LogicalMessage",
    ):
        assert stats[f"rmgr:{rmgr}"] > 0, (rmgr, stats)


def test_python_and_native_scanners_agree(wal_run: WalRun) -> None:
    if not waldecoder.NATIVE:
        pytest.skip("native scanner not built")
    py_records, py_err = _decode_all(wal_run.files, native=False)
    c_records, c_err = _decode_all(wal_run.files, native=True)
    assert py_records == c_records
    assert py_err is not None and c_err is not None and str(py_err) == str(c_err)


def test_every_image_restores_to_a_sane_page(wal_run: WalRun) -> None:
    records, _ = _decode_all(wal_run.files)
    restored = 0
    for start, _end, rec in records:
        r = decode_record(rec, start)
        for b in r.blocks:
            if not b.has_image:
                continue
            page = r.block_image(b)
            assert len(page) == BLCKSZ
            restored += 1
            lower, upper, special, version = struct.unpack_from("<HHHH", page, 12)
            if page == bytes(BLCKSZ):
                continue
            assert version == 0x2004, f"block {b} at {start:X}"
            assert 24 <= lower <= upper <= special <= BLCKSZ, f"block {b} at {start:X}"
            if b.hole_length:
                assert b.hole_offset == lower and b.hole_offset + b.hole_length == upper
    assert restored > 100


def test_pagectl_waldump_json(wal_run: WalRun) -> None:
    if wal_run.compression != "lz4":
        pytest.skip("the CLI is checked on one run")
    proc = subprocess.run(
        [sys.executable, "-m", "neon.pagectl.main", "waldump", "--json", *map(str, wal_run.files)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1  # the WAL ends before the last (recycled) file does
    assert "invalid record length" in proc.stderr and wal_run.files[0].parent.name in proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == len(wal_run.dump.records)
    for obj, ref in zip(lines, wal_run.dump.records, strict=True):
        assert Lsn(obj["lsn"]) == ref.lsn
        assert Lsn(obj["prev"]) == ref.prev
        assert obj["rmgr"] == ref.rmgr and obj["xid"] == ref.xid and obj["tot_len"] == ref.tot_len
        assert Lsn(obj["end_lsn"]) > ref.lsn
        blocks = [
            (b["spc"], b["db"], b["rel"], b["fork"], b["blk"], b["has_image"], b["apply_image"]) for b in obj["blocks"]
        ]
        assert blocks == [(*b.rel, b.fork, b.blk, b.has_image, b.apply_image) for b in ref.blocks]
        assert all(isinstance(b["will_init"], bool) for b in obj["blocks"])
    text = subprocess.run(
        [sys.executable, "-m", "neon.pagectl.main", "waldump", str(wal_run.files[0])],
        capture_output=True,
        text=True,
    )
    assert text.stdout.startswith("rmgr: ")
