"""`WalStreamDecoder`: turns a WAL byte stream, fed in arbitrary chunks, into complete records.

It validates every page header it crosses, reassembles records split across pages and segments,
follows XLOG_SWITCH to the next segment, handles OVERWRITE_CONTRECORD, and checks each record's
length, rmgr, prev-link and CRC (spec §1.3-§1.9, §2). The end of valid WAL is found by those
checks, never by looking for zeros: the first failure raises `WalDecodeError` with its LSN, and
the decoder stays failed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from neon.postgres.constants import (
    DEFAULT_WAL_SEGMENT_SIZE,
    RM_XLOG_ID,
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_RECORD,
    SIZE_OF_XLOG_SHORT_PHD,
    XLOG_BLCKSZ,
    XLOG_PAGE_MAGIC,
    XLP_ALL_FLAGS,
    XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
    XLP_LONG_HEADER,
    rmid_is_valid,
)
from neon.postgres.crc32c import crc32c
from neon.postgres.errors import WalDecodeError
from neon.utils.lsn import Lsn

try:
    if os.environ.get("NEON_NO_NATIVE"):
        raise ImportError("native code disabled by NEON_NO_NATIVE")
    from neon._walnative import ffi as _ffi  # type: ignore[import-not-found]
    from neon._walnative import lib as _lib  # type: ignore[import-not-found]
except ImportError:
    _ffi = _lib = None

NATIVE = _lib is not None
_NATIVE_BATCH = 1024

# A decoded record: (start LSN, end LSN, the reassembled record bytes).
WalRecordBytes = tuple[int, int, bytes]

_XLOG_SWITCH = 0x40
# Postgres refuses records beyond its palloc limit; anything larger is garbage.
MAX_RECORD_LENGTH = 0x3FFFFFFF

_u32 = struct.Struct("<I").unpack_from
_short_hdr = struct.Struct("<HHIQI").unpack_from
_long_tail = struct.Struct("<QII").unpack_from
_rec_hdr = struct.Struct("<IIQBB").unpack_from


class WalStreamDecoder:
    """Decode WAL starting at `lsn`.

    `lsn` is where the first fed byte belongs. It is either a record start, or a page boundary:
    then if that page begins with the tail of an earlier record, the tail is skipped (spec §1.6)
    and its first record's prev-link cannot be checked. Pass `prev_lsn` (the start of the record
    before `lsn`) to check the first record's `xl_prev` exactly.
    """

    def __init__(
        self,
        lsn: int,
        *,
        seg_size: int = DEFAULT_WAL_SEGMENT_SIZE,
        sysid: int | None = None,
        prev_lsn: int | None = None,
        source: str | None = None,
        native: bool | None = None,
    ) -> None:
        """`native`: use the C fast path (default: when it is built)."""
        if lsn % 8:
            raise WalDecodeError("start position is not 8-byte aligned", lsn, source)
        self.seg_size = seg_size
        self.sysid = sysid
        self.source = source
        self._buf = bytearray()
        self._off = 0  # index in _buf of the byte at self.pos
        self.pos = lsn  # LSN of the next unprocessed byte
        self.prev_lsn = prev_lsn  # start of the last record returned (expected xl_prev)
        self._tli = 0
        self._page_room = 0 if lsn % XLOG_BLCKSZ == 0 else XLOG_BLCKSZ - lsn % XLOG_BLCKSZ
        # A page header at the start may carry a continuation we must skip (first page only).
        self._may_skip_contrecord = lsn % XLOG_BLCKSZ == 0
        self._skip = 0  # bytes of a foreign record tail still to skip
        # Bytes up to this LSN are not records: alignment padding, or a segment's tail after
        # XLOG_SWITCH (zeros in PG15, page headers included: never validated).
        self._discard_to: int | None = None
        # Reassembly of a record that spans pages.
        self._partial: bytearray | None = None
        self._partial_start = 0
        self._partial_total = 0
        self._error: WalDecodeError | None = None
        self._native = _lib is not None and native is not False
        if native and _lib is None:
            raise RuntimeError("the native WAL scanner is not built (run make setup)")
        if self._native:
            self._nstate = _ffi.new("wal_scan_state *")
            self._nout = _ffi.new("uint64_t[]", 4 * _NATIVE_BATCH)

    # --- input -----------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def in_record(self) -> bool:
        """True while a record that spans pages is only partly received."""
        return self._partial is not None

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._off

    def _fail(self, msg: str, lsn: int) -> WalDecodeError:
        self._error = WalDecodeError(msg, lsn, self.source)
        return self._error

    # --- output ----------------------------------------------------------------------------
    def poll(self) -> WalRecordBytes | None:
        """The next complete record, or None if more input is needed."""
        for batch in self._drain(1):
            return batch[0]
        return None

    def records(self) -> Iterator[WalRecordBytes]:
        """Every record completed by the input fed so far."""
        for batch in self._drain(-1):
            yield from batch

    def record_batches(self) -> Iterator[list[WalRecordBytes]]:
        """The same records as `records`, in lists (as the C scanner produces them): for consumers
        that handle records in batches and would otherwise pay a generator step per record."""
        return self._drain(-1)

    def _drain(self, limit: int) -> Iterator[list[WalRecordBytes]]:
        if self._error is not None:
            raise self._error
        try:
            yield from self._decode(limit)
        finally:
            if self._off > 1 << 20 or self._off == len(self._buf):
                del self._buf[: self._off]
                self._off = 0

    def _read_page_header(self) -> bool:
        """At a page boundary: validate its header. False if not enough input yet."""
        buf, off, pos = self._buf, self._off, self.pos
        is_seg_start = pos % self.seg_size == 0
        hdr_size = SIZE_OF_XLOG_LONG_PHD if is_seg_start else SIZE_OF_XLOG_SHORT_PHD
        if len(buf) - off < hdr_size:
            return False
        magic, info, tli, pageaddr, rem_len = _short_hdr(buf, off)
        if magic != XLOG_PAGE_MAGIC:
            raise self._fail(f"invalid magic number {magic:04X} in WAL page", pos)
        if info & ~XLP_ALL_FLAGS:
            raise self._fail(f"invalid info bits {info:04X} in WAL page", pos)
        if pageaddr != pos:
            raise self._fail(f"unexpected pageaddr {Lsn(pageaddr)} in WAL page", pos)
        if is_seg_start:
            if not info & XLP_LONG_HEADER:
                raise self._fail("WAL segment's first page lacks a long header", pos)
            sysid, seg_size, blcksz = _long_tail(buf, off + SIZE_OF_XLOG_SHORT_PHD)
            if self.sysid is None:
                self.sysid = sysid
            elif sysid != self.sysid:
                raise self._fail(f"WAL file is from different database system (sysid {sysid})", pos)
            if seg_size != self.seg_size:
                raise self._fail(f"WAL segment size {seg_size} in page header, expected {self.seg_size}", pos)
            if blcksz != XLOG_BLCKSZ:
                raise self._fail(f"WAL block size {blcksz} in page header, expected {XLOG_BLCKSZ}", pos)
        elif info & XLP_LONG_HEADER:
            raise self._fail("long WAL page header in the middle of a segment", pos)
        if tli < self._tli:
            raise self._fail(f"out-of-sequence timeline ID {tli} (after {self._tli}) in WAL page", pos)
        self._tli = tli

        if self._partial is not None:
            outstanding = self._partial_total - len(self._partial)
            if info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
                # The record in progress was lost in a crash; the page starts afresh.
                self._partial = None
            elif not info & XLP_FIRST_IS_CONTRECORD:
                raise self._fail(f"there is no contrecord flag (record at {Lsn(self._partial_start)})", pos)
            elif rem_len != outstanding:
                raise self._fail(
                    f"invalid contrecord length {rem_len} (expected {outstanding}) "
                    f"for record at {Lsn(self._partial_start)}",
                    pos,
                )
        elif self._skip:
            if not info & XLP_FIRST_IS_CONTRECORD or rem_len != self._skip:
                raise self._fail("continuation of skipped record does not match", pos)
        elif info & XLP_FIRST_IS_CONTRECORD:
            if not self._may_skip_contrecord or rem_len == 0:
                raise self._fail("contrecord is requested but the reader is at a record boundary", pos)
            self._skip = rem_len
        self._may_skip_contrecord = False
        self._off = off + hdr_size
        self.pos = pos + hdr_size
        self._page_room = XLOG_BLCKSZ - hdr_size
        return True

    def _decode(self, limit: int) -> Iterator[list[WalRecordBytes]]:
        while limit:
            buf = self._buf
            avail = len(buf) - self._off
            if self._discard_to is not None:
                gap = self._discard_to - self.pos
                n = min(gap, avail)
                self._off += n
                self.pos += n
                if n < gap:
                    return
                self._discard_to = None
                self._page_room = -self.pos % XLOG_BLCKSZ
                continue
            if self._page_room == 0:
                if not self._read_page_header():
                    return
                continue
            if self._skip:
                n = min(self._skip, self._page_room, avail)
                if n == 0:
                    return
                self._consume(n)
                self._skip -= n
                if self._skip == 0 and self.pos % 8:
                    self._discard_to = (self.pos + 7) & ~7
                continue
            if self._partial is not None:
                n = min(self._partial_total - len(self._partial), self._page_room, avail)
                if n == 0:
                    return
                off = self._off
                self._partial += buf[off : off + n]
                self._consume(n)
                if len(self._partial) >= SIZE_OF_XLOG_RECORD and len(self._partial) - n < SIZE_OF_XLOG_RECORD:
                    self._check_header(self._partial, 0, self._partial_start)
                if len(self._partial) == self._partial_total:
                    rec = bytes(self._partial)
                    self._partial = None
                    yield [self._finish(rec, self._partial_start)]
                    limit -= 1
                continue

            # At a record boundary.
            if self._native and limit != 1 and not self._may_skip_contrecord:
                got = self._native_scan(_NATIVE_BATCH if limit < 0 else min(limit, _NATIVE_BATCH))
                if got:
                    yield got
                    limit -= len(got)
                    continue
                buf = self._buf
                avail = len(buf) - self._off
                if self._page_room == 0:
                    continue
            if avail < 4:
                return
            off = self._off
            start = self.pos
            tot_len = _u32(buf, off)[0]
            if tot_len < SIZE_OF_XLOG_RECORD:
                raise self._fail(f"invalid record length: expected at least 24, got {tot_len}", start)
            if tot_len > MAX_RECORD_LENGTH:
                raise self._fail(f"record length {tot_len} is too large", start)
            room = self._page_room
            if tot_len <= room:
                # Fast path: the record lies on this page.
                if avail < tot_len:
                    if avail >= SIZE_OF_XLOG_RECORD:
                        self._check_header(buf, off, start)
                    return
                self._check_header(buf, off, start)
                rec = bytes(buf[off : off + tot_len])
                self._consume(tot_len)
                yield [self._finish(rec, start)]
                limit -= 1
            else:
                n = min(room, avail)
                if n >= SIZE_OF_XLOG_RECORD:
                    self._check_header(buf, off, start)
                self._partial = bytearray(buf[off : off + n])
                self._partial_start = start
                self._partial_total = tot_len
                self._consume(n)

    def _native_scan(self, max_out: int) -> list[WalRecordBytes]:
        """Records the C fast path validates in one go (see native/walscan.c)."""
        st = self._nstate
        st.pos = self.pos
        st.prev = self.prev_lsn or 0
        st.prev_known = self.prev_lsn is not None
        st.off = self._off
        st.page_room = self._page_room
        st.tli = self._tli
        cbuf = _ffi.from_buffer(self._buf)
        try:
            n = _lib.wal_scan(cbuf, len(self._buf), self.seg_size, st, self._nout, max_out)
        finally:
            _ffi.release(cbuf)
        self.pos = st.pos
        self._off = st.off
        self._page_room = st.page_room
        self._tli = st.tli
        if not n:
            return []
        self.prev_lsn = st.prev
        vals = _ffi.unpack(self._nout, 4 * n)
        buf = self._buf
        return [(vals[i], vals[i + 3], bytes(buf[vals[i + 1] : vals[i + 1] + vals[i + 2]])) for i in range(0, 4 * n, 4)]

    def _consume(self, n: int) -> None:
        self._off += n
        self.pos += n
        self._page_room -= n

    def _check_header(self, buf: bytes | bytearray, off: int, start: int) -> None:
        _tot_len, _xid, prev, _info, rmid = _rec_hdr(buf, off)
        if not rmid_is_valid(rmid):
            raise self._fail(f"invalid resource manager ID {rmid}", start)
        if self.prev_lsn is None:
            if prev >= start:
                raise self._fail(f"record with incorrect prev-link {Lsn(prev)}", start)
        elif prev != self.prev_lsn:
            raise self._fail(f"record with incorrect prev-link {Lsn(prev)} (expected {Lsn(self.prev_lsn)})", start)

    def _finish(self, rec: bytes, start: int) -> WalRecordBytes:
        view = memoryview(rec)
        if crc32c(view[0:20], crc32c(view[24:])) != _u32(rec, 20)[0]:
            raise self._fail("incorrect resource manager data checksum in record", start)
        self.prev_lsn = start
        end = self.pos
        if rec[17] == RM_XLOG_ID and rec[16] & 0xF0 == _XLOG_SWITCH:
            # The switch record logically fills the rest of its segment.
            end += -end % self.seg_size
            self._discard_to = end
        elif end % 8:
            end = (end + 7) & ~7
            if len(self._buf) - self._off >= end - self.pos:
                self._consume(end - self.pos)
            else:
                self._discard_to = end
        return start, end, rec
