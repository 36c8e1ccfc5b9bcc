"""The pageserver's key space (spec pageserver §2.1-2.2): `Key`, `KeyRange` and the key table.

This module owns the six-field key, its 18-byte and 36-hex-digit forms, the constructor for every
row of the key table, the deletion ranges, the classification helpers and the conversions to the
redo targets of `neon.walredo.records`. What is stored under a key lives in `value` and
`directories`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from neon.postgres.constants import FSM_FORKNUM, SLRU_PAGES_PER_SEGMENT, VISIBILITYMAP_FORKNUM
from neon.postgres.errors import PgFormatError
from neon.walredo.records import BufferTag, SlruKind, SlruPage

KEY_SIZE = 18
KEY_HEX_SIZE = 2 * KEY_SIZE
_KEY = struct.Struct(">BIIIBI")  # big-endian, no padding: bytewise order == field order
assert _KEY.size == KEY_SIZE

_U8 = 0xFF
_U32 = 0xFFFF_FFFF
_KEY_BITS = 8 * KEY_SIZE

# field1 namespaces.
REL_NAMESPACE = 0x00
SLRU_NAMESPACE = 0x01
TWOPHASE_NAMESPACE = 0x02
MISC_NAMESPACE = 0x03

# field6 values with a meaning of their own.
SIZE_KEY_FIELD6 = _U32
"""Block number of a rel size / SLRU segment size key (InvalidBlockNumber, never a real block)."""
RELDIR_FIELD6 = 1
CONTROLFILE_FIELD6 = 0
CHECKPOINT_FIELD6 = 1
AUX_FILES_FIELD6 = 2
SLRU_BLOCKS_FIELD3 = 1
"""field3 of SLRU block and segment-size keys; 0 there is the SlruDir key."""

# SLRU kinds as numbered in keys. This is also the kind order of collect_keyspace (§2.4).
SLRU_KIND_NUMBERS: dict[SlruKind, int] = {
    SlruKind.CLOG: 0,
    SlruKind.MULTIXACT_MEMBERS: 1,
    SlruKind.MULTIXACT_OFFSETS: 2,
}
SLRU_KINDS_BY_NUMBER: dict[int, SlruKind] = {n: k for k, n in SLRU_KIND_NUMBERS.items()}
SLRU_KINDS_IN_KEY_ORDER: tuple[SlruKind, ...] = tuple(SLRU_KINDS_BY_NUMBER[n] for n in sorted(SLRU_KINDS_BY_NUMBER))


class InvalidKeyError(PgFormatError):
    """A key (or its bytes/hex form) that does not fit the key layout or is not the kind asked for."""


@dataclass(frozen=True, slots=True, order=True)
class Key:
    """A point in the key space; ordered as the tuple (field1, ..., field6)."""

    field1: int  # u8: namespace
    field2: int  # u32: spcnode / SLRU kind
    field3: int  # u32: dbnode / 1 for SLRU blocks
    field4: int  # u32: relnode / SLRU segno
    field5: int  # u8: forknum
    field6: int  # u32: block number / sub-id

    MIN: ClassVar[Key]
    MAX: ClassVar[Key]

    def __post_init__(self) -> None:
        if not (
            0 <= self.field1 <= _U8
            and 0 <= self.field2 <= _U32
            and 0 <= self.field3 <= _U32
            and 0 <= self.field4 <= _U32
            and 0 <= self.field5 <= _U8
            and 0 <= self.field6 <= _U32
        ):
            raise InvalidKeyError(f"key field out of range (u8, u32, u32, u32, u8, u32): {self.as_tuple()}")

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        return (self.field1, self.field2, self.field3, self.field4, self.field5, self.field6)

    # --- binary, hex and integer forms ---------------------------------------------------------
    def to_bytes(self) -> bytes:
        return _KEY.pack(self.field1, self.field2, self.field3, self.field4, self.field5, self.field6)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> Key:
        if len(buf) != KEY_SIZE:
            raise InvalidKeyError(f"a key is {KEY_SIZE} bytes, got {len(buf)}")
        return cls(*_KEY.unpack(buf))

    def to_hex(self) -> str:
        return "%02X%08X%08X%08X%02X%08X" % self.as_tuple()  # noqa: UP031 - reads like the spec's format

    @classmethod
    def from_hex(cls, text: str) -> Key:
        # Lower case is accepted, as Neon's parser does; anything but 36 hex digits is not.
        # (bytes.fromhex skips whitespace, but any skipped character makes the result short.)
        if len(text) != KEY_HEX_SIZE:
            raise InvalidKeyError(f"a key is {KEY_HEX_SIZE} hex digits, got {len(text)}: {text!r}")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise InvalidKeyError(f"key is not hex: {text!r}") from None
        if len(raw) != KEY_SIZE:
            raise InvalidKeyError(f"key is not {KEY_HEX_SIZE} hex digits: {text!r}")
        return cls.from_bytes(raw)

    def to_int(self) -> int:
        """The key as a 144-bit unsigned integer; integer order equals key order."""
        return int.from_bytes(self.to_bytes(), "big")

    @classmethod
    def from_int(cls, value: int) -> Key:
        if not 0 <= value < 1 << _KEY_BITS:
            raise InvalidKeyError(f"integer {value:#x} does not fit in a {KEY_SIZE}-byte key")
        return cls.from_bytes(value.to_bytes(KEY_SIZE, "big"))

    def next(self) -> Key:
        """The smallest key greater than this one (field6 + 1, carrying into field5, field4, ...)."""
        if self.field6 != _U32:  # the common case, without the 144-bit round trip
            return Key(self.field1, self.field2, self.field3, self.field4, self.field5, self.field6 + 1)
        if self == Key.MAX:
            raise InvalidKeyError("Key.MAX has no next key")
        return Key.from_int(self.to_int() + 1)

    def __str__(self) -> str:
        return self.to_hex()

    # --- conversions to redo targets -----------------------------------------------------------
    def to_buffer_tag(self) -> BufferTag:
        """The relation block this key stores; size, directory and relmap keys are not blocks."""
        if self.field1 != REL_NAMESPACE:
            raise InvalidKeyError(f"key {self} is not a relation key (field1 {self.field1:#04x})")
        if self.field4 == 0:
            raise InvalidKeyError(f"invalid relnode: key {self} is a relmap/reldir/dbdir key, not a block")
        if self.field6 == SIZE_KEY_FIELD6:
            raise InvalidKeyError(f"key {self} is a relation size key, not a block")
        return BufferTag(self.field2, self.field3, self.field4, self.field5, self.field6)

    def to_slru_page(self) -> SlruPage:
        """The SLRU page this key stores; directory and segment-size keys are not pages."""
        if self.field1 != SLRU_NAMESPACE:
            raise InvalidKeyError(f"key {self} is not an SLRU key (field1 {self.field1:#04x})")
        kind = SLRU_KINDS_BY_NUMBER.get(self.field2)
        if kind is None:
            raise InvalidKeyError(f"key {self} has unknown SLRU kind {self.field2}")
        if self.field3 != SLRU_BLOCKS_FIELD3 or self.field5 != 0:
            raise InvalidKeyError(f"key {self} is not an SLRU block key")
        if self.field6 >= SLRU_PAGES_PER_SEGMENT:
            what = "a segment size key" if self.field6 == SIZE_KEY_FIELD6 else "out of range"
            raise InvalidKeyError(f"key {self} is {what}, not an SLRU block (0..{SLRU_PAGES_PER_SEGMENT - 1})")
        return SlruPage(kind, self.field4, self.field6)


Key.MIN = Key(0, 0, 0, 0, 0, 0)
Key.MAX = Key(_U8, _U32, _U32, _U32, _U8, _U32)


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys `start <= k < end`; empty when start == end."""

    start: Key
    end: Key

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise InvalidKeyError(f"key range end {self.end} is before its start {self.start}")

    def contains(self, key: Key) -> bool:
        return self.start <= key < self.end

    __contains__ = contains

    def overlaps(self, other: KeyRange) -> bool:
        """Whether some key is in both (never true of an empty range)."""
        return max(self.start, other.start) < min(self.end, other.end)

    def is_empty(self) -> bool:
        return self.start == self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


