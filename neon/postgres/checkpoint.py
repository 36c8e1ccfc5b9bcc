"""The `CheckPoint` struct (catalog/pg_control.h; spec §4.1), shared by checkpoint records and pg_control.

This module owns its 88-byte layout and nothing else: building checkpoint records and keeping the
values current while ingesting WAL live elsewhere (`synth`, the pageserver's ingest).
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from neon.postgres.errors import PgFormatError

# Padding at 17-23, 60-63 and 84-87; Postgres writes it as zero and it is covered by CRCs.
CHECKPOINT_STRUCT = struct.Struct("<QII?7xQIIIIIII4xqIII4x")
SIZE_OF_CHECKPOINT = CHECKPOINT_STRUCT.size  # 88

# xl_info opcodes of the two checkpoint record kinds (rmgr XLOG).
XLOG_CHECKPOINT_SHUTDOWN = 0x00
XLOG_CHECKPOINT_ONLINE = 0x10


class CheckPointFormatError(PgFormatError):
    """Bytes that are not an 88-byte CheckPoint, or field values that do not fit its layout."""


@dataclass(frozen=True, slots=True)
class CheckPoint:
    redo: int
    """REDO start LSN; equals the record's own LSN for a shutdown checkpoint."""
    this_timeline_id: int
    prev_timeline_id: int
    full_page_writes: bool
    next_xid: int
    """FullTransactionId: (epoch << 32) | xid of the next xid to assign."""
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    time: int
    """pg_time_t: seconds since the Unix epoch (not a TimestampTz)."""
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    oldest_active_xid: int

    @classmethod
    def initial(cls, redo: int, *, time: int = 0) -> CheckPoint:
        """The checkpoint of a freshly bootstrapped cluster (what initdb's first checkpoint holds)."""
        return cls(
            redo=redo,
            this_timeline_id=1,
            prev_timeline_id=1,
            full_page_writes=True,
            next_xid=3,
            next_oid=10000,
            next_multi=1,
            next_multi_offset=0,
            oldest_xid=3,
            oldest_xid_db=1,
            oldest_multi=1,
            oldest_multi_db=1,
            time=time,
            oldest_commit_ts_xid=0,
            newest_commit_ts_xid=0,
            oldest_active_xid=0,
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> CheckPoint:
        if offset < 0 or len(buf) - offset < SIZE_OF_CHECKPOINT:
            raise CheckPointFormatError(f"CheckPoint needs {SIZE_OF_CHECKPOINT} bytes, got {max(len(buf) - offset, 0)}")
        return cls(*CHECKPOINT_STRUCT.unpack_from(buf, offset))

    def pack(self) -> bytes:
        try:
            return CHECKPOINT_STRUCT.pack(
                self.redo,
                self.this_timeline_id,
                self.prev_timeline_id,
                self.full_page_writes,
                self.next_xid,
                self.next_oid,
                self.next_multi,
                self.next_multi_offset,
                self.oldest_xid,
                self.oldest_xid_db,
                self.oldest_multi,
                self.oldest_multi_db,
                self.time,
                self.oldest_commit_ts_xid,
                self.newest_commit_ts_xid,
                self.oldest_active_xid,
            )
        except struct.error as e:
            raise CheckPointFormatError(f"CheckPoint field out of range: {e} ({self!r})") from None

    def replace(self, **changes: object) -> CheckPoint:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def next_xid_epoch(self) -> int:
        return self.next_xid >> 32

    @property
    def next_xid_xid(self) -> int:
        """The 32-bit TransactionId part of `next_xid` (what pg_controldata prints after the colon)."""
        return self.next_xid & 0xFFFFFFFF
