"""The safekeeper's WAL storage: the segment files of one timeline directory (spec §3.3, §4.8).

Owns the on-disk WAL of a timeline and the three positions derived from it:

* `write_lsn` — end of the bytes written into segment files (possibly mid-record, not fsynced);
* `write_record_lsn` — end of the last *complete* record among them (found by decoding);
* `flush_lsn` — end of the last complete record that has been fdatasync'ed.

Files are named like Postgres WAL segments with Postgres timeline 1. The segment being filled
carries a `.partial` suffix; it is created full-size and zero-filled, then written in place, and
renamed to its final name once its last byte is written (after an fdatasync). Because files are
pre-zeroed, the end of WAL is never derived from file sizes: at restart it is found by decoding
forward from a known record boundary (the persisted `commit_lsn`).

Also here: truncation (repositioning at `ProposerElected`), removal of old segments, and
`WalReader`, which serves byte ranges to walsenders (synthesising the part of the timeline's first
segment before `timeline_start_lsn`).

Threading: every `WalStorage` method runs under one internal lock, so a single writer (the
acceptor) may be called from any thread; positions are plain attributes and can be read without
the lock. `WalReader`s open their own file handles and may run concurrently with the writer, as
long as they read below the writer's `flush_lsn` (the caller bounds reads by `flush_lsn` or
`commit_lsn`). `remove_up_to` deliberately does not take the lock (spec §3.3.6); the caller must
only remove segments wholly below the WAL still needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from neon.postgres.constants import (
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_SHORT_PHD,
    XLOG_BLCKSZ,
    XLP_FIRST_IS_CONTRECORD,
)
from neon.postgres.errors import WalDecodeError
from neon.postgres.waldecoder import WalStreamDecoder
from neon.postgres.walformat import page_header, parse_wal_file_name, wal_file_name
from neon.safekeeper.recent_wal import RecentWal
from neon.utils.lsn import Lsn

log = logging.getLogger(__name__)

PG_TLI = 1
"""Postgres timeline used in safekeeper segment names: always 1."""
PARTIAL_SUFFIX = ".partial"
MAX_SEND_SIZE = 16 * XLOG_BLCKSZ
"""Largest WAL chunk per AppendRequest / XLogData message (Appendix A)."""

_ZERO_BLOCK = bytes(XLOG_BLCKSZ)
_READ_CHUNK = 1 << 20


class WalStorageError(Exception):
    """A WAL storage operation that cannot be done (bad position, unexpected file state)."""


class WalNotAvailable(WalStorageError):
    """Requested WAL is not stored here: removed, before the timeline start, or never written."""

    def __init__(self, msg: str, lsn: int) -> None:
        super().__init__(f"{msg} (requested {Lsn(lsn)})")
        self.lsn = Lsn(lsn)


@dataclass(slots=True)
class WalStorageMetrics:
    """Counters of what the storage did to the disk (cheap; for tests and /metrics)."""

    write_calls: int = 0
    bytes_written: int = 0
    fdatasyncs: int = 0
    segments_completed: int = 0
    truncations: int = 0


@dataclass(frozen=True, slots=True)
class WalPositions:
    """A consistent snapshot of the storage's positions."""

    write_lsn: Lsn
    write_record_lsn: Lsn
    flush_lsn: Lsn


# --- segment files --------------------------------------------------------------------------


def segment_paths(timeline_dir: Path, segno: int, wal_seg_size: int, pg_tli: int = PG_TLI) -> tuple[Path, Path]:
    """(complete path, `.partial` path) of segment `segno`."""
    name = wal_file_name(pg_tli, segno, wal_seg_size)
    return timeline_dir / name, timeline_dir / (name + PARTIAL_SUFFIX)


def _open_for_read(timeline_dir: Path, segno: int, wal_seg_size: int, pg_tli: int) -> int | None:
    """A read-only fd of segment `segno` (`.partial` first, then complete), or None if absent.

    The writer renames `.partial` -> complete (segment filled) and complete -> `.partial`
    (truncation); a rename between our two attempts makes both miss, so look once more."""
    complete, partial = segment_paths(timeline_dir, segno, wal_seg_size, pg_tli)
    for _attempt in range(3):
        for path in (partial, complete):
            with contextlib.suppress(FileNotFoundError):
                return os.open(path, os.O_RDONLY)
    return None


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    parts: list[bytes] = []
    while size:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise WalStorageError(f"{what} is shorter than a full segment (ends at offset {offset})")
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _write_zeros(fd: int, offset: int, count: int) -> None:
    """Zero `count` bytes from `offset`, in 8 KiB blocks as Neon does."""
    while count > 0:
        n = min(count, XLOG_BLCKSZ)
        _pwrite_all(fd, _ZERO_BLOCK[:n], offset)
        offset += n
        count -= n


