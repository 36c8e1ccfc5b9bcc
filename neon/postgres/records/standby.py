"""Standby (rmid 8) payloads: AccessExclusive locks, RUNNING_XACTS snapshots, invalidations (spec §4.8).

None of them changes storage; RUNNING_XACTS is a convenient source of nextXid.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._reader import Buffer, PayloadReader

XLOG_STANDBY_LOCK = 0x00
XLOG_RUNNING_XACTS = 0x10
XLOG_INVALIDATIONS = 0x20

INVAL_MSG_SIZE = 16

_LOCK = struct.Struct("<III")
# The 3 bytes after subxid_overflow are padding that the server does not zero: skip them unread.
_RUNNING_HEAD = struct.Struct("<ii?3xIII")
_INVAL_HEAD = struct.Struct("<II?3x")


@dataclass(frozen=True, slots=True)
class StandbyLockEntry:
    xid: int
    db_oid: int
    rel_oid: int


@dataclass(frozen=True, slots=True)
class StandbyLocks:
    locks: tuple[StandbyLockEntry, ...]

    @classmethod
    def unpack(cls, data: Buffer) -> StandbyLocks:
        r = PayloadReader(data, "STANDBY LOCK")
        n = r.count("locks", _LOCK.size)
        locks = tuple(StandbyLockEntry(*r.unpack(_LOCK, "locks")) for _ in range(n))
        r.end()
        return cls(locks)


@dataclass(frozen=True, slots=True)
class RunningXacts:
    """`xl_running_xacts`: `xids` are the top-level running xids, `subxids` the subxids."""

    subxid_overflow: bool
    next_xid: int
    oldest_running_xid: int
    latest_completed_xid: int
    xids: tuple[int, ...]
    subxids: tuple[int, ...]

    @classmethod
    def unpack(cls, data: Buffer) -> RunningXacts:
        r = PayloadReader(data, "STANDBY RUNNING_XACTS")
        xcnt, subxcnt, overflow, next_xid, oldest, latest = r.unpack(_RUNNING_HEAD, "xl_running_xacts")
        if xcnt < 0 or subxcnt < 0:
            raise r.error(f"negative xid counts xcnt={xcnt} subxcnt={subxcnt}")
        r.fits(xcnt + subxcnt, 4, "xids")
        xids = r.array("I", xcnt, "xids")
        subxids = r.array("I", subxcnt, "subxids")
        r.end()
        return cls(overflow, next_xid, oldest, latest, xids, subxids)

    @property
    def xcnt(self) -> int:
        return len(self.xids)

    @property
    def subxcnt(self) -> int:
        return len(self.subxids)


@dataclass(frozen=True, slots=True)
class StandbyInvalidations:
    """`xl_invalidations`: messages kept raw (16 bytes each)."""

    db_id: int
    ts_id: int
    relcache_init_file_inval: bool
    msgs: bytes

    @classmethod
    def unpack(cls, data: Buffer) -> StandbyInvalidations:
        r = PayloadReader(data, "STANDBY INVALIDATIONS")
        db_id, ts_id, relcache = r.unpack(_INVAL_HEAD, "xl_invalidations")
        n = r.count("invalidation messages", INVAL_MSG_SIZE)
        msgs = r.take(n * INVAL_MSG_SIZE, "invalidation messages")
        r.end()
        return cls(db_id, ts_id, relcache, msgs)

    @property
    def n_msgs(self) -> int:
        return len(self.msgs) // INVAL_MSG_SIZE


StandbyPayload = StandbyLocks | RunningXacts | StandbyInvalidations


def describe(info: int, data: Buffer) -> StandbyPayload | None:
    opcode = info & 0xF0
    if opcode == XLOG_STANDBY_LOCK:
        return StandbyLocks.unpack(data)
    if opcode == XLOG_RUNNING_XACTS:
        return RunningXacts.unpack(data)
    if opcode == XLOG_INVALIDATIONS:
        return StandbyInvalidations.unpack(data)
    return None
