"""MultiXact (rmid 6) payloads: offsets/members page zeroing, CREATE_ID and TRUNCATE_ID (spec §4.6)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, PayloadReader, fixed

XLOG_MULTIXACT_ZERO_OFF_PAGE = 0x00
XLOG_MULTIXACT_ZERO_MEM_PAGE = 0x10
XLOG_MULTIXACT_CREATE_ID = 0x20
XLOG_MULTIXACT_TRUNCATE_ID = 0x30

# MultiXactStatus (access/multixact.h); values above FOR_UPDATE are updates, not locks.
MULTIXACT_STATUS_FOR_KEY_SHARE = 0
MULTIXACT_STATUS_FOR_SHARE = 1
MULTIXACT_STATUS_FOR_NO_KEY_UPDATE = 2
MULTIXACT_STATUS_FOR_UPDATE = 3
MULTIXACT_STATUS_NO_KEY_UPDATE = 4
MULTIXACT_STATUS_UPDATE = 5
MULTIXACT_STATUS_MAX = MULTIXACT_STATUS_UPDATE

# The abbreviations pg_waldump prints for each status.
MULTIXACT_STATUS_NAMES = {
    MULTIXACT_STATUS_FOR_KEY_SHARE: "keysh",
    MULTIXACT_STATUS_FOR_SHARE: "sh",
    MULTIXACT_STATUS_FOR_NO_KEY_UPDATE: "fornokeyupd",
    MULTIXACT_STATUS_FOR_UPDATE: "forupd",
    MULTIXACT_STATUS_NO_KEY_UPDATE: "nokeyupd",
    MULTIXACT_STATUS_UPDATE: "upd",
}

_PAGENO = struct.Struct("<i")
_CREATE_HEAD = struct.Struct("<II")
_MEMBER = struct.Struct("<Ii")
_TRUNCATE = struct.Struct("<IIIII")


@dataclass(frozen=True, slots=True)
class MultiXactZeroPage:
    """ZERO_OFF_PAGE (`members` False) or ZERO_MEM_PAGE (`members` True)."""

    members: bool
    pageno: int

    @classmethod
    def unpack(cls, info: int, data: Buffer) -> MultiXactZeroPage:
        members = (info & 0xF0) == XLOG_MULTIXACT_ZERO_MEM_PAGE
        what = "MULTIXACT ZERO_MEM_PAGE" if members else "MULTIXACT ZERO_OFF_PAGE"
        return cls(members, *fixed(data, _PAGENO, what))


@dataclass(frozen=True, slots=True)
class MultiXactMember:
    xid: int
    status: int

    @property
    def is_update(self) -> bool:
        return self.status > MULTIXACT_STATUS_FOR_UPDATE


@dataclass(frozen=True, slots=True)
class MultiXactCreate:
    """`xl_multixact_create`: multixact `mid` starts at member offset `moff`."""

    mid: int
    moff: int
    members: tuple[MultiXactMember, ...]

    @classmethod
    def unpack(cls, data: Buffer) -> MultiXactCreate:
        r = PayloadReader(data, "MULTIXACT CREATE_ID")
        mid, moff = r.unpack(_CREATE_HEAD, "mid/moff")
        n = r.count("members", _MEMBER.size)
        members = tuple(MultiXactMember(*r.unpack(_MEMBER, "members")) for _ in range(n))
        r.end()
        return cls(mid, moff, members)

    @property
    def nmembers(self) -> int:
        return len(self.members)


@dataclass(frozen=True, slots=True)
class MultiXactTruncate:
    """`xl_multixact_truncate`: offsets [start_trunc_off, end_trunc_off) and members
    [start_trunc_memb, end_trunc_memb) are removed; `end_trunc_off` is the new oldestMulti."""

    oldest_multi_db: int
    start_trunc_off: int
    end_trunc_off: int
    start_trunc_memb: int
    end_trunc_memb: int

    @classmethod
    def unpack(cls, data: Buffer) -> MultiXactTruncate:
        return cls(*fixed(data, _TRUNCATE, "MULTIXACT TRUNCATE_ID"))


MultiXactPayload = MultiXactZeroPage | MultiXactCreate | MultiXactTruncate


def describe(info: int, data: Buffer) -> MultiXactPayload | None:
    opcode = info & 0xF0
    if opcode in (XLOG_MULTIXACT_ZERO_OFF_PAGE, XLOG_MULTIXACT_ZERO_MEM_PAGE):
        return MultiXactZeroPage.unpack(info, data)
    if opcode == XLOG_MULTIXACT_CREATE_ID:
        return MultiXactCreate.unpack(data)
    if opcode == XLOG_MULTIXACT_TRUNCATE_ID:
        return MultiXactTruncate.unpack(data)
    return None