def wal_segments_in(timeline_dir: Path, wal_seg_size: int) -> list[tuple[int, Path]]:
    """(segno, path) of every file named like a WAL segment (`.partial` or not), sorted."""
    found: list[tuple[int, Path]] = []
    for entry in os.scandir(timeline_dir):
        try:
            _tli, segno = parse_wal_file_name(entry.name, wal_seg_size)
        except ValueError:
            continue
        found.append((segno, Path(entry.path)))
    found.sort()
    return found


def remove_segments(timeline_dir: Path, wal_seg_size: int, should_remove: Callable[[int], bool]) -> list[int]:
    """Delete every WAL segment file whose segment number satisfies `should_remove`."""
    removed: list[int] = []
    for segno, path in wal_segments_in(timeline_dir, wal_seg_size):
        if should_remove(segno):
            path.unlink(missing_ok=True)
            removed.append(segno)
    if removed:
        log.info("removed %d WAL segment files [%d; %d] in %s", len(removed), removed[0], removed[-1], timeline_dir)
    return removed


def find_end_of_wal(timeline_dir: Path, wal_seg_size: int, start_lsn: int, pg_tli: int = PG_TLI) -> Lsn:
    """End of the last complete, valid record at or after `start_lsn` (a known record boundary).

    Decodes consecutive segments (`.partial` preferred, as the writer's newest copy) until a
    segment is missing or the decoder fails (zeroed tail, torn record, stale bytes); returns
    `start_lsn` if no record completes. An incomplete record at the very end is ignored."""
    end = Lsn(start_lsn)
    decoder = WalStreamDecoder(start_lsn, seg_size=wal_seg_size)
    pos = start_lsn
    while True:
        segno, offset = divmod(pos, wal_seg_size)
        fd = _open_for_read(timeline_dir, segno, wal_seg_size, pg_tli)
        if fd is None:
            return end
        try:
            while offset < wal_seg_size:
                chunk = os.pread(fd, min(_READ_CHUNK, wal_seg_size - offset), offset)
                if not chunk:
                    return end  # a short file: treat like the end of the stored WAL
                decoder.feed(chunk)
                offset += len(chunk)
                try:
                    for _start, rec_end, _rec in decoder.records():
                        end = Lsn(rec_end)
                except WalDecodeError as e:
                    log.info("end of WAL in %s at %s: %s", timeline_dir, end, e)
                    return end
        finally:
            os.close(fd)
        pos = (segno + 1) * wal_seg_size


# --- the writer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlushTicket:
    """A flush in progress: the fd to fdatasync (None: nothing open needs it) and the flush_lsn
    that makes durable."""

    fd: int | None
    flush_lsn: Lsn


