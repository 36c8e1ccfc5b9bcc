"""Neon's own record kinds, applied in Python to an existing page (spec pageserver §3.3).

They never initialise a page and never change its LSN. A CLOG page may carry an 8-byte
big-endian trailer: the commit timestamp of the last ClogSetCommitted applied to it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from neon.postgres import slru
from neon.postgres.constants import BLCKSZ, VISIBILITYMAP_FORKNUM
from neon.postgres.errors import PgFormatError
from neon.postgres.page import vm_block, vm_clear_bits
from neon.walredo.records import (
    BufferTag,
    ClearVisibilityMapFlags,
    ClogSetAborted,
    ClogSetCommitted,
    MultixactMembersCreate,
    MultixactOffsetCreate,
    RedoTarget,
    SlruKind,
    SlruPage,
    WalRecord,
)

CLOG_PAGE_WITH_TIMESTAMP = BLCKSZ + 8
_TS = struct.Struct(">q")


class NeonRedoError(ValueError):
    pass


def apply_batch(target: RedoTarget, image: bytes, records: Sequence[tuple[int, WalRecord]]) -> bytes:
    """Apply a run of Neon records to `image`; returns the new page (or CLOG page + trailer)."""
    page = bytearray(image)
    for lsn, rec in records:
        try:
            page = apply_record(target, page, rec)
        except PgFormatError as e:
            raise NeonRedoError(f"applying {type(rec).__name__} at {lsn:X} to {target}: {e}") from None
    return bytes(page)


def apply_record(target: RedoTarget, page: bytearray, rec: WalRecord) -> bytearray:
    if isinstance(rec, ClearVisibilityMapFlags):
        if not isinstance(target, BufferTag) or target.fork != VISIBILITYMAP_FORKNUM:
            raise NeonRedoError(f"ClearVisibilityMapFlags applied to {target}, not a visibility map page")
        _check_len(page, BLCKSZ, target)
        for heap_blk in (rec.new_heap_blkno, rec.old_heap_blkno):
            if heap_blk is None:
                continue
            if vm_block(heap_blk) != target.blk:
                raise NeonRedoError(f"heap block {heap_blk} is not covered by VM block {target.blk}")
            vm_clear_bits(page, heap_blk, rec.flags)
        return page
    if isinstance(rec, ClogSetCommitted | ClogSetAborted):
        _check_slru(target, SlruKind.CLOG)
        assert isinstance(target, SlruPage)
        if len(page) not in (BLCKSZ, CLOG_PAGE_WITH_TIMESTAMP):
            raise NeonRedoError(f"CLOG page for {target} is {len(page)} bytes")
        body = page[:BLCKSZ]
        status = slru.XidStatus.COMMITTED if isinstance(rec, ClogSetCommitted) else slru.XidStatus.ABORTED
        for xid in rec.xids:
            pageno = slru.clog_page(xid)
            if slru.segment_of_page(pageno) != target.segno or slru.page_in_segment(pageno) != target.blk:
                raise NeonRedoError(f"xid {xid} does not belong to {target}")
            slru.clog_set_status(body, xid, status)
        if isinstance(rec, ClogSetCommitted):
            return body + _TS.pack(rec.timestamp)
        return body + page[BLCKSZ:]
    if isinstance(rec, MultixactOffsetCreate):
        _check_slru(target, SlruKind.MULTIXACT_OFFSETS)
        _check_len(page, BLCKSZ, target)
        slru.set_multixact_offset(page, rec.mid, rec.moff)
        return page
    if isinstance(rec, MultixactMembersCreate):
        _check_slru(target, SlruKind.MULTIXACT_MEMBERS)
        _check_len(page, BLCKSZ, target)
        for i, (xid, status) in enumerate(rec.members):
            slru.set_member(page, (rec.moff + i) & 0xFFFFFFFF, xid, status)
        return page
    raise NeonRedoError(f"tried to pass a {type(rec).__name__} to neon WAL redo")


def _check_slru(target: RedoTarget, kind: SlruKind) -> None:
    if not isinstance(target, SlruPage) or target.kind is not kind:
        raise NeonRedoError(f"{kind.value} record applied to {target}")


def _check_len(page: bytearray, n: int, target: RedoTarget) -> None:
    if len(page) != n:
        raise NeonRedoError(f"page for {target} is {len(page)} bytes, expected {n}")
