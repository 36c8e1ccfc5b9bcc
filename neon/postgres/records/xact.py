"""Transaction / XACT (rmid 1) payloads: commit/abort (incl. prepared), PREPARE, ASSIGNMENT and
INVALIDATIONS (spec §4.4).

The opcode is `xl_info & 0x70`; bit 0x80 (`XLOG_XACT_HAS_INFO`) says an `xinfo` word follows the
commit/abort timestamp, and `xinfo` then says which optional chunks follow, in a fixed order.
Chunks are packed without alignment, so every read is unaligned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from neon.postgres.crc32c import crc32c
from neon.postgres.errors import PayloadError

from ._reader import Buffer, PayloadReader, cstr
from .relfilenode import RELFILENODE_SIZE, RelFileNode

XLOG_XACT_COMMIT = 0x00
XLOG_XACT_PREPARE = 0x10
XLOG_XACT_ABORT = 0x20
XLOG_XACT_COMMIT_PREPARED = 0x30
XLOG_XACT_ABORT_PREPARED = 0x40
XLOG_XACT_ASSIGNMENT = 0x50
XLOG_XACT_INVALIDATIONS = 0x60
XLOG_XACT_OPMASK = 0x70
XLOG_XACT_HAS_INFO = 0x80

XACT_XINFO_HAS_DBINFO = 0x001
XACT_XINFO_HAS_SUBXACTS = 0x002
XACT_XINFO_HAS_RELFILENODES = 0x004
XACT_XINFO_HAS_INVALS = 0x008
XACT_XINFO_HAS_TWOPHASE = 0x010
XACT_XINFO_HAS_ORIGIN = 0x020
XACT_XINFO_HAS_AE_LOCKS = 0x040
XACT_XINFO_HAS_GID = 0x080
XACT_XINFO_HAS_DROPPED_STATS = 0x100
XACT_COMPLETION_APPLY_FEEDBACK = 1 << 29
XACT_COMPLETION_UPDATE_RELCACHE_FILE = 1 << 30
XACT_COMPLETION_FORCE_SYNC_COMMIT = 1 << 31

TWOPHASE_MAGIC = 0x57F94534

XACT_OPCODE_NAMES = {
    XLOG_XACT_COMMIT: "COMMIT",
    XLOG_XACT_PREPARE: "PREPARE",
    XLOG_XACT_ABORT: "ABORT",
    XLOG_XACT_COMMIT_PREPARED: "COMMIT_PREPARED",
    XLOG_XACT_ABORT_PREPARED: "ABORT_PREPARED",
    XLOG_XACT_ASSIGNMENT: "ASSIGNMENT",
    XLOG_XACT_INVALIDATIONS: "INVALIDATION",
}

_COMMIT_OPCODES = (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED)
_COMMIT_ABORT_OPCODES = (*_COMMIT_OPCODES, XLOG_XACT_ABORT, XLOG_XACT_ABORT_PREPARED)

_TIME = struct.Struct("<q")
_U32 = struct.Struct("<I")
_DBINFO = struct.Struct("<II")
_STATS_ITEM = struct.Struct("<iII")
_ORIGIN = struct.Struct("<Qq")
_PREPARE_HEADER = struct.Struct("<IIIIqIIIIIIIBxHQq")
PREPARE_HEADER_SIZE = _PREPARE_HEADER.size  # 72
INVAL_MSG_SIZE = 16  # sizeof(SharedInvalidationMessage)


@dataclass(frozen=True, slots=True)
class XactStatsItem:
    """`xl_xact_stats_item`: a statistics entry to drop (no storage effect)."""

    kind: int
    dboid: int
    objoid: int


def _stats_items(r: PayloadReader, n: int, field: str) -> tuple[XactStatsItem, ...]:
    return tuple(XactStatsItem(*r.unpack(_STATS_ITEM, field)) for _ in range(n))


def _rels(r: PayloadReader, n: int, field: str) -> tuple[RelFileNode, ...]:
    return tuple(RelFileNode.read(r, field) for _ in range(n))


@dataclass(frozen=True, slots=True)
class XactCommitAbort:
    """A parsed COMMIT, ABORT, COMMIT_PREPARED or ABORT_PREPARED record.

    Absent chunks read as Postgres' own parser leaves them: 0 (Invalid*) and empty tuples;
    `gid` is None without `HAS_GID`.
    """

    opcode: int
    xact_time: int  # TimestampTz
    xinfo: int
    db_id: int
    ts_id: int
    subxacts: tuple[int, ...]
    rels: tuple[RelFileNode, ...]
    stats_items: tuple[XactStatsItem, ...]
    invals: bytes  # raw SharedInvalidationMessages, 16 bytes each (commit only)
    twophase_xid: int
    gid: str | None
    origin_lsn: int
    origin_timestamp: int

    @classmethod
    def unpack(cls, info: int, data: Buffer) -> XactCommitAbort:
        opcode = info & XLOG_XACT_OPMASK
        if opcode not in _COMMIT_ABORT_OPCODES:
            raise PayloadError(f"XACT opcode {opcode:#04x} is not a commit or abort")
        is_commit = opcode in _COMMIT_OPCODES
        r = PayloadReader(data, f"XACT {XACT_OPCODE_NAMES[opcode]}")
        (xact_time,) = r.unpack(_TIME, "xact_time")
        xinfo = r.unpack(_U32, "xinfo")[0] if info & XLOG_XACT_HAS_INFO else 0
        db_id = ts_id = 0
        if xinfo & XACT_XINFO_HAS_DBINFO:
            db_id, ts_id = r.unpack(_DBINFO, "dbinfo")
        subxacts: tuple[int, ...] = ()
        if xinfo & XACT_XINFO_HAS_SUBXACTS:
            subxacts = r.array("I", r.count("subxacts", 4), "subxacts")
        rels: tuple[RelFileNode, ...] = ()
        if xinfo & XACT_XINFO_HAS_RELFILENODES:
            rels = _rels(r, r.count("relfilenodes", RELFILENODE_SIZE), "relfilenodes")
        stats: tuple[XactStatsItem, ...] = ()
        if xinfo & XACT_XINFO_HAS_DROPPED_STATS:
            stats = _stats_items(r, r.count("dropped stats items", _STATS_ITEM.size), "dropped stats items")
        invals = b""
        # Aborts never carry invalidations; Postgres' abort parser ignores the bit, and so do we.
        if is_commit and xinfo & XACT_XINFO_HAS_INVALS:
            n = r.count("invalidation messages", INVAL_MSG_SIZE)
            invals = r.take(n * INVAL_MSG_SIZE, "invalidation messages")
        twophase_xid = 0
        gid = None
        if xinfo & XACT_XINFO_HAS_TWOPHASE:
            (twophase_xid,) = r.unpack(_U32, "twophase xid")
            if xinfo & XACT_XINFO_HAS_GID:
                gid = cstr(r.cstring("gid"))
        origin_lsn = origin_timestamp = 0
        if xinfo & XACT_XINFO_HAS_ORIGIN:
            origin_lsn, origin_timestamp = r.unpack(_ORIGIN, "origin")
        r.end()
        return cls(
            opcode,
            xact_time,
            xinfo,
            db_id,
            ts_id,
            subxacts,
            rels,
            stats,
            invals,
            twophase_xid,
            gid,
            origin_lsn,
            origin_timestamp,
        )

    @property
    def is_commit(self) -> bool:
        return self.opcode in _COMMIT_OPCODES

    @property
    def is_prepared(self) -> bool:
        return self.opcode in (XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED)

    @property
    def n_invals(self) -> int:
        return len(self.invals) // INVAL_MSG_SIZE

    def decided_xid(self, xl_xid: int) -> int:
        """The xid whose fate this record decides: the prepared xid for *_PREPARED (whose xl_xid
        is 0), else the record's own xl_xid (a top-level xact or a rolled-back subxact)."""
        return self.twophase_xid if self.xinfo & XACT_XINFO_HAS_TWOPHASE else xl_xid

    def decided_xids(self, xl_xid: int) -> tuple[int, ...]:
        """Every xid whose CLOG status this record sets: the decided xid, then its subxacts."""
        return (self.decided_xid(xl_xid), *self.subxacts)


