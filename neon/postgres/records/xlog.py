"""XLOG (rmid 0) payloads: the CheckPoint struct and the small control records (spec §4.1).

FPI and FPI_FOR_HINT carry only block references (no main data) and NOOP carries nothing
meaningful, so `describe` returns None for them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from neon.postgres.errors import PayloadError

from ._reader import Buffer, cstr, fixed

# Opcodes: xl_info & 0xF0.
XLOG_CHECKPOINT_SHUTDOWN = 0x00
XLOG_CHECKPOINT_ONLINE = 0x10
XLOG_NOOP = 0x20
XLOG_NEXTOID = 0x30
XLOG_SWITCH = 0x40
XLOG_BACKUP_END = 0x50
XLOG_PARAMETER_CHANGE = 0x60
XLOG_RESTORE_POINT = 0x70
XLOG_FPW_CHANGE = 0x80
XLOG_END_OF_RECOVERY = 0x90
XLOG_FPI_FOR_HINT = 0xA0
XLOG_FPI = 0xB0
XLOG_OVERWRITE_CONTRECORD = 0xD0

# wal_level values stored in xl_parameter_change and pg_control.
WAL_LEVEL_MINIMAL = 0
WAL_LEVEL_REPLICA = 1
WAL_LEVEL_LOGICAL = 2

_CHECKPOINT = struct.Struct("<QII?7xQIIIIIII4xqIII4x")
CHECKPOINT_SIZE = _CHECKPOINT.size  # 88
_OID = struct.Struct("<I")
_LSN = struct.Struct("<Q")
_PARAMETER_CHANGE = struct.Struct("<iiiiii??2x")
_RESTORE_POINT = struct.Struct("<q64s")
_BOOL = struct.Struct("<B")
_END_OF_RECOVERY = struct.Struct("<qII")
_OVERWRITE_CONTRECORD = struct.Struct("<Qq")


@dataclass(frozen=True, slots=True)
class CheckPoint:
    """`CheckPoint` (catalog/pg_control.h): in checkpoint records and inside pg_control."""

    redo: int
    this_timeline_id: int
    prev_timeline_id: int
    full_page_writes: bool
    next_xid: int  # FullTransactionId: epoch << 32 | xid
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    time: int  # pg_time_t: Unix seconds
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    oldest_active_xid: int

    @classmethod
    def unpack(cls, data: Buffer) -> CheckPoint:
        """Parse exactly 88 bytes (a checkpoint record's main data)."""
        return cls(*fixed(data, _CHECKPOINT, "XLOG CHECKPOINT"))

    @classmethod
    def unpack_from(cls, buf: Buffer, off: int = 0) -> CheckPoint:
        """Parse the struct embedded at `off` in a larger buffer (pg_control)."""
        if off < 0 or len(buf) - off < CHECKPOINT_SIZE:
            raise PayloadError(f"CheckPoint: needs {CHECKPOINT_SIZE} bytes at offset {off}, buffer has {len(buf)}")
        return cls(*_CHECKPOINT.unpack_from(buf, off))

    def pack(self) -> bytes:
        """The 88 bytes with zero padding (the bytes are CRC-covered wherever they are stored)."""
        return _CHECKPOINT.pack(
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

    @property
    def next_xid_epoch(self) -> int:
        return self.next_xid >> 32

    @property
    def next_xid_xid(self) -> int:
        """The 32-bit part of nextXid, as pg_waldump prints after the epoch ("0:731")."""
        return self.next_xid & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class NextOid:
    next_oid: int

    @classmethod
    def unpack(cls, data: Buffer) -> NextOid:
        return cls(*fixed(data, _OID, "XLOG NEXTOID"))


@dataclass(frozen=True, slots=True)
class Switch:
    """XLOG_SWITCH: no payload; the rest of the segment is unused."""

    @classmethod
    def unpack(cls, data: Buffer) -> Switch:
        if len(data):
            raise PayloadError(f"XLOG SWITCH: expected no main data, got {len(data)} bytes")
        return cls()


@dataclass(frozen=True, slots=True)
class BackupEnd:
    start_lsn: int  # the backup's redo start

    @classmethod
    def unpack(cls, data: Buffer) -> BackupEnd:
        return cls(*fixed(data, _LSN, "XLOG BACKUP_END"))


@dataclass(frozen=True, slots=True)
class ParameterChange:
    """`xl_parameter_change`: the settings pg_control records, logged when they change."""

    max_connections: int
    max_worker_processes: int
    max_wal_senders: int
    max_prepared_xacts: int
    max_locks_per_xact: int
    wal_level: int
    wal_log_hints: bool
    track_commit_timestamp: bool

    @classmethod
    def unpack(cls, data: Buffer) -> ParameterChange:
        return cls(*fixed(data, _PARAMETER_CHANGE, "XLOG PARAMETER_CHANGE"))


@dataclass(frozen=True, slots=True)
class RestorePoint:
    rp_time: int  # TimestampTz
    rp_name: str

    @classmethod
    def unpack(cls, data: Buffer) -> RestorePoint:
        rp_time, raw = fixed(data, _RESTORE_POINT, "XLOG RESTORE_POINT")
        return cls(rp_time, cstr(raw.split(b"\0", 1)[0]))


@dataclass(frozen=True, slots=True)
class FpwChange:
    full_page_writes: bool

    @classmethod
    def unpack(cls, data: Buffer) -> FpwChange:
        (value,) = fixed(data, _BOOL, "XLOG FPW_CHANGE")
        return cls(value != 0)


@dataclass(frozen=True, slots=True)
class EndOfRecovery:
    end_time: int  # TimestampTz
    this_timeline_id: int
    prev_timeline_id: int

    @classmethod
    def unpack(cls, data: Buffer) -> EndOfRecovery:
        return cls(*fixed(data, _END_OF_RECOVERY, "XLOG END_OF_RECOVERY"))


@dataclass(frozen=True, slots=True)
class OverwriteContrecord:
    overwritten_lsn: int
    overwrite_time: int  # TimestampTz

    @classmethod
    def unpack(cls, data: Buffer) -> OverwriteContrecord:
        return cls(*fixed(data, _OVERWRITE_CONTRECORD, "XLOG OVERWRITE_CONTRECORD"))


XlogPayload = (
    CheckPoint
    | NextOid
    | Switch
    | BackupEnd
    | ParameterChange
    | RestorePoint
    | FpwChange
    | EndOfRecovery
    | OverwriteContrecord
)

_PARSERS = {
    XLOG_CHECKPOINT_SHUTDOWN: CheckPoint.unpack,
    XLOG_CHECKPOINT_ONLINE: CheckPoint.unpack,
    XLOG_NEXTOID: NextOid.unpack,
    XLOG_SWITCH: Switch.unpack,
    XLOG_BACKUP_END: BackupEnd.unpack,
    XLOG_PARAMETER_CHANGE: ParameterChange.unpack,
    XLOG_RESTORE_POINT: RestorePoint.unpack,
    XLOG_FPW_CHANGE: FpwChange.unpack,
    XLOG_END_OF_RECOVERY: EndOfRecovery.unpack,
    XLOG_OVERWRITE_CONTRECORD: OverwriteContrecord.unpack,
}


def describe(info: int, data: Buffer) -> XlogPayload | None:
    parser = _PARSERS.get(info & 0xF0)
    return parser(data) if parser else None
