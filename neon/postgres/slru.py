"""SLRU arithmetic (access/slru.h, clog.c, multixact.c; spec §7): pg_xact status bits, multixact
offsets and member groups, segment/page numbering and file names, and the wraparound-aware
comparisons that decide what truncation may delete.

Pages are 8192 raw bytes with no header; 32 pages form a segment file named `%04X`. Accessors
take a page as bytes (readers) or bytearray (writers) and raise `SlruError`, never IndexError.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from neon.postgres.constants import BLCKSZ, FIRST_NORMAL_TRANSACTION_ID, SLRU_PAGES_PER_SEGMENT
from neon.postgres.errors import PgFormatError

SLRU_PAGE_SIZE = BLCKSZ
_U32_MAX = 0xFFFFFFFF
_U32 = struct.Struct("<I")

# --- pg_xact (CLOG) ---------------------------------------------------------------------------
CLOG_BITS_PER_XACT = 2
CLOG_XACTS_PER_BYTE = 4
CLOG_XACTS_PER_PAGE = SLRU_PAGE_SIZE * CLOG_XACTS_PER_BYTE  # 32768
CLOG_XACT_BITMASK = (1 << CLOG_BITS_PER_XACT) - 1

# --- pg_multixact -----------------------------------------------------------------------------
MULTIXACT_OFFSETS_PER_PAGE = SLRU_PAGE_SIZE // 4  # 2048
MULTIXACT_MEMBERS_PER_MEMBERGROUP = 4
# 4 flag bytes then 4 xids.
MULTIXACT_MEMBERGROUP_SIZE = MULTIXACT_MEMBERS_PER_MEMBERGROUP * (1 + 4)  # 20
MULTIXACT_MEMBERGROUPS_PER_PAGE = SLRU_PAGE_SIZE // MULTIXACT_MEMBERGROUP_SIZE  # 409
MULTIXACT_MEMBERS_PER_PAGE = MULTIXACT_MEMBERGROUPS_PER_PAGE * MULTIXACT_MEMBERS_PER_MEMBERGROUP  # 1636
MAX_MULTIXACT_ID = _U32_MAX
MAX_MULTIXACT_OFFSET = _U32_MAX
# The members SLRU does not fill its last segment: the largest page holds offset 0xFFFFFFFF.
MAX_MEMBERS_PAGE = MAX_MULTIXACT_OFFSET // MULTIXACT_MEMBERS_PER_PAGE  # 2625285
MAX_MEMBERS_SEGMENT = MAX_MEMBERS_PAGE // SLRU_PAGES_PER_SEGMENT  # 82040 (file "14078")

INVALID_TRANSACTION_ID = 0
INVALID_MULTIXACT_ID = 0
FIRST_MULTIXACT_ID = 1


class SlruError(PgFormatError):
    """An SLRU page of the wrong size, or an id/offset/status outside its range."""


class XidStatus(enum.IntEnum):
    IN_PROGRESS = 0x00
    COMMITTED = 0x01
    ABORTED = 0x02
    SUB_COMMITTED = 0x03


class MultiXactStatus(enum.IntEnum):
    FOR_KEY_SHARE = 0
    FOR_SHARE = 1
    FOR_NO_KEY_UPDATE = 2
    FOR_UPDATE = 3
    NO_KEY_UPDATE = 4
    UPDATE = 5

    @property
    def is_update(self) -> bool:
        return self > MultiXactStatus.FOR_UPDATE


def _check_u32(what: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise SlruError(f"{what} {value} is not a 32-bit value")


def _check_page(page: bytes | bytearray | memoryview) -> None:
    if len(page) != SLRU_PAGE_SIZE:
        raise SlruError(f"SLRU page is {len(page)} bytes, expected {SLRU_PAGE_SIZE}")


# --- segments and file names ------------------------------------------------------------------
def segment_of_page(pageno: int) -> int:
    return pageno // SLRU_PAGES_PER_SEGMENT


def page_in_segment(pageno: int) -> int:
    return pageno % SLRU_PAGES_PER_SEGMENT


def page_offset_in_segment_file(pageno: int) -> int:
    return page_in_segment(pageno) * SLRU_PAGE_SIZE


def segment_file_name(segno: int) -> str:
    """At least 4 uppercase hex digits (members segments go up to 5: `14078`)."""
    if segno < 0:
        raise SlruError(f"negative SLRU segment number {segno}")
    return f"{segno:04X}"


def parse_segment_file_name(name: str) -> int:
    if not 4 <= len(name) <= 6 or any(c not in "0123456789ABCDEF" for c in name):
        raise SlruError(f"not an SLRU segment file name: {name!r}")
    return int(name, 16)


# --- pg_xact ----------------------------------------------------------------------------------
def clog_page(xid: int) -> int:
    _check_u32("xid", xid)
    return xid // CLOG_XACTS_PER_PAGE


def clog_segment(xid: int) -> int:
    return segment_of_page(clog_page(xid))


def clog_byte_offset(xid: int) -> int:
    """Byte of `xid`'s status within its page."""
    return (xid % CLOG_XACTS_PER_PAGE) // CLOG_XACTS_PER_BYTE


