"""CLOG (rmid 3) payloads: pg_xact page zeroing and truncation (spec §4.5)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, fixed

CLOG_ZEROPAGE = 0x00
CLOG_TRUNCATE = 0x10

_PAGENO = struct.Struct("<i")
_TRUNCATE = struct.Struct("<iII")


@dataclass(frozen=True, slots=True)
class ClogZeroPage:
    pageno: int

    @classmethod
    def unpack(cls, data: Buffer) -> ClogZeroPage:
        return cls(*fixed(data, _PAGENO, "CLOG ZEROPAGE"))


@dataclass(frozen=True, slots=True)
class ClogTruncate:
    """`xl_clog_truncate`: segments before `pageno` go; `oldest_xact` is the new oldest xid."""

    pageno: int
    oldest_xact: int
    oldest_xact_db: int

    @classmethod
    def unpack(cls, data: Buffer) -> ClogTruncate:
        return cls(*fixed(data, _TRUNCATE, "CLOG TRUNCATE"))


def describe(info: int, data: Buffer) -> ClogZeroPage | ClogTruncate | None:
    opcode = info & 0xF0
    if opcode == CLOG_ZEROPAGE:
        return ClogZeroPage.unpack(data)
    if opcode == CLOG_TRUNCATE:
        return ClogTruncate.unpack(data)
    return None