class WalStorage:
    """Segment files of one timeline and the write/flush positions (spec §3.3).

    A new timeline starts with all positions 0 and no files; the first `truncate_wal(start)`
    (at the first `start_streaming_at`) or the first `write_wal` creates the zero-filled first
    segment, so bytes before the start stay zeros. `open` resumes an existing directory.
    After `open`, call `truncate_wal(flush_lsn)` before writing (the acceptor always does, at
    `ProposerElected`): it drops a torn tail and turns a completed last segment back into
    `.partial`.
    """

    def __init__(
        self,
        timeline_dir: str | os.PathLike[str],
        *,
        wal_seg_size: int,
        pg_tli: int = PG_TLI,
        end_lsn: int = 0,
        no_sync: bool = False,
    ) -> None:
        """`end_lsn`: where stored WAL ends (a record boundary), as found by `find_end_of_wal`;
        0 for a timeline with no WAL. `no_sync` skips fsyncs (the `--no-sync` flag, tests)."""
        if wal_seg_size <= 0 or wal_seg_size % XLOG_BLCKSZ:
            raise ValueError(f"invalid WAL segment size {wal_seg_size}")
        self.timeline_dir = Path(timeline_dir)
        self.wal_seg_size = wal_seg_size
        self.pg_tli = pg_tli
        self.no_sync = no_sync
        self.metrics = WalStorageMetrics()
        self._lock = threading.RLock()
        self._write_lsn = Lsn(end_lsn)
        self._write_record_lsn = Lsn(end_lsn)
        self._flush_lsn = Lsn(end_lsn)
        # Cached fd of the `.partial` segment being filled: (segno, fd). Never a complete file.
        self._open_segment: tuple[int, int] | None = None
        # The decoder follows the written stream to find record ends; created at the first write
        # and recreated whenever a write does not continue where the last one ended.
        self._decoder: WalStreamDecoder | None = None
        self._decoder_next_lsn = 0
        # A decoded record end not yet covered by written bytes (alignment padding, or the rest
        # of the segment after XLOG_SWITCH): it becomes write_record_lsn once write_lsn gets there.
        self._pending_record_end: Lsn | None = None
        self._truncated_since_open = False
        # What was written last, for walsenders of caught-up readers (no file read).
        self.recent = RecentWal()

    @classmethod
    def open(
        cls,
        timeline_dir: str | os.PathLike[str],
        *,
        wal_seg_size: int,
        commit_lsn: int,
        pg_tli: int = PG_TLI,
        peer_horizon_lsn: int = 0,
        no_sync: bool = False,
    ) -> WalStorage:
        """Load a timeline's WAL at restart (spec §3.3.4): decode forward from the persisted
        `commit_lsn`; the last complete record's end becomes write_lsn = flush_lsn."""
        path = Path(timeline_dir)
        end = Lsn(0) if commit_lsn == 0 else find_end_of_wal(path, wal_seg_size, commit_lsn, pg_tli)
        if end < commit_lsn or end < peer_horizon_lsn:
            log.warning(
                "potential data loss in %s: end of WAL %s is below commit_lsn %s or peer_horizon_lsn %s",
                path,
                end,
                Lsn(commit_lsn),
                Lsn(peer_horizon_lsn),
            )
        storage = cls(path, wal_seg_size=wal_seg_size, pg_tli=pg_tli, end_lsn=end, no_sync=no_sync)
        if end:
            # flush_lsn now claims everything up to `end` is durable: make it so. Earlier segments
            # were synced when they were completed; if we stopped exactly at a boundary the last
            # one may have been completed just before a crash.
            last_segno = (end - 1) // wal_seg_size
            fd = _open_for_read(path, last_segno, wal_seg_size, pg_tli)
            if fd is not None:
                try:
                    storage._fsync(fd)
                finally:
                    os.close(fd)
        return storage

    # --- positions ------------------------------------------------------------------------
    @property
    def write_lsn(self) -> Lsn:
        return self._write_lsn

    @property
    def write_record_lsn(self) -> Lsn:
        return self._write_record_lsn

    @property
    def flush_lsn(self) -> Lsn:
        return self._flush_lsn

    def positions(self) -> WalPositions:
        with self._lock:
            return WalPositions(self._write_lsn, self._write_record_lsn, self._flush_lsn)

    # --- file helpers ---------------------------------------------------------------------
    def _fdatasync(self, fd: int) -> None:
        if not self.no_sync:
            os.fdatasync(fd)
            self.metrics.fdatasyncs += 1

    def _fsync(self, fd: int) -> None:
        if not self.no_sync:
            os.fsync(fd)
            self.metrics.fdatasyncs += 1

    def _paths(self, segno: int) -> tuple[Path, Path]:
        return segment_paths(self.timeline_dir, segno, self.wal_seg_size, self.pg_tli)

    def _open_or_create(self, segno: int) -> tuple[int, bool, bool]:
        """A writable fd of segment `segno`: (fd, is_partial, created). A new segment is created
        as `.partial`, filled with zeros and fsynced before any WAL goes into it."""
        complete, partial = self._paths(segno)
        for path, is_partial in ((complete, False), (partial, True)):
            with contextlib.suppress(FileNotFoundError):
                return os.open(path, os.O_WRONLY), is_partial, False
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_zeros(fd, 0, self.wal_seg_size)
            self._fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, True, True

    def _close_open_segment(self, *, sync: bool) -> None:
        if self._open_segment is not None:
            _segno, fd = self._open_segment
            self._open_segment = None
            try:
                if sync:
                    self._fdatasync(fd)
            finally:
                os.close(fd)

    # --- writing --------------------------------------------------------------------------
    def write_wal(self, start_lsn: int, data: bytes | bytearray | memoryview) -> None:
        """Append `data` at `start_lsn`, which must equal `write_lsn` (or anything while no WAL
        has been written yet). No fsync here, except of segments this write completes."""
        with self._lock:
            if self._write_lsn > start_lsn:
                raise WalStorageError(
                    f"write_wal rewrites WAL written before, write_lsn={self._write_lsn}, startpos={Lsn(start_lsn)}"
                )
            if self._write_lsn < start_lsn and self._write_lsn != 0:
                raise WalStorageError(
                    f"write_wal creates gap in written WAL, write_lsn={self._write_lsn}, startpos={Lsn(start_lsn)}"
                )
            self.metrics.write_calls += 1
            if not data:
                return
            self._write_exact(start_lsn, memoryview(data))
            self.recent.written(start_lsn, data)
            self._track_records(start_lsn, data)

    def _write_exact(self, pos: int, data: memoryview) -> None:
        if self._write_lsn != pos:
            # Only the very first write lands here; don't leave another segment's fd cached.
            self._close_open_segment(sync=True)
            self._write_lsn = Lsn(pos)
        while data:
            segno, offset = divmod(self._write_lsn, self.wal_seg_size)
            piece = data[: self.wal_seg_size - offset]
            self._write_in_segment(segno, offset, piece)
            self._write_lsn = Lsn(self._write_lsn + len(piece))
            self.metrics.bytes_written += len(piece)
            data = data[len(piece) :]

    def _write_in_segment(self, segno: int, offset: int, piece: memoryview) -> None:
        if self._open_segment is not None and self._open_segment[0] == segno:
            fd = self._open_segment[1]
            self._open_segment = None
        else:
            self._close_open_segment(sync=True)
            fd, is_partial, _created = self._open_or_create(segno)
            if not is_partial:
                os.close(fd)
                raise WalStorageError(
                    f"unexpected write into complete segment {self._paths(segno)[0].name}; "
                    "truncate_wal() must reposition first"
                )
        try:
            _pwrite_all(fd, piece, offset)
        except BaseException:
            os.close(fd)
            raise
        if offset + len(piece) < self.wal_seg_size:
            self._open_segment = (segno, fd)
            return
        # Segment filled: make it durable, then give it its final name.
        try:
            self._fdatasync(fd)
        finally:
            os.close(fd)
        complete, partial = self._paths(segno)
        os.replace(partial, complete)
        self.metrics.segments_completed += 1

    def _track_records(self, start_lsn: int, data: bytes | bytearray | memoryview) -> None:
        """Feed the written bytes to the decoder; complete records move write_record_lsn."""
        if self._decoder is None or self._decoder_next_lsn != start_lsn:
            if self._decoder is not None:
                log.info("restarting WAL decoder at %s (was at %s)", Lsn(start_lsn), Lsn(self._decoder_next_lsn))
            self._decoder = WalStreamDecoder(start_lsn, seg_size=self.wal_seg_size, source=str(self.timeline_dir))
            self._pending_record_end = None
        self._decoder.feed(data)
        self._decoder_next_lsn = start_lsn + len(data)
        try:
            for _start, end, _rec in self._decoder.records():
                self._note_record_end(Lsn(end))
        except WalDecodeError as e:
            # The bytes are on disk but are not valid WAL; write_record_lsn stays at the last
            # good record and the decoder stays failed until truncation repositions it.
            raise WalStorageError(f"invalid WAL received: {e}") from e
        finally:
            if self._pending_record_end is not None and self._pending_record_end <= self._write_lsn:
                self._write_record_lsn = self._pending_record_end
                self._pending_record_end = None

    def _note_record_end(self, end: Lsn) -> None:
        # The decoder reports the *next record position* (end rounded up to 8, or the next
        # segment after XLOG_SWITCH), which can lie beyond the bytes received so far. Only
        # positions backed by written bytes count, so flush_lsn never exceeds write_lsn.
        if end <= self._write_lsn:
            self._write_record_lsn = end
            self._pending_record_end = None
        else:
            self._pending_record_end = end

    def flush(self) -> Lsn:
        """Make written WAL durable (one fdatasync of the open segment; completed segments were
        synced when completed) and advance flush_lsn to the last complete record end.
        Call it once per batch of appends: that is the group commit."""
        with self._lock:
            ticket = self.begin_flush()
            if ticket is None:
                return self._flush_lsn
            self.sync(ticket)
            return self.end_flush(ticket)

    # A flush in three steps, so that only the fdatasync leaves the caller's thread:
    # begin_flush, sync (anywhere), end_flush. Nothing may write, truncate or close in between.
    def begin_flush(self) -> FlushTicket | None:
        """What a flush has to sync, or None when everything written is flushed."""
        with self._lock:
            if self._flush_lsn == self._write_record_lsn:
                return None
            if self._open_segment is not None:
                return FlushTicket(self._open_segment[1], self._write_record_lsn)
            if self._write_lsn % self.wal_seg_size != 0:
                raise WalStorageError(
                    f"unflushed WAL but no open segment, write_lsn={self._write_lsn}, flush_lsn={self._flush_lsn}"
                )
            return FlushTicket(None, self._write_record_lsn)  # the completed segment was synced

    def sync(self, ticket: FlushTicket) -> None:
        if ticket.fd is not None:
            self._fdatasync(ticket.fd)

    def end_flush(self, ticket: FlushTicket) -> Lsn:
        with self._lock:
            self._flush_lsn = Lsn(max(self._flush_lsn, ticket.flush_lsn))
            return self._flush_lsn

    def write_stays_in_open_segment(self, start_lsn: int, size: int) -> bool:
        """Whether writing `size` bytes at `start_lsn` touches only the open `.partial` segment
        and does not fill it: no file to create, zero-fill, sync or rename (cheap enough for the
        event loop)."""
        seg = self._open_segment
        if seg is None or start_lsn != self._write_lsn:
            return False
        segno, offset = divmod(start_lsn, self.wal_seg_size)
        return seg[0] == segno and offset + size < self.wal_seg_size

    flush_wal = flush

    # --- repositioning --------------------------------------------------------------------
    def truncate_wal(self, end_lsn: int, *, not_below: int | None = None) -> None:
        """Drop all WAL after `end_lsn` (a record boundary) and continue writing there (§3.3.5).

        `not_below` is the floor the caller promises never to cut (its commit_lsn); going below
        it is refused. Later segments are deleted, the tail of the segment holding `end_lsn` is
        zeroed and the segment becomes `.partial` again; all positions become `end_lsn`."""
        end = Lsn(end_lsn)
        with self._lock:
            if not_below is not None and end < not_below:
                raise WalStorageError(f"refusing to truncate WAL at {end}, below {Lsn(not_below)}")
            if end % 8:
                raise WalStorageError(f"truncation point {end} is not a record boundary (8-byte aligned)")
            if self._write_lsn != 0 and end > self._write_lsn:
                raise WalStorageError(f"truncate_wal called on non-written WAL, write_lsn={self._write_lsn}, end={end}")
            if self._truncated_since_open and end == self._write_lsn == self._flush_lsn:
                return  # every reconnect lands here; don't rewrite a segment's worth of zeros
            self._close_open_segment(sync=True)
            self.recent.truncate(end)
            segno, offset = divmod(end, self.wal_seg_size)
            remove_segments(self.timeline_dir, self.wal_seg_size, lambda s: s > segno)
            fd, is_partial, created = self._open_or_create(segno)
            try:
                if not created:
                    _write_zeros(fd, offset, self.wal_seg_size - offset)
                    self._fdatasync(fd)
            finally:
                os.close(fd)
            complete, partial = self._paths(segno)
            if not is_partial:
                os.replace(complete, partial)
            if offset == 0 and segno > 0:
                self._complete_full_previous_segment(segno - 1)
            self._write_lsn = self._write_record_lsn = self._flush_lsn = end
            self._decoder = None
            self._pending_record_end = None
            self._truncated_since_open = True
            self.metrics.truncations += 1

    def _complete_full_previous_segment(self, segno: int) -> None:
        # WAL ends exactly at the end of `segno`, so that segment is entirely valid; a crash
        # between its final fdatasync and the rename may have left it as `.partial`.
        complete, partial = self._paths(segno)
        if partial.exists() and not complete.exists():
            os.replace(partial, complete)

    def remove_up_to(self, segno: int) -> list[int]:
        """Delete segment files (complete or `.partial`) with segment number <= `segno`.
        Runs without the writer lock (spec §3.3.6); returns the removed segment numbers."""
        return remove_segments(self.timeline_dir, self.wal_seg_size, lambda s: s <= segno)

    def close(self) -> None:
        """Release the open file (no fsync: unflushed WAL is not claimed by flush_lsn)."""
        with self._lock:
            self._close_open_segment(sync=False)

    def __enter__(self) -> WalStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reader(self, *, timeline_start_lsn: int, local_start_lsn: int, sysid: int | None = None) -> WalReader:
        return WalReader(
            self.timeline_dir,
            wal_seg_size=self.wal_seg_size,
            timeline_start_lsn=timeline_start_lsn,
            local_start_lsn=local_start_lsn,
            pg_tli=self.pg_tli,
            sysid=sysid,
            recent=self.recent,
        )


