"""Synthesized shutdown checkpoints (spec §10.7) against the stock PG15 server and pg_waldump.

Each case writes pg_control + WAL segment(s) into a cleanly stopped cluster, then requires that
the server starts without recovery, takes writes, stops cleanly, and that pg_waldump reads one
prev-linked chain of records through the synthesized checkpoint to the end of WAL.

To put L at a chosen position (page boundary, near a page or segment end) while keeping the
chain intact, the gap between the real end of WAL and L is filled with one XLOG_NOOP record
built by the test; the synthesized record's xl_prev is that NOOP.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from neon.postgres.constants import XLOG_BLCKSZ, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER, maxalign
from neon.postgres.controlfile import ControlFileData, DBState
from neon.postgres.pg_distrib import PgDistribError
from neon.postgres.synth import (
    SynthesizedCheckpoint,
    checkpoint_record,
    normalize_lsn,
    synthesize_checkpoint,
    synthesize_in_datadir,
    write_synthesized_checkpoint,
)
from neon.postgres.walformat import XLogPageHeader, encode_record, page_header_size, wal_file_name
from neon.postgres.walwriter import WalWriter
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres

XLOG_NOOP = 0x20
XLOG_RMID = 0
# Keep every segment so pg_waldump can read the whole chain after the server's own checkpoints.
CONFIG = ["wal_keep_size = '1GB'", "max_wal_size = '1GB'", "autovacuum = off"]

_REC = re.compile(
    r"^rmgr: (?P<rmgr>\S+)\s+len \(rec/tot\):\s+\d+/\s*(?P<tot>\d+), tx:\s+\d+, "
    r"lsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+), prev (?P<prev>[0-9A-F]+/[0-9A-F]+), desc: (?P<desc>.*)$"
)
_SKIP = re.compile(r"^first record is after \S+, at \S+, skipping over \d+ bytes?$")
# PG15's wording for the normal end of WAL (PG16 says "expected at least 24, got 0").
_END = re.compile(r"^pg_waldump: error: error in WAL record at \S+: invalid record length at \S+: wanted 24, got 0$")


@dataclass(frozen=True)
class Rec:
    lsn: int
    prev: int
    rmgr: str
    tot_len: int
    desc: str


# --- helpers ----------------------------------------------------------------------------------
def waldump(pg: VanillaPostgres, start: int, waldir: Path | None = None) -> tuple[list[Rec], str]:
    """pg_waldump from `start` to the end of WAL: the records, and its stderr."""
    proc = subprocess.run(
        [str(pg.pg_bin("pg_waldump")), "-p", str(waldir or pg.wal_dir), "-s", str(Lsn(start))],
        capture_output=True,
        text=True,
    )
    recs = []
    for line in proc.stdout.splitlines():
        if m := _REC.match(line):
            recs.append(Rec(Lsn(m["lsn"]), Lsn(m["prev"]), m["rmgr"], int(m["tot"]), m["desc"]))
        else:
            assert _SKIP.match(line), f"unexpected pg_waldump output: {line!r}"
    return recs, proc.stderr.strip()


def seg_size(pg: VanillaPostgres) -> int:
    return control(pg).xlog_seg_size


def control(pg: VanillaPostgres) -> ControlFileData:
    return ControlFileData.read(pg.datadir / "global" / "pg_control")


def record_end(lsn: int, tot_len: int, seg: int) -> int:
    """End LSN of a record of `tot_len` bytes starting at `lsn`, skipping page headers."""
    pos, left = lsn, tot_len
    while True:
        take = min(left, XLOG_BLCKSZ - pos % XLOG_BLCKSZ)
        pos += take
        left -= take
        if not left:
            return maxalign(pos)
        pos += page_header_size(pos, seg)


def end_of_wal(pg: VanillaPostgres) -> tuple[int, int]:
    """(start, end LSN) of the last record of a cleanly stopped cluster's WAL."""
    cf = control(pg)
    assert cf.state == DBState.SHUTDOWNED
    recs, err = waldump(pg, cf.checkpoint)
    assert _END.match(err), err
    last = recs[-1]
    assert last.lsn == cf.checkpoint and last.desc.startswith("CHECKPOINT_SHUTDOWN")
    return last.lsn, record_end(last.lsn, last.tot_len, cf.xlog_seg_size)


