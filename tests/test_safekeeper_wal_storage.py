"""The safekeeper's WAL storage against real PG15 WAL (1 MiB segments), pg_waldump as the oracle.

The WAL of a stock cluster is streamed into `WalStorage` in random chunks, as a proposer would,
and the segment files, positions, restart, truncation and reads are checked against the bytes of
Postgres' own segment files and the record boundaries pg_waldump reports.
"""

from __future__ import annotations

import bisect
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from neon.postgres.constants import RM_XLOG_ID, XLOG_BLCKSZ, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER
from neon.postgres.waldecoder import WalStreamDecoder
from neon.postgres.walformat import (
    XLogPageHeader,
    encode_record,
    page_header_size,
    parse_wal_file_name,
    wal_file_name,
)
from neon.postgres.walwriter import WalWriter
from neon.safekeeper.wal_storage import (
    MAX_SEND_SIZE,
    PARTIAL_SUFFIX,
    WalNotAvailable,
    WalStorage,
    WalStorageError,
)
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres, make_test_root
from tests.waldump_oracle import DumpRecord, pg_waldump

SEG = 1 << 20  # initdb --wal-segsize=1
XLOG_NOOP = 0x20


@dataclass
class PgWal:
    """Postgres' WAL from `start` (a record start) to `end` (the end of the last record)."""

    segments: dict[int, bytes]
    sysid: int
    records: list[DumpRecord]
    ends: list[int]  # end (next-record position) of each record in `records`
    start: int
    end: int
    switch_record: DumpRecord
    big_record: DumpRecord
    ends_set: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ends_set = set(self.ends)

    def bytes(self, start: int, end: int) -> bytes:
        out = bytearray()
        pos = start
        while pos < end:
            segno, off = divmod(pos, SEG)
            n = min(end - pos, SEG - off)
            out += self.segments[segno][off : off + n]
            pos += n
        return bytes(out)

    def last_end_at_or_before(self, lsn: int, default: int | None = None) -> int:
        """The record boundary flush_lsn must show once WAL up to `lsn` is written and synced
        (`default`, the stream start unless given, if no record is complete yet)."""
        i = bisect.bisect_right(self.ends, lsn)
        if i:
            return self.ends[i - 1]
        return self.start if default is None else default


def _end_from_next_start(next_start: int) -> int:
    # A record's end is the next record's start, unless that one sits right after a page header.
    page_off = next_start % XLOG_BLCKSZ
    page_start = next_start - page_off
    if page_off == page_header_size(page_start, SEG):
        return page_start
    return next_start