def clog_bit_shift(xid: int) -> int:
    return CLOG_BITS_PER_XACT * (xid % CLOG_XACTS_PER_BYTE)


def clog_get_status(page: bytes | bytearray | memoryview, xid: int) -> XidStatus:
    """Status of `xid` from the pg_xact page that holds it (page `clog_page(xid)`)."""
    _check_page(page)
    _check_u32("xid", xid)
    return XidStatus((page[clog_byte_offset(xid)] >> clog_bit_shift(xid)) & CLOG_XACT_BITMASK)


def clog_set_status(page: bytearray, xid: int, status: int) -> None:
    _check_page(page)
    _check_u32("xid", xid)
    if not 0 <= status <= CLOG_XACT_BITMASK:
        raise SlruError(f"invalid transaction status {status}")
    off = clog_byte_offset(xid)
    shift = clog_bit_shift(xid)
    page[off] = (page[off] & ~(CLOG_XACT_BITMASK << shift) & 0xFF) | (status << shift)


# --- pg_multixact/offsets ---------------------------------------------------------------------
def next_multixact_id(mxid: int) -> int:
    """The id after `mxid`; 0 is invalid, so the counter wraps from 0xFFFFFFFF to 1."""
    _check_u32("multixact id", mxid)
    nxt = (mxid + 1) & _U32_MAX
    return FIRST_MULTIXACT_ID if nxt < FIRST_MULTIXACT_ID else nxt


def previous_multixact_id(mxid: int) -> int:
    _check_u32("multixact id", mxid)
    return MAX_MULTIXACT_ID if mxid <= FIRST_MULTIXACT_ID else mxid - 1


def mxoff_page(mxid: int) -> int:
    """Page of pg_multixact/offsets holding `mxid`'s starting member offset."""
    _check_u32("multixact id", mxid)
    return mxid // MULTIXACT_OFFSETS_PER_PAGE


def mxoff_segment(mxid: int) -> int:
    return segment_of_page(mxoff_page(mxid))


def mxoff_entry_offset(mxid: int) -> int:
    """Byte offset of `mxid`'s entry within its offsets page."""
    return (mxid % MULTIXACT_OFFSETS_PER_PAGE) * 4


def get_multixact_offset(page: bytes | bytearray | memoryview, mxid: int) -> int:
    _check_page(page)
    _check_u32("multixact id", mxid)
    return _U32.unpack_from(page, mxoff_entry_offset(mxid))[0]


def set_multixact_offset(page: bytearray, mxid: int, offset: int) -> None:
    _check_page(page)
    _check_u32("multixact id", mxid)
    _check_u32("member offset", offset)
    _U32.pack_into(page, mxoff_entry_offset(mxid), offset)


# --- pg_multixact/members ---------------------------------------------------------------------
def member_page(offset: int) -> int:
    """Page of pg_multixact/members holding member `offset`."""
    _check_u32("member offset", offset)
    return offset // MULTIXACT_MEMBERS_PER_PAGE


def member_segment(offset: int) -> int:
    return segment_of_page(member_page(offset))