def segment_bytes(pg: VanillaPostgres, lsn: int) -> bytes:
    """The current pg_wal segment holding (normalised) `lsn`, or b"" if there is none."""
    cf = control(pg)
    path = pg.wal_dir / wal_file_name(1, normalize_lsn(lsn, cf.xlog_seg_size) // cf.xlog_seg_size, cf.xlog_seg_size)
    return path.read_bytes() if path.exists() else b""


def noop_filler(pg: VanillaPostgres, start: int, prev: int, target: int) -> tuple[bytes, int]:
    """One XLOG_NOOP record at `start` (prev-linked to `prev`) after which the next record
    starts exactly at `target`. Returns its WAL bytes (page headers included) and its LSN."""
    cf = control(pg)
    seg = cf.xlog_seg_size
    page = target - target % XLOG_BLCKSZ
    # The NOOP must end at the page boundary if target is its page's first record position.
    stop = page if target == page + page_header_size(page, seg) else target
    boundaries = range(start - start % XLOG_BLCKSZ + XLOG_BLCKSZ, stop, XLOG_BLCKSZ)
    tot = (stop - start) - sum(page_header_size(p, seg) for p in boundaries)
    data_len = tot - 26 if tot - 26 < 256 else tot - 29
    assert data_len >= 0 and 24 + (2 if data_len < 256 else 5) + data_len == tot, (start, target)
    rec = encode_record(xid=0, prev=prev, info=XLOG_NOOP, rmid=XLOG_RMID, main_data=b"\x5a" * data_len)
    writer = WalWriter(start, sysid=cf.system_identifier, tli=1, seg_size=seg)
    at, _ = writer.append(rec)
    assert at == start and writer.next_record_start == target
    return writer.bytes_from(start), at


def original_with_filler(pg: VanillaPostgres, target: int) -> tuple[bytes, int]:
    """Original WAL of the end-of-WAL segment up to its end, plus a NOOP reaching `target`;
    returns (bytes from the segment start, the NOOP's LSN to use as xl_prev)."""
    last, end = end_of_wal(pg)
    seg = seg_size(pg)
    seg_start = end - end % seg
    assert target // seg == end // seg and target > end + 64
    filler, noop_lsn = noop_filler(pg, end, last, target)
    original = segment_bytes(pg, end)[: end - seg_start] + filler
    return original.ljust(target - seg_start, b"\0"), noop_lsn


def start_without_recovery(pg: VanillaPostgres) -> None:
    offset = pg.logfile.stat().st_size if pg.logfile.exists() else 0
    pg.start()
    log = pg.logfile.read_text()[offset:]
    assert "database system was shut down at" in log, log
    assert "redo starts" not in log and "crash recovery" not in log, log


def run_workload(pg: VanillaPostgres, tag: str) -> None:
    pg.safe_psql("INSERT INTO base SELECT g FROM generate_series(1, 10) g")
    pg.safe_psql(f"CREATE TABLE w_{tag} (id int PRIMARY KEY, body text)")
    pg.safe_psql(f"INSERT INTO w_{tag} SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
    assert pg.safe_psql(f"SELECT count(*), sum(id) FROM w_{tag}") == [(3000, 3000 * 3001 // 2)]


def check_chain(pg: VanillaPostgres, synth: SynthesizedCheckpoint, start: int, waldir: Path | None = None) -> None:
    """After a clean stop: pg_waldump from `start` reads one prev-linked chain through the
    synthesized checkpoint to the final shutdown checkpoint, ending normally."""
    recs, err = waldump(pg, start, waldir)
    assert _END.match(err), err
    for a, b in itertools.pairwise(recs):
        assert b.prev == a.lsn, f"broken chain: {b} after {a}"
    at = {r.lsn: i for i, r in enumerate(recs)}
    assert synth.lsn in at, f"no record at {Lsn(synth.lsn)}"
    k = at[synth.lsn]
    ours, first_new = recs[k], recs[k + 1]
    assert ours.rmgr == "XLOG" and ours.tot_len == 114
    assert ours.desc.startswith(f"CHECKPOINT_SHUTDOWN redo {Lsn(synth.lsn)}; tli 1; prev tli 1;"), ours.desc
    assert ours.desc.endswith("oldest running xid 0; shutdown")
    if k > 0:
        assert ours.prev == synth.prev_lsn
    assert first_new.prev == synth.lsn and first_new.lsn == synth.end_lsn
    cf = control(pg)
    assert cf.state == DBState.SHUTDOWNED and recs[-1].lsn == cf.checkpoint > synth.end_lsn


def wal_segment_names(pg: VanillaPostgres) -> set[str]:
    return {p.name for p in pg.wal_segments()}


def fresh_cluster(pg: VanillaPostgres) -> None:
    pg.configure(CONFIG)
    pg.start()
    pg.safe_psql("CREATE TABLE base (x int); INSERT INTO base VALUES (1)")
    pg.stop()


# --- cases ------------------------------------------------------------------------------------
def test_checkpoint_at_end_of_wal(vanilla_pg: VanillaPostgres) -> None:
    pg = vanilla_pg
    fresh_cluster(pg)
    before = control(pg)

    # 1. At the end of the WAL of a cleanly stopped cluster, keeping the original bytes.
    last, end = end_of_wal(pg)
    original = segment_bytes(pg, end)
    synth = synthesize_in_datadir(pg.datadir, end, last, original_page_bytes=original)
    assert synth.lsn == normalize_lsn(end, before.xlog_seg_size) and len(synth.record) == 114
    assert wal_segment_names(pg) == set(synth.segments)
    seg_start = synth.lsn - synth.lsn % before.xlog_seg_size
    (segment,) = synth.segments.values()
    assert segment[: end - seg_start] == original[: end - seg_start]  # verbatim up to L
    cf = control(pg)
    assert cf.checkpoint == cf.checkpoint_copy.redo == synth.lsn
    assert cf.checkpoint_copy == synth.checkpoint
    assert cf.checkpoint_copy.replace(redo=0, time=0) == before.checkpoint_copy.replace(redo=0, time=0)
    assert cf.replace(checkpoint=0, checkpoint_copy=None, time=0, crc=0) == before.replace(
        checkpoint=0, checkpoint_copy=None, time=0, crc=0
    )
    start_without_recovery(pg)
    run_workload(pg, "a")
    pg.stop()
    check_chain(pg, synth, seg_start)

    # 2. After more activity, at a mid-page end of WAL.
    while True:
        last, end = end_of_wal(pg)
        if end % XLOG_BLCKSZ > 24:
            break
        pg.start()  # a page-boundary end (1 in 1024): move on with a little more WAL
        pg.safe_psql("INSERT INTO base VALUES (2)")
        pg.stop()
    synth = synthesize_in_datadir(pg.datadir, end, last, original_page_bytes=segment_bytes(pg, end))
    assert synth.lsn == end and synth.end_lsn == end + 120
    start_without_recovery(pg)
    run_workload(pg, "b")
    assert pg.safe_psql("SELECT count(*) FROM w_a") == [(3000,)]
    pg.stop()
    check_chain(pg, synth, seg_start)


def test_checkpoint_at_page_boundary_and_across_a_page(vanilla_pg: VanillaPostgres) -> None:
    pg = vanilla_pg
    fresh_cluster(pg)
    seg = seg_size(pg)

    # L % 8192 == 0: the record goes right after the next page's short header, which then
    # must not claim a continuation.
    _, end = end_of_wal(pg)
    boundary = end - end % XLOG_BLCKSZ + 2 * XLOG_BLCKSZ
    original, prev = original_with_filler(pg, boundary + 24)
    synth = synthesize_in_datadir(pg.datadir, boundary, prev, original_page_bytes=original)
    assert synth.lsn == boundary + 24 and synth.end_lsn == boundary + 24 + 120
    (segment,) = synth.segments.values()
    off = boundary % seg
    hdr = XLogPageHeader.unpack(segment, off)
    assert (hdr.pageaddr, hdr.info & XLP_FIRST_IS_CONTRECORD, hdr.rem_len) == (boundary, 0, 0)
    assert segment[off + 24 : off + 24 + 114] == synth.record
    start_without_recovery(pg)
    run_workload(pg, "a")
    pg.stop()
    check_chain(pg, synth, boundary - boundary % seg)

    # Fewer than 114 bytes left on the page: the record continues on the next page.
    _, end = end_of_wal(pg)
    target = end - end % XLOG_BLCKSZ + 3 * XLOG_BLCKSZ - 16
    original, prev = original_with_filler(pg, target)
    synth = synthesize_in_datadir(pg.datadir, target, prev, original_page_bytes=original)
    next_page = target + 16
    assert synth.lsn == target and synth.end_lsn == next_page + 24 + maxalign(114 - 16)
    (segment,) = synth.segments.values()
    hdr = XLogPageHeader.unpack(segment, next_page % seg)
    assert (hdr.pageaddr, hdr.info & XLP_FIRST_IS_CONTRECORD, hdr.rem_len) == (next_page, 1, 98)
    start_without_recovery(pg)
    run_workload(pg, "b")
    pg.stop()
    check_chain(pg, synth, target - target % seg)


def test_checkpoint_at_segment_boundaries(test_root: Path) -> None:
    """1 MiB segments: L at the start of a segment (after XLOG_SWITCH), and a record that
    crosses into the next segment."""
    pg = VanillaPostgres(test_root / "small").init(initdb_args=["--wal-segsize=1"])
    try:
        fresh_cluster(pg)
        seg = seg_size(pg)
        assert seg == 1 << 20

        # An XLOG_SWITCH "ends" at the next segment start: L = that start + 40.
        pg.start()
        pg.safe_psql("INSERT INTO base VALUES (3)")
        switch_lsn = Lsn(pg.safe_psql("SELECT pg_switch_wal()::text")[0][0]) - 24
        pg.stop()
        old_segment = pg.wal_dir / wal_file_name(1, switch_lsn // seg, seg)
        keep = test_root / "old_wal"
        keep.mkdir()
        shutil.copy(old_segment, keep)
        next_seg = (switch_lsn // seg + 1) * seg
        synth = synthesize_in_datadir(pg.datadir, next_seg, switch_lsn)
        assert synth.lsn == next_seg + 40 and list(synth.segments) == [wal_file_name(1, next_seg // seg, seg)]
        (segment,) = synth.segments.values()
        hdr = XLogPageHeader.unpack(segment)
        assert (hdr.info, hdr.rem_len, hdr.sysid, hdr.seg_size) == (
            XLP_LONG_HEADER,
            0,
            control(pg).system_identifier,
            seg,
        )
        assert not old_segment.exists()
        start_without_recovery(pg)
        run_workload(pg, "a")
        pg.stop()
        for p in pg.wal_segments():
            shutil.copy(p, keep)
        check_chain(pg, synth, switch_lsn - switch_lsn % seg, waldir=keep)
        assert [r.rmgr for r in waldump(pg, switch_lsn, keep)[0][:2]] == ["XLOG", "XLOG"]

        # The record starts 16 bytes before the segment end and continues in the next segment,
        # which synthesis creates with a long header claiming the continuation.
        _, end = end_of_wal(pg)
        target = end - end % seg + seg - 16
        original, prev = original_with_filler(pg, target)
        synth = synthesize_in_datadir(pg.datadir, target, prev, original_page_bytes=original)
        names = [wal_file_name(1, target // seg, seg), wal_file_name(1, target // seg + 1, seg)]
        assert list(synth.segments) == names and wal_segment_names(pg) == set(names)
        hdr = XLogPageHeader.unpack(synth.segments[names[1]])
        assert hdr.info & (XLP_LONG_HEADER | XLP_FIRST_IS_CONTRECORD) == 3 and hdr.rem_len == 98
        assert hdr.pageaddr == target + 16
        assert synth.end_lsn == target + 16 + 40 + 104
        start_without_recovery(pg)
        run_workload(pg, "b")
        pg.stop()
        check_chain(pg, synth, target - target % seg)
    finally:
        pg.cleanup()


def test_checkpoint_without_original_wal(vanilla_pg: VanillaPostgres) -> None:
    """Pure synthesis (spec §10.7 step 4): only page 0's header, L's page header and the record."""
    pg = vanilla_pg
    fresh_cluster(pg)
    cf = control(pg)
    seg = cf.xlog_seg_size

    # Mid-page: L's page header claims the gap as a continuation, so a reader starting at the
    # page boundary (pg_waldump here) lands exactly on L.
    last, end = end_of_wal(pg)
    lsn = end - end % XLOG_BLCKSZ + XLOG_BLCKSZ + 1000  # a page of its own, mid-page
    synth = synthesize_in_datadir(pg.datadir, lsn, last)
    (segment,) = synth.segments.values()
    page = lsn - lsn % XLOG_BLCKSZ
    page0 = XLogPageHeader.unpack(segment)
    assert (page0.info, page0.pageaddr, page0.sysid) == (XLP_LONG_HEADER, lsn - lsn % seg, cf.system_identifier)
    hdr = XLogPageHeader.unpack(segment, page % seg)
    assert hdr.info & XLP_FIRST_IS_CONTRECORD and hdr.rem_len == lsn - page - 24
    assert segment[lsn % seg : lsn % seg + 114] == synth.record
    nonzero = [i for i in range(0, seg, XLOG_BLCKSZ) if any(segment[i : i + XLOG_BLCKSZ])]
    assert nonzero == [0, page % seg]
    start_without_recovery(pg)
    run_workload(pg, "a")
    pg.stop()
    recs, _ = waldump(pg, page)
    assert recs[0].lsn == synth.lsn
    check_chain(pg, synth, page)

    # Right after a short page header: no CONTRECORD flag (the server would reject it). The
    # source pg_control is that of a running server taking a backup: synthesis must reset the
    # state and the recovery/backup points, or the server would go into recovery.
    last, end = end_of_wal(pg)
    boundary = end - end % XLOG_BLCKSZ + XLOG_BLCKSZ
    running = control(pg).replace(
        state=DBState.IN_PRODUCTION, min_recovery_point=end, min_recovery_point_tli=1, backup_start_point=last
    )
    synth = synthesize_checkpoint(running, boundary, last)
    out = synth.control_file
    assert (out.state, out.min_recovery_point, out.min_recovery_point_tli) == (DBState.SHUTDOWNED, 0, 0)
    assert (out.backup_start_point, out.backup_end_point, out.backup_end_required) == (0, 0, False)
    assert ControlFileData.decode(synth.pg_control) == out and len(synth.pg_control) == 8192
    write_synthesized_checkpoint(pg.datadir, synth)
    (segment,) = synth.segments.values()
    hdr = XLogPageHeader.unpack(segment, boundary % seg)
    assert synth.lsn == boundary + 24 and hdr.info & XLP_FIRST_IS_CONTRECORD == 0 and hdr.rem_len == 0
    start_without_recovery(pg)
    run_workload(pg, "b")
    pg.stop()
    check_chain(pg, synth, boundary)


def test_server_refuses_broken_checkpoint(vanilla_pg: VanillaPostgres) -> None:
    """Negative controls: the server rejects a checkpoint with xl_prev == L or a bad CRC."""
    pg = vanilla_pg
    fresh_cluster(pg)
    last, end = end_of_wal(pg)
    cf = control(pg)
    good = synthesize_checkpoint(cf, end, last, original_page_bytes=segment_bytes(pg, end))
    ((name, segment),) = good.segments.items()
    off = good.lsn % cf.xlog_seg_size

    def broken(record: bytes) -> SynthesizedCheckpoint:
        patched = segment[:off] + record + segment[off + len(record) :]
        return SynthesizedCheckpoint(
            good.lsn,
            good.end_lsn,
            good.prev_lsn,
            good.checkpoint,
            record,
            {name: patched},
            good.control_file,
            good.pg_control,
        )

    self_linked = checkpoint_record(good.checkpoint, good.lsn)
    bad_crc = bytearray(good.record)
    bad_crc[26 + 24] ^= 0x01  # a payload byte (nextXid), CRC left as is
    for record in (self_linked, bytes(bad_crc)):
        write_synthesized_checkpoint(pg.datadir, broken(record))
        offset = pg.logfile.stat().st_size if pg.logfile.exists() else 0
        with pytest.raises(PgDistribError):
            pg.start()
        log = pg.logfile.read_text()[offset:]
        assert "could not locate a valid checkpoint record" in log, log

    write_synthesized_checkpoint(pg.datadir, good)
    start_without_recovery(pg)
    run_workload(pg, "a")
    pg.stop()
    check_chain(pg, good, good.lsn - good.lsn % cf.xlog_seg_size)


def test_synthesis_input_checks(vanilla_pg: VanillaPostgres) -> None:
    cf = control(vanilla_pg)
    seg = cf.xlog_seg_size
    assert normalize_lsn(0x1000000, seg) == 0x1000028
    assert normalize_lsn(0x1002000, seg) == 0x1002018
    assert normalize_lsn(0x1002001, seg) == 0x1002008
    with pytest.raises(ValueError, match="below"):
        synthesize_checkpoint(cf, 0x1500000, 0x1500018)  # prev == L after normalisation
    original = bytearray((vanilla_pg.wal_dir / "000000010000000000000001").read_bytes())
    synth = synthesize_checkpoint(cf, cf.checkpoint + 120, cf.checkpoint, original_page_bytes=original, now=1234)
    assert synth.checkpoint.time == synth.control_file.time == 1234
    assert synth.control_file.state == DBState.SHUTDOWNED and synth.checkpoint.oldest_active_xid == 0
    with pytest.raises(ValueError, match="need them up to"):
        synthesize_checkpoint(cf, cf.checkpoint + 120, cf.checkpoint, original_page_bytes=original[:100])
    lsn = cf.checkpoint + 120
    page = lsn - lsn % XLOG_BLCKSZ
    bad = bytearray(original)
    bad[24] ^= 1  # the system identifier in page 0's long header
    with pytest.raises(ValueError, match="system identifier"):
        synthesize_checkpoint(cf, lsn, cf.checkpoint, original_page_bytes=bad)
    bad = bytearray(original)
    bad[page % seg + 8] ^= 0x20  # xlp_pageaddr of L's page
    with pytest.raises(ValueError, match="xlp_pageaddr"):
        synthesize_checkpoint(cf, lsn, cf.checkpoint, original_page_bytes=bad)
    bad = bytearray(original)
    bad[page % seg + 2] |= XLP_FIRST_IS_CONTRECORD
    bad[page % seg + 16 : page % seg + 20] = (lsn - page).to_bytes(4, "little")  # would skip past L
    with pytest.raises(ValueError, match="runs past"):
        synthesize_checkpoint(cf, lsn, cf.checkpoint, original_page_bytes=bad)
