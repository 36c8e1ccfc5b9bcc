"""Database / DBASE (rmid 4) payloads: CREATE DATABASE (both strategies) and DROP (spec §4.3).

PostgreSQL 15 renumbered these opcodes (14 had CREATE 0x00, DROP 0x10); see spec §12.6.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, PayloadReader, fixed

XLOG_DBASE_CREATE_FILE_COPY = 0x00
XLOG_DBASE_CREATE_WAL_LOG = 0x10
XLOG_DBASE_DROP = 0x20

_FILE_COPY = struct.Struct("<IIII")
_WAL_LOG = struct.Struct("<II")
_DROP_HEAD = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class DbaseCreateFileCopy:
    """Copy the whole directory of (src_tablespace_id, src_db_id) to (tablespace_id, db_id)."""

    db_id: int
    tablespace_id: int
    src_db_id: int
    src_tablespace_id: int

    @classmethod
    def unpack(cls, data: Buffer) -> DbaseCreateFileCopy:
        return cls(*fixed(data, _FILE_COPY, "DBASE CREATE_FILE_COPY"))


@dataclass(frozen=True, slots=True)
class DbaseCreateWalLog:
    """Create the empty database directory; its contents follow as ordinary WAL."""

    db_id: int
    tablespace_id: int

    @classmethod
    def unpack(cls, data: Buffer) -> DbaseCreateWalLog:
        return cls(*fixed(data, _WAL_LOG, "DBASE CREATE_WAL_LOG"))


@dataclass(frozen=True, slots=True)
class DbaseDrop:
    """Remove the directory of `db_id` in each listed tablespace."""

    db_id: int
    tablespace_ids: tuple[int, ...]

    @classmethod
    def unpack(cls, data: Buffer) -> DbaseDrop:
        r = PayloadReader(data, "DBASE DROP")
        (db_id,) = r.unpack(_DROP_HEAD, "db_id")
        n = r.count("tablespace ids", 4)
        ids = r.array("I", n, "tablespace_ids")
        r.end()
        return cls(db_id, ids)


def describe(info: int, data: Buffer) -> DbaseCreateFileCopy | DbaseCreateWalLog | DbaseDrop | None:
    opcode = info & 0xF0
    if opcode == XLOG_DBASE_CREATE_FILE_COPY:
        return DbaseCreateFileCopy.unpack(data)
    if opcode == XLOG_DBASE_CREATE_WAL_LOG:
        return DbaseCreateWalLog.unpack(data)
    if opcode == XLOG_DBASE_DROP:
        return DbaseDrop.unpack(data)
    return None
