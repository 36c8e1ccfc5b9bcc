"""`neon.postgres.wal_craft` against a vanilla PG15: each crafted WAL shape, as pg_waldump reads it.

The layout arithmetic is checked on its own first; then each shape is crafted on one shared
server (the shapes follow each other in its WAL, as they would on a compute) and the segments
are read back with pg_waldump and with our decoder: the crafted records sit where the crafter
said, cross (or end on) the page and segment boundaries the shape is about, and the next record
after the crafted end starts exactly where the shape leaves the WAL.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from neon.postgres import wal_craft
from neon.postgres.constants import DEFAULT_WAL_SEGMENT_SIZE, SIZE_OF_XLOG_RECORD, XLOG_BLCKSZ
from neon.postgres.errors import WalDecodeError
from neon.postgres.walfiles import read_wal_files
from neon.postgres.walformat import skip_page_header, wal_file_name
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres, make_test_root
from tests.waldump_oracle import DumpRecord, pg_waldump

SEG = DEFAULT_WAL_SEGMENT_SIZE


# --- layout arithmetic ---------------------------------------------------------------------------
def test_logical_message_record_size() -> None:
    # 24-byte XLogRecord + 2-byte short main-data header + 24-byte xl_logical_message + "p\0" + 10.
    assert wal_craft.logical_message_record_size("p", 10) == 24 + 2 + 24 + 2 + 10
    # Main data of 256 bytes or more takes the 5-byte long header.
    assert wal_craft.logical_message_record_size("p", 229) == 24 + 2 + 255
    assert wal_craft.logical_message_record_size("p", 230) == 24 + 5 + 256


def test_record_end_lsn_crosses_page_and_segment_headers() -> None:
    # Fits in its page: just MAXALIGNed.
    assert wal_craft.record_end_lsn(0x1000028, 61) == 0x1000068
    # Ends exactly on a page boundary: the boundary, not past the next page's header.
    assert wal_craft.record_end_lsn(0x1001FE8, 24) == 0x1002000
    # One byte more: continues after the next page's 24-byte short header.
    assert wal_craft.record_end_lsn(0x1001FE8, 25) == 0x1002000 + 24 + 8
    # Into the next segment: its first page has the 40-byte long header.
    assert wal_craft.record_end_lsn(SEG - 16, 32) == SEG + 40 + 16
    # A record starting "at" a page boundary really starts after the header.
    assert wal_craft.record_end_lsn(0x1002000, 8) == 0x1002000 + 24 + 8


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0x1000028, 0x1000400),
        (0x1001F00, 0x1004020),
        (SEG - 0x100, SEG + 5 * XLOG_BLCKSZ + 1024),
        (0x1000028, 0x1002000),
    ],
)
def test_logical_message_size_for_round_trips(start: int, end: int) -> None:
    size = wal_craft.logical_message_size_for(start, end, wal_craft.PREFIX)
    assert wal_craft.record_end_lsn(start, wal_craft.logical_message_record_size(wal_craft.PREFIX, size)) == end


def test_logical_message_size_for_refuses_impossible_spans() -> None:
    with pytest.raises(ValueError):
        wal_craft.logical_message_size_for(0x1000028, 0x1000030, wal_craft.PREFIX)  # shorter than a header
    with pytest.raises(ValueError):
        wal_craft.logical_message_size_for(0x1000028, 0x1002008, wal_craft.PREFIX)  # ends inside a page header


def test_craft_refuses_unknown_shape() -> None:
    with pytest.raises(ValueError, match="unknown WAL shape"):
        wal_craft.craft(None, "no_such_shape")  # type: ignore[arg-type]


# --- against a server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[VanillaPostgres]:
    root = make_test_root(prefix="neon-wal-craft-")
    pg = VanillaPostgres(root / "pg").init()
    pg.configure(wal_craft.required_postgres_config())
    pg.start()
    try:
        yield pg
    finally:
        pg.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Crafted:
    wal: wal_craft.CraftedWal
    records: list[DumpRecord]
    """pg_waldump's records from `wal.initial_lsn` on, the probe after the crafted end included."""
    decoded: list[tuple[int, int]]
    """(start, end) of the same records from our decoder."""

    def at(self, lsn: int) -> DumpRecord:
        matches = [r for r in self.records if r.lsn == lsn]
        assert matches, f"pg_waldump has no record at {Lsn(lsn)}"
        return matches[0]

    def following(self, rec: DumpRecord) -> DumpRecord:
        later = [r for r in self.records if r.lsn > rec.lsn]
        assert later, f"pg_waldump has no record after {Lsn(rec.lsn)}"
        return later[0]

    def end_of(self, rec: DumpRecord) -> int:
        """The record's end, as our decoder found it."""
        return dict(self.decoded)[rec.lsn]

    def first_after_end(self) -> DumpRecord:
        later = [r for r in self.records if r.lsn >= self.wal.end_lsn]
        assert later, f"pg_waldump has no record after the crafted end {self.wal.end_lsn}"
        return later[0]

    def last_before_end(self) -> DumpRecord:
        return [r for r in self.records if r.lsn < self.wal.end_lsn][-1]


