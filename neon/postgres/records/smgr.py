"""Storage / SMGR (rmid 2) payloads: fork creation and relation truncation (spec §4.2)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, fixed
from .relfilenode import RelFileNode

XLOG_SMGR_CREATE = 0x10
XLOG_SMGR_TRUNCATE = 0x20

SMGR_TRUNCATE_HEAP = 0x1
SMGR_TRUNCATE_VM = 0x2
SMGR_TRUNCATE_FSM = 0x4
SMGR_TRUNCATE_ALL = SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM | SMGR_TRUNCATE_FSM

_CREATE = struct.Struct("<IIIi")
_TRUNCATE = struct.Struct("<IIIIi")


@dataclass(frozen=True, slots=True)
class SmgrCreate:
    """`xl_smgr_create`: fork `fork_num` of `rnode` exists from now on, with 0 blocks."""

    rnode: RelFileNode
    fork_num: int

    @classmethod
    def unpack(cls, data: Buffer) -> SmgrCreate:
        spc, db, rel, fork = fixed(data, _CREATE, "SMGR CREATE")
        return cls(RelFileNode(spc, db, rel), fork)


@dataclass(frozen=True, slots=True)
class SmgrTruncate:
    """`xl_smgr_truncate`: `blkno` is the new main-fork size; `flags` say which forks to cut."""

    blkno: int
    rnode: RelFileNode
    flags: int

    @classmethod
    def unpack(cls, data: Buffer) -> SmgrTruncate:
        blkno, spc, db, rel, flags = fixed(data, _TRUNCATE, "SMGR TRUNCATE")
        return cls(blkno, RelFileNode(spc, db, rel), flags)

    @property
    def truncates_heap(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_HEAP)

    @property
    def truncates_vm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_VM)

    @property
    def truncates_fsm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_FSM)


def describe(info: int, data: Buffer) -> SmgrCreate | SmgrTruncate | None:
    opcode = info & 0xF0
    if opcode == XLOG_SMGR_CREATE:
        return SmgrCreate.unpack(data)
    if opcode == XLOG_SMGR_TRUNCATE:
        return SmgrTruncate.unpack(data)
    return None