# --- the reader ---------------------------------------------------------------------------


def timeline_start_segment_prefix(
    timeline_start_lsn: int, *, sysid: int, wal_seg_size: int, pg_tli: int = PG_TLI
) -> bytes:
    """The bytes of the timeline's first segment before `timeline_start_lsn` (spec §4.8): a valid
    long page header, a short header on the page holding the start when that is a later page,
    zeros elsewhere. A header before the start is flagged as continuation, its rem_len covering
    the gap, so a reader starting at the page finds the first record at `timeline_start_lsn`."""
    seg_start = timeline_start_lsn - timeline_start_lsn % wal_seg_size
    seg_offset = timeline_start_lsn - seg_start
    image = bytearray(seg_offset)
    if seg_offset == 0:
        return b""
    first_page_only = seg_offset < XLOG_BLCKSZ
    if first_page_only and seg_offset < SIZE_OF_XLOG_LONG_PHD:
        raise WalStorageError(f"timeline start {Lsn(timeline_start_lsn)} is inside a page header")
    long_rem = seg_offset - SIZE_OF_XLOG_LONG_PHD if first_page_only else 0
    long_hdr = page_header(
        seg_start,
        tli=pg_tli,
        info=XLP_FIRST_IS_CONTRECORD if long_rem else 0,
        rem_len=long_rem,
        sysid=sysid,
        seg_size=wal_seg_size,
    ).pack()
    image[: len(long_hdr)] = long_hdr[: len(image)]
    page_offset = timeline_start_lsn % XLOG_BLCKSZ
    if not first_page_only and page_offset:
        if page_offset < SIZE_OF_XLOG_SHORT_PHD:
            raise WalStorageError(f"timeline start {Lsn(timeline_start_lsn)} is inside a page header")
        page_lsn = timeline_start_lsn - page_offset
        short_hdr = page_header(
            page_lsn,
            tli=pg_tli,
            info=XLP_FIRST_IS_CONTRECORD,
            rem_len=page_offset - SIZE_OF_XLOG_SHORT_PHD,
            seg_size=wal_seg_size,
        ).pack()
        at = page_lsn - seg_start
        image[at : at + len(short_hdr)] = short_hdr
    return bytes(image)