def singleton_range(key: Key) -> KeyRange:
    """The range holding exactly `key`."""
    return KeyRange(key, key.next())


class RelTag(NamedTuple):
    """One fork of a relation: (tablespace, database, relfilenode, fork)."""

    spc: int
    db: int
    rel: int
    fork: int

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.rel}.{self.fork}"


# --- the key table (§2.2) ------------------------------------------------------------------------
def _check_relnode(rel: int) -> None:
    # relnode 0 is where the relmap and reldir keys of a database live.
    if rel == 0:
        raise InvalidKeyError("invalid relnode: 0 is not a relation")


def _slru_kind_number(kind: SlruKind) -> int:
    try:
        return SLRU_KIND_NUMBERS[kind]
    except KeyError:
        raise InvalidKeyError(f"not an SLRU kind: {kind!r}") from None


def dbdir_key() -> Key:
    """The DbDirectory: every (spc, db) with a relmap file or relations."""
    return Key(REL_NAMESPACE, 0, 0, 0, 0, 0)


def relmap_file_key(spc: int, db: int) -> Key:
    """The 512-byte pg_filenode.map of a database (db 0 with spc 1664: the global one)."""
    return Key(REL_NAMESPACE, spc, db, 0, 0, 0)


def rel_dir_key(spc: int, db: int) -> Key:
    """The RelDirectory of a database."""
    return Key(REL_NAMESPACE, spc, db, 0, 0, RELDIR_FIELD6)


