"""WAL page headers, the XLogRecord header, and WAL file names (spec §1.2, §1.3, §2)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from neon.postgres.constants import (
    DEFAULT_WAL_SEGMENT_SIZE,
    SIZE_OF_XLOG_LONG_PHD,
    SIZE_OF_XLOG_RECORD,
    SIZE_OF_XLOG_SHORT_PHD,
    XLOG_BLCKSZ,
    XLOG_PAGE_MAGIC,
    XLP_LONG_HEADER,
    XLR_BLOCK_ID_DATA_LONG,
    XLR_BLOCK_ID_DATA_SHORT,
)
from neon.postgres.crc32c import crc32c

SHORT_PHD = struct.Struct("<HHIQI4x")
LONG_PHD_TAIL = struct.Struct("<QII")
RECORD_HEADER = struct.Struct("<IIQBB2xI")


@dataclass(frozen=True, slots=True)
class XLogPageHeader:
    magic: int
    info: int
    tli: int
    pageaddr: int
    rem_len: int
    # Long header only (first page of a segment).
    sysid: int | None = None
    seg_size: int | None = None
    xlog_blcksz: int | None = None

    @property
    def is_long(self) -> bool:
        return bool(self.info & XLP_LONG_HEADER)

    @property
    def size(self) -> int:
        return SIZE_OF_XLOG_LONG_PHD if self.is_long else SIZE_OF_XLOG_SHORT_PHD

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> XLogPageHeader:
        magic, info, tli, pageaddr, rem_len = SHORT_PHD.unpack_from(buf, offset)
        if info & XLP_LONG_HEADER and len(buf) - offset >= SIZE_OF_XLOG_LONG_PHD:
            sysid, seg_size, blcksz = LONG_PHD_TAIL.unpack_from(buf, offset + SIZE_OF_XLOG_SHORT_PHD)
            return cls(magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz)
        return cls(magic, info, tli, pageaddr, rem_len)

    def pack(self) -> bytes:
        short = SHORT_PHD.pack(self.magic, self.info, self.tli, self.pageaddr, self.rem_len)
        if not self.is_long:
            return short
        return short + LONG_PHD_TAIL.pack(self.sysid or 0, self.seg_size or 0, self.xlog_blcksz or 0)


def page_header(
    pageaddr: int,
    *,
    tli: int,
    info: int,
    rem_len: int = 0,
    sysid: int = 0,
    seg_size: int = DEFAULT_WAL_SEGMENT_SIZE,
) -> XLogPageHeader:
    """The header Postgres writes at `pageaddr` (long on the first page of a segment)."""
    if pageaddr % seg_size == 0:
        return XLogPageHeader(
            XLOG_PAGE_MAGIC, info | XLP_LONG_HEADER, tli, pageaddr, rem_len, sysid, seg_size, XLOG_BLCKSZ
        )
    return XLogPageHeader(XLOG_PAGE_MAGIC, info & ~XLP_LONG_HEADER, tli, pageaddr, rem_len)


def page_header_size(lsn: int, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
    return SIZE_OF_XLOG_LONG_PHD if lsn % seg_size == 0 else SIZE_OF_XLOG_SHORT_PHD


def skip_page_header(lsn: int, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
    """A record never starts inside a page header: move a page-boundary LSN past it."""
    if lsn % XLOG_BLCKSZ == 0:
        return lsn + page_header_size(lsn, seg_size)
    return lsn


@dataclass(frozen=True, slots=True)
class XLogRecordHeader:
    tot_len: int
    xid: int
    prev: int
    info: int
    rmid: int
    crc: int

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> XLogRecordHeader:
        return cls(*RECORD_HEADER.unpack_from(buf, offset))


def encode_record(*, xid: int, prev: int, info: int, rmid: int, main_data: bytes = b"") -> bytes:
    """A complete XLogRecord with only main data (no block references), CRC included."""
    if not main_data:
        body = b""
    elif len(main_data) < 256:
        body = bytes((XLR_BLOCK_ID_DATA_SHORT, len(main_data))) + main_data
    else:
        body = struct.pack("<BI", XLR_BLOCK_ID_DATA_LONG, len(main_data)) + main_data
    return finish_record(xid=xid, prev=prev, info=info, rmid=rmid, body=body)


def finish_record(*, xid: int, prev: int, info: int, rmid: int, body: bytes) -> bytes:
    """Prefix an encoded record body with its header and compute xl_crc."""
    tot_len = SIZE_OF_XLOG_RECORD + len(body)
    head = RECORD_HEADER.pack(tot_len, xid, prev, info, rmid, 0)[:20]
    crc = crc32c(head, crc32c(body))
    return head + struct.pack("<I", crc) + body


_WAL_NAME = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")


def wal_file_name(tli: int, segno: int, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> str:
    per_id = 0x100000000 // seg_size
    return f"{tli:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_wal_file_name(name: str, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> tuple[int, int]:
    """(timeline, segment number) of a WAL segment file name (optionally `.partial`)."""
    m = _WAL_NAME.match(name)
    if not m:
        raise ValueError(f"not a WAL segment file name: {name!r}")
    per_id = 0x100000000 // seg_size
    return int(m.group(1), 16), int(m.group(2), 16) * per_id + int(m.group(3), 16)