class WalReader:
    """Reads stored WAL bytes for walsenders (spec §4.8). Stateless between calls and safe to use
    from several threads; each read opens the segment files it needs.

    * Below the first segment of `timeline_start_lsn`: `WalNotAvailable`.
    * In that segment but before `timeline_start_lsn`: synthesised bytes (needs `sysid`).
    * Otherwise, at or after `local_start_lsn`: the local segment (`.partial` first, then the
      complete name). A missing file, or a position before `local_start_lsn` (whose WAL would be
      in S3, read elsewhere): `WalNotAvailable`.

    The caller bounds reads by what the writer has flushed; bytes past it are zeros or stale.
    """

    def __init__(
        self,
        timeline_dir: str | os.PathLike[str],
        *,
        wal_seg_size: int,
        timeline_start_lsn: int,
        local_start_lsn: int,
        pg_tli: int = PG_TLI,
        sysid: int | None = None,
        recent: RecentWal | None = None,
    ) -> None:
        if local_start_lsn == 0:
            raise WalStorageError("timeline state uninitialized (local_start_lsn is 0), no WAL to read")
        self.timeline_dir = Path(timeline_dir)
        self.wal_seg_size = wal_seg_size
        self.timeline_start_lsn = Lsn(timeline_start_lsn)
        self.local_start_lsn = Lsn(local_start_lsn)
        self.pg_tli = pg_tli
        self.sysid = sysid
        self.recent = recent
        self._start_prefix: bytes | None = None

    def chunks_in_memory(
        self, start_lsn: int, end_lsn: int, max_size: int = MAX_SEND_SIZE
    ) -> list[tuple[Lsn, bytes]] | None:
        """What `chunks` would return, if the writer still holds all of it in memory; else None
        (then read the files, off the event loop)."""
        if self.recent is None or start_lsn < self.timeline_start_lsn or start_lsn < self.local_start_lsn:
            return None
        data = self.recent.read(start_lsn, end_lsn)
        if data is None:
            return None
        out: list[tuple[Lsn, bytes]] = []
        pos = start_lsn
        while pos < end_lsn:
            seg_end = pos - pos % self.wal_seg_size + self.wal_seg_size
            n = min(max_size, end_lsn - pos, seg_end - pos)
            out.append((Lsn(pos), data[pos - start_lsn : pos - start_lsn + n]))
            pos += n
        return out

    def read(self, start_lsn: int, end_lsn: int) -> bytes:
        """Exactly the bytes [start_lsn, end_lsn), across segment files."""
        return b"".join(chunk for _lsn, chunk in self.chunks(start_lsn, end_lsn))

    def chunks(self, start_lsn: int, end_lsn: int, max_size: int = MAX_SEND_SIZE) -> Iterator[tuple[Lsn, bytes]]:
        """(lsn, bytes) pieces of [start_lsn, end_lsn), at most `max_size` bytes each and never
        crossing a segment boundary (one XLogData message each)."""
        if end_lsn < start_lsn:
            raise ValueError(f"empty range end {Lsn(end_lsn)} < start {Lsn(start_lsn)}")
        pos = start_lsn
        while pos < end_lsn:
            seg_end = pos - pos % self.wal_seg_size + self.wal_seg_size
            limit = min(end_lsn, seg_end)
            if pos < self.timeline_start_lsn:
                limit = min(limit, self.timeline_start_lsn)
                data = self._synthesised(pos, limit)
                yield Lsn(pos), data
                pos = limit
                continue
            for lsn, data in self._read_segment(pos, limit, max_size):
                yield lsn, data
            pos = limit

    def _synthesised(self, start: int, end: int) -> bytes:
        first_seg_start = self.timeline_start_lsn - self.timeline_start_lsn % self.wal_seg_size
        if start < first_seg_start:
            raise WalNotAvailable(
                f"requested WAL is before the start of the timeline {self.timeline_start_lsn} "
                "and not in its first segment",
                start,
            )
        if self.sysid is None:
            raise WalNotAvailable(f"WAL before the timeline start {self.timeline_start_lsn} is not stored", start)
        if self._start_prefix is None:
            self._start_prefix = timeline_start_segment_prefix(
                self.timeline_start_lsn, sysid=self.sysid, wal_seg_size=self.wal_seg_size, pg_tli=self.pg_tli
            )
        return self._start_prefix[start - first_seg_start : end - first_seg_start]

    def _read_segment(self, start: int, end: int, max_size: int) -> Iterator[tuple[Lsn, bytes]]:
        segno, offset = divmod(start, self.wal_seg_size)
        name = wal_file_name(self.pg_tli, segno, self.wal_seg_size)
        if start < self.local_start_lsn:
            raise WalNotAvailable(
                f"WAL segment {name} is not found: WAL before local_start_lsn "
                f"{self.local_start_lsn} is not stored here",
                start,
            )
        fd = _open_for_read(self.timeline_dir, segno, self.wal_seg_size, self.pg_tli)
        if fd is None:
            raise WalNotAvailable(f"WAL segment {name} is not found (removed, or never written)", start)
        try:
            pos = start
            while pos < end:
                n = min(max_size, end - pos)
                yield Lsn(pos), _pread_exact(fd, n, offset + (pos - start), f"WAL segment {name}")
                pos += n
        finally:
            os.close(fd)