def rel_block_key(spc: int, db: int, rel: int, fork: int, blk: int) -> Key:
    _check_relnode(rel)
    if blk == SIZE_KEY_FIELD6:
        raise InvalidKeyError(f"block number {blk:#x} is InvalidBlockNumber (the size key's slot)")
    return Key(REL_NAMESPACE, spc, db, rel, fork, blk)


def buffer_tag_key(tag: BufferTag) -> Key:
    return rel_block_key(tag.spc, tag.db, tag.rel, tag.fork, tag.blk)


def rel_size_key(spc: int, db: int, rel: int, fork: int) -> Key:
    """A relation fork's size in blocks (u32 LE); sorts right after the fork's last block."""
    _check_relnode(rel)
    return Key(REL_NAMESPACE, spc, db, rel, fork, SIZE_KEY_FIELD6)


def slru_dir_key(kind: SlruKind) -> Key:
    """The SlruSegmentDirectory of one SLRU."""
    return Key(SLRU_NAMESPACE, _slru_kind_number(kind), 0, 0, 0, 0)


def slru_block_key(kind: SlruKind, segno: int, blk: int) -> Key:
    if not 0 <= blk < SLRU_PAGES_PER_SEGMENT:
        raise InvalidKeyError(f"SLRU block {blk} out of range 0..{SLRU_PAGES_PER_SEGMENT - 1}")
    return Key(SLRU_NAMESPACE, _slru_kind_number(kind), SLRU_BLOCKS_FIELD3, segno, 0, blk)


def slru_pageno_key(kind: SlruKind, pageno: int) -> Key:
    """SLRU page number `pageno` (segno = pageno // 32, blk = pageno % 32)."""
    if pageno < 0:
        raise InvalidKeyError(f"negative SLRU page number {pageno}")
    segno, blk = divmod(pageno, SLRU_PAGES_PER_SEGMENT)
    return slru_block_key(kind, segno, blk)


def slru_page_key(page: SlruPage) -> Key:
    return slru_block_key(page.kind, page.segno, page.blk)


def slru_segment_size_key(kind: SlruKind, segno: int) -> Key:
    """A segment's size in blocks (u32 LE); sorts right after the segment's last block."""
    return Key(SLRU_NAMESPACE, _slru_kind_number(kind), SLRU_BLOCKS_FIELD3, segno, 0, SIZE_KEY_FIELD6)


def twophase_dir_key() -> Key:
    """The TwoPhaseDirectory. Equal to what twophase_file_key(0) would be; xid 0 never prepares."""
    return Key(TWOPHASE_NAMESPACE, 0, 0, 0, 0, 0)


def twophase_file_key(xid: int) -> Key:
    """The state file of a prepared transaction (without its CRC)."""
    if xid == 0:
        raise InvalidKeyError("xid 0 (InvalidTransactionId) has no twophase file; its key is the TwoPhaseDir's")
    return Key(TWOPHASE_NAMESPACE, 0, 0, 0, 0, xid)


