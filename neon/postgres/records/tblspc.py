"""Tablespace (rmid 5) payloads: CREATE (id + location) and DROP (spec §4.11)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, PayloadReader, cstr, fixed

XLOG_TBLSPC_CREATE = 0x00
XLOG_TBLSPC_DROP = 0x10

_OID = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class TblspcCreate:
    ts_id: int
    path: str

    @classmethod
    def unpack(cls, data: Buffer) -> TblspcCreate:
        r = PayloadReader(data, "TBLSPC CREATE")
        (ts_id,) = r.unpack(_OID, "ts_id")
        path = cstr(r.cstring("ts_path"))
        r.end()
        return cls(ts_id, path)


@dataclass(frozen=True, slots=True)
class TblspcDrop:
    ts_id: int

    @classmethod
    def unpack(cls, data: Buffer) -> TblspcDrop:
        return cls(*fixed(data, _OID, "TBLSPC DROP"))


def describe(info: int, data: Buffer) -> TblspcCreate | TblspcDrop | None:
    opcode = info & 0xF0
    if opcode == XLOG_TBLSPC_CREATE:
        return TblspcCreate.unpack(data)
    if opcode == XLOG_TBLSPC_DROP:
        return TblspcDrop.unpack(data)
    return None
