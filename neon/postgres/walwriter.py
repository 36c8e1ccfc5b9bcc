"""Lays complete records out as WAL pages, with the headers and continuation flags Postgres writes.

Used to synthesize WAL (the shutdown checkpoint of a basebackup) and to craft WAL in tests.
"""

from __future__ import annotations

from neon.postgres.constants import (
    DEFAULT_WAL_SEGMENT_SIZE,
    XLOG_BLCKSZ,
    XLP_BKP_REMOVABLE,
    XLP_FIRST_IS_CONTRECORD,
    maxalign,
)
from neon.postgres.walformat import page_header, page_header_size, skip_page_header


class WalWriter:
    """Accumulates WAL bytes from `start` on. Pages are only materialised where written.

    If `start` is mid-page, that page gets a header whose CONTRECORD/rem_len cover the gap
    between the header and `start`, so a reader starting at the page boundary finds `start`.
    """

    def __init__(
        self,
        start: int,
        *,
        sysid: int,
        tli: int = 1,
        seg_size: int = DEFAULT_WAL_SEGMENT_SIZE,
        page_info: int = XLP_BKP_REMOVABLE,
    ) -> None:
        if start % 8:
            raise ValueError(f"WAL position {start:X} is not 8-aligned")
        self.sysid = sysid
        self.tli = tli
        self.seg_size = seg_size
        self.page_info = page_info
        self.start = start - start % XLOG_BLCKSZ  # first byte of the buffer
        self.buf = bytearray()
        # Page headers are written lazily, when a record is placed on the page.
        self.pos = start
        if start % XLOG_BLCKSZ:
            page = self.start
            gap = start - (page + page_header_size(page, seg_size))
            if gap < 0:
                raise ValueError(f"WAL position {start:X} is inside a page header")
            info = self.page_info | (XLP_FIRST_IS_CONTRECORD if gap else 0)
            self._write_page_header(page, info, gap)
        self.prev_record = 0

    def _write_page_header(self, page: int, info: int, rem_len: int) -> None:
        hdr = page_header(
            page, tli=self.tli, info=info, rem_len=rem_len, sysid=self.sysid, seg_size=self.seg_size
        ).pack()
        self._put(page, hdr)

    def _put(self, lsn: int, data: bytes) -> None:
        off = lsn - self.start
        end = off + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[off:end] = data

    def append(self, record: bytes) -> tuple[int, int]:
        """Write one complete record at the current position; returns (start LSN, end LSN)."""
        if self.pos % XLOG_BLCKSZ == 0:
            self._write_page_header(self.pos, self.page_info, 0)
            self.pos += page_header_size(self.pos, self.seg_size)
        start = self.pos
        remaining = memoryview(record)
        pos = start
        while True:
            room = XLOG_BLCKSZ - pos % XLOG_BLCKSZ
            chunk = remaining[:room]
            self._put(pos, bytes(chunk))
            pos += len(chunk)
            remaining = remaining[len(chunk) :]
            if not remaining:
                break
            # pos is now a page boundary: the record continues after the next page's header.
            self._write_page_header(pos, self.page_info | XLP_FIRST_IS_CONTRECORD, len(remaining))
            pos += page_header_size(pos, self.seg_size)
        end = maxalign(pos)
        self.pos = end
        self.prev_record = start
        return start, end

    @property
    def end(self) -> int:
        """End LSN of the last record (the next one starts past a page header if this is a boundary)."""
        return self.pos

    @property
    def next_record_start(self) -> int:
        return skip_page_header(self.pos, self.seg_size)

    def bytes_from(self, lsn: int) -> bytes:
        return bytes(self.buf[lsn - self.start :])

    def segments(self) -> dict[int, bytes]:
        """Full-size segment images (zero-filled) of every segment this writer touched."""
        out: dict[int, bytes] = {}
        first = self.start // self.seg_size
        last = (self.start + len(self.buf) - 1) // self.seg_size
        for segno in range(first, last + 1):
            seg = bytearray(self.seg_size)
            seg_start = segno * self.seg_size
            lo = max(seg_start, self.start)
            hi = min(seg_start + self.seg_size, self.start + len(self.buf))
            seg[lo - seg_start : hi - seg_start] = self.buf[lo - self.start : hi - self.start]
            out[segno] = bytes(seg)
        return out