def craft_and_dump(server: VanillaPostgres, shape: str) -> Crafted:
    with psycopg.connect(server.connstr(), autocommit=True) as conn:
        wal = wal_craft.craft(conn, shape)
        # A probe after the crafted tail (transactional, so its commit flushes it): pg_waldump then
        # has a record that shows where the WAL continued after the crafted end.
        row = conn.execute("SELECT pg_logical_emit_message(true, 'wal-craft-probe', 'x')::text").fetchone()
        assert row is not None
        probe_end = Lsn(row[0])
    files = [server.wal_dir / wal_file_name(1, segno) for segno in range(wal.initial_lsn // SEG, probe_end // SEG + 1)]
    dump = pg_waldump(server.pg_bin("pg_waldump"), files)
    records = [r for r in dump.records if r.lsn >= wal.initial_lsn]
    decoded: list[tuple[int, int]] = []
    try:
        for start, end, _ in read_wal_files(files, start_lsn=skip_page_header(wal.initial_lsn)):
            decoded.append((start, end))
    except WalDecodeError as e:
        # The end of the WAL written so far: past the probe.
        assert e.lsn is not None and e.lsn >= probe_end, e
    # Our decoder agrees with pg_waldump on every record of the crafted region.
    assert [start for start, _ in decoded] == [r.lsn for r in records]
    return Crafted(wal, records, decoded)


def assert_continues_after(crafted: Crafted, last: DumpRecord) -> None:
    """The WAL goes on exactly at the crafted end (after its page header), linked to `last`."""
    nxt = crafted.first_after_end()
    assert nxt.lsn == skip_page_header(crafted.wal.end_lsn)
    assert nxt.prev == last.lsn
    assert crafted.end_of(last) == crafted.wal.end_lsn or last.desc.startswith("SWITCH")


def test_simple(server: VanillaPostgres) -> None:
    crafted = craft_and_dump(server, "simple")
    wal = crafted.wal
    last = crafted.last_before_end()
    assert (last.rmgr, last.desc.split()[0]) == ("Transaction", "COMMIT")
    assert last.lsn >= wal.initial_lsn
    assert_continues_after(crafted, last)


def test_last_wal_record_xlog_switch(server: VanillaPostgres) -> None:
    crafted = craft_and_dump(server, "last_wal_record_xlog_switch")
    wal = crafted.wal
    switch = crafted.at(wal.record_lsns[-1])
    assert (switch.rmgr, switch.desc.strip()) == ("XLOG", "SWITCH")
    assert switch.tot_len == SIZE_OF_XLOG_RECORD
    # The switch is the last record: the WAL ends at the next segment boundary.
    assert crafted.last_before_end() == switch
    assert wal.end_lsn % SEG == 0 and wal.end_lsn // SEG == switch.lsn // SEG + 1
    # The next record is at the next segment's start, after the 40-byte long page header.
    assert_continues_after(crafted, switch)
    assert crafted.first_after_end().lsn == wal.end_lsn + 40


def test_last_wal_record_xlog_switch_ends_on_page_boundary(server: VanillaPostgres) -> None:
    crafted = craft_and_dump(server, "last_wal_record_xlog_switch_ends_on_page_boundary")
    wal = crafted.wal
    padding_lsn, switch_lsn = wal.record_lsns
    padding = crafted.at(padding_lsn)
    assert padding.rmgr == "LogicalMessage" and padding.desc.startswith("MESSAGE non-transactional")
    switch = crafted.following(padding)
    assert (switch.lsn, switch.rmgr, switch.desc.strip()) == (switch_lsn, "XLOG", "SWITCH")
    assert switch.prev == padding.lsn
    # The switch record ends exactly on a page boundary, and that page is not the segment's last.
    assert (switch.lsn + SIZE_OF_XLOG_RECORD) % XLOG_BLCKSZ == 0
    assert (switch.lsn + SIZE_OF_XLOG_RECORD) % SEG != 0
    assert crafted.end_of(padding) == switch.lsn
    assert crafted.last_before_end() == switch and wal.end_lsn % SEG == 0
    assert_continues_after(crafted, switch)


def test_wal_record_crossing_segment_followed_by_small_one(server: VanillaPostgres) -> None:
    crafted = craft_and_dump(server, "wal_record_crossing_segment_followed_by_small_one")
    wal = crafted.wal
    message = crafted.at(wal.record_lsns[0])
    assert message.rmgr == "LogicalMessage" and message.desc.startswith("MESSAGE transactional")
    # It starts in one segment and ends more than 4 pages into the next.
    end = crafted.end_of(message)
    assert end // SEG == message.lsn // SEG + 1
    assert end % SEG > 4 * XLOG_BLCKSZ
    commit = crafted.following(message)
    assert (commit.lsn, commit.rmgr, commit.desc.split()[0]) == (wal.record_lsns[1], "Transaction", "COMMIT")
    assert commit.prev == message.lsn and commit.lsn == skip_page_header(end)
    assert commit.tot_len < 100
    assert crafted.last_before_end() == commit
    assert_continues_after(crafted, commit)


def test_last_wal_record_crossing_segment(server: VanillaPostgres) -> None:
    crafted = craft_and_dump(server, "last_wal_record_crossing_segment")
    wal = crafted.wal
    message = crafted.at(wal.record_lsns[0])
    assert message.rmgr == "LogicalMessage" and message.desc.startswith("MESSAGE non-transactional")
    assert crafted.last_before_end() == message
    assert wal.end_lsn // SEG == message.lsn // SEG + 1
    assert wal.end_lsn % SEG > 4 * XLOG_BLCKSZ
    assert_continues_after(crafted, message)
