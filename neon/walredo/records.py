"""What a page is reconstructed from: redo targets and the record kinds of the pageserver.

`PostgresRecord` is a raw WAL record, applied by the Postgres redo helper. The other kinds are
Neon's own (spec pageserver §3.2) and are applied in Python by `neon.walredo.apply_neon`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class BufferTag:
    """A relation block: (tablespace, database, relfilenode, fork, block)."""

    spc: int
    db: int
    rel: int
    fork: int
    blk: int

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.rel}.{self.fork} blk {self.blk}"


class SlruKind(Enum):
    CLOG = "pg_xact"
    MULTIXACT_OFFSETS = "pg_multixact/offsets"
    MULTIXACT_MEMBERS = "pg_multixact/members"


@dataclass(frozen=True, slots=True)
class SlruPage:
    """Block `blk` of segment `segno` of an SLRU."""

    kind: SlruKind
    segno: int
    blk: int

    def __str__(self) -> str:
        return f"{self.kind.value}/{self.segno:04X} blk {self.blk}"


RedoTarget = BufferTag | SlruPage


@dataclass(frozen=True, slots=True)
class PostgresRecord:
    """A complete XLogRecord; `will_init` when it initialises the target page."""

    will_init: bool
    rec: bytes


@dataclass(frozen=True, slots=True)
class ClearVisibilityMapFlags:
    new_heap_blkno: int | None
    old_heap_blkno: int | None
    flags: int


@dataclass(frozen=True, slots=True)
class ClogSetCommitted:
    xids: tuple[int, ...]
    timestamp: int  # TimestampTz: µs since 2000-01-01


@dataclass(frozen=True, slots=True)
class ClogSetAborted:
    xids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MultixactOffsetCreate:
    mid: int
    moff: int


@dataclass(frozen=True, slots=True)
class MultixactMembersCreate:
    moff: int
    members: tuple[tuple[int, int], ...]  # (xid, MultiXactStatus)


NeonRecord = (
    ClearVisibilityMapFlags | ClogSetCommitted | ClogSetAborted | MultixactOffsetCreate | MultixactMembersCreate
)
WalRecord = PostgresRecord | NeonRecord


def is_neon_record(rec: WalRecord) -> bool:
    return not isinstance(rec, PostgresRecord)


def will_init(rec: WalRecord) -> bool:
    return isinstance(rec, PostgresRecord) and rec.will_init