@pytest.fixture(scope="module")
def pg_wal() -> Iterator[PgWal]:
    root = make_test_root(prefix="neon-sk-walstorage-")
    pg = VanillaPostgres(root / "pg").init(["--wal-segsize=1"])
    pg.configure(["wal_keep_size = '1GB'", "max_wal_size = '1GB'", "autovacuum = off"])
    pg.start()
    try:
        stream_start = Lsn(pg.current_wal_lsn())
        sql = pg.safe_psql
        sql("CREATE TABLE t (id int, payload text)")
        sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 25000) g")
        # One record spanning three segments, then an XLOG_SWITCH with a long zero tail.
        sql("SELECT pg_logical_emit_message(false, 'big', repeat('x', 2300000))")
        sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200) g")
        sql("SELECT pg_switch_wal()")
        sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
    finally:
        pg.stop()
    files = pg.wal_segments()
    dump = pg_waldump(pg.pg_bin("pg_waldump"), files)
    segments = {parse_wal_file_name(p.name, SEG)[1]: p.read_bytes() for p in files}
    shutil.rmtree(root, ignore_errors=True)

    records = [r for r in dump.records if r.lsn >= stream_start]
    start = records[0].lsn
    ends = [_end_from_next_start(b.lsn) for b in records[1:]]
    last = records[-1]
    assert last.lsn % XLOG_BLCKSZ + last.tot_len <= XLOG_BLCKSZ
    ends.append((last.lsn + last.tot_len + 7) & ~7)
    sysid = XLogPageHeader.unpack(segments[start // SEG]).sysid
    assert sysid is not None
    wal = PgWal(
        segments=segments,
        sysid=sysid,
        records=records,
        ends=ends,
        start=start,
        end=ends[-1],
        switch_record=next(r for r in records if r.rmgr == "XLOG" and r.desc.startswith("SWITCH")),
        big_record=next(r for r in records if r.tot_len > 2 * SEG),
    )
    # Our decoder agrees with pg_waldump on every record boundary (it is what WalStorage uses).
    decoder = WalStreamDecoder(start, seg_size=SEG)
    decoder.feed(wal.bytes(start, wal.end))
    assert [end for _s, end, _r in decoder.records()] == ends
    assert start % SEG > XLOG_BLCKSZ and start % XLOG_BLCKSZ > 24  # mid-segment, mid-page
    assert wal.end // SEG - start // SEG >= 4
    big_end = ends[records.index(wal.big_record)]
    assert big_end > (wal.big_record.lsn // SEG + 2) * SEG  # it spans two segment boundaries
    yield wal


@pytest.fixture
def tl_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tenant" / "timeline"
    d.mkdir(parents=True)
    return d


def _random_chunks(rng: random.Random, start: int, end: int) -> Iterator[tuple[int, int]]:
    pos = start
    while pos < end:
        kind = rng.random()
        n = rng.randint(1, 64) if kind < 0.2 else rng.randint(1, 4000) if kind < 0.5 else rng.randint(1, MAX_SEND_SIZE)
        n = min(n, end - pos)
        yield pos, n
        pos += n


def _stream(
    storage: WalStorage,
    wal: PgWal,
    start: int,
    end: int,
    seed: int,
    flush_prob: float = 0.3,
    before_first_record: int | None = None,
) -> None:
    """Feed WAL [start, end) in random chunks with flushes at random points, checking positions
    (`before_first_record`: the record position expected while no record is complete)."""
    rng = random.Random(seed)
    initial = start if before_first_record is None else before_first_record
    for pos, n in _random_chunks(rng, start, end):
        storage.write_wal(pos, wal.bytes(pos, pos + n))
        assert storage.write_lsn == pos + n
        expected = wal.last_end_at_or_before(pos + n, default=initial)
        assert storage.write_record_lsn == expected
        if rng.random() < flush_prob:
            flushed = storage.flush()
            assert flushed == storage.flush_lsn == expected
            assert storage.flush_lsn in wal.ends_set or storage.flush_lsn == initial
            assert storage.flush_lsn <= storage.write_lsn


def _wal_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _expected_names(first_segno: int, end: int) -> list[str]:
    """Complete names up to the segment holding `end`, which is `.partial` (if `end` is mid-segment)."""
    last = end // SEG
    names = [wal_file_name(1, s, SEG) for s in range(first_segno, last)]
    if end % SEG:
        names.append(wal_file_name(1, last, SEG) + PARTIAL_SUFFIX)
    return sorted(names)


def _check_files(d: Path, wal: PgWal, start: int, end: int, *, open_segment: bool | None = None) -> None:
    """Every segment file is full-size: Postgres' bytes in [start, end), zeros elsewhere.
    `open_segment`: whether the segment holding `end` exists as `.partial` (default: if `end`
    is mid-segment; after a truncation at a segment start it exists, zero-filled)."""
    names = _expected_names(start // SEG, end)
    if open_segment and end % SEG == 0:
        names.append(wal_file_name(1, end // SEG, SEG) + PARTIAL_SUFFIX)
    assert _wal_files(d) == sorted(names)
    for name in _wal_files(d):
        segno = parse_wal_file_name(name, SEG)[1]
        data = (d / name).read_bytes()
        assert len(data) == SEG, name
        seg_start = segno * SEG
        lo, hi = max(start, seg_start) - seg_start, min(end, seg_start + SEG) - seg_start
        assert data[:lo] == bytes(lo), f"{name}: bytes before the start are not zeros"
        assert data[lo:hi] == wal.segments[segno][lo:hi], f"{name}: WAL bytes differ from Postgres'"
        assert data[hi:] == bytes(SEG - hi), f"{name}: bytes after the end are not zeros"


def _new_storage(d: Path, start: int) -> WalStorage:
    storage = WalStorage(d, wal_seg_size=SEG)
    storage.truncate_wal(start)  # as at the first ProposerElected: creates the zeroed first segment
    return storage


# --- tests --------------------------------------------------------------------------------------


def test_stream_matches_postgres_segments(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    assert storage.flush_lsn == storage.write_lsn == wal.start
    assert _wal_files(tl_dir) == [wal_file_name(1, wal.start // SEG, SEG) + PARTIAL_SUFFIX]
    _stream(storage, wal, wal.start, wal.end, seed=1)
    assert storage.flush() == wal.end
    _check_files(tl_dir, wal, wal.start, wal.end)
    storage.close()


def test_first_write_without_truncation_zero_fills(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = WalStorage(tl_dir, wal_seg_size=SEG)
    # Like Neon, positions stay 0 until the first record completes.
    _stream(storage, wal, wal.start, wal.end, seed=2, flush_prob=0.05, before_first_record=0)
    storage.flush()
    assert storage.flush_lsn == wal.end
    _check_files(tl_dir, wal, wal.start, wal.end)


def test_write_must_be_contiguous(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    storage.write_wal(wal.start, wal.bytes(wal.start, wal.start + 1000))
    with pytest.raises(WalStorageError, match="rewrites WAL written before"):
        storage.write_wal(wal.start + 500, wal.bytes(wal.start + 500, wal.start + 1500))
    with pytest.raises(WalStorageError, match="creates gap"):
        storage.write_wal(wal.start + 1008, wal.bytes(wal.start + 1008, wal.start + 1500))
    assert storage.write_lsn == wal.start + 1000


def test_invalid_wal_is_refused_until_truncation(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    good_end = wal.ends[50]
    storage.write_wal(wal.start, wal.bytes(wal.start, good_end))
    with pytest.raises(WalStorageError, match="invalid WAL"):
        storage.write_wal(good_end, bytes(range(256)) * 4)
    # The bytes went to disk, but no record boundary moved past the garbage.
    assert storage.write_lsn == good_end + 1024
    assert storage.flush() == good_end
    with pytest.raises(WalStorageError, match="invalid WAL"):
        storage.write_wal(storage.write_lsn, bytes(64))
    storage.truncate_wal(good_end)
    _stream(storage, wal, good_end, wal.end, seed=15)
    storage.flush()
    _check_files(tl_dir, wal, wal.start, wal.end)


def test_flush_is_one_fdatasync_per_touched_file(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    # A batch of small appends inside one segment: one fdatasync for all of them.
    pos = wal.start
    for _ in range(50):
        storage.write_wal(pos, wal.bytes(pos, pos + 1000))
        pos += 1000
    before = storage.metrics.fdatasyncs
    storage.flush()
    assert storage.metrics.fdatasyncs == before + 1
    assert storage.flush_lsn == wal.last_end_at_or_before(pos)
    # Nothing new: no fsync at all.
    storage.flush()
    assert storage.metrics.fdatasyncs == before + 1
    # A batch that completes a segment: that segment is synced when completed (and its new
    # zero-filled successor when created), the open one once at flush.
    seg_end = (pos // SEG + 1) * SEG
    target = seg_end + 5000
    while pos < target:
        n = min(MAX_SEND_SIZE, target - pos)
        storage.write_wal(pos, wal.bytes(pos, pos + n))
        pos += n
    before = storage.metrics.fdatasyncs
    storage.flush()
    assert storage.metrics.fdatasyncs == before + 1
    assert storage.metrics.segments_completed == 1


def _cut_points(wal: PgWal) -> dict[str, int]:
    rng = random.Random(7)
    mid_record = next(
        r for r in rng.sample(wal.records[100:-100], 200) if r.tot_len >= 64 and r.lsn % XLOG_BLCKSZ < 4000
    )
    big_boundary = (wal.big_record.lsn // SEG + 2) * SEG  # inside the big record, 2nd boundary
    switch_end = wal.ends[wal.records.index(wal.switch_record)]
    switch_raw_end = wal.switch_record.lsn + wal.switch_record.tot_len
    assert switch_end - switch_raw_end > 64
    return {
        "mid_record": mid_record.lsn + 40,
        "record_end": wal.ends[len(wal.ends) // 3],
        "segment_boundary_inside_record": big_boundary,
        "inside_switch_padding": (switch_raw_end + switch_end) // 2 & ~7,
        "end_of_wal": wal.end,
    }


@pytest.mark.parametrize(
    "cut_name",
    ["mid_record", "record_end", "segment_boundary_inside_record", "inside_switch_padding", "end_of_wal"],
)
def test_reopen_finds_last_complete_record(pg_wal: PgWal, tl_dir: Path, cut_name: str) -> None:
    wal = pg_wal
    cut = _cut_points(wal)[cut_name]
    storage = _new_storage(tl_dir, wal.start)
    _stream(storage, wal, wal.start, cut, seed=3, flush_prob=0.1)
    flushed = storage.flush()
    assert flushed == wal.last_end_at_or_before(cut)
    storage.close()

    reopened = WalStorage.open(tl_dir, wal_seg_size=SEG, commit_lsn=wal.start)
    expected = flushed
    if cut_name == "inside_switch_padding":
        # The segment's tail after XLOG_SWITCH is zeros on disk already (pre-zeroed file, and
        # zeros in Postgres too), so decoding sees the switch record complete: WAL ends at the
        # next segment start, as in Neon.
        expected = (cut // SEG + 1) * SEG
    assert reopened.flush_lsn == reopened.write_lsn == reopened.write_record_lsn == expected
    assert expected in wal.ends_set
    # Decoding from a later known boundary finds the same end.
    mid_commit = wal.last_end_at_or_before(wal.start + (expected - wal.start) // 2)
    assert WalStorage.open(tl_dir, wal_seg_size=SEG, commit_lsn=mid_commit).flush_lsn == expected

    # The proposer repositions at our flush_lsn, then streams the rest: files end up identical.
    reopened.truncate_wal(reopened.flush_lsn, not_below=wal.start)
    names = _wal_files(tl_dir)
    assert names[-1] == wal_file_name(1, expected // SEG, SEG) + PARTIAL_SUFFIX
    assert sum(n.endswith(PARTIAL_SUFFIX) for n in names) == 1
    _check_files(tl_dir, wal, wal.start, expected, open_segment=True)
    _stream(reopened, wal, expected, wal.end, seed=4)
    reopened.flush()
    assert reopened.flush_lsn == wal.end
    _check_files(tl_dir, wal, wal.start, wal.end)


def test_reopen_with_no_commit_lsn_has_no_wal(tl_dir: Path) -> None:
    storage = WalStorage.open(tl_dir, wal_seg_size=SEG, commit_lsn=0)
    assert storage.write_lsn == storage.flush_lsn == 0


@pytest.mark.parametrize("tail", ["half_record", "bad_crc", "garbage"])
def test_torn_tail_is_ignored_on_restart(pg_wal: PgWal, tl_dir: Path, tail: str) -> None:
    wal = pg_wal
    i = next(
        i
        for i in range(len(wal.records) // 2, len(wal.records))
        if wal.records[i].tot_len >= 64 and wal.ends[i] // SEG == wal.ends[i - 1] // SEG
    )
    last_good = wal.ends[i - 1]  # the end of the record before records[i]
    next_start, next_end = wal.records[i].lsn, wal.ends[i]
    assert next_end // SEG == last_good // SEG
    storage = _new_storage(tl_dir, wal.start)
    _stream(storage, wal, wal.start, last_good, seed=5)
    assert storage.flush() == last_good
    storage.close()

    # A crash while the next record was being written leaves part or a corrupt copy of it.
    torn = bytearray(wal.bytes(last_good, next_end))
    if tail == "half_record":
        torn = torn[: len(torn) // 2]
    elif tail == "bad_crc":
        torn[next_start - last_good + 40] ^= 0xFF
    else:
        torn = bytearray(random.Random(6).randbytes(3000))
    path = tl_dir / (wal_file_name(1, last_good // SEG, SEG) + PARTIAL_SUFFIX)
    with open(path, "r+b") as f:
        f.seek(last_good % SEG)
        f.write(torn)

    reopened = WalStorage.open(tl_dir, wal_seg_size=SEG, commit_lsn=wal.start)
    assert reopened.flush_lsn == reopened.write_lsn == last_good
    # The first truncation after restart zeroes the torn bytes even at the same LSN.
    reopened.truncate_wal(last_good)
    _check_files(tl_dir, wal, wal.start, last_good)
    _stream(reopened, wal, last_good, wal.end, seed=7)
    reopened.flush()
    _check_files(tl_dir, wal, wal.start, wal.end)


def test_truncate_then_write_different_wal(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    _stream(storage, wal, wal.start, wal.end, seed=8, flush_prob=0.02)
    storage.flush()

    # Cut in a completed segment two segments back: later files go, that one becomes .partial.
    k = bisect.bisect_left(wal.ends, (wal.start // SEG + 1) * SEG + SEG // 2)
    cut = wal.ends[k]
    with pytest.raises(WalStorageError, match="below"):
        storage.truncate_wal(cut, not_below=cut + 8)
    with pytest.raises(WalStorageError, match="non-written"):
        storage.truncate_wal(wal.end + 8)
    storage.truncate_wal(cut, not_below=wal.start)
    assert storage.write_lsn == storage.write_record_lsn == storage.flush_lsn == cut
    _check_files(tl_dir, wal, wal.start, cut)  # tail zeroed, later segments removed
    # Same position again: nothing to do (no zero-filling on every reconnect).
    truncations = storage.metrics.truncations
    storage.truncate_wal(cut)
    assert storage.metrics.truncations == truncations

    # A different history from `cut`: records of our own, crossing pages and a segment boundary.
    writer = WalWriter(cut, sysid=wal.sysid, seg_size=SEG)
    prev = wal.records[k].lsn
    new_ends = []
    payload = 0
    while writer.end < (cut // SEG + 1) * SEG + 3 * XLOG_BLCKSZ:
        payload += 1
        record = encode_record(xid=0, prev=prev, info=XLOG_NOOP, rmid=RM_XLOG_ID, main_data=bytes([payload]) * 9000)
        prev, end = writer.append(record)
        new_ends.append(end)
    new_bytes = writer.bytes_from(cut)
    new_bytes += bytes(writer.end - cut - len(new_bytes))  # the last record's alignment padding
    pos = cut
    rng = random.Random(9)
    while pos < cut + len(new_bytes):
        n = min(rng.randint(1, 20000), cut + len(new_bytes) - pos)
        storage.write_wal(pos, new_bytes[pos - cut : pos - cut + n])
        pos += n
        storage.flush()
        i = bisect.bisect_right(new_ends, pos)
        assert storage.flush_lsn == (new_ends[i - 1] if i else cut)
    assert storage.flush_lsn == new_ends[-1]
    # Walsenders served from memory see the new history, never the truncated one.
    in_memory = storage.reader(timeline_start_lsn=wal.start, local_start_lsn=wal.start)
    chunks = in_memory.chunks_in_memory(cut, cut + len(new_bytes))
    assert chunks is not None and b"".join(d for _l, d in chunks) == new_bytes
    across = in_memory.chunks_in_memory(cut - 8, cut + 8)
    assert across is not None and b"".join(d for _l, d in across) == wal.bytes(cut - 8, cut) + new_bytes[:8]
    storage.close()

    reader = WalStorage.open(tl_dir, wal_seg_size=SEG, commit_lsn=wal.start).reader(
        timeline_start_lsn=wal.start, local_start_lsn=wal.start
    )
    assert reader.read(wal.start, cut) == wal.bytes(wal.start, cut)
    assert reader.read(cut, cut + len(new_bytes)) == new_bytes
    assert WalStorage.open(tl_dir, wal_seg_size=SEG, commit_lsn=wal.start).flush_lsn == new_ends[-1]


def test_reader_returns_file_bytes(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    _stream(storage, wal, wal.start, wal.end, seed=10, flush_prob=0.05)
    storage.flush()
    reader = storage.reader(timeline_start_lsn=wal.start, local_start_lsn=wal.start, sysid=wal.sysid)

    rng = random.Random(11)
    for _ in range(30):
        a = rng.randrange(wal.start, wal.end)
        b = rng.randrange(a, min(wal.end, a + 3 * SEG))
        assert reader.read(a, b) == wal.bytes(a, b)
    assert reader.read(wal.start, wal.end) == wal.bytes(wal.start, wal.end)
    pieces = list(reader.chunks(wal.start, wal.end))
    assert all(len(data) <= MAX_SEND_SIZE for _lsn, data in pieces)
    assert all(lsn // SEG == (lsn + len(data) - 1) // SEG for lsn, data in pieces)
    assert [lsn for lsn, _ in pieces[1:]] == [lsn + len(d) for lsn, d in pieces[:-1]]

    # The newest WAL comes from memory, in the same pieces as from the files; older is None.
    recent = storage.recent
    assert recent.end_lsn == storage.write_lsn and recent.end_lsn - recent.start_lsn >= 4 * 1024 * 1024
    for _ in range(30):
        a = rng.randrange(recent.start_lsn, wal.end)
        b = rng.randrange(a, wal.end + 1)
        assert reader.chunks_in_memory(a, b) == list(reader.chunks(a, b))
    assert reader.chunks_in_memory(recent.start_lsn - 8, wal.end) is None

    # Before the timeline start, inside its first segment: a synthesised segment start.
    seg_start = wal.start - wal.start % SEG
    prefix = reader.read(seg_start, wal.start)
    assert len(prefix) == wal.start - seg_start
    long_hdr = XLogPageHeader.unpack(prefix)
    assert long_hdr.info & XLP_LONG_HEADER and long_hdr.pageaddr == seg_start
    assert (long_hdr.sysid, long_hdr.seg_size, long_hdr.xlog_blcksz) == (wal.sysid, SEG, XLOG_BLCKSZ)
    page = wal.start - wal.start % XLOG_BLCKSZ
    short_hdr = XLogPageHeader.unpack(prefix, page - seg_start)
    assert short_hdr.info & XLP_FIRST_IS_CONTRECORD and short_hdr.pageaddr == page
    # A decoder started at that page skips the fake continuation and finds the first record.
    decoder = WalStreamDecoder(page, seg_size=SEG)
    decoder.feed(reader.read(page, wal.ends[3]))
    assert [s for s, _e, _r in decoder.records()] == [r.lsn for r in wal.records[:4]]

    with pytest.raises(WalNotAvailable, match="before the start of the timeline"):
        reader.read(seg_start - 8, wal.start)
    later_local = storage.reader(timeline_start_lsn=wal.start, local_start_lsn=wal.ends[100])
    with pytest.raises(WalNotAvailable, match="local_start_lsn"):
        later_local.read(wal.ends[10], wal.ends[20])

    # Removal: files of the removed segments are gone and reading them is a clear error.
    first = wal.start // SEG
    assert storage.remove_up_to(first + 1) == [first, first + 1]
    assert _wal_files(tl_dir)[0] == wal_file_name(1, first + 2, SEG)
    with pytest.raises(WalNotAvailable, match="not found"):
        reader.read((first + 1) * SEG + 100, (first + 2) * SEG + 100)
    a = (first + 2) * SEG
    assert reader.read(a, wal.end) == wal.bytes(a, wal.end)


def test_concurrent_reader_sees_flushed_wal(pg_wal: PgWal, tl_dir: Path) -> None:
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    reader = storage.reader(timeline_start_lsn=wal.start, local_start_lsn=wal.start)
    done = threading.Event()
    errors: list[BaseException] = []
    reads = 0

    def walsender() -> None:
        nonlocal reads
        sent = wal.start
        try:
            while True:
                finished = done.is_set()
                flush = storage.flush_lsn
                if flush > sent:
                    assert reader.read(sent, flush) == wal.bytes(sent, flush)
                    chunks = reader.chunks_in_memory(sent, flush)
                    if chunks is not None:
                        assert b"".join(d for _l, d in chunks) == wal.bytes(sent, flush)
                    sent = flush
                    reads += 1
                else:
                    time.sleep(0.0005)
                if finished:
                    return
        except BaseException as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=walsender)
    thread.start()
    try:
        _stream(storage, wal, wal.start, wal.end, seed=12, flush_prob=0.5)
        storage.flush()
    finally:
        done.set()
        thread.join(timeout=60)
    assert not errors, errors[0]
    assert reads > 5


def test_synced_files_survive_without_rename_of_full_partial(pg_wal: PgWal, tl_dir: Path) -> None:
    """A crash between a segment's last fdatasync and its rename leaves it full but `.partial`."""
    wal = pg_wal
    boundary = (wal.switch_record.lsn // SEG + 1) * SEG  # WAL ends at a segment start here
    storage = _new_storage(tl_dir, wal.start)
    _stream(storage, wal, wal.start, boundary, seed=13)
    storage.flush()
    storage.close()
    last = wal_file_name(1, boundary // SEG - 1, SEG)
    os.replace(tl_dir / last, tl_dir / (last + PARTIAL_SUFFIX))

    reopened = WalStorage.open(tl_dir, wal_seg_size=SEG, commit_lsn=wal.start)
    assert reopened.flush_lsn == boundary
    reopened.truncate_wal(boundary)
    _check_files(tl_dir, wal, wal.start, boundary, open_segment=True)  # complete again
    _stream(reopened, wal, boundary, wal.end, seed=14)
    reopened.flush()
    _check_files(tl_dir, wal, wal.start, wal.end)


def test_flush_in_steps_and_writes_that_stay_in_the_open_segment(pg_wal: PgWal, tl_dir: Path) -> None:
    """The event-loop path (Timeline.process_batch): writes that stay inside the open `.partial`
    segment are recognised; anything that opens, fills or skips is not; a flush split into
    begin/sync/end makes the same flush_lsn as `flush`."""
    wal = pg_wal
    storage = _new_storage(tl_dir, wal.start)
    # Nothing open yet after the truncation (its segment fd was closed): the thread path.
    assert not storage.write_stays_in_open_segment(wal.start, 100)
    k = bisect.bisect_left(wal.ends, wal.start + 3 * XLOG_BLCKSZ)
    first = wal.ends[k]
    storage.write_wal(wal.start, wal.bytes(wal.start, first))
    pos = storage.write_lsn
    seg_left = SEG - pos % SEG
    assert storage.write_stays_in_open_segment(pos, 100)
    assert storage.write_stays_in_open_segment(pos, seg_left - 1)
    assert not storage.write_stays_in_open_segment(pos, seg_left)  # fills it: sync and rename
    assert not storage.write_stays_in_open_segment(pos + 8, 100)  # not where writing continues

    ticket = storage.begin_flush()
    assert ticket is not None and ticket.fd is not None and ticket.flush_lsn == first
    assert storage.flush_lsn == wal.start  # nothing moves before end_flush
    syncs = storage.metrics.fdatasyncs
    storage.sync(ticket)
    assert storage.metrics.fdatasyncs == syncs + 1
    assert storage.end_flush(ticket) == first == storage.flush_lsn
    assert storage.begin_flush() is None
