"""XLOG (rmid 0) payloads: checkpoints (the struct lives in `neon.postgres.checkpoint`) and the small
control records (spec §4.1).

FPI and FPI_FOR_HINT carry only block references (no main data) and NOOP carries nothing
meaningful, so `describe` returns None for them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from neon.postgres.checkpoint import (
    SIZE_OF_CHECKPOINT,
    XLOG_CHECKPOINT_ONLINE,
    XLOG_CHECKPOINT_SHUTDOWN,
    CheckPoint,
)
from neon.postgres.errors import PayloadError

from ._reader import Buffer, cstr, fixed

# Opcodes: xl_info & 0xF0.
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

CHECKPOINT_SIZE = SIZE_OF_CHECKPOINT
_OID = struct.Struct("<I")
_LSN = struct.Struct("<Q")
_PARAMETER_CHANGE = struct.Struct("<iiiiii??2x")
_RESTORE_POINT = struct.Struct("<q64s")
_BOOL = struct.Struct("<B")
_END_OF_RECOVERY = struct.Struct("<qII")
_OVERWRITE_CONTRECORD = struct.Struct("<Qq")


def unpack_checkpoint(data: Buffer) -> CheckPoint:
    """A checkpoint record's main data: exactly one CheckPoint."""
    if len(data) != SIZE_OF_CHECKPOINT:
        raise PayloadError(f"XLOG CHECKPOINT: main data is {len(data)} bytes, expected {SIZE_OF_CHECKPOINT}")
    return CheckPoint.unpack(data)


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
    XLOG_CHECKPOINT_SHUTDOWN: unpack_checkpoint,
    XLOG_CHECKPOINT_ONLINE: unpack_checkpoint,
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