@dataclass(frozen=True, slots=True)
class XactPrepare:
    """PREPARE: the two-phase state file (minus its CRC), header and fixed sections parsed.

    `raw` keeps the whole main data: a base backup writes it out as `pg_twophase/<XID>`.
    """

    xid: int
    database: int
    prepared_at: int  # TimestampTz
    owner: int
    nsubxacts: int
    ncommitrels: int
    nabortrels: int
    ncommitstats: int
    nabortstats: int
    ninvalmsgs: int
    initfileinval: bool
    gidlen: int
    origin_lsn: int
    origin_timestamp: int
    gid: str
    subxacts: tuple[int, ...]
    commit_rels: tuple[RelFileNode, ...]
    abort_rels: tuple[RelFileNode, ...]
    commit_stats: tuple[XactStatsItem, ...]
    abort_stats: tuple[XactStatsItem, ...]
    raw: bytes

    @classmethod
    def unpack(cls, data: Buffer) -> XactPrepare:
        raw = bytes(data)
        r = PayloadReader(raw, "XACT PREPARE")
        (
            magic,
            total_len,
            xid,
            database,
            prepared_at,
            owner,
            nsubxacts,
            ncommitrels,
            nabortrels,
            ncommitstats,
            nabortstats,
            ninvalmsgs,
            initfileinval,
            gidlen,
            origin_lsn,
            origin_timestamp,
        ) = r.unpack(_PREPARE_HEADER, "xl_xact_prepare header")
        if magic != TWOPHASE_MAGIC:
            raise r.error(f"bad magic {magic:#010x}, expected {TWOPHASE_MAGIC:#010x}")
        if total_len != len(raw) + 4:
            raise r.error(f"total_len {total_len} is not main data length + 4 CRC bytes")
        # Each section of the state file is MAXALIGN-padded.
        r.align("header")
        gid = cstr(r.take(gidlen, "gid").split(b"\0", 1)[0])
        r.align("gid")
        subxacts = r.array("I", nsubxacts, "subxacts")
        r.align("subxacts")
        commit_rels = _rels(r, r.fits(ncommitrels, RELFILENODE_SIZE, "commit rels"), "commit rels")
        r.align("commit rels")
        abort_rels = _rels(r, r.fits(nabortrels, RELFILENODE_SIZE, "abort rels"), "abort rels")
        r.align("abort rels")
        commit_stats = _stats_items(r, r.fits(ncommitstats, _STATS_ITEM.size, "commit stats"), "commit stats")
        r.align("commit stats")
        abort_stats = _stats_items(r, r.fits(nabortstats, _STATS_ITEM.size, "abort stats"), "abort stats")
        r.align("abort stats")
        r.skip(ninvalmsgs * INVAL_MSG_SIZE, "invalidation messages")
        # What follows (per-rmgr records: locks, predicate locks, ...) is kept only in `raw`.
        return cls(
            xid,
            database,
            prepared_at,
            owner,
            nsubxacts,
            ncommitrels,
            nabortrels,
            ncommitstats,
            nabortstats,
            ninvalmsgs,
            bool(initfileinval),
            gidlen,
            origin_lsn,
            origin_timestamp,
            gid,
            subxacts,
            commit_rels,
            abort_rels,
            commit_stats,
            abort_stats,
            raw,
        )

    @property
    def twophase_file_name(self) -> str:
        return f"pg_twophase/{self.xid:08X}"

    def twophase_file_bytes(self) -> bytes:
        return twophase_file_bytes(self.raw)


