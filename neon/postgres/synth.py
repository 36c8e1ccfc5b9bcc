"""Synthesis of a shutdown checkpoint at an arbitrary LSN L (spec §10.7), so that a stock PG15
server starts on a generated data directory without recovery and continues the WAL at L.

Owns: normalising L, the 114-byte XLOG_CHECKPOINT_SHUTDOWN record, the WAL segment file(s)
holding it (optionally byte-identical to the original WAL up to L), the matching pg_control, and
writing both into a data directory crash-safely. Tracking the CheckPoint values from WAL
(spec §4.12) is the caller's business; by default the source pg_control's copy is used.
"""

from __future__ import annotations

import os
import re
import time as _time
from dataclasses import dataclass
from pathlib import Path

from neon.postgres.checkpoint import XLOG_CHECKPOINT_SHUTDOWN, CheckPoint
from neon.postgres.constants import (
    RM_XLOG_ID,
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_SHORT_PHD,
    XLOG_BLCKSZ,
    XLOG_PAGE_MAGIC,
    XLP_ALL_FLAGS,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
    maxalign,
)
from neon.postgres.controlfile import ControlFileData, DBState, control_file_path
from neon.postgres.errors import PgFormatError
from neon.postgres.walformat import (
    XLogPageHeader,
    encode_record,
    page_header,
    page_header_size,
    wal_file_name,
)
from neon.postgres.walwriter import WalWriter
from neon.utils.crashsafe import durable_write, fsync_path
from neon.utils.lsn import Lsn

CHECKPOINT_RECORD_SIZE = 114  # 24-byte header + `ff 58` + 88-byte CheckPoint

# Everything in pg_wal that belongs to some WAL position: segments, partial segments, backup
# history files. Timeline history files (%08X.history) are kept: later timelines need them.
_WAL_POSITION_FILE = re.compile(r"^[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?$")


class CheckpointSynthesisError(PgFormatError):
    """Inputs from which no startable checkpoint can be built (bad L/prev, mismatched WAL bytes)."""


@dataclass(frozen=True, slots=True)
class SynthesizedCheckpoint:
    lsn: int
    """Normalised L: start LSN of the checkpoint record, its redo, pg_control's checkPoint."""
    end_lsn: int
    """End of the record: where the server writes its first record (whose xl_prev is `lsn`)."""
    prev_lsn: int
    checkpoint: CheckPoint
    record: bytes
    segments: dict[str, bytes]
    """WAL file name -> full segment image; two entries if the record crosses a segment."""
    control_file: ControlFileData
    pg_control: bytes
    """The 8192-byte global/pg_control."""


def normalize_lsn(lsn: int, seg_size: int) -> int:
    """Where a record "at" `lsn` really starts: MAXALIGNed, and past the page header when `lsn`
    is a page boundary (40 bytes at a segment start, else 24)."""
    lsn = maxalign(lsn)
    if lsn % XLOG_BLCKSZ == 0:
        lsn += SIZE_OF_XLOG_LONG_PHD if lsn % seg_size == 0 else SIZE_OF_XLOG_SHORT_PHD
    return lsn


def checkpoint_record(checkpoint: CheckPoint, prev: int, *, info: int = XLOG_CHECKPOINT_SHUTDOWN) -> bytes:
    """The 114-byte checkpoint record: xl_xid 0, short main-data header, the CheckPoint."""
    rec = encode_record(xid=0, prev=prev, info=info, rmid=RM_XLOG_ID, main_data=checkpoint.pack())
    assert len(rec) == CHECKPOINT_RECORD_SIZE
    return rec