def member_group_offset(offset: int) -> int:
    """Byte offset of the member group (4 flag bytes + 4 xids) within its page."""
    return ((offset // MULTIXACT_MEMBERS_PER_MEMBERGROUP) % MULTIXACT_MEMBERGROUPS_PER_PAGE) * (
        MULTIXACT_MEMBERGROUP_SIZE
    )


def member_flag_offset(offset: int) -> int:
    """Byte holding member `offset`'s MultiXactStatus within its page."""
    return member_group_offset(offset) + offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP


def member_xid_offset(offset: int) -> int:
    """Byte offset of member `offset`'s xid within its page."""
    return (
        member_group_offset(offset)
        + MULTIXACT_MEMBERS_PER_MEMBERGROUP
        + 4 * (offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP)
    )


def get_member(page: bytes | bytearray | memoryview, offset: int) -> tuple[int, int]:
    """(xid, status) of member `offset` from its members page. The status is returned as stored
    (a MultiXactStatus value for members that were written; 0 for never-written slots)."""
    _check_page(page)
    _check_u32("member offset", offset)
    return _U32.unpack_from(page, member_xid_offset(offset))[0], page[member_flag_offset(offset)]


def set_member(page: bytearray, offset: int, xid: int, status: int) -> None:
    _check_page(page)
    _check_u32("member offset", offset)
    _check_u32("xid", xid)
    if not 0 <= status <= MultiXactStatus.UPDATE:
        raise SlruError(f"invalid multixact member status {status}")
    page[member_flag_offset(offset)] = status
    _U32.pack_into(page, member_xid_offset(offset), xid)


# --- wraparound-aware comparisons (spec §7.5) -------------------------------------------------
def _int32(v: int) -> int:
    v &= _U32_MAX
    return v - (1 << 32) if v & 0x80000000 else v


def transaction_id_is_normal(xid: int) -> bool:
    return xid >= FIRST_NORMAL_TRANSACTION_ID


def transaction_id_precedes(a: int, b: int) -> bool:
    """TransactionIdPrecedes: special xids (< 3) compare as unsigned, normal ones modulo 2^32."""
    if not transaction_id_is_normal(a) or not transaction_id_is_normal(b):
        return a < b
    return _int32(a - b) < 0


def transaction_id_precedes_or_equals(a: int, b: int) -> bool:
    if not transaction_id_is_normal(a) or not transaction_id_is_normal(b):
        return a <= b
    return _int32(a - b) <= 0


def transaction_id_follows(a: int, b: int) -> bool:
    return transaction_id_precedes(b, a)


def multixact_id_precedes(a: int, b: int) -> bool:
    return _int32(a - b) < 0


def multixact_id_precedes_or_equals(a: int, b: int) -> bool:
    return _int32(a - b) <= 0


def multixact_offset_precedes(a: int, b: int) -> bool:
    return _int32(a - b) < 0


def clog_page_precedes(page1: int, page2: int) -> bool:
    """CLOGPagePrecedes: compare near-start xids of both pages, so that a page is only "before"
    another when every xid on it is (the second test covers the far end of page2)."""
    x1 = (page1 * CLOG_XACTS_PER_PAGE + FIRST_NORMAL_TRANSACTION_ID + 1) & _U32_MAX
    x2 = (page2 * CLOG_XACTS_PER_PAGE + FIRST_NORMAL_TRANSACTION_ID + 1) & _U32_MAX
    return transaction_id_precedes(x1, x2) and transaction_id_precedes(x1, (x2 + CLOG_XACTS_PER_PAGE - 1) & _U32_MAX)


def multixact_offset_page_precedes(page1: int, page2: int) -> bool:
    """MultiXactOffsetPagePrecedes, the same construction over multixact ids."""
    m1 = (page1 * MULTIXACT_OFFSETS_PER_PAGE + FIRST_MULTIXACT_ID + 1) & _U32_MAX
    m2 = (page2 * MULTIXACT_OFFSETS_PER_PAGE + FIRST_MULTIXACT_ID + 1) & _U32_MAX
    return multixact_id_precedes(m1, m2) and multixact_id_precedes(m1, (m2 + MULTIXACT_OFFSETS_PER_PAGE - 1) & _U32_MAX)


def slru_may_delete_segment(
    segno: int, cutoff_page: int, page_precedes: Callable[[int, int], bool] = clog_page_precedes
) -> bool:
    """A truncation to `cutoff_page` may delete segment `segno` iff its first and last pages both
    precede the cutoff."""
    first = segno * SLRU_PAGES_PER_SEGMENT
    last = first + SLRU_PAGES_PER_SEGMENT - 1
    return page_precedes(first, cutoff_page) and page_precedes(last, cutoff_page)


def clog_segments_to_delete(segments: list[int], oldest_xact_page: int) -> list[int]:
    """Of the existing pg_xact `segments`, those a CLOG_TRUNCATE to `oldest_xact_page` removes."""
    return [s for s in segments if slru_may_delete_segment(s, oldest_xact_page, clog_page_precedes)]


def multixact_offset_segments_to_delete(segments: list[int], end_trunc_off: int) -> list[int]:
    """Offsets segments a MULTIXACT_TRUNCATE_ID with `endTruncOff` removes: those entirely before
    the page of the multixact preceding `endTruncOff` (spec §4.6)."""
    cutoff = mxoff_page(previous_multixact_id(end_trunc_off))
    return [s for s in segments if slru_may_delete_segment(s, cutoff, multixact_offset_page_precedes)]


def member_segments_to_delete(start_trunc_memb: int, end_trunc_memb: int) -> list[int]:
    """Members segments a MULTIXACT_TRUNCATE_ID removes: from the segment of `startTruncMemb` up
    to, not including, the segment of `endTruncMemb`, wrapping after the last segment to 0."""
    seg = member_segment(start_trunc_memb)
    end = member_segment(end_trunc_memb)
    out: list[int] = []
    while seg != end:
        out.append(seg)
        seg = 0 if seg == MAX_MEMBERS_SEGMENT else seg + 1
    return out