def twophase_file_bytes(prepare_main_data: Buffer) -> bytes:
    """The `pg_twophase/<XID>` file for a PREPARE record: its main data + CRC-32C, little-endian."""
    data = bytes(prepare_main_data)
    return data + crc32c(data).to_bytes(4, "little")


@dataclass(frozen=True, slots=True)
class XactAssignment:
    """`xl_xact_assignment`: subxacts of `xtop` reported in bulk (no storage effect)."""

    xtop: int
    subxacts: tuple[int, ...]

    @classmethod
    def unpack(cls, data: Buffer) -> XactAssignment:
        r = PayloadReader(data, "XACT ASSIGNMENT")
        (xtop,) = r.unpack(_U32, "xtop")
        subxacts = r.array("I", r.count("subxacts", 4), "xsub")
        r.end()
        return cls(xtop, subxacts)


@dataclass(frozen=True, slots=True)
class XactInvalidations:
    """`xl_xact_invals` (wal_level=logical): invalidation messages, kept raw."""

    msgs: bytes

    @classmethod
    def unpack(cls, data: Buffer) -> XactInvalidations:
        r = PayloadReader(data, "XACT INVALIDATION")
        n = r.count("invalidation messages", INVAL_MSG_SIZE)
        msgs = r.take(n * INVAL_MSG_SIZE, "invalidation messages")
        r.end()
        return cls(msgs)

    @property
    def n_msgs(self) -> int:
        return len(self.msgs) // INVAL_MSG_SIZE


XactPayload = XactCommitAbort | XactPrepare | XactAssignment | XactInvalidations


def describe(info: int, data: Buffer) -> XactPayload | None:
    opcode = info & XLOG_XACT_OPMASK
    if opcode in _COMMIT_ABORT_OPCODES:
        return XactCommitAbort.unpack(info, data)
    if opcode == XLOG_XACT_PREPARE:
        return XactPrepare.unpack(data)
    if opcode == XLOG_XACT_ASSIGNMENT:
        return XactAssignment.unpack(data)
    if opcode == XLOG_XACT_INVALIDATIONS:
        return XactInvalidations.unpack(data)
    return None