def synthesize_checkpoint(
    pg_control: ControlFileData | bytes,
    lsn: int,
    prev_record_lsn: int,
    checkpoint: CheckPoint | None = None,
    *,
    tli: int | None = None,
    original_page_bytes: bytes | bytearray | memoryview | None = None,
    now: int | None = None,
) -> SynthesizedCheckpoint:
    """Build the shutdown checkpoint record at `lsn` (normalised), its segment(s) and pg_control.

    `prev_record_lsn` becomes xl_prev: the start of the last real record before L keeps the
    prev-link chain valid (the server accepts any value below L, 0 included). `checkpoint`
    defaults to pg_control's checkPointCopy; redo, timelines, time and oldestActiveXid are set
    here in any case. `tli` defaults to that checkpoint's timeline; `now` (Unix seconds) to the
    current time.

    `original_page_bytes` are the original WAL bytes from the start of L's segment (at least up
    to L; anything beyond is ignored). They are copied verbatim, so the segment is identical to
    the original WAL up to L; pages between page 0 and L's page may be zeros if unknown. When L
    sits right after its page header, that header is generated rather than copied (the original
    WAL may never have written it). Without them, page 0 gets a long header and L's page a
    header whose XLP_FIRST_IS_CONTRECORD/xlp_rem_len cover the gap up to L, so readers starting
    at the page boundary find the record.
    """
    cf = ControlFileData.decode(pg_control) if isinstance(pg_control, bytes | bytearray) else pg_control
    cf.check_build_compatibility()
    seg_size = cf.xlog_seg_size
    lsn_n = normalize_lsn(lsn, seg_size)
    if not 0 <= prev_record_lsn < lsn_n:
        raise CheckpointSynthesisError(f"xl_prev {Lsn(prev_record_lsn)} must be below the checkpoint LSN {Lsn(lsn_n)}")
    base = checkpoint if checkpoint is not None else cf.checkpoint_copy
    tli = base.this_timeline_id if tli is None else tli
    if not 1 <= tli <= 0xFFFFFFFF:
        raise CheckpointSynthesisError(f"invalid timeline {tli}")
    now = int(_time.time()) if now is None else now
    cp = base.replace(redo=lsn_n, this_timeline_id=tli, prev_timeline_id=tli, time=now, oldest_active_xid=0)
    record = checkpoint_record(cp, prev_record_lsn)

    # Plain headers as in the spec's recipe (and pg_resetwal): no XLP_BKP_REMOVABLE.
    writer = WalWriter(lsn_n, sysid=cf.system_identifier, tli=tli, seg_size=seg_size, page_info=0)
    start, end = writer.append(record)
    assert start == lsn_n
    segs = writer.segments()
    segno = lsn_n // seg_size
    seg_start = segno * seg_size
    page_start = lsn_n - lsn_n % XLOG_BLCKSZ
    first = bytearray(segs[segno])
    if page_start != seg_start:
        # The server validates page 0 of every segment it opens, whatever page it wants.
        first[:SIZE_OF_XLOG_LONG_PHD] = page_header(
            seg_start, tli=tli, info=0, sysid=cf.system_identifier, seg_size=seg_size
        ).pack()
    if original_page_bytes is not None:
        at_page_start = lsn_n == page_start + page_header_size(page_start, seg_size)
        copy_len = (page_start if at_page_start else lsn_n) - seg_start
        if len(original_page_bytes) < copy_len:
            raise CheckpointSynthesisError(
                f"original WAL bytes end at {Lsn(seg_start + len(original_page_bytes))}, "
                f"need them up to {Lsn(seg_start + copy_len)}"
            )
        original = bytes(original_page_bytes[:copy_len])
        _check_original_headers(original, cf, seg_start, lsn_n, tli)
        first[:copy_len] = original
    segs[segno] = bytes(first)

    control = cf.replace(
        state=DBState.SHUTDOWNED,
        time=now,
        checkpoint=lsn_n,
        checkpoint_copy=cp,
        min_recovery_point=0,
        min_recovery_point_tli=0,
        backup_start_point=0,
        backup_end_point=0,
        backup_end_required=False,
    )
    encoded = control.encode()
    return SynthesizedCheckpoint(
        lsn=lsn_n,
        end_lsn=end,
        prev_lsn=prev_record_lsn,
        checkpoint=cp,
        record=record,
        segments={wal_file_name(tli, n, seg_size): data for n, data in sorted(segs.items())},
        control_file=ControlFileData.decode(encoded),
        pg_control=encoded,
    )


