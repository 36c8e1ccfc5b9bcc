"""Small payloads of rmgrs that touch no relation pages: CommitTs (rmid 18) and
ReplicationOrigin (rmid 19) (spec §4.11)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, fixed

COMMIT_TS_ZEROPAGE = 0x00
COMMIT_TS_TRUNCATE = 0x10

XLOG_REPLORIGIN_SET = 0x00
XLOG_REPLORIGIN_DROP = 0x10

_PAGENO = struct.Struct("<i")
_COMMIT_TS_TRUNCATE = struct.Struct("<iI")
_REPLORIGIN_SET = struct.Struct("<QH?5x")
_REPLORIGIN_DROP = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class CommitTsZeroPage:
    pageno: int

    @classmethod
    def unpack(cls, data: Buffer) -> CommitTsZeroPage:
        return cls(*fixed(data, _PAGENO, "COMMIT_TS ZEROPAGE"))


@dataclass(frozen=True, slots=True)
class CommitTsTruncate:
    pageno: int
    oldest_xid: int

    @classmethod
    def unpack(cls, data: Buffer) -> CommitTsTruncate:
        return cls(*fixed(data, _COMMIT_TS_TRUNCATE, "COMMIT_TS TRUNCATE"))


@dataclass(frozen=True, slots=True)
class ReplOriginSet:
    remote_lsn: int
    node_id: int
    force: bool

    @classmethod
    def unpack(cls, data: Buffer) -> ReplOriginSet:
        return cls(*fixed(data, _REPLORIGIN_SET, "REPLORIGIN SET"))


@dataclass(frozen=True, slots=True)
class ReplOriginDrop:
    node_id: int

    @classmethod
    def unpack(cls, data: Buffer) -> ReplOriginDrop:
        return cls(*fixed(data, _REPLORIGIN_DROP, "REPLORIGIN DROP"))


def describe_commit_ts(info: int, data: Buffer) -> CommitTsZeroPage | CommitTsTruncate | None:
    opcode = info & 0xF0
    if opcode == COMMIT_TS_ZEROPAGE:
        return CommitTsZeroPage.unpack(data)
    if opcode == COMMIT_TS_TRUNCATE:
        return CommitTsTruncate.unpack(data)
    return None


def describe_replorigin(info: int, data: Buffer) -> ReplOriginSet | ReplOriginDrop | None:
    opcode = info & 0xF0
    if opcode == XLOG_REPLORIGIN_SET:
        return ReplOriginSet.unpack(data)
    if opcode == XLOG_REPLORIGIN_DROP:
        return ReplOriginDrop.unpack(data)
    return None