def controlfile_key() -> Key:
    """The 8192-byte pg_control file, as imported."""
    return Key(MISC_NAMESPACE, 0, 0, 0, 0, CONTROLFILE_FIELD6)


def checkpoint_key() -> Key:
    """The current CheckPoint struct (88 bytes, bincode LE == C layout)."""
    return Key(MISC_NAMESPACE, 0, 0, 0, 0, CHECKPOINT_FIELD6)


def aux_files_key() -> Key:
    """The AuxFilesDirectory."""
    return Key(MISC_NAMESPACE, 0, 0, 0, 0, AUX_FILES_FIELD6)


# --- deletion ranges ---------------------------------------------------------------------------
def rel_fork_range(spc: int, db: int, rel: int, fork: int) -> KeyRange:
    """Every block and the size key of one relation fork."""
    _check_relnode(rel)
    return KeyRange(Key(REL_NAMESPACE, spc, db, rel, fork, 0), Key(REL_NAMESPACE, spc, db, rel, fork + 1, 0))


def database_range(spc: int, db: int) -> KeyRange:
    """The relmap, reldir, blocks and sizes of one database (the spec's end, kept exclusive)."""
    return KeyRange(Key(REL_NAMESPACE, spc, db, 0, 0, 0), Key(REL_NAMESPACE, spc, db, _U32, _U8, _U32))


def slru_segment_range(kind: SlruKind, segno: int) -> KeyRange:
    """Every block and the size key of one SLRU segment."""
    n = _slru_kind_number(kind)
    return KeyRange(
        Key(SLRU_NAMESPACE, n, SLRU_BLOCKS_FIELD3, segno, 0, 0), Key(SLRU_NAMESPACE, n, SLRU_BLOCKS_FIELD3, segno, 1, 0)
    )


def twophase_file_range(xid: int) -> KeyRange:
    """The one key of a twophase file; xid 0xFFFFFFFF carries into field5, as in Neon."""
    return singleton_range(twophase_file_key(xid))


# --- classification (§2.2, exactly as Neon's helpers) -------------------------------------------
def is_rel_block_key(key: Key) -> bool:
    """field1 == 0 and relnode != 0. Size keys match too, as in Neon."""
    return key.field1 == REL_NAMESPACE and key.field4 != 0


def is_rel_size_key(key: Key) -> bool:
    return key.field1 == REL_NAMESPACE and key.field4 != 0 and key.field6 == SIZE_KEY_FIELD6


def is_rel_fsm_block_key(key: Key) -> bool:
    return (
        key.field1 == REL_NAMESPACE and key.field4 != 0 and key.field5 == FSM_FORKNUM and key.field6 != SIZE_KEY_FIELD6
    )


def is_rel_vm_block_key(key: Key) -> bool:
    return (
        key.field1 == REL_NAMESPACE
        and key.field4 != 0
        and key.field5 == VISIBILITYMAP_FORKNUM
        and key.field6 != SIZE_KEY_FIELD6
    )


def is_slru_block_key(key: Key) -> bool:
    return key.field1 == SLRU_NAMESPACE and key.field3 == SLRU_BLOCKS_FIELD3 and key.field6 != SIZE_KEY_FIELD6


def is_slru_segment_size_key(key: Key) -> bool:
    return key.field1 == SLRU_NAMESPACE and key.field3 == SLRU_BLOCKS_FIELD3 and key.field6 == SIZE_KEY_FIELD6


# --- 18-byte forms for the hot paths (ingest, reads): no Key object is built -------------------
_pack_key = _KEY.pack


def rel_block_key_bytes(spc: int, db: int, rel: int, fork: int, blk: int) -> bytes:
    """`rel_block_key(...).to_bytes()` without the checks (callers pass WAL-decoded block refs)."""
    return _pack_key(REL_NAMESPACE, spc, db, rel, fork, blk)


def rel_size_key_bytes(tag: RelTag) -> bytes:
    return _pack_key(REL_NAMESPACE, tag.spc, tag.db, tag.rel, tag.fork, SIZE_KEY_FIELD6)


def unpack_key_bytes(key: bytes) -> tuple[int, int, int, int, int, int]:
    """The six fields of an 18-byte key."""
    return _KEY.unpack(key)