def _check_original_headers(original: bytes, cf: ControlFileData, seg_start: int, lsn: int, tli: int) -> None:
    """The copied bytes must carry the page headers the server will validate: page 0 of the
    segment and, if copied, the header of L's page, whose continuation must end before L (a
    reader starting at that page skips xlp_rem_len bytes to find the first record)."""
    page_start = lsn - lsn % XLOG_BLCKSZ

    def check(page: int, long: bool) -> None:
        off = page - seg_start
        size = SIZE_OF_XLOG_LONG_PHD if long else SIZE_OF_XLOG_SHORT_PHD
        if len(original) < off + size:
            return
        hdr = XLogPageHeader.unpack(original, off)
        where = f"original WAL page {Lsn(page)}"
        problems = []
        if hdr.magic != XLOG_PAGE_MAGIC:
            problems.append(f"magic {hdr.magic:04X}")
        if hdr.info & ~XLP_ALL_FLAGS or bool(hdr.info & XLP_LONG_HEADER) != long:
            problems.append(f"xlp_info {hdr.info:#06x}")
        if hdr.pageaddr != page:
            problems.append(f"xlp_pageaddr {Lsn(hdr.pageaddr)}")
        if hdr.tli > tli:
            problems.append(f"timeline {hdr.tli} after the checkpoint's {tli}")
        if long and hdr.sysid != cf.system_identifier:
            problems.append(f"system identifier {hdr.sysid} (pg_control has {cf.system_identifier})")
        if long and (hdr.seg_size != cf.xlog_seg_size or hdr.xlog_blcksz != XLOG_BLCKSZ):
            problems.append(f"segment/page size {hdr.seg_size}/{hdr.xlog_blcksz}")
        if page == page_start and hdr.info & XLP_FIRST_IS_CONTRECORD and page + size + maxalign(hdr.rem_len) > lsn:
            problems.append(f"a continuation of {hdr.rem_len} bytes that runs past {Lsn(lsn)}")
        if problems:
            raise CheckpointSynthesisError(f"{where} has an invalid header: {', '.join(problems)}")

    check(seg_start, True)
    if page_start != seg_start:
        check(page_start, False)


# --- writing into a data directory ------------------------------------------------------------
def write_synthesized_checkpoint(datadir: str | os.PathLike[str], synthesized: SynthesizedCheckpoint) -> None:
    """Install the checkpoint: its segment(s) into pg_wal, then global/pg_control, then remove
    every other WAL segment and archive-status marker.

    Each file is replaced atomically (temp, fsync, rename, fsync dir), owned like the data
    directory (we may be root while Postgres runs as its own user). The order means a crash
    leaves either the old pg_control with its WAL mostly intact, or the new one with its WAL.
    """
    root = Path(datadir)
    st = os.stat(root)
    owner = (st.st_uid, st.st_gid)
    wal_dir = root / "pg_wal"
    for name, data in synthesized.segments.items():
        durable_write(wal_dir / name, data, owner=owner)
    durable_write(Path(control_file_path(root)), synthesized.pg_control, owner=owner)

    for p in wal_dir.iterdir():
        if p.name not in synthesized.segments and _WAL_POSITION_FILE.match(p.name) and not p.is_dir():
            p.unlink()
    status_dir = wal_dir / "archive_status"
    if status_dir.is_dir():
        for p in status_dir.iterdir():
            p.unlink()
        fsync_path(status_dir)
    else:
        status_dir.mkdir(mode=0o700)
        if owner != (os.geteuid(), os.getegid()):
            os.chown(status_dir, *owner)
    fsync_path(wal_dir)


def synthesize_in_datadir(
    datadir: str | os.PathLike[str],
    lsn: int,
    prev_record_lsn: int,
    checkpoint: CheckPoint | None = None,
    *,
    tli: int | None = None,
    original_page_bytes: bytes | bytearray | memoryview | None = None,
    now: int | None = None,
) -> SynthesizedCheckpoint:
    """`synthesize_checkpoint` from the data directory's own pg_control, then install it."""
    cf = ControlFileData.read(control_file_path(datadir))
    synthesized = synthesize_checkpoint(
        cf, lsn, prev_record_lsn, checkpoint, tli=tli, original_page_bytes=original_page_bytes, now=now
    )
    write_synthesized_checkpoint(datadir, synthesized)
    return synthesized
